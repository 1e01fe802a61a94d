//! Cached inputs turned into image files (`Taken`), for the build to stream
//! from disk. A `file` input is its cached file; a `tar` (gzip, xz or zstd,
//! told by magic bytes) or `deb` (an `ar` archive read here, whose
//! `data.tar.{xz,zst,gz}` is read; maintainer scripts are never looked at,
//! let alone run) gives exactly its declared members, extracted into
//! `extracted/<sha256>/<input>/<member>` in the cache. Refused: a declared member
//! that is missing, present twice, or not a regular file (a link or a
//! directory where a file is declared). Nothing else in the archive is
//! written, so no archive path can escape: files are created only under the
//! declared (`RelPath`) names in a fresh directory. The archive is hashed
//! in the same pass and must match the lock, else the extraction is
//! discarded (exit 1, both digests named); the result is renamed into place
//! only when complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::inputs::cache::Cache;
use crate::inputs::decl::{Input, Kind, Target};
use crate::model::RelPath;
use crate::trust::digest::{HashingReader, Sha256};

/// One file an input puts into the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Where it goes in the image.
    pub image_path: RelPath,
    /// Its declared mode.
    pub mode: u32,
    /// The file to stream its content from (in the cache).
    pub source: PathBuf,
    /// The input it came from (its provenance).
    pub input: String,
    /// The digest `source` had when it was checked: the build compares the
    /// bytes it streams with it.
    pub sha256: Sha256,
}

/// The files `input`, locked at `sha`, puts into the image, sorted by
/// image path. `fix` is the command that fetches it (named when it is not
/// in the cache).
pub fn take(input: &Input, sha: &Sha256, cache: &Cache, fix: &str) -> Result<Vec<Taken>> {
    let missing = || {
        Error::usage(
            format!("input {}", input.name),
            format!(
                "sha256 {sha} is not in the cache ({}); run `{fix}`",
                cache.root().display()
            ),
        )
    };
    match input.kind {
        Kind::Image => Ok(Vec::new()),
        Kind::File => {
            let source = cache.check(&input.name, sha)?.ok_or_else(missing)?;
            let target = input
                .file
                .as_ref()
                .expect("a file input has a target (decl checks it)");
            Ok(vec![Taken {
                image_path: target.path.clone(),
                mode: target.mode,
                source,
                input: input.name.clone(),
                sha256: *sha,
            }])
        }
        Kind::Tar | Kind::Deb => {
            let path = cache.file(sha);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
                Err(e) => return Err(Error::io(&path, "opening cached input")(e)),
            };
            extract(input, sha, file, &path, cache)
        }
    }
}

fn extract(
    input: &Input,
    sha: &Sha256,
    file: File,
    path: &Path,
    cache: &Cache,
) -> Result<Vec<Taken>> {
    let parent = cache.root().join("extracted");
    std::fs::create_dir_all(&parent).map_err(Error::io(&parent, "creating the cache directory"))?;
    let tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempdir_in(&parent)
        .map_err(Error::io(&parent, "creating an extraction directory"))?;
    let bad = |m: String| {
        Error::check(format!(
            "input {} ({}, sha256 {sha}): {m}",
            input.name,
            input.url()
        ))
    };
    let mut hashing = HashingReader::new(BufReader::with_capacity(256 << 10, file));
    // Read to the end and hash whatever happens, so a modified file is
    // reported as such rather than as whatever it broke.
    let outcome = (|| match input.kind {
        Kind::Deb => {
            let (name, size) = deb_data_member(&mut hashing).map_err(&bad)?;
            let mut member = (&mut hashing).take(size);
            read_tar(&mut member, &name, &input.members, tmp.path(), &bad)
        }
        _ => read_tar(
            &mut hashing,
            "the archive",
            &input.members,
            tmp.path(),
            &bad,
        ),
    })();
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(Error::io(path, "reading cached input"))?;
    let (got, _) = hashing.finish();
    if got != *sha {
        return Err(Error::check(format!(
            "input {}: the cached file {} has sha256 {got}, the lock says {sha}: the cache was modified; delete the file and run `infrakit fetch` again",
            input.name,
            path.display()
        )));
    }
    let found = outcome?;
    if let Some((member, _)) = input.members.iter().find(|(m, _)| !found.contains_key(*m)) {
        return Err(bad(format!(
            "declared member {member} is not in it; check [input.members] against the archive (e.g. `tar -tf` or `dpkg-deb -c`)"
        )));
    }
    // One directory per input: two inputs may take different members of
    // one archive, and a build streams both sets.
    let dest = cache.extracted(sha).join(&input.name);
    let dest_parent = cache.extracted(sha);
    std::fs::create_dir_all(&dest_parent)
        .map_err(Error::io(&dest_parent, "creating the cache directory"))?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(Error::io(&dest, "replacing an extraction"))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &dest).map_err(Error::io(&dest, "moving an extraction into place"))?;
    let mut taken: Vec<Taken> = input
        .members
        .iter()
        .map(|(member, Target { path, mode })| Taken {
            image_path: path.clone(),
            mode: *mode,
            source: dest.join(member.as_str()),
            input: input.name.clone(),
            sha256: found[member],
        })
        .collect();
    taken.sort_by(|a, b| a.image_path.cmp(&b.image_path));
    Ok(taken)
}

/// A decompressing reader for `r`, chosen by its magic bytes.
fn decompress<'r>(r: impl Read + 'r, what: &str) -> Result<Box<dyn Read + 'r>, String> {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let head = r
        .fill_buf()
        .map_err(|e| format!("reading {what}: {e}"))?
        .to_vec();
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Ok(Box::new(liblzma::read::XzDecoder::new_multi_decoder(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::with_buffer(r)
            .map_err(|e| format!("reading {what}: {e}"))?;
        Ok(Box::new(d))
    } else {
        Err(format!(
            "{what} is not gzip, xz or zstd compressed (by its first bytes); only .tar.gz, .tar.xz and .tar.zst are taken"
        ))
    }
}

/// Reads the tar in `r` (compressed), extracting the declared members into
/// `dir`; returns which were found.
fn read_tar(
    r: impl Read,
    what: &str,
    members: &BTreeMap<RelPath, Target>,
    dir: &Path,
    bad: &dyn Fn(String) -> Error,
) -> Result<BTreeMap<RelPath, Sha256>> {
    let decoded = decompress(r, what).map_err(bad)?;
    let mut archive = tar::Archive::new(decoded);
    let mut found = BTreeMap::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("reading {what}: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading {what}: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let Some(member) = std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| RelPath::new(s).ok())
            .filter(|m| members.contains_key(m))
        else {
            continue;
        };
        if found.contains_key(&member) {
            return Err(bad(format!(
                "member {member} appears twice in {what}; refusing to choose"
            )));
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            let is = if kind.is_symlink() || kind.is_hard_link() {
                "a link"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Err(bad(format!(
                "member {member} is {is} where a file is declared; declare the file it points to"
            )));
        }
        let dest = dir.join(member.as_str());
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(Error::io(parent, "creating an extraction directory"))?;
        }
        let out = File::create_new(&dest).map_err(Error::io(&dest, "extracting a member"))?;
        let mut out = crate::trust::digest::HashingWriter::new(out);
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| bad(format!("reading {member} from {what}: {e}")))?;
        let (out, sha, _) = out.finish();
        out.sync_all()
            .map_err(Error::io(&dest, "extracting a member"))?;
        found.insert(member, sha);
    }
    Ok(found)
}

/// Reads a Debian package's `ar` archive up to its `data.tar.*` member;
/// returns that member's name and size, `r` positioned at its content.
fn deb_data_member(r: &mut impl Read) -> Result<(String, u64), String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| "not a Debian package: too short".to_owned())?;
    if &magic != b"!<arch>\n" {
        return Err("not a Debian package: no ar archive header".into());
    }
    let mut first = true;
    loop {
        let mut header = [0u8; 60];
        r.read_exact(&mut header)
            .map_err(|_| "not a Debian package: it has no data.tar member".to_owned())?;
        if &header[58..60] != b"`\n" {
            return Err("not a Debian package: a malformed ar member header".into());
        }
        let name = String::from_utf8_lossy(&header[..16])
            .trim_end()
            .trim_end_matches('/')
            .to_owned();
        let size: u64 = std::str::from_utf8(&header[48..58])
            .ok()
            .and_then(|s| s.trim_end().parse().ok())
            .ok_or_else(|| format!("not a Debian package: member {name:?} has a bad size"))?;
        if first {
            first = false;
            let mut version = Vec::new();
            r.take(size)
                .read_to_end(&mut version)
                .map_err(|e| format!("reading debian-binary: {e}"))?;
            if name != "debian-binary" || !version.starts_with(b"2.") {
                return Err(
                    "not a Debian package: its first member is not debian-binary 2.x".into(),
                );
            }
        } else if name.starts_with("data.tar") {
            return Ok((name, size));
        } else {
            std::io::copy(&mut r.take(size), &mut std::io::sink())
                .map_err(|e| format!("reading {name}: {e}"))?;
        }
        if size % 2 == 1 {
            let mut pad = [0u8; 1];
            r.read_exact(&mut pad)
                .map_err(|_| "not a Debian package: truncated".to_owned())?;
        }
    }
}
