//! Overlays (`overlays/<name>/`): a `root/` fragment plus `overlay.toml` for
//! what git cannot carry (modes, owners, extra directories, symlinks,
//! replacements, removals, parameters, users, directories, enabled units,
//! ports). Loading one yields a `Layer`. Plain file contents are not read here
//! (the archive writer reads each exactly once); `*.tmpl` files are rendered
//! here, strictly, with the layer's parameters.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::compose::firewall::{self, Exposure, PortDecl, Proto};
use crate::compose::generate::{self, EnableDecl, GroupDecl, TmpfileDecl, UserDecl};
use crate::compose::params::{self, ParamDecl, ProfileParams, Value};
use crate::error::{Error, Result};
use crate::model::{self, Entry, Kind, PackedTree, RelPath, Source};

/// Everything `overlay.toml` accepts; `adapter.toml` accepts it too (see
/// `parse_layer_file`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct OverlayFile {
    #[serde(default)]
    replace: Vec<Spanned<String>>,
    #[serde(default)]
    remove: Vec<Spanned<String>>,
    #[serde(default)]
    allow_setuid: Vec<Spanned<String>>,
    #[serde(default)]
    params: BTreeMap<Spanned<String>, ParamDecl>,
    #[serde(default)]
    user: Vec<UserDecl>,
    #[serde(default)]
    group: Vec<GroupDecl>,
    #[serde(default)]
    tmpfile: Vec<TmpfileDecl>,
    #[serde(default)]
    enable: Vec<EnableDecl>,
    #[serde(default)]
    port: Vec<PortDecl>,
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
#[derive(Debug, Default)]
pub struct Layer {
    pub name: Arc<str>,
    /// What `root/` holds, packed in order as the walk met it, without the
    /// `[[attr]]` rules (`attrs`, applied as it is read).
    pub walked: PackedTree,
    /// The `[[attr]]` rules, in order, applied to each entry of `walked`
    /// as it is read (`get`, `into_entries`); the other entries had them
    /// applied when they were read.
    attrs: Vec<AttrRule>,
    /// What the layer file declares and what is made from it, and entries
    /// of `walked` changed since (each shadows the one in `walked`).
    pub entries: BTreeMap<RelPath, Entry>,
    /// Paths this layer replaces in lower layers, with where it says so.
    pub replace: BTreeMap<RelPath, String>,
    /// Directories whose mode or owner this layer sets on purpose; other
    /// directories merge with a lower layer's silently.
    pub explicit: BTreeSet<RelPath>,
    /// Paths of lower layers this layer removes, with where it says so.
    pub remove: BTreeMap<RelPath, String>,
    /// Paths that may be setuid/setgid.
    pub allow_setuid: BTreeSet<RelPath>,
    /// User names this layer declares (`[[user]]`, parameters resolved).
    pub users: BTreeSet<String>,
    /// Group names this layer declares (`[[group]]`, parameters resolved).
    pub groups: BTreeSet<String>,
    /// The fixed GIDs among them (`[[group]] gid = …`).
    pub gids: BTreeMap<String, u32>,
    /// Parameters this layer declares.
    pub params: BTreeSet<String>,
    /// Ports this layer declares, resolved.
    pub ports: Vec<firewall::Port>,
}

/// An `[[attr]]` rule: the paths it matches and what it sets.
#[derive(Clone, Debug)]
struct AttrRule {
    glob: globset::GlobMatcher,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

impl AttrRule {
    fn sets_any(&self) -> bool {
        self.mode.is_some() || self.uid.is_some() || self.gid.is_some()
    }

    /// Sets what the rule sets on `entry` (a symlink's mode is fixed).
    fn apply(&self, entry: &mut Entry) {
        if let (Some(m), false) = (self.mode, matches!(entry.kind, Kind::Symlink { .. })) {
            entry.mode = m;
        }
        if let Some(u) = self.uid {
            entry.uid = u;
        }
        if let Some(g) = self.gid {
            entry.gid = g;
        }
    }
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
    /// A layer named `name` with nothing in it yet.
    pub fn empty(name: Arc<str>) -> Layer {
        Layer {
            name,
            ..Layer::default()
        }
    }

    /// Loads the overlay in `dir`; `name` is how the profile names it and
    /// `params` what the profile sets.
    pub fn load(name: &str, dir: &Path, params: &ProfileParams) -> Result<Layer> {
        let toml_path = dir.join("overlay.toml");
        let (file, text) = if toml_path.exists() {
            let text = std::fs::read_to_string(&toml_path)
                .map_err(Error::io(&toml_path, "reading overlay.toml"))?;
            let file: OverlayFile = crate::error::parse_toml(&toml_path, &text)?;
            (file, text)
        } else {
            (OverlayFile::default(), String::new())
        };
        Ok(Layer::from_file(name, dir, &toml_path, &text, &file, params)?.0)
    }

    /// Builds the layer of `dir` from its parsed layer file (`toml_path`,
    /// whose text is `text`): parameters, `root/`, then every table
    /// `overlay.toml` accepts. Returns the layer and its parameter values.
    /// Overlays and adapters both load through here.
    pub(crate) fn from_file(
        name: &str,
        dir: &Path,
        toml_path: &Path,
        text: &str,
        file: &OverlayFile,
        params: &ProfileParams,
    ) -> Result<(Layer, BTreeMap<String, Value>)> {
        let mut layer = Layer {
            name: name.into(),
            ..Layer::default()
        };
        let ctx = Ctx {
            path: toml_path,
            text,
        };
        let (decls, values) = resolve_params(toml_path, text, file, params)?;
        layer.params = decls.keys().cloned().collect();
        let root = dir.join("root");
        if root.is_dir() {
            layer.walk_root(&root, &values)?;
        }
        layer.apply_toml(&ctx, file, &values)?;
        Ok((layer, values))
    }

    fn walk_root(&mut self, root: &Path, values: &BTreeMap<String, Value>) -> Result<()> {
        // A directory's entries sorted by the names they will have (a
        // template's without `.tmpl`): the walk then meets the paths in
        // archive order, and each is packed as it is met.
        fn named(e: &walkdir::DirEntry) -> &[u8] {
            let name = e.file_name().as_bytes();
            match name.strip_suffix(b".tmpl") {
                Some(stem) if e.file_type().is_file() => stem,
                _ => name,
            }
        }
        let walk = walkdir::WalkDir::new(root)
            .min_depth(1)
            .follow_links(false)
            .sort_by(|a, b| {
                named(a)
                    .cmp(named(b))
                    .then_with(|| a.file_name().cmp(b.file_name()))
            });
        let shared_root: Arc<Path> = Arc::from(root);
        for item in walk {
            let item = item.map_err(|e| walk_error(e, root, "walking overlay"))?;
            let full = item.path();
            let rel = full.strip_prefix(root).unwrap_or(full);
            let Some(rel_str) = rel.to_str() else {
                return Err(Error::input(
                    full,
                    "file name is not valid UTF-8; rename it (artifact paths must be UTF-8)",
                ));
            };
            let template = rel_str
                .strip_suffix(".tmpl")
                .filter(|_| item.file_type().is_file());
            let path =
                RelPath::new(template.unwrap_or(rel_str)).map_err(|m| Error::input(full, m))?;
            // Out of order only where a file and its template (or a
            // directory of that name) make one path.
            if self
                .walked
                .last()
                .is_some_and(|last| model::path_order(last, path.as_str()).is_ge())
            {
                return Err(Error::input(
                    &root.join(format!("{path}.tmpl")),
                    format!("{path} is provided twice (a file and its .tmpl); keep one"),
                ));
            }
            let meta = item
                .metadata()
                .map_err(|e| walk_error(e, full, "reading metadata"))?;
            let ft = meta.file_type();
            let (kind, mode) = if ft.is_dir() {
                (Kind::Dir, model::DIR_MODE)
            } else if ft.is_file() {
                let exec = meta.permissions().mode() & 0o111 != 0;
                let kind = if template.is_some() {
                    let bytes = render_template(full, values)?;
                    Kind::File {
                        size: bytes.len() as u64,
                        source: Source::Bytes(bytes.into()),
                    }
                } else {
                    Kind::File {
                        source: Source::Overlay(Arc::clone(&shared_root)),
                        size: meta.len(),
                    }
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
            let entry = self.entry(kind, mode);
            self.walked.push(&path, entry)?;
        }
        Ok(())
    }

    /// The entry at `path`, if this layer provides one.
    pub fn get(&self, path: &RelPath) -> Result<Option<Entry>> {
        if let Some(e) = self.entries.get(path) {
            return Ok(Some(e.clone()));
        }
        let Some(mut e) = self.walked.get(path)? else {
            return Ok(None);
        };
        for rule in self.attrs.iter().filter(|r| r.glob.is_match(path.as_str())) {
            rule.apply(&mut e);
        }
        Ok(Some(e))
    }

    /// Whether this layer provides `path`.
    pub fn has(&self, path: &RelPath) -> Result<bool> {
        Ok(self.entries.contains_key(path) || self.walked.get(path)?.is_some())
    }

    /// The entry at `path`, to change: one of `root/`'s is copied into
    /// `entries` first.
    pub(crate) fn entry_mut(&mut self, path: &RelPath) -> Result<Option<&mut Entry>> {
        if !self.entries.contains_key(path) {
            let Some(e) = self.get(path)? else {
                return Ok(None);
            };
            self.entries.insert(path.clone(), e);
        }
        Ok(self.entries.get_mut(path))
    }

    /// Every entry, in order, consuming the layer: `root/`'s (with the
    /// `[[attr]]` rules applied) and the others merged, one of `entries`
    /// in place of `root/`'s at its path.
    pub fn into_entries(self) -> impl Iterator<Item = Result<(RelPath, Entry)>> {
        let attrs = self.attrs;
        let mut walked = self
            .walked
            .into_entries()
            .map(move |item| {
                let (path, mut e) = item?;
                for rule in attrs.iter().filter(|r| r.glob.is_match(path.as_str())) {
                    rule.apply(&mut e);
                }
                Ok((path, e))
            })
            .peekable();
        let mut declared = self.entries.into_iter().peekable();
        std::iter::from_fn(move || {
            let order = match (walked.peek(), declared.peek()) {
                (None, None) => return None,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                // An error first, as it came.
                (Some(Err(_)), _) | (Some(_), None) => std::cmp::Ordering::Less,
                (Some(Ok((w, _))), Some((d, _))) => w.cmp(d),
            };
            if order.is_eq() {
                walked.next();
            }
            if order.is_lt() {
                walked.next()
            } else {
                declared.next().map(Ok)
            }
        })
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
    fn add_parents(&mut self, path: &RelPath) -> Result<()> {
        for parent in path.ancestors() {
            if !self.has(&parent)? {
                let e = self.entry(Kind::Dir, model::DIR_MODE);
                self.entries.insert(parent, e);
            }
        }
        Ok(())
    }

    fn apply_toml(
        &mut self,
        ctx: &Ctx<'_>,
        file: &OverlayFile,
        values: &BTreeMap<String, Value>,
    ) -> Result<()> {
        for decl in &file.dir {
            let p = ctx.rel_path(&decl.path)?;
            match self.get(&p)? {
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
                    self.add_parents(&p)?;
                    let e = self.entry(Kind::Dir, model::DIR_MODE);
                    self.entries.insert(p.clone(), e);
                }
            }
            self.set_attrs(ctx, &p, decl)?;
        }

        for decl in &file.symlink {
            let p = ctx.rel_path(&decl.path)?;
            if self.has(&p)? {
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
            self.add_parents(&p)?;
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
            // The declared entries now; `root/`'s as they are read, but
            // counted (and its directories marked explicit) here.
            let matched: Vec<RelPath> = self
                .entries
                .keys()
                .filter(|p| glob.is_match(p.as_str()))
                .cloned()
                .collect();
            let mut walked_dirs = Vec::new();
            let mut walked = 0;
            for item in self.walked.iter() {
                let (p, e) = item?;
                if glob.is_match(p.as_str()) && !self.entries.contains_key(&p) {
                    walked += 1;
                    if e.kind == Kind::Dir {
                        walked_dirs.push(p);
                    }
                }
            }
            if matched.is_empty() && walked == 0 {
                return Err(ctx.err(
                    rule.path.span(),
                    format!("attr pattern {pattern:?} matches nothing this overlay provides; fix or remove it"),
                ));
            }
            for p in &matched {
                self.set_attrs(ctx, p, rule)?;
            }
            let rule = AttrRule {
                glob,
                mode: ctx.mode(&rule.mode)?,
                uid: ctx.id(&rule.uid, "uid")?,
                gid: ctx.id(&rule.gid, "gid")?,
            };
            if rule.sets_any() {
                self.explicit.extend(walked_dirs);
            }
            self.attrs.push(rule);
        }

        for item in &file.replace {
            let p = ctx.rel_path(item)?;
            if !self.has(&p)? {
                return Err(ctx.err(
                    item.span(),
                    format!("replace names {p}, which this overlay does not provide"),
                ));
            }
            self.replace.insert(p, ctx.location(item.span()));
        }
        for item in &file.remove {
            let p = ctx.rel_path(item)?;
            if self.has(&p)? {
                return Err(ctx.err(
                    item.span(),
                    format!("{p} is both provided and removed by this overlay"),
                ));
            }
            self.remove.insert(p, ctx.location(item.span()));
        }
        for item in &file.allow_setuid {
            self.allow_setuid.insert(ctx.rel_path(item)?);
        }
        self.generate(ctx, file, values)?;
        for decl in &file.port {
            if let Some(w) = &decl.when
                && !params::when_holds(w.get_ref(), values).map_err(|m| ctx.err(w.span(), m))?
            {
                continue;
            }
            let port = self.port(ctx, decl, values)?;
            self.ports.push(port);
        }
        Ok(())
    }

    /// Adds a generated file (content made by the build) at `path`.
    fn add_generated(&mut self, ctx: &Ctx<'_>, path: &str, kind: Kind) -> Result<()> {
        let mode = match kind {
            Kind::Symlink { .. } => model::SYMLINK_MODE,
            _ => model::FILE_MODE,
        };
        self.add_made(ctx.path, path, kind, mode)
    }

    /// Adds an entry the build makes (generated text, an enablement link)
    /// at `path` with `mode`, owned by root, with its parent directories;
    /// `origin` is the layer file it is generated from. A path this layer
    /// already has is an error.
    pub(crate) fn add_made(
        &mut self,
        origin: &Path,
        path: &str,
        kind: Kind,
        mode: u32,
    ) -> Result<()> {
        let p = RelPath::new(path).map_err(|m| Error::input(origin, m))?;
        if self.has(&p)? {
            let file = origin.file_name().map_or_else(
                || origin.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            );
            return Err(Error::input(
                origin,
                format!(
                    "{p} is generated from {file} but root/ provides it too (or another declaration generates it); remove one"
                ),
            ));
        }
        self.add_parents(&p)?;
        let e = self.entry(kind, mode);
        self.entries.insert(p, e);
        Ok(())
    }

    fn generate(
        &mut self,
        ctx: &Ctx<'_>,
        file: &OverlayFile,
        values: &BTreeMap<String, Value>,
    ) -> Result<()> {
        let stem = generate::file_stem(&self.name);
        // Account names may be `$param` (a string parameter), so the group
        // sshd and sudo name is the group sysusers creates.
        let resolve = |name: &Spanned<String>| -> Result<Spanned<String>> {
            let value = match name.get_ref().strip_prefix('$') {
                None => name.get_ref().clone(),
                Some(param) => {
                    match values.get(param) {
                        Some(Value::String(s)) => s.clone(),
                        Some(_) => {
                            return Err(
                                ctx.err(name.span(), format!("${param} is not a string parameter"))
                            );
                        }
                        None => {
                            return Err(ctx.err(
                            name.span(),
                            format!("${param} is not a parameter this overlay declares under [params]"),
                        ));
                        }
                    }
                }
            };
            if !generate::valid_account(&value) {
                return Err(ctx.err(
                    name.span(),
                    format!("{value:?} is not a valid user or group name"),
                ));
            }
            Ok(Spanned::new(name.span(), value))
        };
        let mut users = file.user.clone();
        for u in &mut users {
            u.name = resolve(&u.name)?;
            self.users.insert(u.name.get_ref().clone());
        }
        let mut groups = file.group.clone();
        for g in &mut groups {
            g.name = resolve(&g.name)?;
            self.groups.insert(g.name.get_ref().clone());
            if let Some(gid) = g.gid {
                self.gids.insert(g.name.get_ref().clone(), gid);
            }
        }
        if !users.is_empty() || !groups.is_empty() {
            let text = generate::sysusers(&self.name, &groups, &users)
                .map_err(|m| Error::input(ctx.path, m))?;
            self.add_generated(
                ctx,
                &format!("usr/lib/sysusers.d/infrakit-{stem}.conf"),
                bytes(text),
            )?;
        }
        for t in &file.tmpfile {
            if !generate::valid_tmpfile_type(t.kind.get_ref()) {
                return Err(ctx.err(
                    t.kind.span(),
                    format!("tmpfile type {:?} is not supported", t.kind.get_ref()),
                ));
            }
            if !t.path.get_ref().starts_with('/') || RelPath::new(t.path.get_ref()).is_err() {
                return Err(ctx.err(
                    t.path.span(),
                    "tmpfile path must be absolute and normalised",
                ));
            }
        }
        if !file.tmpfile.is_empty() {
            let text = generate::tmpfiles(&self.name, &file.tmpfile)
                .map_err(|m| Error::input(ctx.path, m))?;
            self.add_generated(
                ctx,
                &format!("usr/lib/tmpfiles.d/infrakit-{stem}.conf"),
                bytes(text),
            )?;
        }
        for e in &file.enable {
            let unit = e.unit.get_ref();
            if !generate::valid_unit(unit) {
                return Err(ctx.err(
                    e.unit.span(),
                    format!("{unit:?} is not a systemd unit name"),
                ));
            }
            if !generate::valid_unit(e.target.get_ref()) {
                return Err(ctx.err(
                    e.target.span(),
                    format!("{:?} is not a systemd unit name", e.target.get_ref()),
                ));
            }
            let target = match &e.path {
                Some(p) if p.get_ref().starts_with('/') && RelPath::new(p.get_ref()).is_ok() => {
                    p.get_ref().clone()
                }
                Some(p) => return Err(ctx.err(p.span(), "path must be absolute and normalised")),
                None => {
                    let own = format!("etc/systemd/system/{unit}");
                    let provided = match RelPath::new(&own) {
                        Ok(p) => self.has(&p)?,
                        Err(_) => false,
                    };
                    if provided {
                        format!("/{own}")
                    } else {
                        format!("/usr/lib/systemd/system/{unit}")
                    }
                }
            };
            let link = format!("etc/systemd/system/{}.wants/{unit}", e.target.get_ref());
            self.add_generated(ctx, &link, Kind::Symlink { target })?;
        }
        Ok(())
    }

    fn port(
        &self,
        ctx: &Ctx<'_>,
        decl: &PortDecl,
        values: &BTreeMap<String, Value>,
    ) -> Result<firewall::Port> {
        let port = u16::try_from(*decl.port.get_ref())
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ctx.err(
                    decl.port.span(),
                    format!("port {} is out of range (1 to 65535)", decl.port.get_ref()),
                )
            })?;
        let proto = match &decl.proto {
            None => Proto::Tcp,
            Some(p) => Proto::parse(p.get_ref())
                .ok_or_else(|| ctx.err(p.span(), "proto must be \"tcp\" or \"udp\""))?,
        };
        let exposure = match (&decl.exposure, &decl.allow) {
            (Some(e), None) => match e.get_ref().as_str() {
                "public" => Exposure::Public,
                "loopback" => Exposure::Loopback,
                other => return Err(ctx.err(e.span(), format!("exposure {other:?} must be \"public\" or \"loopback\" (or give allow = [...])"))),
            },
            (None, Some(allow)) => {
                let mut cidrs = Vec::new();
                for item in allow.get_ref() {
                    if let Some(param) = item.strip_prefix('$') {
                        match values.get(param) {
                            Some(Value::CidrList(list)) => cidrs.extend(list.iter().cloned()),
                            Some(_) => return Err(ctx.err(allow.span(), format!("${param} is not a cidr-list parameter"))),
                            None => return Err(ctx.err(allow.span(), format!("${param} is not a parameter this overlay declares under [params]"))),
                        }
                    } else {
                        cidrs.push(params::Cidr::parse(item).map_err(|m| ctx.err(allow.span(), m))?);
                    }
                }
                cidrs.sort();
                cidrs.dedup();
                if cidrs.is_empty() {
                    match decl.when_empty.as_ref().map(|w| (w.get_ref().as_str(), w.span())) {
                        Some(("public", _)) => Exposure::Public,
                        Some((other, span)) => return Err(ctx.err(span, format!("when-empty {other:?} must be \"public\""))),
                        None => return Err(ctx.err(allow.span(), "allow resolves to no address; set the parameter, or add when-empty = \"public\"")),
                    }
                } else {
                    Exposure::Allow(cidrs)
                }
            }
            _ => return Err(ctx.err(decl.port.span(), "give exactly one of exposure = \"public\"|\"loopback\" or allow = [...]")),
        };
        if let Some(d) = &decl.description
            && d.chars().any(char::is_control)
        {
            return Err(ctx.err(
                decl.port.span(),
                "port description may not contain newlines or control characters",
            ));
        }
        let limit = match &decl.limit {
            Some(l) if firewall::valid_rate(l.get_ref()) => Some(l.get_ref().clone()),
            Some(l) => {
                return Err(ctx.err(
                    l.span(),
                    format!("limit {:?} must look like 10/minute", l.get_ref()),
                ));
            }
            None => None,
        };
        let forward = decl.forward.as_ref().is_some_and(|f| *f.get_ref());
        if forward && exposure == Exposure::Loopback {
            return Err(ctx.err(
                decl.port.span(),
                "a loopback port is never forwarded: publish it on 127.0.0.1 and drop forward = true",
            ));
        }
        Ok(firewall::Port {
            port,
            proto,
            exposure,
            limit,
            forward,
            description: decl.description.clone(),
            layer: self.name.to_string(),
            location: ctx.location(decl.port.span()),
        })
    }

    fn set_attrs(&mut self, ctx: &Ctx<'_>, p: &RelPath, attrs: &Attrs) -> Result<()> {
        let mode = ctx.mode(&attrs.mode)?;
        let uid = ctx.id(&attrs.uid, "uid")?;
        let gid = ctx.id(&attrs.gid, "gid")?;
        let Some(entry) = self.entry_mut(p)? else {
            return Ok(());
        };
        let dir = entry.kind == Kind::Dir;
        if let (Some(m), false) = (mode, matches!(entry.kind, Kind::Symlink { .. })) {
            entry.mode = m;
        }
        if let Some(u) = uid {
            entry.uid = u;
        }
        if let Some(g) = gid {
            entry.gid = g;
        }
        if dir && (mode.is_some() || uid.is_some() || gid.is_some()) {
            self.explicit.insert(p.clone());
        }
        Ok(())
    }
}

/// A walkdir error as an I/O error on the path it names (else `fallback`).
fn walk_error(e: walkdir::Error, fallback: &Path, action: &'static str) -> Error {
    let path = e.path().unwrap_or(fallback).to_path_buf();
    let source = e
        .into_io_error()
        .unwrap_or_else(|| std::io::Error::other("filesystem loop"));
    Error::Io {
        path,
        action,
        source,
    }
}

/// The parameters a layer file declares (names checked) and their values for
/// this profile.
#[allow(clippy::type_complexity)]
pub(crate) fn resolve_params(
    toml_path: &Path,
    text: &str,
    file: &OverlayFile,
    params: &ProfileParams,
) -> Result<(BTreeMap<String, ParamDecl>, BTreeMap<String, Value>)> {
    let ctx = Ctx {
        path: toml_path,
        text,
    };
    let mut decls = BTreeMap::new();
    for (name, decl) in &file.params {
        if !params::valid_name(name.get_ref()) {
            return Err(ctx.err(
                name.span(),
                format!(
                    "parameter name {:?} must match [a-z][a-z0-9_-]*",
                    name.get_ref()
                ),
            ));
        }
        // Templates see `a-b` as `a_b`: two names must not meet there.
        let var = name.get_ref().replace('-', "_");
        if let Some(other) = decls.keys().find(|k: &&String| k.replace('-', "_") == var) {
            return Err(ctx.err(
                name.span(),
                format!(
                    "parameters {other:?} and {:?} are both `{var}` in templates; rename one",
                    name.get_ref()
                ),
            ));
        }
        decls.insert(name.get_ref().clone(), decl.clone());
    }
    let values = params.resolve(&decls, toml_path, text)?;
    Ok((decls, values))
}

/// Parses a layer file whose top-level keys `extra_keys` belong to `X` and
/// every other key to `OverlayFile`; both parts are strict (an unknown key
/// is an error at its line and column), and spans stay offsets into `text`.
pub(crate) fn parse_layer_file<X: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    extra_keys: &[&str],
) -> Result<(OverlayFile, X)> {
    use toml::de::{DeTable, Deserializer};
    let located = |e: toml::de::Error| {
        let offset = e.span().map_or(0, |s| s.start);
        Error::input_at_offset(path, text, offset, e.message().trim_end())
    };
    let whole = DeTable::parse(text).map_err(located)?;
    let span = whole.span();
    let mut common = whole.into_inner();
    let mut extra = DeTable::new();
    for key in extra_keys {
        if let Some((k, v)) = common.remove_entry(*key) {
            extra.insert(k, v);
        }
    }
    let top: Vec<_> = common.keys().map(Spanned::span).collect();
    let overlay = OverlayFile::deserialize(Deserializer::from(Spanned::new(span.clone(), common)))
        .map_err(|e| {
            // An unknown top-level key: the keys it could have been include
            // the extra ones.
            let at_top = e.span().is_some_and(|s| top.contains(&s));
            if at_top && !extra_keys.is_empty() && e.message().contains("expected one of") {
                let more: Vec<String> = extra_keys.iter().map(|k| format!("`{k}`")).collect();
                let offset = e.span().map_or(0, |s| s.start);
                let msg = format!("{}, {}", e.message().trim_end(), more.join(", "));
                Error::input_at_offset(path, text, offset, msg)
            } else {
                located(e)
            }
        })?;
    let x = X::deserialize(Deserializer::from(Spanned::new(span, extra))).map_err(located)?;
    Ok((overlay, x))
}

/// The template variables of a layer's parameters: `params["a-b"]` and,
/// with `-` turned into `_`, plain variables (`a_b`).
pub(crate) fn param_vars(values: &BTreeMap<String, Value>) -> BTreeMap<String, minijinja::Value> {
    let mut ctx: BTreeMap<String, minijinja::Value> = values
        .iter()
        .map(|(k, v)| (k.replace('-', "_"), minijinja::Value::from_serialize(v)))
        .collect();
    ctx.insert(
        "params".to_owned(),
        minijinja::Value::from_serialize(values),
    );
    ctx
}

fn bytes(text: String) -> Kind {
    Kind::File {
        size: text.len() as u64,
        source: Source::Bytes(text.into_bytes().into()),
    }
}

/// Renders a `*.tmpl` file strictly: an undefined variable is an error that
/// names the file and line. Parameters are visible as `params["a-b"]` and,
/// with `-` turned into `_`, as plain variables (`a_b`).
fn render_template(path: &Path, values: &BTreeMap<String, Value>) -> Result<Vec<u8>> {
    let source = std::fs::read_to_string(path).map_err(Error::io(path, "reading template"))?;
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let name = path.display().to_string();
    let ctx = param_vars(values);
    let rendered = env
        .template_from_named_str(&name, &source)
        .and_then(|t| t.render(&ctx))
        .map_err(|e| {
            let line = e.line().unwrap_or(1);
            let what = e
                .detail()
                .map_or_else(|| e.kind().to_string(), str::to_owned);
            Error::input_at(path, line, 1, format!("template: {what}"))
        })?;
    Ok(rendered.into_bytes())
}

fn check_symlink(path: &RelPath, target: &str) -> Result<(), String> {
    if model::resolve_symlink(path, target, |_| None).is_ok() {
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
        let layer = Layer::load("t", dir.path(), &ProfileParams::default());
        (dir, layer)
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn defaults_follow_the_source_exec_bit() {
        let (_d, layer) = overlay("");
        let layer = layer.unwrap();
        assert_eq!(layer.get(&p("run.sh")).unwrap().unwrap().mode, 0o755);
        assert_eq!(layer.get(&p("etc/motd")).unwrap().unwrap().mode, 0o644);
        assert_eq!(layer.get(&p("etc")).unwrap().unwrap().kind, Kind::Dir);
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
        assert_eq!(
            layer.get(&p("etc/ssh/a.conf")).unwrap().unwrap().mode,
            0o600
        );
        assert_eq!(layer.get(&p("var/lib/x")).unwrap().unwrap().mode, 0o750);
        assert_eq!(layer.get(&p("var/lib/x")).unwrap().unwrap().uid, 7);
        assert_eq!(layer.get(&p("var/lib")).unwrap().unwrap().mode, 0o755);
        assert!(layer.explicit.contains(&p("var/lib/x")));
        assert!(layer.replace.contains_key(&p("etc/motd")));
    }

    #[test]
    fn root_is_packed_in_archive_order_and_read_with_its_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("a0")).unwrap();
        // `a.tmpl` is met after `a-b` but is `a`, which sorts before it.
        for f in ["a-b", "a.tmpl", "a0/f", "ab"] {
            fs::write(root.join(f), "x").unwrap();
        }
        fs::write(
            dir.path().join("overlay.toml"),
            "[[attr]]\npath = \"a*\"\nuid = 5\n\
             [[attr]]\npath = \"ab\"\nmode = 0o600\n\
             [[dir]]\npath = \"a0\"\nmode = 0o700\n\
             [[dir]]\npath = \"b/c\"\n",
        )
        .unwrap();
        let layer = Layer::load("t", dir.path(), &ProfileParams::default()).unwrap();
        // The walked `a0` was copied to be changed; the rule that matched
        // it after is applied to the copy.
        assert_eq!(layer.walked.len(), 5);
        assert_eq!(layer.get(&p("ab")).unwrap().unwrap().mode, 0o600);
        assert_eq!(layer.get(&p("ab")).unwrap().unwrap().uid, 5);
        assert!(layer.explicit.contains(&p("a0")));
        let got: Vec<(String, u32, u32)> = layer
            .into_entries()
            .map(|item| {
                item.map(|(path, e)| (path.to_string(), e.mode, e.uid))
                    .unwrap()
            })
            .collect();
        let want = [
            ("a", 0o644, 5),
            ("a-b", 0o644, 5),
            ("a0", 0o700, 5),
            ("a0/f", 0o644, 0),
            ("ab", 0o600, 5),
            ("b", 0o755, 0),
            ("b/c", 0o755, 0),
        ]
        .map(|(p, m, u)| (p.to_owned(), m, u));
        assert_eq!(got, want);
    }

    #[test]
    fn a_file_and_its_template_are_refused_whichever_comes_first() {
        for (dir, other) in [(false, "x"), (true, "x"), (false, "x.tmpl.tmpl")] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("root");
            fs::create_dir_all(&root).unwrap();
            if dir {
                fs::create_dir_all(root.join(other).join("in")).unwrap();
            } else {
                fs::write(root.join(other), "x").unwrap();
            }
            fs::write(root.join("x.tmpl"), "y").unwrap();
            let got = Layer::load("t", d.path(), &ProfileParams::default());
            if other == "x.tmpl.tmpl" {
                // `x.tmpl` and `x`: two paths.
                let layer = got.unwrap();
                assert!(layer.has(&p("x")).unwrap() && layer.has(&p("x.tmpl")).unwrap());
                continue;
            }
            let err = got.unwrap_err().to_string();
            assert!(err.contains("x is provided twice"), "{err}");
        }
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
    fn parameters_that_meet_in_templates_are_refused() {
        let (_d, layer) = overlay(
            "[params.a-b]\ntype = \"string\"\ndefault = \"x\"\n[params.a_b]\ntype = \"string\"\ndefault = \"y\"\n",
        );
        let err = layer.unwrap_err().to_string();
        assert!(err.contains("are both `a_b` in templates"), "{err}");
    }

    #[test]
    fn escaping_symlink_in_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("root/etc")).unwrap();
        std::os::unix::fs::symlink("../../../etc/shadow", dir.path().join("root/etc/x")).unwrap();
        let err = Layer::load("t", dir.path(), &ProfileParams::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("escapes the root"), "{err}");
    }
}
