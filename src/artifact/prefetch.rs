//! Read-ahead of the source files an archive is about to copy. While the
//! archive copies, a helper thread asks the kernel to start reading what
//! comes next (`posix_fadvise(WILLNEED)`), a few MiB at a time. When the tree
//! is not in the page cache, its many small files then arrive from many reads
//! in flight at once instead of one blocking read after another, and the
//! compressor does not wait on the disk.
//!
//! It is only advice: the helper reads no data, holds at most one file open
//! and ignores its own errors (the copy reports them, with the path). It
//! stays at most `MAX_FILES` files and `MAX_BYTES` bytes ahead of the copy.

use std::fs::{File, OpenOptions};
use std::num::NonZeroU64;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::thread::{self, Scope, ScopedJoinHandle};

use rustix::fs::{Advice, OFlags, fadvise};

/// How many files the advice may run ahead of the copy.
const MAX_FILES: usize = 4096;
/// How many bytes the advice may run ahead of the copy: page cache, not
/// memory the process holds.
const MAX_BYTES: u64 = 64 << 20;
/// The most advised at once, so that a large file is read ahead in steps.
const STEP: u64 = 4 << 20;

/// The copy's side of the read-ahead: it reports what it has copied.
/// Dropping it stops the helper thread.
pub struct Prefetch<'scope> {
    shared: Arc<Shared>,
    /// None when no thread could be started: the copy then goes without.
    helper: Option<ScopedJoinHandle<'scope, ()>>,
}

struct Shared {
    /// How many files the copy has finished.
    files: AtomicUsize,
    /// How many bytes of them it has copied.
    bytes: AtomicU64,
    /// While the helper sleeps on a full window: the counts at which the
    /// copy should wake it (a quarter of both the file and the byte window
    /// free, so that it wakes once per batch and not once per file). At
    /// their maximum: nobody is waiting.
    wake_files: AtomicUsize,
    wake_bytes: AtomicU64,
    stop: AtomicBool,
}

impl<'scope> Prefetch<'scope> {
    /// Starts advising `files` (path and size, in the order they will be
    /// copied) on a thread of `scope`.
    pub fn start<'env, I>(scope: &'scope Scope<'scope, 'env>, files: I) -> Self
    where
        I: Iterator<Item = (PathBuf, u64)> + Send + 'scope,
    {
        let shared = Arc::new(Shared {
            files: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            wake_files: AtomicUsize::new(usize::MAX),
            wake_bytes: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
        });
        let helper = {
            let shared = Arc::clone(&shared);
            // Read-ahead only saves time: a host out of threads (RLIMIT_NPROC,
            // a pids cgroup) still gets its build.
            thread::Builder::new()
                .name("prefetch".into())
                .spawn_scoped(scope, move || advise_ahead(&shared, files))
                .ok()
        };
        Prefetch { shared, helper }
    }

    /// The copy copied `n` more bytes.
    pub fn copied(&self, n: usize) {
        self.shared.bytes.fetch_add(n as u64, SeqCst);
        self.wake_if_due();
    }

    /// The copy finished one more file.
    pub fn finished_one(&self) {
        self.shared.files.fetch_add(1, SeqCst);
        self.wake_if_due();
    }

    fn wake_if_due(&self) {
        let s = &self.shared;
        if s.files.load(SeqCst) >= s.wake_files.load(SeqCst)
            && s.bytes.load(SeqCst) >= s.wake_bytes.load(SeqCst)
        {
            self.unpark();
        }
    }

    fn unpark(&self) {
        if let Some(helper) = &self.helper {
            helper.thread().unpark();
        }
    }
}

impl Drop for Prefetch<'_> {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.unpark();
    }
}

/// What the helper should do with the next piece of advice.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Advise,
    /// The copy got there first.
    Skip,
    Stop,
}

impl Shared {
    /// Waits until the piece of file `index` that ends `end` bytes into the
    /// copy may be advised.
    fn wait(&self, index: usize, end: u64) -> Next {
        loop {
            if self.stop.load(SeqCst) {
                return Next::Stop;
            }
            let (files, bytes) = (self.files.load(SeqCst), self.bytes.load(SeqCst));
            if let Some(next) = next(files, bytes, index, end) {
                return next;
            }
            let wake_files = (index + 1 + MAX_FILES / 4).saturating_sub(MAX_FILES);
            let wake_bytes = (end + MAX_BYTES / 4).saturating_sub(MAX_BYTES);
            self.wake_files.store(wake_files, SeqCst);
            self.wake_bytes.store(wake_bytes, SeqCst);
            // The copy may have passed the marks before it could see them.
            if self.files.load(SeqCst) < wake_files || self.bytes.load(SeqCst) < wake_bytes {
                thread::park();
            }
            self.wake_files.store(usize::MAX, SeqCst);
            self.wake_bytes.store(u64::MAX, SeqCst);
        }
    }
}

/// What to do with the piece of file `index` that ends `end` bytes into the
/// copy, once the copy has finished `files` files and copied `bytes` bytes;
/// `None`: wait, the window is full.
fn next(files: usize, bytes: u64, index: usize, end: u64) -> Option<Next> {
    if index < files || end <= bytes {
        Some(Next::Skip)
    } else if index < files + MAX_FILES && end <= bytes + MAX_BYTES {
        Some(Next::Advise)
    } else {
        None
    }
}

fn advise_ahead(shared: &Shared, files: impl Iterator<Item = (PathBuf, u64)>) {
    // Where the current file starts in the copy.
    let mut start = 0u64;
    for (index, (path, size)) in files.enumerate() {
        // Opened at its first advice; a file that cannot be opened gets none.
        let mut file: Option<std::io::Result<File>> = None;
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(STEP);
            match shared.wait(index, start + offset + len) {
                Next::Stop => return,
                Next::Skip => {}
                Next::Advise => match file.get_or_insert_with(|| open(&path)) {
                    Ok(f) => {
                        let _ = fadvise(f, offset, NonZeroU64::new(len), Advice::WillNeed);
                    }
                    Err(_) => break,
                },
            }
            offset += len;
        }
        start += size;
    }
}

/// Opens a source file for reading without blocking: a path that became a
/// fifo since the walk must not hang the build (reading it then finds no
/// data, and the copy reports that the file shrank).
pub fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn the_window_is_bounded_in_files_and_bytes() {
        const MIB: u64 = 1 << 20;
        // Within the window.
        assert_eq!(next(0, 0, 0, 4 * MIB), Some(Next::Advise));
        assert_eq!(next(10, 0, 10 + MAX_FILES - 1, 1), Some(Next::Advise));
        assert_eq!(next(0, 0, 5, MAX_BYTES), Some(Next::Advise));
        // Too far ahead: in files, in bytes.
        assert_eq!(next(10, 0, 10 + MAX_FILES, 1), None);
        assert_eq!(next(0, MIB, 5, MAX_BYTES + MIB + 1), None);
        // Behind the copy: a finished file, a piece already copied.
        assert_eq!(next(3, 0, 2, 1), Some(Next::Skip));
        assert_eq!(next(0, 8 * MIB, 0, 8 * MIB), Some(Next::Skip));
    }

    #[test]
    fn the_helper_stops_when_the_copy_is_done_with_it() {
        // Many 4 MiB files that do not exist: the helper fills its window
        // (opening fails, the window still counts them) and sleeps; dropping
        // the copy's side must end it, or the scope would never end.
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            thread::scope(|scope| {
                let files =
                    (0..100_000).map(|i| (PathBuf::from(format!("/nonexistent/{i}")), STEP));
                let prefetch = Prefetch::start(scope, files);
                prefetch.copied(1);
                prefetch.finished_one();
                std::thread::sleep(Duration::from_millis(50));
                drop(prefetch);
            });
            tx.send(()).expect("the test waits");
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the helper thread did not stop");
        worker.join().expect("no panic");
    }

    #[test]
    fn a_fifo_opens_without_blocking() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from(0o600),
            0,
        )
        .expect("mkfifo");
        let mut file = open(&fifo).expect("opens at once");
        let mut buf = [0u8; 16];
        // No writer: no data, not a hang.
        assert_eq!(std::io::Read::read(&mut file, &mut buf).expect("reads"), 0);
    }
}
