//! The trusted public keys that `verify`, `apply`, `inspect` and `diff`
//! check signatures with: every `*.pub` in a keyring directory (`--keyring`,
//! `/etc/infrakit/keys` by default), or the key files named with `--key`.
//!
//! A key is only as trustworthy as the file it is read from, so:
//! - the keyring directory and every key file must be owned by root (or by
//!   the user running infrakit, who is trusted anyway) and writable by no
//!   one else: anyone who could write either could make their own key
//!   trusted. A symlinked key file is judged by the file it points to;
//! - two different keys with the same key id are refused as ambiguous. A
//!   minisign signature names only its key's id, so the id alone must say
//!   which key signed: that is the key id `status` and `release.json`
//!   record. (Trying both would let a planted key sign under the genuine
//!   key's id.) The same key present twice counts once.
//!
//! Every problem with the keys is bad input (exit 2): nothing was verified.

use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::trust::sign::PublicKey;

/// Key files larger than this are refused unread (a `.pub` is 2 lines).
const KEY_FILE_MAX: u64 = 64 << 10;

/// Where the trusted keys come from.
#[derive(Clone, Debug)]
pub enum Trusted {
    /// Every `*.pub` in this directory.
    Dir(PathBuf),
    /// Exactly these files.
    Files(Vec<PathBuf>),
}

/// Trusted keys with distinct key ids, each from a file only root (or the
/// running user) can write.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<PublicKey>,
    files: Vec<PathBuf>,
}

impl Keyring {
    pub fn load(trusted: &Trusted) -> Result<Keyring> {
        match trusted {
            Trusted::Dir(dir) => Keyring::from_dir(dir),
            Trusted::Files(files) => Keyring::from_files(files),
        }
    }

    /// Every `*.pub` in `dir`, in name order.
    pub fn from_dir(dir: &Path) -> Result<Keyring> {
        let hint = "install the release public key there as <name>.pub, or give --keyring DIR or --key FILE";
        let meta = match fs::metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::input(dir, format!("no keyring here; {hint}")));
            }
            Err(e) => return Err(Error::io(dir, "reading keyring")(e)),
        };
        if !meta.is_dir() {
            return Err(Error::input(
                dir,
                "is not a directory: a keyring is a directory of *.pub files",
            ));
        }
        check_writers(dir, &meta, "the keyring directory")?;
        let list = fs::read_dir(dir).map_err(Error::io(dir, "reading keyring"))?;
        let mut paths = list
            .map(|i| i.map(|i| i.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::io(dir, "reading keyring"))?;
        paths.retain(|p| p.extension().is_some_and(|e| e == "pub"));
        paths.sort();
        if paths.is_empty() {
            return Err(Error::input(
                dir,
                format!("no trusted keys (*.pub); {hint}"),
            ));
        }
        Keyring::from_files(&paths)
    }

    /// Exactly the key files `paths`.
    pub fn from_files(paths: &[PathBuf]) -> Result<Keyring> {
        let mut ring = Keyring {
            keys: Vec::new(),
            files: Vec::new(),
        };
        for path in paths {
            let key = read_key(path)?;
            match ring.keys.iter().position(|k| k.key_id() == key.key_id()) {
                Some(i) if ring.keys[i] == key => {}
                Some(i) => {
                    return Err(Error::input(
                        path,
                        format!(
                            "has key id {}, like {}, but is a different key: a signature names only \
                             its key id, so the keyring is ambiguous; remove the key you do not trust",
                            key.key_id(),
                            ring.files[i].display()
                        ),
                    ));
                }
                None => {
                    ring.keys.push(key);
                    ring.files.push(path.clone());
                }
            }
        }
        if ring.keys.is_empty() {
            return Err(Error::usage(
                "--key",
                "give at least one trusted public key",
            ));
        }
        Ok(ring)
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }
}

/// Reads one public key, refusing a file (or a symlink's target) that
/// anyone but root or the running user could have written.
fn read_key(path: &Path) -> Result<PublicKey> {
    let link = fs::symlink_metadata(path).map_err(Error::io(path, "reading public key"))?;
    let what = if link.file_type().is_symlink() {
        let target =
            fs::canonicalize(path).map_err(Error::io(path, "following the key's symlink"))?;
        format!("the key file it links to, {},", target.display())
    } else {
        "the key file".to_owned()
    };
    // A fifo or device would block or never end: only regular files.
    let meta = fs::metadata(path).map_err(Error::io(path, "reading public key"))?;
    if !meta.is_file() {
        return Err(Error::input(
            path,
            "is not a regular file; give a minisign .pub file",
        ));
    }
    let file = File::open(path).map_err(Error::io(path, "reading public key"))?;
    // Judge the file actually read, not the path looked at before.
    let meta = file
        .metadata()
        .map_err(Error::io(path, "reading public key"))?;
    check_writers(path, &meta, &what)?;
    let mut text = String::new();
    file.take(KEY_FILE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(Error::io(path, "reading public key"))?;
    if text.len() as u64 > KEY_FILE_MAX {
        return Err(Error::input(
            path,
            format!("is larger than {KEY_FILE_MAX} bytes; give a minisign .pub file"),
        ));
    }
    PublicKey::parse(&text)
        .map_err(|m| Error::input(path, format!("{m}; give a minisign .pub file")))
}

/// Refuses `meta` (of `path`, described as `what`) unless only root or the
/// running user can write it.
fn check_writers(path: &Path, meta: &Metadata, what: &str) -> Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let owner = meta.uid();
    if owner != 0 && owner != me {
        return Err(Error::input(
            path,
            format!(
                "{what} is owned by uid {owner}: a trusted key may be writable by root only \
                 (or by the user running infrakit); chown it to root"
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::input(
            path,
            format!(
                "{what} is writable by its group or by others (mode {mode:04o}): anyone who can \
                 write it could make their own key trusted; chmod go-w it"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::sign::SecretKey;
    use std::os::unix::fs::PermissionsExt;

    fn write_key(dir: &Path, name: &str, key: &PublicKey, mode: u32) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, key.to_file()).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn writable_keys_and_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap().public();
        write_key(dir.path(), "a.pub", &key, 0o644);
        assert_eq!(
            Keyring::from_dir(dir.path()).unwrap().keys(),
            std::slice::from_ref(&key)
        );
        for mode in [0o664, 0o646, 0o666] {
            write_key(dir.path(), "a.pub", &key, mode);
            let err = Keyring::from_dir(dir.path()).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        write_key(dir.path(), "a.pub", &key, 0o644);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = Keyring::from_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("the keyring directory is writable"),
            "{err}"
        );
    }

    #[test]
    fn one_id_for_two_keys_is_ambiguous_and_the_same_key_twice_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap().public();
        let a = write_key(dir.path(), "a.pub", &key, 0o644);
        let b = write_key(dir.path(), "b.pub", &key, 0o644);
        assert_eq!(
            Keyring::from_files(&[a.clone(), b]).unwrap().keys().len(),
            1
        );
        // Same key id, another key: swap the 32 key bytes of the raw key.
        let other = SecretKey::generate().unwrap().public();
        let mut raw = base64_of(&key);
        raw[10..].copy_from_slice(&base64_of(&other)[10..]);
        let forged = PublicKey::parse(&encode(&raw)).unwrap();
        assert_eq!(forged.key_id(), key.key_id());
        let c = write_key(dir.path(), "c.pub", &forged, 0o644);
        let err = Keyring::from_files(&[a, c]).unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }

    fn base64_of(key: &PublicKey) -> Vec<u8> {
        use base64::Engine as _;
        let file = key.to_file();
        let line = file.lines().nth(1).unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(line)
            .unwrap()
    }

    fn encode(raw: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(raw)
    }
}
