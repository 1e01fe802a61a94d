//! The deterministic archive: a GNU-format tar stream written from a tree
//! (`PackedTree`)
//! in one pass (each source file read once, hashed as it is copied), wrapped
//! in zstd (multithreaded API, checksum, pledged size) or gzip (fixed header).
//! Never reads the clock: mtime comes in as a parameter. `header` renders a
//! member's header bytes for the writer and for `verify`, which requires the
//! stream to hold exactly them; `decode` reads back exactly one zstd frame or
//! gzip member, as written, and nothing after it.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::thread;

use crate::artifact::prefetch::{self, Prefetch};
use crate::error::{Error, Result};
use crate::model::{Entry, Kind, PackedTree, RelPath, Source};
use crate::spool::Spool;
use crate::trust::digest::{HashingReader, HashingWriter, Sha256};

const BLOCK: u64 = 512;
const COPY_BUF: usize = 256 * 1024;

/// The compressed container around the tar stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    TarZst,
    TarGz,
}

impl Format {
    /// The file extension, without the leading dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::TarZst => "tar.zst",
            Format::TarGz => "tar.gz",
        }
    }

    /// The format whose extension is `s`.
    pub fn parse(s: &str) -> Option<Format> {
        [Format::TarZst, Format::TarGz]
            .into_iter()
            .find(|f| f.extension() == s)
    }

    /// The default compression level.
    pub fn default_level(self) -> i32 {
        match self {
            Format::TarZst => 8,
            Format::TarGz => 6,
        }
    }

    pub fn levels(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Format::TarZst => 1..=22,
            Format::TarGz => 0..=9,
        }
    }
}

/// Called with each regular file's first bytes (at most `Options::head`), as
/// they stream past, so checks need no second read of the file.
pub type Inspect<'a> = dyn FnMut(&RelPath, &Entry, &[u8]) + 'a;

/// How to write the archive.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many leading bytes of each file `inspect` sees.
    pub head: usize,
    pub format: Format,
    pub level: i32,
    /// zstd worker threads (at least 1; the bytes do not depend on it).
    pub workers: u32,
    /// The mtime of every entry (`SOURCE_DATE_EPOCH`).
    pub mtime: u64,
}

/// What writing the archive measured.
#[derive(Debug)]
pub struct Summary {
    pub tar_sha256: Sha256,
    pub tar_size: u64,
    pub sha256: Sha256,
    pub size: u64,
    /// The digest of every regular file, as streamed, in tree order.
    pub files: Digests,
}

/// The digests of the archived files, in order: 32 bytes each, in a
/// `Spool`, so a tree of any size takes a bounded amount of memory.
#[derive(Debug, Default)]
pub struct Digests {
    sealed: Spool,
    /// The chunk being filled.
    open: Vec<u8>,
}

impl Digests {
    /// Digests per chunk: 64 KiB.
    const CHUNK: usize = 2048 * 32;

    pub fn push(&mut self, digest: Sha256) -> Result<()> {
        if self.open.len() == Self::CHUNK {
            let full = std::mem::replace(&mut self.open, Vec::with_capacity(Self::CHUNK));
            self.sealed.push(full)?;
        }
        if self.open.capacity() == 0 {
            self.open.reserve_exact(Self::CHUNK);
        }
        self.open.extend_from_slice(digest.as_bytes());
        Ok(())
    }

    pub fn len(&self) -> usize {
        (self.sealed.len() * Self::CHUNK + self.open.len()) / 32
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every digest, in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Sha256>> + '_ {
        let chunks = (0..self.sealed.len())
            .map(|i| self.sealed.read(i))
            .chain(std::iter::once(Ok(std::borrow::Cow::Borrowed(
                &self.open[..],
            ))));
        chunks.flat_map(|chunk| {
            let digests: Box<dyn Iterator<Item = Result<Sha256>>> = match chunk {
                Ok(chunk) if chunk.len() % 32 == 0 => {
                    let digests: Vec<Sha256> = chunk
                        .as_chunks::<32>()
                        .0
                        .iter()
                        .map(|d| Sha256::from_bytes(*d))
                        .collect();
                    Box::new(digests.into_iter().map(Ok))
                }
                Ok(_) => Box::new(std::iter::once(Err(crate::spool::corrupt()))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
            digests
        })
    }
}

/// Errors while producing the archive stream name the artifact being written.
fn artifact_error(action: &'static str) -> impl FnOnce(io::Error) -> Error {
    Error::io(Path::new("<artifact>"), action)
}

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// The zstd job size for `level`: 3 MiB up to level 8 (the default), which
/// bounds zstd's buffers to a few MiB per worker (its own default, four
/// windows, is 8-16 MiB per job, and several jobs are buffered). 2 MiB jobs
/// need 9 MiB less memory on two workers but leave the workers idle more
/// often (each waits for the oldest job before it gets the next). From level
/// 9 on, zstd's default: there 2 MiB jobs cost more time than the pipeline
/// takes and the match tables dominate memory anyway (docs/benchmarks.md).
/// Fixed either way, so the bytes never depend on the worker count.
fn job_size(level: i32) -> Option<u32> {
    (level <= 8).then_some(3 << 20)
}

/// The exact size of the tar stream for `tree` (needed by zstd's pledged size).
pub fn tar_size(tree: &PackedTree) -> Result<u64> {
    let long = |len: usize| {
        if len > 100 {
            BLOCK + padded(len as u64 + 1)
        } else {
            0
        }
    };
    let mut total = 2 * BLOCK;
    for item in tree.iter() {
        let (path, entry) = item?;
        let name_len = path.as_str().len() + usize::from(entry.kind == Kind::Dir);
        total += BLOCK + long(name_len);
        match &entry.kind {
            Kind::File { size, .. } => total += padded(*size),
            Kind::Symlink { target } => total += long(target.len()),
            Kind::Dir => {}
        }
    }
    Ok(total)
}

/// The sum of all file sizes, for progress reporting.
pub fn content_size(tree: &PackedTree) -> Result<u64> {
    tree.iter()
        .map(|item| match item?.1.kind {
            Kind::File { size, .. } => Ok(size),
            _ => Ok(0),
        })
        .sum()
}

/// Writes `tree` as a compressed tar to `out`, calling `progress` with the
/// number of content bytes copied so far.
pub fn write<W: Write>(
    tree: &PackedTree,
    out: W,
    opts: &Options,
    progress: &dyn Fn(u64),
    inspect: &mut Inspect<'_>,
) -> Result<Summary> {
    let out = HashingWriter::new(out);
    let pledged = tar_size(tree)?;
    let io_err = |e| artifact_error("compressing")(e);
    match opts.format {
        Format::TarZst => {
            let mut enc = zstd::stream::write::Encoder::new(out, opts.level).map_err(io_err)?;
            enc.multithread(opts.workers.max(1)).map_err(io_err)?;
            enc.include_checksum(true).map_err(io_err)?;
            if let Some(size) = job_size(opts.level) {
                enc.set_parameter(zstd::zstd_safe::CParameter::JobSize(size))
                    .map_err(io_err)?;
            }
            enc.include_contentsize(true).map_err(io_err)?;
            enc.set_pledged_src_size(Some(pledged)).map_err(io_err)?;
            let (enc, files, tar_sha256, tar_size) = write_tar(tree, enc, opts, progress, inspect)?;
            let out = enc.finish().map_err(io_err)?;
            finish(out, files, tar_sha256, tar_size)
        }
        Format::TarGz => {
            let level = u32::try_from(opts.level).unwrap_or(6);
            let enc = gzip_builder().write(out, flate2::Compression::new(level));
            let (enc, files, tar_sha256, tar_size) = write_tar(tree, enc, opts, progress, inspect)?;
            let out = enc.finish().map_err(io_err)?;
            finish(out, files, tar_sha256, tar_size)
        }
    }
}

fn finish<W: Write>(
    out: HashingWriter<W>,
    files: Digests,
    tar_sha256: Sha256,
    tar_size: u64,
) -> Result<Summary> {
    let (mut inner, sha256, size) = out.finish();
    inner.flush().map_err(artifact_error("writing"))?;
    Ok(Summary {
        tar_sha256,
        tar_size,
        sha256,
        size,
        files,
    })
}

type TarResult<W> = (W, Digests, Sha256, u64);

fn write_tar<W: Write>(
    tree: &PackedTree,
    out: W,
    opts: &Options,
    progress: &dyn Fn(u64),
    inspect: &mut Inspect<'_>,
) -> Result<TarResult<W>> {
    let mut tar = TarWriter {
        out: HashingWriter::new(out),
        mtime: opts.mtime,
        header: Vec::with_capacity(3 * BLOCK as usize),
    };
    let mut files = Digests::default();
    let mut buf = vec![0u8; COPY_BUF];
    let mut head = Vec::with_capacity(opts.head);
    let mut done = 0u64;
    thread::scope(|scope| {
        let prefetch = Prefetch::start(scope, overlay_files(tree));
        for item in tree.iter() {
            let (path, entry) = item?;
            let (path, entry) = (&path, &entry);
            let werr = |e| artifact_error("writing archive")(e);
            let body = match &entry.kind {
                Kind::Dir => Body::Dir,
                Kind::Symlink { target } => Body::Symlink(target),
                Kind::File { size, .. } => Body::File(*size),
            };
            let member = Header {
                path,
                body,
                mode: entry.mode,
                uid: entry.uid,
                gid: entry.gid,
            };
            tar.header(&member).map_err(werr)?;
            let Kind::File { source, size } = &entry.kind else {
                continue;
            };
            let size = *size;
            let digest = match source {
                Source::Bytes(bytes) => {
                    tar.out.write_all(bytes).map_err(werr)?;
                    inspect(path, entry, &bytes[..bytes.len().min(opts.head)]);
                    Sha256::of(bytes)
                }
                Source::Overlay(_) | Source::Input(_) => {
                    head.clear();
                    let copy = Copy {
                        buf: &mut buf,
                        head: &mut head,
                        head_limit: opts.head,
                        prefetch: &prefetch,
                    };
                    let src = source_path(path, source).expect("a file on disk");
                    let digest = copy_file(&src, size, &mut tar.out, copy, werr)?;
                    if let Source::Input(taken) = source
                        && digest != taken.sha256
                    {
                        return Err(Error::check(format!(
                            "input {}: {} changed since it was checked (sha256 {digest}, was {}); run the build again, and check what writes to the cache",
                            taken.input,
                            src.display(),
                            taken.sha256
                        )));
                    }
                    inspect(path, entry, &head);
                    digest
                }
            };
            tar.pad(size).map_err(werr)?;
            files.push(digest)?;
            done += size;
            progress(done);
        }
        Ok(())
    })?;
    tar.out
        .write_all(&[0u8; END_OF_ARCHIVE])
        .map_err(artifact_error("writing archive"))?;
    let (out, sha, size) = tar.out.finish();
    Ok((out, files, sha, size))
}

/// Where the bytes of the file at `path` lie on disk (`None`: made by the
/// build itself).
pub fn source_path(path: &RelPath, source: &Source) -> Option<PathBuf> {
    match source {
        Source::Overlay(root) => Some(root.join(path.as_str())),
        Source::Input(taken) => Some(taken.path.to_path_buf()),
        Source::Bytes(_) => None,
    }
}

/// The files `write_tar` reads from disk, in the order it reads them.
fn overlay_files(tree: &PackedTree) -> impl Iterator<Item = (PathBuf, u64)> + Send + '_ {
    // Advice only: a chunk that cannot be read ends it (the copy reports it).
    tree.iter()
        .map_while(Result::ok)
        .filter_map(|(path, entry)| match &entry.kind {
            Kind::File { source, size } => source_path(&path, source).map(|p| (p, *size)),
            _ => None,
        })
}

/// Buffers for `copy_file`: the copy buffer, and where the file's first
/// `head_limit` bytes are kept for inspection.
struct Copy<'a> {
    buf: &'a mut [u8],
    head: &'a mut Vec<u8>,
    head_limit: usize,
    /// Told of every chunk copied and of the file's end, to keep reading
    /// ahead.
    prefetch: &'a Prefetch<'a>,
}

/// Copies exactly `size` bytes of `src` into `out`, hashing them and keeping
/// the first bytes; a file that changed size since it was listed is an error.
fn copy_file<W: Write>(
    src: &Path,
    size: u64,
    out: &mut W,
    copy: Copy<'_>,
    werr: impl Fn(io::Error) -> Error,
) -> Result<Sha256> {
    let Copy {
        buf,
        head,
        head_limit,
        prefetch,
    } = copy;
    let file = prefetch::open(src).map_err(Error::io(src, "opening for reading"))?;
    let mut file = HashingReader::new(file);
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
        let n = file
            .read(&mut buf[..want])
            .map_err(Error::io(src, "reading"))?;
        if n == 0 {
            return Err(Error::input(
                src,
                "file shrank while the artifact was being built; build again",
            ));
        }
        if head.len() < head_limit {
            let take = n.min(head_limit - head.len());
            head.extend_from_slice(&buf[..take]);
        }
        out.write_all(&buf[..n]).map_err(&werr)?;
        prefetch.copied(n);
        left -= n as u64;
    }
    if file
        .read(&mut buf[..1])
        .map_err(Error::io(src, "reading"))?
        != 0
    {
        return Err(Error::input(
            src,
            "file grew while the artifact was being built; build again",
        ));
    }
    prefetch.finished_one();
    Ok(file.finish().0)
}

/// The bytes after the last member: two zero blocks, nothing else.
pub const END_OF_ARCHIVE: usize = 2 * BLOCK as usize;

/// One archive member as its header block(s) describe it.
pub struct Header<'a> {
    pub path: &'a RelPath,
    pub body: Body<'a>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What a member is; only a regular file carries data.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Dir,
    /// A regular file of this many bytes.
    File(u64),
    Symlink(&'a str),
}

/// Appends to `out` exactly the header block(s) `write` writes for `member`:
/// a GNU long-name (`L`) record when the name (a directory's with its `/`)
/// is over 100 bytes, a long-link (`K`) record when a symlink's target is,
/// then one GNU header. The only header encoder: `verify` renders the same
/// bytes for each manifest entry and requires the stream to hold them.
pub fn header(out: &mut Vec<u8>, member: &Header<'_>, mtime: u64) {
    let dir_name;
    let name = match member.body {
        Body::Dir => {
            dir_name = format!("{}/", member.path);
            dir_name.as_str()
        }
        _ => member.path.as_str(),
    };
    let (kind, size, link) = match member.body {
        Body::Dir => (tar::EntryType::Directory, 0, None),
        Body::File(size) => (tar::EntryType::Regular, size, None),
        Body::Symlink(target) => (tar::EntryType::Symlink, 0, Some(target)),
    };
    if name.len() > 100 {
        long(out, b'L', name);
    }
    if let Some(target) = link.filter(|t| t.len() > 100) {
        long(out, b'K', target);
    }
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().expect("new_gnu makes a GNU header");
        let n = name.len().min(100);
        gnu.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        if let Some(target) = link {
            let n = target.len().min(100);
            gnu.linkname[..n].copy_from_slice(&target.as_bytes()[..n]);
        }
    }
    h.set_entry_type(kind);
    h.set_mode(member.mode);
    h.set_uid(u64::from(member.uid));
    h.set_gid(u64::from(member.gid));
    h.set_mtime(mtime);
    h.set_size(size);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
}

/// How many bytes `header` appends for a member at `path` with `body`,
/// without making them.
pub fn header_len(path: &str, body: Body<'_>) -> u64 {
    let long = |len: usize| {
        if len > 100 {
            BLOCK + padded(len as u64 + 1)
        } else {
            0
        }
    };
    let name = path.len() + usize::from(matches!(body, Body::Dir));
    let link = match body {
        Body::Symlink(target) => long(target.len()),
        Body::Dir | Body::File(_) => 0,
    };
    BLOCK + long(name) + link
}

/// Appends a GNU long-name (`L`) or long-link (`K`) record for `value`.
fn long(out: &mut Vec<u8>, kind: u8, value: &str) {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().expect("new_gnu makes a GNU header").name[..13]
        .copy_from_slice(b"././@LongLink");
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(value.len() as u64 + 1);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(value.as_bytes());
    out.push(0);
    out.resize(out.len() + padding(value.len() as u64 + 1), 0);
}

/// The zero bytes after `size` bytes of data, up to the next block.
pub fn padding(size: u64) -> usize {
    (padded(size) - size) as usize
}

struct TarWriter<W: Write> {
    out: HashingWriter<W>,
    mtime: u64,
    /// Reused for each member's header block(s).
    header: Vec<u8>,
}

impl<W: Write> TarWriter<W> {
    fn header(&mut self, member: &Header<'_>) -> io::Result<()> {
        self.header.clear();
        header(&mut self.header, member, self.mtime);
        self.out.write_all(&self.header)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        self.out.write_all(&[0u8; BLOCK as usize][..padding(size)])
    }
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The gzip header fields `write` sets: mtime 0, OS byte 255 (unknown).
pub(crate) fn gzip_builder() -> flate2::GzBuilder {
    flate2::GzBuilder::new().mtime(0).operating_system(255)
}

/// Whether `head` starts with the gzip header `write` writes: deflate, no
/// flags (no name, comment, extra field or header CRC), mtime 0, the extra
/// flags flate2 sets for the level (0, 2 for best, 4 for fastest), OS 255.
fn gzip_header_ok(head: &[u8]) -> bool {
    head.len() >= 10
        && head[..8] == [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]
        && matches!(head[8], 0 | 2 | 4)
        && head[9] == 255
}

/// The decompressed tar stream of an artifact. It holds exactly what `write`
/// writes: one zstd frame or one gzip member, and nothing after it (a
/// second frame or member, a skippable frame, trailing bytes are read
/// differently by other tools, so they are errors here).
struct Decoder {
    inner: Inner,
}

enum Inner {
    Zstd(zstd::stream::read::Decoder<'static, BufReader<File>>),
    Gzip(flate2::bufread::GzDecoder<BufReader<File>>),
}

impl Read for Decoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, compressed, what) = match &mut self.inner {
            Inner::Zstd(d) => (d.read(buf)?, d.get_mut(), "zstd frame"),
            Inner::Gzip(d) => (d.read(buf)?, d.get_mut(), "gzip member"),
        };
        if n == 0 && !buf.is_empty() && !compressed.fill_buf()?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("data after the end of the {what} (infrakit writes exactly one)"),
            ));
        }
        Ok(n)
    }
}

/// Wraps the compressed tar `file` (read from `path`) in the decoder its
/// first bytes call for: one zstd frame, or one gzip member with the header
/// `write` writes; either must end the file.
pub fn decode(file: File, path: &Path) -> Result<Box<dyn Read + Send>> {
    let mut reader = BufReader::with_capacity(COPY_BUF, file);
    let head = reader
        .fill_buf()
        .map_err(Error::io(path, "reading artifact"))?;
    let inner = if head.starts_with(&ZSTD_MAGIC) {
        let dec = zstd::stream::read::Decoder::with_buffer(reader)
            .map_err(Error::io(path, "starting zstd decoder"))?;
        Inner::Zstd(dec.single_frame())
    } else if head.starts_with(&[0x1f, 0x8b]) {
        if !gzip_header_ok(head) {
            return Err(Error::check(format!(
                "{}: the gzip header is not the one infrakit writes (no file name, comment or \
                 extra field, mtime 0, OS byte 255)",
                path.display()
            )));
        }
        Inner::Gzip(flate2::bufread::GzDecoder::new(reader))
    } else {
        return Err(Error::check(format!(
            "{} does not start with a zstd frame or a gzip member",
            path.display()
        )));
    };
    Ok(Box::new(Decoder { inner }))
}

/// One member of an archive as its header and content say, trusting
/// neither (`inspect` without a key).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// The member's name, without a directory's trailing `/`.
    pub path: String,
    /// `dir`, `file`, `symlink`, `hardlink`, `char`, `block`, `fifo` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(serialize_with = "octal_mode")]
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn octal_mode<S: serde::Serializer>(mode: &u32, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

/// Every member of the compressed tar `file` (read from `path`), in order,
/// with each regular file's size and SHA-256 as read.
pub fn members(file: File, path: &Path) -> Result<Vec<Member>> {
    let fail = |m: String| Error::check(format!("{}: {m}", path.display()));
    let mut tar = tar::Archive::new(decode(file, path)?);
    let entries = tar
        .entries()
        .map_err(|e| fail(format!("archive unreadable: {e}")))?;
    let mut out = Vec::new();
    for item in entries {
        let entry = item.map_err(|e| fail(format!("archive corrupt: {e}")))?;
        let header = entry.header();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = match header.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Regular => "file",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            _ => "other",
        };
        let field = |r: io::Result<u64>, what: &str| {
            r.map_err(|e| fail(format!("{name}: bad {what} field: {e}")))
        };
        let mode = field(header.mode().map(u64::from), "mode")? as u32;
        let uid = field(header.uid(), "uid")?;
        let gid = field(header.gid(), "gid")?;
        let target = entry
            .link_name_bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let (size, sha256) = if kind == "file" {
            let mut content = HashingReader::new(entry);
            io::copy(&mut content, &mut io::sink())
                .map_err(|e| fail(format!("{name}: reading content: {e}")))?;
            let (digest, n) = content.finish();
            (Some(n), Some(digest))
        } else {
            (None, None)
        };
        out.push(Member {
            path: name.trim_end_matches('/').to_owned(),
            kind,
            mode,
            uid,
            gid,
            size,
            sha256,
            target,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Tree;
    use std::sync::Arc;

    #[test]
    fn digests_come_back_in_order_from_memory_and_from_the_spill_file() {
        for limit in [0, crate::spool::MEMORY] {
            let mut digests = Digests {
                sealed: Spool::with_limit(limit),
                ..Digests::default()
            };
            let all: Vec<Sha256> = (0..5000u32).map(|i| Sha256::of(&i.to_le_bytes())).collect();
            for d in &all {
                digests.push(*d).unwrap();
            }
            assert_eq!(digests.len(), 5000);
            assert_eq!(digests.sealed.spilled(), limit == 0);
            assert!(digests.iter().map(Result::unwrap).eq(all.iter().copied()));
        }
        assert!(Digests::default().iter().next().is_none());
    }

    #[test]
    fn header_len_is_the_length_of_the_header() {
        for n in [1, 98, 99, 100, 101, 510, 511, 512, 513, 2000] {
            let path = RelPath::new(&"p".repeat(n)).expect("path");
            let target = "t".repeat(n);
            for body in [Body::Dir, Body::File(7), Body::Symlink(&target)] {
                let mut out = Vec::new();
                let member = Header {
                    path: &path,
                    body,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                };
                header(&mut out, &member, 0);
                assert_eq!(header_len(path.as_str(), body), out.len() as u64, "{n}");
            }
        }
    }

    /// A tree of one overlay file, `name` under `root`, listed with `size`.
    fn one_file(root: &Path, name: &str, size: u64) -> Tree {
        let mut tree = Tree::default();
        tree.entries.insert(
            RelPath::new(name).expect("valid path"),
            Entry {
                kind: Kind::File {
                    source: Source::Overlay(Arc::from(root)),
                    size,
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
                layer: Arc::from("test"),
            },
        );
        tree
    }

    fn build(tree: &Tree) -> Result<Summary> {
        let opts = Options {
            head: 16,
            format: Format::TarZst,
            level: 1,
            workers: 1,
            mtime: 0,
        };
        let packed = PackedTree::pack(tree.clone()).unwrap();
        write(&packed, io::sink(), &opts, &|_| {}, &mut |_, _, _| {})
    }

    fn message(result: Result<Summary>) -> String {
        result.expect_err("the build must fail").to_string()
    }

    #[test]
    fn an_input_file_whose_bytes_changed_since_its_check_fails_the_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node");
        std::fs::write(&file, b"genuine\n").expect("write");
        let input = |sha256| {
            let mut tree = Tree::default();
            tree.entries.insert(
                RelPath::new("usr/bin/node").expect("valid path"),
                Entry {
                    kind: Kind::File {
                        source: Source::Input(Arc::new(crate::model::InputFile {
                            path: Arc::from(file.as_path()),
                            input: Arc::from("node"),
                            sha256,
                        })),
                        size: 8,
                    },
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    layer: Arc::from("chain"),
                },
            );
            tree
        };
        build(&input(Sha256::of(b"genuine\n"))).expect("the checked bytes build");
        // Same size, other bytes: what a rewrite after the check looks like.
        std::fs::write(&file, b"altered\n").expect("write");
        let m = message(build(&input(Sha256::of(b"genuine\n"))));
        assert!(
            m.contains("input node") && m.contains("changed since it was checked"),
            "{m}"
        );
    }

    /// What `decode` makes of `compressed`: the bytes, or the error.
    fn decoded(compressed: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.tar.zst");
        std::fs::write(&path, compressed).expect("write");
        let file = File::open(&path).expect("open");
        let mut out = Vec::new();
        decode(file, &path)
            .map_err(|e| e.to_string())?
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn refused(compressed: &[u8], needle: &str) {
        let err = decoded(compressed).expect_err("must be refused");
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn decode_takes_exactly_one_zstd_frame() {
        let frame = zstd::stream::encode_all(&b"tar stream"[..], 3).expect("zstd");
        assert_eq!(decoded(&frame).expect("one frame"), b"tar stream");
        let after = "data after the end of the zstd frame";
        refused(&[&frame[..], &frame].concat(), after);
        let skippable = [0x50, 0x2a, 0x4d, 0x18, 1, 0, 0, 0, 0];
        refused(&[&frame[..], &skippable].concat(), after);
        refused(
            &[&skippable[..], &frame].concat(),
            "does not start with a zstd frame",
        );
        refused(&[&frame[..], b"\0"].concat(), after);
        assert!(decoded(&frame[..frame.len() - 1]).is_err(), "a cut frame");
    }

    fn gzip(level: u32, builder: flate2::GzBuilder, data: &[u8]) -> Vec<u8> {
        let mut enc = builder.write(Vec::new(), flate2::Compression::new(level));
        enc.write_all(data).expect("gzip");
        enc.finish().expect("gzip")
    }

    #[test]
    fn decode_takes_exactly_one_gzip_member_with_our_header() {
        // Every level's header (its extra flags differ) is accepted.
        for level in Format::TarGz.levels() {
            let level = u32::try_from(level).expect("gzip levels are positive");
            let member = gzip(level, gzip_builder(), b"tar stream");
            assert_eq!(decoded(&member).expect("our member"), b"tar stream");
        }
        let member = gzip(6, gzip_builder(), b"tar stream");
        let after = "data after the end of the gzip member";
        refused(&[&member[..], &member].concat(), after);
        refused(&[&member[..], b"x"].concat(), after);
        let header = "gzip header is not the one infrakit writes";
        refused(&gzip(6, gzip_builder().filename("a.tar"), b"t"), header);
        refused(&gzip(6, gzip_builder().extra(b"ab".to_vec()), b"t"), header);
        refused(&gzip(6, gzip_builder().comment("c"), b"t"), header);
        refused(&gzip(6, gzip_builder().mtime(1), b"t"), header);
        refused(&gzip(6, gzip_builder().operating_system(3), b"t"), header);
        refused(&member[..9], header);
    }

    #[test]
    fn long_records_only_for_names_and_targets_over_100_bytes() {
        let blocks = |name: &str, body: Body<'_>| {
            let path = RelPath::new(name).expect("valid path");
            let member = Header {
                path: &path,
                body,
                mode: 0o755,
                uid: 1,
                gid: 2,
            };
            let mut out = Vec::new();
            header(&mut out, &member, 7);
            let flags: Vec<u8> = out.chunks(BLOCK as usize).map(|b| b[156]).collect();
            (
                out.len() / BLOCK as usize,
                flags[0],
                *flags.last().expect("a block"),
            )
        };
        let (n99, n100) = ("n".repeat(99), "n".repeat(100));
        assert_eq!(blocks(&n100, Body::File(1)), (1, b'0', b'0'));
        assert_eq!(blocks(&format!("{n100}x"), Body::File(1)), (3, b'L', b'0'));
        assert_eq!(blocks(&n99, Body::Dir), (1, b'5', b'5'));
        assert_eq!(blocks(&n100, Body::Dir), (3, b'L', b'5'));
        assert_eq!(blocks("l", Body::Symlink(&n100)), (1, b'2', b'2'));
        assert_eq!(
            blocks("l", Body::Symlink(&format!("{n100}x"))),
            (3, b'K', b'2')
        );
    }

    #[test]
    fn a_file_that_changed_since_the_walk_fails_the_build() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("f"), b"0123456789").expect("write");
        assert!(build(&one_file(dir.path(), "f", 10)).is_ok());
        let shrank = message(build(&one_file(dir.path(), "f", 11)));
        assert!(shrank.contains("shrank"), "{shrank}");
        let grew = message(build(&one_file(dir.path(), "f", 9)));
        assert!(grew.contains("grew"), "{grew}");
    }

    #[test]
    fn a_file_that_became_a_fifo_fails_the_build_instead_of_hanging() {
        let dir = tempfile::tempdir().expect("temp dir");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("f"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from(0o600),
            0,
        )
        .expect("mkfifo");
        let err = message(build(&one_file(dir.path(), "f", 10)));
        assert!(err.contains("shrank") && err.contains("/f"), "{err}");
    }
}
