//! One function per subcommand: turn validated arguments into library calls
//! and print what happened. This layer owns the terminal: progress bars and
//! warnings on stderr, summaries, reports and JSON on stdout.
//!
//! Output rules, the same for every command:
//! - `-q` hides progress bars and the lines that only confirm success; it
//!   never hides what a command is run to show (a dry-run plan, `status`'s
//!   report, `inspect`, `diff`, lint findings, `--json`), nor warnings and
//!   errors;
//! - with `--json`, stdout is exactly one JSON document, the envelope of
//!   docs/json.md, on success and on failure alike (`finish`);
//! - every error and warning on stderr starts `infrakit: error: ` or
//!   `infrakit: warning: `, and names the user's paths or URLs, never a
//!   temporary file.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::artifact::archive::{Format, Member};
use crate::artifact::emit::{self, BuildOptions};
use crate::artifact::manifest::{EntryType, Manifest, ManifestEntry};
use crate::error::{Error, Result};
use crate::inputs::fetch::{self, Fetched};
use crate::trust::digest::{HashingReader, Sha256};
use crate::trust::keyring::{Keyring, Trusted};
use crate::trust::sign::{self, SecretKey};
use crate::trust::verify::{self, VerifyOptions};

/// The version of the `--json` envelope and of every payload in it.
pub const JSON_SCHEMA: u32 = 1;

/// How to talk to the user.
pub struct Ui {
    pub quiet: bool,
    /// With `--json`: the payload's fields, printed by `finish`.
    json: Option<RefCell<Map<String, Value>>>,
}

impl Ui {
    pub fn new(quiet: bool, json: bool) -> Ui {
        Ui {
            quiet,
            json: json.then(|| RefCell::new(Map::new())),
        }
    }

    pub fn json(&self) -> bool {
        self.json.is_some()
    }

    /// Sets a payload field (with `--json`; otherwise nothing).
    fn put(&self, key: &str, value: impl Serialize) {
        if let Some(fields) = &self.json {
            let value = serde_json::to_value(value).expect("payloads serialise");
            fields.borrow_mut().insert(key.to_owned(), value);
        }
    }

    /// Sets every field of `object` as a payload field.
    fn put_all(&self, object: impl Serialize) {
        if let Some(fields) = &self.json
            && let Ok(Value::Object(map)) = serde_json::to_value(object)
        {
            fields.borrow_mut().extend(map);
        }
    }

    /// Runs `work` with a byte progress bar on stderr (hidden when quiet or
    /// not a terminal), which `work` feeds with `(done, total)`; the bar is
    /// cleared when it returns.
    fn with_bar<T>(&self, what: &str, work: impl FnOnce(&dyn Fn(u64, u64)) -> T) -> T {
        let bar = self.bar(what);
        let out = work(&|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        out
    }

    /// A bar of bytes (hidden when quiet or not a terminal).
    fn bar(&self, what: &str) -> ProgressBar {
        if self.quiet {
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
        }
    }

    /// A bar for a run of steps, each a message with or without a measure
    /// (hidden when quiet or not a terminal).
    fn step_bar(quiet: bool) -> ProgressBar {
        if quiet {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template("{spinner} {msg} {bytes}/{total_bytes} {elapsed}")
            .expect("the template is valid");
        let bar = ProgressBar::new(0).with_style(style);
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    }

    /// A line on stdout that only confirms success: hidden by `-q` and
    /// `--json`. A closed pipe (`| head`) is not an error.
    fn say(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            self.show(line);
        }
    }

    /// A line of what the command was run to show: hidden only by
    /// `--json`, whose document carries the same facts.
    fn show(&self, line: impl std::fmt::Display) {
        if !self.json() {
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }

    /// A warning on stderr, whatever `-q` says.
    fn warn(&self, line: impl std::fmt::Display) {
        eprintln!("infrakit: warning: {line}");
    }
}

/// Ends a command: prints the `--json` envelope (with the error, if any)
/// on stdout and the error on stderr; returns the exit code.
pub fn finish(ui: &Ui, command: &str, result: Result<()>) -> u8 {
    let error = result
        .err()
        .map(|e| (e.kind(), e.to_string(), e.exit_code()));
    if let Some(fields) = &ui.json {
        print_envelope(command, fields.take(), error.as_ref());
    }
    match error {
        None => 0,
        Some((_, message, code)) => {
            eprintln!("infrakit: error: {message}");
            code
        }
    }
}

/// A command line that could not be parsed: the same error line (and, if
/// `--json` was asked for, the same envelope) as any other failure.
pub fn usage_failure(command: Option<&str>, json: bool, message: &str, code: u8) {
    if json {
        let error = ("usage", message.to_owned(), code);
        print_envelope(command.unwrap_or_default(), Map::new(), Some(&error));
    }
    eprintln!("infrakit: error: {message}");
}

fn print_envelope(command: &str, fields: Map<String, Value>, error: Option<&(&str, String, u8)>) {
    let mut doc = fields;
    doc.insert("schema".to_owned(), json!(JSON_SCHEMA));
    doc.insert("command".to_owned(), json!(command));
    doc.insert("ok".to_owned(), json!(error.is_none()));
    if let Some((kind, message, code)) = error {
        doc.insert(
            "error".to_owned(),
            json!({"exit_code": code, "kind": kind, "message": message}),
        );
    }
    let _ = writeln!(std::io::stdout(), "{}", Value::Object(doc));
}

/// A command's artifact or manifest argument: a local path, or a URL
/// downloaded first. Errors about it name what the user gave.
struct Operand {
    fetched: Option<Fetched>,
    path: PathBuf,
    shown: String,
}

impl Operand {
    fn open(arg: &Path) -> Result<Operand> {
        match arg.to_str().filter(|a| fetch::is_url(a)) {
            Some(url) => {
                let fetched = fetch::fetch(url)?;
                Ok(Operand {
                    path: fetched.path.clone(),
                    fetched: Some(fetched),
                    shown: url.to_owned(),
                })
            }
            None => Ok(Operand {
                fetched: None,
                path: arg.to_path_buf(),
                shown: arg.display().to_string(),
            }),
        }
    }

    /// `e`, naming URLs instead of the temporary copies.
    fn own(&self, e: Error) -> Error {
        match &self.fetched {
            Some(f) => f.own(e),
            None => e,
        }
    }

    fn is_manifest(&self) -> bool {
        self.path.to_string_lossy().ends_with(".json")
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
    /// The input cache (`None` when no cache directory can be named).
    pub cache: Option<PathBuf>,
    /// `--input NAME=PATH`.
    pub inputs: Vec<(String, PathBuf)>,
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
        inputs: emit::InputSources {
            cache: args.cache.as_deref(),
            overrides: &args.inputs,
        },
    };
    let built = ui.with_bar("building", |progress| emit::build(&opts, progress))?;
    let m = &built.manifest;
    ui.say(format_args!(
        "built {} {}: {} entries, {} bytes, sha256 {}",
        m.name, m.version, built.entries, m.archive.size, m.archive.sha256
    ));
    ui.say(format_args!("  {}", built.artifact.display()));
    ui.say(format_args!("  {}", built.manifest_path.display()));
    match (&built.signature, &built.key_id) {
        (Some(sig), Some(id)) => ui.say(format_args!("  {} (key {id})", sig.display())),
        _ => ui.warn(format_args!(
            "{} is UNSIGNED: hosts will refuse it; pass --sign-key or set INFRAKIT_SIGN_KEY",
            built.artifact.display()
        )),
    }
    Ok(())
}

/// `image` arguments after the environment has been consulted.
pub struct ImageArgs {
    /// The release build (its profile, output directory, key and inputs).
    pub build: BuildArgs,
    /// `--trust`: more keys the host trusts.
    pub trust: Vec<PathBuf>,
    /// `--artifact`: a signed release instead of building one.
    pub artifact: Option<PathBuf>,
    pub infrakit_binary: PathBuf,
    pub forms: crate::image::build::Forms,
}

/// Builds the release (unless `--artifact` gives one), then the image.
pub fn image(ui: &Ui, args: &ImageArgs) -> Result<()> {
    let b = &args.build;
    ui.put("profile", b.profile.display().to_string());
    let Some(key_path) = b.sign_key.as_deref() else {
        return Err(Error::usage(
            "--sign-key",
            "an image must be signed: pass --sign-key or set INFRAKIT_SIGN_KEY",
        ));
    };
    let Some(cache) = b.cache.as_deref() else {
        return Err(Error::usage(
            "XDG_CACHE_HOME",
            "no cache directory: set XDG_CACHE_HOME (the packages come from `infrakit fetch`'s cache)",
        ));
    };
    // Before the release is built: a profile without [image] or an
    // out-of-date lock fails at once.
    let prepared = crate::image::build::preflight(&b.profile)?;
    let key = SecretKey::load(key_path, b.password_file.as_deref())?;
    let trust = if args.trust.is_empty() {
        Vec::new()
    } else {
        Keyring::load(&Trusted::Files(args.trust.clone()))?
            .keys()
            .to_vec()
    };
    let artifact = match &args.artifact {
        Some(a) => a.clone(),
        None => {
            let opts = BuildOptions {
                profile: &b.profile,
                out_dir: &b.out,
                format: b.format,
                level: b.level,
                version: b.release_version.as_deref(),
                source_date_epoch: b.source_date_epoch,
                sign_key: Some(&key),
                workers: b.workers,
                inputs: emit::InputSources {
                    cache: Some(cache),
                    overrides: &b.inputs,
                },
            };
            let built = ui.with_bar("release", |progress| emit::build(&opts, progress))?;
            ui.say(format_args!("  {}", built.artifact.display()));
            built.artifact
        }
    };
    let bar = Ui::step_bar(ui.quiet);
    let progress = |what: &str, done: u64, total: u64| {
        bar.set_message(what.to_owned());
        bar.set_length(total);
        bar.set_position(done);
        bar.tick();
    };
    let built = crate::image::build::build(
        &crate::image::build::ImageOptions {
            profile: &b.profile,
            prepared: &prepared,
            out_dir: &b.out,
            artifact: &artifact,
            sign_key: &key,
            trust: &trust,
            infrakit_binary: &args.infrakit_binary,
            cache,
            forms: args.forms,
            source_date_epoch: b.source_date_epoch,
        },
        &progress,
    );
    bar.finish_and_clear();
    let built = built?;
    let m = &built.manifest;
    ui.put("name", &m.name);
    ui.put("version", &m.version);
    ui.put("key_id", &built.key_id);
    ui.put("sha256", m.disk.sha256);
    ui.put("packages", m.packages.len());
    ui.put(
        "files",
        built
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>(),
    );
    ui.say(format_args!(
        "built image {} {} ({} {}, {} packages): {} bytes, sha256 {}",
        m.name,
        m.version,
        m.suite,
        m.arch,
        m.packages.len(),
        m.disk.size,
        m.disk.sha256
    ));
    for f in &built.files {
        ui.say(format_args!("  {}", f.display()));
    }
    Ok(())
}

pub fn verify(
    ui: &Ui,
    artifact: &Path,
    trusted: &Trusted,
    manifest: Option<&Path>,
    signature: Option<&Path>,
) -> Result<()> {
    ui.put("artifact", artifact.display().to_string());
    let keyring = Keyring::load(trusted)?;
    if crate::image::verify::is_image(artifact) {
        return verify_image(ui, artifact, &keyring, manifest.or(signature));
    }
    let op = Operand::open(artifact)?;
    let opts = VerifyOptions {
        artifact: &op.path,
        manifest,
        signature,
        keys: keyring.keys(),
    };
    let checked = ui
        .with_bar("verifying", |progress| {
            verify::verify_streamed(&opts, progress)
        })
        .map_err(|e| op.own(e))?;
    let m = &checked.manifest;
    ui.put("name", &m.name);
    ui.put("version", &m.version);
    ui.put("key_id", &checked.key_id);
    ui.put("entries", checked.entries);
    ui.put("sha256", m.archive.sha256);
    ui.say(format_args!(
        "verified {} {}: signed by key {}, {} entries match the manifest",
        m.name, m.version, checked.key_id, checked.entries
    ));
    Ok(())
}

/// `verify` of a disk image: signature, the manifest it binds, the digest.
fn verify_image(ui: &Ui, path: &Path, keyring: &Keyring, option: Option<&Path>) -> Result<()> {
    if option.is_some() {
        return Err(Error::usage(
            "--manifest/--signature",
            "a disk image is verified with NAME.image.json and NAME.img.minisig beside it",
        ));
    }
    let verified = ui.with_bar("verifying", |progress| {
        crate::image::verify::verify(path, keyring.keys(), progress)
    })?;
    let m = &verified.manifest;
    ui.put("name", &m.name);
    ui.put("version", &m.version);
    ui.put("key_id", &verified.key_id);
    ui.put("kind", &m.kind);
    ui.put("sha256", m.disk.sha256);
    ui.say(format_args!(
        "verified image {} {}: signed by key {}, {} packages, release sha256 {}",
        m.name,
        m.version,
        verified.key_id,
        m.packages.len(),
        m.artifact.sha256
    ));
    Ok(())
}

/// Reads a manifest the user named (a file or a downloaded copy): a
/// missing file is an I/O error, a malformed one bad input.
fn read_manifest_operand(path: &Path) -> Result<Manifest> {
    let file = File::open(path).map_err(Error::io(path, "reading manifest"))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, verify::MANIFEST_MAX + 1),
        &mut bytes,
    )
    .map_err(Error::io(path, "reading manifest"))?;
    if bytes.len() as u64 > verify::MANIFEST_MAX {
        return Err(Error::input(
            path,
            format!("is larger than {} bytes", verify::MANIFEST_MAX),
        ));
    }
    Manifest::parse(&bytes).map_err(|e| Error::input(path, e))
}

/// SHA-256 and size of the file at `path`.
fn file_digest(path: &Path) -> Result<(Sha256, u64)> {
    let file = File::open(path).map_err(Error::io(path, "opening artifact"))?;
    let mut reader = HashingReader::new(file);
    std::io::copy(&mut reader, &mut std::io::sink())
        .map_err(Error::io(path, "reading artifact"))?;
    Ok(reader.finish())
}

fn refuse_keys_for_manifest(op: &Operand) -> Error {
    Error::usage(
        &op.shown,
        "a manifest alone carries no signature: give the artifact to check it with --key or --keyring",
    )
}

/// An archive member as `inspect` lists it: what the archive holds, with
/// the layer the manifest gives its path and whether the manifest's entry
/// agrees with it.
#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    member: Member,
    layer: Option<String>,
    matches_manifest: bool,
}

fn member_of(e: &ManifestEntry) -> Member {
    Member {
        path: e.path.to_string(),
        kind: match e.kind {
            EntryType::Dir => "dir",
            EntryType::File => "file",
            EntryType::Symlink => "symlink",
        },
        mode: e.mode,
        uid: u64::from(e.uid),
        gid: u64::from(e.gid),
        size: e.size,
        sha256: e.sha256,
        target: e.target.clone(),
    }
}

pub fn inspect(ui: &Ui, path: &Path, trusted: Option<&Trusted>) -> Result<()> {
    ui.put("path", path.display().to_string());
    let keyring = trusted.map(Keyring::load).transpose()?;
    let op = Operand::open(path)?;
    inspect_operand(ui, &op, keyring.as_ref()).map_err(|e| op.own(e))
}

fn inspect_operand(ui: &Ui, op: &Operand, keyring: Option<&Keyring>) -> Result<()> {
    let not_checked = json!({"checked": false, "key_id": null});
    if op.is_manifest() {
        if keyring.is_some() {
            return Err(refuse_keys_for_manifest(op));
        }
        let m = read_manifest_operand(&op.path)?;
        ui.put("source", "manifest");
        ui.put("manifest", &m);
        ui.put("artifact", Value::Null);
        ui.put("signature", not_checked);
        ui.put("members", Value::Null);
        ui.put("missing_from_archive", Value::Null);
        let members: Vec<Listed> = m
            .entries
            .iter()
            .map(|e| Listed {
                member: member_of(e),
                layer: Some(e.layer.to_string()),
                matches_manifest: true,
            })
            .collect();
        return print_inspect(
            ui,
            Some(&m),
            None,
            "not checked here: a manifest carries none; inspect the artifact with --key or --keyring",
            &members,
            &[],
        );
    }
    ui.put("source", "artifact");
    let (manifest, digest, signature, members) = match keyring {
        Some(keyring) => {
            let opts = VerifyOptions {
                artifact: &op.path,
                manifest: None,
                signature: None,
                keys: keyring.keys(),
            };
            let verified = ui.with_bar("verifying", |progress| verify::verify(&opts, progress))?;
            let m = verified.manifest().clone();
            let digest = (m.archive.sha256, m.archive.size);
            ui.put(
                "signature",
                json!({"checked": true, "key_id": verified.key_id()}),
            );
            let members = m.entries.iter().map(member_of).collect();
            let line = format!(
                "verified: signed by key {}, every entry matches the manifest",
                verified.key_id()
            );
            (Some(m), digest, line, members)
        }
        None => {
            let beside = verify::manifest_beside(&op.path);
            let manifest = match beside.symlink_metadata() {
                Ok(_) => Some(read_manifest_operand(&beside)?),
                Err(_) => None,
            };
            let digest = file_digest(&op.path)?;
            let file = File::open(&op.path).map_err(Error::io(&op.path, "opening artifact"))?;
            let members = crate::artifact::archive::members(file, &op.path)?;
            ui.put("signature", not_checked);
            let line = "not checked here: give --key or --keyring to verify it".to_owned();
            (manifest, digest, line, members)
        }
    };
    let entries: std::collections::HashMap<String, &ManifestEntry> = manifest
        .iter()
        .flat_map(|m| &m.entries)
        .map(|e| (e.path.to_string(), e))
        .collect();
    let listed: Vec<Listed> = members
        .into_iter()
        .map(|member| {
            let entry = entries.get(&member.path);
            Listed {
                layer: entry.map(|e| e.layer.to_string()),
                matches_manifest: entry.is_some_and(|e| member_of(e) == member),
                member,
            }
        })
        .collect();
    let in_archive: std::collections::HashSet<&str> =
        listed.iter().map(|l| l.member.path.as_str()).collect();
    let missing: Vec<String> = manifest
        .iter()
        .flat_map(|m| &m.entries)
        .map(|e| e.path.to_string())
        .filter(|p| !in_archive.contains(p.as_str()))
        .collect();
    let matches = manifest
        .as_ref()
        .map(|m| (m.archive.sha256, m.archive.size) == digest);
    ui.put("manifest", &manifest);
    ui.put(
        "artifact",
        json!({"sha256": digest.0, "size": digest.1, "matches_manifest": matches}),
    );
    ui.put("members", &listed);
    ui.put("missing_from_archive", &missing);
    let file_line = format!(
        "{}: {} bytes sha256 {}{}",
        op.shown,
        digest.1,
        digest.0,
        match matches {
            Some(true) => ", as the manifest says",
            Some(false) => ": the manifest says otherwise, so they do not belong together",
            None => "",
        }
    );
    print_inspect(
        ui,
        manifest.as_ref(),
        Some(&file_line),
        &signature,
        &listed,
        &missing,
    )
}

fn print_inspect(
    ui: &Ui,
    m: Option<&Manifest>,
    file_line: Option<&str>,
    signature: &str,
    members: &[Listed],
    missing: &[String],
) -> Result<()> {
    if ui.json() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let res = write_human(&mut out, m, file_line, signature, members, missing);
    match res {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::io(Path::new("<stdout>"), "writing")),
    }
}

fn write_human(
    out: &mut impl Write,
    m: Option<&Manifest>,
    file_line: Option<&str>,
    signature: &str,
    members: &[Listed],
    missing: &[String],
) -> std::io::Result<()> {
    match m {
        Some(m) => {
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
        }
        None => writeln!(
            out,
            "manifest:    none beside the artifact: name, version, layers and digests unknown"
        )?,
    }
    if let Some(line) = file_line {
        writeln!(out, "file:        {line}")?;
    }
    writeln!(out, "signature:   {signature}")?;
    writeln!(out, "entries:     {}", members.len())?;
    for l in members {
        let e = &l.member;
        let (kind, suffix) = match e.kind {
            "dir" => ("d", "/".to_owned()),
            "file" => ("-", String::new()),
            "symlink" => (
                "l",
                format!(" -> {}", e.target.as_deref().unwrap_or_default()),
            ),
            "hardlink" => (
                "h",
                format!(" => {}", e.target.as_deref().unwrap_or_default()),
            ),
            "char" => ("c", String::new()),
            "block" => ("b", String::new()),
            "fifo" => ("p", String::new()),
            _ => ("?", String::new()),
        };
        let size = e.size.map(|s| s.to_string()).unwrap_or_default();
        let layer = match (&l.layer, l.matches_manifest) {
            (Some(layer), true) => layer.clone(),
            (Some(layer), false) => format!("{layer}; DIFFERS from the manifest"),
            (None, _) if m.is_some() => "NOT in the manifest".to_owned(),
            (None, _) => "no manifest".to_owned(),
        };
        writeln!(
            out,
            "  {kind} {:04o} {:>5}:{:<5} {size:>10}  {}{suffix}  [{layer}]",
            e.mode, e.uid, e.gid, e.path
        )?;
    }
    for p in missing {
        writeln!(
            out,
            "missing:     {p} (in the manifest, not in the archive)"
        )?;
    }
    Ok(())
}

pub fn lint(ui: &Ui, profile: &Path, cache: Option<&Path>) -> Result<()> {
    ui.put("profile", profile.display().to_string());
    let sources = emit::InputSources {
        cache,
        overrides: &[],
    };
    let composed = emit::compose_profile(profile, &sources)?;
    let findings = composed.lint()?;
    ui.put("entries", composed.tree.len());
    ui.put("findings", &findings);
    for f in &findings {
        ui.show(f);
    }
    if findings.is_empty() {
        ui.say(format_args!(
            "lint: {} is clean ({} entries)",
            profile.display(),
            composed.tree.len()
        ));
        Ok(())
    } else {
        Err(Error::Lint(format!(
            "{} finding(s) in {}",
            findings.len(),
            profile.display()
        )))
    }
}

fn print_hooks(ui: &Ui, hooks: &crate::host::hooks::Hooks, ran: bool, root: &Path, plan: bool) {
    let line = |l: String| if plan { ui.show(l) } else { ui.say(l) };
    let commands: Vec<_> = hooks.before().into_iter().chain(hooks.after()).collect();
    if commands.is_empty() {
        return;
    }
    if ran {
        line("hooks run:".to_owned());
    } else {
        line(format!(
            "hooks (not run: {} is not the live system; run them when it is):",
            root.display()
        ));
    }
    for c in commands {
        line(format!("  {}", c.join(" ")));
    }
}

/// A plan as `--json` shows it.
/// Its lists are read back from where the plan keeps them: one that cannot
/// be is the error.
fn plan_json(plan: &crate::host::apply::Plan) -> Result<Value> {
    let strings = |items: &mut dyn Iterator<Item = Result<String>>| {
        items
            .map(|s| s.map(Value::String))
            .collect::<Result<Value>>()
    };
    let list = |l: &crate::spool::List<crate::model::RelPath>| {
        strings(&mut l.iter().map(|p| p.map(|p| p.to_string())))
    };
    let new_dirs = strings(&mut plan.new_dirs.iter().map(|e| e.map(|e| e.path.to_string())))?;
    Ok(json!({
        "added": list(&plan.added)?,
        "changed": list(&plan.changed)?,
        "removed": list(&plan.removed)?,
        "adopt": plan.adopt,
        "identical": plan.identical,
        "repairs": plan.repairs,
        "stage": plan.stage,
        "new_dirs": new_dirs,
        "hooks": {"before": plan.hooks.before(), "after": plan.hooks.after()},
    }))
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
    trusted: &Trusted,
    manifest_sha256: Option<&str>,
    opts: &crate::host::apply::ApplyOptions,
) -> Result<()> {
    ui.put("artifact", artifact.display().to_string());
    ui.put("root", root.display().to_string());
    let keyring = Keyring::load(trusted)?;
    // A URL is downloaded first (outside the root), then treated as a file.
    let op = Operand::open(artifact)?;
    let verify_opts = VerifyOptions {
        artifact: &op.path,
        manifest: None,
        signature: None,
        keys: keyring.keys(),
    };
    let (outcome, key_id) = (|| {
        let admitted = verify::admit(&verify_opts)?;
        let verified = admitted.unconfirmed();
        if let Some(pinned) = manifest_sha256 {
            let signed = verified.manifest_sha256().to_string();
            if signed != pinned {
                return Err(Error::Refused(format!(
                    "{} {} is validly signed, but its manifest has sha256 {signed}, not {pinned} \
                     (--manifest-sha256): another release than the one pinned",
                    verified.manifest().name,
                    verified.manifest().version
                )));
            }
        }
        let mut state = crate::host::state::State::open(root)?;
        let opts = crate::host::apply::ApplyOptions {
            now: now(),
            ..*opts
        };
        // The file's signature is checked on a thread of its own while the
        // release is staged into its private directory: `apply` asks for the
        // verdict before the staged release is kept, or before anything is
        // written when there is nothing to stage. Its verdict is the error
        // reported, whatever else failed; and no outcome is reported before it.
        let bar = ui.bar("verifying");
        let (applied, signed) = std::thread::scope(|scope| {
            let check = scope.spawn(|| {
                admitted.check_file(&|done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
            });
            let mut verdict = Verdict::Pending(check);
            let applied =
                crate::host::apply::apply(&mut state, verified, &opts, &mut || verdict.wait());
            (applied, verdict.end())
        });
        bar.finish_and_clear();
        signed?;
        let outcome = applied?;
        if !opts.dry_run {
            // A release is active: a failed first boot is superseded.
            state.clear_first_boot_failure()?;
        }
        Ok((outcome, verified.key_id().to_owned()))
    })()
    .map_err(|e| op.own(e))?;
    ui.put("key_id", &key_id);
    report(ui, &outcome, root, &format!("signed by key {key_id}"));
    Ok(())
}

/// The file-signature check running beside `apply`: joined once, its
/// verdict kept, so the error it raised is the one reported at the end.
enum Verdict<'scope> {
    Pending(std::thread::ScopedJoinHandle<'scope, Result<verify::Signed>>),
    Done(Result<()>),
}

impl Verdict<'_> {
    fn settle(&mut self) {
        if matches!(self, Verdict::Pending(_))
            && let Verdict::Pending(check) = std::mem::replace(self, Verdict::Done(Ok(())))
        {
            let signed = check
                .join()
                .unwrap_or_else(|_| Err(Error::check("the signature thread panicked")));
            *self = Verdict::Done(signed.map(drop));
        }
    }

    /// For `apply`: whether the file's signature matched (the error itself
    /// is kept for `end`).
    fn wait(&mut self) -> Result<()> {
        self.settle();
        match self {
            Verdict::Done(Ok(())) => Ok(()),
            _ => Err(Error::check("the artifact's signature does not match")),
        }
    }

    /// The verdict, with the error as the check raised it.
    fn end(mut self) -> Result<()> {
        self.settle();
        match self {
            Verdict::Done(verdict) => verdict,
            Verdict::Pending(_) => Err(Error::check("the signature check did not finish")),
        }
    }
}

/// Verifies `artifact` against the keys to pin, then writes its bundles.
pub fn bundle(
    ui: &Ui,
    artifact: &Path,
    key_files: &[PathBuf],
    opts: &crate::bundle::Options<'_>,
) -> Result<()> {
    ui.put("artifact", artifact.display().to_string());
    ui.put("provider", opts.provider.name());
    let keyring = Keyring::load(&Trusted::Files(key_files.to_vec()))?;
    let verify_opts = VerifyOptions {
        artifact,
        manifest: None,
        signature: None,
        keys: keyring.keys(),
    };
    let verified = ui
        .with_bar("verifying", |progress| {
            verify::verify(&verify_opts, progress)
        })
        .map_err(|e| match e {
            Error::Check(m) => Error::Check(format!(
                "{m}; hosts pinning these keys would refuse it, so no bundle was made"
            )),
            e => e,
        })?;
    let written = crate::bundle::make(
        &crate::bundle::Options {
            keys: keyring.keys(),
            ..*opts
        },
        &verified,
    )?;
    ui.put(
        "release",
        format!(
            "{} {}",
            verified.manifest().name,
            verified.manifest().version
        ),
    );
    ui.put("bundles", &written);
    for w in &written {
        let budget = w.limit.map_or_else(String::new, |l| format!(" of {l}"));
        ui.say(format_args!(
            "{}: {} ({} bytes{budget}, {}){}",
            w.host,
            w.user_data.display(),
            w.size,
            w.form.describe(),
            w.seed
                .as_ref()
                .map_or_else(String::new, |s| format!(", seed {}", s.display()))
        ));
    }
    Ok(())
}

pub fn rollback(ui: &Ui, root: &Path, trusted: &Trusted, dry_run: bool) -> Result<()> {
    ui.put("root", root.display().to_string());
    let keyring = Keyring::load(trusted)?;
    let state = crate::host::state::State::open(root)?;
    let outcome = crate::host::apply::rollback(&state, keyring.keys(), dry_run, now())?;
    report(ui, &outcome, root, "rollback");
    Ok(())
}

/// What an apply or rollback did (or would do), with how it was vouched
/// for. A dry run's plan is what was asked for: `-q` does not hide it.
fn report(ui: &Ui, outcome: &crate::host::apply::Outcome, root: &Path, how: &str) {
    use crate::host::apply::Outcome;
    use crate::host::state::Action;
    match outcome {
        Outcome::AlreadyActive { id, recovered } => {
            ui.put("action", "already-active");
            ui.put("release", id);
            ui.put("hooks_run", false);
            ui.put("recovered", recovered);
            if let Some(r) = recovered {
                ui.say(r);
            }
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
            signer_down_ms,
        } => {
            let kind = match (action, dry_run) {
                (_, true) => "dry-run",
                (Action::Repair, false) => "repaired",
                (_, false) => "activated",
            };
            ui.put("action", kind);
            ui.put("activation", action);
            ui.put("release", id);
            ui.put("from", from);
            // Made only when it is printed (it lists every path). The
            // activation is done: a list that cannot be read back from
            // its spill file is a warning, not a failure.
            if ui.json() {
                match plan_json(plan) {
                    Ok(json) => ui.put("plan", json),
                    Err(e) => {
                        ui.put("plan", Value::Null);
                        unlisted(&e);
                    }
                }
            }
            ui.put("hooks_run", hooks_run);
            ui.put("recovered", recovered);
            ui.put("signer_down_ms", signer_down_ms);
            let line = |l: std::fmt::Arguments<'_>| {
                if *dry_run { ui.show(l) } else { ui.say(l) }
            };
            if let Some(r) = recovered {
                line(format_args!("{r}"));
            }
            let verb = match (action, dry_run) {
                (Action::Repair, true) => "would repair",
                (Action::Repair, false) => "repaired",
                (_, true) => "would activate",
                (_, false) => "activated",
            };
            line(format_args!(
                "{}{verb} {id} on {} (was {}; {how}): {} added, {} changed, {} removed, {} repaired",
                if *dry_run { "dry run: " } else { "" },
                root.display(),
                from.as_ref().map_or("nothing", |f| f.as_str()),
                plan.added.len(),
                plan.changed.len(),
                plan.removed.len(),
                plan.repairs.len()
            ));
            if !ui.json() && (*dry_run || !ui.quiet) {
                let mut out = std::io::stdout().lock();
                if let Err(e) = crate::host::apply::describe(plan, &mut out) {
                    unlisted(&e);
                }
            }
            print_hooks(ui, &plan.hooks, *hooks_run, root, *dry_run);
        }
    }
}

/// A plan's list that could not be read back for the report.
fn unlisted(e: &Error) {
    eprintln!("infrakit: warning: the plan's paths cannot be listed: {e}");
}

/// The report is what `status` is run to show: `-q` does not hide it.
pub fn status(ui: &Ui, root: &Path, textfile: Option<&Path>) -> Result<()> {
    let report = crate::host::status::status(root);
    if let Some(path) = textfile {
        crate::host::status::write_textfile(path, &report)?;
    }
    ui.put_all(&report);
    match &report.release {
        Some(r) => ui.show(format_args!(
            "active: {} {} (sha256 {}, key {}), release {}",
            r.name, r.version, r.sha256, r.key_id, r.id
        )),
        None => ui.show(format_args!("active: no release on {}", root.display())),
    }
    ui.show("retained:");
    for r in &report.retained {
        ui.show(format_args!(
            "  {}{}  applied {}",
            r.id,
            if r.active { " (active)" } else { "" },
            r.applied_at.map_or_else(
                || "at an unrecorded time".to_owned(),
                crate::host::status::utc
            )
        ));
    }
    if let Some(i) = &report.interrupted {
        ui.show(format_args!("interrupted: {i}"));
    }
    if let Some(why) = &report.first_boot_failed {
        ui.show(format_args!("first boot failed: {why}"));
    }
    if report.errors.is_empty() {
        ui.show(format_args!("drift: {} path(s)", report.drift.len()));
    } else {
        ui.show(format_args!(
            "drift: {} path(s) found, but the check is incomplete (see below)",
            report.drift.len()
        ));
    }
    for d in &report.drift {
        ui.show(format_args!("  {:<10} {}: {}", d.kind, d.path, d.detail));
    }
    ui.show(format_args!(
        "secret slots: {} declared, {} not provided as declared",
        report.release_secrets,
        report.missing_secrets.len()
    ));
    for m in &report.missing_secrets {
        ui.show(format_args!("  {} ({}): {}", m.name, m.path, m.problem));
    }
    if !report.missing_prerequisites.is_empty() {
        ui.show(format_args!(
            "missing prerequisites (install them with apt): {}",
            report.missing_prerequisites.join(" ")
        ));
    }
    for e in &report.errors {
        ui.show(format_args!("could not check: {e}"));
    }
    if report.failed() {
        return Err(Error::Unhealthy(format!(
            "{}: {} drifted path(s), {} secret slot(s) not provided, {} missing prerequisite(s){}{}{}",
            root.display(),
            report.drift.len(),
            report.missing_secrets.len(),
            report.missing_prerequisites.len(),
            if report.interrupted.is_some() {
                ", an interrupted activation"
            } else {
                ""
            },
            if report.first_boot_failed.is_some() {
                ", the first boot failed (var/lib/infrakit/first-boot.failed)"
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
    if let Some(first) = report.errors.first() {
        return Err(Error::Unchecked(format!(
            "{}: {} thing(s) could not be checked, first: {first}",
            root.display(),
            report.errors.len()
        )));
    }
    Ok(())
}

/// One side of a `diff`: its manifest and how far it was checked.
struct Side {
    shown: String,
    manifest: Manifest,
    key_id: Option<String>,
}

fn load_side(ui: &Ui, arg: &Path, keyring: Option<&Keyring>) -> Result<Side> {
    let op = Operand::open(arg)?;
    let load = || -> Result<Side> {
        let side = |manifest, key_id| Side {
            shown: op.shown.clone(),
            manifest,
            key_id,
        };
        if op.is_manifest() {
            if keyring.is_some() {
                return Err(refuse_keys_for_manifest(&op));
            }
            return Ok(side(read_manifest_operand(&op.path)?, None));
        }
        if let Some(keyring) = keyring {
            let opts = VerifyOptions {
                artifact: &op.path,
                manifest: None,
                signature: None,
                keys: keyring.keys(),
            };
            let verified = ui.with_bar("verifying", |progress| {
                verify::authenticate(&opts, progress)
            })?;
            let key = verified.key_id().to_owned();
            return Ok(side(verified.manifest().clone(), Some(key)));
        }
        // Unsigned facts, but at least facts about this artifact: its
        // manifest must describe its bytes.
        let beside = verify::manifest_beside(&op.path);
        let bytes = verify::read_manifest(&beside)?;
        let m = Manifest::parse(&bytes).map_err(|e| Error::input(&beside, e))?;
        let (sha256, size) = file_digest(&op.path)?;
        if (sha256, size) != (m.archive.sha256, m.archive.size) {
            return Err(Error::check(format!(
                "{}: artifact is {size} bytes with sha256 {sha256}, the manifest beside it says {} bytes with {}: they do not belong together; fetch the release again",
                op.path.display(),
                m.archive.size,
                m.archive.sha256
            )));
        }
        Ok(side(m, None))
    };
    load().map_err(|e| op.own(e))
}

pub fn diff(ui: &Ui, a: &Path, b: &Path, trusted: Option<&Trusted>) -> Result<()> {
    let keyring = trusted.map(Keyring::load).transpose()?;
    let a = load_side(ui, a, keyring.as_ref())?;
    let b = load_side(ui, b, keyring.as_ref())?;
    let d = crate::diff::diff(&a.manifest, &b.manifest);
    for (key, side) in [("a", &a), ("b", &b)] {
        ui.put(
            key,
            json!({"path": side.shown, "verified": side.key_id.is_some(), "key_id": side.key_id}),
        );
    }
    ui.put_all(&d);
    if ui.json() {
        return Ok(());
    }
    let checked = |s: &Side| match &s.key_id {
        Some(k) => format!("{} (signed by key {k})", s.shown),
        None => format!("{} (signature not checked)", s.shown),
    };
    ui.show(format_args!("a:         {}", checked(&a)));
    ui.show(format_args!("b:         {}", checked(&b)));
    let mut out = std::io::stdout().lock();
    match d.describe(&mut out) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::io(Path::new("<stdout>"), "writing")),
    }
}

/// Prints generated shell completions.
pub fn completions(script: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(script).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::io(Path::new("<stdout>"), "writing completions")),
    }
}

/// Writes generated man pages into `dir` (created if missing), each
/// atomically: a temp file renamed into place.
pub fn man(ui: &Ui, dir: &Path, pages: &[(String, Vec<u8>)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir, "creating the man page directory"))?;
    for (name, bytes) in pages {
        let path = dir.join(name);
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).map_err(Error::io(dir, "creating a man page"))?;
        tmp.write_all(bytes)
            .map_err(Error::io(&path, "writing man page"))?;
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(Error::io(&path, "setting permissions"))?;
        tmp.persist(&path)
            .map_err(|e| Error::io(&path, "saving man page")(e.error))?;
        ui.say(path.display());
    }
    Ok(())
}

/// What `lock` and `fetch` are given, validated by `cli`.
pub struct PinArgs {
    pub profile: PathBuf,
    /// The cache directory (`$XDG_CACHE_HOME/infrakit`, read by `cli`).
    pub cache: PathBuf,
    /// `--mirror FROM=TO` items, as given.
    pub mirrors: Vec<String>,
    pub upstream_keys: Option<PathBuf>,
    /// `fetch --locked`.
    pub locked: bool,
    /// Pin the adapters' inputs (`--only` not `packages`).
    pub inputs: bool,
    /// Pin the `[image]` packages (`--only` not `inputs`).
    pub packages: bool,
    /// Verifies the Debian archive's indexes.
    pub archive_keyring: PathBuf,
}

/// The profile's inputs and its lock (empty when there is none yet).
fn profile_inputs(
    profile: &Path,
) -> Result<(
    crate::compose::profile::Profile,
    Vec<crate::inputs::decl::Input>,
    PathBuf,
    crate::inputs::lock::Lock,
)> {
    let loaded = crate::compose::profile::Profile::load(profile)?;
    let inputs = crate::inputs::decl::read(&loaded)?;
    let lock_path = crate::inputs::lock::path_for(&loaded);
    let lock = crate::inputs::lock::Lock::read(&lock_path)?;
    Ok((loaded, inputs, lock_path, lock))
}

/// `infrakit inputs PROFILE`: every input the profile's adapters declare,
/// with its locked digest (null until locked).
pub fn inputs(ui: &Ui, profile: &Path) -> Result<()> {
    ui.put("profile", profile.display().to_string());
    let (_, inputs, _, lock) = profile_inputs(profile)?;
    let mut listed = Vec::new();
    for input in &inputs {
        let sha = lock
            .entries
            .get(&input.name)
            .filter(|l| l.changed(input).is_none())
            .map(|l| l.sha256);
        let members: Vec<&str> = input.members.keys().map(|m| m.as_str()).collect();
        ui.show(format_args!(
            "{} {} {} {} {}",
            input.name,
            input.kind,
            input.version,
            input.url(),
            sha.map_or_else(|| "(not locked)".to_owned(), |s| format!("sha256:{s}"))
        ));
        for (member, target) in &input.members {
            ui.show(format_args!(
                "  {member} -> {} {:04o}",
                target.path, target.mode
            ));
        }
        if let Some(target) = &input.file {
            ui.show(format_args!("  -> {} {:04o}", target.path, target.mode));
        }
        listed.push(json!({
            "name": input.name,
            "adapter": input.adapter,
            "kind": input.kind,
            "version": input.version,
            "url": input.url(),
            "sha256": sha,
            "members": members,
        }));
    }
    ui.put("inputs", listed);
    Ok(())
}

/// `infrakit lock` and `infrakit fetch`: pin every input (`fetch
/// --locked` refuses to change the lock), write the lock if it changed,
/// and with `fetch`, make sure every locked asset is in the cache.
pub fn pin_inputs(ui: &Ui, args: &PinArgs, fetch: bool) -> Result<()> {
    let (profile, inputs, lock_path, old) = profile_inputs(&args.profile)?;
    if args.inputs {
        pin_adapter_inputs(ui, args, fetch, &inputs, &lock_path, &old)?;
    }
    if args.packages {
        pin_packages(ui, args, fetch, &profile)?;
    }
    Ok(())
}

/// `lock`/`fetch` of the `[image]` packages: resolve them from the
/// archive's signed indexes when the image lock is missing or out of date
/// (not with `--locked`), and with `fetch`, put every `.deb` into the cache
/// with its locked digest.
fn pin_packages(
    ui: &Ui,
    args: &PinArgs,
    fetch: bool,
    profile: &crate::compose::profile::Profile,
) -> Result<()> {
    use crate::image::lock::{self, ImageLock};
    use crate::inputs::{self, Outcome, cache, decl::Kind, lock::Locked};
    let Some(decl) = &profile.image else {
        return Ok(());
    };
    let lock_path = lock::path_for(profile);
    let old = ImageLock::read(&lock_path)?;
    let mirrors = cache::Mirrors::parse(&args.mirrors)?;
    let current = old.filter(|l| l.request == lock::request(decl));
    let locked = match current {
        Some(l) => {
            ui.say(format_args!(
                "{} is up to date ({} packages)",
                lock_path.display(),
                l.packages.len()
            ));
            l
        }
        None if args.locked => {
            return Err(Error::Refused(format!(
                "{} is missing or was resolved for another [image], and --locked forbids changing it; \
                 run `infrakit lock {}` and commit the lock",
                lock_path.display(),
                args.profile.display()
            )));
        }
        None => {
            let l = ui.with_bar("resolving", |_| {
                crate::image::resolve::resolve(
                    decl,
                    &args.archive_keyring,
                    &mirrors.rewrite(&decl.mirror),
                )
            })?;
            l.write(&lock_path)?;
            ui.say(format_args!(
                "wrote {} ({} packages)",
                lock_path.display(),
                l.packages.len()
            ));
            l
        }
    };
    if !fetch {
        return Ok(());
    }
    let cache = cache::Cache::new(args.cache.clone());
    let ctx = inputs::Context {
        cache: &cache,
        mirrors: &mirrors,
        upstream_keys: None,
        locked: true,
        profile: &args.profile,
        lock_path: &lock_path,
    };
    let total: u64 = locked.packages.iter().map(|p| p.size).sum();
    let mut fetched = 0;
    ui.with_bar("packages", |progress| {
        let mut done = 0;
        for p in &locked.packages {
            let entry = Locked {
                name: p.name.clone(),
                kind: Kind::Deb,
                version: p.version.clone(),
                url: p.url.clone(),
                sha256: p.sha256,
            };
            let got = inputs::ensure_cached(&entry, &ctx, &|d, _| progress(done + d, total))?;
            done += p.size;
            match got {
                Outcome::Downloaded => fetched += 1,
                Outcome::Replaced => ui.warn(format_args!(
                    "package {} {}: the cached copy had been modified; fetched it again",
                    p.name, p.version
                )),
                _ => {}
            }
        }
        Ok::<_, Error>(())
    })?;
    ui.say(format_args!(
        "{} packages in the cache ({fetched} fetched)",
        locked.packages.len()
    ));
    Ok(())
}

/// `lock`/`fetch` of the adapters' inputs.
fn pin_adapter_inputs(
    ui: &Ui,
    args: &PinArgs,
    fetch: bool,
    inputs: &[crate::inputs::decl::Input],
    lock_path: &Path,
    old: &crate::inputs::lock::Lock,
) -> Result<()> {
    use crate::inputs::{self, Outcome, cache};
    let cache = cache::Cache::new(args.cache.clone());
    let mirrors = cache::Mirrors::parse(&args.mirrors)?;
    let ctx = inputs::Context {
        cache: &cache,
        mirrors: &mirrors,
        upstream_keys: args.upstream_keys.as_deref(),
        locked: args.locked,
        profile: &args.profile,
        lock_path,
    };
    let mut new = crate::inputs::lock::Lock::default();
    for input in inputs {
        let (entry, pinned) = ui.with_bar(&input.name, |progress| {
            inputs::pin(input, old.entries.get(&input.name), &ctx, progress)
        })?;
        if pinned == Outcome::Locked {
            ui.say(format_args!(
                "locked {} {} sha256:{}",
                entry.name, entry.version, entry.sha256
            ));
        }
        if fetch {
            let got = ui.with_bar(&input.name, |progress| {
                inputs::ensure_cached(&entry, &ctx, progress)
            })?;
            match got {
                Outcome::Downloaded => ui.say(format_args!("fetched {}", entry.name)),
                Outcome::Replaced => ui.warn(format_args!(
                    "input {}: the cached copy had been modified; fetched it again",
                    entry.name
                )),
                _ => {}
            }
        }
        new.entries.insert(entry.name.clone(), entry);
    }
    if new != *old && !args.locked {
        new.write(lock_path)?;
        ui.say(format_args!(
            "wrote {} ({} inputs)",
            lock_path.display(),
            new.entries.len()
        ));
    } else {
        ui.say(format_args!(
            "{} is up to date ({} inputs)",
            lock_path.display(),
            new.entries.len()
        ));
    }
    Ok(())
}
