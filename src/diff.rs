//! `diff`: what changes between two releases, from their manifests alone —
//! name and version, the artifact, the inputs (profile digest, source date),
//! the layers, what each declares about its hosts (pinned inputs, services
//! and their roles, secret slots, prerequisites), and every entry added,
//! removed or changed (type, content, mode, owner, link target). What an operator reads before a rollout.
//! Pure: the caller loads (and, with keys, authenticates) the manifests.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::artifact::manifest::{EntryType, Manifest, ManifestEntry};

/// A value on each side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pair<T> {
    pub a: T,
    pub b: T,
    pub changed: bool,
}

impl<T: PartialEq + Clone> Pair<T> {
    fn of(a: &T, b: &T) -> Pair<T> {
        Pair {
            a: a.clone(),
            b: b.clone(),
            changed: a != b,
        }
    }
}

/// A layer's entry count on each side (`None`: the side has no such layer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerChange {
    pub name: String,
    pub a: Option<u64>,
    pub b: Option<u64>,
}

/// An entry present on both sides that differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryChange {
    pub path: String,
    /// Which of `type`, `content`, `mode`, `owner`, `target` differ.
    pub fields: Vec<&'static str>,
    pub a: ManifestEntry,
    pub b: ManifestEntry,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Entries {
    pub added: Vec<ManifestEntry>,
    pub removed: Vec<ManifestEntry>,
    pub changed: Vec<EntryChange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub name: Pair<String>,
    pub version: Pair<String>,
    pub artifact: Pair<crate::artifact::manifest::ArchiveInfo>,
    pub profile_sha256: Pair<crate::trust::digest::Sha256>,
    pub source_date_epoch: Pair<u64>,
    /// Layers, in `b`'s order then those only `a` has; only those whose
    /// entry count differs or that one side lacks.
    pub layers: Vec<LayerChange>,
    /// What the releases declare about their hosts, by kind and name:
    /// inputs, services (and their roles), secret slots, prerequisites.
    pub declared: Vec<Declared>,
    pub entries: Entries,
}

/// One declaration added (`a` null), removed (`b` null) or changed, each
/// side in one line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Declared {
    /// `input`, `service`, `secret` or `prerequisite`.
    pub kind: &'static str,
    pub name: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

/// The declarations of `m`, by (kind, name), each summed up in one line.
fn declarations(m: &Manifest) -> BTreeMap<(&'static str, String), String> {
    let inputs = m.inputs.iter().map(|i| {
        let line = format!("{} {} {} sha256 {}", i.kind, i.version, i.url, i.sha256);
        (("input", i.name.clone()), line)
    });
    let services = m
        .services
        .iter()
        .map(|s| (("service", s.unit.clone()), s.role.clone()));
    let secrets = m.secrets.iter().map(|s| {
        let line = format!(
            "{} {}:{} {:04o} for {}",
            s.path,
            s.owner,
            s.group,
            s.mode,
            s.units.join(" ")
        );
        (("secret", s.name.clone()), line)
    });
    let prerequisites = m
        .prerequisites
        .iter()
        .map(|p| (("prerequisite", p.clone()), "required".to_owned()));
    inputs
        .chain(services)
        .chain(secrets)
        .chain(prerequisites)
        .collect()
}

fn declared(a: &Manifest, b: &Manifest) -> Vec<Declared> {
    let (old, new) = (declarations(a), declarations(b));
    let keys: std::collections::BTreeSet<&(&'static str, String)> =
        old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| Declared {
            kind: k.0,
            name: k.1.clone(),
            a: old.get(k).cloned(),
            b: new.get(k).cloned(),
        })
        .collect()
}

/// Compares release `a` (the one running, say) with `b` (the candidate).
pub fn diff(a: &Manifest, b: &Manifest) -> Diff {
    let a_layers: BTreeMap<&str, u64> = a.layers.iter().map(|l| (&*l.name, l.entries)).collect();
    let b_layers: BTreeMap<&str, u64> = b.layers.iter().map(|l| (&*l.name, l.entries)).collect();
    let mut layers: Vec<LayerChange> = b
        .layers
        .iter()
        .map(|l| LayerChange {
            name: l.name.clone(),
            a: a_layers.get(&*l.name).copied(),
            b: Some(l.entries),
        })
        .chain(
            a.layers
                .iter()
                .filter(|l| !b_layers.contains_key(&*l.name))
                .map(|l| LayerChange {
                    name: l.name.clone(),
                    a: Some(l.entries),
                    b: None,
                }),
        )
        .collect();
    layers.retain(|l| l.a != l.b);

    let old: BTreeMap<&str, &ManifestEntry> =
        a.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let new: BTreeMap<&str, &ManifestEntry> =
        b.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut entries = Entries::default();
    for (path, e) in &new {
        match old.get(path) {
            None => entries.added.push((*e).clone()),
            Some(o) => {
                let fields = changed_fields(o, e);
                if !fields.is_empty() {
                    entries.changed.push(EntryChange {
                        path: (*path).to_owned(),
                        fields,
                        a: (*o).clone(),
                        b: (*e).clone(),
                    });
                }
            }
        }
    }
    entries.removed = old
        .iter()
        .filter(|(p, _)| !new.contains_key(*p))
        .map(|(_, e)| (*e).clone())
        .collect();
    Diff {
        name: Pair::of(&a.name, &b.name),
        version: Pair::of(&a.version, &b.version),
        artifact: Pair::of(&a.archive, &b.archive),
        profile_sha256: Pair::of(&a.profile_sha256, &b.profile_sha256),
        source_date_epoch: Pair::of(&a.source_date_epoch, &b.source_date_epoch),
        layers,
        declared: declared(a, b),
        entries,
    }
}

/// What differs between two entries at one path. The layer an entry came
/// from is provenance, not host state: it is not a change.
fn changed_fields(a: &ManifestEntry, b: &ManifestEntry) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if a.kind != b.kind {
        fields.push("type");
    }
    if (a.sha256, a.size) != (b.sha256, b.size) {
        fields.push("content");
    }
    if a.mode != b.mode {
        fields.push("mode");
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        fields.push("owner");
    }
    if a.target != b.target {
        fields.push("target");
    }
    fields
}

impl Diff {
    /// No entry is added, removed or changed.
    pub fn same_entries(&self) -> bool {
        let e = &self.entries;
        e.added.is_empty() && e.removed.is_empty() && e.changed.is_empty()
    }

    /// The human report: a header, then one line per entry.
    pub fn describe(&self, out: &mut impl Write) -> std::io::Result<()> {
        let (n, v) = (&self.name, &self.version);
        writeln!(out, "release:   {} {} -> {} {}", n.a, v.a, n.b, v.b)?;
        let art = &self.artifact;
        writeln!(
            out,
            "artifact:  {} {} bytes sha256 {} -> {} {} bytes sha256 {}",
            art.a.format, art.a.size, art.a.sha256, art.b.format, art.b.size, art.b.sha256
        )?;
        let p = &self.profile_sha256;
        let profile = if p.changed {
            format!("profile sha256 {} -> {}", p.a, p.b)
        } else {
            format!("profile sha256 {} (same)", p.a)
        };
        let d = &self.source_date_epoch;
        let date = if d.changed {
            format!("source date {} -> {}", d.a, d.b)
        } else {
            format!("source date {} (same)", d.a)
        };
        writeln!(out, "inputs:    {profile}; {date}")?;
        if self.layers.is_empty() {
            writeln!(out, "layers:    same names and entry counts")?;
        }
        for l in &self.layers {
            let count = |c: Option<u64>| c.map_or("absent".to_owned(), |c| format!("{c} entries"));
            writeln!(
                out,
                "layer:     {}: {} -> {}",
                l.name,
                count(l.a),
                count(l.b)
            )?;
        }
        for d in &self.declared {
            let side = |s: &Option<String>| s.clone().unwrap_or_else(|| "absent".to_owned());
            let mark = match (&d.a, &d.b) {
                (None, _) => '+',
                (_, None) => '-',
                _ => '~',
            };
            writeln!(
                out,
                "declared:  {mark} {} {}: {} -> {}",
                d.kind,
                d.name,
                side(&d.a),
                side(&d.b)
            )?;
        }
        let e = &self.entries;
        writeln!(
            out,
            "entries:   {} added, {} removed, {} changed",
            e.added.len(),
            e.removed.len(),
            e.changed.len()
        )?;
        for x in &e.added {
            writeln!(out, "  + {}  {}", x.path, summary(x))?;
        }
        for x in &e.removed {
            writeln!(out, "  - {}  {}", x.path, summary(x))?;
        }
        for c in &e.changed {
            let what: Vec<String> = c
                .fields
                .iter()
                .map(|f| field_change(f, &c.a, &c.b))
                .collect();
            writeln!(out, "  ~ {}  {}", c.path, what.join("; "))?;
        }
        Ok(())
    }
}

fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Dir => "dir",
        EntryType::File => "file",
        EntryType::Symlink => "symlink",
    }
}

/// `file 0644 0:0 12 bytes`, `symlink -> target`, `dir 0755 0:0`.
fn summary(e: &ManifestEntry) -> String {
    let mut s = format!("{} {:04o} {}:{}", kind_name(e.kind), e.mode, e.uid, e.gid);
    if let Some(size) = e.size {
        s.push_str(&format!(" {size} bytes"));
    }
    if let Some(t) = &e.target {
        s.push_str(&format!(" -> {t}"));
    }
    s
}

fn field_change(field: &str, a: &ManifestEntry, b: &ManifestEntry) -> String {
    let content = |e: &ManifestEntry| match (e.size, e.sha256) {
        (Some(n), Some(d)) => format!("{n} bytes sha256 {d}"),
        _ => "none".to_owned(),
    };
    let target = |e: &ManifestEntry| e.target.clone().unwrap_or_else(|| "none".to_owned());
    match field {
        "type" => format!("type {} -> {}", kind_name(a.kind), kind_name(b.kind)),
        "content" => format!("content {} -> {}", content(a), content(b)),
        "mode" => format!("mode {:04o} -> {:04o}", a.mode, b.mode),
        "owner" => format!("owner {}:{} -> {}:{}", a.uid, a.gid, b.uid, b.gid),
        _ => format!("target {} -> {}", target(a), target(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RelPath;

    fn entry(path: &str, kind: EntryType, mode: u32, content: Option<u8>) -> ManifestEntry {
        ManifestEntry {
            gid: 0,
            input: None,
            layer: "l".into(),
            mode,
            path: RelPath::new(path).unwrap(),
            sha256: content.map(|c| crate::trust::digest::Sha256::of(&[c])),
            size: content.map(|_| 1),
            target: None,
            kind,
            uid: 0,
        }
    }

    #[test]
    fn entries_added_removed_and_changed_by_field() {
        let file = |p, m, c| entry(p, EntryType::File, m, Some(c));
        let mut a = Vec::new();
        a.push(file("etc/a", 0o644, 1));
        a.push(file("etc/gone", 0o644, 1));
        a.push(file("etc/same", 0o644, 1));
        let mut b = vec![file("etc/a", 0o600, 2), file("etc/new", 0o644, 1)];
        let mut moved = file("etc/same", 0o644, 1);
        moved.layer = "other".into();
        b.push(moved);
        let mut link = entry("etc/l", EntryType::Symlink, 0o777, None);
        link.target = Some("a".to_owned());
        a.push(link.clone());
        link.target = Some("b".to_owned());
        link.uid = 5;
        b.push(link);
        let e = changed_entries(&a, &b);
        let paths = |v: &[ManifestEntry]| v.iter().map(|e| e.path.to_string()).collect::<Vec<_>>();
        assert_eq!(paths(&e.added), ["etc/new"]);
        assert_eq!(paths(&e.removed), ["etc/gone"]);
        let changed: Vec<(&str, Vec<&str>)> = e
            .changed
            .iter()
            .map(|c| (&*c.path, c.fields.clone()))
            .collect();
        // A layer-only move is not a change on the host.
        assert_eq!(
            changed,
            [
                ("etc/a", vec!["content", "mode"]),
                ("etc/l", vec!["owner", "target"])
            ]
        );
    }

    fn manifest(entries: &[ManifestEntry]) -> Manifest {
        Manifest {
            archive: crate::artifact::manifest::ArchiveInfo {
                format: "tar.zst".to_owned(),
                sha256: crate::trust::digest::Sha256::of(b""),
                size: 0,
                tar_sha256: crate::trust::digest::Sha256::of(b""),
                tar_size: 0,
            },
            entries: entries.to_vec(),
            layers: Vec::new(),
            name: "p".to_owned(),
            inputs: Vec::new(),
            prerequisites: Vec::new(),
            secrets: Vec::new(),
            services: Vec::new(),
            profile_sha256: crate::trust::digest::Sha256::of(b""),
            schema: 1,
            source_date_epoch: 0,
            version: "1.0.0".to_owned(),
        }
    }

    fn changed_entries(a: &[ManifestEntry], b: &[ManifestEntry]) -> Entries {
        diff(&manifest(a), &manifest(b)).entries
    }

    #[test]
    fn declarations_added_removed_and_changed() {
        use crate::artifact::manifest::{SecretSlot, ServiceInfo};
        let service = |unit: &str, role: &str| ServiceInfo {
            layer: "chain".into(),
            role: role.into(),
            unit: unit.into(),
        };
        let slot = |mode: u32| SecretSlot {
            description: "d".into(),
            group: "monad".into(),
            kind: None,
            layer: "chain".into(),
            mode,
            name: "keystore-password".into(),
            owner: "root".into(),
            path: "/etc/monad/pw".into(),
            units: vec!["bft.service".into()],
        };
        let mut a = manifest(&[]);
        a.services = vec![
            service("bft.service", "service"),
            service("old.service", "service"),
        ];
        a.secrets = vec![slot(0o640)];
        a.prerequisites = vec!["liburing2".into()];
        let mut b = manifest(&[]);
        b.services = vec![
            service("bft.service", "signer"),
            service("rpc.service", "service"),
        ];
        b.secrets = vec![slot(0o600)];
        b.prerequisites = vec!["liburing2".into(), "docker.io".into()];
        let d = diff(&a, &b).declared;
        let got: Vec<(&str, &str, Option<&str>, Option<&str>)> = d
            .iter()
            .map(|x| (x.kind, x.name.as_str(), x.a.as_deref(), x.b.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("prerequisite", "docker.io", None, Some("required")),
                (
                    "secret",
                    "keystore-password",
                    Some("/etc/monad/pw root:monad 0640 for bft.service"),
                    Some("/etc/monad/pw root:monad 0600 for bft.service")
                ),
                ("service", "bft.service", Some("service"), Some("signer")),
                ("service", "old.service", Some("service"), None),
                ("service", "rpc.service", None, Some("service")),
            ]
        );
        let mut text = Vec::new();
        diff(&a, &b).describe(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("declared:  ~ service bft.service: service -> signer\n"),
            "{text}"
        );
    }
}
