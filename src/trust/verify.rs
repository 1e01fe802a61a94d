//! The one way to a `Verified` artifact, in two orders. `authenticate`
//! checks the file's signature (by a trusted key), then the trusted comment
//! against the manifest's digest, then the artifact's digest, before any
//! archive byte is read. `admit` checks the trusted comment's signature and
//! the manifest it binds, then lets the members be compared with that
//! manifest while the file's signature is checked beside them
//! (`Admitted::check_file`): `verify` and `apply`, whose staging directory
//! is private and kept only once the signature matched. Either way every
//! member is compared with the manifest as it streams past
//! (`Verified::stream`), before a sink (`verify` discards, `apply` extracts)
//! sees it: its header bytes must be exactly the ones `archive::header`
//! writes for the manifest's entry, so the archive reads the same in any tar
//! reader. Nothing is trusted before the check that covers it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::artifact::archive;
use crate::artifact::manifest::{Binding, EntryReader, EntryType, Manifest, ManifestEntry};
use crate::artifact::pieces::{At, Pieces, PiecesError};
use crate::error::{Error, Result};
use crate::model::RelPath;
use crate::trust::digest::{HashingReader, ReadAhead, Sha256, SideJob, Stretch};
use crate::trust::sign::{Prehasher, PublicKey, Signature};
use serde::Deserialize;
use std::borrow::Cow;

/// Manifests larger than this are refused before parsing (and downloading).
pub const MANIFEST_MAX: u64 = 256 << 20;

/// A tar block.
const BLOCK: usize = 512;

pub struct VerifyOptions<'a> {
    pub artifact: &'a Path,
    pub manifest: Option<&'a Path>,
    pub signature: Option<&'a Path>,
    pub keys: &'a [PublicKey],
}

/// An artifact whose trusted comment and manifest were checked, and whose
/// file signature was (`authenticate`, `verify`) or is being
/// (`Admitted::unconfirmed`); its members are checked by `stream`. Only this
/// module constructs one. It holds the artifact open, so `stream`
/// reads the file that was authenticated even if the path is replaced.
#[derive(Debug)]
pub struct Verified {
    /// Its entries too, unless it was verified by `verify_streamed`.
    manifest: Manifest,
    /// How many entries the manifest has.
    entries: u64,
    /// The manifest file that was checked, held open: its bytes are not
    /// kept (a large release's manifest is megabytes), they are copied
    /// from here and checked again when they are written out.
    manifest_file: File,
    manifest_path: PathBuf,
    manifest_sha256: Sha256,
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

    /// Writes the manifest exactly as signed to `to` (`dest` names it in
    /// errors), copied from the file that was checked; fails the check
    /// (exit 1) unless the bytes written have the signed digest.
    pub fn write_manifest(&self, to: &mut dyn Write, dest: &Path) -> Result<()> {
        let read_err = || Error::io(&self.manifest_path, "reading manifest");
        let mut file = &self.manifest_file;
        std::io::Seek::rewind(&mut file).map_err(read_err())?;
        let mut from = HashingReader::new(file.take(MANIFEST_MAX));
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err()(e)),
            };
            to.write_all(&buf[..n])
                .map_err(Error::io(dest, "writing the manifest"))?;
        }
        if from.finish().0 != self.manifest_sha256 {
            return Err(Error::check(format!(
                "{}: the manifest changed after it was checked; nothing was kept, try again",
                self.manifest_path.display()
            )));
        }
        Ok(())
    }

    /// The sha256 of the manifest, as the signature's trusted comment names it.
    pub fn manifest_sha256(&self) -> &Sha256 {
        &self.manifest_sha256
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
    /// order (its header bytes exactly the writer's for the entry, so
    /// nothing missing, extra or duplicated, same type, name, mode, owner,
    /// size and link target, no other record; its digest; nothing after the
    /// end), hands each to `sink`, and finally checks the tar stream's
    /// size.
    pub fn stream(&self, sink: &mut Sink<'_>) -> Result<()> {
        self.stream_with(sink, None)
    }

    /// `stream`, the hashing thread doing `side` in its gaps.
    fn stream_with(&self, sink: &mut Sink<'_>, side: Option<SideJob>) -> Result<()> {
        let mut file = self
            .file
            .try_clone()
            .map_err(Error::io(&self.artifact, "reopening artifact"))?;
        std::io::Seek::rewind(&mut file)
            .map_err(Error::io(&self.artifact, "rewinding artifact"))?;
        // Entries held (parsed in `bind`) are used as they are. Otherwise
        // they are read from the manifest file again as they are needed:
        // twice, here and on the hashing thread, each its own way through
        // the file that was checked; this one hashes it again, so that a
        // manifest changed since fails.
        let mtime = self.manifest.source_date_epoch;
        let held = self.manifest.entries.len() as u64 == self.entries;
        let layout: Box<dyn Iterator<Item = Stretch> + Send> = if held {
            let members = self.manifest.entries.iter();
            // One stretch per file, allocated once at its size.
            let files = members.clone().filter(|e| e.kind == EntryType::File);
            let mut stretches = Vec::with_capacity(files.count());
            stretches.extend(Layout::of(
                members.map(|e| placed(e.path.as_str(), member(e).body)),
            ));
            Box::new(stretches.into_iter())
        } else {
            let mut pieces = Pieces::new(self.reread()?, MANIFEST_MAX, false);
            Box::new(Layout::of(std::iter::from_fn(move || {
                let bytes = pieces.next_entry().ok()??;
                let e: Shape<'_> = serde_json::from_slice(bytes).ok()?;
                let body = match (e.kind, e.size, &e.target) {
                    (EntryType::Dir, None, None) => archive::Body::Dir,
                    (EntryType::File, Some(size), None) => archive::Body::File(size),
                    (EntryType::Symlink, None, Some(target)) => archive::Body::Symlink(target),
                    _ => return None,
                };
                Some(placed(&e.path, body))
            })))
        };
        // Decompression runs on its own thread. The tar stream's SHA-256 is
        // not recomputed: `check_entries` has compared every byte of the
        // stream with what the signed manifest determines (each header
        // exactly, each content by its digest, zero padding, the two end
        // blocks and nothing after), so its digest would add no check.
        // The members' SHA-256 on a thread of its own, beside both.
        let (mut stream, digests) = ReadAhead::spawn_hashing(
            archive::decode(file, &self.artifact)?,
            Box::new(layout),
            side,
        );
        let members = Members {
            stream: &mut stream,
            digests: &digests,
        };
        if held {
            let entries = self.manifest.entries.iter().map(|e| Ok(Cow::Borrowed(e)));
            check_entries(&self.artifact, members, mtime, entries, sink)?;
        } else {
            let entries = self.signed_entries(self.manifest_sha256)?;
            check_entries(
                &self.artifact,
                members,
                mtime,
                entries.map(|e| e.map(Cow::Owned)),
                sink,
            )?;
        }
        let tar_size = stream.finish().map_err(|e| {
            Error::check(format!(
                "{}: archive unreadable: {e}",
                self.artifact.display()
            ))
        })?;
        let m = &self.manifest.archive;
        if tar_size != m.tar_size {
            return Err(Error::check(format!(
                "{}: tar stream is {tar_size} bytes, the manifest says {}",
                self.artifact.display(),
                m.tar_size
            )));
        }
        Ok(())
    }

    /// The manifest's entries: those held, or read again from the file
    /// that was checked, hashed as they are read (they end in an error if
    /// it changed since).
    #[allow(clippy::type_complexity)]
    pub fn entries(&self) -> Result<Box<dyn Iterator<Item = Result<Cow<'_, ManifestEntry>>> + '_>> {
        if self.manifest.entries.len() as u64 == self.entries {
            return Ok(Box::new(
                self.manifest.entries.iter().map(|e| Ok(Cow::Borrowed(e))),
            ));
        }
        let entries = self.signed_entries(self.manifest_sha256)?;
        Ok(Box::new(entries.map(|e| e.map(Cow::Owned))))
    }

    /// The manifest's entries, read again from the file that was checked,
    /// and hashed: they end in an error unless `want` is its digest.
    fn signed_entries(
        &self,
        want: Sha256,
    ) -> Result<impl Iterator<Item = Result<ManifestEntry>> + '_> {
        let reader = EntryReader::new(self.reread()?, MANIFEST_MAX, true);
        let path = &self.manifest_path;
        Ok(reader.rechecked(want, move |e| match e {
            Some(e) => manifest_error(path, e),
            None => changed(path),
        }))
    }

    /// The manifest file that was checked, from its start, read its own
    /// way.
    fn reread(&self) -> Result<At> {
        let file = self
            .manifest_file
            .try_clone()
            .map_err(Error::io(&self.manifest_path, "reopening manifest"))?;
        Ok(At::start(file))
    }
}

/// A manifest's error as reading it again found it: the file was checked
/// whole before, so it changed since.
fn manifest_error(path: &Path, e: PiecesError) -> Error {
    match e {
        PiecesError::Io(e) => Error::io(path, "reading manifest")(e),
        PiecesError::TooLarge(_) => changed(path),
        PiecesError::Malformed(m) => Error::check(format!(
            "{}: signed manifest is malformed: {m}",
            path.display()
        )),
    }
}

fn changed(path: &Path) -> Error {
    Error::check(format!(
        "{}: the manifest changed after it was checked; nothing was kept, try again",
        path.display()
    ))
}

/// Where the regular files' contents lie in the tar stream the manifest
/// determines: after each one's header (and whatever came between), up to
/// its size. Made from each member's header length and, for a regular
/// file, its size (`placed`); read from the manifest file, it ends early if
/// the manifest cannot be read: then the checking thread, reading the same
/// bytes, reports why.
struct Layout<I> {
    members: I,
    skip: u64,
}

impl<I: Iterator<Item = (u64, Option<u64>)>> Layout<I> {
    fn of(members: I) -> Layout<I> {
        Layout { members, skip: 0 }
    }
}

impl<I: Iterator<Item = (u64, Option<u64>)>> Iterator for Layout<I> {
    type Item = Stretch;

    fn next(&mut self) -> Option<Stretch> {
        loop {
            let (header, size) = self.members.next()?;
            self.skip += header;
            if let Some(len) = size {
                let skip = std::mem::replace(&mut self.skip, archive::padding(len) as u64);
                return Some(Stretch { skip, len });
            }
        }
    }
}

/// A member's header length and, for a regular file, its size.
fn placed(path: &str, body: archive::Body<'_>) -> (u64, Option<u64>) {
    let size = match body {
        archive::Body::File(size) => Some(size),
        archive::Body::Dir | archive::Body::Symlink(_) => None,
    };
    (archive::header_len(path, body), size)
}

/// What places an entry's content in the tar stream, parsed from the
/// manifest file; the rest of the entry is skipped here (the checking
/// thread parses and checks all of it).
#[derive(Deserialize)]
struct Shape<'a> {
    #[serde(borrow)]
    path: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: EntryType,
    size: Option<u64>,
    #[serde(borrow)]
    target: Option<Cow<'a, str>>,
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
    artifact.with_file_name(crate::artifact::manifest::file_name(stem))
}

/// `<artifact>.minisig`.
pub fn signature_beside(artifact: &Path) -> PathBuf {
    let mut s = artifact.as_os_str().to_owned();
    s.push(".minisig");
    PathBuf::from(s)
}

/// Verifies an artifact and every member; `progress(done, total)` is told
/// of bytes hashed for the signature. Nothing is written, so once the
/// trusted comment's signature vouches for the manifest, the members are
/// checked against it while the signature's prehash of the file is computed
/// beside them; the result stands only if the file's signature then
/// matches, and a signature that does not is the error reported, whatever
/// the members showed. The artifact's SHA-256 is not computed: the
/// signature covers its every byte.
///
/// The prehash is a side job of the thread that hashes the members
/// (`ReadAhead::spawn_hashing`): it reads and hashes the next chunk of the
/// file whenever that thread waits for the decompressor, and finishes once
/// the members are hashed. Two busy threads on two cores, the
/// decompressing one and the hashing one, instead of three that took turns
/// on the cores while the decompressor, the one the others wait for, lost
/// its turn.
pub fn verify(opts: &VerifyOptions<'_>, progress: &dyn Fn(u64, u64)) -> Result<Verified> {
    verify_with(opts, progress, Load::Entries)
}

/// `verify`, without holding the manifest's entries: each is read from the
/// manifest file as the member it describes comes, so memory does not grow
/// with the release. For `infrakit verify`, which reports and keeps nothing.
pub fn verify_streamed(opts: &VerifyOptions<'_>, progress: &dyn Fn(u64, u64)) -> Result<Checked> {
    let v = verify_with(opts, progress, Load::Head)?;
    Ok(Checked {
        manifest: v.manifest,
        entries: v.entries,
        key_id: v.key_id,
    })
}

/// What `verify_streamed` found: the manifest without its entries, their
/// number, and the key that signed them.
#[derive(Debug)]
pub struct Checked {
    pub manifest: Manifest,
    pub entries: u64,
    pub key_id: String,
}

/// Whether to parse and keep the manifest's entries or only its head.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Entries,
    Head,
}

fn verify_with(
    opts: &VerifyOptions<'_>,
    progress: &dyn Fn(u64, u64),
    load: Load,
) -> Result<Verified> {
    let admitted = admit_with(opts, load)?;
    let v = &admitted.verified;
    let mut hash = FilePrehash::new(&v.file, &v.artifact)?;
    let hashed = Arc::new(AtomicU64::new(0));
    let (tx, result) = std::sync::mpsc::channel();
    let job: SideJob = {
        let hashed = Arc::clone(&hashed);
        Box::new(move || match hash.step() {
            Ok(None) => {
                hashed.store(hash.offset, Ordering::Relaxed);
                true
            }
            Ok(Some(done)) => {
                let _ = tx.send(Ok(done));
                false
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                false
            }
        })
    };
    let total = v.manifest.archive.size;
    let streamed = v.stream_with(
        &mut |_, _| {
            progress(hashed.load(Ordering::Relaxed), total);
            Ok(())
        },
        Some(job),
    );
    // The hashing thread finishes the job whatever became of the stream;
    // a stream that failed before it started the thread dropped the job.
    let prehash = match result.recv() {
        Ok(hashed) => hashed.map_err(Error::io(&v.artifact, "reading artifact"))?,
        Err(_) => prehash_file(&v.file, &v.artifact, progress)?,
    };
    progress(prehash.1, total);
    let signed = admitted.check_prehash(prehash)?;
    streamed?;
    Ok(admitted.confirmed(signed))
}

/// An artifact whose trusted comment's signature (by a trusted key) vouches
/// for its manifest, bound, parsed and checked against the signed names, and
/// whose size is the manifest's. The file's own signature is still to be
/// checked (`check_file`): its members may be compared with the manifest
/// before (`verify`, and `apply` into its private staging directory), but
/// nothing may be trusted, reported or made visible before it passed.
pub struct Admitted {
    verified: Verified,
    signature: Signature,
    key: PublicKey,
}

/// The trusted comment's signature first: the manifest it binds is
/// authentic before it is parsed, and the members are compared with it.
pub fn admit(opts: &VerifyOptions<'_>) -> Result<Admitted> {
    admit_with(opts, Load::Head)
}

fn admit_with(opts: &VerifyOptions<'_>, load: Load) -> Result<Admitted> {
    let opened = open(opts)?;
    let key = opened
        .signature
        .verify_comment(opts.keys)
        .map_err(|m| Error::check(format!("{}: {m}", opened.sig_path.display())))?
        .clone();
    let verified = bind(opts.artifact, &opened, key.key_id(), load)?;
    let size = opened
        .file
        .metadata()
        .map_err(Error::io(opts.artifact, "reading artifact"))?
        .len();
    if size != verified.manifest.archive.size {
        return Err(Error::check(format!(
            "{}: artifact is {size} bytes, the manifest says {}",
            opts.artifact.display(),
            verified.manifest.archive.size
        )));
    }
    Ok(Admitted {
        verified,
        signature: opened.signature,
        key,
    })
}

impl Admitted {
    /// The artifact, its file signature not yet checked.
    pub fn unconfirmed(&self) -> &Verified {
        &self.verified
    }

    /// Checks the file's signature: the BLAKE2b prehash of every byte, read
    /// from the descriptor that was opened, by the key that signed the
    /// trusted comment. `progress(done, total)` is told of bytes hashed.
    pub fn check_file(&self, progress: &dyn Fn(u64, u64)) -> Result<Signed> {
        let v = &self.verified;
        self.check_prehash(prehash_file(&v.file, &v.artifact, progress)?)
    }

    /// The file's signature, given the prehash and size of the file.
    fn check_prehash(&self, (prehash, n): ([u8; 64], u64)) -> Result<Signed> {
        let v = &self.verified;
        if n != v.manifest.archive.size {
            return Err(Error::check(format!(
                "{}: the artifact changed while it was read",
                v.artifact.display()
            )));
        }
        self.signature
            .verify(std::slice::from_ref(&self.key), &prehash)
            .map(|_| Signed(()))
            .map_err(|m| Error::check(format!("{}: {m}", v.artifact.display())))
    }

    /// The `Verified` artifact, given the proof that `check_file` passed.
    pub fn confirmed(self, _: Signed) -> Verified {
        self.verified
    }
}

/// Proof that an `Admitted` artifact's file signature matched.
#[derive(Debug)]
pub struct Signed(());

/// The `.minisig` at `sig_path`, read and parsed; a missing one fails the
/// check (exit 1): unsigned `what`s (artifacts, images) are refused.
pub(crate) fn read_signature(sig_path: &Path, what: &str) -> Result<(Vec<u8>, Signature)> {
    let bytes = match std::fs::read(sig_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::check(format!(
                "{}: no signature found; unsigned {what}s are refused: get the .minisig published with the {what}",
                sig_path.display()
            )));
        }
        Err(e) => return Err(Error::io(sig_path, "reading signature")(e)),
    };
    let signature = Signature::parse(&bytes)
        .map_err(|m| Error::check(format!("{}: {m}", sig_path.display())))?;
    Ok((bytes, signature))
}

/// An artifact opened with its signature and manifest read, nothing checked.
struct Opened {
    file: File,
    sig_bytes: Vec<u8>,
    signature: Signature,
    sig_path: PathBuf,
    manifest_path: PathBuf,
    manifest_file: File,
    /// The manifest file's SHA-256, hashed as it was opened (not parsed).
    manifest_sha256: Sha256,
    /// Its head (`Manifest::parse_head`) and how many entries it holds, or
    /// why it could not be split.
    manifest_head: std::result::Result<(Vec<u8>, u64), String>,
}

fn open(opts: &VerifyOptions<'_>) -> Result<Opened> {
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
    let file = File::open(artifact).map_err(Error::io(artifact, "opening artifact"))?;
    let (sig_bytes, signature) = read_signature(&sig_path, "artifact")?;
    let manifest_file = open_manifest(&manifest_path)?;
    // Hashed and split (not parsed): the head is parsed once the digest
    // is the signed one; a manifest that cannot be split is reported then.
    let mut reader = EntryReader::new(
        At::start(
            manifest_file
                .try_clone()
                .map_err(Error::io(&manifest_path, "reopening manifest"))?,
        ),
        MANIFEST_MAX,
        true,
    );
    let split = reader.read_all(None).map_err(|e| match e {
        PiecesError::TooLarge(max) => too_large(&manifest_path, max),
        PiecesError::Io(e) => Error::io(&manifest_path, "reading manifest")(e),
        PiecesError::Malformed(m) => Error::check(m),
    })?;
    let read = reader.finish();
    let manifest_sha256 = read.sha256.ok_or_else(|| changed(&manifest_path))?;
    let manifest_head = split.map(|()| (read.head, read.entries));
    Ok(Opened {
        file,
        sig_bytes,
        signature,
        sig_path,
        manifest_path,
        manifest_file,
        manifest_sha256,
        manifest_head,
    })
}

/// The manifest the trusted comment binds, its name and version the
/// signed ones, the artifact under its signed name. The manifest is parsed
/// only once its digest is the signed one, a piece at a time from the file
/// that was hashed (hashed again as it is read: a file changed since
/// fails); with `Load::Head`, its entries are checked later, as the
/// members stream.
fn bind(artifact: &Path, opened: &Opened, key_id: String, load: Load) -> Result<Verified> {
    let Opened {
        sig_path,
        manifest_path,
        manifest_sha256,
        ..
    } = opened;
    let (claimed, manifest_sha) =
        binding(&opened.signature, sig_path, manifest_path, manifest_sha256)?;
    let malformed = |m: String| {
        Error::check(format!(
            "{}: signed manifest is malformed: {m}",
            manifest_path.display()
        ))
    };
    let (head, count) = opened
        .manifest_head
        .as_ref()
        .map_err(|m| malformed(m.clone()))?;
    let mut manifest = Manifest::parse_head(head).map_err(malformed)?;
    let manifest_file = opened
        .manifest_file
        .try_clone()
        .map_err(Error::io(manifest_path, "reopening manifest"))?;
    if load == Load::Entries {
        // Read again to parse the entries, and hashed again: the bytes
        // parsed must be the ones checked.
        let mut reader = EntryReader::new(
            At::start(
                manifest_file
                    .try_clone()
                    .map_err(Error::io(manifest_path, "reopening manifest"))?,
            ),
            MANIFEST_MAX,
            true,
        );
        // As many as the split counted (a hint: at most a million ahead).
        let mut entries = Vec::with_capacity(usize::try_from(*count).unwrap_or(0).min(1 << 20));
        let parsed = reader
            .read_all(Some(&mut entries))
            .map_err(|e| manifest_error(manifest_path, e))?;
        if reader.finish().sha256 != Some(manifest_sha) {
            return Err(changed(manifest_path));
        }
        parsed.map_err(|m| manifest_error(manifest_path, PiecesError::Malformed(m)))?;
        manifest.entries = entries;
    }
    same_release(&claimed, &manifest.name, &manifest.version, sig_path)?;
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
    Ok(Verified {
        manifest,
        entries: *count,
        manifest_file,
        manifest_path: manifest_path.clone(),
        manifest_sha256: manifest_sha,
        signature_bytes: opened.sig_bytes.clone(),
        key_id,
        artifact: artifact.to_path_buf(),
        file: opened
            .file
            .try_clone()
            .map_err(Error::io(artifact, "reopening artifact"))?,
    })
}

/// Checks the signature, trusted comment and both digests of an artifact,
/// reading it once, before anything else reads it: what `apply` needs
/// before it writes a byte. The members are left for `Verified::stream`.
pub fn authenticate(opts: &VerifyOptions<'_>, progress: &dyn Fn(u64, u64)) -> Result<Verified> {
    let opened = open(opts)?;
    let artifact = opts.artifact;
    let (prehash, sha256, size) = hash_file(&opened.file, artifact, progress)?;
    let key = opened
        .signature
        .verify(opts.keys, &prehash)
        .map_err(|m| Error::check(format!("{}: {m}", artifact.display())))?;
    let verified = bind(artifact, &opened, key.key_id(), Load::Entries)?;
    let archive = &verified.manifest.archive;
    if (sha256, size) != (archive.sha256, archive.size) {
        return Err(Error::check(format!(
            "{}: artifact is {size} bytes with sha256 {sha256}, the manifest says {} bytes with {}",
            artifact.display(),
            archive.size,
            archive.sha256
        )));
    }
    Ok(verified)
}

/// BLAKE2b-512 prehash and size of a file, read with positioned reads.
fn prehash_file(file: &File, path: &Path, progress: &dyn Fn(u64, u64)) -> Result<([u8; 64], u64)> {
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut hash = FilePrehash::new(file, path)?;
    loop {
        match hash.step() {
            Ok(None) => progress(hash.offset, total),
            Ok(Some(done)) => return Ok(done),
            Err(e) => return Err(Error::io(path, "reading artifact")(e)),
        }
    }
}

/// The BLAKE2b-512 prehash of a file, computed a chunk at a time with
/// positioned reads (the descriptor's offset is neither used nor moved).
struct FilePrehash {
    file: File,
    prehash: Prehasher,
    offset: u64,
    buf: Vec<u8>,
}

impl FilePrehash {
    fn new(file: &File, path: &Path) -> Result<FilePrehash> {
        let file = file
            .try_clone()
            .map_err(Error::io(path, "reopening artifact"))?;
        Ok(FilePrehash {
            file,
            prehash: Prehasher::default(),
            offset: 0,
            buf: vec![0u8; 256 * 1024],
        })
    }

    /// Hashes the next chunk; at the end, the prehash and the file's size.
    fn step(&mut self) -> std::io::Result<Option<([u8; 64], u64)>> {
        use std::os::unix::fs::FileExt;
        loop {
            match self.file.read_at(&mut self.buf, self.offset) {
                Ok(0) => {
                    let prehash = std::mem::take(&mut self.prehash).finish();
                    return Ok(Some((prehash, self.offset)));
                }
                Ok(n) => {
                    self.prehash.update(&self.buf[..n]);
                    self.offset += n as u64;
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads the manifest file at `path` (at most `MANIFEST_MAX` bytes); a
/// missing one fails the check (exit 1), as a missing signature does: the
/// release is incomplete.
pub fn read_manifest(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_manifest(path)?
        .take(MANIFEST_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io(path, "reading manifest"))?;
    if bytes.len() as u64 > MANIFEST_MAX {
        return Err(too_large(path, MANIFEST_MAX));
    }
    Ok(bytes)
}

/// Opens a manifest; a missing one fails the check.
fn open_manifest(path: &Path) -> Result<File> {
    match File::open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::check(format!(
            "{}: no manifest found (was the artifact renamed? keep NAME.tar.zst, its .minisig \
             and NAME.manifest.json together under their signed names)",
            path.display()
        ))),
        Err(e) => Err(Error::io(path, "opening manifest")(e)),
    }
}

fn too_large(path: &Path, max: u64) -> Error {
    Error::check(format!(
        "{}: manifest is larger than {max} bytes",
        path.display()
    ))
}

/// The trusted comment's binding, once the signature was checked: the
/// manifest's bytes must have the signed digest; returns the binding and
/// that digest.
pub(crate) fn binding(
    signature: &Signature,
    sig_path: &Path,
    manifest_path: &Path,
    manifest_sha: &Sha256,
) -> Result<(Binding, Sha256)> {
    let claimed = Binding::parse(signature.trusted_comment())
        .map_err(|m| Error::check(format!("{}: trusted comment: {m}", sig_path.display())))?;
    let manifest_sha = *manifest_sha;
    if claimed.manifest_sha256 != manifest_sha {
        return Err(Error::check(format!(
            "{}: manifest digest {manifest_sha} is not the signed one {}",
            manifest_path.display(),
            claimed.manifest_sha256
        )));
    }
    Ok((claimed, manifest_sha))
}

/// The signed name and version are the manifest's.
pub(crate) fn same_release(
    claimed: &Binding,
    name: &str,
    version: &str,
    sig_path: &Path,
) -> Result<()> {
    if (claimed.name.as_str(), claimed.version.as_str()) != (name, version) {
        return Err(Error::check(format!(
            "{}: signed name/version ({} {}) differ from the manifest's ({name} {version})",
            sig_path.display(),
            claimed.name,
            claimed.version,
        )));
    }
    Ok(())
}

/// BLAKE2b-512 prehash, SHA-256 and size of a file: two threads, each
/// reading the same open file with positioned reads (`read_at`), so the two
/// digests cost the time of one.
pub(crate) fn hash_file(
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
            let mut hasher = crate::trust::digest::HashingWriter::new(std::io::sink());
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

/// Streams the archive and compares it with the manifest, in order. The tar
/// stream is a function of the manifest, so each member's header block(s)
/// must be byte for byte the ones `archive::header` writes for its entry:
/// no PAX, sparse, ustar-prefix, hard-link or other record, no other number
/// encoding, names compared as bytes. Only regular files carry data, padded
/// with zeros; after the last member come the two zero blocks and nothing
/// else. Whatever another extractor could read differently is refused.
fn check_entries<'a>(
    artifact: &Path,
    members: Members<'_>,
    mtime: u64,
    entries: impl Iterator<Item = Result<Cow<'a, ManifestEntry>>>,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let tar_stream = members.stream;
    let fail = |m: String| Error::check(format!("{}: {m}", artifact.display()));
    let unreadable = |e: std::io::Error| fail(format!("archive unreadable: {e}"));
    // The directories the current entry may lie in, outermost first: the
    // entries come in component order, so a directory's members follow it
    // and a directory that does not hold the current entry holds none of
    // the later ones.
    let mut dirs: Vec<RelPath> = Vec::new();
    let mut expected = Vec::with_capacity(3 * BLOCK);
    let mut got = Vec::with_capacity(3 * BLOCK);
    for want in entries {
        let want = want?;
        let want = &*want;
        expected.clear();
        archive::header(&mut expected, &member(want), mtime);
        got.resize(expected.len(), 0);
        let n = read_full(tar_stream, &mut got).map_err(unreadable)?;
        // Short of an end-of-archive block, a stream that ends here is cut.
        if n < got.len() && (n < BLOCK || got[..BLOCK].iter().any(|b| *b != 0)) {
            return Err(fail(format!(
                "{}: the archive ends before this member's header does: the archive is truncated",
                want.path
            )));
        }
        if got[..n] != expected[..] {
            got.truncate(n);
            return Err(fail(explain(&got, tar_stream, &expected, want, mtime)));
        }
        while dirs.last().is_some_and(|d| !want.path.is_under(d)) {
            dirs.pop();
        }
        if let Some(parent) = want.path.parent()
            && dirs.last() != Some(&parent)
        {
            return Err(fail(format!(
                "{}: lies under {parent}, which is not a directory of this release",
                want.path
            )));
        }
        let size = match want.kind {
            EntryType::Dir => {
                dirs.push(want.path.clone());
                None
            }
            EntryType::Symlink => None,
            EntryType::File => want.size,
        };
        let Some(size) = size else {
            sink(want, &mut std::io::empty())?;
            continue;
        };
        let mut content = (&mut *tar_stream).take(size);
        sink(want, &mut content)?;
        std::io::copy(&mut content, &mut std::io::sink())
            .map_err(|e| fail(format!("{}: reading content: {e}", want.path)))?;
        let n = size - content.limit();
        if n < size {
            return Err(fail(format!(
                "{}: content ends after {n} of {size} bytes: the archive is truncated",
                want.path
            )));
        }
        let digest = members.digests.recv().map_err(|_| {
            fail(format!(
                "{}: the hashing thread stopped before this member's digest",
                want.path
            ))
        })?;
        if Some(digest) != want.sha256 {
            return Err(fail(format!(
                "{}: content is {n} bytes with sha256 {digest}, the manifest says {size} bytes with {}",
                want.path,
                want.sha256.map(|d| d.to_string()).unwrap_or_default()
            )));
        }
        let pad = &mut got[..archive::padding(size)];
        if read_full(tar_stream, pad).map_err(unreadable)? < pad.len() {
            return Err(fail(format!(
                "{}: the archive ends inside the member's padding: the archive is truncated",
                want.path
            )));
        }
        if pad.iter().any(|b| *b != 0) {
            return Err(fail(format!(
                "{}: the padding after the content is not zeros, as infrakit writes it",
                want.path
            )));
        }
    }
    // Exactly the two zero blocks infrakit writes, then the end of the stream.
    let mut end = [0u8; archive::END_OF_ARCHIVE];
    let n = read_full(tar_stream, &mut end).map_err(unreadable)?;
    if end[..n.min(BLOCK)].iter().any(|b| *b != 0) {
        if n >= BLOCK {
            let bytes = with_rest(&end[..n], tar_stream);
            let mut archive = tar::Archive::new(bytes.as_slice());
            let name = match archive.entries().map(|mut e| e.next()) {
                Ok(Some(Ok(entry))) => shown(&entry.path_bytes()),
                _ => shown(&tar::Header::from_byte_slice(&end[..BLOCK]).path_bytes()),
            };
            return Err(fail(format!("{name}: extra member not in the manifest")));
        }
        return Err(fail("data after the last member".to_owned()));
    }
    if n < end.len() {
        return Err(fail(
            "the end-of-archive blocks are missing: the archive is truncated".to_owned(),
        ));
    }
    if end[BLOCK..].iter().any(|b| *b != 0)
        || read_full(tar_stream, &mut [0u8]).map_err(unreadable)? != 0
    {
        return Err(fail("data after the end of the archive".to_owned()));
    }
    Ok(())
}

/// The tar stream being checked, and the SHA-256 of each regular file's
/// content in it, in order (`ReadAhead::spawn_hashing` over `contents`).
struct Members<'a> {
    stream: &'a mut dyn Read,
    digests: &'a std::sync::mpsc::Receiver<Sha256>,
}

/// The archive member `archive::write` writes for a manifest entry.
fn member(want: &ManifestEntry) -> archive::Header<'_> {
    let body = match want.kind {
        EntryType::Dir => archive::Body::Dir,
        EntryType::File => archive::Body::File(want.size.unwrap_or_default()),
        EntryType::Symlink => archive::Body::Symlink(want.target.as_deref().unwrap_or_default()),
    };
    archive::Header {
        path: &want.path,
        body,
        mode: want.mode,
        uid: want.uid,
        gid: want.gid,
    }
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_full(stream: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match stream.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Bytes from the archive for messages: as they are when they are UTF-8
/// without control characters, else escaped (`\xff`, `\u{1b}`), so what a
/// hostile archive holds cannot drive the terminal.
fn shown(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        Ok(s) => s.escape_debug().to_string(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

/// `got` and at most 64 KiB more of the stream: enough to parse a member's
/// header records on the way to a refusal.
fn with_rest(got: &[u8], rest: &mut dyn Read) -> Vec<u8> {
    let mut bytes = got.to_vec();
    let _ = rest.take(64 << 10).read_to_end(&mut bytes);
    bytes
}

/// Says why `got`, the header bytes found where the entry `want` belongs,
/// are not `expected`, the bytes infrakit writes for it: `<member>: <why>`.
/// Runs only on the way to a refusal; it parses the member with the tar
/// crate, which applies extension records the way most readers do.
fn explain(
    got: &[u8],
    rest: &mut dyn Read,
    expected: &[u8],
    want: &ManifestEntry,
    mtime: u64,
) -> String {
    if got[..BLOCK].iter().all(|b| *b == 0) {
        return format!(
            "{}: in the manifest but missing from the archive",
            want.path
        );
    }
    let bytes = with_rest(got, rest);
    let records = record_types(&bytes);
    let mut archive = tar::Archive::new(bytes.as_slice());
    let entry = archive.entries().and_then(|mut e| e.next().transpose());
    let name = match &entry {
        Ok(Some(entry)) => shown(&entry.path_bytes()),
        _ => want.path.to_string(),
    };
    if let Some(other) = records.iter().find(|t| !b"052LK".contains(t)) {
        return format!(
            "{name}: member type {} is never produced by infrakit",
            type_name(*other)
        );
    }
    let why = match &entry {
        Ok(Some(entry)) => {
            let ours = record_types(expected);
            why_different(entry, (&records, &ours), (got, expected), want, mtime)
        }
        Ok(None) => "the archive ends before this member: the archive is truncated".to_owned(),
        Err(e) => format!(
            "not a header infrakit writes: {}",
            shown(e.to_string().as_bytes())
        ),
    };
    format!("{name}: {why}")
}

/// The type flags of a member's records, up to its own header: `L`, `K`,
/// `x` and `g` records are followed, anything else ends the member's
/// headers.
fn record_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0usize;
    while let Some(block) = bytes.get(at..at + BLOCK) {
        types.push(block[156]);
        if !b"LKxg".contains(&block[156]) {
            break;
        }
        let size = tar::Header::from_byte_slice(block).size().ok();
        let next = size
            .and_then(|n| usize::try_from(n.div_ceil(BLOCK as u64)).ok())
            .and_then(|blocks| blocks.checked_add(1)?.checked_mul(BLOCK)?.checked_add(at));
        let Some(next) = next else { break };
        at = next;
    }
    types
}

/// The first difference between a member as parsed and its manifest entry;
/// if the fields agree, the records or the header field whose bytes differ.
fn why_different<R: Read>(
    entry: &tar::Entry<'_, R>,
    (records, ours): (&[u8], &[u8]),
    (got, expected): (&[u8], &[u8]),
    want: &ManifestEntry,
    mtime: u64,
) -> String {
    let header = entry.header();
    let kind = match header.as_bytes()[156] {
        b'0' => EntryType::File,
        b'5' => EntryType::Dir,
        b'2' => EntryType::Symlink,
        other => {
            return format!(
                "member type {} is never produced by infrakit",
                type_name(other)
            );
        }
    };
    let want_name = match want.kind {
        EntryType::Dir => format!("{}/", want.path),
        _ => want.path.to_string(),
    };
    if *entry.path_bytes() != *want_name.as_bytes() {
        return format!("expected {want_name} here (archive order follows the manifest)");
    }
    if kind != want.kind {
        return format!(
            "is a {}, the manifest says {}",
            kind_name(kind),
            kind_name(want.kind)
        );
    }
    if let (Ok(mode), Ok(uid), Ok(gid)) = (header.mode(), header.uid(), header.gid())
        && (mode, uid, gid) != (want.mode, u64::from(want.uid), u64::from(want.gid))
    {
        return format!(
            "mode/owner {mode:04o} {uid}:{gid}, the manifest says {:04o} {}:{}",
            want.mode, want.uid, want.gid
        );
    }
    if let Ok(got_mtime) = header.mtime()
        && got_mtime != mtime
    {
        return format!("mtime {got_mtime}, the manifest's source date is {mtime}");
    }
    if let Ok(size) = header.size() {
        match want.size {
            Some(want_size) if size != want_size => {
                return format!("size {size}, the manifest says {want_size}");
            }
            None if size != 0 => {
                return format!(
                    "a {} with {size} bytes of data: only regular files carry data",
                    kind_name(kind)
                );
            }
            _ => {}
        }
    }
    let target = entry.link_name_bytes();
    if want.kind == EntryType::Symlink
        && target.as_deref() != want.target.as_deref().map(str::as_bytes)
    {
        return format!(
            "links to {}, the manifest says {}",
            shown(target.as_deref().unwrap_or_default()),
            want.target.as_deref().unwrap_or_default()
        );
    }
    if records != ours {
        return format!(
            "header records ({}) where infrakit writes ({})",
            record_list(records),
            record_list(ours)
        );
    }
    let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) else {
        return "the archive ends inside this member's header: the archive is truncated".to_owned();
    };
    let field = if at < expected.len() - BLOCK {
        "long name or link"
    } else {
        field_name(at % BLOCK)
    };
    format!("its {field} field is not what infrakit writes for this entry")
}

fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Dir => "directory",
        EntryType::File => "regular file",
        EntryType::Symlink => "symlink",
    }
}

/// The GNU header field at byte `offset` of a header block.
fn field_name(offset: usize) -> &'static str {
    const FIELDS: [(usize, &str); 16] = [
        (0, "name"),
        (100, "mode"),
        (108, "uid"),
        (116, "gid"),
        (124, "size"),
        (136, "mtime"),
        (148, "checksum"),
        (156, "type"),
        (157, "link name"),
        (257, "magic"),
        (263, "version"),
        (265, "user name"),
        (297, "group name"),
        (329, "device major"),
        (337, "device minor"),
        (345, "GNU extension (or ustar prefix)"),
    ];
    FIELDS
        .iter()
        .rev()
        .find(|(start, _)| *start <= offset)
        .map_or("name", |(_, name)| name)
}

/// The record types of a member, for messages: `L, 0`.
fn record_list(types: &[u8]) -> String {
    let names: Vec<String> = types.iter().map(|t| type_name(*t)).collect();
    names.join(", ")
}

/// A tar type flag as a reader would call it.
fn type_name(flag: u8) -> String {
    let name = match flag {
        b'0' => "regular file",
        b'\0' => "old-style regular file",
        b'1' => "hard link",
        b'2' => "symlink",
        b'3' => "character device",
        b'4' => "block device",
        b'5' => "directory",
        b'6' => "fifo",
        b'7' => "contiguous file",
        b'g' => "PAX global header",
        b'x' => "PAX extended header",
        b'K' => "GNU long link",
        b'L' => "GNU long name",
        b'S' => "GNU sparse file",
        b'D' => "GNU dump directory",
        b'M' => "GNU multi-volume continuation",
        b'V' => "GNU volume label",
        _ => "unknown",
    };
    format!("{name} ({:?})", flag as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed artifact of a directory and a file, written the way
    /// `archive::write` writes it, and the keys that trust it.
    fn signed_release(dir: &Path) -> (PathBuf, Vec<u8>, [PublicKey; 1]) {
        let mut m = Manifest::sample();
        let mut etc = m.entries[0].clone();
        (etc.path, etc.kind, etc.mode) =
            (RelPath::new("etc").expect("path"), EntryType::Dir, 0o755);
        (etc.size, etc.sha256) = (None, None);
        m.entries.insert(0, etc);
        let mut tar = Vec::new();
        for e in &m.entries {
            archive::header(&mut tar, &member(e), m.source_date_epoch);
        }
        tar.extend_from_slice(b"hi\n");
        tar.resize(tar.len() + archive::padding(3) + archive::END_OF_ARCHIVE, 0);
        let zst = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
        m.archive.tar_size = tar.len() as u64;
        (m.archive.size, m.archive.sha256) = (zst.len() as u64, Sha256::of(&zst));
        let artifact = dir.join("n.tar.zst");
        let (manifest_bytes, keys) = write_signed(&artifact, &zst, &m);
        (artifact, manifest_bytes, keys)
    }

    /// Writes `content` at `artifact`, `m` beside it and a signature by a
    /// new key binding both; returns the manifest's bytes and the key.
    fn write_signed(artifact: &Path, content: &[u8], m: &Manifest) -> (Vec<u8>, [PublicKey; 1]) {
        use crate::trust::sign::SecretKey;
        std::fs::write(artifact, content).expect("artifact");
        let manifest_bytes = m.to_canonical_json();
        std::fs::write(manifest_beside(artifact), &manifest_bytes).expect("manifest");
        let key = SecretKey::generate().expect("key");
        let mut prehash = Prehasher::default();
        prehash.update(content);
        let binding = Binding {
            name: m.name.clone(),
            version: m.version.clone(),
            manifest_sha256: Sha256::of(&manifest_bytes),
        };
        let signature = key.sign(&prehash.finish(), &binding.to_comment());
        std::fs::write(signature_beside(artifact), signature).expect("signature");
        (manifest_bytes, [key.public()])
    }

    fn options<'a>(artifact: &'a Path, keys: &'a [PublicKey]) -> VerifyOptions<'a> {
        VerifyOptions {
            artifact,
            manifest: None,
            signature: None,
            keys,
        }
    }

    /// `verify_streamed` reads the entries from the manifest file again as
    /// the members come: rewritten after its check (an entry's mode), the
    /// manifest is refused.
    #[test]
    fn a_manifest_rewritten_before_its_entries_are_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (artifact, manifest_bytes, keys) = signed_release(dir.path());
        let opts = options(&artifact, &keys);
        let checked = verify_streamed(&opts, &|_, _| {}).expect("verified");
        assert_eq!((checked.entries, checked.manifest.entries.len()), (2, 0));
        let admitted = admit_with(&opts, Load::Head).expect("admitted");
        let text = String::from_utf8(manifest_bytes).expect("utf-8");
        let rewritten = text.replacen("\"mode\":\"0644\"", "\"mode\":\"0600\"", 1);
        assert_ne!(rewritten, text);
        std::fs::write(manifest_beside(&artifact), &rewritten).expect("rewrite");
        let err = admitted
            .unconfirmed()
            .stream(&mut |_, _| Ok(()))
            .expect_err("a rewritten manifest is refused");
        assert!(matches!(err, Error::Check(_)), "{err}");
        // The mode no longer matches the archive's header (the next test
        // keeps to what the archive does not show); opened again, the
        // manifest is refused before it is parsed.
        let Err(err) = admit_with(&opts, Load::Head) else {
            panic!("a manifest whose digest differs was admitted");
        };
        assert!(err.to_string().contains("is not the signed one"), "{err}");
    }

    /// The same rewrite, matching the archive: only the digest tells.
    #[test]
    fn a_manifest_rewritten_to_match_is_refused_by_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (artifact, manifest_bytes, keys) = signed_release(dir.path());
        let opts = options(&artifact, &keys);
        let admitted = admit_with(&opts, Load::Head).expect("admitted");
        // The layer's name is not part of the archive: same length.
        let text = String::from_utf8(manifest_bytes).expect("utf-8");
        let rewritten = text.replacen("\"layer\":\"base\"", "\"layer\":\"bass\"", 1);
        assert_ne!(rewritten, text);
        std::fs::write(manifest_beside(&artifact), &rewritten).expect("rewrite");
        let mut seen = Vec::new();
        let err = admitted
            .unconfirmed()
            .stream(&mut |e, _| {
                seen.push(e.layer.to_string());
                Ok(())
            })
            .expect_err("a rewritten manifest is refused");
        assert!(
            err.to_string().contains("changed after it was checked"),
            "{err}"
        );
        assert_eq!(seen, ["bass", "base"]);
    }

    /// `apply` admits an artifact without holding its entries and reads
    /// them again for its plan: a manifest rewritten after the check (to
    /// the same length, in what the archive does not show) ends them with
    /// an error, so no plan is made from it.
    #[test]
    fn entries_read_again_after_admission_end_in_an_error_if_the_manifest_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (artifact, manifest_bytes, keys) = signed_release(dir.path());
        let admitted = admit(&options(&artifact, &keys)).expect("admitted");
        let verified = admitted.unconfirmed();
        assert!(verified.manifest().entries.is_empty(), "the head alone");
        let signed = Manifest::parse(&manifest_bytes).expect("manifest").entries;
        let read = |v: &Verified| -> Vec<Result<ManifestEntry>> {
            v.entries()
                .expect("entries")
                .map(|e| e.map(Cow::into_owned))
                .collect()
        };
        let first: Vec<ManifestEntry> = read(verified)
            .into_iter()
            .map(|e| e.expect("entry"))
            .collect();
        assert_eq!(first, signed);
        let text = String::from_utf8(manifest_bytes).expect("utf-8");
        let rewritten = text.replacen("\"layer\":\"base\"", "\"layer\":\"bass\"", 1);
        assert_ne!(rewritten, text);
        std::fs::write(manifest_beside(&artifact), &rewritten).expect("rewrite");
        let again = read(verified);
        let err = match again.last() {
            Some(Err(e)) => e.to_string(),
            other => panic!("the rewritten entries ended with {other:?}"),
        };
        assert!(err.contains("changed after it was checked"), "{err}");
    }

    /// The manifest an applied release keeps is copied from the file that
    /// was checked, not held in memory: rewritten in place after the check,
    /// it is refused rather than copied.
    #[test]
    fn a_manifest_rewritten_after_its_check_is_not_copied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let artifact = dir.path().join("n.tar.zst");
        let mut m = Manifest::sample();
        m.archive.size = 1;
        let (manifest_bytes, keys) = write_signed(&artifact, b"a", &m);
        let manifest_path = manifest_beside(&artifact);
        let opts = options(&artifact, &keys);
        let admitted = admit(&opts).expect("admitted");
        let verified = admitted.unconfirmed();
        let dest = dir.path().join("copy");
        let mut copy = Vec::new();
        verified.write_manifest(&mut copy, &dest).expect("copied");
        assert_eq!(copy, manifest_bytes);
        // Same inode, same length, one byte changed (the version 1.0.0 -> 1.0.1).
        let at = manifest_bytes
            .windows(5)
            .position(|w| w == b"1.0.0")
            .expect("version");
        std::os::unix::fs::FileExt::write_at(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(&manifest_path)
                .expect("open"),
            b"1.0.1",
            at as u64,
        )
        .expect("rewrite");
        let err = verified
            .write_manifest(&mut Vec::new(), &dest)
            .expect_err("a rewritten manifest is refused");
        assert!(matches!(err, Error::Check(_)), "{err}");
        assert!(
            err.to_string().contains("changed after it was checked"),
            "{err}"
        );
    }

    #[test]
    fn archive_bytes_in_messages_cannot_drive_the_terminal() {
        assert_eq!(shown("etc/café conf".as_bytes()), "etc/café conf");
        assert_eq!(shown(b"a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert_eq!(shown(b"a.con\xff"), "a.con\\xff");
    }

    #[test]
    fn record_types_follow_extension_records_only() {
        let mut bytes = Vec::new();
        let path = crate::model::RelPath::new(&"n".repeat(101)).expect("path");
        let member = archive::Header {
            path: &path,
            body: archive::Body::Symlink(&"t".repeat(101)),
            mode: 0o777,
            uid: 0,
            gid: 0,
        };
        archive::header(&mut bytes, &member, 0);
        assert_eq!(record_types(&bytes), b"LK2");
        assert_eq!(record_types(&bytes[..BLOCK]), b"L", "cut after a record");
        assert_eq!(field_name(148), "checksum");
        assert_eq!(field_name(400), "GNU extension (or ustar prefix)");
    }
}
