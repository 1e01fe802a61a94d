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
use crate::model::{Entry, Kind, RelPath, Source, Tree};
use overlay::Layer;
use std::sync::Arc;

/// Where a composition error is reported: the profile that asked for it.
/// Takes the layers by value and moves their entries, so the layers and the
/// tree are never both whole in memory.
pub fn compose(profile: &std::path::Path, layers: Vec<Layer>) -> Result<Tree> {
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
    let mut tree = Tree::default();
    for layer in layers {
        // Check every removal against the lower layers first, so a removal
        // of a directory and of a path inside it are both valid.
        for (path, at) in &layer.remove {
            if !tree.entries.contains_key(path) {
                return Err(Error::Input {
                    location: at.clone(),
                    message: format!(
                        "remove names {path}, but no lower layer provides it; remove it from remove"
                    ),
                });
            }
        }
        for path in layer.remove.keys() {
            let doomed: Vec<_> = tree
                .entries
                .range(path.clone()..)
                .map(|(p, _)| p.clone())
                .take_while(|p| p == path || p.as_str().starts_with(&format!("{path}/")))
                .collect();
            for p in doomed {
                tree.entries.remove(&p);
            }
        }
        if tree.entries.is_empty() && layer.replace.is_empty() {
            // The lowest layer (or the first after removals emptied the
            // tree) meets nothing: its map becomes the tree as it is.
            tree.entries = layer.entries;
            continue;
        }
        for (path, upper) in layer.entries {
            let Some(lower) = tree.entries.get(&path) else {
                if let Some(at) = layer.replace.get(&path) {
                    return Err(Error::Input {
                        location: at.clone(),
                        message: format!(
                            "replace names {path}, but no lower layer provides it; remove it from replace"
                        ),
                    });
                }
                tree.entries.insert(path, upper);
                continue;
            };
            let replaces = layer.replace.contains_key(&path);
            let both_dirs = lower.kind == Kind::Dir && upper.kind == Kind::Dir;
            if (lower.kind == Kind::Dir) != (upper.kind == Kind::Dir) {
                return Err(fail(format!(
                    "type clash at {path}: layer {:?} has a {}, layer {:?} a {}",
                    lower.layer,
                    lower.kind.name(),
                    layer.name,
                    upper.kind.name()
                )));
            }
            if both_dirs {
                let same = (lower.mode, lower.uid, lower.gid) == (upper.mode, upper.uid, upper.gid);
                if same || !layer.explicit.contains(&path) {
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
                        layer.name,
                        upper.mode,
                        upper.uid,
                        upper.gid,
                        layer.name
                    )));
                }
            } else if !replaces {
                return Err(fail(format!(
                    "conflict at {path}: provided by layer {:?} and layer {:?}; \
                     add it to `replace` in {:?}'s overlay.toml (adapter.toml for an adapter) if the upper layer should win",
                    lower.layer, layer.name, layer.name
                )));
            }
            tree.entries.insert(path, upper);
        }
    }
    if let Some(owner) = port_owner {
        add_firewall(profile, &ports, owner, &mut tree)?;
    }
    for (path, entry) in &tree.entries {
        if let Kind::Symlink { target } = &entry.kind
            && let Err(why) =
                crate::model::resolve_symlink(path, target, |p| match tree.entries.get(p) {
                    Some(Entry {
                        kind: Kind::Symlink { target },
                        ..
                    }) => Some(target.as_str()),
                    _ => None,
                })
        {
            return Err(fail(format!(
                "symlink {path} -> {target} (layer {:?}) {why}; point it inside the tree",
                entry.layer
            )));
        }
    }
    for (path, entry) in &tree.entries {
        if let Some(parent) = path.parent() {
            match tree.entries.get(&parent) {
                Some(p) if p.kind == Kind::Dir => {}
                Some(p) => {
                    return Err(fail(format!(
                        "{path} (layer {:?}) lies under {parent}, which layer {:?} makes a {}",
                        entry.layer,
                        p.layer,
                        p.kind.name()
                    )));
                }
                None => {
                    return Err(fail(format!(
                        "{path} (layer {:?}) has no parent directory {parent}",
                        entry.layer
                    )));
                }
            }
        }
    }
    Ok(tree)
}

/// Where the generated nftables ruleset goes.
pub const FIREWALL_PATH: &str = "etc/infrakit/firewall.nft";

/// Renders the ports of all layers into one ruleset, attributed to `owner`,
/// the topmost layer that declares ports.
fn add_firewall(
    profile: &std::path::Path,
    ports: &[firewall::Port],
    owner: Arc<str>,
    tree: &mut Tree,
) -> Result<()> {
    let merged = firewall::merge(ports).map_err(|m| Error::input(profile, m))?;
    let text = firewall::render(&merged);
    let path = RelPath::new(FIREWALL_PATH).expect("a valid constant path");
    if let Some(e) = tree.entries.get(&path) {
        return Err(Error::input(
            profile,
            format!(
                "{path} is generated from the declared ports, but layer {:?} provides it too; remove it",
                e.layer
            ),
        ));
    }
    for parent in path.ancestors() {
        tree.entries.entry(parent).or_insert_with(|| Entry {
            kind: Kind::Dir,
            mode: crate::model::DIR_MODE,
            uid: 0,
            gid: 0,
            layer: Arc::clone(&owner),
        });
    }
    tree.entries.insert(
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn layer(name: &str, items: &[(&str, Kind, u32)]) -> Layer {
        let mut l = Layer {
            name: name.into(),
            ..Layer::default()
        };
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

    fn compose_err(layers: &[Layer]) -> String {
        compose(Path::new("p.toml"), layers.to_vec())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn dirs_merge_and_provenance_is_kept() {
        let a = layer("a", &[("etc", Kind::Dir, 0o755), ("etc/a", file(), 0o644)]);
        let b = layer("b", &[("etc", Kind::Dir, 0o700), ("etc/b", file(), 0o644)]);
        let t = compose(Path::new("p.toml"), vec![a, b]).unwrap();
        assert_eq!(t.entries[&p("etc")].layer, "a".into());
        assert_eq!(
            t.entries[&p("etc")].mode,
            0o755,
            "implicit dir attrs do not override"
        );
        assert_eq!(t.entries[&p("etc/b")].layer, "b".into());
    }

    #[test]
    fn two_layer_conflict_needs_replace() {
        let a = layer("a", &[("etc", Kind::Dir, 0o755), ("etc/x", file(), 0o644)]);
        let mut b = layer("b", &[("etc", Kind::Dir, 0o755), ("etc/x", file(), 0o600)]);
        assert!(compose_err(&[a.clone(), b.clone()]).contains("conflict at etc/x"));
        b.replace.insert(p("etc/x"), "b/overlay.toml:1:1".into());
        let t = compose(Path::new("p.toml"), vec![a, b]).unwrap();
        assert_eq!(t.entries[&p("etc/x")].mode, 0o600);
        assert_eq!(t.entries[&p("etc/x")].layer, "b".into());
    }

    #[test]
    fn explicit_dir_conflict_and_type_clash() {
        let a = layer("a", &[("etc", Kind::Dir, 0o755)]);
        let mut b = layer("b", &[("etc", Kind::Dir, 0o700)]);
        b.explicit.insert(p("etc"));
        assert!(compose_err(&[a.clone(), b]).contains("conflict at directory etc"));
        let c = layer("c", &[("etc", file(), 0o644)]);
        assert!(compose_err(&[a, c]).contains("type clash at etc"));
    }

    #[test]
    fn symlink_chains_that_escape_are_refused() {
        // Regression: each link alone stays inside, the chain does not.
        let link = |t: &str| Kind::Symlink { target: t.into() };
        let a = layer(
            "a",
            &[("up", link("."), 0o777), ("esc", link("up/.."), 0o777)],
        );
        let err = compose_err(&[a]);
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
        assert!(compose_err(&[b]).contains("symlink esc2 -> d/up/.."));
        let c = layer("c", &[("x", link("y"), 0o777), ("y", link("x"), 0o777)]);
        assert!(compose_err(&[c]).contains("loop"));
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
        assert!(compose_err(&[a, b]).contains("no lower layer provides it"));
        let c = layer(
            "c",
            &[
                ("l", Kind::Symlink { target: "/".into() }, 0o777),
                ("l/x", file(), 0o644),
            ],
        );
        assert!(compose_err(&[c]).contains("lies under l"));
    }
}
