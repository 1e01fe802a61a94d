//! The command line: clap definitions and the one place that reads the
//! environment (`SOURCE_DATE_EPOCH`, `INFRAKIT_SIGN_KEY`,
//! `INFRAKIT_PASSWORD_FILE`, and `XDG_CACHE_HOME` or `HOME` for the inputs
//! cache) and the arguments. Only this module knows clap:
//! shell completions (clap_complete) and man pages (clap_mangen) are
//! generated from these definitions here.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::artifact::archive::Format;
use crate::commands::{self, Ui};
use crate::error::{Error, Result};
use crate::trust::keyring::Trusted;

/// The host's keyring, used by `apply` and `verify` unless told otherwise.
pub const DEFAULT_KEYRING: &str = "/etc/infrakit/keys";

/// Signed, byte-reproducible host artifacts for validator fleets.
///
/// Exit codes: 0 success, 1 a check failed, 2 usage or I/O error.
#[derive(Debug, Parser)]
#[command(
    name = "infrakit",
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 success, 1 a check failed or was refused (signature, manifest, lint, drift, downgrade, conflict), 2 usage, bad input or I/O error."
)]
pub struct Cli {
    /// No progress bars and no lines that only confirm success; what a command is run to show (a dry-run plan, status, inspect, diff, lint findings, --json) and errors are still printed.
    #[arg(long, short, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// zstd-compressed tar (default level 8)
    #[value(name = "tar.zst")]
    TarZst,
    /// gzip-compressed tar (default level 6)
    #[value(name = "tar.gz")]
    TarGz,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::TarZst => Format::TarZst,
            FormatArg::TarGz => Format::TarGz,
        }
    }
}

/// Where `lock` and `fetch` get inputs from.
#[derive(Debug, Args)]
pub struct PinFlags {
    /// The profile, e.g. profiles/monad-validator.toml; its lock is profiles/<name>.lock.
    pub profile: PathBuf,
    /// Fetch URLs starting with FROM from TO instead (repeatable; the lock keeps the upstream URL).
    #[arg(long = "mirror", value_name = "FROM=TO")]
    pub mirrors: Vec<String>,
    /// Directory of upstream signing keys (<FINGERPRINT>.asc or .gpg); default: each adapter's keys/.
    #[arg(long, value_name = "DIR")]
    pub upstream_keys: Option<PathBuf>,
    /// Only the adapters' inputs, or only the [image] Debian packages (profiles/<name>.image.lock); default: both.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub only: Option<OnlyArg>,
    /// The keyring that verifies the Debian archive's signed indexes (for [image]).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/usr/share/keyrings/debian-archive-keyring.gpg"
    )]
    pub archive_keyring: PathBuf,
}

/// `lock`/`fetch --only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnlyArg {
    /// The adapters' pinned inputs (profiles/<name>.lock)
    Inputs,
    /// The [image] table's Debian packages (profiles/<name>.image.lock)
    Packages,
}

/// Where `bundle`'s user-data goes (docs/first-boot.md has each budget).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProviderArg {
    /// AWS EC2: 16,384 bytes raw; gzip if over
    Ec2,
    /// Google Compute Engine: 256 KiB, text
    Gcp,
    /// Azure customData: 65,535 bytes decoded; gzip if over
    Azure,
    /// Hetzner Cloud: 32 KiB, text
    Hetzner,
    /// DigitalOcean: 64 KiB, plain text
    Digitalocean,
    /// OpenStack Nova: 65,535 bytes after base64; gzip if over
    Openstack,
    /// A NoCloud seed ISO carrying the release and the binary (bare metal, virtual media)
    Nocloud,
}

impl From<ProviderArg> for crate::bundle::Provider {
    fn from(p: ProviderArg) -> Self {
        use crate::bundle::Provider as P;
        match p {
            ProviderArg::Ec2 => P::Ec2,
            ProviderArg::Gcp => P::Gcp,
            ProviderArg::Azure => P::Azure,
            ProviderArg::Hetzner => P::Hetzner,
            ProviderArg::Digitalocean => P::Digitalocean,
            ProviderArg::Openstack => P::Openstack,
            ProviderArg::Nocloud => P::Nocloud,
        }
    }
}

/// The forms `image` writes besides the raw disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormatArg {
    /// NAME.img, always written
    Raw,
    /// NAME.qcow2 (qemu-img convert), for clouds and hypervisors that import qcow2
    Qcow2,
    /// NAME.img.zst, the raw disk compressed, for downloads
    #[value(name = "raw.zst")]
    RawZst,
}

/// The shells `completions` writes for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

impl From<ShellArg> for clap_complete::Shell {
    fn from(s: ShellArg) -> clap_complete::Shell {
        match s {
            ShellArg::Bash => clap_complete::Shell::Bash,
            ShellArg::Zsh => clap_complete::Shell::Zsh,
            ShellArg::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// Trusted keys given on the command line: key files or a keyring.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// A trusted minisign public key file; repeat for several (instead of --keyring).
    #[arg(long = "key", value_name = "PUB", conflicts_with = "keyring")]
    pub keys: Vec<PathBuf>,
    /// Directory of trusted minisign public keys (*.pub), as for apply.
    #[arg(long, value_name = "DIR")]
    pub keyring: Option<PathBuf>,
}

impl KeyArgs {
    /// The keys given, if any.
    fn given(self) -> Option<Trusted> {
        match (self.keys.is_empty(), self.keyring) {
            (false, _) => Some(Trusted::Files(self.keys)),
            (true, Some(dir)) => Some(Trusted::Dir(dir)),
            (true, None) => None,
        }
    }

    /// The keys given, else the host's keyring.
    fn or_host_keyring(self) -> Trusted {
        self.given()
            .unwrap_or_else(|| Trusted::Dir(PathBuf::from(DEFAULT_KEYRING)))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a minisign-compatible key pair: PREFIX.pub and PREFIX.key (mode 0600).
    Keygen {
        /// Path prefix of the key files; existing files are never overwritten.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// Encrypt the secret key with the password in this file (scrypt, as minisign does).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Compose a profile into DIR/<name>.tar.zst, its manifest and, with a key, its signature.
    ///
    /// What the build knows of each entry stays in memory up to 2 MiB per
    /// list; the rest goes to an unnamed temporary file in $TMPDIR (/tmp by
    /// default), as sort(1) does.
    Build {
        /// The profile, e.g. profiles/base.toml.
        profile: PathBuf,
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR", default_value = "dist")]
        out: PathBuf,
        /// Minisign secret key to sign with; default: the path in $INFRAKIT_SIGN_KEY.
        #[arg(long, value_name = "KEYFILE")]
        sign_key: Option<PathBuf>,
        /// File holding the secret key's password; default: the path in $INFRAKIT_PASSWORD_FILE.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Archive format.
        #[arg(long, value_enum, default_value = "tar.zst")]
        format: FormatArg,
        /// Compression level (zstd 1-22, default 8; gzip 0-9, default 6).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        level: Option<i32>,
        /// Version to record instead of the profile's (semver).
        #[arg(long, value_name = "VERSION")]
        release_version: Option<String>,
        /// Take pinned input NAME from PATH instead of the cache (it must have the locked sha256); repeatable.
        #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_input_override)]
        inputs: Vec<(String, PathBuf)>,
    },
    /// Build a bootable, signed UEFI disk image: the profile's [image] base OS plus its signed release (docs/images.md).
    Image {
        /// The profile, e.g. profiles/base.toml; it needs an [image] table and profiles/<name>.image.lock.
        profile: PathBuf,
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR", default_value = "dist")]
        out: PathBuf,
        /// Also write a qcow2 form (repeatable: --format qcow2 --format raw.zst); the raw NAME.img is always written.
        #[arg(long, value_enum, value_name = "FORMAT")]
        format: Vec<ImageFormatArg>,
        /// Minisign secret key to sign the image (and a release it builds) with; default: the path in $INFRAKIT_SIGN_KEY.
        #[arg(long, value_name = "KEYFILE")]
        sign_key: Option<PathBuf>,
        /// File holding the secret key's password; default: the path in $INFRAKIT_PASSWORD_FILE.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Another public key the booted host trusts for later releases (repeatable).
        #[arg(long = "trust", value_name = "PUB")]
        trust: Vec<PathBuf>,
        /// Lay down this signed release instead of building one from the profile.
        #[arg(long, value_name = "ARTIFACT")]
        artifact: Option<PathBuf>,
        /// The infrakit binary to install in the image; default: this one.
        #[arg(long, value_name = "FILE")]
        infrakit_binary: Option<PathBuf>,
        /// Take pinned input NAME from PATH instead of the cache (for the release build); repeatable.
        #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_input_override)]
        inputs: Vec<(String, PathBuf)>,
        /// Print the result as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Check an artifact's (or a disk image's) signature, name, manifest and every entry; exit 1 if anything is off.
    Verify {
        /// The artifact (a path or an http(s):// URL; .tar.zst or .tar.gz).
        artifact: PathBuf,
        #[command(flatten)]
        keys: KeyArgs,
        /// The manifest; default: <name>.manifest.json beside the artifact.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// The signature; default: the artifact's path plus .minisig.
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
        /// Print the result as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Check a profile for secrets, world-writable or setuid files and units running as root; exit 1 on findings.
    Lint {
        /// The profile, e.g. profiles/base.toml.
        profile: PathBuf,
        /// Print findings as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Verify an artifact against the keyring, then lay it down on a root and switch to it atomically.
    ///
    /// What the plan lists for every path stays in memory up to 1 MiB per
    /// list; the rest goes to an unnamed temporary file in $TMPDIR (/tmp by
    /// default), as sort(1) does.
    Apply {
        /// The artifact (a path or an http(s):// URL); its .minisig and manifest must lie beside it.
        artifact: PathBuf,
        /// The root to lay the release down on.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Directory of trusted minisign public keys (*.pub).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_KEYRING)]
        keyring: PathBuf,
        /// Print what would change (files, units, hooks) and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow a version that is not newer than the installed one, or another release name.
        #[arg(long)]
        allow_downgrade: bool,
        /// Move host files that are in the way aside (recorded under var/lib/infrakit/backups).
        #[arg(long)]
        adopt: bool,
        /// How many releases to keep for rollback, the active one included (at least 2).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..))]
        retain: u16,
        /// Refuse any release whose signed manifest has another sha256 (checked after the signature; first-boot bundles pin it).
        #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
        manifest_sha256: Option<String>,
        /// Print the outcome (or the dry run's plan) as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Make cloud-init first-boot bundles (<host>.user-data, and <host>.seed.iso for nocloud) for a built, signed artifact.
    Bundle {
        /// The artifact (.tar.zst or .tar.gz); its .minisig and manifest must lie beside it.
        artifact: PathBuf,
        /// Where the user-data goes; it sets the size budget and the form (docs/first-boot.md).
        #[arg(long, value_enum)]
        provider: ProviderArg,
        /// A minisign public key to pin on the hosts (repeatable); the artifact must verify against them.
        #[arg(long = "key", value_name = "PUB", required = true)]
        keys: Vec<PathBuf>,
        /// One [hosts.<name>] table per host: hostname, ssh-authorized-keys, params; default: one bundle named after the artifact.
        #[arg(long, value_name = "HOSTS.toml")]
        hosts: Option<PathBuf>,
        /// Where hosts download the artifact (its .minisig and manifest beside it); required except for nocloud.
        #[arg(long, value_name = "URL")]
        artifact_url: Option<String>,
        /// Where hosts download the infrakit binary; required except for nocloud.
        #[arg(long, value_name = "URL")]
        infrakit_url: Option<String>,
        /// The infrakit binary to carry or pin; default: the one running.
        #[arg(long, value_name = "PATH")]
        infrakit_binary: Option<PathBuf>,
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Print what was written as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Reactivate the previous retained release, atomically.
    Rollback {
        /// The root whose release to roll back.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Directory of trusted minisign public keys (*.pub): the retained
        /// release's stored signature must still verify against one of them.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_KEYRING)]
        keyring: PathBuf,
        /// Print what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Show the active release, drift, secret slots and prerequisites; exit 1 on a finding, 2 if something could not be checked.
    Status {
        /// The root to check.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print the report as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
        /// Also write Prometheus node_exporter textfile metrics here, atomically.
        #[arg(long, value_name = "PATH")]
        textfile: Option<PathBuf>,
    },
    /// Show what an artifact holds (read from the archive) with its manifest's name, version, digests and layers; verifies only with --key or --keyring.
    Inspect {
        /// An artifact or a .manifest.json (a path or an http(s):// URL).
        path: PathBuf,
        #[command(flatten)]
        keys: KeyArgs,
        /// Print the result as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Show what changes from release A to release B: version, artifact, inputs, layers, entries.
    Diff {
        /// The release before: an artifact or a .manifest.json (a path or an http(s):// URL).
        a: PathBuf,
        /// The release after, likewise.
        b: PathBuf,
        #[command(flatten)]
        keys: KeyArgs,
        /// Print the differences as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// List the upstream inputs a profile's adapters declare, with their locked digests.
    Inputs {
        /// The profile, e.g. profiles/monad-validator.toml.
        profile: PathBuf,
        /// Print the list as JSON (docs/json.md), also on failure.
        #[arg(long)]
        json: bool,
    },
    /// Download each new or changed input, check upstream's signature, and record its sha256 in profiles/<name>.lock.
    Lock {
        #[command(flatten)]
        pin: PinFlags,
    },
    /// Download every input into the cache ($XDG_CACHE_HOME/infrakit), checking each against the lock.
    Fetch {
        #[command(flatten)]
        pin: PinFlags,
        /// Refuse any input missing from the lock or whose entry no longer matches (CI).
        #[arg(long)]
        locked: bool,
    },
    /// Print shell completions for bash, zsh or fish.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: ShellArg,
    },
    /// Write man pages (infrakit.1 and one per subcommand) into DIR.
    Man {
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

impl Command {
    /// The subcommand's name, as `--json` reports it.
    fn name(&self) -> &'static str {
        match self {
            Command::Keygen { .. } => "keygen",
            Command::Build { .. } => "build",
            Command::Image { .. } => "image",
            Command::Verify { .. } => "verify",
            Command::Lint { .. } => "lint",
            Command::Apply { .. } => "apply",
            Command::Bundle { .. } => "bundle",
            Command::Rollback { .. } => "rollback",
            Command::Status { .. } => "status",
            Command::Inspect { .. } => "inspect",
            Command::Diff { .. } => "diff",
            Command::Inputs { .. } => "inputs",
            Command::Lock { .. } => "lock",
            Command::Fetch { .. } => "fetch",
            Command::Completions { .. } => "completions",
            Command::Man { .. } => "man",
        }
    }

    fn json(&self) -> bool {
        match self {
            Command::Verify { json, .. }
            | Command::Image { json, .. }
            | Command::Lint { json, .. }
            | Command::Apply { json, .. }
            | Command::Bundle { json, .. }
            | Command::Rollback { json, .. }
            | Command::Status { json, .. }
            | Command::Inspect { json, .. }
            | Command::Diff { json, .. }
            | Command::Inputs { json, .. } => *json,
            Command::Keygen { .. }
            | Command::Lock { .. }
            | Command::Fetch { .. }
            | Command::Build { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => false,
        }
    }
}

/// A path read from the environment, once, here at the edge. A variable
/// that is set but empty is an error, never "unset": a build asked to sign
/// that cannot sign must fail, not ship an unsigned artifact.
fn env_path(name: &str) -> Result<Option<PathBuf>> {
    match std::env::var_os(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Err(Error::usage(
            name,
            "is set but empty: set it to the file's path, or unset it",
        )),
        Some(v) => Ok(Some(PathBuf::from(v))),
    }
}

fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            Error::usage(
                "SOURCE_DATE_EPOCH",
                format!("{v:?} is not a number of seconds since 1970"),
            )
        }),
        Err(_) => Err(Error::usage("SOURCE_DATE_EPOCH", "is not valid UTF-8")),
    }
}

/// The download cache: `$XDG_CACHE_HOME/infrakit`, else
/// `$HOME/.cache/infrakit` (an empty `XDG_CACHE_HOME` counts as unset, as
/// the XDG spec says).
/// A sha256 in hex (64 digits), lowercased.
fn parse_sha256(s: &str) -> std::result::Result<String, String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err("give 64 hex digits".to_owned())
    }
}

/// `NAME=PATH` of `build --input`.
fn parse_input_override(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("{s:?} is not NAME=PATH")),
    }
}

fn cache_dir() -> Result<PathBuf> {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(v) if !v.is_empty() => Ok(PathBuf::from(v).join("infrakit")),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".cache/infrakit")),
            _ => Err(Error::usage(
                "XDG_CACHE_HOME",
                "neither it nor HOME is set: set XDG_CACHE_HOME to the cache directory's parent",
            )),
        },
    }
}

/// The whole program: parses the arguments, runs the command, prints the
/// error (and, with `--json`, the envelope); returns the exit code.
pub fn main() -> u8 {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e, &args),
    };
    let name = cli.command.name();
    let ui = Ui::new(cli.quiet, cli.command.json());
    let result = run(&ui, cli.command);
    commands::finish(&ui, name, result)
}

/// Help and version are printed as clap prints them; anything else is a
/// usage error with the same prefix (and `--json` envelope) as every error.
fn parse_failure(e: &clap::Error, args: &[OsString]) -> u8 {
    use clap::error::ErrorKind;
    let code = u8::try_from(e.exit_code()).unwrap_or(2);
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return code;
    }
    let text = e.render().to_string();
    let text = text.trim_end();
    let text = text.strip_prefix("error: ").unwrap_or(text);
    let before_dashdash = args.iter().skip(1).take_while(|a| *a != "--");
    let json = before_dashdash.clone().any(|a| a == "--json");
    let cmd = Cli::command();
    let command = before_dashdash
        .filter_map(|a| a.to_str())
        .find_map(|a| cmd.find_subcommand(a).map(|c| c.get_name().to_owned()));
    commands::usage_failure(command.as_deref(), json, text, code);
    code
}

/// Runs the parsed command line.
pub fn run(ui: &Ui, command: Command) -> Result<()> {
    match command {
        Command::Keygen { out, password_file } => {
            commands::keygen(ui, &out, password_file.as_deref())
        }
        Command::Build {
            profile,
            out,
            sign_key,
            password_file,
            format,
            level,
            release_version,
            inputs,
        } => {
            let sign_key = match sign_key {
                Some(k) => Some(k),
                None => env_path("INFRAKIT_SIGN_KEY")?,
            };
            let password_file = match password_file {
                Some(p) => Some(p),
                None => env_path("INFRAKIT_PASSWORD_FILE")?,
            };
            let args = commands::BuildArgs {
                profile,
                out,
                sign_key,
                password_file,
                format: format.into(),
                level,
                release_version,
                source_date_epoch: source_date_epoch()?,
                workers: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                cache: cache_dir().ok(),
                inputs,
            };
            commands::build(ui, &args)
        }
        Command::Image {
            profile,
            out,
            format,
            sign_key,
            password_file,
            trust,
            artifact,
            infrakit_binary,
            inputs,
            json: _,
        } => {
            let infrakit_binary = match infrakit_binary {
                Some(b) => b,
                None => std::env::current_exe().map_err(|e| {
                    Error::usage(
                        "--infrakit-binary",
                        format!("cannot find this binary ({e}): give its path"),
                    )
                })?,
            };
            let args = commands::ImageArgs {
                build: commands::BuildArgs {
                    profile,
                    out,
                    sign_key: match sign_key {
                        Some(k) => Some(k),
                        None => env_path("INFRAKIT_SIGN_KEY")?,
                    },
                    password_file: match password_file {
                        Some(p) => Some(p),
                        None => env_path("INFRAKIT_PASSWORD_FILE")?,
                    },
                    format: Format::TarZst,
                    level: None,
                    release_version: None,
                    source_date_epoch: source_date_epoch()?,
                    workers: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                    cache: cache_dir().ok(),
                    inputs,
                },
                trust,
                artifact,
                infrakit_binary,
                forms: crate::image::build::Forms {
                    qcow2: format.contains(&ImageFormatArg::Qcow2),
                    zstd: format.contains(&ImageFormatArg::RawZst),
                },
            };
            commands::image(ui, &args)
        }
        Command::Verify {
            artifact,
            keys,
            manifest,
            signature,
            json: _,
        } => commands::verify(
            ui,
            &artifact,
            &keys.or_host_keyring(),
            manifest.as_deref(),
            signature.as_deref(),
        ),
        Command::Inspect { path, keys, .. } => commands::inspect(ui, &path, keys.given().as_ref()),
        Command::Diff { a, b, keys, .. } => commands::diff(ui, &a, &b, keys.given().as_ref()),
        Command::Apply {
            artifact,
            root,
            keyring,
            dry_run,
            allow_downgrade,
            adopt,
            retain,
            manifest_sha256,
            json: _,
        } => commands::apply(
            ui,
            &artifact,
            &root,
            &Trusted::Dir(keyring),
            manifest_sha256.as_deref(),
            &crate::host::apply::ApplyOptions {
                dry_run,
                allow_downgrade,
                adopt,
                retain: usize::from(retain),
                now: 0,
            },
        ),
        Command::Bundle {
            artifact,
            provider,
            keys,
            hosts,
            artifact_url,
            infrakit_url,
            infrakit_binary,
            out,
            json: _,
        } => {
            let binary = match infrakit_binary {
                Some(b) => b,
                None => std::env::current_exe().map_err(crate::Error::io(
                    std::path::Path::new("/proc/self/exe"),
                    "finding the running infrakit binary (give --infrakit-binary)",
                ))?,
            };
            commands::bundle(
                ui,
                &artifact,
                &keys,
                &crate::bundle::Options {
                    provider: provider.into(),
                    keys: &[],
                    hosts: hosts.as_deref(),
                    artifact_url: artifact_url.as_deref(),
                    infrakit_url: infrakit_url.as_deref(),
                    infrakit_binary: &binary,
                    out: &out,
                },
            )
        }
        Command::Rollback {
            root,
            keyring,
            dry_run,
            ..
        } => commands::rollback(ui, &root, &Trusted::Dir(keyring), dry_run),
        Command::Status { root, textfile, .. } => commands::status(ui, &root, textfile.as_deref()),
        Command::Lint { profile, .. } => commands::lint(ui, &profile, cache_dir().ok().as_deref()),
        Command::Inputs { profile, .. } => commands::inputs(ui, &profile),
        Command::Lock { pin } => commands::pin_inputs(ui, &pin_args(pin, false)?, false),
        Command::Fetch { pin, locked } => commands::pin_inputs(ui, &pin_args(pin, locked)?, true),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            let mut cmd = Cli::command();
            clap_complete::generate(
                clap_complete::Shell::from(shell),
                &mut cmd,
                "infrakit",
                &mut script,
            );
            commands::completions(&script)
        }
        Command::Man { out } => commands::man(ui, &out, &man_pages(&out)?),
    }
}

fn pin_args(pin: PinFlags, locked: bool) -> Result<commands::PinArgs> {
    Ok(commands::PinArgs {
        profile: pin.profile,
        cache: cache_dir()?,
        mirrors: pin.mirrors,
        upstream_keys: pin.upstream_keys,
        locked,
        inputs: pin.only != Some(OnlyArg::Packages),
        packages: pin.only != Some(OnlyArg::Inputs),
        archive_keyring: pin.archive_keyring,
    })
}

/// `infrakit.1` and one page per subcommand (`infrakit-build.1`, …),
/// rendered by clap_mangen from the definitions above.
fn man_pages(out: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: &clap::Command, pages: &mut Vec<clap_mangen::Man>) {
        pages.push(clap_mangen::Man::new(cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, pages);
        }
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    walk(&cmd, &mut pages);
    pages
        .into_iter()
        .map(|man| {
            let mut bytes = Vec::new();
            man.render(&mut bytes)
                .map_err(Error::io(out, "rendering a man page"))?;
            Ok((man.get_filename(), bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn apply_keeps_at_least_two_releases() {
        assert!(Cli::try_parse_from(["infrakit", "apply", "a.tar.zst", "--retain", "1"]).is_err());
        assert!(Cli::try_parse_from(["infrakit", "apply", "a.tar.zst", "--retain", "2"]).is_ok());
    }

    #[test]
    fn verify_takes_keys_or_a_keyring_not_both() {
        let parse = |args: &[&str]| {
            let mut all = vec!["infrakit", "verify", "a.tar.zst"];
            all.extend(args);
            Cli::try_parse_from(all)
        };
        assert!(parse(&["--key", "k.pub", "--keyring", "d"]).is_err());
        for args in [&["--key", "k.pub"][..], &["--keyring", "d"], &[]] {
            assert!(parse(args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn every_subcommand_has_a_name_for_json() {
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            let mut args = vec!["infrakit", name];
            // The least each needs to parse.
            args.extend(match name {
                "keygen" | "man" => &["--out", "x"][..],
                "build" | "image" | "lint" | "verify" | "apply" | "inspect" | "inputs" | "lock"
                | "fetch" => &["x"],
                "diff" => &["x", "y"],
                "bundle" => &["x", "--provider", "ec2", "--key", "k", "--out", "o"],
                "completions" => &["bash"],
                _ => &[],
            });
            let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.command.name(), name);
        }
    }
}
