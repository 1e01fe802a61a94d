//! `status`: what a root runs and how far it has drifted from it. Every
//! entry of the active manifest is checked on the live paths: directories
//! must exist (their mode and owner are the host's), every other path must be
//! InfraKit's farm link, and the file behind it must still have the signed
//! type, mode, owner, size, digest or link target.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::digest::{HashingReader, Sha256};
use crate::error::{Error, Result};
use crate::manifest::{EntryType, ManifestEntry};
use crate::state::{ReleaseInfo, State};

#[derive(Clone, Debug, Serialize)]
pub struct Drift {
    pub path: String,
    /// `missing`, `replaced`, `modified` or `mode-owner`.
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub root: String,
    pub release: Option<ReleaseInfo>,
    pub retained: Vec<String>,
    pub drift: Vec<Drift>,
    /// Secret slots missing or with the wrong owner or mode (artifacts do not
    /// declare secret slots yet, so this is empty).
    pub missing_secrets: Vec<String>,
    /// An activation that was interrupted and not yet completed or reverted.
    pub interrupted: Option<String>,
}

impl Report {
    pub fn healthy(&self) -> bool {
        self.drift.is_empty() && self.missing_secrets.is_empty() && self.interrupted.is_none()
    }
}

/// Reads the state and checks every entry of the active release. Waits for
/// an apply or rollback in progress (a shared lock), so a running one is not
/// reported as interrupted.
pub fn status(state: &State) -> Result<Report> {
    let _lock = state.lock_shared()?;
    let partial = state.partials().first().map(|p| {
        format!(
            "extracting {} was interrupted; the next apply removes it",
            p.display()
        )
    });
    let interrupted = state.journal()?.map(|j| {
        let switched = state.current_id().ok().flatten().as_deref() == Some(j.to.as_str());
        format!(
            "{} from {} to {} was interrupted {} the switch; the next apply or rollback {} it",
            j.action,
            j.from.as_deref().unwrap_or("nothing"),
            j.to,
            if switched { "after" } else { "before" },
            if switched { "completes" } else { "reverts" }
        )
    });
    let interrupted = interrupted.or(partial);
    let release = state.current()?;
    let drift = match &release {
        Some(r) => {
            let rootfs = state.release_dir(&r.info.id).join("rootfs");
            let entries = r.manifest.entries.iter();
            entries.filter_map(|e| check(state, &rootfs, e)).collect()
        }
        None => Vec::new(),
    };
    Ok(Report {
        root: state.root.display().to_string(),
        release: release.map(|r| r.info),
        retained: state.record()?.history,
        drift,
        missing_secrets: Vec::new(),
        interrupted,
    })
}

fn check(state: &State, rootfs: &Path, e: &ManifestEntry) -> Option<Drift> {
    let drift = |kind, detail: String| {
        Some(Drift {
            path: e.path.to_string(),
            kind,
            detail,
        })
    };
    let live = state.live(&e.path);
    let Ok(meta) = live.symlink_metadata() else {
        return drift("missing", "not on the host".into());
    };
    if e.kind == EntryType::Dir {
        return if meta.is_dir() {
            None
        } else {
            drift("replaced", "no longer a directory".into())
        };
    }
    if !state.is_farm_link(&e.path) {
        return drift(
            "replaced",
            "no longer InfraKit's link into the release".into(),
        );
    }
    let file = rootfs.join(e.path.as_str());
    let Ok(meta) = file.symlink_metadata() else {
        return drift("missing", format!("{} is gone", file.display()));
    };
    let kind_ok = match e.kind {
        EntryType::File => meta.is_file(),
        EntryType::Symlink => meta.file_type().is_symlink(),
        EntryType::Dir => false,
    };
    if !kind_ok {
        return drift("modified", "has another type".into());
    }
    if e.kind == EntryType::File {
        let mode = meta.mode() & 0o7777;
        if (mode, meta.uid(), meta.gid()) != (e.mode, e.uid, e.gid) {
            return drift(
                "mode-owner",
                format!(
                    "{mode:04o} {}:{}, the release says {:04o} {}:{}",
                    meta.uid(),
                    meta.gid(),
                    e.mode,
                    e.uid,
                    e.gid
                ),
            );
        }
        match digest(&file) {
            Ok((sha, size)) if Some(sha) == e.sha256 && Some(size) == e.size => None,
            Ok((sha, size)) => drift(
                "modified",
                format!(
                    "content is {size} bytes with sha256 {sha}, the release says {} bytes",
                    e.size.unwrap_or_default()
                ),
            ),
            Err(err) => drift("modified", format!("unreadable: {err}")),
        }
    } else {
        let target = fs::read_link(&file).ok();
        let want = e.target.as_deref().map(Path::new);
        if target.as_deref() != want {
            return drift(
                "modified",
                format!("links to {target:?}, the release says {want:?}"),
            );
        }
        None
    }
}

fn digest(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut reader = HashingReader::new(File::open(path)?);
    std::io::copy(&mut reader, &mut std::io::sink())?;
    Ok(reader.finish())
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
        "infrakit_activation_interrupted",
        "1 while an activation is interrupted and not yet completed or reverted.",
        String::new(),
        usize::from(report.interrupted.is_some()),
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the textfile atomically (node_exporter must never read half).
pub fn write_textfile(path: &Path, report: &Report) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::usage("--textfile", "needs a file path"));
    }
    crate::state::write_atomic(path, textfile(report).as_bytes(), 0o644)
}
