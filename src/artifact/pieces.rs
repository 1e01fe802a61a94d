//! A manifest read a piece at a time: every byte hashed, each element of its
//! top-level `entries` list handed out on its own, and the rest (the head:
//! the document with `"entries":[]` in place of the list) kept for
//! `Manifest::parse_head`. A large release's manifest then costs one entry's
//! bytes in memory, not the file's and every parsed entry's.
//!
//! The split is exact for any JSON document: strings are followed byte for
//! byte (a `"` ends one unless escaped), so brackets are structure only
//! outside them; the list's elements must be objects separated by single
//! commas, as serde reads a list. Whatever else is wrong is serde's to
//! refuse, in the head or in an element.

use std::fs::File;
use std::io::{self, Read};

use sha2::Digest;

use crate::trust::digest::Sha256;

/// Why a manifest could not be read piece by piece.
#[derive(Debug)]
pub enum PiecesError {
    Io(io::Error),
    /// Larger than the limit given to `Pieces::new`.
    TooLarge(u64),
    Malformed(String),
}

const CHUNK: usize = 64 << 10;
/// One entry's JSON: its path and link target are at most a few KiB each.
const ENTRY_MAX: usize = 1 << 20;
/// Everything but the entries: inputs, layers, services and secret slots.
const HEAD_MAX: usize = 16 << 20;

/// Where the scan is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// In the head (`Pieces::depth` containers deep).
    Head,
    /// Inside the entries list, between elements.
    List(Next),
    /// Inside an element, `depth` containers deep (the element's own
    /// brackets included).
    Element(u32),
}

/// What may come next inside the entries list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Right after `[`: an element or `]`.
    First,
    /// After `,`: an element.
    Element,
    /// After an element: `,` or `]`.
    Separator,
}

/// Reads a manifest from `R` (see the module's documentation).
pub struct Pieces<R> {
    from: R,
    max: u64,
    buf: Box<[u8]>,
    len: usize,
    pos: usize,
    hasher: Option<sha2::Sha256>,
    size: u64,
    head: Vec<u8>,
    entry: Vec<u8>,
    place: Place,
    /// Containers open in the head.
    depth: u32,
    string: bool,
    escaped: bool,
    /// At the head's top level, a key is what comes next.
    key_next: bool,
    /// The top-level key being read, its first bytes (`None` once longer
    /// than `entries`).
    key: Option<Vec<u8>>,
    /// The last top-level key was `entries`; `ready` once its `:` came.
    entries_key: bool,
    ready: bool,
    lists: u32,
    count: u64,
    ended: bool,
}

impl<R: Read> Pieces<R> {
    /// Reads at most `max` bytes (more is `TooLarge`); `hash` says whether
    /// `finish` gives their SHA-256.
    pub fn new(from: R, max: u64, hash: bool) -> Pieces<R> {
        Pieces {
            from,
            max,
            buf: vec![0u8; CHUNK].into_boxed_slice(),
            len: 0,
            pos: 0,
            hasher: hash.then(sha2::Sha256::new),
            size: 0,
            head: Vec::new(),
            entry: Vec::new(),
            place: Place::Head,
            depth: 0,
            string: false,
            escaped: false,
            key_next: false,
            key: None,
            entries_key: false,
            ready: false,
            lists: 0,
            count: 0,
            ended: false,
        }
    }

    /// The next element of the entries list, as JSON bytes; `None` once the
    /// file ended (then `finish`).
    pub fn next_entry(&mut self) -> Result<Option<&[u8]>, PiecesError> {
        self.entry.clear();
        loop {
            if self.pos == self.len && (self.ended || !self.fill()?) {
                self.ended = true;
                return self.at_end().map(|()| None);
            }
            if self.scan()? {
                self.count += 1;
                return Ok(Some(&self.entry));
            }
        }
    }

    /// After an error in the manifest's form: reads (and hashes) the rest
    /// of the file without looking at it, up to the limit.
    pub fn drain(&mut self) -> Result<(), PiecesError> {
        while self.fill()? {}
        self.ended = true;
        Ok(())
    }

    /// After `next_entry` gave `None`: the head, the SHA-256 of every byte
    /// (if hashed), their number and the number of entries.
    pub fn finish(&mut self) -> (Vec<u8>, Option<Sha256>, u64, u64) {
        let digest = self.hasher.take().map(Sha256::finished);
        (
            std::mem::take(&mut self.head),
            digest,
            self.size,
            self.count,
        )
    }

    /// Reads the next chunk; false at the end of the file.
    fn fill(&mut self) -> Result<bool, PiecesError> {
        let n = loop {
            match self.from.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PiecesError::Io(e)),
            }
        };
        self.size += n as u64;
        if self.size > self.max {
            return Err(PiecesError::TooLarge(self.max));
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&self.buf[..n]);
        }
        (self.len, self.pos) = (n, 0);
        Ok(n > 0)
    }

    fn at_end(&self) -> Result<(), PiecesError> {
        match (self.place, self.lists) {
            (Place::Head, 1) => Ok(()),
            (Place::Head, 0) => Err(malformed("the manifest has no entries list")),
            (Place::Head, _) => Err(malformed("the manifest has more than one entries list")),
            _ => Err(malformed(
                "the manifest ends inside its entries list: it is cut short",
            )),
        }
    }

    /// Scans the rest of the chunk, or up to the end of an element (then
    /// true, the element in `entry`), keeping the head's bytes and the
    /// element's as it passes them.
    fn scan(&mut self) -> Result<bool, PiecesError> {
        let mut i = self.pos;
        // The start of the bytes passed but not yet kept.
        let mut mark = i;
        while i < self.len {
            if self.string {
                if self.escaped {
                    self.escaped = false;
                    self.key_byte(self.buf[i]);
                    i += 1;
                    continue;
                }
                // Straight to the next quote or backslash.
                let Some(k) = memchr::memchr2(b'"', b'\\', &self.buf[i..self.len]) else {
                    self.key_bytes(i, self.len);
                    i = self.len;
                    continue;
                };
                self.key_bytes(i, i + k);
                if self.buf[i + k] == b'\\' {
                    self.escaped = true;
                    self.key_byte(b'\\');
                } else {
                    self.string = false;
                    self.end_key();
                }
                i += k + 1;
                continue;
            }
            let b = self.buf[i];
            match self.place {
                Place::Head => {
                    self.head_byte(b);
                    i += 1;
                    if let Place::List(_) = self.place {
                        // The `[` stays in the head; the list does not.
                        self.keep_head(mark, i)?;
                        mark = i;
                    }
                }
                Place::List(next) => {
                    match (b, next) {
                        (b' ' | b'\t' | b'\n' | b'\r', _) => {}
                        (b'{', Next::First | Next::Element) => {
                            self.place = Place::Element(1);
                            mark = i;
                        }
                        (b',', Next::Separator) => self.place = Place::List(Next::Element),
                        (b']', Next::First | Next::Separator) => {
                            // The `]` is the head's again.
                            self.place = Place::Head;
                            mark = i;
                        }
                        _ => {
                            return Err(malformed(
                                "the manifest's entries list must hold objects separated by commas",
                            ));
                        }
                    }
                    i += 1;
                    if let Place::List(_) = self.place {
                        mark = i;
                    }
                }
                Place::Element(depth) => {
                    i += 1;
                    let depth = match b {
                        b'"' => {
                            self.string = true;
                            depth
                        }
                        b'{' | b'[' => depth + 1,
                        b'}' | b']' => depth - 1,
                        _ => depth,
                    };
                    if depth == 0 {
                        self.keep_entry(mark, i)?;
                        self.place = Place::List(Next::Separator);
                        self.pos = i;
                        return Ok(true);
                    }
                    self.place = Place::Element(depth);
                }
            }
        }
        match self.place {
            Place::Head => self.keep_head(mark, i)?,
            Place::Element(_) => self.keep_entry(mark, i)?,
            Place::List(_) => {}
        }
        self.pos = i;
        Ok(false)
    }

    /// One byte of the head, outside strings.
    fn head_byte(&mut self, b: u8) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => return,
            b'"' => {
                self.string = true;
                if self.depth == 1 && self.key_next {
                    self.key = Some(Vec::new());
                    self.key_next = false;
                }
            }
            b'{' | b'[' => {
                if b == b'[' && self.depth == 1 && self.ready {
                    self.lists += 1;
                    self.place = Place::List(Next::First);
                }
                self.depth += 1;
                self.key_next = b == b'{' && self.depth == 1;
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 1 && self.entries_key => {
                self.entries_key = false;
                self.ready = true;
                return;
            }
            b',' if self.depth == 1 => self.key_next = true,
            _ => {}
        }
        self.entries_key = false;
        self.ready = false;
    }

    fn key_bytes(&mut self, from: usize, to: usize) {
        key_push(&mut self.key, &self.buf[from..to]);
    }

    fn key_byte(&mut self, b: u8) {
        key_push(&mut self.key, &[b]);
    }

    fn end_key(&mut self) {
        if let Some(key) = self.key.take() {
            self.entries_key = key == b"entries";
        }
    }

    fn keep_entry(&mut self, from: usize, to: usize) -> Result<(), PiecesError> {
        keep(&mut self.entry, &self.buf[from..to], ENTRY_MAX, "an entry")
    }

    fn keep_head(&mut self, from: usize, to: usize) -> Result<(), PiecesError> {
        keep(
            &mut self.head,
            &self.buf[from..to],
            HEAD_MAX,
            "all but its entries",
        )
    }
}

/// Adds `bytes` to the top-level key being read, if any; a key longer
/// than `entries` is no longer followed.
fn key_push(key: &mut Option<Vec<u8>>, bytes: &[u8]) {
    if let Some(k) = key {
        if k.len() + bytes.len() > b"entries".len() {
            *key = None;
        } else {
            k.extend_from_slice(bytes);
        }
    }
}

/// Appends `bytes` to `to`, which may hold at most `max` (`what` it is).
fn keep(to: &mut Vec<u8>, bytes: &[u8], max: usize, what: &str) -> Result<(), PiecesError> {
    if to.len() + bytes.len() > max {
        return Err(malformed(&format!("{what} is longer than {max} bytes")));
    }
    to.extend_from_slice(bytes);
    Ok(())
}

fn malformed(what: &str) -> PiecesError {
    PiecesError::Malformed(what.to_owned())
}

/// A file read from its start with positioned reads: its own way through
/// the file, whatever else reads it (a clone's offset is shared).
pub struct At {
    file: File,
    offset: u64,
}

impl At {
    pub fn start(file: File) -> At {
        At { file, offset: 0 }
    }
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}
