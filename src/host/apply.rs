//! `apply` and `rollback`: lay a verified release down on a root and switch
//! to it atomically. The order is the safety argument:
//!
//! 1. admit the artifact (the trusted comment's signature by a trusted key,
//!    the manifest it binds, names, size) and decide (name, anti-rollback,
//!    conflicts, or a repair of the active release) with nothing written; a
//!    dry run stops here, having made the same decision the real run makes;
//! 2. take the state lock and finish or revert an interrupted activation;
//! 3. create the private `releases/.<id>.partial/` with the release's
//!    metadata (fsynced: recovery reads the manifest back from there), then
//!    write the journal;
//! 4. extract into the partial directory, checking every member against the
//!    signed manifest as it streams, while the file's signature is checked
//!    on another thread and a third creates the new directories and the
//!    farm links of new paths (they dangle until the switch: the root still
//!    shows the old release; which to make, the signed manifest decided;
//!    a plan that also restores lost paths makes them after the staging);
//!    only when the signature matched, rename the partial directory to
//!    `releases/<id>/` (exchanged atomically, after a `syncfs`, with a
//!    release directory of that name already on disk: nothing on disk is
//!    trusted by its name), move adopted host files aside and link them,
//!    `syncfs` (the staged release's data and the links alike);
//! 5. switch `current` with one rename: this is the instant the root changes
//!    from old to new;
//! 6. clean up: remove the farm links and empty created directories that
//!    only the old release had, record the history, prune old releases,
//!    remove the journal.
//!
//! A crash before 5 is reverted by the next `apply` (or `rollback`); a crash
//! after 5 is completed by it. `status` reports either. Every path goes
//! through `State`'s directory handles, so nothing resolves outside the root.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::artifact::manifest::{Binding, EntryType, Manifest, ManifestEntry};
use crate::error::{Error, Result};
use crate::host::confined::{Dir, Kind, Parents};
use crate::host::hooks::{self, Changes, Hooks};
use crate::host::state::{
    self, Action, Entries, Journal, Listing, Release, ReleaseId, ReleaseInfo, State,
};
use crate::host::status::{self, Drift};
use crate::model::RelPath;
use crate::spool::List;
use crate::trust::digest::HashingReader;
use crate::trust::sign::{PublicKey, Signature};
use crate::trust::verify::Verified;

/// What to change on the live paths, computed without writing anything.
/// What it lists for every path of a release is kept in `List`s, in
/// memory up to a limit and past it in a temporary file.
#[derive(Debug, Default, Serialize)]
pub struct Plan {
    pub added: List<RelPath>,
    pub changed: List<RelPath>,
    pub removed: List<RelPath>,
    /// Of `removed`, the files and symlinks: their farm links go once the
    /// release is switched (`finish`).
    #[serde(skip)]
    pub unlink: List<RelPath>,
    /// Directories to create (they are missing on the host).
    #[serde(serialize_with = "entry_paths")]
    pub new_dirs: List<ManifestEntry>,
    /// Farm links to create.
    pub links: List<RelPath>,
    /// Whether a directory or link it makes, not adopted, is one the
    /// release replaced had: lost from the root, restored (`only_adds`).
    #[serde(skip)]
    pub restores: bool,
    /// Of the paths the record lists (created directories, adopted files),
    /// those the new release has: they stay (`finish`).
    #[serde(skip)]
    pub kept: HashSet<RelPath>,
    /// Host files to move aside (`--adopt`, identical files, or drift a
    /// repair replaces).
    pub adopt: Vec<RelPath>,
    /// Of `adopt`: host files identical to what the release puts there.
    pub identical: Vec<RelPath>,
    /// Drift of the active release that this activation repairs.
    pub repairs: Vec<Drift>,
    /// Whether the release is extracted (afresh) before the switch.
    pub stage: bool,
    /// Paths the release cannot take without `--adopt` (or at all).
    pub conflicts: Vec<String>,
    pub hooks: Hooks,
}

impl Plan {
    /// Adds `old`, an entry the new release does not have.
    fn remove(&mut self, old: &ManifestEntry, changes: &mut Changes) -> Result<()> {
        self.removed.push(&old.path)?;
        changes.removed(&old.path);
        if old.kind != EntryType::Dir {
            self.unlink.push(&old.path)?;
        }
        Ok(())
    }
}

fn entry_paths<S: serde::Serializer>(
    entries: &List<ManifestEntry>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::{Error as _, SerializeSeq};
    let mut seq = s.serialize_seq(Some(entries.len()))?;
    for e in entries.iter() {
        seq.serialize_element(&e.map_err(S::Error::custom)?.path)?;
    }
    seq.end()
}

pub struct ApplyOptions {
    pub dry_run: bool,
    pub allow_downgrade: bool,
    pub adopt: bool,
    /// How many releases to keep, the active one included (at least 2:
    /// the command line refuses less).
    pub retain: usize,
    /// The time of this activation (seconds since 1970), recorded for
    /// `status`; the caller reads the clock.
    pub now: u64,
}

/// What `apply` or `rollback` did, or, for a dry run, would do.
#[derive(Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The release is active and the root matches it: nothing to do.
    AlreadyActive {
        id: ReleaseId,
        /// An interrupted activation finished or reverted first (or, in a
        /// dry run, that would be).
        recovered: Option<String>,
    },
    /// `dry_run` false: activated, and `hooks_run` says whether the hooks
    /// ran or are only a plan. `dry_run` true: nothing was written; this is
    /// what the real run would do.
    Activated {
        action: Action,
        id: ReleaseId,
        from: Option<ReleaseId>,
        plan: Box<Plan>,
        dry_run: bool,
        hooks_run: bool,
        /// An interrupted activation finished or reverted first (or, in a
        /// dry run, that would be).
        recovered: Option<String>,
        /// When the old release had signers: milliseconds from their stop
        /// (done) to the first start of the new release's (issued), the
        /// units' own start time not counted; `None` otherwise and in a
        /// dry run. On a root that is not `/` no hook runs and this is
        /// infrakit's own share of the window.
        signer_down_ms: Option<f64>,
    },
}

/// The decision of step 1, made the same way by a dry run and a real run.
struct Decision {
    action: Action,
    current: Option<Release>,
    plan: Plan,
}

/// Verifies, stages and activates `verified` on `state`'s root.
/// `signed` gives the verdict of the artifact's file signature, which may
/// still be being checked (`verify::Admitted`): it is asked for before the
/// staged release is kept, or before the first write of an activation that
/// stages nothing, so nothing but the private staging directory is written
/// before the signature matched.
pub fn apply(
    state: &mut State,
    verified: &Verified,
    opts: &ApplyOptions,
    signed: &mut dyn FnMut() -> Result<()>,
) -> Result<Outcome> {
    let m = verified.manifest();
    let id = ReleaseId::new(&m.name, &m.version, &m.archive.sha256).map_err(|e| {
        Error::Refused(format!(
            "{}: {e}; a release must have a safe name and version",
            verified.artifact().display()
        ))
    })?;
    if opts.dry_run {
        if !state.writable() {
            return Err(Error::io(&state.root, "checking write access")(
                std::io::ErrorKind::PermissionDenied.into(),
            ));
        }
        let recovered = describe_recovery(state)?;
        return match decide(state, verified, &id, opts)? {
            None => Ok(Outcome::AlreadyActive { id, recovered }),
            Some(d) => Ok(Outcome::Activated {
                action: d.action,
                id,
                from: d.current.map(|c| c.info.id),
                plan: Box::new(d.plan),
                dry_run: true,
                hooks_run: false,
                recovered,
                signer_down_ms: None,
            }),
        };
    }
    let created = state.create()?;
    let result = (|| {
        let _lock = state.lock()?;
        let recovered = recover(state)?;
        let Some(d) = decide(state, verified, &id, opts)? else {
            return Ok(Outcome::AlreadyActive {
                id: id.clone(),
                recovered,
            });
        };
        let mut history = state.record()?.history;
        let stage = if d.plan.stage {
            begin_stage(state, verified, &id)?;
            Some(Stage { verified, signed })
        } else {
            signed()?;
            None
        };
        if d.action != Action::Repair {
            history.retain(|h| *h != id);
            history.push(id.clone());
            let keep = history.len().saturating_sub(opts.retain.max(2));
            history.drain(..keep);
        }
        let from = d.current.as_ref().map(|c| c.info.id.clone());
        let journal = Journal::new(d.action, from, id.clone(), &d.plan, history, opts.now)?;
        activate(state, &journal, d.plan, recovered, verified, stage)
    })();
    if result.is_err() {
        state.discard(created);
    }
    result
}

/// The release may not ship InfraKit's own state directory.
fn refuse_state_path(e: &ManifestEntry) -> Result<()> {
    let p = e.path.as_str();
    let inside = p
        .strip_prefix(state::STATE_DIR)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if inside {
        return Err(Error::Refused(format!(
            "the release ships {}, inside InfraKit's own state directory {}; remove it from the profile",
            e.path,
            state::STATE_DIR
        )));
    }
    Ok(())
}

/// Decides what applying `id` means for `state`'s root, reading only:
/// `None` when it is active and the root matches it.
fn decide(
    state: &State,
    verified: &Verified,
    id: &ReleaseId,
    opts: &ApplyOptions,
) -> Result<Option<Decision>> {
    let m = verified.manifest();
    // Every record is read and checked, needed or not: broken state stops
    // the command before it builds on it.
    state.record()?;
    let current = admit(state, m, id, opts)?;
    let (action, plan) = match &current {
        Some(cur) if cur.info.id == *id => {
            let drift = status::drift(state, cur)?;
            if drift.is_empty() {
                return Ok(None);
            }
            (Action::Repair, repair_plan(state, id, verified, drift)?)
        }
        _ => {
            let old = current
                .as_ref()
                .map(|r| r.entries().map(|e| (&r.manifest, e)));
            let mut plan = plan(state, id, old.transpose()?, verified, opts.adopt)?;
            plan.stage = true;
            (Action::Apply, plan)
        }
    };
    refuse_conflicts(&plan)?;
    refuse_bad_units(&plan)?;
    Ok(Some(Decision {
        action,
        current,
        plan,
    }))
}

/// Decides whether release `id` may replace what `state` runs; reads only.
fn admit(
    state: &State,
    m: &Manifest,
    id: &ReleaseId,
    opts: &ApplyOptions,
) -> Result<Option<Release>> {
    // The release it replaces is read without its entries: the plan reads
    // them again as it goes. Applied again, it is read whole (its drift is
    // checked against them).
    let current = match state.current_id()? {
        Some(cur) if cur == *id => Some(state.release(&cur)?),
        Some(cur) => Some(state.release_head(&cur)?),
        None => None,
    };
    if let Some(cur) = &current
        && cur.info.id != *id
        && !opts.allow_downgrade
    {
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
    Ok(current)
}

/// Compares two manifests and the live paths of `state`'s root. Host files
/// identical to what the release puts there are adopted without `--adopt`;
/// so are all others with it. A backup of an adopted path that already
/// exists is never overwritten: that is a conflict. A release that ships
/// InfraKit's own state directory is refused.
/// `old`: the manifest replaced, and its entries (which it need not hold);
/// `new`'s entries are read once, in order, as the plan is made.
pub fn plan(
    state: &State,
    id: &ReleaseId,
    old: Option<(&Manifest, Entries<'_>)>,
    new: &dyn Listing,
    adopt: bool,
) -> Result<Plan> {
    let (old, olds) = match old {
        Some((m, entries)) => (Some(m), entries),
        None => (None, Box::new(std::iter::empty()) as Entries<'_>),
    };
    // Both lists are sorted (`EntryCheck`): merged, not indexed. The first
    // error reading the old ends its list, and fails the plan.
    let mut failed = None;
    let mut olds = olds
        .map_while(|o| o.map_err(|e| failed = Some(e)).ok())
        .peekable();
    let mut plan = Plan::default();
    let mut changes = Changes::default();
    let record = state.record()?;
    let mut farm = state.farm();
    // The directories the host lacks that hold the entry being planned,
    // innermost last: nothing is below them (entries come in manifest
    // order, a directory just before what it holds).
    let mut absent: Vec<RelPath> = Vec::new();
    for e in new.entries()? {
        let e = e?;
        let e: &ManifestEntry = &e;
        refuse_state_path(e)?;
        changes.entry(e);
        if record.created_dirs.contains(&e.path) || record.adopted.contains_key(&e.path) {
            plan.kept.insert(e.path.clone());
        }
        while let Some(o) = olds.next_if(|o| o.path < e.path) {
            plan.remove(&o, &mut changes)?;
        }
        let replaced = olds.next_if(|o| o.path == e.path);
        match &replaced {
            None => {
                plan.added.push(&e.path)?;
                changes.added(e);
            }
            // Two directories differ only in mode and owner (not in layer).
            Some(o) if o.kind == EntryType::Dir && e.kind == EntryType::Dir => {
                if (o.mode, o.uid, o.gid) != (e.mode, e.uid, e.gid) {
                    plan.changed.push(&e.path)?;
                    changes.changed(&e.path);
                }
            }
            Some(o) if **o != *e => {
                plan.changed.push(&e.path)?;
                changes.changed(&e.path);
            }
            Some(_) => {}
        }
        while absent.last().is_some_and(|d| !e.path.is_under(d)) {
            absent.pop();
        }
        let host = match e.path.parent() {
            Some(parent) if absent.last() == Some(&parent) => None,
            _ => farm.meta(&e.path)?.map(|m| m.kind),
        };
        if e.kind == EntryType::Dir && host.is_none() {
            absent.push(e.path.clone());
        }
        match (e.kind, host) {
            (EntryType::Dir, None) => {
                plan.restores |= replaced.is_some();
                plan.new_dirs.push(e)?;
            }
            (EntryType::Dir, Some(Kind::Dir)) => {}
            (EntryType::Dir, Some(k)) => plan.conflicts.push(format!(
                "{}: the host has a {} where the release has a directory (never adopted)",
                e.path,
                host_kind(k)
            )),
            (_, None) => {
                plan.restores |= replaced.is_some();
                plan.links.push(&e.path)?;
            }
            (_, Some(_)) if farm.is_link(&e.path) => {}
            (_, Some(Kind::Dir)) => plan.conflicts.push(format!(
                "{}: the host has a directory where the release has a {} (never adopted)",
                e.path,
                kind_name(e.kind)
            )),
            (_, Some(k)) => {
                let identical = identical(state, e)?;
                if !(identical || adopt) {
                    plan.conflicts.push(format!(
                        "{}: a host {} InfraKit does not own (--adopt moves it aside)",
                        e.path,
                        host_kind(k)
                    ));
                } else if state.has_backup(id, &e.path)? {
                    plan.conflicts.push(format!(
                        "{}: a backup of it from an earlier adoption by {id} exists in {}; move it away first",
                        e.path,
                        state.path("backups").join(id.as_str()).display()
                    ));
                } else {
                    if identical {
                        plan.identical.push(e.path.clone());
                    }
                    plan.adopt.push(e.path.clone());
                    plan.links.push(&e.path)?;
                }
            }
        }
    }
    for o in olds {
        plan.remove(&o, &mut changes)?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    plan.hooks = Hooks::of(old, new.head(), &changes);
    Ok(plan)
}

/// The plan that brings a drifted root back to its active release `id`
/// (`release`): links and directories restored, whatever replaced a link
/// moved aside (kept, never deleted), the release extracted afresh when its
/// own files drifted, and the units whose files were repaired restarted.
fn repair_plan(
    state: &State,
    id: &ReleaseId,
    release: &dyn Listing,
    drift: Vec<Drift>,
) -> Result<Plan> {
    let m = release.head();
    let mut plan = plan(state, id, Some((m, release.entries()?)), release, true)?;
    let drifted: HashSet<&str> = drift.iter().map(|d| d.path.as_str()).collect();
    let mut changes = Changes::default();
    for e in release.entries()? {
        let e = e?;
        changes.entry(&e);
        if drifted.contains(e.path.as_str()) {
            changes.changed(&e.path);
        }
    }
    plan.hooks = Hooks::of(Some(m), m, &changes);
    plan.stage = drift.iter().any(|d| d.in_release);
    plan.repairs = drift;
    Ok(plan)
}

/// Whether the host's file or symlink at `e.path` is what the release puts
/// there: same type, and the same content or link target.
fn identical(state: &State, e: &ManifestEntry) -> Result<bool> {
    let live = state.live_dir();
    let path = e.path.as_str();
    match e.kind {
        EntryType::Dir => Ok(false),
        EntryType::Symlink => Ok(live
            .read_link(path)
            .is_ok_and(|t| Some(t.as_os_str()) == e.target.as_deref().map(std::ffi::OsStr::new))),
        EntryType::File => {
            let Ok(file) = live.open_file(path) else {
                return Ok(false);
            };
            if file.metadata().map(|m| m.len()).ok() != e.size {
                return Ok(false);
            }
            let mut reader = HashingReader::new(file);
            std::io::copy(&mut reader, &mut std::io::sink())
                .map_err(Error::io(&state.live(&e.path), "reading"))?;
            let (sha, n) = reader.finish();
            Ok(Some(sha) == e.sha256 && Some(n) == e.size)
        }
    }
}

/// What the host has at a path, for conflict messages.
fn host_kind(kind: Kind) -> &'static str {
    match kind {
        Kind::Dir => "directory",
        Kind::Symlink => "symlink",
        Kind::File => "file",
        Kind::Other => "special file",
    }
}

fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Dir => "directory",
        EntryType::File => "file",
        EntryType::Symlink => "symlink",
    }
}

/// Reactivates the release before the active one, after checking it again
/// as untrusted: its manifest must still be the one its stored signature's
/// trusted comment names, signed by one of `keys`, and its files on disk
/// must match that manifest. Under the lock, after finishing or reverting
/// an interrupted activation (a dry run says it would).
pub fn rollback(state: &State, keys: &[PublicKey], dry_run: bool, now: u64) -> Result<Outcome> {
    if !state.exists() {
        return Err(Error::Refused(format!(
            "{}: no release was ever applied; nothing to roll back",
            state.root.display()
        )));
    }
    if dry_run && !state.writable() {
        return Err(Error::io(&state.root, "checking write access")(
            std::io::ErrorKind::PermissionDenied.into(),
        ));
    }
    let _lock = if dry_run { None } else { Some(state.lock()?) };
    let recovered = if dry_run {
        describe_recovery(state)?
    } else {
        recover(state)?
    };
    let record = state.record()?;
    let Some(from) = state.current_id()? else {
        return Err(Error::Refused(format!(
            "{}: no release is active; nothing to roll back",
            state.root.display()
        )));
    };
    let Some(pos) = record.history.iter().rposition(|h| *h == from) else {
        return Err(Error::Refused(format!(
            "the active release {from} is not in the history of {}",
            state.path("state.json").display()
        )));
    };
    let Some(to) = pos.checked_sub(1).map(|i| record.history[i].clone()) else {
        return Err(Error::Refused(format!(
            "{from} is the oldest retained release: there is nothing to roll back to"
        )));
    };
    let old = state.release_head(&from)?;
    let target = state.release(&to)?;
    vouch(state, &target, keys)?;
    let drift = status::release_drift(state, &target)?;
    if let Some(d) = drift.first() {
        return Err(Error::Refused(format!(
            "the retained release {to} no longer matches its manifest ({} path(s), first {}: {}); apply its artifact again instead",
            drift.len(),
            d.path,
            d.detail
        )));
    }
    let old_entries = Some((&old.manifest, old.entries()?));
    let plan = plan(state, &to, old_entries, &target, false)?;
    refuse_conflicts(&plan)?;
    refuse_bad_units(&plan)?;
    if dry_run {
        return Ok(Outcome::Activated {
            action: Action::Rollback,
            id: to,
            from: Some(from),
            plan: Box::new(plan),
            dry_run: true,
            hooks_run: false,
            recovered,
            signer_down_ms: None,
        });
    }
    let history = record.history[..pos].to_vec();
    let journal = Journal::new(Action::Rollback, Some(from), to, &plan, history, now)?;
    activate(state, &journal, plan, recovered, &target, None)
}

/// Checks that a retained release's manifest is still the signed one: the
/// stored signature's trusted comment, signed by a trusted key, names this
/// manifest's digest, name and version.
fn vouch(state: &State, release: &Release, keys: &[PublicKey]) -> Result<()> {
    let id = &release.info.id;
    let refuse = |why: String| {
        Error::Refused(format!(
            "the retained release {id} is not vouched for: {why} ({}); apply its artifact again instead",
            state.path("releases").join(id.as_str()).display()
        ))
    };
    let signature = Signature::parse(&release.signature).map_err(&refuse)?;
    signature.verify_comment(keys).map_err(&refuse)?;
    let claimed = Binding::parse(signature.trusted_comment()).map_err(&refuse)?;
    let m = &release.manifest;
    if (claimed.manifest_sha256, &claimed.name, &claimed.version)
        != (release.manifest_sha256, &m.name, &m.version)
    {
        return Err(refuse(
            "its manifest is not the one its signature names".to_owned(),
        ));
    }
    Ok(())
}

impl Journal {
    /// The journal of activating `plan`: what it creates, adopts and runs.
    fn new(
        action: Action,
        from: Option<ReleaseId>,
        to: ReleaseId,
        plan: &Plan,
        history: Vec<ReleaseId>,
        applied_at: u64,
    ) -> Result<Journal> {
        Ok(Journal {
            action,
            from,
            to,
            created_dirs: (plan.new_dirs.iter())
                .map(|e| e.map(|e| e.path))
                .collect::<Result<_>>()?,
            adopted: plan.adopt.clone(),
            history,
            applied_at,
            hooks: plan.hooks.clone(),
        })
    }
}

/// The hooks name units `systemctl` gets as arguments, and the journal
/// keeps them: a name systemd could not load is refused before anything is
/// written (it would also make the journal unreadable later).
fn refuse_bad_units(plan: &Plan) -> Result<()> {
    plan.hooks.check().map_err(|m| {
        Error::Refused(format!(
            "the release's units: {m}; fix the unit's file name or the adapter"
        ))
    })
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

/// Creates the private `releases/.<id>.partial/` that `verified` is
/// extracted into, with the release's metadata written and fsynced first:
/// once the journal names the release, an interrupted activation is
/// reverted with the manifest read back from there (`recover`).
fn begin_stage(state: &State, verified: &Verified, id: &ReleaseId) -> Result<()> {
    let (releases, partial, partial_path) = staging(state, id)?;
    let io = |action| Error::io(&partial_path, action);
    releases
        .remove_tree(&partial)
        .map_err(io("removing a stale partial release"))?;
    // Private until every member was checked: files get their final modes
    // (setuid included) before their digests are known.
    let made = releases
        .create_dir(&partial, 0o700)
        .and_then(|()| releases.set_mode(&partial, 0o700))
        .and_then(|()| releases.open_dir(&partial))
        .map_err(io("creating the staging directory"))
        .and_then(|dir| {
            write_metadata(verified, id, &dir)?;
            dir.sync().map_err(io("syncing the staging directory"))
        });
    if made.is_err() {
        let _ = releases.remove_tree(&partial);
    }
    made
}

/// `releases/` as a handle, and the name and path in it of release `id`'s
/// partial directory.
fn staging(state: &State, id: &ReleaseId) -> Result<(Dir, String, std::path::PathBuf)> {
    let partial = state::partial_name(id);
    let path = state.path("releases").join(&partial);
    Ok((state.releases()?, partial, path))
}

/// The extraction of step 4, run beside the farm links.
struct Stage<'a> {
    verified: &'a Verified,
    /// The verdict of the file's signature (see `apply`).
    signed: &'a mut dyn FnMut() -> Result<()>,
}

impl Stage<'_> {
    /// Extracts the release into its partial directory (`begin_stage`) and,
    /// once the file's signature matched, renames it to `releases/<id>/`; a
    /// release directory of that name already there is replaced atomically
    /// (`RENAME_EXCHANGE`), never trusted. A failure leaves the partial
    /// directory for `revert` to remove.
    fn run(self, state: &State, id: &ReleaseId) -> Result<()> {
        let (releases, partial, partial_path) = staging(state, id)?;
        let io = |action| Error::io(&partial_path, action);
        let dir = releases
            .open_dir(&partial)
            .map_err(io("opening the staging directory"))?;
        // The members were compared with the signed manifest as they were
        // written; the file's signature decides first, whatever they showed.
        let extracted = extract(self.verified, &dir);
        (self.signed)()?;
        extracted?;
        // The members' data is made durable by `prepare`'s syncfs, with the
        // links and before the switch; what recovery reads of this release
        // (its metadata) was fsynced before the journal named it. A release
        // directory of this name may be a retained one that `rollback` can
        // still switch to: it is replaced only by a staged release that is
        // durable in full.
        releases
            .set_mode(&partial, 0o755)
            .map_err(io("making the staged release readable"))?;
        match crate::host::confined::optional(releases.stat(id.as_str())) {
            Ok(Some(_)) => {
                releases
                    .sync_fs()
                    .map_err(io("syncing the staged release"))?;
                releases
                    .exchange(&partial, id.as_str())
                    .map_err(io("replacing the release directory"))?;
                releases
                    .remove_tree(&partial)
                    .map_err(io("removing the replaced release directory"))?;
            }
            Ok(None) => releases
                .rename(&partial, &releases, id.as_str())
                .map_err(io("renaming the staged release"))?,
            Err(e) => return Err(io("inspecting the release directory")(e)),
        }
        releases.sync().map_err(io("syncing releases"))
    }
}

/// `manifest.json`, `artifact.minisig` and `release.json` of a staged release.
fn write_metadata(verified: &Verified, id: &ReleaseId, dir: &Dir) -> Result<()> {
    let m = verified.manifest();
    let info = ReleaseInfo {
        id: id.clone(),
        name: m.name.clone(),
        version: m.version.clone(),
        sha256: m.archive.sha256,
        key_id: verified.key_id().to_owned(),
    };
    let info_json = state::to_json(&info);
    let io = |name: &str| Error::io(&dir.display(name), "writing release metadata");
    let write = |name: &str, fill: &dyn Fn(&mut std::fs::File) -> Result<()>| {
        let mut f = dir.create_file(name, 0o644).map_err(io(name))?;
        fill(&mut f)?;
        f.sync_all().map_err(io(name))
    };
    write("manifest.json", &|f| {
        verified.write_manifest(f, &dir.display("manifest.json"))
    })?;
    for (name, bytes) in [
        ("artifact.minisig", verified.signature_bytes()),
        ("release.json", &info_json[..]),
    ] {
        write(name, &|f| f.write_all(bytes).map_err(io(name)))?;
    }
    Ok(())
}

/// Writes every member into `dir/rootfs` (which must not exist) as it
/// streams: new files only (`O_EXCL`, nothing followed), each under a
/// directory this release created (`Verified::stream` guarantees the
/// order); owners and modes from the manifest.
fn extract(verified: &Verified, dir: &Dir) -> Result<()> {
    let rootfs = dir
        .create_dir("rootfs", 0o755)
        .and_then(|()| dir.set_mode("rootfs", 0o755))
        .and_then(|()| dir.open_dir("rootfs"))
        .map_err(Error::io(
            &dir.display("rootfs"),
            "creating the release root",
        ))?;
    // Members come in manifest order: most share their directory with the
    // one before, which is then opened once for all of them.
    let mut parents = Parents::new(&rootfs);
    // The directories above the member, outermost first, with the modes
    // they get once everything in them is written (a directory's members
    // follow it at once, in manifest order): one per level, not one per
    // directory of the release.
    let mut open: Vec<(RelPath, u32)> = Vec::new();
    let close = |open: &mut Vec<(RelPath, u32)>, next: Option<&RelPath>| -> Result<()> {
        while let Some((dir, mode)) = open.pop_if(|(dir, _)| !next.is_some_and(|p| p.is_under(dir)))
        {
            rootfs
                .set_mode(dir.as_str(), mode)
                .map_err(Error::io(&rootfs.display(dir.as_str()), "setting mode"))?;
        }
        Ok(())
    };
    let mut buf = vec![0u8; 256 * 1024];
    verified.stream(&mut |want, content| {
        close(&mut open, Some(&want.path))?;
        let rel = Path::new(want.path.as_str());
        let io = |action| Error::io(&rootfs.display(rel), action);
        let (parent, name) = parents.of(rel).map_err(io("opening its directory"))?;
        match want.kind {
            EntryType::Dir => {
                parent
                    .create_dir(name, 0o700)
                    .and_then(|()| parent.set_owner_mode(name, want.uid, want.gid, None))
                    .map_err(io("creating directory"))?;
                open.push((want.path.clone(), want.mode));
            }
            EntryType::File => {
                let mut file = parent
                    .create_file(name, 0o600)
                    .map_err(io("creating file"))?;
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
                    file.write_all(&buf[..n]).map_err(io("writing file"))?;
                }
                // Owner first: chown clears setuid/setgid bits.
                std::os::unix::fs::fchown(&file, Some(want.uid), Some(want.gid))
                    .map_err(io("setting owner"))?;
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(want.mode))
                    .map_err(io("setting mode"))?;
            }
            EntryType::Symlink => {
                let target = want.target.as_deref().unwrap_or_default();
                parent
                    .symlink(target, name)
                    .and_then(|()| parent.set_owner_mode(name, want.uid, want.gid, None))
                    .map_err(io("creating symlink"))?;
            }
        }
        Ok(())
    })?;
    close(&mut open, None)
}

/// Steps 3 (its journal) to 6 of the module comment, then the hooks. A failure before the
/// switch is reverted at once (and would be by the next run otherwise).
/// `manifests` are those of the release activated and the one it replaces
/// (checked already).
fn activate(
    state: &State,
    journal: &Journal,
    plan: Plan,
    recovered: Option<String>,
    new: &dyn Listing,
    stage: Option<Stage<'_>>,
) -> Result<Outcome> {
    if let Err(e) = state.write_journal(journal) {
        if stage.is_some() {
            let _ = state.remove_release(&state::partial_name(&journal.to));
        }
        return Err(e);
    }
    let live = hooks::is_live(&state.root);
    let prepared = prepare(state, journal, &plan, stage).and_then(|()| {
        if live {
            hooks::run(&plan.hooks.before(), "the activation was reverted")?;
        }
        Ok(())
    });
    if let Err(e) = prepared {
        let _ = revert(state, journal, Some(new));
        return Err(e);
    }
    let signers_down = std::time::Instant::now();
    state.switch(&journal.to)?;
    // What the new release has of the record's paths: those `plan` found,
    // and the directories this activation creates (the journal's, in
    // manifest order).
    let has = |p: &RelPath| plan.kept.contains(p) || journal.created_dirs.binary_search(p).is_ok();
    let ours = (journal.created_dirs.clone(), journal.adopted.clone());
    let starting = finish(state, journal, &has, ours, plan.unlink.iter())?;
    let signer_down_ms = (!journal.hooks.stop_before.is_empty())
        .then(|| (starting - signers_down).as_secs_f64() * 1000.0)
        .map(|ms| (ms * 10.0).round() / 10.0);
    Ok(Outcome::Activated {
        action: journal.action,
        id: journal.to.clone(),
        from: journal.from.clone(),
        plan: Box::new(plan),
        dry_run: false,
        hooks_run: live,
        recovered,
        signer_down_ms,
    })
}

/// Step 4: new directories and farm links, made on a thread of their own
/// while `stage` extracts the release; then, once it is staged
/// (its file signature matched), adopted host files moved aside and
/// replaced by their links; synced. The links only dangle until the
/// switch, and which ones to make the signed manifest decided (its
/// trusted comment's signature was checked before anything was written).
fn prepare(state: &State, journal: &Journal, plan: &Plan, stage: Option<Stage<'_>>) -> Result<()> {
    let adopted: HashSet<&RelPath> = journal.adopted.iter().collect();
    let new_paths = || -> Result<()> {
        for e in plan.new_dirs.iter() {
            state.create_live_dir(&e?)?;
        }
        let mut farm = state.farm();
        for p in plan.links.iter() {
            let p = p?;
            if !adopted.contains(&p) {
                farm.link(&p)?;
            }
        }
        Ok(())
    };
    match stage {
        None => new_paths()?,
        // Links that restore what the root lost (a repair, or drift of the
        // release being replaced) would outlive a failed verdict, which
        // reverts only what this release adds: they wait for the staging.
        Some(stage) if journal.action == Action::Repair || plan.restores => {
            stage.run(state, &journal.to)?;
            new_paths()?;
        }
        Some(stage) => {
            let (staged, linked) = std::thread::scope(|scope| {
                let links = scope.spawn(new_paths);
                let staged = stage.run(state, &journal.to);
                let linked = links
                    .join()
                    .unwrap_or_else(|_| Err(Error::check("the linking thread panicked")));
                (staged, linked)
            });
            // The staging's error first: the file signature's verdict is
            // the one reported, whatever else failed.
            staged?;
            linked?;
        }
    }
    let mut farm = state.farm();
    for p in &journal.adopted {
        state.move_aside(&journal.to, p)?;
        farm.link(p)?;
    }
    state.sync_fs()
}

/// Step 6, after the switch: idempotent, so recovery can run it again.
/// `has` says whether `journal.to`, the release activated, has a path the
/// record lists; `vouched`, the journal's created directories and adopted
/// files that it vouches for (`vouched`); `unlink`, the files and symlinks
/// of `journal.from` that it does not have (`Plan::unlink`). Returns when
/// the signers' starts began (the end of their window): everything that
/// can wait (pruning old releases) runs after them.
fn finish(
    state: &State,
    journal: &Journal,
    has: &dyn Fn(&RelPath) -> bool,
    (created, adopted): (Vec<RelPath>, Vec<RelPath>),
    unlink: impl Iterator<Item = Result<RelPath>>,
) -> Result<std::time::Instant> {
    let mut farm = state.farm();
    for p in unlink {
        let p = p?;
        if farm.is_link(&p) {
            farm.unlink(&p)?;
        }
    }
    state.sync_fs()?;
    let mut record = state.record()?;
    record.created_dirs.extend(created);
    remove_empty_dirs(state, &mut record.created_dirs, has);
    // Host files adopted for paths no active release has any more go back.
    let gone: Vec<(RelPath, ReleaseId)> = record
        .adopted
        .iter()
        .filter(|(p, _)| !has(p))
        .map(|(p, id)| (p.clone(), id.clone()))
        .collect();
    for (p, id) in gone {
        state.restore(&id, &p)?;
        record.adopted.remove(&p);
    }
    for p in adopted {
        record.adopted.insert(p, journal.to.clone());
    }
    record.history = journal.history.clone();
    record
        .applied_at
        .insert(journal.to.clone(), journal.applied_at);
    record
        .applied_at
        .retain(|id, _| journal.history.contains(id));
    state.write_record(&record)?;
    let live = hooks::is_live(&state.root);
    let then = "the release is active; the next apply or rollback runs the hooks again";
    if live {
        hooks::run(&journal.hooks.settle(), then)?;
    }
    let starting = std::time::Instant::now();
    if live {
        hooks::run(&journal.hooks.starts(), then)?;
    }
    prune(state, &record.history)?;
    state.remove_journal()?;
    Ok(starting)
}

/// The journal's directories and adopted paths that `to` (the release the
/// journal activates) vouches for: a journal read back from disk may name
/// any path, and only a directory of `to` can have been created, only a
/// file or symlink of `to` adopted. One pass over `to`'s entries, each also
/// handed to `each`.
fn vouched(
    journal: &Journal,
    to: &dyn Listing,
    mut each: impl FnMut(&ManifestEntry) -> Result<()>,
) -> Result<(Vec<RelPath>, Vec<RelPath>)> {
    let dirs: HashSet<&RelPath> = journal.created_dirs.iter().collect();
    let files: HashSet<&RelPath> = journal.adopted.iter().collect();
    let (mut created, mut adopted) = (Vec::new(), Vec::new());
    for e in to.entries()? {
        let e = e?;
        match e.kind {
            EntryType::Dir if dirs.contains(&e.path) => created.push(e.path.clone()),
            EntryType::File | EntryType::Symlink if files.contains(&e.path) => {
                adopted.push(e.path.clone());
            }
            _ => {}
        }
        each(&e)?;
    }
    Ok((created, adopted))
}

/// Removes created directories that `keep` does not list and that are empty,
/// deepest first; forgets those that are gone.
fn remove_empty_dirs(state: &State, dirs: &mut BTreeSet<RelPath>, keep: impl Fn(&RelPath) -> bool) {
    let candidates: Vec<RelPath> = dirs.iter().rev().filter(|d| !keep(d)).cloned().collect();
    for d in candidates {
        match state.remove_live_dir(&d) {
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

/// Removes retained releases that the history no longer lists.
fn prune(state: &State, history: &[ReleaseId]) -> Result<()> {
    for name in state.release_names()? {
        if name.starts_with('.') || history.iter().any(|h| h.as_str() == name) {
            continue;
        }
        state.remove_release(&name)?;
    }
    Ok(())
}

/// What `recover` would do, writing nothing (for a dry run).
fn describe_recovery(state: &State) -> Result<Option<String>> {
    let Some(journal) = state.journal()? else {
        return Ok((!state.partials()?.is_empty())
            .then(|| "would remove a partly extracted release".to_owned()));
    };
    let switched = state.current_id()?.as_ref() == Some(&journal.to);
    Ok(Some(format!(
        "would first {} the interrupted {} to {}",
        if switched { "complete" } else { "revert" },
        journal.action,
        journal.to
    )))
}

/// Finishes (switched already) or reverts (not switched) an interrupted
/// activation, and removes partial releases. Says what it did.
pub fn recover(state: &State) -> Result<Option<String>> {
    let Some(journal) = state.journal()? else {
        return Ok(state
            .remove_partials()?
            .then(|| "removed a partly extracted release".to_owned()));
    };
    if state.current_id()?.as_ref() == Some(&journal.to) {
        let new = state.release(&journal.to)?.manifest;
        // The old release's links the new one lacks; none if it is pruned
        // already (a previous finish got that far) or cannot be read.
        let unlink = |from: &ReleaseId| -> Result<Vec<RelPath>> {
            let mut paths = Vec::new();
            for e in state.release_head(from)?.entries()? {
                let e = e?;
                if e.kind != EntryType::Dir && !new.has(&e.path) {
                    paths.push(e.path.clone());
                }
            }
            Ok(paths)
        };
        let unlink = (journal.from.as_ref()).and_then(|from| unlink(from).ok());
        let ours = vouched(&journal, &new, |_| Ok(()))?;
        let unlink = unlink.unwrap_or_default().into_iter().map(Ok);
        finish(state, &journal, &|p| new.has(p), ours, unlink)?;
        state.remove_partials()?;
        Ok(Some(format!(
            "completed the interrupted {} to {}",
            journal.action, journal.to
        )))
    } else {
        // Interrupted while staging, the release is still the partial one
        // (its metadata was written before the journal named it).
        let to = (state.release(&journal.to))
            .or_else(|_| state.staged_release(&journal.to))
            .ok()
            .map(|r| r.manifest);
        revert(state, &journal, to.as_ref().map(|m| m as &dyn Listing))?;
        Ok(Some(format!(
            "reverted the interrupted {} to {}; {} stays active",
            journal.action,
            journal.to,
            journal
                .from
                .as_ref()
                .map_or("no release", ReleaseId::as_str)
        )))
    }
}

/// Undoes steps 3 and 4 (the switch did not happen). `to` is the release
/// the journal activates, if it can be read: without it, the journal
/// vouches for no path. Both releases' entries are read through once
/// before anything is changed (one that cannot be read, or whose file
/// changed, stops the revert untouched, as when they were held), then
/// side by side, in order.
fn revert(state: &State, journal: &Journal, to: Option<&dyn Listing>) -> Result<()> {
    let from = (journal.from.as_ref())
        .map(|from| state.release_head(from))
        .transpose()?;
    let listings = [from.as_ref().map(|f| f as &dyn Listing), to];
    for listing in listings.into_iter().flatten() {
        listing.entries()?.try_for_each(|e| e.map(drop))?;
    }
    let mut olds = match &from {
        Some(from) => from.entries()?,
        None => Box::new(std::iter::empty()),
    }
    .peekable();
    // Directories of `to` that the release that stays has too.
    let mut kept_dirs: HashSet<RelPath> = HashSet::new();
    let (created, adopted) = match to {
        Some(to) => {
            let mut farm = state.farm();
            vouched(journal, to, |e| {
                let kept = loop {
                    match olds.peek() {
                        Some(Err(_)) => match olds.next() {
                            Some(Err(err)) => return Err(err),
                            _ => continue,
                        },
                        Some(Ok(o)) if o.path < e.path => {
                            olds.next();
                        }
                        Some(Ok(o)) => break o.path == e.path,
                        None => break false,
                    }
                };
                if e.kind == EntryType::Dir {
                    if kept {
                        kept_dirs.insert(e.path.clone());
                    }
                } else if !kept && farm.is_link(&e.path) {
                    farm.unlink(&e.path)?;
                }
                Ok(())
            })?
        }
        None => (Vec::new(), Vec::new()),
    };
    // The rest of the release that stays: its end checks its digest.
    olds.try_for_each(|e| e.map(drop))?;
    for p in &adopted {
        // The new link stands where the host's file was: it goes first.
        if state.has_backup(&journal.to, p)? && state.is_farm_link(p) {
            state.farm().unlink(p)?;
        }
        state.restore(&journal.to, p)?;
    }
    let mut created: BTreeSet<RelPath> = created.into_iter().collect();
    remove_empty_dirs(state, &mut created, |p| kept_dirs.contains(p));
    let record = state.record()?;
    if !record.history.contains(&journal.to) {
        state.remove_release(journal.to.as_str())?;
    }
    state.remove_partials()?;
    state.sync_fs()?;
    if hooks::is_live(&state.root) {
        hooks::run(
            &hooks::start_one_by_one(&journal.hooks.stop_before),
            "the old release is active but a validator unit did not start",
        )?;
    }
    state.remove_journal()
}

/// One line per added, changed, removed, adopted and repaired path. Output
/// that cannot be written (a closed pipe) is dropped; a list that cannot be
/// read back is the error.
pub fn describe(plan: &Plan, out: &mut impl Write) -> Result<()> {
    let mut put = |line: std::fmt::Arguments<'_>| {
        let _ = writeln!(out, "  {line}");
    };
    for d in &plan.repairs {
        put(format_args!(
            "repair  {}: {} ({})",
            d.path, d.kind, d.detail
        ));
    }
    for (label, paths) in [
        ("add", &plan.added),
        ("change", &plan.changed),
        ("remove", &plan.removed),
    ] {
        for p in paths.iter() {
            put(format_args!("{label:<7} {}", p?));
        }
    }
    let adopted = plan.adopt.iter().filter(|p| !plan.identical.contains(p));
    let identical =
        "adopt (identical to the release; moved aside, restored when no release has it)";
    for p in &plan.identical {
        put(format_args!("{identical} {p}"));
    }
    for p in adopted {
        put(format_args!("adopt (move the host's file aside) {p}"));
    }
    Ok(())
}
