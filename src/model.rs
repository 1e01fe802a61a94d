//! The composed rootfs as data: `RelPath` (a path that cannot escape the
//! root), `Entry` (type, mode, owner, provenance) and `Tree` (a sorted map).
//! Everything that reaches an output is ordered here; nothing here does I/O.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::spool::Spool;

/// A normalised path relative to the rootfs: non-empty, `/`-separated, no
/// leading or trailing `/`, no empty, `.` or `..` components, no NUL.
/// Ordered component by component, so a directory's children come right after
/// it (the order of `tar --sort=name`).
///
/// The string is shared (`Arc`): a release's paths are cloned into plans,
/// sets and the tree's indexes by the tens of thousands, and each clone is a
/// reference, not another copy of the path.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelPath(Arc<str>);

impl RelPath {
    /// Checks and normalises `s`; a leading `/` or `./` is dropped, trailing `/` too.
    pub fn new(s: &str) -> Result<RelPath, String> {
        let trimmed = s.trim_start_matches('/').trim_end_matches('/');
        let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Err(format!("{s:?} names the root itself, not a path inside it"));
        }
        if trimmed.contains('\0') {
            return Err(format!("{s:?} contains a NUL byte"));
        }
        for part in trimmed.split('/') {
            match part {
                "" => return Err(format!("{s:?} has an empty component (`//`)")),
                "." | ".." => return Err(format!("{s:?} has a `{part}` component")),
                _ => {}
            }
        }
        Ok(RelPath(Arc::from(trimmed)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent directory, or `None` at the top level.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(Arc::from(&self.0[..i])))
    }

    /// Every ancestor, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> Vec<RelPath> {
        self.0
            .match_indices('/')
            .map(|(i, _)| RelPath(Arc::from(&self.0[..i])))
            .collect()
    }

    /// Whether this path lies somewhere under `dir`.
    pub fn is_under(&self, dir: &RelPath) -> bool {
        self.0
            .strip_prefix(&*dir.0)
            .is_some_and(|rest| rest.starts_with('/'))
    }

    pub fn depth(&self) -> usize {
        self.0.matches('/').count()
    }
}

impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> Ordering {
        path_order(&self.0, &other.0)
    }
}

/// `RelPath`'s order on the strings: component by component, computed
/// bytewise: `/` sorts below every other byte (no NUL can occur), which is
/// exactly component order.
pub fn path_order(a: &str, b: &str) -> Ordering {
    let key = |b: &u8| if *b == b'/' { 0 } else { *b };
    a.as_bytes()
        .iter()
        .map(key)
        .cmp(b.as_bytes().iter().map(key))
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl serde::Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Deserialising checks the path like `new` does, so a manifest cannot load
/// a path that escapes the root.
impl<'de> serde::Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::trust::digest::deserialize_str(deserializer, "a relative path", |s| {
            let p = RelPath::new(s)?;
            if *p.0 != *s {
                return Err(format!("path {s:?} is not normalised"));
            }
            Ok(p)
        })
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Where a regular file's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The file at the entry's own path under this overlay `root/` directory
    /// (shared by all of the layer's files), read once while the archive is
    /// written.
    Overlay(Arc<Path>),
    /// Bytes made by the build itself (rendered templates, generated files).
    Bytes(Arc<[u8]>),
    /// A file taken from a pinned upstream input (behind a pointer: the
    /// tree holds an entry per file, and most are not inputs).
    Input(Arc<InputFile>),
}

/// A file taken from a pinned upstream input: its exact path (in the input
/// cache) and the input's name, its provenance. `sha256` is the digest the
/// file had when it was checked: the archive writer refuses other bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFile {
    pub path: Arc<Path>,
    pub input: Arc<str>,
    pub sha256: crate::trust::digest::Sha256,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { source: Source, size: u64 },
    Symlink { target: String },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File { .. } => "file",
            Kind::Symlink { .. } => "symlink",
        }
    }
}

/// One path of the composed tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits only (at most 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The layer that provided this entry, as the profile names it (one
    /// shared string per layer).
    pub layer: Arc<str>,
}

pub const DIR_MODE: u32 = 0o755;
pub const FILE_MODE: u32 = 0o644;
pub const EXEC_MODE: u32 = 0o755;
pub const SYMLINK_MODE: u32 = 0o777;

/// The composed rootfs: every path, parents included, in archive order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<RelPath, Entry>,
}

impl Tree {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A tree packed in order: the entries in archive order, each encoded in a
/// few bytes (its path as what it shares with the one before and the rest,
/// numbers as LEB128 varints), each source and layer held once; about 25
/// bytes an entry for a tree of small files, against about 140 in a map.
/// Composition makes one from each layer's walk of `root/` and merges them
/// into the composed tree, consuming each as it goes (`into_entries`); the
/// build writes the archive and the manifest from it. The encoded entries
/// are kept in chunks of 64 KiB, each starting afresh (its first path
/// whole, and kept apart, so a lookup bisects the chunks and reads one:
/// `get`), in a `Spool`: in memory up to its limit, then in a temporary
/// file, so a tree of any size takes a bounded amount of memory.
#[derive(Debug)]
pub struct PackedTree {
    /// The bytes a chunk is made for (an entry larger gets one of its own).
    chunk_bytes: usize,
    /// The full chunks; one entry never straddles two.
    sealed: Spool,
    /// The chunk being filled.
    open: Vec<u8>,
    /// Each chunk's first path (the sealed ones', then the open one's).
    firsts: Vec<Box<str>>,
    len: usize,
    files: usize,
    /// Entries per layer, in `layers`' order.
    per_layer: Vec<usize>,
    sources: Vec<Source>,
    layers: Vec<Arc<str>>,
    /// The last path pushed, and the overlay roots already in `sources`.
    last: String,
    roots: Vec<(Arc<Path>, usize)>,
}

/// The bytes of one chunk of `PackedTree`.
const CHUNK: usize = 64 << 10;

impl Default for PackedTree {
    fn default() -> PackedTree {
        PackedTree::with_chunks(CHUNK)
    }
}

const DIR: u8 = 0;
const FILE: u8 = 1;
const SYMLINK: u8 = 2;

impl PackedTree {
    /// An empty tree of chunks of `bytes`: smaller chunks make `get` read
    /// and scan less, for a tree looked up often.
    pub fn with_chunks(bytes: usize) -> PackedTree {
        PackedTree {
            chunk_bytes: bytes,
            sealed: Spool::default(),
            open: Vec::new(),
            firsts: Vec::new(),
            len: 0,
            files: 0,
            per_layer: Vec::new(),
            sources: Vec::new(),
            layers: Vec::new(),
            last: String::new(),
            roots: Vec::new(),
        }
    }

    /// Packs `tree`, consuming it entry by entry.
    #[cfg(test)]
    pub fn pack(tree: Tree) -> crate::Result<PackedTree> {
        let mut packed = PackedTree::default();
        for (path, entry) in tree.entries {
            packed.push(&path, entry)?;
        }
        Ok(packed)
    }

    /// Appends an entry; `path` sorts after every path pushed before
    /// (`last`). Fails only if a full chunk cannot be spilled.
    pub fn push(&mut self, path: &RelPath, entry: Entry) -> crate::Result<()> {
        debug_assert!(self.len == 0 || path_order(&self.last, path.as_str()).is_lt());
        let layer = match self.layers.iter().position(|l| *l == entry.layer) {
            Some(i) => i,
            None => {
                self.layers.push(entry.layer.clone());
                self.per_layer.push(0);
                self.layers.len() - 1
            }
        };
        let kind = match &entry.kind {
            Kind::Dir => DIR,
            Kind::File { .. } => FILE,
            Kind::Symlink { .. } => SYMLINK,
        };
        // What follows the path.
        let mut rest = Vec::new();
        for n in [entry.mode, entry.uid, entry.gid] {
            put(&mut rest, u64::from(n));
        }
        put(&mut rest, layer as u64);
        let mut file = false;
        match entry.kind {
            Kind::Dir => {}
            Kind::Symlink { target } => put_text(&mut rest, &target),
            Kind::File { source, size } => {
                // An overlay's files share its root: held once. Made bytes
                // and input files are one source each.
                let shared = match &source {
                    Source::Overlay(root) => self
                        .roots
                        .iter()
                        .find(|(r, _)| Arc::ptr_eq(r, root))
                        .map(|&(_, i)| i),
                    Source::Bytes(_) | Source::Input(_) => None,
                };
                let i = match shared {
                    Some(i) => i,
                    None => {
                        if let Source::Overlay(root) = &source {
                            self.roots.push((root.clone(), self.sources.len()));
                        }
                        self.sources.push(source);
                        self.sources.len() - 1
                    }
                };
                put(&mut rest, size);
                put(&mut rest, i as u64);
                file = true;
            }
        }
        let path = path.as_str();
        // What the path shares with the one before, cut at a character.
        let mut shared = path
            .bytes()
            .zip(self.last.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        while !path.is_char_boundary(shared) {
            shared -= 1;
        }
        let head = |shared: usize| {
            let mut buf = vec![kind];
            put(&mut buf, shared as u64);
            put_text(&mut buf, &path[shared..]);
            buf
        };
        let mut buf = head(shared);
        let room = self.open.capacity() - self.open.len();
        if self.firsts.is_empty() || room < buf.len() + rest.len() {
            // A chunk starts with a whole path.
            buf = head(0);
            let next = Vec::with_capacity(self.chunk_bytes.max(buf.len() + rest.len()));
            let full = std::mem::replace(&mut self.open, next);
            if !self.firsts.is_empty() {
                self.sealed.push(full)?;
            }
            self.firsts.push(path.into());
        }
        self.open.extend_from_slice(&buf);
        self.open.extend_from_slice(&rest);
        self.per_layer[layer] += 1;
        self.files += usize::from(file);
        self.len += 1;
        self.last.clear();
        self.last.push_str(path);
        Ok(())
    }

    /// The last path pushed, if any.
    pub fn last(&self) -> Option<&str> {
        (self.len > 0).then_some(self.last.as_str())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of regular files.
    pub fn files(&self) -> usize {
        self.files
    }

    /// The number of entries `layer` provided.
    pub fn entries_of(&self, layer: &str) -> usize {
        match self.layers.iter().position(|l| **l == *layer) {
            Some(i) => self.per_layer[i],
            None => 0,
        }
    }

    /// Chunk `i`: the open one after the sealed ones.
    fn chunk(&self, i: usize) -> crate::Result<std::borrow::Cow<'_, [u8]>> {
        if i < self.sealed.len() {
            self.sealed.read(i)
        } else {
            Ok(std::borrow::Cow::Borrowed(&self.open))
        }
    }

    /// The entry at `path`: the chunks bisected by their first path, then
    /// one chunk read in order (the entries before it skipped, not made).
    pub fn get(&self, path: &RelPath) -> crate::Result<Option<Entry>> {
        let after = self
            .firsts
            .partition_point(|first| path_order(first, path.as_str()).is_le());
        let Some(i) = after.checked_sub(1) else {
            return Ok(None);
        };
        let chunk = self.chunk(i)?;
        let mut at = &chunk[..];
        let mut last = String::new();
        while !at.is_empty() {
            let kind = read_path(&mut at, &mut last).ok_or_else(crate::spool::corrupt)?;
            let keep = match path_order(&last, path.as_str()) {
                Ordering::Less => false,
                Ordering::Equal => true,
                Ordering::Greater => return Ok(None),
            };
            let entry = self
                .read_rest(&mut at, kind, keep)
                .ok_or_else(crate::spool::corrupt)?;
            if keep {
                return Ok(entry);
            }
        }
        Ok(None)
    }

    /// Reads the entry at the front of `at`, its path into `last`. A chunk
    /// comes back from a spill file, so it is checked as it is read.
    fn decode(&self, at: &mut &[u8], last: &mut String) -> crate::Result<Entry> {
        read_path(at, last)
            .and_then(|kind| self.read_rest(at, kind, true))
            .flatten()
            .ok_or_else(crate::spool::corrupt)
    }

    /// Reads what follows an entry's path: the entry, or (not `keep`)
    /// nothing, only checked and passed.
    fn read_rest(&self, at: &mut &[u8], kind: u8, keep: bool) -> Option<Option<Entry>> {
        let mut number = || u32::try_from(get(at)?).ok();
        let (mode, uid, gid) = (number()?, number()?, number()?);
        let layer = self.layers.get(usize::try_from(get(at)?).ok()?)?;
        let kind = match kind {
            DIR => Kind::Dir,
            SYMLINK => {
                let target = get_text(at)?;
                if !keep {
                    return Some(None);
                }
                Kind::Symlink {
                    target: target.to_owned(),
                }
            }
            FILE => {
                let size = get(at)?;
                let source = self.sources.get(usize::try_from(get(at)?).ok()?)?;
                if !keep {
                    return Some(None);
                }
                Kind::File {
                    source: source.clone(),
                    size,
                }
            }
            _ => return None,
        };
        Some(keep.then(|| Entry {
            kind,
            mode,
            uid,
            gid,
            layer: layer.clone(),
        }))
    }

    /// Every entry in archive order, as the map held it (each path and entry
    /// made afresh, its source and layer shared).
    pub fn iter(&self) -> impl Iterator<Item = crate::Result<(RelPath, Entry)>> + '_ {
        let chunks = (0..self.firsts.len()).map(|i| self.chunk(i));
        entries(chunks, move |at, last| self.decode(at, last))
    }

    /// Every entry in archive order, each chunk freed once it is read.
    pub fn into_entries(mut self) -> impl Iterator<Item = crate::Result<(RelPath, Entry)>> {
        let open = std::mem::take(&mut self.open);
        let chunks = std::mem::take(&mut self.sealed)
            .into_chunks()
            .chain((!self.firsts.is_empty()).then_some(Ok(open)))
            .map(|chunk| chunk.map(std::borrow::Cow::Owned));
        entries(chunks, move |at, last| self.decode(at, last))
    }
}

/// The entries `decode` reads from `chunks`, in order; the first error
/// ends them.
fn entries<'c>(
    mut chunks: impl Iterator<Item = crate::Result<std::borrow::Cow<'c, [u8]>>>,
    decode: impl Fn(&mut &[u8], &mut String) -> crate::Result<Entry>,
) -> impl Iterator<Item = crate::Result<(RelPath, Entry)>> {
    let mut chunk = std::borrow::Cow::Borrowed(&[][..]);
    let mut read = 0;
    let mut last = String::new();
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        if read == chunk.len() {
            chunk = match chunks.next()? {
                Ok(c) => c,
                Err(e) => {
                    failed = true;
                    return Some(Err(e));
                }
            };
            read = 0;
        }
        let mut at = &chunk[read..];
        let entry = decode(&mut at, &mut last);
        read = chunk.len() - at.len();
        failed = entry.is_err();
        Some(entry.map(|e| (RelPath(Arc::from(last.as_str())), e)))
    })
}

/// Reads an entry's kind and path (into `last`, which held the path
/// before it).
fn read_path(at: &mut &[u8], last: &mut String) -> Option<u8> {
    let kind = *take(at, 1)?.first()?;
    let shared = usize::try_from(get(at)?).ok()?;
    if !last.is_char_boundary(shared) {
        return None;
    }
    last.truncate(shared);
    last.push_str(get_text(at)?);
    Some(kind)
}

/// Appends `n` as a LEB128 varint.
fn put(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Appends `text`'s length, then its bytes.
fn put_text(buf: &mut Vec<u8>, text: &str) {
    put(buf, text.len() as u64);
    buf.extend_from_slice(text.as_bytes());
}

/// The first `n` bytes of `at`, which moves past them.
fn take<'a>(at: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let head = at.get(..n)?;
    *at = &at[n..];
    Some(head)
}

/// Reads a varint `put` wrote.
fn get(at: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let b = take(at, 1)?[0];
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
    }
    None
}

/// Reads text `put_text` wrote.
fn get_text<'a>(at: &mut &'a [u8]) -> Option<&'a str> {
    let len = usize::try_from(get(at)?).ok()?;
    std::str::from_utf8(take(at, len)?).ok()
}

/// Follows `target` from `link`'s directory, resolving every symlink on the
/// way as the kernel would (relative ones from their own directory, absolute
/// ones from the root); `symlink_at` says which paths are symlinks and to
/// what. Fails if the walk ever rises above the root, or loops. A layer
/// checks its own links with no lookup (lexically); composition checks every
/// link through the whole tree, which catches chains (`up -> .`,
/// `esc -> up/..`) across links and layers.
pub fn resolve_symlink(
    link: &RelPath,
    target: &str,
    symlink_at: impl Fn(&RelPath) -> Option<String>,
) -> Result<(), String> {
    const MAX_HOPS: usize = 40;
    type Parts = std::collections::VecDeque<String>;
    fn push_target(dir: &mut Vec<String>, pending: &mut Parts, target: &str) {
        if target.starts_with('/') {
            dir.clear();
        }
        for part in target.split('/').rev() {
            pending.push_front(part.to_owned());
        }
    }
    let mut dir: Vec<String> = link
        .parent()
        .map(|p| p.as_str().split('/').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut pending = Parts::new();
    push_target(&mut dir, &mut pending, target);
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.as_str() {
            "" | "." => {}
            ".." => {
                if dir.pop().is_none() {
                    return Err("resolves above the root".to_owned());
                }
            }
            name => {
                dir.push(name.to_owned());
                let here = RelPath::new(&dir.join("/"))
                    .map_err(|m| format!("has a bad component: {m}"))?;
                if let Some(next) = symlink_at(&here) {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err("goes through a symlink loop".to_owned());
                    }
                    dir.pop();
                    push_target(&mut dir, &mut pending, &next);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_packed_tree_gives_back_every_entry_in_order() {
        let root: Arc<Path> = Arc::from(Path::new("/overlay/root"));
        let other: Arc<Path> = Arc::from(Path::new("/other/root"));
        let entry = |kind, mode, layer: &str| Entry {
            kind,
            mode,
            uid: mode,
            gid: mode + 1,
            layer: Arc::from(layer),
        };
        let file = |source, size| Kind::File { source, size };
        let input = Arc::new(InputFile {
            path: Arc::from(Path::new("/cache/node")),
            input: Arc::from("node"),
            sha256: crate::trust::digest::Sha256::of(b"node"),
        });
        let mut tree = Tree::default();
        for (path, e) in [
            ("etc", entry(Kind::Dir, 0o755, "base")),
            (
                "etc/a",
                entry(file(Source::Overlay(root.clone()), 3), 0o644, "base"),
            ),
            (
                "etc/b",
                entry(file(Source::Overlay(other.clone()), 0), 0o600, "chain"),
            ),
            (
                "etc/c",
                entry(file(Source::Overlay(root.clone()), 7), 0o640, "base"),
            ),
            (
                "etc/d",
                entry(
                    file(Source::Bytes(Arc::from(&b"made"[..])), 4),
                    0o644,
                    "chain",
                ),
            ),
            (
                "etc/link",
                entry(
                    Kind::Symlink {
                        target: "../usr/bin/node".into(),
                    },
                    0o777,
                    "chain",
                ),
            ),
            (
                "etc/empty-target",
                entry(
                    Kind::Symlink {
                        target: String::new(),
                    },
                    0o777,
                    "base",
                ),
            ),
            (
                "usr/bin/node",
                entry(file(Source::Input(input), 4), 0o755, "chain"),
            ),
            ("zz", entry(Kind::Dir, 0o700, "chain")),
        ] {
            tree.entries.insert(p(path), e);
        }
        let packed = PackedTree::pack(tree.clone()).unwrap();
        let back: Vec<(RelPath, Entry)> = packed.iter().map(Result::unwrap).collect();
        let want: Vec<(RelPath, Entry)> = tree.entries.into_iter().collect();
        assert_eq!(back, want);
        assert_eq!((packed.len(), packed.files()), (9, 5));
        assert_eq!(packed.entries_of("base"), 4);
        assert_eq!(packed.entries_of("chain"), 5);
        assert_eq!(packed.entries_of("none"), 0);
        // Two overlay roots, one made file, one input: four sources.
        assert_eq!(packed.sources.len(), 4);
        assert!(PackedTree::pack(Tree::default()).unwrap().is_empty());
    }

    #[test]
    fn a_packed_tree_spans_chunks_in_order() {
        let root: Arc<Path> = Arc::from(Path::new("/overlay/root"));
        let mut tree = Tree::default();
        // Enough entries, and text, for several chunks of each; a path
        // longer than a chunk, and a link target that does not fit the rest
        // of one.
        let long = "d/".to_owned() + &"x".repeat(CHUNK + 10);
        for i in 0..6000u32 {
            let (path, kind) = match i {
                17 => (long.clone(), Kind::Dir),
                i if i % 7 == 0 => (
                    format!("d/link-{i:05}"),
                    Kind::Symlink {
                        target: "t".repeat(usize::try_from(i).unwrap() % 3000 + 1),
                    },
                ),
                i => (
                    format!("d/some/longer/directory/file-{i:05}"),
                    Kind::File {
                        source: Source::Overlay(root.clone()),
                        size: u64::from(i),
                    },
                ),
            };
            let entry = Entry {
                kind,
                mode: 0o644,
                uid: i,
                gid: i,
                layer: Arc::from("base"),
            };
            tree.entries.insert(p(&path), entry);
        }
        // Paths that share part of a character (`é` and `è` share their
        // first byte), and numbers of every varint length.
        for (path, n) in [
            ("d/é1", u32::MAX),
            ("d/è2", 1 << 21),
            ("d/èè", 127),
            ("e", 128),
        ] {
            let entry = Entry {
                kind: Kind::File {
                    source: Source::Overlay(root.clone()),
                    size: u64::MAX >> u64::from(n % 64),
                },
                mode: 0o7777,
                uid: n,
                gid: n / 3,
                layer: Arc::from("chain"),
            };
            tree.entries.insert(p(path), entry);
        }
        let packed = PackedTree::pack(tree.clone()).unwrap();
        assert!(packed.firsts.len() > 3);
        assert_eq!(packed.len(), 6004);
        assert_eq!(packed.entries_of("chain"), 4);
        assert!(
            packed
                .iter()
                .map(Result::unwrap)
                .eq(tree.entries.into_iter())
        );
    }

    #[test]
    fn a_packed_tree_finds_each_path_and_can_be_read_away() {
        // About 80 bytes each: several chunks.
        let entry = |uid| Entry {
            kind: Kind::Symlink {
                target: format!("{uid:060}"),
            },
            mode: 0o777,
            uid,
            gid: 0,
            layer: Arc::from("base"),
        };
        let mut tree = Tree::default();
        for i in 0..6000u32 {
            tree.entries
                .insert(p(&format!("d{}/e{i:05}", i % 3)), entry(i));
        }
        for d in 0..3 {
            tree.entries.insert(p(&format!("d{d}")), entry(d));
        }
        // Once kept in memory, once with every full chunk in a spill file.
        let fill = |mut packed: PackedTree| {
            for (path, e) in tree.entries.clone() {
                packed.push(&path, e).unwrap();
            }
            packed
        };
        let kept = fill(PackedTree::default());
        let packed = fill(PackedTree {
            sealed: Spool::with_limit(0),
            ..PackedTree::default()
        });
        assert!(!kept.sealed.spilled() && packed.sealed.spilled());
        assert!(
            kept.iter()
                .map(Result::unwrap)
                .eq(packed.iter().map(Result::unwrap))
        );
        assert!(packed.firsts.len() > 3);
        assert_eq!(packed.last(), Some("d2/e05999"));
        // And in chunks of 512 bytes, a few entries each.
        let small = fill(PackedTree::with_chunks(512));
        assert!(small.firsts.len() > 500);
        for (path, e) in &tree.entries {
            assert_eq!(packed.get(path).unwrap().as_ref(), Some(e), "{path}");
            assert_eq!(small.get(path).unwrap().as_ref(), Some(e), "{path}");
        }
        // Before the first, between two, after the last, a prefix.
        for absent in ["a", "d0/e00001", "d0/e", "d1/e040000", "d3", "d2/e05999/x"] {
            assert_eq!(packed.get(&p(absent)).unwrap(), None, "{absent}");
            assert_eq!(small.get(&p(absent)).unwrap(), None, "{absent}");
        }
        assert_eq!(PackedTree::default().get(&p("a")).unwrap(), None);
        assert!(
            packed
                .into_entries()
                .map(Result::unwrap)
                .eq(tree.entries.into_iter())
        );
    }

    #[test]
    fn a_damaged_chunk_is_an_error_not_a_panic() {
        let mut tree = Tree::default();
        for (i, path) in ["a", "a/b", "a/l", "c"].into_iter().enumerate() {
            let kind = match i {
                1 => Kind::File {
                    source: Source::Bytes(Arc::from(&b"x"[..])),
                    size: 1,
                },
                2 => Kind::Symlink { target: "b".into() },
                _ => Kind::Dir,
            };
            let entry = Entry {
                kind,
                mode: 0o755,
                uid: 1000,
                gid: 1000,
                layer: Arc::from("base"),
            };
            tree.entries.insert(p(path), entry);
        }
        let good = PackedTree::pack(tree).unwrap();
        let bytes = good.open.clone();
        let mut refused = 0;
        // Every byte changed, and cut short there: never a panic.
        for at in 0..bytes.len() {
            for damage in [0xff, 0x00, 0x80] {
                let mut bad = PackedTree::pack(Tree::default()).unwrap();
                bad.layers = good.layers.clone();
                bad.sources = good.sources.clone();
                bad.firsts = good.firsts.clone();
                bad.open = bytes.clone();
                bad.open[at] = damage;
                refused += usize::from(bad.iter().any(|e| e.is_err()));
                let _ = bad.get(&p("c"));
                // Cut short: an error, or (at an entry's end) fewer entries.
                bad.open.truncate(at);
                assert!(bad.iter().take_while(Result::is_ok).count() < good.len());
            }
        }
        assert!(refused > bytes.len(), "{refused} of {}", 3 * bytes.len());
    }

    #[test]
    fn normalises_and_rejects() {
        assert_eq!(p("/etc/ssh/").as_str(), "etc/ssh");
        assert_eq!(p("./etc").as_str(), "etc");
        for bad in ["", "/", "a/../b", "..", "a//b", "a/./b", "a\0b"] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn orders_depth_first_like_gnu_tar_sort_name() {
        let mut v = [p("a-b"), p("a/b"), p("a"), p("a/b/c"), p("a.b"), p("b")];
        v.sort();
        let got: Vec<_> = v.iter().map(RelPath::as_str).collect();
        assert_eq!(got, ["a", "a/b", "a/b/c", "a-b", "a.b", "b"]);
    }

    #[test]
    fn bytewise_order_equals_component_order() {
        let names = [
            "a", "a-b", "a/b", "a/b/c", "a.b", "a0", "ab", "a/-", "a/b-c", "b", "a b", "a/b/c/d",
            "é", "a/é",
        ];
        for x in names {
            for y in names {
                let want = x.split('/').cmp(y.split('/'));
                assert_eq!(p(x).cmp(&p(y)), want, "{x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn parents_and_ancestors() {
        assert_eq!(p("a/b/c").parent(), Some(p("a/b")));
        assert_eq!(p("a").parent(), None);
        assert_eq!(p("a/b/c").ancestors(), vec![p("a"), p("a/b")]);
    }

    #[test]
    fn symlink_escape_is_lexical() {
        let stays = |link: &str, target: &str| resolve_symlink(&p(link), target, |_| None).is_ok();
        assert!(stays("etc/localtime", "/usr/share/zoneinfo/UTC"));
        assert!(stays("a/b/link", "../../x"));
        assert!(!stays("a/link", "../../x"));
        assert!(!stays("link", ".."));
        assert!(stays("link", "./x/../y"));
    }
}
