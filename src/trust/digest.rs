//! Digests: the `Sha256` value type (hex on the outside) and readers/writers
//! that hash what streams through them. Nothing here knows about files or
//! archives; it must never buffer a whole stream.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// A SHA-256 digest, shown and serialised as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn of(bytes: &[u8]) -> Sha256 {
        Sha256(sha2::Sha256::digest(bytes).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected 64 lowercase hex digits, found {s:?}");
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let (hi, lo) = (digit(bytes[2 * i]), digit(bytes[2 * i + 1]));
            *byte = hi.zip(lo).map(|(h, l)| h << 4 | l).ok_or_else(bad)?;
        }
        Ok(Sha256(out))
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Lowercase hex of any bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// A writer that hashes and counts every byte it passes on.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }

    /// The inner writer, the digest and the number of bytes written.
    pub fn finish(self) -> (W, Sha256, u64) {
        (
            self.inner,
            Sha256(self.hasher.finalize().into()),
            self.count,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }

    /// The digest and count of everything read so far.
    pub fn finish(self) -> (Sha256, u64) {
        (Sha256(self.hasher.finalize().into()), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads `inner` to its end on a thread of its own and hands the bytes over
/// in chunks through a bounded channel: reading (decompression) overlaps
/// with whatever consumes the stream. It only counts: nothing the trust
/// chain needs is left to hash here (`verify::check_entries` compares every
/// byte of the tar stream with what the signed manifest determines).
pub struct ReadAhead {
    /// Chunks; an empty chunk marks the end of the stream.
    chunks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    /// The end, or the reader's error (repeated on every later read).
    done: Option<Result<(), (io::ErrorKind, String)>>,
    reader: Option<std::thread::JoinHandle<u64>>,
}

impl ReadAhead {
    const CHUNK: usize = 256 * 1024;
    const DEPTH: usize = 8;

    pub fn spawn<R: Read + Send + 'static>(inner: R) -> ReadAhead {
        let (tx, rx) = std::sync::mpsc::sync_channel(Self::DEPTH);
        let reader = std::thread::spawn(move || {
            let mut inner = inner;
            let mut count = 0u64;
            loop {
                let mut chunk = vec![0u8; Self::CHUNK];
                let n = match inner.read(&mut chunk) {
                    Ok(0) => {
                        let _ = tx.send(Ok(Vec::new()));
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                };
                chunk.truncate(n);
                count += n as u64;
                if tx.send(Ok(chunk)).is_err() {
                    break; // the consumer gave up
                }
            }
            count
        });
        ReadAhead {
            chunks: rx,
            chunk: Vec::new(),
            pos: 0,
            done: None,
            reader: Some(reader),
        }
    }

    /// The size of everything read, once the stream was read to its end.
    pub fn finish(mut self) -> io::Result<u64> {
        let reader = self.reader.take().expect("finish is called once");
        drop(self);
        reader
            .join()
            .map_err(|_| io::Error::other("the reading thread panicked"))
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match &self.done {
                Some(Ok(())) => return Ok(0),
                Some(Err((kind, msg))) => return Err(io::Error::new(*kind, msg.clone())),
                None => {}
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = Some(Ok(())),
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => self.done = Some(Err((e.kind(), e.to_string()))),
                // Gone without the end marker: the reading thread panicked.
                Err(_) => {
                    self.done = Some(Err((
                        io::ErrorKind::Other,
                        "the reading thread stopped".to_owned(),
                    )))
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_and_round_trip() {
        let d = Sha256::of(b"abc");
        let text = d.to_string();
        assert_eq!(
            text,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(text.parse::<Sha256>(), Ok(d));
    }

    #[test]
    fn rejects_uppercase_and_short_hex() {
        assert!("AB".repeat(32).parse::<Sha256>().is_err());
        assert!("ab".parse::<Sha256>().is_err());
        assert!("+b".repeat(32).parse::<Sha256>().is_err());
        // Regression: a multi-byte character made the slicing panic.
        assert!(
            format!("a\u{e9}{}", "a".repeat(61))
                .parse::<Sha256>()
                .is_err()
        );
    }

    #[test]
    fn streaming_matches_one_shot() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        let (inner, d, n) = w.finish();
        assert_eq!(
            (inner.as_slice(), d, n),
            (&b"abc"[..], Sha256::of(b"abc"), 3)
        );
    }
}
