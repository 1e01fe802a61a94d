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
}
