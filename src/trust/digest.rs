//! Digests: the `Sha256` value type (hex on the outside) and readers/writers
//! that hash what streams through them. Nothing here knows about files or
//! archives; it must never buffer a whole stream.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// A SHA-256 digest, shown and serialised as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// The digest of what `hasher` was given.
    pub fn finished(hasher: sha2::Sha256) -> Sha256 {
        Sha256(hasher.finalize().into())
    }

    pub fn of(bytes: &[u8]) -> Sha256 {
        Sha256(sha2::Sha256::digest(bytes).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest whose bytes are `bytes`.
    pub fn from_bytes(bytes: [u8; 32]) -> Sha256 {
        Sha256(bytes)
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
        deserialize_str(deserializer, "64 lowercase hex digits", str::parse)
    }
}

/// Deserialises a string with `parse`, handed the text where the
/// deserialiser holds it (no copy into a `String` first: a manifest has a
/// path, a mode and a digest per entry). `expecting` says what it wants.
pub fn deserialize_str<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Visit<F>(&'static str, F);
    impl<T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'_> for Visit<F> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    deserializer.deserialize_str(Visit(expecting, parse))
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
/// with whatever consumes the stream. A third thread takes the same chunks
/// and sends the SHA-256 of the stretches a layout names (a tar stream's
/// member contents), so hashing runs beside both the decompression and the
/// consumer instead of on the consumer's thread.
pub struct ReadAhead {
    /// Chunks; an empty chunk marks the end of the stream.
    chunks: std::sync::mpsc::Receiver<io::Result<Arc<Vec<u8>>>>,
    chunk: Arc<Vec<u8>>,
    /// Chunks done with go back to the reading thread, which fills them
    /// again (no allocation, and no zeroing, per chunk).
    spent: Recycler,
    pos: usize,
    /// The end, or the reader's error (repeated on every later read).
    done: Option<Result<(), (io::ErrorKind, String)>>,
    reader: Option<std::thread::JoinHandle<u64>>,
}

/// Work for the hashing thread of `ReadAhead::spawn_hashing` to do in
/// steps whenever it waits for the stream, and to finish after it: called
/// until it returns false.
pub type SideJob = Box<dyn FnMut() -> bool + Send>;

/// A stretch of a stream to hash: `skip` bytes after the previous stretch,
/// then `len` bytes hashed.
#[derive(Clone, Copy, Debug)]
pub struct Stretch {
    pub skip: u64,
    pub len: u64,
}

impl ReadAhead {
    const CHUNK: usize = 256 * 1024;
    const DEPTH: usize = 8;

    /// Starts reading `inner`; the SHA-256 of each of `layout`'s stretches
    /// comes through the receiver, in order, once the stream got that far.
    /// The hashing thread does steps of `side` whenever it waits for the
    /// stream, and the rest of it after the stream (or the layout) ended.
    pub fn spawn_hashing<R: Read + Send + 'static>(
        mut inner: R,
        layout: Box<dyn Iterator<Item = Stretch> + Send>,
        mut side: Option<SideJob>,
    ) -> (ReadAhead, std::sync::mpsc::Receiver<Sha256>) {
        let (digests_tx, digests) = std::sync::mpsc::channel();
        let (chunks_tx, chunks) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(Self::DEPTH);
        let (spent_tx, spent) = std::sync::mpsc::channel();
        let hasher_spent = Recycler(spent_tx.clone());
        std::thread::spawn(move || {
            hash_stretches(layout, &chunks, &digests_tx, &hasher_spent, &mut side);
            // The rest of the side job, the stream no longer waiting on
            // this thread.
            drop((chunks, digests_tx));
            if let Some(mut job) = side {
                while job() {}
            }
        });
        let mut hasher = Some(chunks_tx);
        let (tx, rx) = std::sync::mpsc::sync_channel(Self::DEPTH);
        let reader = std::thread::spawn(move || {
            let mut count = 0u64;
            loop {
                let mut chunk = spent.try_recv().unwrap_or_default();
                // Zeroes only what the last fill did not reach (all of a
                // new chunk): chunks are filled whole but for the last.
                chunk.resize(Self::CHUNK, 0);
                let mut n = 0;
                let mut failed = None;
                while n < Self::CHUNK {
                    match inner.read(&mut chunk[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                chunk.truncate(n);
                if n > 0 {
                    count += n as u64;
                    let chunk = Arc::new(chunk);
                    // A hasher that stopped (its layout ended) needs no more.
                    if hasher
                        .as_ref()
                        .is_some_and(|h| h.send(Arc::clone(&chunk)).is_err())
                    {
                        hasher = None;
                    }
                    if tx.send(Ok(chunk)).is_err() {
                        break; // the consumer gave up
                    }
                }
                // A short fill is the end of the stream or its error.
                if let Some(e) = failed {
                    let _ = tx.send(Err(e));
                    break;
                }
                if n < Self::CHUNK {
                    let _ = tx.send(Ok(Arc::new(Vec::new())));
                    break;
                }
            }
            count
        });
        let stream = ReadAhead {
            chunks: rx,
            chunk: Arc::new(Vec::new()),
            spent: Recycler(spent_tx),
            pos: 0,
            done: None,
            reader: Some(reader),
        };
        (stream, digests)
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

/// Where the threads of `ReadAhead` give back the chunks they are done
/// with: the last one to let go of a chunk returns it to the reading thread.
struct Recycler(std::sync::mpsc::Sender<Vec<u8>>);

impl Recycler {
    fn give_back(&self, chunk: Arc<Vec<u8>>) {
        if let Ok(chunk) = Arc::try_unwrap(chunk)
            && chunk.capacity() > 0
        {
            // The reading thread may be gone (the stream ended): then the
            // chunk is simply freed.
            let _ = self.0.send(chunk);
        }
    }
}

/// The hashing thread of `ReadAhead::spawn_hashing`: walks `layout` over
/// the chunks and sends each stretch's digest when its last byte (or, for
/// an empty stretch, its start) has come. It stops when the layout or the
/// chunks end; a stream shorter than the layout leaves digests unsent.
/// While `side` is there, a step of it is done whenever no chunk is
/// waiting (it is set to `None` once it says it is done).
fn hash_stretches(
    mut stretches: Box<dyn Iterator<Item = Stretch> + Send>,
    chunks: &std::sync::mpsc::Receiver<Arc<Vec<u8>>>,
    digests: &std::sync::mpsc::Sender<Sha256>,
    spent: &Recycler,
    side: &mut Option<SideJob>,
) {
    let Some(mut at) = stretches.next() else {
        return;
    };
    let mut hasher = sha2::Sha256::new();
    let mut chunk: Arc<Vec<u8>> = Arc::new(Vec::new());
    let mut pos = 0usize;
    loop {
        if at.skip == 0 && at.len == 0 {
            let digest = Sha256(std::mem::take(&mut hasher).finalize().into());
            if digests.send(digest).is_err() {
                return;
            }
            match stretches.next() {
                Some(next) => at = next,
                None => return,
            }
            continue;
        }
        if pos == chunk.len() {
            let next = match side {
                None => chunks.recv().ok(),
                Some(job) => match chunks.try_recv() {
                    Ok(next) => Some(next),
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        if !job() {
                            *side = None;
                        }
                        continue;
                    }
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                },
            };
            let Some(next) = next else { return };
            spent.give_back(std::mem::replace(&mut chunk, next));
            pos = 0;
            continue;
        }
        let rest = &chunk[pos..];
        if at.skip > 0 {
            let n = rest
                .len()
                .min(usize::try_from(at.skip).unwrap_or(usize::MAX));
            at.skip -= n as u64;
            pos += n;
        } else {
            let n = rest
                .len()
                .min(usize::try_from(at.len).unwrap_or(usize::MAX));
            hasher.update(&rest[..n]);
            at.len -= n as u64;
            pos += n;
        }
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
                    self.spent
                        .give_back(std::mem::replace(&mut self.chunk, chunk));
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
    fn read_ahead_delivers_the_stream_and_the_stretches_digests() {
        // Reads of at most 7 bytes: chunks are filled from many reads.
        struct Trickle(io::Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7);
                self.0.read(&mut buf[..n])
            }
        }
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let layout = vec![
            Stretch {
                skip: 10,
                len: 300_000,
            },
            Stretch { skip: 0, len: 0 },
            Stretch {
                skip: 5,
                len: 399_985,
            },
        ];
        // A side job of 1000 steps, finished whatever the stream did.
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut steps = 0u32;
        let side: SideJob = Box::new(move || {
            steps += 1;
            if steps == 1000 {
                done_tx.send(steps).unwrap();
            }
            steps < 1000
        });
        let (mut stream, digests) = ReadAhead::spawn_hashing(
            Trickle(io::Cursor::new(data.clone())),
            Box::new(layout.into_iter()),
            Some(side),
        );
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        assert_eq!(stream.finish().unwrap(), data.len() as u64);
        let digests: Vec<Sha256> = digests.iter().collect();
        assert_eq!(
            digests,
            [
                Sha256::of(&data[10..300_010]),
                Sha256::of(b""),
                Sha256::of(&data[300_015..]),
            ]
        );
        assert_eq!(done.recv().unwrap(), 1000);

        // A stream that ends before its layout: the job still finishes.
        let (done_tx, done) = std::sync::mpsc::channel();
        let side: SideJob = Box::new(move || {
            done_tx.send(()).unwrap();
            false
        });
        let (mut stream, _digests) = ReadAhead::spawn_hashing(
            io::Cursor::new(vec![1u8; 10]),
            Box::new(std::iter::once(Stretch {
                skip: 0,
                len: 1 << 20,
            })),
            Some(side),
        );
        io::copy(&mut stream, &mut io::sink()).unwrap();
        done.recv().unwrap();
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
