//! `build`: profile → layers → composed tree → archive, manifest and
//! signature in the output directory. Outputs are written to temporary files
//! beside their final names and renamed into place only when all of them are
//! complete, so a failed build leaves nothing half-written behind.

use std::fs::{self, File, Permissions};
use std::io::{BufWriter, Write};
use std::num::NonZeroU64;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Advice, fadvise};
use tempfile::NamedTempFile;

use crate::artifact::archive::{self, Format};
use crate::artifact::lint;
use crate::artifact::manifest::{self, Manifest};
use crate::compose;
use crate::compose::adapter::{AdapterFacts, AdapterSource, InputRecord, InputVars};
use crate::compose::overlay::Layer;
use crate::compose::profile::Profile;
use crate::error::{Error, Result};
use crate::inputs::decl::Input;
use crate::model::PackedTree;
use crate::trust::digest::{HashingWriter, Sha256};
use crate::trust::sign::{Prehasher, SecretKey};

/// Everything `build` needs, already validated by the command layer.
pub struct BuildOptions<'a> {
    pub profile: &'a Path,
    pub out_dir: &'a Path,
    pub format: Format,
    pub level: Option<i32>,
    /// Overrides the profile's version.
    pub version: Option<&'a str>,
    /// `SOURCE_DATE_EPOCH` from the environment, if set.
    pub source_date_epoch: Option<u64>,
    pub sign_key: Option<&'a SecretKey>,
    pub workers: u32,
    /// Where pinned inputs come from (never the network).
    pub inputs: InputSources<'a>,
}

/// Where a build takes pinned inputs from: the cache `infrakit fetch`
/// fills, and files given on the command line (`--input NAME=PATH`), which
/// must have the locked digest. Never the network.
#[derive(Clone, Debug, Default)]
pub struct InputSources<'a> {
    pub cache: Option<&'a Path>,
    pub overrides: &'a [(String, PathBuf)],
}

/// The inputs `mine` of one adapter whose `when` holds, checked against the
/// lock, as template variables (image references) and files to add; each
/// used input is recorded in `used`.
fn take_inputs(
    profile: &Profile,
    mine: &[&Input],
    values: &std::collections::BTreeMap<String, crate::compose::params::Value>,
    sources: &InputSources<'_>,
    used: &mut Vec<InputRecord>,
) -> Result<(InputVars, Vec<crate::inputs::take::Taken>)> {
    let lock_path = crate::inputs::lock::path_for(profile);
    let lock = crate::inputs::lock::Lock::read(&lock_path)?;
    let fix_lock = format!("infrakit lock {}", profile.path.display());
    let fix_fetch = format!("infrakit fetch {} --locked", profile.path.display());
    let mut vars = InputVars::new();
    let mut taken = Vec::new();
    for input in mine {
        let holds = input.when.as_ref().is_none_or(|w| {
            w.holds(|p| match values.get(p) {
                Some(crate::compose::params::Value::String(s)) => Some(s.clone()),
                _ => None,
            })
        });
        if !holds {
            continue;
        }
        let what = format!("input {} ({})", input.name, input.at);
        let locked = lock.entries.get(&input.name).ok_or_else(|| {
            Error::usage(
                &what,
                format!("is not in {}: run `{fix_lock}`", lock_path.display()),
            )
        })?;
        if let Some(why) = locked.changed(input) {
            return Err(Error::usage(
                &what,
                format!(
                    "{why} since {} was written: run `{fix_lock}`",
                    lock_path.display()
                ),
            ));
        }
        used.push(InputRecord {
            name: input.name.clone(),
            kind: input.kind.as_str().to_owned(),
            version: input.version.clone(),
            url: locked.url.clone(),
            sha256: locked.sha256,
            layer: input.adapter.clone(),
        });
        if input.kind == crate::inputs::decl::Kind::Image {
            vars.entry(input.name.clone())
                .or_default()
                .insert("reference".to_owned(), locked.reference());
            continue;
        }
        let cache_root = sources
            .cache
            .ok_or_else(|| Error::usage(&what, "no input cache: set XDG_CACHE_HOME or HOME"))?;
        let cache = crate::inputs::cache::Cache::new(cache_root.to_path_buf());
        if let Some((_, file)) = sources.overrides.iter().find(|(n, _)| *n == input.name) {
            import(&what, file, &locked.sha256, &cache)?;
        }
        taken.extend(crate::inputs::take::take(
            input,
            &locked.sha256,
            &cache,
            &fix_fetch,
        )?);
    }
    used.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((vars, taken))
}

/// Puts the file given for an input (`--input NAME=PATH`) into the cache:
/// copied from one open descriptor while it is hashed, and saved (over
/// whatever the cache held) only when it has the locked digest.
fn import(
    what: &str,
    file: &Path,
    sha: &Sha256,
    cache: &crate::inputs::cache::Cache,
) -> Result<()> {
    let dest = cache.file(sha);
    let dir = dest.parent().expect("cache files lie in a directory");
    std::fs::create_dir_all(dir).map_err(Error::io(dir, "creating the cache directory"))?;
    let tmp = NamedTempFile::new_in(dir).map_err(Error::io(dir, "creating a temp file"))?;
    let mut out = HashingWriter::new(tmp);
    std::io::copy(
        &mut File::open(file).map_err(Error::io(file, "opening --input file"))?,
        &mut out,
    )
    .map_err(Error::io(file, "reading --input file"))?;
    let (tmp, got, _) = out.finish();
    if got != *sha {
        return Err(Error::check(format!(
            "{what}: {} has sha256 {got}, the lock says {sha}: give the locked file",
            file.display()
        )));
    }
    tmp.persist(&dest)
        .map_err(|e| Error::io(&dest, "saving an --input file in the cache")(e.error))?;
    Ok(())
}

/// What `build` wrote.
#[derive(Debug)]
pub struct Built {
    pub artifact: PathBuf,
    pub manifest_path: PathBuf,
    pub signature: Option<PathBuf>,
    /// The manifest as written, but for its entries (`entries` of them),
    /// which were made and written one at a time.
    pub manifest: Manifest,
    pub entries: u64,
    pub key_id: Option<String>,
}

/// A profile composed into a tree, with what lint and the manifest need
/// from the layers.
pub struct Composed {
    pub profile: Profile,
    pub tree: PackedTree,
    pub allow_setuid: std::collections::BTreeSet<crate::model::RelPath>,
    /// What the adapters add to the manifest and to lint.
    pub adapters: AdapterFacts,
}

impl Composed {
    pub fn lint(&self) -> Result<Vec<lint::Finding>> {
        let mut findings = lint::lint(&self.tree, &self.allow_setuid)?;
        findings.extend(self.adapter_findings());
        Ok(findings)
    }

    /// The findings about what adapters declare (not about files).
    pub fn adapter_findings(&self) -> Vec<lint::Finding> {
        self.adapters
            .secret_env
            .iter()
            .map(lint::secret_environment)
            .collect()
    }
}

/// Loads a profile and composes its layers (overlays, then adapters) into a tree.
pub fn compose_profile(path: &Path, sources: &InputSources<'_>) -> Result<Composed> {
    let profile = Profile::load(path)?;
    let mut layers = profile
        .layers
        .iter()
        .map(|l| Layer::load(&l.name, &l.dir, &profile.params))
        .collect::<Result<Vec<_>>>()?;
    let declared = crate::inputs::decl::read(&profile)?;
    let mut adapters = Vec::new();
    let mut used = Vec::new();
    for a in &profile.adapters {
        let source = AdapterSource::read(&a.name, &a.dir)?;
        let mine: Vec<&Input> = declared.iter().filter(|i| i.adapter == a.name).collect();
        let (vars, taken) = if mine.is_empty() {
            (InputVars::new(), Vec::new())
        } else {
            let values = source.param_values(&profile.params)?;
            take_inputs(&profile, &mine, &values, sources, &mut used)?
        };
        let mut adapter = source.load(&profile.params, &vars)?;
        for t in taken {
            let size = std::fs::metadata(&t.source)
                .map_err(Error::io(&t.source, "reading a taken input file"))?
                .len();
            let kind = crate::model::Kind::File {
                source: crate::model::Source::Input(std::sync::Arc::new(crate::model::InputFile {
                    path: t.source.as_path().into(),
                    input: t.input.as_str().into(),
                    sha256: t.sha256,
                })),
                size,
            };
            adapter
                .layer
                .add_made(&source.toml_path, t.image_path.as_str(), kind, t.mode)?;
        }
        adapters.push(adapter);
    }
    let mut facts = AdapterFacts {
        inputs: used,
        ..AdapterFacts::default()
    };
    for a in &adapters {
        facts.services.extend(a.services.iter().cloned());
        facts.secrets.extend(a.secrets.iter().cloned());
        facts.prerequisites.extend(a.prerequisites.iter().cloned());
        facts.secret_env.extend(a.secret_env.iter().cloned());
    }
    layers.extend(adapters.into_iter().map(|a| a.layer));
    check_unique(path, &facts)?;
    facts.services.sort_by(|a, b| a.unit.cmp(&b.unit));
    facts.secrets.sort_by(|a, b| a.name.cmp(&b.name));
    facts.prerequisites.sort();
    facts.prerequisites.dedup();
    // A slot's content never enters an artifact: no layer may put anything
    // at its path (checked on every layer, so one a later layer replaces or
    // removes is refused too).
    for slot in &facts.secrets {
        let at = crate::model::RelPath::new(slot.path.trim_start_matches('/'))
            .map_err(|m| Error::input(path, m))?;
        let mut provided = None;
        for layer in &layers {
            if let Some(entry) = layer.get(&at)? {
                provided = Some((layer, entry));
                break;
            }
        }
        if let Some((layer, entry)) = provided {
            return Err(Error::input(
                path,
                format!(
                    "secret slot {:?} ({}) of adapter {:?}: layer {:?} puts a {} at that path, but a secret never \
                     enters an artifact; remove it from that layer and provide it on each host",
                    slot.name,
                    slot.path,
                    slot.layer,
                    layer.name,
                    entry.kind.name()
                ),
            ));
        }
    }
    let declared = layers
        .iter()
        .flat_map(|l| l.params.iter().cloned())
        .collect();
    profile.params.check_all_declared(&declared)?;
    let allow_setuid = layers
        .iter()
        .flat_map(|l| l.allow_setuid.iter().cloned())
        .collect();
    let tree = compose::compose(path, layers)?;
    Ok(Composed {
        profile,
        tree,
        allow_setuid,
        adapters: facts,
    })
}

/// Two adapters may not declare one unit or one secret slot.
fn check_unique(profile: &Path, facts: &AdapterFacts) -> Result<()> {
    let mut units = std::collections::BTreeMap::new();
    for s in &facts.services {
        if let Some(other) = units.insert(s.unit.as_str(), s.layer.as_str()) {
            return Err(Error::input(
                profile,
                format!(
                    "service {} is declared by adapter {other:?} and adapter {:?}; rename one",
                    s.unit, s.layer
                ),
            ));
        }
    }
    let mut slots = std::collections::BTreeMap::new();
    for s in &facts.secrets {
        if let Some(other) = slots.insert(s.name.as_str(), s.layer.as_str()) {
            return Err(Error::input(
                profile,
                format!(
                    "secret slot {:?} is declared by adapter {other:?} and adapter {:?}; rename one",
                    s.name, s.layer
                ),
            ));
        }
    }
    Ok(())
}

/// Builds the artifact; `progress(done, total)` is told of content bytes written.
pub fn build(opts: &BuildOptions<'_>, progress: &dyn Fn(u64, u64)) -> Result<Built> {
    // Flags first: nothing is read before they are known to be good.
    let version_override = opts
        .version
        .map(|v| {
            semver::Version::parse(v)
                .map(|v| v.to_string())
                .map_err(|e| Error::usage("--release-version", format!("{v:?} is not semver: {e}")))
        })
        .transpose()?;
    let level = opts.level.unwrap_or(opts.format.default_level());
    if !opts.format.levels().contains(&level) {
        let r = opts.format.levels();
        return Err(Error::usage(
            "--level",
            format!(
                "{level} is out of range for {}: use {} to {}",
                opts.format.extension(),
                r.start(),
                r.end()
            ),
        ));
    }
    let composed = compose_profile(opts.profile, &opts.inputs)?;
    // Lint: the metadata rules now; the content rules see each file's head
    // as the archive streams it (one read per file). Any metadata finding
    // runs the whole lint at once, so every finding is reported together.
    let mut clean = true;
    for item in composed.tree.iter() {
        let (path, entry) = item?;
        if !lint::metadata(&path, &entry, &composed.allow_setuid).is_empty() {
            clean = false;
            break;
        }
    }
    if !clean || !composed.adapter_findings().is_empty() {
        return Err(lint_failed(opts.profile, &composed.lint()?));
    }
    let Composed {
        profile,
        tree,
        adapters,
        ..
    } = composed;
    let version = version_override.unwrap_or_else(|| profile.version.to_string());
    let source_date_epoch = opts
        .source_date_epoch
        .or(profile.source_date_epoch)
        .unwrap_or(0);

    // Remember which directories this build creates, so a failure removes them.
    let created: Vec<&Path> = opts
        .out_dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    fs::create_dir_all(opts.out_dir)
        .map_err(Error::io(opts.out_dir, "creating output directory"))?;
    let result = write_outputs(
        opts,
        &profile,
        tree,
        &adapters,
        &version,
        source_date_epoch,
        progress,
    );
    if result.is_err() {
        // Leave no trace of a failed build: the directories are empty again
        // (temporary files are removed when dropped), deepest first.
        for dir in &created {
            let _ = fs::remove_dir(dir);
        }
    }
    result
}

fn write_outputs(
    opts: &BuildOptions<'_>,
    profile: &Profile,
    tree: PackedTree,
    adapters: &AdapterFacts,
    version: &str,
    source_date_epoch: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<Built> {
    // Checked by `build` before anything was read.
    let level = opts.level.unwrap_or(opts.format.default_level());
    let artifact_name = format!("{}.{}", profile.name, opts.format.extension());
    let artifact_path = opts.out_dir.join(&artifact_name);
    let manifest_path = opts.out_dir.join(manifest::file_name(&profile.name));
    let sig_path = opts.out_dir.join(format!("{artifact_name}.minisig"));

    let artifact_tmp = temp_in(opts.out_dir)?;
    let total = archive::content_size(&tree)?;
    let archive_opts = archive::Options {
        head: lint::scan_limit(),
        format: opts.format,
        level,
        workers: opts.workers,
        mtime: source_date_epoch,
    };
    let (summary, prehash) = {
        // The signature's BLAKE2b prehash is computed only when signing.
        let mut sink = PrehashWriter {
            inner: BufWriter::with_capacity(1 << 20, Writeback::new(artifact_tmp.as_file())),
            prehash: opts.sign_key.map(|_| Prehasher::default()),
        };
        let mut findings = Vec::new();
        let summary = archive::write(
            &tree,
            &mut sink,
            &archive_opts,
            &|done| progress(done, total),
            &mut |path, entry, head| findings.extend(lint::content(path, entry, head)),
        )?;
        if !findings.is_empty() {
            return Err(lint_failed(opts.profile, &findings));
        }
        let PrehashWriter { inner, prehash } = sink;
        inner
            .into_inner()
            .map_err(|e| Error::io(&artifact_path, "writing artifact")(e.into_error()))?;
        (summary, prehash.map(Prehasher::finish))
    };

    // The entries are made one at a time from the packed tree as the
    // manifest is written: never all in memory.
    let manifest = Manifest::new(
        profile,
        version,
        source_date_epoch,
        opts.format,
        &tree,
        &summary,
        adapters,
    );
    let mut manifest_tmp = temp_in(opts.out_dir)?;
    let (entries, manifest_sha256) = {
        let mut w = BufWriter::new(HashingWriter::new(manifest_tmp.as_file_mut()));
        let entries = manifest.write_canonical_json_streamed(
            Manifest::entries(&tree, &summary.files),
            &mut w,
            &manifest_path,
        )?;
        w.flush()
            .map_err(Error::io(&manifest_path, "writing manifest"))?;
        let hashing = w
            .into_inner()
            .map_err(|e| Error::io(&manifest_path, "writing manifest")(e.into_error()))?;
        (entries, hashing.finish().1)
    };
    drop(tree);

    let signed = match (opts.sign_key, &prehash) {
        (Some(key), Some(prehash)) => {
            let comment = manifest::Binding {
                name: profile.name.clone(),
                version: version.to_owned(),
                manifest_sha256,
            }
            .to_comment();
            Some((key.sign(prehash, &comment), key.public().key_id()))
        }
        _ => None,
    };
    let sig_tmp = match &signed {
        Some((text, _)) => {
            let mut tmp = temp_in(opts.out_dir)?;
            tmp.write_all(text.as_bytes())
                .map_err(Error::io(&sig_path, "writing signature"))?;
            Some(tmp)
        }
        None => None,
    };

    // Everything is complete: move it into place. Outputs the new manifest no
    // longer describes must go: a stale signature beside an unsigned build,
    // and the other format's artifact and signature (they share the manifest).
    let mut stale = Vec::new();
    if sig_tmp.is_none() {
        stale.push(sig_path.clone());
    }
    for other in [Format::TarZst, Format::TarGz] {
        if other != opts.format {
            let name = format!("{}.{}", profile.name, other.extension());
            stale.push(opts.out_dir.join(format!("{name}.minisig")));
            stale.push(opts.out_dir.join(name));
        }
    }
    for path in &stale {
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(path, "removing a stale output")(e));
            }
            _ => {}
        }
    }
    persist(artifact_tmp, &artifact_path)?;
    persist(manifest_tmp, &manifest_path)?;
    if let Some(tmp) = sig_tmp {
        persist(tmp, &sig_path)?;
    }
    if let Ok(dir) = File::open(opts.out_dir) {
        let _ = dir.sync_all();
    }
    Ok(Built {
        artifact: artifact_path,
        manifest_path,
        signature: signed.as_ref().map(|_| sig_path),
        manifest,
        entries,
        key_id: signed.map(|(_, id)| id),
    })
}

/// The error for a build that lint refused.
fn lint_failed(profile: &Path, findings: &[lint::Finding]) -> Error {
    let list: Vec<String> = findings.iter().map(|f| format!("  {f}")).collect();
    Error::Lint(format!(
        "{} finding(s) in {}; nothing was built:\n{}",
        findings.len(),
        profile.display(),
        list.join("\n")
    ))
}

fn temp_in(dir: &Path) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".infrakit-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(Error::io(dir, "creating temporary file"))
}

/// Makes `tmp` durable with mode 0644 and renames it to `dest`.
fn persist(tmp: NamedTempFile, dest: &Path) -> Result<()> {
    let file = tmp.as_file();
    file.set_permissions(Permissions::from_mode(0o644))
        .map_err(Error::io(dest, "setting permissions"))?;
    file.sync_all().map_err(Error::io(dest, "syncing"))?;
    tmp.persist(dest)
        .map_err(|e| Error::io(dest, "renaming into place")(e.error))?;
    Ok(())
}

/// Writes the artifact and starts writing it back to disk as it grows, one
/// `CHUNK` at a time (`posix_fadvise(DONTNEED)` starts writeback
/// without waiting for it). The `fsync` before the rename then waits for the
/// last chunk, not for the whole artifact.
struct Writeback<'a> {
    file: &'a File,
    written: u64,
    started: u64,
}

impl Writeback<'_> {
    const CHUNK: u64 = 8 << 20;

    fn new(file: &File) -> Writeback<'_> {
        Writeback {
            file,
            written: 0,
            started: 0,
        }
    }
}

impl Write for Writeback<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if let Some(len) = NonZeroU64::new(self.written - self.started)
            && len.get() >= Self::CHUNK
        {
            // Only a hint: the fsync before the rename is what counts.
            let _ = fadvise(self.file, self.started, Some(len), Advice::DontNeed);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Passes bytes on while feeding the signature prehash, if there is one.
struct PrehashWriter<W> {
    inner: W,
    prehash: Option<Prehasher>,
}

impl<W: Write> Write for PrehashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(p) = &mut self.prehash {
            p.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
