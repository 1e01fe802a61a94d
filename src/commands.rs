//! One function per subcommand: turn validated arguments into library calls
//! and print what happened (human text by default, JSON where asked). This
//! layer owns the terminal: progress bars on stderr, summaries on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::archive::Format;
use crate::emit::{self, BuildOptions};
use crate::error::{Error, Result};
use crate::manifest::{EntryType, Manifest};
use crate::sign::{self, PublicKey, SecretKey};
use crate::verify::{self, VerifyOptions};

/// How to talk to the user.
pub struct Ui {
    pub quiet: bool,
}

impl Ui {
    /// Runs `work` with a byte progress bar on stderr (hidden when quiet or
    /// not a terminal), which `work` feeds with `(done, total)`; the bar is
    /// cleared when it returns.
    fn with_bar<T>(&self, what: &str, work: impl FnOnce(&dyn Fn(u64, u64)) -> T) -> T {
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            let style = ProgressStyle::with_template(
                "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> ");
            ProgressBar::new(0)
                .with_style(style)
                .with_message(what.to_owned())
        };
        let out = work(&|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        out
    }

    /// A line on stdout; a closed pipe (`| head`) is not an error.
    fn say(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }
}

pub fn keygen(ui: &Ui, prefix: &Path, password_file: Option<&Path>) -> Result<()> {
    let pub_path = with_suffix(prefix, ".pub");
    let key_path = with_suffix(prefix, ".key");
    for p in [&pub_path, &key_path] {
        if p.symlink_metadata().is_ok() {
            return Err(Error::input(
                p,
                "already exists; keygen never overwrites a key",
            ));
        }
    }
    let password = password_file.map(sign::read_password).transpose()?;
    let key = SecretKey::generate()?;
    let dir = match prefix.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let secret = key.to_file(password.as_deref())?;
    // Temp files are created 0600; persist_noclobber refuses to replace.
    let mut key_tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(Error::io(dir, "creating key file"))?;
    key_tmp
        .write_all(secret.as_bytes())
        .map_err(Error::io(&key_path, "writing secret key"))?;
    let mut pub_tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(Error::io(dir, "creating key file"))?;
    pub_tmp
        .write_all(key.public().to_file().as_bytes())
        .map_err(Error::io(&pub_path, "writing public key"))?;
    use std::os::unix::fs::PermissionsExt;
    pub_tmp
        .as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(Error::io(&pub_path, "setting permissions"))?;
    key_tmp
        .persist_noclobber(&key_path)
        .map_err(|e| Error::io(&key_path, "saving secret key")(e.error))?;
    pub_tmp
        .persist_noclobber(&pub_path)
        .map_err(|e| Error::io(&pub_path, "saving public key")(e.error))?;
    ui.say(format_args!(
        "key {}: public {}, secret {} ({})",
        key.public().key_id(),
        pub_path.display(),
        key_path.display(),
        if password.is_some() {
            "encrypted"
        } else {
            "unencrypted: keep it safe"
        }
    ));
    Ok(())
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `build` arguments after the environment has been consulted.
pub struct BuildArgs {
    pub profile: PathBuf,
    pub out: PathBuf,
    pub sign_key: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub format: Format,
    pub level: Option<i32>,
    pub release_version: Option<String>,
    pub source_date_epoch: Option<u64>,
    pub workers: u32,
}

pub fn build(ui: &Ui, args: &BuildArgs) -> Result<()> {
    let key = args
        .sign_key
        .as_deref()
        .map(|k| SecretKey::load(k, args.password_file.as_deref()))
        .transpose()?;
    let opts = BuildOptions {
        profile: &args.profile,
        out_dir: &args.out,
        format: args.format,
        level: args.level,
        version: args.release_version.as_deref(),
        source_date_epoch: args.source_date_epoch,
        sign_key: key.as_ref(),
        workers: args.workers,
    };
    let built = ui.with_bar("building", |progress| emit::build(&opts, progress))?;
    let m = &built.manifest;
    ui.say(format_args!(
        "built {} {}: {} entries, {} bytes, sha256 {}",
        m.name,
        m.version,
        m.entries.len(),
        m.archive.size,
        m.archive.sha256
    ));
    ui.say(format_args!("  {}", built.artifact.display()));
    ui.say(format_args!("  {}", built.manifest_path.display()));
    match (&built.signature, &built.key_id) {
        (Some(sig), Some(id)) => ui.say(format_args!("  {} (key {id})", sig.display())),
        _ => eprintln!(
            "infrakit: WARNING: {} is UNSIGNED: hosts will refuse it; pass --sign-key or set INFRAKIT_SIGN_KEY",
            built.artifact.display()
        ),
    }
    Ok(())
}

pub fn verify(
    ui: &Ui,
    artifact: &Path,
    key_paths: &[PathBuf],
    manifest: Option<&Path>,
    signature: Option<&Path>,
    json: bool,
) -> Result<()> {
    let keys = key_paths
        .iter()
        .map(|p| PublicKey::load(p))
        .collect::<Result<Vec<_>>>()?;
    let opts = VerifyOptions {
        artifact,
        manifest,
        signature,
        keys: &keys,
    };
    let verified = ui.with_bar("verifying", |progress| verify::verify(&opts, progress))?;
    let m = verified.manifest();
    if json {
        let value = serde_json::json!({
            "verified": true,
            "artifact": verified.artifact().display().to_string(),
            "name": m.name,
            "version": m.version,
            "key_id": verified.key_id(),
            "entries": m.entries.len(),
            "sha256": m.archive.sha256,
        });
        println!("{value}");
    } else {
        ui.say(format_args!(
            "verified {} {}: signed by key {}, {} entries match the manifest",
            m.name,
            m.version,
            verified.key_id(),
            m.entries.len()
        ));
    }
    Ok(())
}

pub fn inspect(path: &Path, json: bool) -> Result<()> {
    let manifest_path = if path.to_string_lossy().ends_with(".json") {
        path.to_path_buf()
    } else {
        verify::manifest_beside(path)
    };
    let bytes =
        std::fs::read(&manifest_path).map_err(Error::io(&manifest_path, "reading manifest"))?;
    let m = Manifest::parse(&bytes).map_err(|e| Error::input(&manifest_path, e))?;
    let mut out = std::io::stdout().lock();
    let res = if json {
        out.write_all(&m.to_canonical_json())
    } else {
        write_human(&mut out, &m)
    };
    match res {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::io(Path::new("<stdout>"), "writing")),
    }
}

fn write_human(out: &mut impl Write, m: &Manifest) -> std::io::Result<()> {
    writeln!(out, "name:        {}", m.name)?;
    writeln!(out, "version:     {}", m.version)?;
    writeln!(out, "source date: {}", m.source_date_epoch)?;
    writeln!(out, "profile:     sha256 {}", m.profile_sha256)?;
    writeln!(
        out,
        "artifact:    {} {} bytes sha256 {}",
        m.archive.format, m.archive.size, m.archive.sha256
    )?;
    writeln!(
        out,
        "tar stream:  {} bytes sha256 {}",
        m.archive.tar_size, m.archive.tar_sha256
    )?;
    let layers: Vec<String> = m
        .layers
        .iter()
        .map(|l| format!("{} ({} entries)", l.name, l.entries))
        .collect();
    writeln!(out, "layers:      {}", layers.join(", "))?;
    writeln!(out, "signature:   not checked here; run `infrakit verify`")?;
    writeln!(out, "entries:     {}", m.entries.len())?;
    for e in &m.entries {
        let (kind, suffix) = match e.kind {
            EntryType::Dir => ("d", "/".to_owned()),
            EntryType::File => ("-", String::new()),
            EntryType::Symlink => (
                "l",
                format!(" -> {}", e.target.as_deref().unwrap_or_default()),
            ),
        };
        let size = e.size.map(|s| s.to_string()).unwrap_or_default();
        writeln!(
            out,
            "  {kind} {:04o} {:>5}:{:<5} {size:>10}  {}{suffix}  [{}]",
            e.mode, e.uid, e.gid, e.path, e.layer
        )?;
    }
    Ok(())
}

pub fn lint(ui: &Ui, profile: &Path, json: bool) -> Result<()> {
    let composed = emit::compose_profile(profile)?;
    let findings = composed.lint()?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&findings).expect("findings serialise")
        );
    } else {
        for f in &findings {
            println!("{f}");
        }
    }
    if findings.is_empty() {
        if !json {
            ui.say(format_args!(
                "lint: {} is clean ({} entries)",
                profile.display(),
                composed.tree.len()
            ));
        }
        Ok(())
    } else {
        Err(Error::Lint(format!(
            "{} finding(s) in {}",
            findings.len(),
            profile.display()
        )))
    }
}

/// The trusted keys: every `*.pub` in `dir`, in name order.
fn load_keyring(dir: &Path) -> Result<Vec<PublicKey>> {
    let refuse = |why: &str| {
        Error::Refused(format!(
            "{}: {why}; install the release public key there as <name>.pub",
            dir.display()
        ))
    };
    let list = match std::fs::read_dir(dir) {
        Ok(list) => list,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse("no keyring"));
        }
        Err(e) => return Err(Error::io(dir, "reading keyring")(e)),
    };
    let mut paths = list
        .map(|i| i.map(|i| i.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::io(dir, "reading keyring"))?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "pub"));
    paths.sort();
    if paths.is_empty() {
        return Err(refuse("no trusted keys (*.pub)"));
    }
    paths.iter().map(|p| PublicKey::load(p)).collect()
}

fn print_hooks(ui: &Ui, hooks: &crate::hooks::Hooks, ran: bool, root: &Path) {
    let commands: Vec<_> = hooks.before().into_iter().chain(hooks.after()).collect();
    if commands.is_empty() {
        return;
    }
    if ran {
        ui.say("hooks run:");
    } else {
        ui.say(format_args!(
            "hooks (not run: {} is not the live system; run them when it is):",
            root.display()
        ));
    }
    for c in commands {
        ui.say(format_args!("  {}", c.join(" ")));
    }
}

fn print_plan(plan: &crate::apply::Plan) {
    let mut out = std::io::stdout().lock();
    let _ = crate::apply::describe(plan, &mut out);
}

/// The time now, for the records of an activation.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn apply(
    ui: &Ui,
    artifact: &Path,
    root: &Path,
    keyring: &Path,
    opts: &crate::apply::ApplyOptions,
) -> Result<()> {
    let keys = load_keyring(keyring)?;
    // A URL is downloaded first (outside the root), then treated as a file.
    let fetched = match artifact.to_str().filter(|a| crate::fetch::is_url(a)) {
        Some(url) => Some(crate::fetch::fetch(url)?),
        None => None,
    };
    let artifact = fetched.as_ref().map_or(artifact, |f| f.artifact.as_path());
    let manifest = verify::manifest_beside(artifact);
    if artifact.exists() && manifest.symlink_metadata().is_err() {
        return Err(Error::Refused(format!(
            "{}: no manifest beside the artifact (was it renamed? apply it under its signed name)",
            manifest.display()
        )));
    }
    let verify_opts = VerifyOptions {
        artifact,
        manifest: None,
        signature: None,
        keys: &keys,
    };
    let verified = ui.with_bar("verifying", |progress| {
        verify::authenticate(&verify_opts, progress)
    })?;
    let mut state = crate::state::State::open(root)?;
    let opts = crate::apply::ApplyOptions {
        now: now(),
        ..*opts
    };
    let outcome = crate::apply::apply(&mut state, &verified, &opts)?;
    report(
        ui,
        &outcome,
        root,
        &format!("signed by key {}", verified.key_id()),
    );
    Ok(())
}

pub fn rollback(ui: &Ui, root: &Path, dry_run: bool) -> Result<()> {
    let state = crate::state::State::open(root)?;
    let outcome = crate::apply::rollback(&state, dry_run, now())?;
    report(ui, &outcome, root, "rollback");
    Ok(())
}

/// What an apply or rollback did (or would do), with how it was vouched for.
/// A dry run's plan is printed even with `--quiet`: it is the answer.
fn report(ui: &Ui, outcome: &crate::apply::Outcome, root: &Path, how: &str) {
    use crate::apply::Outcome;
    use crate::state::Action;
    match outcome {
        Outcome::AlreadyActive { id } => {
            ui.say(format_args!(
                "{id} is already active on {} and the root matches it: nothing to do",
                root.display()
            ));
        }
        Outcome::Activated {
            action,
            id,
            from,
            plan,
            dry_run,
            hooks_run,
            recovered,
        } => {
            let say = |line: std::fmt::Arguments<'_>| {
                if *dry_run {
                    println!("{line}");
                } else {
                    ui.say(line);
                }
            };
            if let Some(r) = recovered {
                say(format_args!("{r}"));
            }
            let verb = match (action, dry_run) {
                (Action::Repair, true) => "would repair",
                (Action::Repair, false) => "repaired",
                (_, true) => "would activate",
                (_, false) => "activated",
            };
            say(format_args!(
                "{}{verb} {id} on {} (was {}; {how}): {} added, {} changed, {} removed, {} repaired",
                if *dry_run { "dry run: " } else { "" },
                root.display(),
                from.as_ref().map_or("nothing", |f| f.as_str()),
                plan.added.len(),
                plan.changed.len(),
                plan.removed.len(),
                plan.repairs.len()
            ));
            if *dry_run || !ui.quiet {
                print_plan(plan);
            }
            print_hooks(ui, &plan.hooks, *hooks_run, root);
        }
    }
}

pub fn status(root: &Path, json: bool, textfile: Option<&Path>) -> Result<()> {
    let report = crate::status::status(root);
    if let Some(path) = textfile {
        crate::status::write_textfile(path, &report)?;
    }
    let ui = Ui { quiet: false };
    if json {
        ui.say(serde_json::to_string(&report).expect("the report serialises"));
    } else {
        match &report.release {
            Some(r) => ui.say(format_args!(
                "active: {} {} (sha256 {}, key {}), release {}",
                r.name, r.version, r.sha256, r.key_id, r.id
            )),
            None => ui.say(format_args!("active: no release on {}", root.display())),
        }
        ui.say("retained:");
        for r in &report.retained {
            ui.say(format_args!(
                "  {}{}  applied {}",
                r.id,
                if r.active { " (active)" } else { "" },
                r.applied_at
                    .map_or_else(|| "at an unrecorded time".to_owned(), crate::status::utc)
            ));
        }
        if let Some(i) = &report.interrupted {
            ui.say(format_args!("interrupted: {i}"));
        }
        if report.errors.is_empty() {
            ui.say(format_args!("drift: {} path(s)", report.drift.len()));
        } else {
            ui.say(format_args!(
                "drift: {} path(s) found, but the check is incomplete (see below)",
                report.drift.len()
            ));
        }
        for d in &report.drift {
            ui.say(format_args!("  {:<10} {}: {}", d.kind, d.path, d.detail));
        }
        ui.say("secret slots: none declared");
        for e in &report.errors {
            ui.say(format_args!("could not check: {e}"));
        }
    }
    if report.failed() {
        return Err(Error::Unhealthy(format!(
            "{}: {} drifted path(s), {} missing secret(s){}{}",
            root.display(),
            report.drift.len(),
            report.missing_secrets.len(),
            if report.interrupted.is_some() {
                ", an interrupted activation"
            } else {
                ""
            },
            if report.errors.is_empty() {
                String::new()
            } else {
                format!("; {} thing(s) could not be checked", report.errors.len())
            }
        )));
    }
    if !report.errors.is_empty() {
        return Err(Error::Unchecked(format!(
            "{}: {} thing(s) could not be checked, first: {}",
            root.display(),
            report.errors.len(),
            report.errors[0]
        )));
    }
    Ok(())
}
