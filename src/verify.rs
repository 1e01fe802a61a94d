//! `authenticate`: the only way to obtain a `Verified` artifact. Order
//! matters: the signature is checked first (by a trusted key), then the
//! trusted comment against the manifest's digest, then the artifact's digest.
//! Only then is the archive decompressed (`Verified::stream`), and every
//! member is compared with the manifest as it streams past, before a sink
//! (`verify` discards, `apply` extracts) sees it. Nothing is trusted before
//! the check that covers it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::archive;
use crate::digest::{HashingReader, ReadAhead, Sha256};
use crate::error::{Error, Result};
use crate::manifest::{Binding, EntryType, Manifest, ManifestEntry};
use crate::sign::{Prehasher, PublicKey, Signature};

/// Manifests larger than this are refused before parsing (and downloading).
pub const MANIFEST_MAX: u64 = 256 << 20;

pub struct VerifyOptions<'a> {
    pub artifact: &'a Path,
    pub manifest: Option<&'a Path>,
    pub signature: Option<&'a Path>,
    pub keys: &'a [PublicKey],
}

/// An artifact whose signature, trusted comment, manifest and artifact
/// digests were checked; its members are checked by `stream`. Only
/// `authenticate` constructs one. It holds the artifact open, so `stream`
/// reads the file that was authenticated even if the path is replaced.
#[derive(Debug)]
pub struct Verified {
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature_bytes: Vec<u8>,
    key_id: String,
    artifact: PathBuf,
    file: File,
}

/// Receives each member after its header matched the manifest entry, and
/// after its parent was streamed as a directory (no member lies under a
/// symlink or file). For a file, `content` yields its bytes; their digest is
/// checked once the sink returns, so a sink that writes them must treat its
/// output as unverified until `stream` succeeds.
pub type Sink<'a> = dyn FnMut(&ManifestEntry, &mut dyn Read) -> Result<()> + 'a;

impl Verified {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest exactly as signed.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The `.minisig` file as read.
    pub fn signature_bytes(&self) -> &[u8] {
        &self.signature_bytes
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn artifact(&self) -> &Path {
        &self.artifact
    }

    /// Streams the archive, checks every member against the manifest in
    /// order (nothing missing, extra or duplicated; same type, mode, owner,
    /// size, digest and link target; no other member types), hands each to
    /// `sink`, and finally checks the tar stream's digest and size.
    pub fn stream(&self, sink: &mut Sink<'_>) -> Result<()> {
        let mut file = self
            .file
            .try_clone()
            .map_err(Error::io(&self.artifact, "reopening artifact"))?;
        std::io::Seek::rewind(&mut file)
            .map_err(Error::io(&self.artifact, "rewinding artifact"))?;
        // Decompression and the tar stream's digest run on their own thread.
        let mut stream = ReadAhead::spawn(archive::decode(file, &self.artifact)?);
        check_entries(&self.artifact, &mut stream, &self.manifest, sink)?;
        let (tar_sha, tar_size) = stream.finish().map_err(|e| {
            Error::check(format!(
                "{}: archive unreadable: {e}",
                self.artifact.display()
            ))
        })?;
        let m = &self.manifest.archive;
        if (tar_sha, tar_size) != (m.tar_sha256, m.tar_size) {
            return Err(Error::check(format!(
                "{}: tar stream is {tar_size} bytes with sha256 {tar_sha}, the manifest says {} bytes with {}",
                self.artifact.display(),
                m.tar_size,
                m.tar_sha256
            )));
        }
        Ok(())
    }
}

/// `<dir>/<stem>.manifest.json` beside `artifact` (`<stem>.tar.zst` or `.tar.gz`).
pub fn manifest_beside(artifact: &Path) -> PathBuf {
    let name = artifact
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".tar.zst")
        .or_else(|| name.strip_suffix(".tar.gz"))
        .unwrap_or(name);
    artifact.with_file_name(crate::manifest::file_name(stem))
}

/// `<artifact>.minisig`.
pub fn signature_beside(artifact: &Path) -> PathBuf {
    let mut s = artifact.as_os_str().to_owned();
    s.push(".minisig");
    PathBuf::from(s)
}

/// Verifies an artifact and every member; `progress(done, total)` is told
/// of bytes hashed.
pub fn verify(opts: &VerifyOptions<'_>, progress: &dyn Fn(u64, u64)) -> Result<Verified> {
    let verified = authenticate(opts, progress)?;
    // `stream` reads and checks each member's content after the sink.
    verified.stream(&mut |_, _| Ok(()))?;
    Ok(verified)
}

/// Checks the signature, trusted comment and both digests of an artifact,
/// reading it once; the members are left for `Verified::stream`.
pub fn authenticate(opts: &VerifyOptions<'_>, progress: &dyn Fn(u64, u64)) -> Result<Verified> {
    if opts.keys.is_empty() {
        return Err(Error::usage(
            "--key",
            "give at least one trusted public key",
        ));
    }
    let artifact = opts.artifact;
    let manifest_path = opts
        .manifest
        .map_or_else(|| manifest_beside(artifact), Path::to_path_buf);
    let sig_path = opts
        .signature
        .map_or_else(|| signature_beside(artifact), Path::to_path_buf);

    // The artifact is opened first: a missing artifact is an I/O error, not
    // a missing signature.
    let artifact_file = File::open(artifact).map_err(Error::io(artifact, "opening artifact"))?;
    let sig_bytes = match std::fs::read(&sig_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::check(format!(
                "{}: no signature found; unsigned artifacts are refused: get the .minisig published with the artifact",
                sig_path.display()
            )));
        }
        Err(e) => return Err(Error::io(&sig_path, "reading signature")(e)),
    };
    let signature = Signature::parse(&sig_bytes)
        .map_err(|m| Error::check(format!("{}: {m}", sig_path.display())))?;
    let manifest_bytes = read_limited(&manifest_path, MANIFEST_MAX)?;

    let (prehash, sha256, size) = hash_file(&artifact_file, artifact, progress)?;
    let key = signature
        .verify(opts.keys, &prehash)
        .map_err(|m| Error::check(format!("{}: {m}", artifact.display())))?;

    let claimed = Binding::parse(signature.trusted_comment())
        .map_err(|m| Error::check(format!("{}: trusted comment: {m}", sig_path.display())))?;
    let manifest_sha = Sha256::of(&manifest_bytes);
    if claimed.manifest_sha256 != manifest_sha {
        return Err(Error::check(format!(
            "{}: manifest digest {manifest_sha} is not the signed one {}",
            manifest_path.display(),
            claimed.manifest_sha256
        )));
    }
    let manifest = Manifest::parse(&manifest_bytes).map_err(|m| {
        Error::check(format!(
            "{}: signed manifest is malformed: {m}",
            manifest_path.display()
        ))
    })?;
    if (&claimed.name, &claimed.version) != (&manifest.name, &manifest.version) {
        return Err(Error::check(format!(
            "{}: signed name/version ({} {}) differ from the manifest's ({} {})",
            sig_path.display(),
            claimed.name,
            claimed.version,
            manifest.name,
            manifest.version
        )));
    }
    // The name is part of what was signed: a renamed artifact is refused
    // here, for `verify` and `apply` alike.
    let file_name = artifact.file_name().and_then(|n| n.to_str());
    if file_name != Some(manifest.artifact_file_name().as_str()) {
        return Err(Error::check(format!(
            "{}: the signed artifact is named {}: this file was renamed; use it under its signed name",
            artifact.display(),
            manifest.artifact_file_name()
        )));
    }
    if (sha256, size) != (manifest.archive.sha256, manifest.archive.size) {
        return Err(Error::check(format!(
            "{}: artifact is {size} bytes with sha256 {sha256}, the manifest says {} bytes with {}",
            artifact.display(),
            manifest.archive.size,
            manifest.archive.sha256
        )));
    }
    Ok(Verified {
        manifest,
        manifest_bytes,
        signature_bytes: sig_bytes,
        key_id: key.key_id(),
        artifact: artifact.to_path_buf(),
        file: artifact_file,
    })
}

/// Reads the manifest file at `path` (at most `MANIFEST_MAX` bytes); a
/// missing one fails the check, as in `authenticate`.
pub fn read_manifest(path: &Path) -> Result<Vec<u8>> {
    read_limited(path, MANIFEST_MAX)
}

/// Reads a manifest of at most `max` bytes. A missing one fails the check
/// (exit 1), as a missing signature does: the release is incomplete.
fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::check(format!(
                "{}: no manifest found (was the artifact renamed? keep NAME.tar.zst, its .minisig \
                 and NAME.manifest.json together under their signed names)",
                path.display()
            )));
        }
        Err(e) => return Err(Error::io(path, "opening manifest")(e)),
    };
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io(path, "reading manifest"))?;
    if bytes.len() as u64 > max {
        return Err(Error::check(format!(
            "{}: manifest is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// BLAKE2b-512 prehash, SHA-256 and size of a file: two threads, each
/// reading the same open file with positioned reads (`read_at`), so the two
/// digests cost the time of one.
fn hash_file(
    file: &File,
    path: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<([u8; 64], Sha256, u64)> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let read_all = |each: &mut dyn FnMut(&[u8], u64)| -> std::io::Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let n = match file.read_at(&mut buf, offset) {
                Ok(0) => return Ok(offset),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            offset += n as u64;
            each(&buf[..n], offset);
        }
    };
    let (prehash, sha) = std::thread::scope(|scope| {
        let sha = scope.spawn(|| {
            let mut hasher = crate::digest::HashingWriter::new(std::io::sink());
            read_all(&mut |bytes, _| {
                let _ = std::io::Write::write_all(&mut hasher, bytes); // a sink never fails
            })
            .map(|n| (hasher.finish().1, n))
        });
        let mut prehash = Prehasher::default();
        let read = read_all(&mut |bytes, done| {
            prehash.update(bytes);
            progress(done, total);
        });
        let sha = sha
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the hashing thread panicked")));
        (read.map(|n| (prehash.finish(), n)), sha)
    });
    let (prehash, n1) = prehash.map_err(Error::io(path, "reading artifact"))?;
    let (sha256, n2) = sha.map_err(Error::io(path, "reading artifact"))?;
    if n1 != n2 {
        return Err(Error::check(format!(
            "{}: the artifact changed while it was read",
            path.display()
        )));
    }
    Ok((prehash, sha256, n1))
}

/// Streams the archive and compares every member with the manifest, in order.
fn check_entries(
    artifact: &Path,
    tar_stream: &mut dyn Read,
    manifest: &Manifest,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let fail = |m: String| Error::check(format!("{}: {m}", artifact.display()));
    let mut expected = manifest.entries.iter();
    let mut dirs: std::collections::HashSet<&crate::model::RelPath> = Default::default();
    {
        let mut tar = tar::Archive::new(&mut *tar_stream);
        let entries = tar
            .entries()
            .map_err(|e| fail(format!("archive unreadable: {e}")))?;
        for item in entries {
            let mut entry = item.map_err(|e| fail(format!("archive corrupt: {e}")))?;
            let path_bytes = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&path_bytes).into_owned();
            let Some(want) = expected.next() else {
                return Err(fail(format!("{name}: extra member not in the manifest")));
            };
            check_header(&entry, &name, want, manifest.source_date_epoch)
                .map_err(|m| fail(format!("{name}: {m}")))?;
            if let Some(parent) = want.path.parent()
                && !dirs.contains(&parent)
            {
                return Err(fail(format!(
                    "{name}: lies under {parent}, which is not a directory of this release"
                )));
            }
            if want.kind == EntryType::Dir {
                dirs.insert(&want.path);
            }
            let mut content = HashingReader::new(&mut entry);
            sink(want, &mut content)?;
            std::io::copy(&mut content, &mut std::io::sink())
                .map_err(|e| fail(format!("{name}: reading content: {e}")))?;
            let (digest, n) = content.finish();
            if want.kind == EntryType::File && Some(n) < want.size {
                return Err(fail(format!(
                    "{name}: content ends after {n} of {} bytes: the archive is truncated",
                    want.size.unwrap_or_default()
                )));
            }
            if want.kind == EntryType::File && (Some(n) != want.size || Some(digest) != want.sha256)
            {
                return Err(fail(format!(
                    "{name}: content is {n} bytes with sha256 {digest}, the manifest says {:?} bytes with {:?}",
                    want.size,
                    want.sha256.map(|d| d.to_string())
                )));
            }
        }
    }
    if let Some(missing) = expected.next() {
        return Err(fail(format!(
            "{}: in the manifest but missing from the archive",
            missing.path
        )));
    }
    // After the end-of-archive blocks only zero padding may follow.
    let mut rest = [0u8; 8192];
    loop {
        let n = tar_stream
            .read(&mut rest)
            .map_err(|e| fail(format!("archive corrupt after its end: {e}")))?;
        if n == 0 {
            break;
        }
        if rest[..n].iter().any(|b| *b != 0) {
            return Err(fail("data after the end of the archive".to_owned()));
        }
    }
    Ok(())
}

/// Checks a member's header (type, name, mode, owner, mtime, size, link
/// target) against its manifest entry.
fn check_header<R: Read>(
    entry: &tar::Entry<'_, R>,
    name: &str,
    want: &ManifestEntry,
    mtime: u64,
) -> Result<(), String> {
    let header = entry.header();
    let (kind, want_name) = match header.entry_type() {
        tar::EntryType::Directory => (EntryType::Dir, format!("{}/", want.path)),
        tar::EntryType::Regular => (EntryType::File, want.path.to_string()),
        tar::EntryType::Symlink => (EntryType::Symlink, want.path.to_string()),
        other => {
            return Err(format!(
                "member type {other:?} is never produced by infrakit"
            ));
        }
    };
    if name != want_name {
        return Err(format!(
            "expected {want_name} here (archive order follows the manifest)"
        ));
    }
    if kind != want.kind {
        return Err(format!("is a {kind:?}, the manifest says {:?}", want.kind));
    }
    let num = |r: std::io::Result<u64>, what: &str| r.map_err(|e| format!("bad {what} field: {e}"));
    let mode = num(header.mode().map(u64::from), "mode")?;
    let uid = num(header.uid(), "uid")?;
    let gid = num(header.gid(), "gid")?;
    let got_mtime = num(header.mtime(), "mtime")?;
    if (mode, uid, gid)
        != (
            u64::from(want.mode),
            u64::from(want.uid),
            u64::from(want.gid),
        )
    {
        return Err(format!(
            "mode/owner {mode:04o} {uid}:{gid}, the manifest says {:04o} {}:{}",
            want.mode, want.uid, want.gid
        ));
    }
    if got_mtime != mtime {
        return Err(format!(
            "mtime {got_mtime}, the manifest's source date is {mtime}"
        ));
    }
    let size = num(header.size(), "size")?;
    match want.kind {
        EntryType::File => {
            if Some(size) != want.size {
                return Err(format!("size {size}, the manifest says {:?}", want.size));
            }
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            if target.as_deref() != want.target.as_deref() {
                return Err(format!(
                    "links to {target:?}, the manifest says {:?}",
                    want.target
                ));
            }
        }
        EntryType::Dir => {
            if size != 0 {
                return Err("directory with a size".to_owned());
            }
        }
    }
    Ok(())
}
