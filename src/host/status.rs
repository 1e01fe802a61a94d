//! `status`: what a root runs and how far it has drifted from it. Every
//! entry of the active manifest is checked on the live paths: directories
//! must exist (their mode and owner are the host's), every other path must be
//! InfraKit's farm link, and the file behind it must still have the signed
//! type, mode, owner, size, digest or link target.
//!
//! "Could not check" is never "clean": a root or state that cannot be read,
//! a `current` that is missing or dangles, a file the caller may not read —
//! each is an error of the report (exit 2), kept apart from drift (exit 1).

use std::io;

use serde::Serialize;

use crate::artifact::manifest::{EntryType, ManifestEntry};
use crate::error::{Error, Result};
use crate::host::confined::{self, Dir, Kind};
use crate::host::state::{Farm, Release, ReleaseId, ReleaseInfo, State};
use crate::trust::digest::HashingReader;

#[derive(Clone, Debug, Serialize)]
pub struct Drift {
    pub path: String,
    /// `missing`, `replaced`, `modified` or `mode-owner`.
    pub kind: &'static str,
    pub detail: String,
    /// Whether the release's own copy (under `releases/<id>/rootfs`)
    /// drifted, rather than the live path.
    pub in_release: bool,
}

/// A secret slot as the host does not provide it.
#[derive(Clone, Debug, Serialize)]
pub struct SecretProblem {
    pub name: String,
    pub path: String,
    pub problem: String,
}

/// A retained release and when it was last activated.
#[derive(Clone, Debug, Serialize)]
pub struct Retained {
    pub id: ReleaseId,
    /// Seconds since 1970; `None` for releases applied by an infrakit that
    /// did not record it.
    pub applied_at: Option<u64>,
    pub active: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub root: String,
    pub release: Option<ReleaseInfo>,
    pub retained: Vec<Retained>,
    pub drift: Vec<Drift>,
    /// Secret slots the host does not provide as declared (missing, not a
    /// regular file, wrong owner or group, a mode wider than declared).
    pub missing_secrets: Vec<SecretProblem>,
    /// Debian packages the release needs that the root's dpkg database does
    /// not list as installed.
    pub missing_prerequisites: Vec<String>,
    /// How many secret slots the active release declares.
    pub release_secrets: usize,
    /// An activation that was interrupted and not yet completed or reverted.
    pub interrupted: Option<String>,
    /// Why the first boot's bundle failed (its `first-boot.failed` marker).
    pub first_boot_failed: Option<String>,
    /// What could not be checked, and why: the report is incomplete.
    pub errors: Vec<String>,
}

impl Report {
    /// Drift, missing secrets or an interrupted activation: a failed check.
    pub fn failed(&self) -> bool {
        !self.drift.is_empty()
            || !self.missing_secrets.is_empty()
            || !self.missing_prerequisites.is_empty()
            || self.interrupted.is_some()
            || self.first_boot_failed.is_some()
    }

    /// Checked completely and nothing failed.
    pub fn healthy(&self) -> bool {
        !self.failed() && self.errors.is_empty()
    }
}

/// Reads the state and checks every entry of the active release. Waits for
/// an apply or rollback in progress (a shared lock), so a running one is not
/// reported as interrupted. What cannot be read becomes an error of the
/// report, never a clean result.
pub fn status(root: &std::path::Path) -> Report {
    let mut report = Report {
        root: root.display().to_string(),
        release: None,
        retained: Vec::new(),
        drift: Vec::new(),
        missing_secrets: Vec::new(),
        missing_prerequisites: Vec::new(),
        release_secrets: 0,
        interrupted: None,
        first_boot_failed: None,
        errors: Vec::new(),
    };
    if let Err(e) = State::open(root).and_then(|state| check_into(&state, &mut report)) {
        report.errors.push(e.to_string());
    }
    report
}

fn check_into(state: &State, report: &mut Report) -> Result<()> {
    let _lock = state.lock_shared()?;
    report.first_boot_failed = state.first_boot_failure()?;
    let partial = state.partials()?.first().map(|p| {
        format!(
            "extracting {} was interrupted; the next apply removes it",
            state.path("releases").join(p).display()
        )
    });
    let current = state.current_id()?;
    let interrupted = state.journal()?.map(|j| {
        let switched = current.as_ref() == Some(&j.to);
        format!(
            "{} from {} to {} was interrupted {} the switch; the next apply or rollback {} it",
            j.action,
            j.from.as_ref().map_or("nothing", ReleaseId::as_str),
            j.to,
            if switched { "after" } else { "before" },
            if switched { "completes" } else { "reverts" }
        )
    });
    report.interrupted = interrupted.or(partial);
    let record = state.record()?;
    report.retained = record
        .history
        .iter()
        .map(|id| Retained {
            id: id.clone(),
            applied_at: record.applied_at.get(id).copied(),
            active: current.as_ref() == Some(id),
        })
        .collect();
    let Some(id) = current else {
        if let Some(last) = record.history.last() {
            return Err(Error::input(
                &state.path("current"),
                format!(
                    "is missing, but state.json records {last} as active; re-apply its artifact"
                ),
            ));
        }
        return Ok(());
    };
    let release = state.release(&id)?;
    report.release = Some(release.info.clone());
    let rootfs = state.release_root(&id)?;
    let mut farm = state.farm();
    for e in &release.manifest.entries {
        match check(&mut farm, &rootfs, e) {
            Ok(Some(d)) => report.drift.push(d),
            Ok(None) => {}
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report.release_secrets = release.manifest.secrets.len();
    let accounts = Accounts::read(state.live_dir());
    for slot in &release.manifest.secrets {
        match check_secret(state, &accounts, slot) {
            Ok(Some(problem)) => report.missing_secrets.push(SecretProblem {
                name: slot.name.clone(),
                path: slot.path.clone(),
                problem,
            }),
            Ok(None) => {}
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    if !release.manifest.prerequisites.is_empty() {
        match installed_packages(state) {
            Ok(installed) => {
                report.missing_prerequisites = release
                    .manifest
                    .prerequisites
                    .iter()
                    .filter(|p| !installed.contains(p.as_str()))
                    .cloned()
                    .collect();
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    Ok(())
}

/// User and group names of the root (`etc/passwd`, `etc/group`), for the
/// owners of secret slots; numeric names stand for themselves.
struct Accounts {
    users: std::collections::HashMap<String, u32>,
    groups: std::collections::HashMap<String, u32>,
}

impl Accounts {
    fn read(root: &Dir) -> Accounts {
        let table = |file: &str| {
            let text = root.read(file, 16 << 20).unwrap_or_default();
            String::from_utf8_lossy(&text)
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((name.to_owned(), id))
                })
                .collect()
        };
        Accounts {
            users: table("etc/passwd"),
            groups: table("etc/group"),
        }
    }

    fn id(map: &std::collections::HashMap<String, u32>, name: &str) -> Option<u32> {
        name.parse().ok().or_else(|| map.get(name).copied())
    }
}

/// One secret slot on the live root: `Ok(Some(problem))` when it is not
/// provided as declared, `Err` when it cannot be checked.
fn check_secret(
    state: &State,
    accounts: &Accounts,
    slot: &crate::artifact::manifest::SecretSlot,
) -> Result<Option<String>> {
    let rel = slot.path.trim_start_matches('/');
    let path = state.root.join(rel);
    let meta = match confined::optional(state.live_dir().stat(rel)) {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(Some("missing".to_owned())),
        Err(e) => {
            return Err(Error::io(
                &path,
                "checking a secret slot (run status as root)",
            )(e));
        }
    };
    let dir = slot.kind.as_deref() == Some("dir");
    match (dir, meta.kind) {
        (false, Kind::File) | (true, Kind::Dir) => {}
        (false, _) => return Ok(Some("is not a regular file".to_owned())),
        (true, _) => return Ok(Some("is not a directory".to_owned())),
    }
    let want = (
        Accounts::id(&accounts.users, &slot.owner),
        Accounts::id(&accounts.groups, &slot.group),
    );
    if want != (Some(meta.uid), Some(meta.gid)) {
        return Ok(Some(format!(
            "owned by {}:{}, the release wants {}:{}",
            meta.uid, meta.gid, slot.owner, slot.group
        )));
    }
    if meta.mode & !slot.mode != 0 {
        return Ok(Some(format!(
            "mode {:04o} allows more than the declared {:04o}",
            meta.mode, slot.mode
        )));
    }
    Ok(None)
}

/// The packages the root's dpkg database lists as installed.
fn installed_packages(state: &State) -> Result<std::collections::HashSet<String>> {
    const STATUS: &str = "var/lib/dpkg/status";
    let text = match confined::optional(state.live_dir().read(STATUS, 256 << 20)) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Default::default()),
        Err(e) => return Err(Error::io(&state.root.join(STATUS), "reading")(e)),
    };
    let text = String::from_utf8_lossy(&text);
    Ok(text
        .split("\n\n")
        .filter(|para| {
            para.lines()
                .any(|l| l.starts_with("Status:") && l.ends_with(" installed"))
        })
        .filter_map(|para| {
            para.lines()
                .find_map(|l| l.strip_prefix("Package: "))
                .map(|p| p.trim().to_owned())
        })
        .collect())
}

/// Drift of the active `release`: its live paths and its own files. An
/// entry that cannot be checked is an error, never "no drift".
pub fn drift(state: &State, release: &Release) -> Result<Vec<Drift>> {
    let rootfs = state.release_root(&release.info.id)?;
    let mut out = Vec::new();
    let mut farm = state.farm();
    for e in &release.manifest.entries {
        out.extend(check(&mut farm, &rootfs, e)?);
    }
    Ok(out)
}

/// Drift of a retained release's own files against its manifest.
pub fn release_drift(state: &State, release: &Release) -> Result<Vec<Drift>> {
    let rootfs = state.release_root(&release.info.id)?;
    let mut out = Vec::new();
    for e in &release.manifest.entries {
        out.extend(check_release_file(&rootfs, e)?);
    }
    Ok(out)
}

fn drift_of(e: &ManifestEntry, kind: &'static str, detail: String, in_release: bool) -> Drift {
    Drift {
        path: e.path.to_string(),
        kind,
        detail,
        in_release,
    }
}

/// One entry: `Ok(None)` matches, `Ok(Some)` drifted, `Err` could not check.
fn check(farm: &mut Farm<'_>, rootfs: &Dir, e: &ManifestEntry) -> Result<Option<Drift>> {
    let live = |kind, detail: String| Ok(Some(drift_of(e, kind, detail, false)));
    let Some(meta) = farm.meta(&e.path)? else {
        return live("missing", "not on the host".into());
    };
    if e.kind == EntryType::Dir {
        return if meta.kind == Kind::Dir {
            // The directory's own copy in the release matters too.
            check_release_file(rootfs, e)
        } else {
            live("replaced", "no longer a directory".into())
        };
    }
    if !farm.is_link(&e.path) {
        return live(
            "replaced",
            "no longer InfraKit's link into the release".into(),
        );
    }
    check_release_file(rootfs, e)
}

/// The release's own copy of an entry (under `rootfs`), never following a
/// link: `Err` when it cannot be read by the caller.
fn check_release_file(rootfs: &Dir, e: &ManifestEntry) -> Result<Option<Drift>> {
    let drift = |kind, detail: String| Ok(Some(drift_of(e, kind, detail, true)));
    let path = e.path.as_str();
    let unreadable =
        |err: io::Error| Error::io(&rootfs.display(path), "checking (run status as root)")(err);
    let meta = match confined::optional(rootfs.stat(path)) {
        Ok(Some(m)) => m,
        Ok(None) => {
            return drift(
                "missing",
                format!("{} is gone", rootfs.display(path).display()),
            );
        }
        Err(err) if confined::is_escape(&err) => {
            return drift("modified", "lies under a symlink in the release".into());
        }
        Err(err) => return Err(unreadable(err)),
    };
    let kind_ok = match e.kind {
        EntryType::File => meta.kind == Kind::File,
        EntryType::Symlink => meta.kind == Kind::Symlink,
        EntryType::Dir => meta.kind == Kind::Dir,
    };
    if !kind_ok {
        return drift("modified", "has another type".into());
    }
    if e.kind != EntryType::Symlink && (meta.mode, meta.uid, meta.gid) != (e.mode, e.uid, e.gid) {
        return drift(
            "mode-owner",
            format!(
                "{:04o} {}:{}, the release says {:04o} {}:{}",
                meta.mode, meta.uid, meta.gid, e.mode, e.uid, e.gid
            ),
        );
    }
    match e.kind {
        EntryType::Dir => Ok(None),
        EntryType::File => {
            let file = rootfs.open_file(path).map_err(unreadable)?;
            let mut reader = HashingReader::new(file);
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(unreadable)?;
            let (sha, size) = reader.finish();
            if Some(sha) == e.sha256 && Some(size) == e.size {
                return Ok(None);
            }
            drift(
                "modified",
                format!(
                    "content is {size} bytes with sha256 {sha}, the release says {} bytes",
                    e.size.unwrap_or_default()
                ),
            )
        }
        EntryType::Symlink => {
            let target = rootfs.read_link(path).map_err(unreadable)?;
            let want = e.target.as_deref().map(std::path::Path::new);
            if Some(target.as_path()) == want {
                return Ok(None);
            }
            drift(
                "modified",
                format!("links to {target:?}, the release says {want:?}"),
            )
        }
    }
}

/// Prometheus node_exporter textfile metrics for `report`.
pub fn textfile(report: &Report) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, labels: String, value: usize| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}\n"
        ));
    };
    let labels = report.release.as_ref().map_or_else(String::new, |r| {
        format!(
            "{{name=\"{}\",version=\"{}\",sha256=\"{}\",key_id=\"{}\"}}",
            escape(&r.name),
            escape(&r.version),
            r.sha256,
            escape(&r.key_id)
        )
    });
    metric(
        "infrakit_release_info",
        "The active InfraKit release (1), or 0 when none is active.",
        labels,
        usize::from(report.release.is_some()),
    );
    metric(
        "infrakit_drift_files",
        "Paths of the active release that differ from its manifest.",
        String::new(),
        report.drift.len(),
    );
    metric(
        "infrakit_missing_secrets",
        "Secret slots missing or with the wrong owner or mode.",
        String::new(),
        report.missing_secrets.len(),
    );
    metric(
        "infrakit_missing_prerequisites",
        "Debian packages the release needs that the host does not have installed.",
        String::new(),
        report.missing_prerequisites.len(),
    );
    metric(
        "infrakit_activation_interrupted",
        "1 while an activation is interrupted and not yet completed or reverted.",
        String::new(),
        usize::from(report.interrupted.is_some()),
    );
    metric(
        "infrakit_first_boot_failed",
        "1 when the first boot's bundle failed (var/lib/infrakit/first-boot.failed).",
        String::new(),
        usize::from(report.first_boot_failed.is_some()),
    );
    metric(
        "infrakit_status_error",
        "1 when status could not check everything (the other metrics are then incomplete).",
        String::new(),
        usize::from(!report.errors.is_empty()),
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the textfile atomically (node_exporter must never read half).
pub fn write_textfile(path: &std::path::Path, report: &Report) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::usage("--textfile", "needs a file path"));
    }
    crate::host::state::write_atomic(path, textfile(report).as_bytes(), 0o644)
}

/// `seconds` since 1970 as an RFC 3339 UTC time (`2026-12-05T07:03:00Z`).
pub fn utc(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).unwrap_or(i64::MAX / 2);
    let rest = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(utc(1_796_454_183), "2026-12-05T07:03:03Z");
    }
}
