//! `Spool`: bytes kept in order in chunks, in memory up to a limit and past
//! it in an unnamed temporary file (in the temporary directory, `TMPDIR`,
//! as sort(1) spills), read back a chunk at a time. What the build holds for
//! every entry (the packed trees of composition, the files' digests) is
//! kept here, so its memory does not grow with the number of entries.
//!
//! The file is the process's own (`O_TMPFILE`: no name, gone when closed),
//! but it is still read from disk: whoever decodes a chunk checks it.

use crate::error::{Error, Result};
use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The bytes a spool keeps in memory before it spills.
pub const MEMORY: usize = 2 << 20;

#[derive(Debug)]
pub struct Spool {
    chunks: Vec<Stored>,
    /// Bytes of the chunks held in memory, and how many may be.
    memory: usize,
    limit: usize,
    /// The spill file, once there is one, and its length.
    file: Option<File>,
    end: u64,
}

#[derive(Debug)]
enum Stored {
    Memory(Vec<u8>),
    Spilled { at: u64, len: usize },
}

impl Default for Spool {
    fn default() -> Spool {
        Spool::with_limit(MEMORY)
    }
}

impl Spool {
    /// A spool that keeps `limit` bytes in memory.
    pub fn with_limit(limit: usize) -> Spool {
        Spool {
            chunks: Vec::new(),
            memory: 0,
            limit,
            file: None,
            end: 0,
        }
    }

    /// The number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Whether any chunk went to the file.
    #[cfg(test)]
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Appends `chunk`: kept in memory while the limit allows, else written
    /// to the file (made on the first spill).
    pub fn push(&mut self, chunk: Vec<u8>) -> Result<()> {
        if self.memory + chunk.len() <= self.limit {
            self.memory += chunk.len();
            self.chunks.push(Stored::Memory(chunk));
            return Ok(());
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self
                .file
                .insert(tempfile::tempfile().map_err(failed("creating a spill file"))?),
        };
        file.write_all_at(&chunk, self.end)
            .map_err(failed("writing a spill file"))?;
        self.chunks.push(Stored::Spilled {
            at: self.end,
            len: chunk.len(),
        });
        self.end += chunk.len() as u64;
        Ok(())
    }

    /// Chunk `i` (less than `len`): borrowed from memory, or read from the
    /// file.
    pub fn read(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        match &self.chunks[i] {
            Stored::Memory(chunk) => Ok(Cow::Borrowed(chunk)),
            &Stored::Spilled { at, len } => self.read_at(at, len).map(Cow::Owned),
        }
    }

    fn read_at(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.file
            .as_ref()
            .map_or(Ok(()), |f| f.read_exact_at(&mut buf, at))
            .map_err(failed("reading a spill file"))?;
        Ok(buf)
    }

    /// Every chunk in order, each freed (from memory) as it is handed out.
    pub fn into_chunks(self) -> impl Iterator<Item = Result<Vec<u8>>> {
        let Spool { chunks, file, .. } = self;
        let spool = Spool {
            file,
            ..Spool::with_limit(0)
        };
        chunks.into_iter().map(move |stored| match stored {
            Stored::Memory(chunk) => Ok(chunk),
            Stored::Spilled { at, len } => spool.read_at(at, len),
        })
    }
}

/// A list of items kept in order in a `Spool`, one JSON line each, in
/// chunks of `LIST_CHUNK` bytes: what a plan lists for every path of a
/// release, so that its memory does not grow with the release.
pub struct List<T> {
    sealed: Spool,
    /// The chunk being filled (its capacity `LIST_CHUNK`), and the line
    /// being added.
    open: Vec<u8>,
    line: Vec<u8>,
    len: usize,
    item: std::marker::PhantomData<fn() -> T>,
}

/// The bytes of a `List`'s chunk, and those it keeps in memory (a plan has
/// a few lists).
const LIST_CHUNK: usize = 64 << 10;
const LIST_MEMORY: usize = 1 << 20;

impl<T> Default for List<T> {
    fn default() -> List<T> {
        List {
            sealed: Spool::with_limit(LIST_MEMORY),
            open: Vec::new(),
            line: Vec::new(),
            len: 0,
            item: std::marker::PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for List<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("List").field("len", &self.len).finish()
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned> List<T> {
    pub fn push(&mut self, item: &T) -> Result<()> {
        self.line.clear();
        // Serialising a path or a manifest entry cannot fail.
        serde_json::to_writer(&mut self.line, item).map_err(|_| corrupt())?;
        self.line.push(b'\n');
        // A full chunk is sealed before it would grow (a line longer than
        // a chunk has one of its own).
        if !self.open.is_empty() && self.open.len() + self.line.len() > LIST_CHUNK {
            let full = std::mem::replace(&mut self.open, Vec::with_capacity(LIST_CHUNK));
            self.sealed.push(full)?;
        }
        self.open.extend_from_slice(&self.line);
        self.len += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The items in order; one read back damaged is an error.
    pub fn iter(&self) -> impl Iterator<Item = Result<T>> + '_ {
        let chunks = (0..self.sealed.len())
            .map(|i| self.sealed.read(i))
            .chain(std::iter::once(Ok(Cow::Borrowed(&self.open[..]))));
        chunks.flat_map(|chunk| {
            let items: Box<dyn Iterator<Item = Result<T>>> = match chunk {
                Err(e) => Box::new(std::iter::once(Err(e))),
                Ok(chunk) => {
                    let lines: Vec<Result<T>> = chunk
                        .split(|&b| b == b'\n')
                        .filter(|line| !line.is_empty())
                        .map(|line| serde_json::from_slice(line).map_err(|_| corrupt()))
                        .collect();
                    Box::new(lines.into_iter())
                }
            };
            items
        })
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned> serde::Serialize for List<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeSeq};
        let mut seq = s.serialize_seq(Some(self.len))?;
        for item in self.iter() {
            seq.serialize_element(&item.map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

/// An I/O error of the spill file, named by the directory it is in.
fn failed(action: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(&std::env::temp_dir(), action)
}

/// What a chunk read back from a spill file is when it does not decode.
pub fn corrupt() -> Error {
    Error::check(format!(
        "a spill file in {} changed while it was in use; run again",
        std::env::temp_dir().display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_past_the_limit_go_to_the_file_and_come_back() {
        let mut spool = Spool::with_limit(10);
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 4 + usize::from(i)]).collect();
        for c in &chunks {
            spool.push(c.clone()).unwrap();
        }
        // 4 + 5 bytes fit in 10; the rest spilled.
        assert!(spool.spilled());
        assert!(matches!(spool.chunks[1], Stored::Memory(_)));
        assert!(matches!(spool.chunks[2], Stored::Spilled { .. }));
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(&*spool.read(i).unwrap(), &c[..]);
        }
        let back: Vec<Vec<u8>> = spool.into_chunks().map(Result::unwrap).collect();
        assert_eq!(back, chunks);
        assert!(!Spool::default().spilled());
    }

    #[test]
    fn a_list_gives_back_its_items_in_order_past_the_spill() {
        let mut list: List<String> = List::default();
        // Enough lines to fill the memory and spill: each chunk 64 KiB.
        let items: Vec<String> = (0..100_000)
            .map(|i| format!("usr/share/doc/{i:08}/changelog\nx"))
            .collect();
        for item in &items {
            list.push(item).unwrap();
        }
        assert!(list.sealed.spilled());
        assert_eq!(list.len(), items.len());
        let back: Vec<String> = list.iter().map(Result::unwrap).collect();
        assert_eq!(back, items);
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json.as_array().map(Vec::len), Some(items.len()));
        assert!(List::<String>::default().iter().next().is_none());
    }
}
