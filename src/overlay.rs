//! Overlays (`overlays/<name>/`): a `root/` fragment plus `overlay.toml` for
//! what git cannot carry (modes, owners, extra directories, symlinks,
//! replacements). Loading one yields a `Layer`; file contents are not read
//! here (the archive writer reads each file exactly once).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};
use crate::model::{self, Entry, Kind, RelPath, Source};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayFile {
    #[serde(default)]
    replace: Vec<Spanned<String>>,
    #[serde(default)]
    attr: Vec<Attrs>,
    #[serde(default)]
    dir: Vec<Attrs>,
    #[serde(default)]
    symlink: Vec<SymlinkDecl>,
}

/// `[[attr]]` (a path or glob this overlay provides) and `[[dir]]` (a
/// directory to create) share one shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attrs {
    path: Spanned<String>,
    mode: Option<Spanned<i64>>,
    uid: Option<Spanned<i64>>,
    gid: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SymlinkDecl {
    path: Spanned<String>,
    target: Spanned<String>,
    uid: Option<Spanned<i64>>,
    gid: Option<Spanned<i64>>,
}

/// One overlay, loaded and checked on its own.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    pub name: String,
    pub entries: BTreeMap<RelPath, Entry>,
    /// Paths this layer replaces in lower layers, with where it says so.
    pub replace: BTreeMap<RelPath, String>,
    /// Directories whose mode or owner this layer sets on purpose; other
    /// directories merge with a lower layer's silently.
    pub explicit: BTreeSet<RelPath>,
}

/// Parsing context: the overlay.toml path and text, for located errors.
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) -> Error {
        Error::input_at_offset(self.path, self.text, span.start, msg)
    }

    fn location(&self, span: std::ops::Range<usize>) -> String {
        let (line, col) = crate::error::line_column(self.text, span.start);
        format!("{}:{line}:{col}", self.path.display())
    }

    fn rel_path(&self, s: &Spanned<String>) -> Result<RelPath> {
        RelPath::new(s.get_ref()).map_err(|m| self.err(s.span(), format!("bad path: {m}")))
    }

    fn id(&self, v: &Option<Spanned<i64>>, what: &str) -> Result<Option<u32>> {
        v.as_ref()
            .map(|v| {
                u32::try_from(*v.get_ref()).map_err(|_| {
                    self.err(v.span(), format!("{what} {} is out of range", v.get_ref()))
                })
            })
            .transpose()
    }

    fn mode(&self, v: &Option<Spanned<i64>>) -> Result<Option<u32>> {
        v.as_ref()
            .map(|v| match u32::try_from(*v.get_ref()) {
                Ok(m) if m <= 0o7777 => Ok(m),
                _ => Err(self.err(
                    v.span(),
                    format!(
                        "mode {} is not a permission mode; write it in octal like 0o644",
                        v.get_ref()
                    ),
                )),
            })
            .transpose()
    }
}

impl Layer {
    /// Loads the overlay in `dir`; `name` is how the profile names it.
    pub fn load(name: &str, dir: &Path) -> Result<Layer> {
        let mut layer = Layer {
            name: name.to_owned(),
            ..Layer::default()
        };
        let root = dir.join("root");
        if root.is_dir() {
            layer.walk_root(&root)?;
        }
        let toml_path = dir.join("overlay.toml");
        if toml_path.exists() {
            let text = std::fs::read_to_string(&toml_path)
                .map_err(Error::io(&toml_path, "reading overlay.toml"))?;
            layer.apply_toml(&toml_path, &text)?;
        }
        Ok(layer)
    }

    fn walk_root(&mut self, root: &Path) -> Result<()> {
        let walk = walkdir::WalkDir::new(root)
            .min_depth(1)
            .follow_links(false)
            .sort_by_file_name();
        for item in walk {
            let item = item.map_err(|e| {
                let path = e.path().unwrap_or(root).to_path_buf();
                let io = e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("filesystem loop"));
                Error::Io {
                    path,
                    action: "walking overlay",
                    source: io,
                }
            })?;
            let full = item.path();
            let rel = full.strip_prefix(root).unwrap_or(full);
            let Some(rel_str) = rel.to_str() else {
                return Err(Error::input(
                    full,
                    "file name is not valid UTF-8; rename it (artifact paths must be UTF-8)",
                ));
            };
            let path = RelPath::new(rel_str).map_err(|m| Error::input(full, m))?;
            let meta = item.metadata().map_err(|e| Error::Io {
                path: full.to_path_buf(),
                action: "reading metadata",
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("loop")),
            })?;
            let ft = meta.file_type();
            let (kind, mode) = if ft.is_dir() {
                (Kind::Dir, model::DIR_MODE)
            } else if ft.is_file() {
                let exec = meta.permissions().mode() & 0o111 != 0;
                let kind = Kind::File {
                    source: Source::Path(full.to_path_buf()),
                    size: meta.len(),
                };
                (
                    kind,
                    if exec {
                        model::EXEC_MODE
                    } else {
                        model::FILE_MODE
                    },
                )
            } else if ft.is_symlink() {
                let target =
                    std::fs::read_link(full).map_err(Error::io(full, "reading symlink"))?;
                let Some(target) = target.to_str() else {
                    return Err(Error::input(full, "symlink target is not valid UTF-8"));
                };
                (
                    Kind::Symlink {
                        target: target.to_owned(),
                    },
                    model::SYMLINK_MODE,
                )
            } else {
                let what = if ft.is_fifo() {
                    "a fifo"
                } else if ft.is_socket() {
                    "a socket"
                } else {
                    "a device node"
                };
                return Err(Error::input(
                    full,
                    format!("{what} cannot be part of an overlay; remove it from root/"),
                ));
            };
            if let Kind::Symlink { target } = &kind {
                check_symlink(&path, target).map_err(|m| Error::input(full, m))?;
            }
            self.entries.insert(path, self.entry(kind, mode));
        }
        Ok(())
    }

    fn entry(&self, kind: Kind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 0,
            gid: 0,
            layer: self.name.clone(),
        }
    }

    /// Adds default-attribute parent directories for `path` that are missing.
    fn add_parents(&mut self, path: &RelPath) {
        for parent in path.ancestors() {
            if !self.entries.contains_key(&parent) {
                let e = self.entry(Kind::Dir, model::DIR_MODE);
                self.entries.insert(parent, e);
            }
        }
    }

    fn apply_toml(&mut self, path: &Path, text: &str) -> Result<()> {
        let ctx = Ctx { path, text };
        let file: OverlayFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            Error::input_at_offset(path, text, offset, e.message().trim_end())
        })?;

        for decl in &file.dir {
            let p = ctx.rel_path(&decl.path)?;
            match self.entries.get(&p) {
                Some(e) if e.kind != Kind::Dir => {
                    return Err(ctx.err(
                        decl.path.span(),
                        format!(
                            "{p} is declared as a directory but root/ has it as a {}",
                            e.kind.name()
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    self.add_parents(&p);
                    let e = self.entry(Kind::Dir, model::DIR_MODE);
                    self.entries.insert(p.clone(), e);
                }
            }
            self.set_attrs(&ctx, &p, decl)?;
        }

        for decl in &file.symlink {
            let p = ctx.rel_path(&decl.path)?;
            if self.entries.contains_key(&p) {
                return Err(ctx.err(
                    decl.path.span(),
                    format!("{p} is declared as a symlink but this overlay already provides it"),
                ));
            }
            let target = decl.target.get_ref();
            if target.is_empty() || target.contains('\0') {
                return Err(ctx.err(
                    decl.target.span(),
                    "symlink target must be a non-empty path",
                ));
            }
            check_symlink(&p, target).map_err(|m| ctx.err(decl.target.span(), m))?;
            self.add_parents(&p);
            let mut e = self.entry(
                Kind::Symlink {
                    target: target.clone(),
                },
                model::SYMLINK_MODE,
            );
            e.uid = ctx.id(&decl.uid, "uid")?.unwrap_or(0);
            e.gid = ctx.id(&decl.gid, "gid")?.unwrap_or(0);
            self.entries.insert(p, e);
        }

        for rule in &file.attr {
            let pattern = rule.path.get_ref();
            let glob = globset::GlobBuilder::new(pattern.trim_start_matches('/'))
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| ctx.err(rule.path.span(), format!("bad glob: {e}")))?
                .compile_matcher();
            let matched: Vec<RelPath> = self
                .entries
                .keys()
                .filter(|p| glob.is_match(p.as_str()))
                .cloned()
                .collect();
            if matched.is_empty() {
                return Err(ctx.err(
                    rule.path.span(),
                    format!("attr pattern {pattern:?} matches nothing this overlay provides; fix or remove it"),
                ));
            }
            for p in &matched {
                self.set_attrs(&ctx, p, rule)?;
            }
        }

        for item in &file.replace {
            let p = ctx.rel_path(item)?;
            if !self.entries.contains_key(&p) {
                return Err(ctx.err(
                    item.span(),
                    format!("replace names {p}, which this overlay does not provide"),
                ));
            }
            self.replace.insert(p, ctx.location(item.span()));
        }
        Ok(())
    }

    fn set_attrs(&mut self, ctx: &Ctx<'_>, p: &RelPath, attrs: &Attrs) -> Result<()> {
        let mode = ctx.mode(&attrs.mode)?;
        let uid = ctx.id(&attrs.uid, "uid")?;
        let gid = ctx.id(&attrs.gid, "gid")?;
        let Some(entry) = self.entries.get_mut(p) else {
            return Ok(());
        };
        if entry.kind == Kind::Dir && (mode.is_some() || uid.is_some() || gid.is_some()) {
            self.explicit.insert(p.clone());
        }
        if let (Some(m), false) = (mode, matches!(entry.kind, Kind::Symlink { .. })) {
            entry.mode = m;
        }
        if let Some(u) = uid {
            entry.uid = u;
        }
        if let Some(g) = gid {
            entry.gid = g;
        }
        Ok(())
    }
}

fn check_symlink(path: &RelPath, target: &str) -> Result<(), String> {
    if model::symlink_stays_inside(path, target) {
        Ok(())
    } else {
        Err(format!(
            "symlink {path} -> {target} escapes the root; point it inside the tree"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn overlay(toml: &str) -> (tempfile::TempDir, Result<Layer>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc/ssh")).unwrap();
        fs::write(root.join("etc/ssh/a.conf"), "x").unwrap();
        fs::write(root.join("etc/motd"), "hi").unwrap();
        fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(dir.path().join("overlay.toml"), toml).unwrap();
        let layer = Layer::load("t", dir.path());
        (dir, layer)
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn defaults_follow_the_source_exec_bit() {
        let (_d, layer) = overlay("");
        let layer = layer.unwrap();
        assert_eq!(layer.entries[&p("run.sh")].mode, 0o755);
        assert_eq!(layer.entries[&p("etc/motd")].mode, 0o644);
        assert_eq!(layer.entries[&p("etc")].kind, Kind::Dir);
    }

    #[test]
    fn attrs_dirs_and_symlinks_apply() {
        let (_d, layer) = overlay(
            "replace = [\"etc/motd\"]\n\
             [[attr]]\npath = \"etc/ssh/*.conf\"\nmode = 0o600\n\
             [[dir]]\npath = \"var/lib/x\"\nmode = 0o750\nuid = 7\n\
             [[symlink]]\npath = \"etc/localtime\"\ntarget = \"/usr/share/zoneinfo/UTC\"\n",
        );
        let layer = layer.unwrap();
        assert_eq!(layer.entries[&p("etc/ssh/a.conf")].mode, 0o600);
        assert_eq!(layer.entries[&p("var/lib/x")].mode, 0o750);
        assert_eq!(layer.entries[&p("var/lib/x")].uid, 7);
        assert_eq!(layer.entries[&p("var/lib")].mode, 0o755);
        assert!(layer.explicit.contains(&p("var/lib/x")));
        assert!(layer.replace.contains_key(&p("etc/motd")));
    }

    #[test]
    fn located_errors() {
        let cases = [
            (
                "[[attr]]\npath = \"nothing/*\"\nmode = 0o600\n",
                ":2:8: attr pattern",
            ),
            ("[[dir]]\npath = \"x\"\nmode = 0o17777\n", ":3:8: mode"),
            (
                "[[symlink]]\npath = \"l\"\ntarget = \"../../etc\"\n",
                ":3:10: symlink l -> ../../etc escapes",
            ),
            ("replace = [\"nope\"]\n", ":1:12: replace names nope"),
            ("bogus = 1\n", ":1:1: unknown field `bogus`"),
            ("[[dir]]\npath = \"../x\"\n", ":2:8: bad path"),
        ];
        for (toml, want) in cases {
            let (_d, layer) = overlay(toml);
            let err = layer.unwrap_err().to_string();
            assert!(err.contains(want), "{toml:?}: {err}");
            assert!(err.contains("overlay.toml"), "{err}");
        }
    }

    #[test]
    fn escaping_symlink_in_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("root/etc")).unwrap();
        std::os::unix::fs::symlink("../../../etc/shadow", dir.path().join("root/etc/x")).unwrap();
        let err = Layer::load("t", dir.path()).unwrap_err().to_string();
        assert!(err.contains("escapes the root"), "{err}");
    }
}
