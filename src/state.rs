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

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Sha256;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::model::RelPath;

/// Where the state lives, relative to the root.
pub const STATE_DIR: &str = "var/lib/infrakit";

/// How a release is named on disk: `<name>-<version>-<first 12 hex digits>`.
pub fn release_id(name: &str, version: &str, sha256: &Sha256) -> String {
    format!("{name}-{version}-{}", &sha256.to_string()[..12])
}

/// What `release.json` records about a retained release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseInfo {
    pub id: String,
    pub name: String,
    pub version: String,
    /// The artifact's sha256.
    pub sha256: Sha256,
    pub key_id: String,
}

/// An activation in progress: written before the first change to the live
/// paths, removed after the last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// `apply` or `rollback`.
    pub action: String,
    pub from: Option<String>,
    pub to: String,
    /// Directories this activation creates on the live paths.
    pub created_dirs: Vec<RelPath>,
    /// Host files moved aside to `backups/<to>/` (`--adopt`).
    pub adopted: Vec<RelPath>,
    /// The activation history once this activation completes.
    pub history: Vec<String>,
    /// Hooks still to run after the switch (on a live root); the journal
    /// stays until they succeeded, so a crash or a failure retries them.
    #[serde(default)]
    pub hooks_after: Vec<Vec<String>>,
    /// Validator units stopped before the switch, started again if the
    /// activation is reverted.
    #[serde(default)]
    pub stopped: Vec<String>,
}

/// The lasting record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Activated releases, oldest first; the last is `current`.
    pub history: Vec<String>,
    /// Directories InfraKit created on the live paths (removed again when no
    /// release has them and they are empty).
    pub created_dirs: BTreeSet<RelPath>,
    /// Host files moved aside by `--adopt`: path → the release whose
    /// `backups/` holds it. Restored when no active release has the path.
    #[serde(default)]
    pub adopted: std::collections::BTreeMap<RelPath, String>,
}

/// A retained release: its info and manifest.
#[derive(Debug)]
pub struct Release {
    pub info: ReleaseInfo,
    pub manifest: Manifest,
}

/// The state directory of one root.
#[derive(Clone, Debug)]
pub struct State {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl State {
    pub fn new(root: &Path) -> State {
        State {
            root: root.to_path_buf(),
            dir: root.join(STATE_DIR),
        }
    }

    pub fn releases(&self) -> PathBuf {
        self.dir.join("releases")
    }

    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }

    pub fn partial_dir(&self, id: &str) -> PathBuf {
        self.releases().join(format!(".{id}.partial"))
    }

    pub fn current_link(&self) -> PathBuf {
        self.dir.join("current")
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }

    pub fn record_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn backup_dir(&self, id: &str) -> PathBuf {
        self.dir.join("backups").join(id)
    }

    /// The live path of `path`.
    pub fn live(&self, path: &RelPath) -> PathBuf {
        self.root.join(path.as_str())
    }

    /// The id `current` points at, if any.
    pub fn current_id(&self) -> Result<Option<String>> {
        let link = self.current_link();
        match fs::read_link(&link) {
            Ok(target) => {
                let id = target
                    .strip_prefix("releases")
                    .ok()
                    .and_then(|p| p.to_str())
                    .filter(|s| !s.is_empty() && !s.contains('/'))
                    .ok_or_else(|| {
                        Error::check(format!(
                            "{}: points at {}, not at a release in releases/",
                            link.display(),
                            target.display()
                        ))
                    })?;
                Ok(Some(id.to_owned()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&link, "reading the current release link")(e)),
        }
    }

    /// A retained release, read back.
    pub fn release(&self, id: &str) -> Result<Release> {
        let dir = self.release_dir(id);
        let info: ReleaseInfo = read_json(&dir.join("release.json"))?;
        let path = dir.join("manifest.json");
        let bytes = fs::read(&path).map_err(Error::io(&path, "reading release manifest"))?;
        let manifest = Manifest::parse(&bytes)
            .map_err(|m| Error::check(format!("{}: {m}", path.display())))?;
        Ok(Release { info, manifest })
    }

    /// The active release, if any.
    pub fn current(&self) -> Result<Option<Release>> {
        self.current_id()?.map(|id| self.release(&id)).transpose()
    }

    pub fn journal(&self) -> Result<Option<Journal>> {
        read_json_if_present(&self.journal_path())
    }

    pub fn record(&self) -> Result<Record> {
        Ok(read_json_if_present(&self.record_path())?.unwrap_or_default())
    }

    /// Creates the state directories (0755 whatever the umask: the release
    /// files must be reachable through the farm links by unprivileged
    /// services).
    pub fn create(&self) -> Result<()> {
        let releases = self.releases();
        let mut missing: Vec<&Path> = releases
            .ancestors()
            .take_while(|d| *d != self.root && d.symlink_metadata().is_err())
            .collect();
        missing.reverse();
        for d in missing {
            match fs::create_dir(d) {
                Ok(()) => set_mode(d, 0o755)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(d, "creating state directory")(e)),
            }
        }
        Ok(())
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Releases being extracted (`releases/.<id>.partial`), left by a crash
    /// if no apply is running.
    pub fn partials(&self) -> Vec<PathBuf> {
        fs::read_dir(self.releases())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ok())
            .filter(|i| i.file_name().to_string_lossy().starts_with('.'))
            .map(|i| i.path())
            .collect()
    }

    /// Waits for an `apply` or `rollback` in progress, for a reader that
    /// must not see it half done; `None` when there is no state yet.
    pub fn lock_shared(&self) -> Result<Option<File>> {
        let path = self.lock_path();
        match File::open(&path) {
            Ok(f) => {
                f.lock_shared().map_err(Error::io(&path, "locking"))?;
                Ok(Some(f))
            }
            Err(_) => Ok(None),
        }
    }

    /// Takes the state lock, waiting for another `apply` to finish.
    pub fn lock(&self) -> Result<File> {
        let path = self.lock_path();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io(&path, "opening lock file"))?;
        file.lock().map_err(Error::io(&path, "locking"))?;
        Ok(file)
    }

    /// Points `current` at `id` atomically (a new symlink renamed over the
    /// old one), then makes the rename durable.
    pub fn switch(&self, id: &str) -> Result<()> {
        let tmp = self.dir.join("current.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(id), &tmp)
            .map_err(Error::io(&tmp, "creating the new current link"))?;
        fs::rename(&tmp, self.current_link()).map_err(Error::io(
            &self.current_link(),
            "switching the current release",
        ))?;
        sync_dir(&self.dir)
    }

    pub fn write_journal(&self, journal: &Journal) -> Result<()> {
        write_json(&self.journal_path(), journal)
    }

    pub fn remove_journal(&self) -> Result<()> {
        let path = self.journal_path();
        fs::remove_file(&path).map_err(Error::io(&path, "removing the journal"))?;
        sync_dir(&self.dir)
    }

    pub fn write_record(&self, record: &Record) -> Result<()> {
        write_json(&self.record_path(), record)
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

    /// Whether the live path of `path` is InfraKit's farm link.
    pub fn is_farm_link(&self, path: &RelPath) -> bool {
        fs::read_link(self.live(path)).is_ok_and(|t| t == State::farm_target(path))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    read_json_if_present(path)?
        .ok_or_else(|| Error::io(path, "reading state")(std::io::ErrorKind::NotFound.into()))
}

/// A state file, or `None` when there is none.
fn read_json_if_present<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "reading state")(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::check(format!(
            "{}: state file is malformed ({e}); see docs/operations.md",
            path.display()
        ))
    })
}

/// A state record as written: pretty JSON and a newline.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("state serialises");
    bytes.push(b'\n');
    bytes
}

/// Writes `value` as JSON to `path` atomically and durably.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &to_json(value), 0o644)
}

/// Replaces `path` with `bytes` (mode `mode`) atomically: temp file in the
/// same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(Error::io(dir, "creating a temp file"))?;
    tmp.write_all(bytes).map_err(Error::io(path, "writing"))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(Error::io(path, "setting permissions"))?;
    tmp.as_file()
        .sync_all()
        .map_err(Error::io(path, "syncing"))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path, "renaming into place")(e.error))?;
    sync_dir(dir)
}

/// Sets `path`'s permission bits (not subject to the umask).
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(Error::io(path, "setting mode"))
}

/// fsyncs a directory, so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir, "syncing directory"))
}

/// Flushes the whole filesystem holding `path` (one `syncfs`, instead of an
/// fsync per extracted file).
pub fn sync_fs(path: &Path) -> Result<()> {
    let dir = File::open(path).map_err(Error::io(path, "opening for sync"))?;
    rustix::fs::syncfs(&dir).map_err(|e| Error::io(path, "syncing the filesystem")(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
