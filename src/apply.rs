//! `apply` and `rollback`: lay a verified release down on a root and switch
//! to it atomically. The order is the safety argument:
//!
//! 1. authenticate the artifact (signature, trusted comment, digests) and
//!    decide (name, anti-rollback, conflicts) with nothing written;
//! 2. take the state lock and finish or revert an interrupted activation;
//! 3. extract into `releases/.<id>.partial/`, checking every member against
//!    the signed manifest as it streams, then `syncfs` and rename it to
//!    `releases/<id>/` (a failure removes the partial directory);
//! 4. write the journal, create the new directories and the farm links of
//!    new paths (they dangle until the switch: the root still shows the old
//!    release), move adopted host files aside, `syncfs`;
//! 5. switch `current` with one rename: this is the instant the root changes
//!    from old to new;
//! 6. clean up: remove the farm links and empty created directories that
//!    only the old release had, record the history, prune old releases,
//!    remove the journal.
//!
//! A crash before 5 is reverted by the next `apply` (or `rollback`); a crash
//! after 5 is completed by it. `status` reports either.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hooks::{self, Hooks};
use crate::manifest::{EntryType, Manifest, ManifestEntry};
use crate::model::RelPath;
use crate::state::{self, Journal, Release, ReleaseInfo, State};
use crate::verify::Verified;

/// What to change on the live paths, computed without writing anything.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub added: Vec<RelPath>,
    pub changed: Vec<RelPath>,
    pub removed: Vec<RelPath>,
    /// Directories to create (they are missing on the host).
    pub new_dirs: Vec<ManifestEntry>,
    /// Farm links to create.
    pub links: Vec<RelPath>,
    /// Host files to move aside (`--adopt`).
    pub adopt: Vec<RelPath>,
    /// Paths the release cannot take without `--adopt` (or at all).
    pub conflicts: Vec<String>,
    pub hooks: Hooks,
}

pub struct ApplyOptions {
    pub dry_run: bool,
    pub allow_downgrade: bool,
    pub adopt: bool,
    /// How many releases to keep, the active one included (at least 2:
    /// the command line refuses less).
    pub retain: usize,
}

/// What `apply` or `rollback` did.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing was written; this is what would happen.
    DryRun { id: String, plan: Plan },
    /// The release was already active.
    AlreadyActive { id: String },
    /// Activated; `hooks_run` says whether the hooks ran or are only a plan.
    Activated {
        id: String,
        from: Option<String>,
        plan: Plan,
        hooks_run: bool,
    },
}

/// Compares two manifests and the live paths of `state`'s root.
pub fn plan(state: &State, old: Option<&Manifest>, new: &Manifest, adopt: bool) -> Plan {
    let old_entries: BTreeMap<&RelPath, &ManifestEntry> = old
        .map(|m| m.entries.iter().map(|e| (&e.path, e)).collect())
        .unwrap_or_default();
    let mut plan = Plan::default();
    for e in &new.entries {
        match old_entries.get(&e.path) {
            None => plan.added.push(e.path.clone()),
            // Two directories differ only in mode and owner (not in layer).
            Some(o) if o.kind == EntryType::Dir && e.kind == EntryType::Dir => {
                if (o.mode, o.uid, o.gid) != (e.mode, e.uid, e.gid) {
                    plan.changed.push(e.path.clone());
                }
            }
            Some(o) if *o != e => plan.changed.push(e.path.clone()),
            Some(_) => {}
        }
        let meta = state.live(&e.path).symlink_metadata();
        match (&e.kind, meta) {
            (EntryType::Dir, Err(_)) => plan.new_dirs.push(e.clone()),
            (EntryType::Dir, Ok(m)) if m.is_dir() => {}
            (EntryType::Dir, Ok(m)) => plan.conflicts.push(format!(
                "{}: the host has a {} where the release has a directory (never adopted)",
                e.path,
                host_kind(&m)
            )),
            (_, Err(_)) => plan.links.push(e.path.clone()),
            (_, Ok(_)) if state.is_farm_link(&e.path) => {}
            (_, Ok(m)) if m.is_dir() => plan.conflicts.push(format!(
                "{}: the host has a directory where the release has a {} (never adopted)",
                e.path,
                kind_name(e.kind)
            )),
            (_, Ok(_)) if adopt => {
                plan.adopt.push(e.path.clone());
                plan.links.push(e.path.clone());
            }
            (_, Ok(m)) => plan.conflicts.push(format!(
                "{}: a host {} InfraKit does not own (--adopt moves it aside)",
                e.path,
                host_kind(&m)
            )),
        }
    }
    let new_paths: HashSet<&RelPath> = new.entries.iter().map(|e| &e.path).collect();
    plan.removed = old_entries
        .keys()
        .filter(|p| !new_paths.contains(*p))
        .map(|p| (*p).clone())
        .collect();
    plan.hooks = Hooks::plan(new, &plan.added, &plan.changed, &plan.removed);
    plan
}

/// What the host has at a path, for conflict messages.
fn host_kind(m: &fs::Metadata) -> &'static str {
    if m.is_dir() {
        "directory"
    } else if m.file_type().is_symlink() {
        "symlink"
    } else {
        "file"
    }
}

fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Dir => "directory",
        EntryType::File => "file",
        EntryType::Symlink => "symlink",
    }
}

/// Decides whether `verified` may replace what `state` runs; reads only.
fn admit(state: &State, verified: &Verified, opts: &ApplyOptions) -> Result<Option<Release>> {
    let m = verified.manifest();
    if let Some(e) = m.entries.iter().find(|e| {
        let p = e.path.as_str();
        p == state::STATE_DIR || p.starts_with(&format!("{}/", state::STATE_DIR))
    }) {
        return Err(Error::Refused(format!(
            "the release ships {}, inside InfraKit's own state directory {}; remove it from the profile",
            e.path,
            state::STATE_DIR
        )));
    }
    let current = state.current()?;
    if let Some(cur) = &current {
        let same = cur.info.id == state::release_id(&m.name, &m.version, &m.archive.sha256);
        if !same && !opts.allow_downgrade {
            if cur.info.name != m.name {
                return Err(Error::Refused(format!(
                    "the root runs {} {}, not {}: replacing a different release needs --allow-downgrade",
                    cur.info.name, cur.info.version, m.name
                )));
            }
            let newer = match (
                semver::Version::parse(&m.version),
                semver::Version::parse(&cur.info.version),
            ) {
                (Ok(new), Ok(old)) => new > old,
                _ => false,
            };
            if !newer {
                return Err(Error::Refused(format!(
                    "{} {} is not newer than the installed {}: refusing a downgrade (--allow-downgrade overrides)",
                    m.name, m.version, cur.info.version
                )));
            }
        }
    }
    Ok(current)
}

/// Verifies, stages and activates `verified` on `state`'s root.
pub fn apply(state: &State, verified: &Verified, opts: &ApplyOptions) -> Result<Outcome> {
    let m = verified.manifest();
    let id = state::release_id(&m.name, &m.version, &m.archive.sha256);
    let current = admit(state, verified, opts)?;
    let first = plan(state, current.as_ref().map(|r| &r.manifest), m, opts.adopt);
    refuse_conflicts(&first)?;
    if opts.dry_run {
        return Ok(Outcome::DryRun { id, plan: first });
    }
    state.create()?;
    let _lock = state.lock()?;
    recover(state)?;
    // Decide again under the lock: recovery or another apply may have moved.
    let current = admit(state, verified, opts)?;
    if current.as_ref().is_some_and(|c| c.info.id == id) {
        return Ok(Outcome::AlreadyActive { id });
    }
    let mut plan = plan(state, current.as_ref().map(|r| &r.manifest), m, opts.adopt);
    for p in &plan.adopt {
        if state
            .backup_dir(&id)
            .join(p.as_str())
            .symlink_metadata()
            .is_ok()
        {
            plan.conflicts.push(format!(
                "{p}: a backup of it from an earlier --adopt of {id} exists; move it away first"
            ));
        }
    }
    refuse_conflicts(&plan)?;
    stage(state, verified, &id)?;
    let mut history = state.record()?.history;
    history.retain(|h| h != &id);
    history.push(id.clone());
    let keep = history.len().saturating_sub(opts.retain.max(2));
    history.drain(..keep);
    let journal = Journal::new("apply", current.map(|c| c.info.id), id, &plan, history);
    activate(state, &journal, &plan)
}

/// Reactivates the release before the active one. Under the lock, after
/// finishing or reverting an interrupted activation (not for a dry run).
pub fn rollback(state: &State, dry_run: bool) -> Result<Outcome> {
    let _lock = if dry_run || state.current_id()?.is_none() {
        None
    } else {
        let lock = state.lock()?;
        recover(state)?;
        Some(lock)
    };
    let record = state.record()?;
    let current = state.current_id()?;
    let Some(from) = current else {
        return Err(Error::Refused(format!(
            "{}: no release is active; nothing to roll back",
            state.root.display()
        )));
    };
    let Some(pos) = record.history.iter().rposition(|h| *h == from) else {
        return Err(Error::Refused(format!(
            "the active release {from} is not in the history of {}",
            state.record_path().display()
        )));
    };
    let Some(to) = pos.checked_sub(1).map(|i| record.history[i].clone()) else {
        return Err(Error::Refused(format!(
            "{from} is the oldest retained release: there is nothing to roll back to"
        )));
    };
    let old = state.release(&from)?;
    let target = state.release(&to)?;
    let plan = plan(state, Some(&old.manifest), &target.manifest, false);
    refuse_conflicts(&plan)?;
    if dry_run {
        return Ok(Outcome::DryRun { id: to, plan });
    }
    let journal = Journal::new(
        "rollback",
        Some(from),
        to,
        &plan,
        record.history[..pos].to_vec(),
    );
    activate(state, &journal, &plan)
}

impl Journal {
    /// The journal of activating `plan`: what it creates, adopts and runs.
    fn new(
        action: &str,
        from: Option<String>,
        to: String,
        plan: &Plan,
        history: Vec<String>,
    ) -> Journal {
        Journal {
            action: action.to_owned(),
            from,
            to,
            created_dirs: plan.new_dirs.iter().map(|e| e.path.clone()).collect(),
            adopted: plan.adopt.clone(),
            history,
            hooks_after: plan.hooks.after(),
            stopped: plan.hooks.stop_before.clone(),
        }
    }
}

fn refuse_conflicts(plan: &Plan) -> Result<()> {
    if plan.conflicts.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "{} path(s) conflict with the host:\n  {}",
        plan.conflicts.len(),
        plan.conflicts.join("\n  ")
    )))
}

/// Extracts `verified` into `releases/<id>/` (via a partial directory).
fn stage(state: &State, verified: &Verified, id: &str) -> Result<()> {
    let done = state.release_dir(id);
    if done.is_dir() {
        return Ok(());
    }
    let partial = state.partial_dir(id);
    if partial.symlink_metadata().is_ok() {
        fs::remove_dir_all(&partial)
            .map_err(Error::io(&partial, "removing a stale partial release"))?;
    }
    // Private until every member was checked: files get their final modes
    // (setuid included) before their digests are known.
    fs::create_dir(&partial).map_err(Error::io(&partial, "creating the staging directory"))?;
    state::set_mode(&partial, 0o700)?;
    let result = extract(verified, &partial.join("rootfs")).and_then(|()| {
        let m = verified.manifest();
        let info = ReleaseInfo {
            id: id.to_owned(),
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: m.archive.sha256,
            key_id: verified.key_id().to_owned(),
        };
        let info_json = state::to_json(&info);
        for (name, bytes) in [
            ("manifest.json", verified.manifest_bytes()),
            ("artifact.minisig", verified.signature_bytes()),
            ("release.json", &info_json[..]),
        ] {
            let path = partial.join(name);
            fs::write(&path, bytes).map_err(Error::io(&path, "writing release metadata"))?;
        }
        state::set_mode(&partial, 0o755)?;
        state::sync_fs(&partial)?;
        fs::rename(&partial, &done).map_err(Error::io(&done, "renaming the staged release"))?;
        state::sync_dir(&state.releases())
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

/// Writes every member into `rootfs` (which must not exist) as it streams:
/// new files only (`O_EXCL`, so nothing is followed), each under a directory
/// this release created (`Verified::stream` guarantees the order); owners
/// and modes from the manifest.
fn extract(verified: &Verified, rootfs: &Path) -> Result<()> {
    fs::create_dir(rootfs).map_err(Error::io(rootfs, "creating the release root"))?;
    state::set_mode(rootfs, 0o755)?;
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    verified.stream(&mut |want, content| {
        let dest = rootfs.join(want.path.as_str());
        match want.kind {
            EntryType::Dir => {
                fs::create_dir(&dest).map_err(Error::io(&dest, "creating directory"))?;
                std::os::unix::fs::lchown(&dest, Some(want.uid), Some(want.gid))
                    .map_err(Error::io(&dest, "setting owner"))?;
                dir_modes.push((dest, want.mode));
            }
            EntryType::File => {
                let mut file = File::options()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(Error::io(&dest, "creating file"))?;
                // A failed read is the archive's fault (exit 1), a failed
                // write the disk's (exit 2).
                loop {
                    let n = content.read(&mut buf).map_err(|e| {
                        Error::check(format!(
                            "{}: {}: reading the archive: {e}",
                            verified.artifact().display(),
                            want.path
                        ))
                    })?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n])
                        .map_err(Error::io(&dest, "writing file"))?;
                }
                // Owner first: chown clears setuid/setgid bits.
                std::os::unix::fs::fchown(&file, Some(want.uid), Some(want.gid))
                    .map_err(Error::io(&dest, "setting owner"))?;
                file.set_permissions(fs::Permissions::from_mode(want.mode))
                    .map_err(Error::io(&dest, "setting mode"))?;
            }
            EntryType::Symlink => {
                let target = want.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &dest)
                    .map_err(Error::io(&dest, "creating symlink"))?;
                std::os::unix::fs::lchown(&dest, Some(want.uid), Some(want.gid))
                    .map_err(Error::io(&dest, "setting owner"))?;
            }
        }
        Ok(())
    })?;
    for (dir, mode) in dir_modes.iter().rev() {
        state::set_mode(dir, *mode)?;
    }
    Ok(())
}

/// Steps 4-6 of the module comment, then the hooks. A failure before the
/// switch is reverted at once (and would be by the next run otherwise).
fn activate(state: &State, journal: &Journal, plan: &Plan) -> Result<Outcome> {
    state.write_journal(journal)?;
    let live = hooks::is_live(&state.root);
    let prepared = prepare(state, journal, plan).and_then(|()| {
        if live {
            hooks::run(&plan.hooks.before(), "the activation was reverted")?;
        }
        Ok(())
    });
    if let Err(e) = prepared {
        let _ = revert(state, journal);
        return Err(e);
    }
    state.switch(&journal.to)?;
    finish(state, journal)?;
    Ok(Outcome::Activated {
        id: journal.to.clone(),
        from: journal.from.clone(),
        plan: plan.clone(),
        hooks_run: live,
    })
}

/// Step 4: new directories, adopted files moved aside, farm links, synced.
fn prepare(state: &State, journal: &Journal, plan: &Plan) -> Result<()> {
    for e in &plan.new_dirs {
        let live = state.live(&e.path);
        match fs::create_dir(&live) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && live.is_dir() => {
                continue;
            }
            Err(err) => return Err(Error::io(&live, "creating directory")(err)),
        }
        std::os::unix::fs::lchown(&live, Some(e.uid), Some(e.gid))
            .map_err(Error::io(&live, "setting owner"))?;
        state::set_mode(&live, e.mode)?;
    }
    for p in &journal.adopted {
        let live = state.live(p);
        let backup = state.backup_dir(&journal.to).join(p.as_str());
        if let Some(parent) = backup.parent() {
            fs::create_dir_all(parent).map_err(Error::io(parent, "creating backup directory"))?;
        }
        fs::rename(&live, &backup).map_err(Error::io(&live, "moving a host file aside"))?;
    }
    for p in &plan.links {
        if state.is_farm_link(p) {
            continue;
        }
        let live = state.live(p);
        std::os::unix::fs::symlink(State::farm_target(p), &live)
            .map_err(Error::io(&live, "creating link"))?;
    }
    state::sync_fs(&state.root)
}

/// Step 6, after the switch: idempotent, so recovery can run it again.
fn finish(state: &State, journal: &Journal) -> Result<()> {
    let new = state.release(&journal.to)?.manifest;
    let new_paths: HashSet<&RelPath> = new.entries.iter().map(|e| &e.path).collect();
    // The old release is pruned already if a previous finish got that far.
    if let Some(Ok(old)) = journal.from.as_deref().map(|from| state.release(from)) {
        remove_links(state, &old.manifest, |p| new_paths.contains(p))?;
    }
    state::sync_fs(&state.root)?;
    let mut record = state.record()?;
    record
        .created_dirs
        .extend(journal.created_dirs.iter().cloned());
    remove_empty_dirs(state, &mut record.created_dirs, &new_paths);
    // Host files adopted for paths no active release has any more go back.
    let gone: Vec<(RelPath, String)> = record
        .adopted
        .iter()
        .filter(|(p, _)| !new_paths.contains(p))
        .map(|(p, id)| (p.clone(), id.clone()))
        .collect();
    for (p, id) in gone {
        restore_adopted(state, &id, &p)?;
        record.adopted.remove(&p);
    }
    for p in &journal.adopted {
        record.adopted.insert(p.clone(), journal.to.clone());
    }
    record.history = journal.history.clone();
    state.write_record(&record)?;
    prune(state, &record.history)?;
    if hooks::is_live(&state.root) {
        hooks::run(
            &journal.hooks_after,
            "the release is active; the next apply or rollback runs the hooks again",
        )?;
    }
    state.remove_journal()
}

/// Removes the farm links of `manifest`'s files and symlinks unless `keep`
/// says otherwise (only InfraKit's own links: anything else stays).
fn remove_links(state: &State, manifest: &Manifest, keep: impl Fn(&RelPath) -> bool) -> Result<()> {
    for e in manifest.entries.iter().filter(|e| e.kind != EntryType::Dir) {
        if !keep(&e.path) && state.is_farm_link(&e.path) {
            let live = state.live(&e.path);
            fs::remove_file(&live).map_err(Error::io(&live, "removing a link"))?;
        }
    }
    Ok(())
}

/// Removes created directories that `keep` does not list and that are empty,
/// deepest first; forgets those that are gone.
fn remove_empty_dirs(state: &State, dirs: &mut BTreeSet<RelPath>, keep: &HashSet<&RelPath>) {
    let candidates: Vec<RelPath> = dirs
        .iter()
        .rev()
        .filter(|d| !keep.contains(d))
        .cloned()
        .collect();
    for d in candidates {
        match fs::remove_dir(state.live(&d)) {
            Ok(()) => {
                dirs.remove(&d);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                dirs.remove(&d);
            }
            // Not empty: host files live there now; keep it, and the record.
            Err(_) => {}
        }
    }
}

/// Moves the host file adopted at `path` (kept in `backups/<id>/`) back,
/// unless something is in its place again.
fn restore_adopted(state: &State, id: &str, path: &RelPath) -> Result<()> {
    let backup = state.backup_dir(id).join(path.as_str());
    let live = state.live(path);
    if live.symlink_metadata().is_err() && backup.symlink_metadata().is_ok() {
        fs::rename(&backup, &live).map_err(Error::io(&live, "restoring an adopted file"))?;
    }
    Ok(())
}

/// Removes retained releases that the history no longer lists.
fn prune(state: &State, history: &[String]) -> Result<()> {
    let releases = state.releases();
    let list = fs::read_dir(&releases).map_err(Error::io(&releases, "listing releases"))?;
    for item in list {
        let item = item.map_err(Error::io(&releases, "listing releases"))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || history.iter().any(|h| *h == name) {
            continue;
        }
        let dir = item.path();
        fs::remove_dir_all(&dir).map_err(Error::io(&dir, "removing an old release"))?;
    }
    Ok(())
}

/// Finishes (switched already) or reverts (not switched) an interrupted
/// activation, and removes partial releases. Says what it did.
pub fn recover(state: &State) -> Result<Option<String>> {
    let partials = state.partials();
    for p in &partials {
        fs::remove_dir_all(p).map_err(Error::io(p, "removing a partial release"))?;
    }
    let Some(journal) = state.journal()? else {
        return Ok((!partials.is_empty()).then(|| "removed a partly extracted release".to_owned()));
    };
    if state.current_id()?.as_deref() == Some(journal.to.as_str()) {
        finish(state, &journal)?;
        Ok(Some(format!(
            "completed the interrupted {} to {}",
            journal.action, journal.to
        )))
    } else {
        revert(state, &journal)?;
        Ok(Some(format!(
            "reverted the interrupted {} to {}; {} stays active",
            journal.action,
            journal.to,
            journal.from.as_deref().unwrap_or("no release")
        )))
    }
}

/// Undoes steps 4 (the switch did not happen).
fn revert(state: &State, journal: &Journal) -> Result<()> {
    let from_paths: HashSet<RelPath> = match &journal.from {
        Some(from) => state
            .release(from)?
            .manifest
            .entries
            .into_iter()
            .map(|e| e.path)
            .collect(),
        None => HashSet::new(),
    };
    if let Ok(to) = state.release(&journal.to) {
        remove_links(state, &to.manifest, |p| from_paths.contains(p))?;
    }
    for p in &journal.adopted {
        // The new link stands where the host's file was: it goes first.
        let saved = state.backup_dir(&journal.to).join(p.as_str());
        if saved.symlink_metadata().is_ok() && state.is_farm_link(p) {
            let live = state.live(p);
            fs::remove_file(&live).map_err(Error::io(&live, "removing a new link"))?;
        }
        restore_adopted(state, &journal.to, p)?;
    }
    let keep: HashSet<&RelPath> = from_paths.iter().collect();
    let mut created: BTreeSet<RelPath> = journal.created_dirs.iter().cloned().collect();
    remove_empty_dirs(state, &mut created, &keep);
    let record = state.record()?;
    if !record.history.contains(&journal.to) {
        let dir = state.release_dir(&journal.to);
        if dir.symlink_metadata().is_ok() {
            fs::remove_dir_all(&dir).map_err(Error::io(&dir, "removing the unused release"))?;
        }
    }
    state::sync_fs(&state.root)?;
    if hooks::is_live(&state.root) {
        hooks::run(
            &hooks::start_one_by_one(&journal.stopped),
            "the old release is active but a validator unit did not start",
        )?;
    }
    state.remove_journal()
}

/// One line per added, changed, removed and adopted path.
pub fn describe(plan: &Plan, out: &mut impl Write) -> std::io::Result<()> {
    for (label, paths) in [
        ("add", &plan.added),
        ("change", &plan.changed),
        ("remove", &plan.removed),
        ("adopt (move the host's file aside)", &plan.adopt),
    ] {
        for p in paths {
            writeln!(out, "  {label:<7} {p}")?;
        }
    }
    Ok(())
}
