//! The host's InfraKit state under `<root>/var/lib/infrakit/`: retained
//! releases, the `current` symlink that is the one atomic switch, the journal
//! of an activation in progress, and the record of what InfraKit created.
//! Every file here is replaced atomically (temp file, fsync, rename, fsync of
//! the directory); nothing here decides policy.
//!
//! ```text
//! var/lib/infrakit/
//!   current -> releases/<id>          the active release (relative symlink)
//!   releases/<id>/rootfs/...          the release's files, as signed
//!   releases/<id>/manifest.json       the signed manifest, byte for byte
//!   releases/<id>/artifact.minisig    its signature
//!   releases/<id>/release.json        name, version, digest, key id
//!   releases/.<id>.partial/           a release being extracted
//!   journal.json                      an activation in progress
//!   state.json                        history of activations, created dirs
//!   backups/<id>/...                  host files moved aside by --adopt
//!   lock                              held (flock) while anything changes
//! ```
//!
//! On the live paths, every file or symlink of the active release is a
//! relative symlink to `var/lib/infrakit/current/rootfs/<path>` (a "farm
//! link"): switching `current` switches all of them at once.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifact::manifest::{EntryReader, Manifest, ManifestEntry};
use crate::artifact::pieces::{At, PiecesError};
use crate::error::{Error, Result};
use crate::host::confined::{self, Dir, Meta, Resolve};
use crate::host::hooks::Hooks;
use crate::model::RelPath;
use crate::trust::digest::Sha256;

/// Where the state lives, relative to the root.
pub const STATE_DIR: &str = "var/lib/infrakit";
/// Written by a bundle's first-boot script when it fails (docs/first-boot.md).
pub const FIRST_BOOT_FAILED: &str = "first-boot.failed";
/// State records larger than this are refused unread.
const RECORD_MAX: u64 = 64 << 20;

/// How a release is named on disk: `<name>-<version>-<first 12 hex digits>`.
/// Always a safe single path component: built from a checked name and
/// version, or parsed (from disk) with the same rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReleaseId(String);

impl ReleaseId {
    /// The id of release `name` `version` whose artifact has `sha256`;
    /// refuses a name or version that would not make a safe path component.
    pub fn new(name: &str, version: &str, sha256: &Sha256) -> Result<ReleaseId, String> {
        check_name(name)?;
        check_version(version)?;
        Ok(ReleaseId(format!(
            "{name}-{version}-{}",
            &sha256.to_string()[..12]
        )))
    }

    pub fn parse(s: &str) -> Result<ReleaseId, String> {
        if is_safe_component(s) {
            Ok(ReleaseId(s.to_owned()))
        } else {
            Err(format!("{s:?} is not a release id"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ReleaseId {
    type Error = String;
    fn try_from(s: String) -> Result<ReleaseId, String> {
        ReleaseId::parse(&s)
    }
}

impl From<ReleaseId> for String {
    fn from(id: ReleaseId) -> String {
        id.0
    }
}

impl std::fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One path component made only of `[A-Za-z0-9._+-]`, not starting with a
/// dot (so never `.`, `..` or a partial release).
fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// A release name: `[a-z0-9-]+`, as profiles require.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some(())
        .ok_or_else(|| format!("release name {name:?} is not [a-z0-9-]+"))
}

/// A release version: semver, and a safe path component.
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = semver::Version::parse(version).is_ok() && is_safe_component(version);
    ok.then_some(())
        .ok_or_else(|| format!("release version {version:?} is not a plain semver version"))
}

/// What `release.json` records about a retained release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseInfo {
    pub id: ReleaseId,
    pub name: String,
    pub version: String,
    /// The artifact's sha256.
    pub sha256: Sha256,
    pub key_id: String,
}

impl ReleaseInfo {
    /// Whether this record, read from `releases/<id>/`, is well-formed and
    /// names the release `id` and no other.
    fn check(&self, id: &ReleaseId) -> Result<(), String> {
        let own = ReleaseId::new(&self.name, &self.version, &self.sha256)?;
        if own != self.id || own != *id {
            return Err(format!(
                "describes {own}, but lies in the directory of {id}"
            ));
        }
        let hex = !self.key_id.is_empty()
            && self.key_id.len() <= 16
            && self.key_id.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then_some(())
            .ok_or_else(|| format!("key id {:?} is not a minisign key id", self.key_id))
    }
}

/// What an activation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Apply,
    Rollback,
    /// Re-applying the active release to a drifted root.
    Repair,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Apply => "apply",
            Action::Rollback => "rollback",
            Action::Repair => "repair",
        })
    }
}

/// An activation in progress: written before the first change to the live
/// paths, removed after the last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub action: Action,
    pub from: Option<ReleaseId>,
    pub to: ReleaseId,
    /// Directories this activation creates on the live paths.
    pub created_dirs: Vec<RelPath>,
    /// Host files moved aside to `backups/<to>/`.
    pub adopted: Vec<RelPath>,
    /// The activation history once this activation completes.
    pub history: Vec<ReleaseId>,
    /// When the activation started (seconds since 1970, from the caller).
    pub applied_at: u64,
    /// What to ask of the running system (on a live root). The journal stays
    /// until the after-switch hooks succeeded, so a crash or a failure
    /// retries them; the validator units stopped before the switch are
    /// started again if the activation is reverted.
    pub hooks: Hooks,
}

/// The lasting record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Activated releases, oldest first; the last is `current`.
    pub history: Vec<ReleaseId>,
    /// Directories InfraKit created on the live paths (removed again when no
    /// release has them and they are empty).
    pub created_dirs: BTreeSet<RelPath>,
    /// Host files moved aside: path → the release whose `backups/` holds it.
    /// Restored when no active release has the path.
    #[serde(default)]
    pub adopted: BTreeMap<RelPath, ReleaseId>,
    /// When each retained release was last activated (seconds since 1970).
    #[serde(default)]
    pub applied_at: BTreeMap<ReleaseId, u64>,
}

/// A retained release: its info and manifest.
#[derive(Debug)]
pub struct Release {
    pub info: ReleaseInfo,
    /// With its entries, or without them (`State::release_head`): then
    /// `entries` reads them again from `manifest.json`.
    pub manifest: Manifest,
    /// The sha256 of `manifest.json` as read.
    pub manifest_sha256: Sha256,
    /// `artifact.minisig` as read (checked only by who needs it: rollback).
    pub signature: Vec<u8>,
    /// Whether `manifest` holds the entries.
    held: bool,
    /// `manifest.json` as opened, and its path.
    file: File,
    path: PathBuf,
}

/// A release's entries in order, each checked (`Release::entries`).
pub type Entries<'r> = Box<dyn Iterator<Item = Result<Cow<'r, ManifestEntry>>> + 'r>;

/// The entries `m` holds, as `Entries`.
pub fn held(m: &Manifest) -> Entries<'_> {
    Box::new(m.entries.iter().map(|e| Ok(Cow::Borrowed(e))))
}

/// A release's manifest and its entries: held, or read again as they are
/// needed (an apply does not hold a large release's entries).
pub trait Listing {
    /// The manifest, without its entries unless they are held.
    fn head(&self) -> &Manifest;
    fn entries(&self) -> Result<Entries<'_>>;
}

impl Listing for Manifest {
    fn head(&self) -> &Manifest {
        self
    }

    fn entries(&self) -> Result<Entries<'_>> {
        Ok(held(self))
    }
}

impl Listing for Release {
    fn head(&self) -> &Manifest {
        &self.manifest
    }

    fn entries(&self) -> Result<Entries<'_>> {
        Release::entries(self)
    }
}

impl Listing for crate::trust::verify::Verified {
    fn head(&self) -> &Manifest {
        self.manifest()
    }

    fn entries(&self) -> Result<Entries<'_>> {
        crate::trust::verify::Verified::entries(self)
    }
}

impl Release {
    /// The manifest's entries: those held or, for a release read without
    /// them, read again from the file that was read and checked the same
    /// way, a piece at a time; a file that no longer has the digest it had
    /// then ends them with an error.
    pub fn entries(&self) -> Result<Entries<'_>> {
        if self.held {
            return Ok(held(&self.manifest));
        }
        let read_err = || state_error(self.path.clone(), "reading release manifest");
        let from = At::start(self.file.try_clone().map_err(read_err())?);
        let reader = EntryReader::new(from, crate::trust::verify::MANIFEST_MAX, true);
        let entries = reader.rechecked(self.manifest_sha256, move |e| match e {
            Some(PiecesError::Io(e)) => read_err()(e),
            Some(PiecesError::Malformed(m)) => Error::input(&self.path, m),
            // Read whole before: now larger, or another digest.
            Some(PiecesError::TooLarge(_)) | None => {
                Error::input(&self.path, "changed while it was being read; try again")
            }
        });
        Ok(Box::new(entries.map(|e| e.map(Cow::Owned))))
    }
}

/// The state directories `State::create` made, to be removed again when
/// the operation that needed them is refused.
#[derive(Debug, Default)]
#[must_use]
pub struct Created(Vec<PathBuf>);

/// One root and its state directory, both held as directory handles: the
/// live paths resolve inside the root (`Resolve::InRoot`), everything under
/// `var/lib/infrakit` without any symlink (`Resolve::Strict`).
#[derive(Debug)]
pub struct State {
    pub root: PathBuf,
    live: Dir,
    dir: Option<Dir>,
}

/// Maps an I/O error under the state directory: a symlink in the way is the
/// state's fault (exit 2, with what to do), anything else an I/O error.
fn state_error(path: PathBuf, action: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |e| {
        if confined::is_escape(&e) {
            Error::input(
                &path,
                "is or lies under a symlink; InfraKit never follows links in its state directory: move it away (docs/operations.md)",
            )
        } else {
            Error::io(&path, action)(e)
        }
    }
}

impl State {
    /// Opens `root` (which must be an existing directory) and its state
    /// directory, if there is one.
    pub fn open(root: &Path) -> Result<State> {
        let live = Dir::open(root, Resolve::InRoot).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Error::input(
                root,
                "is not an existing directory: give the root to manage with --root",
            ),
            _ => Error::io(root, "opening the root")(e),
        })?;
        let mut state = State {
            root: root.to_path_buf(),
            live,
            dir: None,
        };
        state.dir = state.open_dir()?;
        Ok(state)
    }

    fn open_dir(&self) -> Result<Option<Dir>> {
        let strict = self
            .live
            .with_policy(Resolve::Strict)
            .map_err(Error::io(&self.root, "opening the root"))?;
        match confined::optional(strict.open_dir(STATE_DIR)) {
            Ok(dir) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(Error::input(
                &self.path(""),
                "is not a directory: move it away (docs/operations.md)",
            )),
            Err(e) => Err(state_error(self.path(""), "opening the state directory")(e)),
        }
    }

    /// `<root>/var/lib/infrakit/<rel>`, for messages.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let base = self.root.join(STATE_DIR);
        if rel.as_ref().as_os_str().is_empty() {
            base
        } else {
            base.join(rel)
        }
    }

    /// Whether the root has a state directory.
    pub fn exists(&self) -> bool {
        self.dir.is_some()
    }

    fn dir(&self) -> Result<&Dir> {
        self.dir.as_ref().ok_or_else(|| {
            Error::io(&self.path(""), "opening the state directory")(io::ErrorKind::NotFound.into())
        })
    }

    /// Whether the caller may write to the root and its state directory.
    pub fn writable(&self) -> bool {
        self.live.writable() && self.dir.as_ref().is_none_or(Dir::writable)
    }

    /// Creates the state directories and the lock file that are missing
    /// (0755 whatever the umask: unprivileged services read release files
    /// through the farm links; the lock 0644, so `status` can take it
    /// shared without root). Says what it made, for `discard`.
    pub fn create(&mut self) -> Result<Created> {
        let strict = self
            .live
            .with_policy(Resolve::Strict)
            .map_err(Error::io(&self.root, "opening the root"))?;
        let mut made = Vec::new();
        let mut rel = PathBuf::new();
        for part in STATE_DIR.split('/').chain(["releases"]) {
            rel.push(part);
            match strict.create_dir(&rel, 0o755) {
                Ok(()) => {
                    made.push(rel.clone());
                    strict
                        .set_mode(&rel, 0o755)
                        .map_err(Error::io(&self.root.join(&rel), "setting mode"))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let created = Created(made);
                    self.discard(created);
                    return Err(state_error(
                        self.root.join(&rel),
                        "creating state directory",
                    )(e));
                }
            }
        }
        let lock = Path::new(STATE_DIR).join("lock");
        // 0644 whatever the umask (a first boot runs under umask 077).
        let created = strict.create_file(&lock, 0o644).and_then(|f| {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))
        });
        match created {
            Ok(()) => made.push(lock.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                self.discard(Created(made));
                return Err(state_error(self.root.join(&lock), "creating the lock file")(e));
            }
        }
        match self.open_dir() {
            Ok(dir) => self.dir = dir,
            Err(e) => {
                self.discard(Created(made));
                return Err(e);
            }
        }
        Ok(Created(made))
    }

    /// Removes what `create` made (directories, if still empty, and the lock
    /// file), so a refused operation leaves the root as it found it.
    pub fn discard(&mut self, created: Created) {
        if created.0.is_empty() {
            return;
        }
        let Ok(strict) = self.live.with_policy(Resolve::Strict) else {
            return;
        };
        for rel in created.0.iter().rev() {
            if rel.ends_with("lock") {
                let _ = strict.remove_file(rel);
            } else {
                let _ = strict.remove_dir(rel);
            }
        }
        self.dir = self.open_dir().ok().flatten();
    }

    /// The id `current` points at, if any. `current` is read as a link and
    /// must name a release in `releases/`; it is never followed.
    pub fn current_id(&self) -> Result<Option<ReleaseId>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = self.path("current");
        let target = match confined::optional(dir.read_link("current")) {
            Ok(None) => return Ok(None),
            Ok(Some(t)) => t,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                return Err(Error::input(
                    &path,
                    "is not a symlink: InfraKit's current release link was replaced; see docs/operations.md",
                ));
            }
            Err(e) => return Err(Error::io(&path, "reading the current release link")(e)),
        };
        target
            .strip_prefix("releases")
            .ok()
            .and_then(|p| p.to_str())
            .and_then(|s| ReleaseId::parse(s).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::input(
                    &path,
                    format!(
                        "points at {}, not at a release in releases/; see docs/operations.md",
                        target.display()
                    ),
                )
            })
    }

    /// A retained release, read back as untrusted: `release.json` must name
    /// this release, and the manifest must be the one it describes.
    pub fn release(&self, id: &ReleaseId) -> Result<Release> {
        self.release_in(id.as_str(), id, true)
    }

    /// Release `id` while it is being extracted (`releases/.<id>.partial`,
    /// its metadata written first), read back as untrusted as `release`
    /// reads a retained one: what recovery reverts when an activation was
    /// interrupted while staging.
    pub fn staged_release(&self, id: &ReleaseId) -> Result<Release> {
        self.release_in(&partial_name(id), id, true)
    }

    /// `entries`: whether to hold the manifest's entries (see `Release`).
    fn release_in(&self, name: &str, id: &ReleaseId, entries: bool) -> Result<Release> {
        let dir = self.dir()?;
        let base = Path::new("releases").join(name);
        let info_rel = base.join("release.json");
        let info: ReleaseInfo = read_json(dir, &info_rel)?.ok_or_else(|| {
            Error::io(&dir.display(&info_rel), "reading release record")(
                io::ErrorKind::NotFound.into(),
            )
        })?;
        info.check(id)
            .map_err(|m| Error::input(&dir.display(&info_rel), m))?;
        let manifest_rel = base.join("manifest.json");
        // Parsed as it is read, and hashed: a large release's manifest is
        // megabytes, and an apply that replaces the release holds the new
        // one's parsed manifest too.
        let read_err = || state_error(dir.display(&manifest_rel), "reading release manifest");
        let max = crate::trust::verify::MANIFEST_MAX;
        let file = dir.open_file(&manifest_rel).map_err(read_err())?;
        let (parsed, manifest_sha256) = Manifest::read(&file, max, entries).map_err(read_err())?;
        let manifest = parsed.map_err(|m| Error::input(&dir.display(&manifest_rel), m))?;
        if (&manifest.name, &manifest.version, manifest.archive.sha256)
            != (&info.name, &info.version, info.sha256)
        {
            return Err(Error::input(
                &dir.display(&manifest_rel),
                format!("is not the manifest of {id}"),
            ));
        }
        let sig_rel = base.join("artifact.minisig");
        let signature = dir.read(&sig_rel, 64 << 10).map_err(state_error(
            dir.display(&sig_rel),
            "reading release signature",
        ))?;
        Ok(Release {
            info,
            manifest,
            manifest_sha256,
            signature,
            held: entries,
            file,
            path: dir.display(&manifest_rel),
        })
    }

    /// The active release, if any.
    pub fn current(&self) -> Result<Option<Release>> {
        self.current_id()?.map(|id| self.release(&id)).transpose()
    }

    /// Retained release `id` as `release` reads it, without holding its
    /// manifest's entries (`Release::entries` reads them again).
    pub fn release_head(&self, id: &ReleaseId) -> Result<Release> {
        self.release_in(id.as_str(), id, false)
    }

    pub fn journal(&self) -> Result<Option<Journal>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let journal: Option<Journal> = read_json(dir, Path::new("journal.json"))?;
        if let Some(j) = &journal {
            let path = self.path("journal.json");
            j.hooks.check().map_err(|m| Error::input(&path, m))?;
            // The history it records becomes state.json's, and releases it
            // does not list are deleted: it must end with the release it
            // activates.
            if j.history.last() != Some(&j.to) {
                return Err(Error::input(
                    &path,
                    format!(
                        "its history does not end with {}, the release it activates",
                        j.to
                    ),
                ));
            }
        }
        Ok(journal)
    }

    pub fn record(&self) -> Result<Record> {
        let Some(dir) = &self.dir else {
            return Ok(Record::default());
        };
        Ok(read_json(dir, Path::new("state.json"))?.unwrap_or_default())
    }

    /// Why the first boot failed, as its bundle's script recorded in
    /// `first-boot.failed` (untrusted text: its first line, anything but
    /// printable ASCII shown as `?`, at most 1000 characters), or `None`.
    pub fn first_boot_failure(&self) -> Result<Option<String>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = self.path(FIRST_BOOT_FAILED);
        let bytes = confined::optional(dir.read(FIRST_BOOT_FAILED, 64 << 10))
            .map_err(state_error(path, "reading"))?;
        Ok(bytes.map(|b| {
            let text = String::from_utf8_lossy(&b);
            let line: String = text
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                // Printable ASCII only: no control, bidi or separator
                // character from a planted file reaches a terminal.
                .map(|c| if matches!(c, ' '..='~') { c } else { '?' })
                .take(1000)
                .collect();
            if line.trim().is_empty() {
                "no reason recorded".to_owned()
            } else {
                line
            }
        }))
    }

    /// Removes the failed-first-boot marker: a successful activation
    /// supersedes it.
    pub fn clear_first_boot_failure(&self) -> Result<()> {
        let dir = self.dir()?;
        match dir.remove_file(FIRST_BOOT_FAILED) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_error(self.path(FIRST_BOOT_FAILED), "removing")(e)),
        }
    }

    pub fn write_journal(&self, journal: &Journal) -> Result<()> {
        self.write_json("journal.json", journal)
    }

    pub fn remove_journal(&self) -> Result<()> {
        let dir = self.dir()?;
        let path = self.path("journal.json");
        dir.remove_file("journal.json")
            .and_then(|()| dir.sync())
            .map_err(Error::io(&path, "removing the journal"))
    }

    pub fn write_record(&self, record: &Record) -> Result<()> {
        self.write_json("state.json", record)
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        self.dir()?
            .write_atomic(name, &to_json(value), 0o644)
            .map_err(state_error(self.path(name), "writing"))
    }

    /// `releases/` as a handle.
    pub fn releases(&self) -> Result<Dir> {
        self.dir()?
            .open_dir("releases")
            .map_err(state_error(self.path("releases"), "opening"))
    }

    /// The names in `releases/` (partial releases start with a dot).
    pub fn release_names(&self) -> Result<Vec<String>> {
        if self.dir.is_none() {
            return Ok(Vec::new());
        }
        let names = self
            .releases()?
            .names()
            .map_err(Error::io(&self.path("releases"), "listing releases"))?;
        Ok(names
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect())
    }

    /// Releases being extracted (`releases/.<id>.partial`), left by a crash
    /// if no apply is running.
    pub fn partials(&self) -> Result<Vec<String>> {
        let mut names = self.release_names()?;
        names.retain(|n| n.starts_with('.'));
        Ok(names)
    }

    /// Removes every partial release; returns whether there was any.
    pub fn remove_partials(&self) -> Result<bool> {
        let partials = self.partials()?;
        for p in &partials {
            self.remove_release(p)?;
        }
        Ok(!partials.is_empty())
    }

    /// Removes `releases/<name>` and everything in it, following nothing.
    pub fn remove_release(&self, name: &str) -> Result<()> {
        self.releases()?.remove_tree(name).map_err(state_error(
            self.path("releases").join(name),
            "removing a release",
        ))
    }

    /// The extracted tree of release `id`, as a handle.
    pub fn release_root(&self, id: &ReleaseId) -> Result<Dir> {
        let rel = Path::new("releases").join(id.as_str()).join("rootfs");
        self.dir()?
            .open_dir(&rel)
            .map_err(state_error(self.path(&rel), "opening the release"))
    }

    /// Waits for an `apply` or `rollback` in progress, for a reader that
    /// must not see it half done; `None` when there is no state yet.
    pub fn lock_shared(&self) -> Result<Option<File>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = self.path("lock");
        let file = match confined::optional(dir.open_file("lock")) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => return Err(state_error(path, "opening lock file")(e)),
        };
        file.lock_shared().map_err(Error::io(&path, "locking"))?;
        Ok(Some(file))
    }

    /// Takes the state lock, waiting for another `apply` to finish.
    pub fn lock(&self) -> Result<File> {
        let path = self.path("lock");
        let file = self
            .dir()?
            .open_lock("lock")
            .map_err(state_error(path.clone(), "opening lock file"))?;
        file.lock().map_err(Error::io(&path, "locking"))?;
        Ok(file)
    }

    /// Points `current` at `id` atomically (a new symlink renamed over the
    /// old one), then makes the rename durable.
    pub fn switch(&self, id: &ReleaseId) -> Result<()> {
        let dir = self.dir()?;
        let path = self.path("current");
        let _ = dir.remove_file("current.new");
        dir.symlink(Path::new("releases").join(id.as_str()), "current.new")
            .map_err(Error::io(
                &self.path("current.new"),
                "creating the new current link",
            ))?;
        dir.replace("current.new", "current")
            .and_then(|()| dir.sync())
            .map_err(Error::io(&path, "switching the current release"))
    }

    /// The target of the farm link at `path`: up to the root, then through
    /// `current`.
    pub fn farm_target(path: &RelPath) -> PathBuf {
        let mut target = PathBuf::new();
        for _ in 0..path.depth() {
            target.push("..");
        }
        target.push(STATE_DIR);
        target.push("current/rootfs");
        target.push(path.as_str());
        target
    }

    /// The live path of `path`, for messages.
    pub fn live(&self, path: &RelPath) -> PathBuf {
        self.root.join(path.as_str())
    }

    /// The root as a handle (paths resolve inside it).
    pub fn live_dir(&self) -> &Dir {
        &self.live
    }

    /// What is at the live path (`None`: nothing).
    pub fn live_meta(&self, path: &RelPath) -> Result<Option<Meta>> {
        self.farm().meta(path)
    }

    /// Whether the live path of `path` is InfraKit's farm link.
    pub fn is_farm_link(&self, path: &RelPath) -> bool {
        self.farm().is_link(path)
    }

    /// Farm-link operations for a run of paths (see `Farm`).
    pub fn farm(&self) -> Farm<'_> {
        Farm {
            parents: confined::Parents::new(&self.live),
            state: self,
        }
    }

    /// Creates the live directory of `entry` with its mode and owner;
    /// `false` when a directory is there already.
    pub fn create_live_dir(&self, e: &ManifestEntry) -> Result<bool> {
        let live = self.live(&e.path);
        match self.live.create_dir(e.path.as_str(), e.mode) {
            Ok(()) => {}
            Err(err)
                if err.kind() == io::ErrorKind::AlreadyExists
                    && self
                        .live_meta(&e.path)?
                        .is_some_and(|m| m.kind == confined::Kind::Dir) =>
            {
                return Ok(false);
            }
            Err(err) => return Err(Error::io(&live, "creating directory")(err)),
        }
        self.live
            .set_owner_mode(e.path.as_str(), e.uid, e.gid, Some(e.mode))
            .map_err(Error::io(&live, "setting owner and mode"))?;
        Ok(true)
    }

    /// Removes an empty live directory.
    pub fn remove_live_dir(&self, path: &RelPath) -> io::Result<()> {
        self.live.remove_dir(path.as_str())
    }

    fn backup_rel(id: &ReleaseId, path: &RelPath) -> PathBuf {
        Path::new("backups").join(id.as_str()).join(path.as_str())
    }

    /// Whether `backups/<id>/<path>` holds something.
    pub fn has_backup(&self, id: &ReleaseId, path: &RelPath) -> Result<bool> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let rel = State::backup_rel(id, path);
        confined::optional(dir.stat(&rel))
            .map(|m| m.is_some())
            .map_err(state_error(self.path(&rel), "inspecting a backup"))
    }

    /// Moves the host's file at `path` to `backups/<id>/<path>`.
    pub fn move_aside(&self, id: &ReleaseId, path: &RelPath) -> Result<()> {
        let dir = self.dir()?;
        let rel = State::backup_rel(id, path);
        let mut parent = PathBuf::new();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            parent.push(part);
            match dir.create_dir(&parent, 0o700) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(state_error(self.path(&parent), "creating backup directory")(e));
                }
            }
        }
        self.live
            .rename(path.as_str(), dir, &rel)
            .map_err(state_error(self.live(path), "moving a host file aside"))
    }

    /// Moves the host file kept in `backups/<id>/<path>` back, unless
    /// something is in its place again or there is none.
    pub fn restore(&self, id: &ReleaseId, path: &RelPath) -> Result<()> {
        if self.live_meta(path)?.is_some() || !self.has_backup(id, path)? {
            return Ok(());
        }
        // Never over something that appeared in its place since.
        match self
            .dir()?
            .rename(State::backup_rel(id, path), &self.live, path.as_str())
        {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r.map_err(Error::io(&self.live(path), "restoring an adopted file")),
        }
    }

    /// Flushes the filesystem of the root (one `syncfs`).
    pub fn sync_fs(&self) -> Result<()> {
        self.live
            .sync_fs()
            .map_err(Error::io(&self.root, "syncing the filesystem"))
    }
}

/// The name in `releases/` of release `id` while it is being extracted.
pub fn partial_name(id: &ReleaseId) -> String {
    format!(".{id}.partial")
}

/// A state record, or `None` when there is none. Records are untrusted:
/// size-limited, strictly typed (ids, paths), and a malformed one stops the
/// command with exit 2, naming the file.
fn read_json<T: serde::de::DeserializeOwned>(dir: &Dir, rel: &Path) -> Result<Option<T>> {
    let path = dir.display(rel);
    let bytes = match confined::optional(dir.read(rel, RECORD_MAX)) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(state_error(path, "reading state")(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::input(
            &path,
            format!("state file is malformed ({e}); see docs/operations.md"),
        )
    })
}

/// A state record as written: pretty JSON and a newline.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("state serialises");
    bytes.push(b'\n');
    bytes
}

/// Replaces `path` with `bytes` (mode `mode`) atomically: temp file in the
/// same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::input(path, "needs a UTF-8 file name"))?;
    Dir::open(dir, Resolve::Strict)
        .and_then(|d| d.write_atomic(name, bytes, mode))
        .map_err(Error::io(path, "writing"))
}

/// The farm links of a run of paths in manifest order, below the live root:
/// each parent directory is opened once for the paths in it (a release's
/// tens of thousands of links would otherwise resolve it twice per link).
pub struct Farm<'a> {
    parents: confined::Parents<'a>,
    state: &'a State,
}

impl Farm<'_> {
    /// What is at the live path (`None`: nothing).
    pub fn meta(&mut self, path: &RelPath) -> Result<Option<Meta>> {
        let meta = self
            .parents
            .of(Path::new(path.as_str()))
            .and_then(|(dir, name)| dir.stat(name));
        confined::optional(meta).map_err(Error::io(&self.state.live(path), "inspecting"))
    }

    /// Whether the live path of `path` is InfraKit's farm link.
    pub fn is_link(&mut self, path: &RelPath) -> bool {
        self.parents
            .of(Path::new(path.as_str()))
            .and_then(|(dir, name)| dir.read_link(name))
            .is_ok_and(|t| t == State::farm_target(path))
    }

    /// Creates the farm link of `path`; one already there is kept, anything
    /// else there fails.
    pub fn link(&mut self, path: &RelPath) -> Result<()> {
        let target = State::farm_target(path);
        let made = self
            .parents
            .of(Path::new(path.as_str()))
            .and_then(|(dir, name)| match dir.symlink(&target, name) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if dir.read_link(name).is_ok_and(|t| t == target) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
                made => made,
            });
        made.map_err(Error::io(&self.state.live(path), "creating link"))
    }

    /// Removes the farm link (or file) at `path`.
    pub fn unlink(&mut self, path: &RelPath) -> Result<()> {
        self.parents
            .of(Path::new(path.as_str()))
            .and_then(|(dir, name)| dir.remove_file(name))
            .map_err(Error::io(&self.state.live(path), "removing a link"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release read without its entries reads them again from the file
    /// it read, and ends them in an error if that file changed since.
    #[test]
    fn a_release_read_without_its_entries_reads_them_again_and_notices_a_change() {
        let root = tempfile::tempdir().unwrap();
        let m = Manifest::sample();
        let id = ReleaseId::new(&m.name, &m.version, &m.archive.sha256).unwrap();
        let dir = root
            .path()
            .join(STATE_DIR)
            .join("releases")
            .join(id.as_str());
        std::fs::create_dir_all(&dir).unwrap();
        let info = ReleaseInfo {
            id: id.clone(),
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: m.archive.sha256,
            key_id: "0123456789ABCDEF".into(),
        };
        let json = m.to_canonical_json();
        std::fs::write(dir.join("release.json"), to_json(&info)).unwrap();
        std::fs::write(dir.join("manifest.json"), &json).unwrap();
        std::fs::write(dir.join("artifact.minisig"), b"sig").unwrap();
        let state = State::open(root.path()).unwrap();
        let whole = state.release(&id).unwrap();
        let head = state.release_head(&id).unwrap();
        assert_eq!(whole.manifest.entries, m.entries);
        assert!(head.manifest.entries.is_empty());
        let read = |r: &Release| -> Result<Vec<ManifestEntry>> {
            r.entries()?.map(|e| e.map(Cow::into_owned)).collect()
        };
        assert_eq!(read(&whole).unwrap(), m.entries);
        assert_eq!(read(&head).unwrap(), m.entries);
        // Rewritten in place, the same length, one mode changed.
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains("\"0644\""));
        std::fs::write(
            dir.join("manifest.json"),
            text.replace("\"0644\"", "\"0600\""),
        )
        .unwrap();
        let err = read(&head).unwrap_err().to_string();
        assert!(err.contains("changed while it was being read"), "{err}");
        assert!(err.contains("manifest.json"), "{err}");
        // What is held is what was read.
        assert_eq!(read(&whole).unwrap(), m.entries);
    }

    #[test]
    fn farm_targets_climb_to_the_root() {
        let p = RelPath::new("etc/ssh/sshd_config.d/00-infrakit.conf").unwrap();
        assert_eq!(
            State::farm_target(&p),
            PathBuf::from(
                "../../../var/lib/infrakit/current/rootfs/etc/ssh/sshd_config.d/00-infrakit.conf"
            )
        );
        let top = RelPath::new("motd").unwrap();
        assert_eq!(
            State::farm_target(&top),
            PathBuf::from("var/lib/infrakit/current/rootfs/motd")
        );
    }
}
