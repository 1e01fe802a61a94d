//! The command line: clap definitions and the one place that reads the
//! environment (`SOURCE_DATE_EPOCH`, `INFRAKIT_SIGN_KEY`,
//! `INFRAKIT_PASSWORD_FILE`) and the terminal. Only this module knows clap.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::archive::Format;
use crate::commands;
use crate::error::{Error, Result};

/// Signed, byte-reproducible host artifacts for validator fleets.
///
/// Exit codes: 0 success, 1 a check failed, 2 usage or I/O error.
#[derive(Debug, Parser)]
#[command(
    name = "infrakit",
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 success, 1 a check failed (signature, manifest, lint), 2 usage or I/O error."
)]
pub struct Cli {
    /// Print no progress and no summaries (errors still go to stderr).
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
    },
    /// Check an artifact's signature, manifest and every entry; exit 1 if anything is off.
    Verify {
        /// The artifact (.tar.zst or .tar.gz).
        artifact: PathBuf,
        /// A trusted minisign public key; repeat for several.
        #[arg(long = "key", value_name = "PUB", required = true)]
        keys: Vec<PathBuf>,
        /// The manifest; default: <name>.manifest.json beside the artifact.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// The signature; default: the artifact's path plus .minisig.
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a profile for secrets, world-writable or setuid files and units running as root; exit 1 on findings.
    Lint {
        /// The profile, e.g. profiles/base.toml.
        profile: PathBuf,
        /// Print findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify an artifact against the keyring, then lay it down on a root and switch to it atomically.
    Apply {
        /// The artifact (a path or an http(s):// URL); its .minisig and manifest must lie beside it.
        artifact: PathBuf,
        /// The root to lay the release down on.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Directory of trusted minisign public keys (*.pub).
        #[arg(long, value_name = "DIR", default_value = "/etc/infrakit/keys")]
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
    },
    /// Reactivate the previous retained release, atomically.
    Rollback {
        /// The root whose release to roll back.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the active release and drift from it; exit 1 on drift, missing secrets or an interrupted activation.
    Status {
        /// The root to check.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also write Prometheus node_exporter textfile metrics here, atomically.
        #[arg(long, value_name = "PATH")]
        textfile: Option<PathBuf>,
    },
    /// Show an artifact's (or manifest's) name, version, digests, layers and entries. Does not verify.
    Inspect {
        /// An artifact or a .manifest.json.
        path: PathBuf,
        /// Print the manifest as canonical JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Values read from the environment, once, here at the edge.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
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

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let ui = commands::Ui { quiet: cli.quiet };
    match cli.command {
        Command::Keygen { out, password_file } => {
            commands::keygen(&ui, &out, password_file.as_deref())
        }
        Command::Build {
            profile,
            out,
            sign_key,
            password_file,
            format,
            level,
            release_version,
        } => {
            let args = commands::BuildArgs {
                profile,
                out,
                sign_key: sign_key.or_else(|| env_path("INFRAKIT_SIGN_KEY")),
                password_file: password_file.or_else(|| env_path("INFRAKIT_PASSWORD_FILE")),
                format: format.into(),
                level,
                release_version,
                source_date_epoch: source_date_epoch()?,
                workers: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            };
            commands::build(&ui, &args)
        }
        Command::Verify {
            artifact,
            keys,
            manifest,
            signature,
            json,
        } => commands::verify(
            &ui,
            &artifact,
            &keys,
            manifest.as_deref(),
            signature.as_deref(),
            json,
        ),
        Command::Inspect { path, json } => commands::inspect(&path, json),
        Command::Apply {
            artifact,
            root,
            keyring,
            dry_run,
            allow_downgrade,
            adopt,
            retain,
        } => commands::apply(
            &ui,
            &artifact,
            &root,
            &keyring,
            &crate::apply::ApplyOptions {
                dry_run,
                allow_downgrade,
                adopt,
                retain: usize::from(retain),
                now: 0,
            },
        ),
        Command::Rollback { root, dry_run } => commands::rollback(&ui, &root, dry_run),
        Command::Status {
            root,
            json,
            textfile,
        } => commands::status(&root, json, textfile.as_deref()),
        Command::Lint { profile, json } => commands::lint(&ui, &profile, json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
    fn verify_requires_a_key() {
        assert!(Cli::try_parse_from(["infrakit", "verify", "a.tar.zst"]).is_err());
        assert!(Cli::try_parse_from(["infrakit", "verify", "a.tar.zst", "--key", "k.pub"]).is_ok());
    }
}
