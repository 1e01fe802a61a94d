//! Adapters (`adapters/<chain>/`): `adapter.toml` plus an optional `root/`,
//! loaded into a `Layer` like an overlay (every key `overlay.toml` accepts
//! goes through `overlay::Layer::from_file`), plus what only adapters
//! declare: hardened services (rendered by `units`), secret slots, sysctl,
//! udev rules, environment files, host prerequisites, and pinned upstream
//! `[[input]]` tables, which are kept here unread for `inputs` to resolve.
//! Any of these tables may carry `when = "<param> == <value>"`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::compose::generate;
use crate::compose::overlay::{self, Layer, OverlayFile};
use crate::compose::params::{ProfileParams, Value};
use crate::compose::units::{self, Timer};
use crate::error::{Error, Result};
use crate::model::{self, Kind, RelPath, Source};

/// The top-level keys only `adapter.toml` has.
const ADAPTER_KEYS: [&str; 8] = [
    "description",
    "prerequisites",
    "input",
    "service",
    "secret",
    "sysctl",
    "udev",
    "env",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AdapterTables {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    prerequisites: Vec<Spanned<String>>,
    #[serde(default)]
    input: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    service: Vec<ServiceDecl>,
    #[serde(default)]
    secret: Vec<SecretDecl>,
    #[serde(default)]
    sysctl: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    #[serde(default)]
    udev: Vec<UdevDecl>,
    #[serde(default)]
    env: Vec<EnvDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServiceDecl {
    name: Spanned<String>,
    description: Option<String>,
    role: Option<Spanned<String>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    exec: Spanned<Vec<String>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    supplementary_groups: Vec<Spanned<String>>,
    #[serde(default)]
    state: Vec<Spanned<String>>,
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    #[serde(default)]
    capabilities: Vec<Spanned<String>>,
    address_families: Option<Vec<Spanned<String>>>,
    memory_deny_write_execute: Option<bool>,
    system_call_filter: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    limits: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    environment: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    environment_files: Vec<Spanned<String>>,
    #[serde(default)]
    secrets: Vec<Spanned<String>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    #[serde(default)]
    wants: Vec<Spanned<String>>,
    #[serde(default)]
    requires: Vec<Spanned<String>>,
    restart: Option<Spanned<String>>,
    remain_after_exit: Option<Spanned<bool>>,
    wanted_by: Option<Spanned<String>>,
    cpu_affinity_param: Option<Spanned<String>>,
    timer: Option<Spanned<TimerDecl>>,
    when: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TimerDecl {
    on_calendar: String,
    #[serde(default)]
    persistent: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SecretDecl {
    name: Spanned<String>,
    path: Spanned<String>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    mode: Option<Spanned<i64>>,
    #[serde(default)]
    description: String,
    credential: Option<bool>,
    /// `file` (default) or `dir` (a directory the host fills, e.g. a
    /// validator client's keystores).
    kind: Option<Spanned<String>>,
    when: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UdevDecl {
    name: Spanned<String>,
    rules: Spanned<Vec<String>>,
    when: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvDecl {
    path: Spanned<String>,
    mode: Option<Spanned<i64>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    vars: BTreeMap<String, Spanned<String>>,
    when: Option<Spanned<String>>,
}

/// What `inputs` tells templates about each input: `inputs.<name>.<field>`
/// (for example `reference`, an image's `name:tag@sha256:…`).
pub type InputVars = BTreeMap<String, BTreeMap<String, String>>;

/// What the environment variable `$CREDENTIALS_DIRECTORY` looks like in a
/// command line, where systemd expands it (`{{ credentials }}`).
pub const CREDENTIALS: &str = "${CREDENTIALS_DIRECTORY}";

/// A service's role: signers sign with validator keys, and two releases'
/// signers never run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Signer,
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Signer => "signer",
            Role::Service => "service",
        }
    }
}

/// A rendered service, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// `<name>.service`.
    pub unit: String,
    pub role: Role,
    /// The adapter, as the profile names it.
    pub layer: String,
}

/// A secret slot that applies, with the units that consume it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    pub name: String,
    /// Absolute path on the host.
    pub path: String,
    pub owner: String,
    pub group: String,
    pub mode: u32,
    pub description: String,
    /// `true`: consumers get `LoadCredential=`; `false`: `AssertPathExists=`.
    pub credential: bool,
    /// `file` or `dir`.
    pub kind: String,
    /// Consuming units (`x.service`), sorted.
    pub units: Vec<String>,
    pub layer: String,
}

/// A secret-looking environment value an adapter sets (a lint finding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEnv {
    /// The file the value lands in (a unit or environment file), relative.
    pub path: String,
    pub key: String,
    pub layer: String,
}

/// What the adapters of a profile declare beyond their files.
#[derive(Clone, Debug, Default)]
pub struct AdapterFacts {
    /// The pinned inputs the build took files (or image references) from,
    /// sorted by name.
    pub inputs: Vec<InputRecord>,
    /// Sorted by unit.
    pub services: Vec<ServiceRecord>,
    /// Sorted by name.
    pub secrets: Vec<SlotRecord>,
    /// Sorted, unique.
    pub prerequisites: Vec<String>,
    pub secret_env: Vec<SecretEnv>,
}

/// A pinned input a build used, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputRecord {
    pub name: String,
    /// `file`, `tar`, `deb` or `image`.
    pub kind: String,
    pub version: String,
    /// The upstream URL (or image reference) the lock records.
    pub url: String,
    pub sha256: crate::trust::digest::Sha256,
    /// The adapter that declares it.
    pub layer: String,
}

/// An adapter's files, parsed but not yet rendered: `inputs` may read its
/// `[[input]]` tables before `load` needs what they resolve to.
#[derive(Debug)]
pub struct AdapterSource {
    /// As the profile names it.
    pub name: String,
    pub dir: PathBuf,
    /// `<dir>/adapter.toml`.
    pub toml_path: PathBuf,
    text: String,
    overlay: OverlayFile,
    tables: AdapterTables,
}

/// A loaded adapter: its layer (root/, overlay tables, generated units and
/// files) and what the manifest records about it.
#[derive(Debug)]
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    pub toml_path: PathBuf,
    /// `description` of adapter.toml.
    pub description: Option<String>,
    pub layer: Layer,
    /// The `[[input]]` tables as written (every one, `when` not applied),
    /// uninterpreted.
    pub inputs: Vec<toml::Value>,
    pub services: Vec<ServiceRecord>,
    pub secrets: Vec<SlotRecord>,
    /// Debian packages the host must carry, sorted and unique.
    pub prerequisites: Vec<String>,
    pub secret_env: Vec<SecretEnv>,
}

impl AdapterSource {
    /// Reads and strictly parses `<dir>/adapter.toml`.
    pub fn read(name: &str, dir: &Path) -> Result<AdapterSource> {
        let toml_path = dir.join("adapter.toml");
        let text = std::fs::read_to_string(&toml_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::input(
                    &toml_path,
                    format!("adapter {name:?} has no adapter.toml; every adapter needs one"),
                )
            } else {
                Error::io(&toml_path, "reading adapter.toml")(e)
            }
        })?;
        let (overlay, tables) =
            overlay::parse_layer_file::<AdapterTables>(&toml_path, &text, &ADAPTER_KEYS)?;
        Ok(AdapterSource {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            toml_path,
            text,
            overlay,
            tables,
        })
    }

    /// The `[[input]]` tables as written.
    pub fn inputs(&self) -> Vec<toml::Value> {
        self.tables
            .input
            .iter()
            .map(|v| v.get_ref().clone())
            .collect()
    }

    /// Where each `[[input]]` table starts, as `file:line:col` (in the
    /// order of `inputs`), for errors about it.
    pub fn input_locations(&self) -> Vec<String> {
        self.tables
            .input
            .iter()
            .map(|v| {
                let (line, col) = crate::error::line_column(&self.text, v.span().start);
                format!("{}:{line}:{col}", self.toml_path.display())
            })
            .collect()
    }

    /// This adapter's parameter values for the profile's `params` (what
    /// `when` and templates see), without loading anything else.
    pub fn param_values(&self, params: &ProfileParams) -> Result<BTreeMap<String, Value>> {
        Ok(overlay::resolve_params(&self.toml_path, &self.text, &self.overlay, params)?.1)
    }

    fn err(&self, span: Range<usize>, msg: impl std::fmt::Display) -> Error {
        Error::input_at_offset(&self.toml_path, &self.text, span.start, msg)
    }

    /// Loads the layer with the profile's `params`; `inputs` is what exec
    /// templates see as `inputs`.
    pub fn load(&self, params: &ProfileParams, inputs: &InputVars) -> Result<Adapter> {
        let (mut layer, values) = Layer::from_file(
            &self.name,
            &self.dir,
            &self.toml_path,
            &self.text,
            &self.overlay,
            params,
        )?;
        let t = &self.tables;
        let stem = generate::file_stem(&self.name);
        let holds = |when: &Option<Spanned<String>>| -> Result<bool> {
            match when {
                None => Ok(true),
                Some(w) => when_holds(w.get_ref(), &values).map_err(|m| self.err(w.span(), m)),
            }
        };
        let mut secret_env = Vec::new();

        let mut prerequisites = BTreeSet::new();
        for p in &t.prerequisites {
            if !valid_package(p.get_ref()) {
                return Err(self.err(
                    p.span(),
                    format!("{:?} is not a Debian package name", p.get_ref()),
                ));
            }
            prerequisites.insert(p.get_ref().clone());
        }

        // Secret slots first: services name them.
        let mut slots: BTreeMap<String, SlotRecord> = BTreeMap::new();
        for s in &t.secret {
            if !holds(&s.when)? {
                continue;
            }
            let name = s.name.get_ref();
            if !valid_slug(name) {
                return Err(self.err(
                    s.name.span(),
                    format!("secret name {name:?} must be [a-z0-9-]+"),
                ));
            }
            if slots.contains_key(name) {
                return Err(self.err(s.name.span(), format!("secret {name:?} is declared twice")));
            }
            let path = self.abs_path(&s.path)?;
            let account = |v: &Option<Spanned<String>>| -> Result<String> {
                match v {
                    None => Ok("root".to_owned()),
                    Some(a) if generate::valid_account(a.get_ref()) => Ok(a.get_ref().clone()),
                    Some(a) => Err(self.err(
                        a.span(),
                        format!("{:?} is not a valid user or group name", a.get_ref()),
                    )),
                }
            };
            let mode = self.mode(&s.mode)?.unwrap_or(0o600);
            let kind = match &s.kind {
                None => "file".to_owned(),
                Some(k) if k.get_ref() == "file" || k.get_ref() == "dir" => k.get_ref().clone(),
                Some(k) => return Err(self.err(k.span(), "kind must be \"file\" or \"dir\"")),
            };
            if s.description.chars().any(char::is_control) {
                return Err(self.err(s.name.span(), "description must be one line"));
            }
            slots.insert(
                name.clone(),
                SlotRecord {
                    name: name.clone(),
                    path,
                    owner: account(&s.owner)?,
                    group: account(&s.group)?,
                    mode,
                    description: s.description.clone(),
                    credential: s.credential.unwrap_or(true),
                    kind,
                    units: Vec::new(),
                    layer: self.name.clone(),
                },
            );
        }

        let mut services = Vec::new();
        let mut seen = BTreeSet::new();
        for d in &t.service {
            if !holds(&d.when)? {
                continue;
            }
            let (svc, timer, cpus) = self.service(d, &layer, &values, inputs, &slots)?;
            if !seen.insert(svc.name.clone()) {
                return Err(self.err(
                    d.name.span(),
                    format!("service {:?} is declared twice", svc.name),
                ));
            }
            let unit = format!("{}.service", svc.name);
            let text =
                units::service_unit(&self.name, &svc).map_err(|m| self.err(d.exec.span(), m))?;
            for (k, v) in &svc.environment {
                if secret_looking(k, v) {
                    secret_env.push(SecretEnv {
                        path: format!("usr/lib/systemd/system/{unit}"),
                        key: k.clone(),
                        layer: self.name.clone(),
                    });
                }
            }
            layer.add_made(
                &self.toml_path,
                &format!("usr/lib/systemd/system/{unit}"),
                bytes(text),
                model::FILE_MODE,
            )?;
            if let Some(target) = &svc.wanted_by {
                self.link(&mut layer, target, &unit)?;
            }
            if let Some(t) = timer {
                let timer_unit = format!("{}.timer", svc.name);
                layer.add_made(
                    &self.toml_path,
                    &format!("usr/lib/systemd/system/{timer_unit}"),
                    bytes(units::timer_unit(
                        &self.name,
                        &svc.name,
                        &svc.description,
                        &t,
                    )),
                    model::FILE_MODE,
                )?;
                self.link(&mut layer, "timers.target", &timer_unit)?;
            }
            if let Some(cpus) = cpus {
                layer.add_made(
                    &self.toml_path,
                    &format!("etc/systemd/system/{unit}.d/50-cpu.conf"),
                    bytes(units::cpu_dropin(&self.name, &cpus)),
                    model::FILE_MODE,
                )?;
            }
            for slot in d.secrets.iter() {
                if let Some(s) = slots.get_mut(slot.get_ref()) {
                    s.units.push(unit.clone());
                }
            }
            let role = match d.role.as_ref().map(|r| r.get_ref().as_str()) {
                Some("signer") => Role::Signer,
                _ => Role::Service,
            };
            services.push(ServiceRecord {
                unit,
                role,
                layer: self.name.clone(),
            });
        }
        services.sort_by(|a, b| a.unit.cmp(&b.unit));

        if let Some(table) = &t.sysctl {
            let when = table.get_ref().get("when");
            let when = match when {
                None => None,
                Some(w) => match w.get_ref().as_str() {
                    Some(s) => Some(Spanned::new(w.span(), s.to_owned())),
                    None => return Err(self.err(w.span(), "when must be a string")),
                },
            };
            if holds(&when)? {
                let mut values_out = BTreeMap::new();
                for (k, v) in table.get_ref() {
                    if k == "when" {
                        continue;
                    }
                    let value = match v.get_ref() {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(i) => i.to_string(),
                        _ => {
                            return Err(self.err(
                                v.span(),
                                format!("sysctl {k}: give the value as a string or an integer"),
                            ));
                        }
                    };
                    values_out.insert(k.clone(), value);
                }
                if !values_out.is_empty() {
                    let text = units::sysctl(&self.name, &values_out)
                        .map_err(|m| self.err(table.span(), m))?;
                    layer.add_made(
                        &self.toml_path,
                        &format!("etc/sysctl.d/90-{stem}.conf"),
                        bytes(text),
                        model::FILE_MODE,
                    )?;
                }
            }
        }

        for u in &t.udev {
            if !holds(&u.when)? {
                continue;
            }
            let name = u.name.get_ref();
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(self.err(
                    u.name.span(),
                    format!("udev rules name {name:?} must be letters, digits, `-` and `_` (like 90-triedb)"),
                ));
            }
            let text = units::udev_rules(&self.name, u.rules.get_ref())
                .map_err(|m| self.err(u.rules.span(), m))?;
            layer.add_made(
                &self.toml_path,
                &format!("etc/udev/rules.d/{name}.rules"),
                bytes(text),
                model::FILE_MODE,
            )?;
        }

        for e in &t.env {
            if !holds(&e.when)? {
                continue;
            }
            let path = self.abs_path(&e.path)?;
            let mode = self.mode(&e.mode)?.unwrap_or(model::FILE_MODE);
            // An artifact carries numeric owners, and on an applied host
            // the live path is a link into the release: the group must be a
            // number known now, not one sysusers picks later.
            let gid = match &e.group {
                None => 0,
                Some(g) => *layer.gids.get(g.get_ref()).ok_or_else(|| {
                    self.err(
                        g.span(),
                        format!(
                            "group {:?} needs a fixed id: declare it in this adapter as [[group]] name = {:?} gid = <number>",
                            g.get_ref(),
                            g.get_ref()
                        ),
                    )
                })?,
            };
            let mut vars = BTreeMap::new();
            for (k, v) in &e.vars {
                let rendered = render(k, v.get_ref(), &values, inputs, &slots, false)
                    .map_err(|m| self.err(v.span(), m))?;
                if secret_looking(k, &rendered) {
                    secret_env.push(SecretEnv {
                        path: path.trim_start_matches('/').to_owned(),
                        key: k.clone(),
                        layer: self.name.clone(),
                    });
                }
                vars.insert(k.clone(), rendered);
            }
            let text =
                units::env_file(&self.name, &vars).map_err(|m| self.err(e.path.span(), m))?;
            let rel = path.trim_start_matches('/');
            layer.add_made(&self.toml_path, rel, bytes(text), mode)?;
            let path = RelPath::new(rel).map_err(|m| self.err(e.path.span(), m))?;
            if let Some(entry) = layer.entry_mut(&path)? {
                entry.gid = gid;
            }
        }

        let mut secrets: Vec<SlotRecord> = slots.into_values().collect();
        for s in &mut secrets {
            s.units.sort();
            s.units.dedup();
        }
        Ok(Adapter {
            name: self.name.clone(),
            dir: self.dir.clone(),
            toml_path: self.toml_path.clone(),
            description: t.description.clone(),
            layer,
            inputs: self.inputs(),
            services,
            secrets,
            prerequisites: prerequisites.into_iter().collect(),
            secret_env,
        })
    }

    fn link(&self, layer: &mut Layer, target: &str, unit: &str) -> Result<()> {
        layer.add_made(
            &self.toml_path,
            &format!("etc/systemd/system/{target}.wants/{unit}"),
            Kind::Symlink {
                target: format!("/usr/lib/systemd/system/{unit}"),
            },
            model::SYMLINK_MODE,
        )
    }

    fn abs_path(&self, p: &Spanned<String>) -> Result<String> {
        let s = p.get_ref();
        let ok = s.starts_with('/')
            && RelPath::new(s.trim_start_matches('/')).is_ok()
            && units::plain_word(s);
        if ok {
            Ok(s.clone())
        } else {
            Err(self.err(
                p.span(),
                format!("path {s:?} must be absolute and normalised, without spaces or quotes"),
            ))
        }
    }

    fn mode(&self, v: &Option<Spanned<i64>>) -> Result<Option<u32>> {
        v.as_ref()
            .map(|v| match u32::try_from(*v.get_ref()) {
                Ok(m) if m <= 0o7777 => Ok(m),
                _ => Err(self.err(
                    v.span(),
                    format!(
                        "mode {} is not a permission mode; write it in octal like 0o640",
                        v.get_ref()
                    ),
                )),
            })
            .transpose()
    }

    /// Checks one `[[service]]` and resolves it into a `units::Service`,
    /// with its timer and CPU list.
    #[allow(clippy::type_complexity)]
    fn service(
        &self,
        d: &ServiceDecl,
        layer: &Layer,
        values: &BTreeMap<String, Value>,
        inputs: &InputVars,
        slots: &BTreeMap<String, SlotRecord>,
    ) -> Result<(units::Service, Option<Timer>, Option<String>)> {
        let name = d.name.get_ref();
        if !valid_unit_stem(name) {
            return Err(self.err(
                d.name.span(),
                format!(
                    "service name {name:?} must be [a-z0-9@-]+ (the unit name without .service)"
                ),
            ));
        }
        if let Some(r) = &d.role
            && !matches!(r.get_ref().as_str(), "signer" | "service")
        {
            return Err(self.err(r.span(), "role must be \"signer\" or \"service\""));
        }
        let kind = match &d.kind {
            None => "simple".to_owned(),
            Some(k) if units::TYPES.contains(&k.get_ref().as_str()) => k.get_ref().clone(),
            Some(k) => {
                return Err(self.err(
                    k.span(),
                    format!(
                        "type {:?} must be one of {}",
                        k.get_ref(),
                        units::TYPES.join(", ")
                    ),
                ));
            }
        };
        let oneshot = kind == "oneshot";
        let description = d.description.clone().unwrap_or_else(|| name.clone());
        if description.chars().any(char::is_control) {
            return Err(self.err(d.name.span(), "description must be one line"));
        }
        let mut exec = Vec::new();
        for (i, arg) in d.exec.get_ref().iter().enumerate() {
            exec.push(
                render(&format!("exec[{i}]"), arg, values, inputs, slots, true)
                    .map_err(|m| self.err(d.exec.span(), m))?,
            );
        }
        units::exec_line(&exec).map_err(|m| self.err(d.exec.span(), m))?;
        // `localhost` may resolve to `::1` (geth's and mev-boost's defaults
        // do): addresses on a command line are written as 127.0.0.1.
        if let Some(arg) = exec
            .iter()
            .find(|a| a.to_ascii_lowercase().contains("localhost"))
        {
            return Err(self.err(
                d.exec.span(),
                format!("exec argument {arg:?} names localhost, which may resolve to ::1; write 127.0.0.1"),
            ));
        }

        let user = match &d.user {
            None => None,
            Some(u) if u.get_ref() == "dynamic" => None,
            Some(u) if layer.users.contains(u.get_ref()) => Some(u.get_ref().clone()),
            Some(u) => {
                return Err(self.err(
                    u.span(),
                    format!(
                        "user {:?} is not declared by this adapter's [[user]]: declare it, or write user = \"dynamic\"",
                        u.get_ref()
                    ),
                ));
            }
        };
        let account = |a: &Spanned<String>| -> Result<String> {
            if generate::valid_account(a.get_ref()) {
                Ok(a.get_ref().clone())
            } else {
                Err(self.err(
                    a.span(),
                    format!("{:?} is not a valid group name", a.get_ref()),
                ))
            }
        };
        let group = d.group.as_ref().map(account).transpose()?;
        let supplementary_groups = d
            .supplementary_groups
            .iter()
            .map(account)
            .collect::<Result<Vec<_>>>()?;
        let state = d
            .state
            .iter()
            .map(|p| self.abs_path(p))
            .collect::<Result<Vec<_>>>()?;
        let mut devices = Vec::new();
        for dev in &d.devices {
            let mut parts = dev.get_ref().split(' ');
            let path = parts.next().unwrap_or("");
            let perms = parts.next();
            let path_ok = (path.starts_with("/dev/")
                || path.starts_with("char-")
                || path.starts_with("block-"))
                && units::plain_word(path);
            let perms_ok = perms.is_none_or(|p| {
                !p.is_empty() && p.bytes().all(|b| matches!(b, b'r' | b'w' | b'm'))
            });
            if !path_ok || !perms_ok || parts.next().is_some() {
                return Err(self.err(
                    dev.span(),
                    format!(
                        "device {:?} must be a /dev path (or char-/block- class) and optional permissions, like \"/dev/triedb rw\"",
                        dev.get_ref()
                    ),
                ));
            }
            devices.push(dev.get_ref().clone());
        }
        let mut capabilities = Vec::new();
        for c in &d.capabilities {
            let ok = c.get_ref().strip_prefix("CAP_").is_some_and(|r| {
                !r.is_empty() && r.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            });
            if !ok {
                return Err(self.err(
                    c.span(),
                    format!(
                        "{:?} is not a capability like CAP_NET_BIND_SERVICE",
                        c.get_ref()
                    ),
                ));
            }
            capabilities.push(c.get_ref().clone());
        }
        let address_families = match &d.address_families {
            None => vec![
                "AF_INET".to_owned(),
                "AF_INET6".to_owned(),
                "AF_UNIX".to_owned(),
            ],
            Some(list) => {
                let mut out = Vec::new();
                for f in list {
                    let ok = f.get_ref() == "none"
                        || f.get_ref().strip_prefix("AF_").is_some_and(|r| {
                            !r.is_empty()
                                && r.bytes()
                                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                        });
                    if !ok {
                        return Err(self.err(
                            f.span(),
                            format!("{:?} is not an address family like AF_INET", f.get_ref()),
                        ));
                    }
                    out.push(f.get_ref().clone());
                }
                if out.is_empty() {
                    return Err(self.err(
                        d.name.span(),
                        "address-families is empty: write [\"none\"] for a service without sockets",
                    ));
                }
                out
            }
        };
        let system_call_filter = match &d.system_call_filter {
            None => vec!["@system-service".to_owned()],
            Some(list) => {
                let mut out = Vec::new();
                for f in list {
                    let ok = !f.get_ref().is_empty()
                        && f.get_ref()
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"@~:_-".contains(&b));
                    if !ok {
                        return Err(self.err(
                            f.span(),
                            format!("{:?} is not a system call or @group", f.get_ref()),
                        ));
                    }
                    out.push(f.get_ref().clone());
                }
                if out.is_empty() {
                    return Err(self.err(
                        d.name.span(),
                        "system-call-filter is empty; leave it out for @system-service",
                    ));
                }
                out
            }
        };
        let mut limits = BTreeMap::new();
        for (k, v) in &d.limits {
            if !units::LIMITS.contains(&k.as_str()) {
                return Err(self.err(
                    v.span(),
                    format!("limit {k:?} is not one of {}", units::LIMITS.join(", ")),
                ));
            }
            let value = match v.get_ref() {
                toml::Value::Integer(i) if *i >= 0 => i.to_string(),
                toml::Value::String(s)
                    if !s.is_empty()
                        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':') =>
                {
                    s.clone()
                }
                _ => {
                    return Err(self.err(
                        v.span(),
                        format!("limit {k}: give a number, \"infinity\" or \"soft:hard\""),
                    ));
                }
            };
            limits.insert(k.clone(), value);
        }
        let mut environment = BTreeMap::new();
        for (k, v) in &d.environment {
            units::environment_assignment(k, v.get_ref()).map_err(|m| self.err(v.span(), m))?;
            environment.insert(k.clone(), v.get_ref().clone());
        }
        let mut environment_files = Vec::new();
        for f in &d.environment_files {
            let bare = Spanned::new(f.span(), f.get_ref().trim_start_matches('-').to_owned());
            self.abs_path(&bare)?;
            environment_files.push(f.get_ref().clone());
        }
        let mut credentials = Vec::new();
        let mut assert_paths = Vec::new();
        for s in &d.secrets {
            let Some(slot) = slots.get(s.get_ref()) else {
                return Err(self.err(
                    s.span(),
                    format!("secret {:?} is not a [[secret]] of this adapter (or its `when` does not hold)", s.get_ref()),
                ));
            };
            if slot.credential {
                credentials.push((slot.name.clone(), slot.path.clone()));
            } else {
                assert_paths.push(slot.path.clone());
            }
        }
        let units_of = |list: &[Spanned<String>]| -> Result<Vec<String>> {
            list.iter()
                .map(|u| {
                    if generate::valid_unit(u.get_ref()) {
                        Ok(u.get_ref().clone())
                    } else {
                        Err(self.err(
                            u.span(),
                            format!("{:?} is not a systemd unit name", u.get_ref()),
                        ))
                    }
                })
                .collect()
        };
        let restart = match &d.restart {
            None if oneshot => None,
            None => Some("on-failure".to_owned()),
            Some(r) if units::RESTARTS.contains(&r.get_ref().as_str()) => Some(r.get_ref().clone()),
            Some(r) => {
                return Err(self.err(
                    r.span(),
                    format!(
                        "restart {:?} must be one of {}",
                        r.get_ref(),
                        units::RESTARTS.join(", ")
                    ),
                ));
            }
        };
        let remain_after_exit = match &d.remain_after_exit {
            Some(r) if *r.get_ref() && !oneshot => {
                return Err(self.err(
                    r.span(),
                    "remain-after-exit is for type = \"oneshot\" services",
                ));
            }
            Some(r) => *r.get_ref(),
            None => false,
        };
        let wanted_by = match &d.wanted_by {
            None => None,
            Some(w) => Some(units_of(std::slice::from_ref(w))?.remove(0)),
        };
        let cpus = match &d.cpu_affinity_param {
            None => None,
            Some(p) => match values.get(p.get_ref()) {
                Some(Value::String(s)) if s.is_empty() => None,
                Some(Value::String(s)) if units::valid_cpu_list(s) => Some(s.clone()),
                Some(Value::String(s)) => {
                    return Err(self.err(
                        p.span(),
                        format!(
                            "parameter {} = {s:?} is not a CPU list like \"8-11\" or \"1,2,3\"",
                            p.get_ref()
                        ),
                    ));
                }
                Some(_) => {
                    return Err(self.err(
                        p.span(),
                        format!("{} is not a string parameter", p.get_ref()),
                    ));
                }
                None => {
                    return Err(self.err(
                        p.span(),
                        format!(
                            "{} is not a parameter this adapter declares under [params]",
                            p.get_ref()
                        ),
                    ));
                }
            },
        };
        let timer = match &d.timer {
            None => None,
            Some(_) if !oneshot => {
                return Err(self.err(
                    d.name.span(),
                    "a timer starts a oneshot: set type = \"oneshot\"",
                ));
            }
            Some(t) => {
                let cal = &t.get_ref().on_calendar;
                if cal.is_empty() || cal.chars().any(char::is_control) {
                    return Err(self.err(
                        t.span(),
                        "timer on-calendar must be one non-empty line, like \"hourly\"",
                    ));
                }
                Some(Timer {
                    on_calendar: cal.clone(),
                    persistent: t.get_ref().persistent,
                })
            }
        };
        Ok((
            units::Service {
                name: name.clone(),
                description,
                kind,
                exec,
                user,
                group,
                supplementary_groups,
                state,
                devices,
                capabilities,
                address_families,
                memory_deny_write_execute: d.memory_deny_write_execute.unwrap_or(true),
                system_call_filter,
                limits,
                environment,
                environment_files,
                credentials,
                assert_paths,
                after: units_of(&d.after)?,
                wants: units_of(&d.wants)?,
                requires: units_of(&d.requires)?,
                restart,
                remain_after_exit,
                wanted_by,
            },
            timer,
            cpus,
        ))
    }
}

pub use crate::compose::params::when_holds;

/// Renders one template string of an adapter. With `exec`, every `$` that
/// comes from a value (a parameter, a path) is doubled so systemd does not
/// expand it; `{{ credentials }}` stays `${CREDENTIALS_DIRECTORY}`.
fn render(
    name: &str,
    source: &str,
    values: &BTreeMap<String, Value>,
    inputs: &InputVars,
    slots: &BTreeMap<String, SlotRecord>,
    exec: bool,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    if exec {
        env.set_formatter(|out, _state, value| {
            let text = value.to_string();
            let text = if value.is_safe() {
                text
            } else {
                units::escape_dollars(&text)
            };
            out.write_str(&text)
                .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write"))
        });
    }
    let mut ctx = overlay::param_vars(values);
    ctx.insert(
        "inputs".to_owned(),
        minijinja::Value::from_serialize(inputs),
    );
    let secrets: BTreeMap<&str, BTreeMap<&str, &str>> = slots
        .values()
        .map(|s| (s.name.as_str(), BTreeMap::from([("path", s.path.as_str())])))
        .collect();
    ctx.insert(
        "secrets".to_owned(),
        minijinja::Value::from_serialize(&secrets),
    );
    ctx.insert(
        "credentials".to_owned(),
        minijinja::Value::from_safe_string(CREDENTIALS.to_owned()),
    );
    let ctx = minijinja::Value::from_serialize(&ctx);
    env.template_from_named_str(name, source)
        .and_then(|t| t.render(ctx))
        .map_err(|e| {
            let what = e
                .detail()
                .map_or_else(|| e.kind().to_string(), str::to_owned);
            format!("template {name}: {what}")
        })
}

/// A name or value that looks like it holds a secret.
pub fn secret_looking(key: &str, value: &str) -> bool {
    let k = key.to_ascii_uppercase();
    !value.is_empty()
        && ["PASSWORD", "SECRET", "TOKEN", "PRIVATE", "KEY"]
            .iter()
            .any(|w| k.contains(w))
}

/// `[a-z0-9-]+`.
fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `[a-z0-9@-]+`.
fn valid_unit_stem(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'@')
}

/// A Debian package name: `[a-z0-9][a-z0-9+.-]+`.
fn valid_package(s: &str) -> bool {
    s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b))
}

fn bytes(text: String) -> Kind {
    Kind::File {
        size: text.len() as u64,
        source: Source::Bytes(text.into_bytes().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn load(toml: &str) -> Result<Adapter> {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("adapter.toml"), toml).unwrap();
        AdapterSource::read("t", dir.path())?.load(&ProfileParams::default(), &InputVars::new())
    }

    fn file(a: &Adapter, path: &str) -> String {
        match &a.layer.entries[&RelPath::new(path).unwrap()].kind {
            Kind::File {
                source: Source::Bytes(b),
                ..
            } => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("{path}: {other:?}"),
        }
    }

    const BASE: &str = "[params.chain]\ntype = \"string\"\ndefault = \"main$net\"\n\
        [params.cpus]\ntype = \"string\"\ndefault = \"\"\n\
        [[user]]\nname = \"node\"\n";

    #[test]
    fn exec_templates_escape_values_but_keep_credentials() {
        let a = load(&format!(
            "{BASE}[[secret]]\nname = \"pw\"\npath = \"/etc/x/pw\"\n\
             [[service]]\nname = \"x\"\nuser = \"node\"\nsecrets = [\"pw\"]\n\
             exec = [\"/usr/bin/x\", \"--chain={{{{ params.chain }}}}\", \"--pw={{{{ credentials }}}}/pw\", \"--path={{{{ secrets.pw.path }}}}\", \"50%\", \"${{HOME}}\"]\n"
        ))
        .unwrap();
        let u = file(&a, "usr/lib/systemd/system/x.service");
        assert!(
            u.contains("\nExecStart=/usr/bin/x --chain=main$$net --pw=${CREDENTIALS_DIRECTORY}/pw --path=/etc/x/pw 50%% ${HOME}\n"),
            "{u}"
        );
        assert!(u.contains("\nLoadCredential=pw:/etc/x/pw\n"));
        assert!(u.contains("\nUser=node\n"));
        assert_eq!(a.secrets[0].units, ["x.service"]);
        assert_eq!(a.services[0].role, Role::Service);
    }

    #[test]
    fn when_selects_and_errors_are_located() {
        let a = load(&format!(
            "{BASE}[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\nwhen = \"chain == 'main$net'\"\n\
             [[service]]\nname = \"b\"\nexec = [\"/bin/b\"]\nwhen = \"chain == test\"\n"
        ))
        .unwrap();
        let units: Vec<_> = a.services.iter().map(|s| s.unit.as_str()).collect();
        assert_eq!(units, ["a.service"]);
        let cases = [
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\nwhen = \"nope == x\"\n",
                "adapter.toml:12:8: when names \"nope\"",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\nbogus = 1\n",
                ":12:1: unknown field `bogus`",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\nuser = \"root\"\n",
                "user \"root\" is not declared",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"a\"]\n",
                "must be an absolute path",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\nsecrets = [\"nope\"]\n",
                "secret \"nope\" is not a [[secret]]",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\ncpu-affinity-param = \"chain\"\n",
                "is not a CPU list",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\ntimer = { on-calendar = \"hourly\" }\n",
                "a timer starts a oneshot",
            ),
            (
                "surprise = 1\n",
                ":9:1: unknown field `surprise`, expected one of `name`",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\", \"{{ inputs.img.reference }}\"]\n",
                "adapter.toml:11:8: template exec[1]: ",
            ),
            (
                "[[env]]\npath = \"/etc/x.env\"\ngroup = \"node\"\n",
                ":11:9: group \"node\" needs a fixed id",
            ),
            (
                "[[service]]\nname = \"a\"\nexec = [\"/bin/a\", \"--http.addr=localhost\"]\n",
                ":11:8: exec argument \"--http.addr=localhost\" names localhost",
            ),
        ];
        // At the top level, the adapter's own keys are among those expected.
        let err = load("surprise = 1\n").unwrap_err().to_string();
        assert!(
            err.contains("adapter.toml:1:1: unknown field `surprise`, expected one of `replace`"),
            "{err}"
        );
        assert!(err.ends_with("`symlink`, `description`, `prerequisites`, `input`, `service`, `secret`, `sysctl`, `udev`, `env`"), "{err}");
        for (extra, want) in cases {
            let err = load(&format!("{BASE}{extra}")).unwrap_err().to_string();
            assert!(err.contains(want), "{extra:?}: {err}");
        }
    }

    #[test]
    fn the_rest_is_generated() {
        let a = load(&format!(
            "prerequisites = [\"liburing2\", \"docker-ce\", \"liburing2\"]\n{BASE}\
             [[service]]\nname = \"job\"\ntype = \"oneshot\"\nexec = [\"/bin/job\"]\ntimer = {{ on-calendar = \"hourly\", persistent = true }}\n\
             [[service]]\nname = \"d\"\nexec = [\"/bin/d\"]\nwanted-by = \"multi-user.target\"\nenvironment = {{ API_TOKEN = \"x\" }}\n\
             [sysctl]\n\"net.core.rmem_max\" = \"62500000\"\n\"vm.nr_hugepages\" = 2048\n\
             [[udev]]\nname = \"90-triedb\"\nrules = ['KERNEL==\"x\", MODE=\"0660\"']\n\
             [[group]]\nname = \"node\"\ngid = 951\n[[env]]\npath = \"/etc/x/x.env\"\nmode = 0o640\ngroup = \"node\"\nvars = {{ CHAIN = \"c_{{{{ chain }}}}\" }}\n"
        ))
        .unwrap();
        assert_eq!(a.prerequisites, ["docker-ce", "liburing2"]);
        assert!(file(&a, "usr/lib/systemd/system/job.timer").contains("OnCalendar=hourly"));
        let link = &a.layer.entries
            [&RelPath::new("etc/systemd/system/timers.target.wants/job.timer").unwrap()];
        assert_eq!(
            link.kind,
            Kind::Symlink {
                target: "/usr/lib/systemd/system/job.timer".into()
            }
        );
        assert!(a.layer.entries.contains_key(
            &RelPath::new("etc/systemd/system/multi-user.target.wants/d.service").unwrap()
        ));
        assert!(
            file(&a, "etc/sysctl.d/90-t.conf")
                .ends_with("net.core.rmem_max = 62500000\nvm.nr_hugepages = 2048\n")
        );
        assert!(
            file(&a, "etc/udev/rules.d/90-triedb.rules")
                .ends_with("KERNEL==\"x\", MODE=\"0660\"\n")
        );
        assert!(file(&a, "etc/x/x.env").ends_with("CHAIN=\"c_main\\$net\"\n"));
        assert_eq!(
            a.layer.entries[&RelPath::new("etc/x/x.env").unwrap()].mode,
            0o640
        );
        assert_eq!(
            a.layer.entries[&RelPath::new("etc/x/x.env").unwrap()].gid,
            951
        );
        assert_eq!(a.secret_env.len(), 1);
        assert_eq!(a.secret_env[0].key, "API_TOKEN");
    }

    #[test]
    fn inputs_stay_opaque_with_their_locations() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("adapter.toml"),
            format!(
                "{BASE}[[input]]\nname = \"x\"\nanything = {{ goes = 1 }}\nwhen = \"chain == a\"\n"
            ),
        )
        .unwrap();
        let src = AdapterSource::read("t", dir.path()).unwrap();
        let inputs = src.inputs();
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0]["anything"]["goes"].as_integer(), Some(1));
        assert!(
            src.input_locations()[0].ends_with("adapter.toml:9:1"),
            "{:?}",
            src.input_locations()
        );
        let values = src.param_values(&ProfileParams::default()).unwrap();
        assert_eq!(values["chain"], Value::String("main$net".into()));
        assert_eq!(
            when_holds(inputs[0]["when"].as_str().unwrap(), &values),
            Ok(false)
        );
        let a = src
            .load(&ProfileParams::default(), &InputVars::new())
            .unwrap();
        assert_eq!(a.inputs, inputs);
    }

    #[test]
    fn conditions() {
        let v = BTreeMap::from([
            ("c".to_owned(), Value::String("geth".into())),
            ("n".to_owned(), Value::Integer(1)),
        ]);
        assert_eq!(when_holds("c == geth", &v), Ok(true));
        assert_eq!(when_holds("c==\"reth\"", &v), Ok(false));
        assert!(when_holds("n == 1", &v).is_err());
        assert!(when_holds("c = geth", &v).is_err());
    }
}
