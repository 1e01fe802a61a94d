//! Directory handles that cannot be led out of their directory. Every path
//! handed to a `Dir` is resolved by the kernel (`openat2`) relative to the
//! handle's descriptor, with one of two policies:
//!
//! - `Resolve::Strict` (InfraKit's own state): no symlink anywhere in the
//!   path, and nothing outside the directory (`RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS`). A planted symlink makes the operation fail with
//!   `ELOOP`; it is never followed.
//! - `Resolve::InRoot` (the live paths of a root): symlinks in parent
//!   directories resolve as if the handle were `/` (`RESOLVE_IN_ROOT`), the
//!   way a chrooted system sees them, so `/lib -> usr/lib` works and
//!   `etc -> /elsewhere` stays inside the root.
//!
//! The last component of a path is never followed: operations act on a link
//! itself (`unlinkat`, `readlinkat`, `renameat`, `AT_SYMLINK_NOFOLLOW`).
//! This module must never take an absolute path or a `..` component from its
//! callers: `RelPath` and release ids guarantee that upstream, and the kernel
//! refuses the rest.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat};

/// How paths below a handle are resolved (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    Strict,
    InRoot,
}

impl Resolve {
    fn flags(self) -> ResolveFlags {
        match self {
            Resolve::Strict => {
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
            }
            Resolve::InRoot => ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        }
    }
}

/// An open directory and the path it was opened as (for messages only).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    resolve: Resolve,
}

/// What is at a path, without following a final symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

/// `lstat` facts of one path.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

impl From<Stat> for Meta {
    fn from(st: Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
        }
    }
}

/// `Ok(None)` for "not found", the value otherwise.
pub fn optional<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The limit of `Dir::read`, for a file read through `take(limit + 1)`:
/// `read` bytes came, more than `limit` is an error.
pub fn within(read: u64, limit: u64) -> io::Result<()> {
    if read > limit {
        return Err(io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(())
}

/// Whether an error means a symlink stood in the way (or resolution would
/// have left the directory).
pub fn is_escape(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::LOOP.raw_os_error()
            || code == rustix::io::Errno::XDEV.raw_os_error()
    )
}

fn split(rel: &Path) -> (Option<&Path>, &OsStr) {
    match (rel.parent(), rel.file_name()) {
        (Some(p), Some(name)) if !p.as_os_str().is_empty() => (Some(p), name),
        _ => (None, rel.as_os_str()),
    }
}

/// The directories holding a run of paths below `base`, each opened as
/// `Dir`'s own operations open a parent (same policy), the last one kept:
/// paths in manifest order mostly share their parent with the one before,
/// so creating a directory's worth of entries resolves it once.
pub struct Parents<'a> {
    base: &'a Dir,
    last: Option<(PathBuf, Dir)>,
}

impl<'a> Parents<'a> {
    pub fn new(base: &'a Dir) -> Parents<'a> {
        Parents { base, last: None }
    }

    /// The handle of `rel`'s parent directory and `rel`'s last component.
    pub fn of<'p>(&mut self, rel: &'p Path) -> io::Result<(&Dir, &'p OsStr)> {
        let (parent, name) = split(rel);
        let Some(parent) = parent else {
            return Ok((self.base, name));
        };
        let kept = match self.last.take() {
            Some((path, dir)) if path == parent => (path, dir),
            _ => {
                let fd = self.base.open_parent(parent)?;
                (parent.to_owned(), self.base.below(parent, fd))
            }
        };
        let (_, dir) = self.last.insert(kept);
        Ok((dir, name))
    }
}

/// A descriptor for a path's parent: the handle itself, or one opened.
enum Parent<'a> {
    This(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl Parent<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Parent::This(fd) => *fd,
            Parent::Opened(fd) => fd.as_fd(),
        }
    }
}

impl Dir {
    /// Opens `path` itself (following symlinks: it is the caller's own
    /// choice of directory) as a handle with policy `resolve`.
    pub fn open(path: &Path, resolve: Resolve) -> io::Result<Dir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
            resolve,
        })
    }

    /// The path this handle was opened as, joined with `rel`: for messages.
    pub fn display(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` under the handle's policy; the caller adds `NOFOLLOW`
    /// for a final component that must not be a link.
    fn open_at(&self, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            &self.fd,
            rel,
            flags | OFlags::CLOEXEC,
            mode,
            self.resolve.flags(),
        )?)
    }

    fn parent(&self, rel: &Path) -> io::Result<(Parent<'_>, OsString)> {
        let (parent, name) = split(rel);
        let parent = match parent {
            None => Parent::This(self.fd.as_fd()),
            Some(p) => Parent::Opened(self.open_parent(p)?),
        };
        Ok((parent, name.to_owned()))
    }

    /// The directory `p` that holds a path's last component (resolved under
    /// the handle's policy, a symlink in it included).
    fn open_parent(&self, p: &Path) -> io::Result<OwnedFd> {
        self.open_at(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
    }

    /// `fd`, a directory opened at `rel` below this handle, as a handle with
    /// the same policy.
    fn below(&self, rel: &Path, fd: OwnedFd) -> Dir {
        Dir {
            fd,
            path: self.path.join(rel),
            resolve: self.resolve,
        }
    }

    /// A subdirectory as a handle with the same policy (never through a
    /// final symlink).
    /// A symlink there fails with `ELOOP` (not `ENOTDIR`), so callers can
    /// say what stood in the way.
    pub fn open_dir(&self, rel: impl AsRef<Path>) -> io::Result<Dir> {
        let rel = rel.as_ref();
        let fd = self
            .open_at(
                rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .map_err(|e| {
                let link = e.kind() == io::ErrorKind::NotADirectory
                    && self.stat(rel).is_ok_and(|m| m.kind == Kind::Symlink);
                if link {
                    io::Error::from(rustix::io::Errno::LOOP)
                } else {
                    e
                }
            })?;
        Ok(self.below(rel, fd))
    }

    /// The same directory with another resolution policy.
    pub fn with_policy(&self, resolve: Resolve) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
            resolve,
        })
    }

    /// Opens a regular file for reading (a symlink or anything else fails).
    pub fn open_file(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        let fd = self.open_at(
            rel.as_ref(),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(file)
    }

    /// A regular file's bytes, at most `limit` of them.
    pub fn read(&self, rel: impl AsRef<Path>, limit: u64) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_file(rel)?
            .take(limit + 1)
            .read_to_end(&mut bytes)?;
        within(bytes.len() as u64, limit)?;
        Ok(bytes)
    }

    /// `lstat` of `rel` (the last component is not followed).
    pub fn stat(&self, rel: impl AsRef<Path>) -> io::Result<Meta> {
        let (parent, name) = self.parent(rel.as_ref())?;
        Ok(rustix::fs::statat(parent.fd(), name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?.into())
    }

    /// The target of the symlink `rel`.
    pub fn read_link(&self, rel: impl AsRef<Path>) -> io::Result<PathBuf> {
        let (parent, name) = self.parent(rel.as_ref())?;
        let target = rustix::fs::readlinkat(parent.fd(), name.as_os_str(), Vec::new())?;
        Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
    }

    pub fn create_dir(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        let (parent, name) = self.parent(rel.as_ref())?;
        rustix::fs::mkdirat(parent.fd(), name.as_os_str(), Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// Creates a new file (never through or over anything) with `mode`.
    pub fn create_file(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<File> {
        let fd = self.open_at(
            rel.as_ref(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Opens (creating it if needed) a regular file for writing, for a lock.
    pub fn open_lock(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        let fd = self.open_at(
            rel.as_ref(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NONBLOCK | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o644),
        )?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(file)
    }

    pub fn symlink(&self, target: impl AsRef<Path>, rel: impl AsRef<Path>) -> io::Result<()> {
        let (parent, name) = self.parent(rel.as_ref())?;
        rustix::fs::symlinkat(target.as_ref(), parent.fd(), name.as_os_str())?;
        Ok(())
    }

    /// Owner of `rel`, not following a final symlink; with `mode`, `rel`
    /// must be a directory, whose owner and then mode (which chown may
    /// clear) are set through a descriptor opened without following links:
    /// a link planted in its place between two calls is never chmodded.
    pub fn set_owner_mode(
        &self,
        rel: impl AsRef<Path>,
        uid: u32,
        gid: u32,
        mode: Option<u32>,
    ) -> io::Result<()> {
        let (uid, gid) = (
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        );
        match mode {
            Some(mode) => {
                let dir = self.open_dir(rel)?;
                rustix::fs::fchown(&dir.fd, uid, gid)?;
                rustix::fs::fchmod(&dir.fd, Mode::from_raw_mode(mode))?;
                Ok(())
            }
            None => {
                let (parent, name) = self.parent(rel.as_ref())?;
                rustix::fs::chownat(
                    parent.fd(),
                    name.as_os_str(),
                    uid,
                    gid,
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
                Ok(())
            }
        }
    }

    /// The mode of the directory `rel`, set through a descriptor opened
    /// without following links (`chmod` by name would follow one).
    pub fn set_mode(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        let dir = self.open_dir(rel)?;
        rustix::fs::fchmod(&dir.fd, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    pub fn remove_file(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (parent, name) = self.parent(rel.as_ref())?;
        rustix::fs::unlinkat(parent.fd(), name.as_os_str(), AtFlags::empty())?;
        Ok(())
    }

    pub fn remove_dir(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (parent, name) = self.parent(rel.as_ref())?;
        rustix::fs::unlinkat(parent.fd(), name.as_os_str(), AtFlags::REMOVEDIR)?;
        Ok(())
    }

    /// Removes `rel` and everything under it without following any symlink;
    /// an absent `rel` is not an error.
    pub fn remove_tree(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let rel = rel.as_ref();
        let meta = match optional(self.stat(rel))? {
            None => return Ok(()),
            Some(m) => m,
        };
        if meta.kind != Kind::Dir {
            return self.remove_file(rel);
        }
        let dir = self.with_policy(Resolve::Strict)?.open_dir(rel)?;
        dir.clear()?;
        self.remove_dir(rel)
    }

    /// Removes everything in this directory (not the directory itself).
    fn clear(&self) -> io::Result<()> {
        for name in self.names()? {
            let meta = self.stat(&name)?;
            if meta.kind == Kind::Dir {
                let sub = self.open_dir(&name)?;
                sub.clear()?;
                self.remove_dir(&name)?;
            } else {
                self.remove_file(&name)?;
            }
        }
        Ok(())
    }

    /// The names in this directory (not `.` and `..`), sorted.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Moves `from` (below this handle) to `to` below `dest`, which must
    /// not exist (`RENAME_NOREPLACE`: nothing is ever overwritten).
    pub fn rename(
        &self,
        from: impl AsRef<Path>,
        dest: &Dir,
        to: impl AsRef<Path>,
    ) -> io::Result<()> {
        let (a, a_name) = self.parent(from.as_ref())?;
        let (b, b_name) = dest.parent(to.as_ref())?;
        rustix::fs::renameat_with(
            a.fd(),
            a_name.as_os_str(),
            b.fd(),
            b_name.as_os_str(),
            RenameFlags::NOREPLACE,
        )?;
        Ok(())
    }

    /// Replaces `to` with `from`, both in this directory (one atomic
    /// `rename`: the switch of `current`).
    pub fn replace(&self, from: &str, to: &str) -> io::Result<()> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to)?;
        Ok(())
    }

    /// Swaps two paths atomically (`RENAME_EXCHANGE`).
    pub fn exchange(&self, a: impl AsRef<Path>, b: impl AsRef<Path>) -> io::Result<()> {
        let (pa, a_name) = self.parent(a.as_ref())?;
        let (pb, b_name) = self.parent(b.as_ref())?;
        rustix::fs::renameat_with(
            pa.fd(),
            a_name.as_os_str(),
            pb.fd(),
            b_name.as_os_str(),
            RenameFlags::EXCHANGE,
        )?;
        Ok(())
    }

    /// Replaces the file `name` (in this directory) with `bytes` atomically
    /// and durably: temp file, fsync, rename, fsync of the directory.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix).map_err(|e| io::Error::other(e.to_string()))?;
        let tmp = format!(".{name}.{}.tmp", crate::trust::digest::hex(&suffix));
        let result = (|| {
            let mut file = self.create_file(&tmp, 0o600)?;
            file.write_all(bytes)?;
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
            file.sync_all()?;
            rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            self.sync()
        })();
        if result.is_err() {
            let _ = self.remove_file(&tmp);
        }
        result
    }

    /// fsyncs the directory, so renames and creations in it are durable.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// Flushes the whole filesystem holding this directory.
    pub fn sync_fs(&self) -> io::Result<()> {
        Ok(rustix::fs::syncfs(&self.fd)?)
    }

    /// Whether the caller may write here (`faccessat(W_OK)`, effective ids).
    pub fn writable(&self) -> bool {
        rustix::fs::accessat(
            &self.fd,
            ".",
            rustix::fs::Access::WRITE_OK,
            AtFlags::EACCESS,
        )
        .is_ok()
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(t.path().join("root/state/sub")).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), b"x").expect("write");
        std::os::unix::fs::symlink(&outside, t.path().join("root/state/out")).expect("symlink");
        std::os::unix::fs::symlink("sub", t.path().join("root/state/rel")).expect("symlink");
        let dir = Dir::open(&t.path().join("root/state"), Resolve::Strict).expect("open");
        (t, dir)
    }

    #[test]
    fn strict_handles_never_follow_a_symlink() {
        let (t, dir) = setup();
        for rel in ["out/secret", "rel", "out", "../outside/secret"] {
            assert!(dir.open_file(rel).is_err(), "{rel} opened");
        }
        assert!(dir.open_dir("rel").is_err());
        assert!(dir.create_dir("out/new", 0o755).is_err());
        assert!(dir.create_dir("rel/new", 0o755).is_err());
        assert!(!t.path().join("outside/new").exists());
        assert!(dir.remove_tree("out").is_ok(), "removes the link itself");
        assert!(t.path().join("outside/secret").exists());
        assert_eq!(dir.stat("rel").expect("lstat").kind, Kind::Symlink);
    }

    #[test]
    fn in_root_handles_keep_absolute_links_inside() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::fs::create_dir(t.path().join("outside")).expect("mkdir");
        // An absolute link that, followed naively, leaves the root.
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("/real", root.join("lib")).expect("symlink");
        let dir = Dir::open(&root, Resolve::InRoot).expect("open");
        assert!(dir.create_dir("abs/new", 0o755).is_err());
        dir.create_dir("lib/new", 0o755)
            .expect("/lib -> /real resolves inside the root");
        assert!(root.join("real/new").is_dir());
        assert!(!t.path().join("outside/new").exists());
    }

    #[test]
    fn modes_are_never_set_through_a_link() {
        let (t, dir) = setup();
        let victim = t.path().join("outside/secret");
        std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let root = Dir::open(&t.path().join("root"), Resolve::InRoot).expect("open");
        std::os::unix::fs::symlink(&victim, t.path().join("root/planted")).expect("symlink");
        assert!(root.set_mode("planted", 0o755).is_err());
        assert!(root.set_owner_mode("planted", 0, 0, Some(0o755)).is_err());
        assert!(dir.set_mode("out", 0o755).is_err());
        let mode = std::fs::metadata(&victim).expect("stat").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn remove_tree_and_atomic_writes() {
        let (t, dir) = setup();
        dir.create_dir("tree", 0o755).expect("mkdir");
        dir.create_dir("tree/a", 0o755).expect("mkdir");
        dir.create_file("tree/a/f", 0o644).expect("create");
        dir.symlink(t.path().join("outside"), "tree/a/l")
            .expect("symlink");
        dir.remove_tree("tree").expect("remove");
        assert!(optional(dir.stat("tree")).expect("stat").is_none());
        assert!(t.path().join("outside/secret").exists());
        dir.write_atomic("rec.json", b"{}", 0o644).expect("write");
        assert_eq!(dir.read("rec.json", 10).expect("read"), b"{}");
        assert_eq!(dir.stat("rec.json").expect("stat").mode, 0o644);
        assert!(dir.read("rec.json", 1).is_err(), "limit");
    }
}
