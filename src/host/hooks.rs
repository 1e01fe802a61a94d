//! What an activation asks of the running system: reload systemd, apply
//! sysusers/tmpfiles/sysctl and the nftables ruleset, restart exactly the
//! units whose files changed, and stop signer units (the release's
//! `services` with role `signer`) before the switch and start them after it
//! (never two releases' signers at once). Run only on a live root (`/`
//! with systemd running); anywhere else the commands are printed as a plan.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::artifact::manifest::{Manifest, ManifestEntry};
use crate::compose::FIREWALL_PATH;
use crate::error::{Error, Result};
use crate::model::RelPath;

/// Configuration of base-OS services that read it only when they start or
/// reload: a release that changes a path under the prefix has the service
/// reloaded (`try-reload-or-restart`: only if it runs), so the running
/// daemon uses the release's configuration, not only the files on disk.
const CONFIG_OWNERS: [(&str, &str); 5] = [
    ("etc/ssh/", "ssh.service"),
    ("etc/fail2ban/", "fail2ban.service"),
    ("etc/systemd/timesyncd.conf", "systemd-timesyncd.service"),
    ("etc/systemd/journald.conf", "systemd-journald.service"),
    ("etc/systemd/resolved.conf", "systemd-resolved.service"),
];

/// Prefixes of the paths whose change runs a command of their own.
const SYSTEMD: &str = "etc/systemd/";
const SYSUSERS: [&str; 2] = ["etc/sysusers.d/", "usr/lib/sysusers.d/"];
const TMPFILES: [&str; 2] = ["etc/tmpfiles.d/", "usr/lib/tmpfiles.d/"];
const SYSCTL: [&str; 2] = ["etc/sysctl.d/", "usr/lib/sysctl.d/"];

/// Directories whose unit files systemd loads.
const UNIT_DIRS: [&str; 2] = ["etc/systemd/system/", "usr/lib/systemd/system/"];
const UNIT_SUFFIXES: [&str; 4] = [".service", ".socket", ".timer", ".path"];

/// The commands of one activation, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Signer units stopped before the switch.
    pub stop_before: Vec<String>,
    /// Units stopped after the switch because the new release removed them.
    pub stop_after: Vec<String>,
    pub daemon_reload: bool,
    pub sysusers: bool,
    pub tmpfiles: bool,
    pub sysctl: bool,
    pub firewall: bool,
    pub restart: Vec<String>,
    /// Base-OS services whose configuration the release changed
    /// (`CONFIG_OWNERS`): reloaded, or restarted, if running.
    #[serde(default)]
    pub reload: Vec<String>,
    /// Units an overlay (not an adapter) of this activation enables (a
    /// `.wants/` link it adds), neither signers nor consumers of a secret
    /// slot: (re)started, so the base's services run without a reboot.
    /// What adapters enable starts when the operator starts it or at the
    /// next boot; signers only as `start` says.
    #[serde(default)]
    pub start_enabled: Vec<String>,
    /// Signer units started after the switch, one at a time.
    pub start: Vec<String>,
}

/// The units a release declares as signers (they sign with validator keys:
/// two releases' signers must never run at once).
pub fn signers(m: &Manifest) -> BTreeSet<String> {
    m.services
        .iter()
        .filter(|s| s.role == "signer")
        .map(|s| s.unit.clone())
        .collect()
}

/// `[A-Za-z0-9:_.@\\-]+` with a unit suffix, not starting with `-`.
fn is_unit_name(unit: &str) -> bool {
    !unit.starts_with('-')
        && unit.len() <= 256
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.@\\-".contains(&b))
        && UNIT_SUFFIXES.iter().any(|s| unit.ends_with(s))
}

/// The unit a path belongs to: a unit file or a file in its `.d/` drop-in
/// directory under a systemd unit directory.
fn unit_of(path: &RelPath) -> Option<String> {
    let p = path.as_str();
    let rest = UNIT_DIRS.iter().find_map(|d| p.strip_prefix(d))?;
    let unit = match rest.split_once('/') {
        None => rest,
        Some((dir, _)) if !dir.ends_with(".wants") && !dir.ends_with(".requires") => {
            dir.strip_suffix(".d")?
        }
        Some(_) => return None,
    };
    UNIT_SUFFIXES
        .iter()
        .any(|s| unit.ends_with(s))
        .then(|| unit.to_owned())
}

/// What of a plan the hooks depend on, gathered as the plan is made: the
/// units the new release has files for, and those of its added, changed
/// and removed paths that a hook looks at (`matters`), few whatever the
/// release's size.
#[derive(Debug, Default)]
pub struct Changes {
    units: BTreeSet<String>,
    /// Added paths that matter, with the layer that put them there.
    added: Vec<(RelPath, std::sync::Arc<str>)>,
    /// Added, changed and removed paths that matter.
    touched: Vec<RelPath>,
}

impl Changes {
    /// `e`, an entry of the new release (each once).
    pub fn entry(&mut self, e: &ManifestEntry) {
        if let Some(unit) = unit_of(&e.path) {
            self.units.insert(unit);
        }
    }

    /// `e`, an entry the new release adds.
    pub fn added(&mut self, e: &ManifestEntry) {
        if matters(&e.path) {
            self.added.push((e.path.clone(), e.layer.clone()));
            self.touched.push(e.path.clone());
        }
    }

    pub fn changed(&mut self, path: &RelPath) {
        if matters(path) {
            self.touched.push(path.clone());
        }
    }

    pub fn removed(&mut self, path: &RelPath) {
        self.changed(path);
    }
}

/// Whether a hook looks at `path` when it is added, changed or removed:
/// every prefix `Hooks::of` asks about, and the firewall's file.
fn matters(path: &RelPath) -> bool {
    let p = path.as_str();
    let prefixed = [SYSTEMD]
        .iter()
        .chain(&SYSUSERS)
        .chain(&TMPFILES)
        .chain(&SYSCTL)
        .chain(&UNIT_DIRS)
        .chain(CONFIG_OWNERS.iter().map(|(prefix, _)| prefix))
        .any(|x| p.starts_with(x));
    prefixed || p == FIREWALL_PATH
}

impl Hooks {
    /// The hooks for moving from `old` to `new`, given which paths were
    /// added, changed and removed. `old` is the release active before: on a
    /// switch between releases (`old` another release, or none) every
    /// signer of `old` is stopped before the switch, and those the new
    /// release keeps are started after it, one at a time. A signer the new
    /// release adds is enabled but never started here: it may be signing
    /// elsewhere, and its secrets may not be in place yet. On a repair of
    /// the active release (`old` is `new`) only signers whose files changed
    /// are stopped and started again.
    /// `plan` of a manifest that holds its entries (`new`), given the
    /// paths themselves.
    pub fn plan(
        old: Option<&Manifest>,
        new: &Manifest,
        added: &[RelPath],
        changed: &[RelPath],
        removed: &[RelPath],
    ) -> Hooks {
        let mut changes = Changes::default();
        new.entries.iter().for_each(|e| changes.entry(e));
        for p in added {
            match new.entry(p) {
                Some(e) => changes.added(e),
                // Touched, but from no layer of `new`.
                None => changes.changed(p),
            }
        }
        changed.iter().for_each(|p| changes.changed(p));
        removed.iter().for_each(|p| changes.removed(p));
        Hooks::of(old, new, &changes)
    }

    /// The hooks for moving from `old` to `new` (whose entries need not be
    /// held), given the `changes` gathered as the plan was made.
    pub fn of(old: Option<&Manifest>, new: &Manifest, changes: &Changes) -> Hooks {
        let touched = &changes.touched;
        let under = |prefix: &str| touched.iter().any(|p| p.as_str().starts_with(prefix));
        let under_any = |prefixes: &[&str]| prefixes.iter().any(|x| under(x));
        let new_units = &changes.units;
        let changed_units: BTreeSet<String> = touched.iter().filter_map(unit_of).collect();
        let old_signers = old.map(signers).unwrap_or_default();
        let new_signers = signers(new);
        let repair = old.is_some_and(|o| o == new);
        let mut hooks = Hooks {
            daemon_reload: !changed_units.is_empty() || under(SYSTEMD),
            sysusers: under_any(&SYSUSERS),
            tmpfiles: under_any(&TMPFILES),
            sysctl: under_any(&SYSCTL),
            firewall: touched.iter().any(|p| p.as_str() == FIREWALL_PATH),
            ..Hooks::default()
        };
        let stopped: BTreeSet<String> = if repair {
            changed_units.intersection(&new_signers).cloned().collect()
        } else {
            old_signers.clone()
        };
        hooks.stop_before = stopped.iter().cloned().collect();
        hooks.start = stopped.intersection(&new_signers).cloned().collect();
        let needs_secrets: BTreeSet<&str> = new
            .secrets
            .iter()
            .flat_map(|slot| slot.units.iter().map(String::as_str))
            .collect();
        // Layers that declare services or secret slots are adapters: what
        // they enable may need a device, a secret or an order the operator
        // controls (a chain's database, its signer), so it starts when the
        // operator starts it, or at the next boot.
        let adapter_layers: BTreeSet<&str> = new
            .services
            .iter()
            .map(|s| s.layer.as_str())
            .chain(new.secrets.iter().map(|s| s.layer.as_str()))
            .collect();
        let enabled: BTreeSet<String> = (changes.added.iter())
            .filter(|(_, layer)| !adapter_layers.contains(&**layer))
            .filter_map(|(p, _)| wanted_unit(p))
            .filter(|u| !new_signers.contains(u) && !needs_secrets.contains(u.as_str()))
            .collect();
        hooks.start_enabled = enabled.iter().cloned().collect();
        hooks.reload = CONFIG_OWNERS
            .iter()
            .filter(|(prefix, _)| under(prefix))
            .map(|(_, unit)| (*unit).to_owned())
            .filter(|u| !changed_units.contains(u) && !enabled.contains(u))
            .collect();
        for unit in changed_units {
            if old_signers.contains(&unit) || new_signers.contains(&unit) {
                continue;
            }
            if enabled.contains(&unit) {
                continue;
            }
            if new_units.contains(&unit) {
                hooks.restart.push(unit);
            } else {
                hooks.stop_after.push(unit);
            }
        }
        hooks
    }

    /// Whether every unit name is one systemd could load (read back from a
    /// journal on disk, they become `systemctl` arguments).
    pub fn check(&self) -> Result<(), String> {
        let units = [
            &self.stop_before,
            &self.stop_after,
            &self.restart,
            &self.reload,
            &self.start_enabled,
            &self.start,
        ];
        match units.into_iter().flatten().find(|u| !is_unit_name(u)) {
            Some(bad) => Err(format!("{bad:?} is not a systemd unit name")),
            None => Ok(()),
        }
    }

    /// The commands run before the switch.
    pub fn before(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        if !self.stop_before.is_empty() {
            out.push(systemctl("stop", &self.stop_before));
        }
        out
    }

    /// The commands run after the switch, in order: `settle`, then
    /// `starts`.
    pub fn after(&self) -> Vec<Vec<String>> {
        let mut out = self.settle();
        out.extend(self.starts());
        out
    }

    /// The signers' starts, each on its own: the end of the signer-down
    /// window.
    pub fn starts(&self) -> Vec<Vec<String>> {
        start_one_by_one(&self.start)
    }

    /// What runs after the switch before the signers start.
    pub fn settle(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if !self.stop_after.is_empty() {
            out.push(systemctl("stop", &self.stop_after));
        }
        if self.daemon_reload {
            out.push(cmd(&["systemctl", "daemon-reload"]));
        }
        if self.sysusers {
            out.push(cmd(&["systemd-sysusers"]));
        }
        if self.tmpfiles {
            out.push(cmd(&["systemd-tmpfiles", "--create"]));
        }
        if self.sysctl {
            out.push(cmd(&["sysctl", "--system"]));
        }
        if self.firewall {
            out.push(cmd(&["nft", "-f", &format!("/{FIREWALL_PATH}")]));
        }
        if !self.restart.is_empty() {
            out.push(systemctl("try-restart", &self.restart));
        }
        if !self.reload.is_empty() {
            out.push(systemctl("try-reload-or-restart", &self.reload));
        }
        if !self.start_enabled.is_empty() {
            // Restart, not reload: a unit that already runs (with the
            // image's defaults) picks up the release's unit files too.
            out.push(systemctl("restart", &self.start_enabled));
        }
        out
    }
}

/// The unit a `.wants/` (or `.requires/`) link under a unit directory
/// enables.
fn wanted_unit(path: &RelPath) -> Option<String> {
    let p = path.as_str();
    let rest = UNIT_DIRS.iter().find_map(|d| p.strip_prefix(d))?;
    let (dir, unit) = rest.split_once('/')?;
    let linked = (dir.ends_with(".wants") || dir.ends_with(".requires")) && !unit.contains('/');
    (linked && is_unit_name(unit)).then(|| unit.to_owned())
}

/// `systemctl start` for each unit on its own, each waited for: never two
/// validators starting at once.
pub fn start_one_by_one(units: &[String]) -> Vec<Vec<String>> {
    units
        .iter()
        .map(|u| systemctl("start", std::slice::from_ref(u)))
        .collect()
}

fn systemctl(verb: &str, units: &[String]) -> Vec<String> {
    let mut v = vec!["systemctl".to_owned(), verb.to_owned()];
    v.extend(units.iter().cloned());
    v
}

/// Whether `root` is the running system, managed by systemd.
pub fn is_live(root: &Path) -> bool {
    root.canonicalize().is_ok_and(|r| r == Path::new("/"))
        && Path::new("/run/systemd/system").is_dir()
}

/// Runs `commands` in order, stopping at the first that fails; `then` says
/// where that leaves the host.
pub fn run(commands: &[Vec<String>], then: &str) -> Result<()> {
    for argv in commands {
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .map_err(Error::io(Path::new(&argv[0]), "running hook"))?;
        if !status.success() {
            return Err(Error::Refused(format!(
                "hook `{}` failed ({status}); {then}",
                argv.join(" ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_os_configuration_reloads_its_service() {
        let m = manifest_with(&["etc/motd", "etc/ssh/sshd_config.d/00-infrakit.conf"]);
        let h = Hooks::plan(
            None,
            &m,
            &[p("etc/ssh/sshd_config.d/00-infrakit.conf"), p("etc/motd")],
            &[],
            &[],
        );
        assert_eq!(h.reload, ["ssh.service"]);
        assert_eq!(
            h.after().last().unwrap(),
            &["systemctl", "try-reload-or-restart", "ssh.service"]
        );
        let h = Hooks::plan(None, &m, &[p("etc/motd")], &[], &[]);
        assert!(h.reload.is_empty() && h.after().is_empty());
        let h = Hooks::plan(
            None,
            &m,
            &[p("etc/systemd/timesyncd.conf.d/50-infrakit.conf")],
            &[],
            &[],
        );
        assert_eq!(h.reload, ["systemd-timesyncd.service"]);
        // Enabled by the release: (re)started, not merely reloaded.
        let m = manifest_with(&[
            "etc/systemd/system/multi-user.target.wants/systemd-timesyncd.service",
            "etc/systemd/timesyncd.conf.d/50-infrakit.conf",
        ]);
        let h = Hooks::plan(
            None,
            &m,
            &[
                p("etc/systemd/system/multi-user.target.wants/systemd-timesyncd.service"),
                p("etc/systemd/timesyncd.conf.d/50-infrakit.conf"),
            ],
            &[],
            &[],
        );
        assert!(h.reload.is_empty());
        assert_eq!(h.start_enabled, ["systemd-timesyncd.service"]);
        assert_eq!(
            h.after().last().unwrap(),
            &["systemctl", "restart", "systemd-timesyncd.service"]
        );
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// The layer of an added path is found in component order (`/` below
    /// every other byte): `system.conf` sorts after `system/…`, which a
    /// bisection by plain string order (before `Changes`) missed.
    #[test]
    fn an_added_wanted_unit_is_found_whatever_sorts_beside_it() {
        let wants = "etc/systemd/system/multi-user.target.wants/app.service";
        let m = manifest_with(&[wants, "etc/systemd/system.conf", "etc/z"]);
        let h = Hooks::plan(None, &m, &[p(wants)], &[], &[]);
        assert_eq!(h.start_enabled, ["app.service"]);
    }

    fn manifest_with(paths: &[&str]) -> Manifest {
        let entries: Vec<ManifestEntry> = paths
            .iter()
            .map(|path| ManifestEntry {
                gid: 0,
                input: None,
                layer: "l".into(),
                mode: 0o644,
                path: p(path),
                sha256: Some(crate::trust::digest::Sha256::of(b"")),
                size: Some(0),
                target: None,
                kind: crate::artifact::manifest::EntryType::File,
                uid: 0,
            })
            .collect();
        let json = format!(
            r#"{{"archive":{{"format":"tar.zst","sha256":"{0}","size":1,"tar_sha256":"{0}","tar_size":1}},"entries":{1},"layers":[],"name":"n","profile_sha256":"{0}","schema":1,"source_date_epoch":0,"version":"1.0.0"}}"#,
            crate::trust::digest::Sha256::of(b""),
            serde_json::to_string(&entries).unwrap()
        );
        Manifest::parse(json.as_bytes()).unwrap()
    }

    /// `manifest_with(paths)` whose services are `signers` (role signer)
    /// and `others` (role service), all unit files under etc/systemd/system.
    fn with_services(paths: &[&str], signers: &[&str], others: &[&str]) -> Manifest {
        let mut m = manifest_with(paths);
        let service = |unit: &&str, role: &str| crate::artifact::manifest::ServiceInfo {
            layer: "chain".into(),
            role: role.into(),
            unit: (*unit).to_owned(),
        };
        m.services = signers.iter().map(|u| service(u, "signer")).collect();
        m.services
            .extend(others.iter().map(|u| service(u, "service")));
        m
    }

    #[test]
    fn enabled_units_start_unless_they_sign_or_need_a_secret() {
        let links = [
            "etc/systemd/system/multi-user.target.wants/bft.service",
            "etc/systemd/system/multi-user.target.wants/exec.service",
            "etc/systemd/system/multi-user.target.wants/metrics.service",
        ];
        let mut paths = vec![
            "etc/systemd/system/bft.service",
            "etc/systemd/system/exec.service",
            "etc/systemd/system/metrics.service",
        ];
        paths.extend(links);
        paths.sort();
        let mut m = with_services(
            &paths,
            &["bft.service"],
            &["exec.service", "metrics.service"],
        );
        m.secrets = vec![crate::artifact::manifest::SecretSlot {
            description: "d".into(),
            group: "root".into(),
            kind: None,
            layer: "chain".into(),
            mode: 0o600,
            name: "key".into(),
            owner: "root".into(),
            path: "/etc/chain/key".into(),
            units: vec!["exec.service".into()],
        }];
        let added: Vec<RelPath> = paths.iter().map(|x| p(x)).collect();
        let h = Hooks::plan(None, &m, &added, &[], &[]);
        assert_eq!(h.start_enabled, ["metrics.service"]);
        // The unit that needs a secret is only try-restarted (if running).
        assert_eq!(h.restart, ["exec.service"]);
        assert!(
            h.start.is_empty(),
            "a new signer was started: {:?}",
            h.start
        );
        // Enabled by an adapter (a layer that declares services): left to the operator.
        for e in &mut m.entries {
            if e.path.as_str().contains(".wants/") {
                e.layer = "chain".into();
            }
        }
        let h = Hooks::plan(None, &m, &added, &[], &[]);
        assert!(h.start_enabled.is_empty(), "{:?}", h.start_enabled);
    }

    #[test]
    fn every_old_signer_stops_before_the_switch_and_kept_ones_start_one_at_a_time_after() {
        let old = with_services(
            &[
                "etc/systemd/system/app.service",
                "etc/systemd/system/bft.service",
                "etc/systemd/system/retired-signer.service",
            ],
            &["bft.service", "retired-signer.service"],
            &["app.service"],
        );
        let new = with_services(
            &[
                "etc/systemd/system/app.service",
                "etc/systemd/system/bft.service",
                "etc/systemd/system/fresh-signer.service",
            ],
            &["bft.service", "fresh-signer.service"],
            &["app.service"],
        );
        // bft.service did not change, and is still stopped and started.
        let hooks = Hooks::plan(
            Some(&old),
            &new,
            &[p("etc/systemd/system/fresh-signer.service")],
            &[p("etc/systemd/system/app.service")],
            &[
                p("etc/systemd/system/retired-signer.service"),
                p("etc/systemd/system/gone.service"),
            ],
        );
        assert_eq!(
            hooks.before(),
            vec![vec![
                "systemctl",
                "stop",
                "bft.service",
                "retired-signer.service"
            ]]
        );
        let after = hooks.after();
        let reload = after.iter().position(|c| c[1] == "daemon-reload").unwrap();
        assert_eq!(after[0], vec!["systemctl", "stop", "gone.service"]);
        assert!(after.contains(&vec![
            "systemctl".to_owned(),
            "try-restart".to_owned(),
            "app.service".to_owned()
        ]));
        // Only the kept signer starts, after the reload, on its own; the new
        // one is never started by apply.
        let starts: Vec<_> = after
            .iter()
            .enumerate()
            .filter(|(_, c)| c[1] == "start")
            .collect();
        assert_eq!(starts.len(), 1);
        assert!(starts[0].0 > reload);
        assert_eq!(starts[0].1, &vec!["systemctl", "start", "bft.service"]);
        assert!(!after.iter().flatten().any(|a| a.contains("fresh-signer")));

        // A first apply stops and starts no signer.
        let first = Hooks::plan(None, &new, &[p("etc/systemd/system/bft.service")], &[], &[]);
        assert!(first.stop_before.is_empty() && first.start.is_empty());
        // A repair touches only the signers whose files it repairs.
        let repair = Hooks::plan(
            Some(&new),
            &new,
            &[],
            &[p("etc/systemd/system/bft.service")],
            &[],
        );
        assert_eq!(repair.stop_before, vec!["bft.service"]);
        assert_eq!(repair.start, vec!["bft.service"]);
        let untouched = Hooks::plan(Some(&new), &new, &[], &[p("etc/app.conf")], &[]);
        assert!(untouched.stop_before.is_empty() && untouched.start.is_empty());
    }

    #[test]
    fn unit_files_and_drop_ins_name_their_unit() {
        assert_eq!(
            unit_of(&p("etc/systemd/system/infrakit-firewall.service")),
            Some("infrakit-firewall.service".into())
        );
        assert_eq!(
            unit_of(&p("etc/systemd/system/ssh.service.d/10-x.conf")),
            Some("ssh.service".into())
        );
        assert_eq!(
            unit_of(&p("etc/systemd/system/multi-user.target.wants/a.service")),
            None
        );
        assert_eq!(unit_of(&p("etc/ssh/sshd_config")), None);
    }
}
