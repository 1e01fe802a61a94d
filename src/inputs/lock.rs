//! `profiles/<name>.lock`: the digest of every input a profile uses, as
//! `lock` resolved it (docs/inputs.md). TOML, one `[[input]]` per input,
//! sorted by name; the URL is always the upstream one, never a mirror's.
//! Read strictly (unknown keys, duplicates and unsorted entries are errors
//! naming file:line:col) and written atomically (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compose::profile::Profile;
use crate::error::{Error, Result};
use crate::inputs::decl::{Input, Kind};
use crate::trust::digest::Sha256;

/// One input as locked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locked {
    pub name: String,
    pub kind: Kind,
    pub version: String,
    /// The upstream URL (for an image, the reference `registry/repo:tag`).
    pub url: String,
    /// Of the downloaded asset; for an image, of its manifest (list).
    pub sha256: Sha256,
}

impl Locked {
    /// What `input` declares now, if this entry no longer matches it.
    pub fn changed(&self, input: &Input) -> Option<String> {
        let url = input.url();
        if self.kind != input.kind {
            Some(format!("kind {} is now {}", self.kind, input.kind))
        } else if self.version != input.version {
            Some(format!("version {} is now {}", self.version, input.version))
        } else if self.url != url {
            Some(format!("url {} is now {url}", self.url))
        } else {
            None
        }
    }

    /// An image's pinned reference, `registry/repo:tag@sha256:<hex>`.
    pub fn reference(&self) -> String {
        format!("{}@sha256:{}", self.url, self.sha256)
    }
}

/// A whole lock file: entries by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    pub entries: BTreeMap<String, Locked>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    #[serde(default)]
    input: Vec<toml::Spanned<Locked>>,
}

#[derive(Serialize)]
struct LockOut<'a> {
    input: Vec<&'a Locked>,
}

const HEADER: &str =
    "# Written by `infrakit lock`: the sha256 of every upstream input. Do not edit.\n\n";

/// `profiles/<name>.lock` beside the profile file.
pub fn path_for(profile: &Profile) -> PathBuf {
    profile
        .path
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{}.lock", profile.name))
}

impl Lock {
    /// The lock at `path`; an empty lock when there is none.
    pub fn read(path: &Path) -> Result<Lock> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lock::default()),
            Err(e) => return Err(Error::io(path, "reading lock file")(e)),
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::input(path, "lock file is not valid UTF-8"))?;
        Lock::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Lock> {
        let file: LockFile = crate::error::parse_toml(path, text)?;
        let mut entries = BTreeMap::new();
        let mut last: Option<String> = None;
        for spanned in file.input {
            let span = spanned.span();
            let entry = spanned.into_inner();
            let at = |m: String| Error::input_at_offset(path, text, span.start, m);
            if last.as_ref().is_some_and(|l| *l >= entry.name) {
                return Err(at(format!(
                    "entry {:?} is out of order or repeated: a lock is sorted by name; run `infrakit lock` to rewrite it",
                    entry.name
                )));
            }
            last = Some(entry.name.clone());
            entries.insert(entry.name.clone(), entry);
        }
        Ok(Lock { entries })
    }

    /// The file's bytes: a header comment, then the entries sorted by name.
    pub fn render(&self) -> String {
        let out = LockOut {
            input: self.entries.values().collect(),
        };
        let body = toml::to_string(&out).expect("a lock serialises");
        format!("{HEADER}{body}")
    }

    /// Writes the lock to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.render().as_bytes())
    }
}

/// Writes a lock file atomically: a temp file beside it, mode 0644,
/// fsynced, renamed over it, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".infrakit-lock-")
        .tempfile_in(dir)
        .map_err(Error::io(dir, "creating a temporary lock file"))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(Error::io(tmp.path(), "writing lock file"))?;
    let std_perms = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(tmp.path(), std_perms)
        .map_err(Error::io(tmp.path(), "setting the lock file's mode"))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path, "replacing lock file")(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir, "syncing the lock file's directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> Locked {
        Locked {
            name: name.into(),
            kind: Kind::Deb,
            version: "1.0".into(),
            url: format!("https://h/{name}.deb"),
            sha256: Sha256::of(name.as_bytes()),
        }
    }

    #[test]
    fn round_trips_sorted() {
        let mut lock = Lock::default();
        for n in ["zeta", "alpha"] {
            lock.entries.insert(n.into(), entry(n));
        }
        let text = lock.render();
        assert!(text.find("alpha").unwrap() < text.find("zeta").unwrap());
        assert!(text.contains("kind = \"deb\""), "{text}");
        let back = Lock::parse(Path::new("p.lock"), &text).unwrap();
        assert_eq!(back, lock);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        lock.write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(Lock::read(&path).unwrap(), lock);
        assert_eq!(
            Lock::read(&dir.path().join("none.lock")).unwrap(),
            Lock::default()
        );
    }

    #[test]
    fn strict_parsing() {
        let good = Lock {
            entries: [("a".to_owned(), entry("a"))].into(),
        }
        .render();
        let bad_key = good.replace("kind = ", "extra = 1\nkind = ");
        let err = Lock::parse(Path::new("p.lock"), &bad_key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.lock:") && err.contains("unknown field `extra`"),
            "{err}"
        );
        let bad_digest = good.replace("sha256 = \"", "sha256 = \"0");
        let err = Lock::parse(Path::new("p.lock"), &bad_digest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 lowercase hex digits"), "{err}");
        let twice = format!("{good}\n{}", good.replace(HEADER, ""));
        let err = Lock::parse(Path::new("p.lock"), &twice)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of order or repeated"), "{err}");
    }
}
