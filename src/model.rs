//! The composed rootfs as data: `RelPath` (a path that cannot escape the
//! root), `Entry` (type, mode, owner, provenance) and `Tree` (a sorted map).
//! Everything that reaches an output is ordered here; nothing here does I/O.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

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

    pub fn depth(&self) -> usize {
        self.0.matches('/').count()
    }
}

impl Ord for RelPath {
    /// Component by component, computed bytewise: `/` sorts below every
    /// other byte (no NUL can occur), which is exactly component order.
    fn cmp(&self, other: &Self) -> Ordering {
        let key = |b: &u8| if *b == b'/' { 0 } else { *b };
        self.0
            .as_bytes()
            .iter()
            .map(key)
            .cmp(other.0.as_bytes().iter().map(key))
    }
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
        let s = String::deserialize(deserializer)?;
        let p = RelPath::new(&s).map_err(serde::de::Error::custom)?;
        if *p.0 != *s {
            return Err(serde::de::Error::custom(format!(
                "path {s:?} is not normalised"
            )));
        }
        Ok(p)
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

/// Follows `target` from `link`'s directory, resolving every symlink on the
/// way as the kernel would (relative ones from their own directory, absolute
/// ones from the root); `symlink_at` says which paths are symlinks and to
/// what. Fails if the walk ever rises above the root, or loops. A layer
/// checks its own links with no lookup (lexically); composition checks every
/// link through the whole tree, which catches chains (`up -> .`,
/// `esc -> up/..`) across links and layers.
pub fn resolve_symlink<'t>(
    link: &RelPath,
    target: &str,
    symlink_at: impl Fn(&RelPath) -> Option<&'t str>,
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
                    push_target(&mut dir, &mut pending, next);
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
