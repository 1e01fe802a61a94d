//! Composition: layers, lowest first, into one `Tree`. Strict: a path from
//! two layers is an error unless the upper one says `replace`; a file/dir type
//! clash, or an entry under a non-directory, is always an error. Every entry
//! keeps the layer it came from.
//!
//! Its inputs are the submodules: profiles, overlays, adapters and their
//! parameters, and what is generated from them (sysusers/tmpfiles text,
//! hardened units, the firewall).

pub mod adapter;
pub mod firewall;
pub mod generate;
pub mod overlay;
pub mod params;
pub mod profile;
pub mod units;

use crate::error::{Error, Result};
use crate::model::{Entry, Kind, PackedTree, RelPath, Source};
use overlay::Layer;
use std::cmp::Ordering;
use std::sync::Arc;

/// Where a composition error is reported: the profile that asked for it.
/// Takes the layers by value: each is merged with the tree of the layers
/// below it, both read in order and consumed as the merge goes (`PackedTree`
/// frees each chunk once read), so no two of them are whole in memory and
/// no map of the tree is ever built.
pub fn compose(profile: &std::path::Path, layers: Vec<Layer>) -> Result<PackedTree> {
    let fail = |msg: String| Error::input(profile, msg);
    let ports: Vec<_> = layers
        .iter()
        .flat_map(|l| l.ports.iter().cloned())
        .collect();
    let port_owner = layers
        .iter()
        .rev()
        .find(|l| !l.ports.is_empty())
        .map(|l| Arc::clone(&l.name));
    let mut tree = PackedTree::default();
    for layer in layers {
        // Check every removal against the lower layers first, so a removal
        // of a directory and of a path inside it are both valid.
        for (path, at) in &layer.remove {
            if tree.get(path)?.is_none() {
                return Err(Error::Input {
                    location: at.clone(),
                    message: format!(
                        "remove names {path}, but no lower layer provides it; remove it from remove"
                    ),
                });
            }
        }
        tree = merge(profile, tree, layer)?;
    }
    if let Some(owner) = port_owner {
        tree = add_firewall(profile, &ports, owner, tree)?;
    }
    // Every link resolved through the whole tree: only links are looked up,
    // so they are packed apart, in small chunks (each lookup reads and scans
    // one).
    let mut links = PackedTree::with_chunks(4 << 10);
    for item in tree.iter() {
        let (path, entry) = item?;
        if matches!(entry.kind, Kind::Symlink { .. }) {
            links.push(&path, entry)?;
        }
    }
    // A lookup that fails is kept, and reported before the link's verdict.
    let lost = std::cell::RefCell::new(None);
    let link_at = |p: &RelPath| match links.get(p) {
        Ok(Some(Entry {
            kind: Kind::Symlink { target },
            ..
        })) => Some(target),
        Ok(_) => None,
        Err(e) => {
            lost.borrow_mut().get_or_insert(e);
            None
        }
    };
    for item in links.iter() {
        let (path, entry) = item?;
        let verdict = match &entry.kind {
            Kind::Symlink { target } => crate::model::resolve_symlink(&path, target, link_at),
            _ => Ok(()),
        };
        if let Some(e) = lost.borrow_mut().take() {
            return Err(e);
        }
        if let (Err(why), Kind::Symlink { target }) = (verdict, &entry.kind) {
            return Err(fail(format!(
                "symlink {path} -> {target} (layer {:?}) {why}; point it inside the tree",
                entry.layer
            )));
        }
    }
    // Every parent a directory: in order, the entries above the current
    // one are a stack.
    let mut open: Vec<(RelPath, Entry)> = Vec::new();
    for item in tree.iter() {
        let (path, entry) = item?;
        while open.last().is_some_and(|(dir, _)| !path.is_under(dir)) {
            open.pop();
        }
        if let Some(parent) = path.parent() {
            match open.last() {
                Some((p, e)) if *p == parent && e.kind == Kind::Dir => {}
                Some((p, e)) if *p == parent => {
                    return Err(fail(format!(
                        "{path} (layer {:?}) lies under {parent}, which layer {:?} makes a {}",
                        entry.layer,
                        e.layer,
                        e.kind.name()
                    )));
                }
                _ => {
                    return Err(fail(format!(
                        "{path} (layer {:?}) has no parent directory {parent}",
                        entry.layer
                    )));
                }
            }
        }
        open.push((path, entry));
    }
    Ok(tree)
}

/// `layer` over `tree`: the layer's removals taken out, its paths added,
/// a path both have decided by the layer's `replace` and `explicit`.
fn merge(profile: &std::path::Path, tree: PackedTree, mut layer: Layer) -> Result<PackedTree> {
    let fail = |msg: String| Error::input(profile, msg);
    let name = Arc::clone(&layer.name);
    let replace = std::mem::take(&mut layer.replace);
    let explicit = std::mem::take(&mut layer.explicit);
    let remove = std::mem::take(&mut layer.remove);
    // Both sorted: a removed path's subtree follows it at once.
    let mut removes = remove.keys().peekable();
    let mut cut: Option<RelPath> = None;
    let mut lower = tree.into_entries().filter(|item| {
        let Ok((path, _)) = item else {
            return true;
        };
        if cut.as_ref().is_some_and(|c| path == c || path.is_under(c)) {
            return false;
        }
        while removes.next_if(|r| *r < path).is_some() {}
        if removes.next_if(|r| *r == path).is_some() {
            cut = Some(path.clone());
            return false;
        }
        true
    });
    let mut upper = layer.into_entries();
    let mut low = lower.next().transpose()?;
    let mut up = upper.next().transpose()?;
    let mut out = PackedTree::default();
    loop {
        let order = match (&low, &up) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((l, _)), Some((u, _))) => l.cmp(u),
        };
        let (lower_entry, upper_entry) = match order {
            Ordering::Less => (low.take(), None),
            Ordering::Greater => (None, up.take()),
            Ordering::Equal => (low.take(), up.take()),
        };
        if lower_entry.is_some() {
            low = lower.next().transpose()?;
        }
        if upper_entry.is_some() {
            up = upper.next().transpose()?;
        }
        let (path, entry) = match (lower_entry, upper_entry) {
            (Some(lower), None) => lower,
            (None, Some((path, upper))) => {
                if let Some(at) = replace.get(&path) {
                    return Err(Error::Input {
                        location: at.clone(),
                        message: format!(
                            "replace names {path}, but no lower layer provides it; remove it from replace"
                        ),
                    });
                }
                (path, upper)
            }
            (Some((path, lower)), Some((_, upper))) => {
                let replaces = replace.contains_key(&path);
                let both_dirs = lower.kind == Kind::Dir && upper.kind == Kind::Dir;
                if (lower.kind == Kind::Dir) != (upper.kind == Kind::Dir) {
                    return Err(fail(format!(
                        "type clash at {path}: layer {:?} has a {}, layer {:?} a {}",
                        lower.layer,
                        lower.kind.name(),
                        name,
                        upper.kind.name()
                    )));
                }
                if both_dirs {
                    let same =
                        (lower.mode, lower.uid, lower.gid) == (upper.mode, upper.uid, upper.gid);
                    if same || !explicit.contains(&path) {
                        out.push(&path, lower)?;
                        continue;
                    }
                    if !replaces {
                        return Err(fail(format!(
                            "conflict at directory {path}: layer {:?} gives {:04o} {}:{}, layer {:?} gives {:04o} {}:{}; \
                             add it to `replace` in {:?}'s overlay.toml (adapter.toml for an adapter) if the upper layer should win",
                            lower.layer,
                            lower.mode,
                            lower.uid,
                            lower.gid,
                            name,
                            upper.mode,
                            upper.uid,
                            upper.gid,
                            name
                        )));
                    }
                } else if !replaces {
                    return Err(fail(format!(
                        "conflict at {path}: provided by layer {:?} and layer {:?}; \
                         add it to `replace` in {:?}'s overlay.toml (adapter.toml for an adapter) if the upper layer should win",
                        lower.layer, name, name
                    )));
                }
                (path, upper)
            }
            (None, None) => break,
        };
        out.push(&path, entry)?;
    }
    Ok(out)
}

/// Where the generated nftables ruleset goes.
pub const FIREWALL_PATH: &str = "etc/infrakit/firewall.nft";

/// Renders the ports of all layers into one ruleset, attributed to `owner`,
/// the topmost layer that declares ports, and adds it to `tree` (with the
/// parent directories it lacks).
fn add_firewall(
    profile: &std::path::Path,
    ports: &[firewall::Port],
    owner: Arc<str>,
    tree: PackedTree,
) -> Result<PackedTree> {
    let merged = firewall::merge(ports).map_err(|m| Error::input(profile, m))?;
    let text = firewall::render(&merged);
    let path = RelPath::new(FIREWALL_PATH).expect("a valid constant path");
    if let Some(e) = tree.get(&path)? {
        return Err(Error::input(
            profile,
            format!(
                "{path} is generated from the declared ports, but layer {:?} provides it too; remove it",
                e.layer
            ),
        ));
    }
    let mut layer = Layer::empty(Arc::clone(&owner));
    for parent in path.ancestors() {
        if tree.get(&parent)?.is_none() {
            let dir = Entry {
                kind: Kind::Dir,
                mode: crate::model::DIR_MODE,
                uid: 0,
                gid: 0,
                layer: Arc::clone(&owner),
            };
            layer.entries.insert(parent, dir);
        }
    }
    layer.entries.insert(
        path,
        Entry {
            kind: Kind::File {
                size: text.len() as u64,
                source: Source::Bytes(text.into_bytes().into()),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            layer: owner,
        },
    );
    // Only paths the tree lacks: the merge adds them.
    merge(profile, tree, layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn layer(name: &str, items: &[(&str, Kind, u32)]) -> Layer {
        let mut l = Layer::empty(name.into());
        for (path, kind, mode) in items {
            l.entries.insert(
                p(path),
                Entry {
                    kind: kind.clone(),
                    mode: *mode,
                    uid: 0,
                    gid: 0,
                    layer: name.into(),
                },
            );
        }
        l
    }

    fn file() -> Kind {
        Kind::File {
            source: Source::Bytes(b"x"[..].into()),
            size: 1,
        }
    }

    fn compose_err(layers: Vec<Layer>) -> String {
        compose(Path::new("p.toml"), layers)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn dirs_merge_and_provenance_is_kept() {
        let a = layer("a", &[("etc", Kind::Dir, 0o755), ("etc/a", file(), 0o644)]);
        let b = layer("b", &[("etc", Kind::Dir, 0o700), ("etc/b", file(), 0o644)]);
        let t = compose(Path::new("p.toml"), vec![a, b]).unwrap();
        assert_eq!(t.get(&p("etc")).unwrap().unwrap().layer, "a".into());
        assert_eq!(
            t.get(&p("etc")).unwrap().unwrap().mode,
            0o755,
            "implicit dir attrs do not override"
        );
        assert_eq!(t.get(&p("etc/b")).unwrap().unwrap().layer, "b".into());
    }

    #[test]
    fn two_layer_conflict_needs_replace() {
        let a = || layer("a", &[("etc", Kind::Dir, 0o755), ("etc/x", file(), 0o644)]);
        let b = || layer("b", &[("etc", Kind::Dir, 0o755), ("etc/x", file(), 0o600)]);
        assert!(compose_err(vec![a(), b()]).contains("conflict at etc/x"));
        let (a, mut b) = (a(), b());
        b.replace.insert(p("etc/x"), "b/overlay.toml:1:1".into());
        let t = compose(Path::new("p.toml"), vec![a, b]).unwrap();
        assert_eq!(t.get(&p("etc/x")).unwrap().unwrap().mode, 0o600);
        assert_eq!(t.get(&p("etc/x")).unwrap().unwrap().layer, "b".into());
    }

    #[test]
    fn explicit_dir_conflict_and_type_clash() {
        let a = || layer("a", &[("etc", Kind::Dir, 0o755)]);
        let mut b = layer("b", &[("etc", Kind::Dir, 0o700)]);
        b.explicit.insert(p("etc"));
        assert!(compose_err(vec![a(), b]).contains("conflict at directory etc"));
        let c = layer("c", &[("etc", file(), 0o644)]);
        assert!(compose_err(vec![a(), c]).contains("type clash at etc"));
    }

    #[test]
    fn symlink_chains_that_escape_are_refused() {
        // Regression: each link alone stays inside, the chain does not.
        let link = |t: &str| Kind::Symlink { target: t.into() };
        let a = layer(
            "a",
            &[("up", link("."), 0o777), ("esc", link("up/.."), 0o777)],
        );
        let err = compose_err(vec![a]);
        assert!(
            err.contains("symlink esc -> up/.. (layer \"a\") resolves above the root"),
            "{err}"
        );
        let b = layer(
            "b",
            &[
                ("d", Kind::Dir, 0o755),
                ("d/up", link(".."), 0o777),
                ("esc2", link("d/up/.."), 0o777),
            ],
        );
        assert!(compose_err(vec![b]).contains("symlink esc2 -> d/up/.."));
        let c = layer("c", &[("x", link("y"), 0o777), ("y", link("x"), 0o777)]);
        assert!(compose_err(vec![c]).contains("loop"));
        let ok = layer(
            "ok",
            &[
                ("etc", Kind::Dir, 0o755),
                ("etc/l", link("../usr/x"), 0o777),
                ("u", link("/etc/l"), 0o777),
            ],
        );
        assert!(compose(Path::new("p.toml"), vec![ok]).is_ok());
    }

    #[test]
    fn replace_of_nothing_and_entry_under_symlink() {
        let a = layer("a", &[("x", file(), 0o644)]);
        let mut b = layer("b", &[("y", file(), 0o644)]);
        b.replace.insert(p("y"), "b/overlay.toml:1:12".into());
        assert!(compose_err(vec![a, b]).contains("no lower layer provides it"));
        let c = layer(
            "c",
            &[
                ("l", Kind::Symlink { target: "/".into() }, 0o777),
                ("l/x", file(), 0o644),
            ],
        );
        assert!(compose_err(vec![c]).contains("lies under l"));
    }
}
