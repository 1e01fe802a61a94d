//! `infrakit bundle`: cloud-init first-boot bundles for an artifact that was
//! already built and signed. Release CI builds once; provisioning bundles
//! per host. Each host gets `<host>.user-data` (and, for NoCloud,
//! `<host>.seed.iso`): a `#cloud-config` that writes the pinned public keys,
//! the host's own values and the first-boot script (`first-boot.sh`), whose
//! one `runcmd` entry checks the `infrakit` binary against its pinned sha256
//! and runs `infrakit apply` with the pinned keyring and manifest digest:
//! signature first, then lay-down, failing closed.
//!
//! The artifact is verified against the keys to pin before anything is
//! written (a bundle its hosts would refuse is not made), all hosts are
//! rendered and fitted to the provider's budget before the first file is
//! written, and files appear in `--out` only complete (renamed into place).

mod hosts;
mod seed;
mod userdata;

use std::collections::BTreeSet;

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

pub use hosts::Host;
use userdata::{Admin, CloudConfig, File};
pub use userdata::{Form, Provider};

use crate::error::{Error, Result};
use crate::trust::digest::{HashingReader, HashingWriter, Sha256};
use crate::trust::sign::PublicKey;
use crate::trust::verify::Verified;

/// The first-boot script's template; `@PINS@` becomes the pinned values.
const FIRST_BOOT: &str = include_str!("bundle/first-boot.sh");
/// Where the bundle puts the first-boot script on the host.
pub const FIRST_BOOT_PATH: &str = "/usr/local/lib/infrakit/first-boot";
/// Where the host's values go (not part of any release).
pub const HOST_VALUES_PATH: &str = "/etc/infrakit/host.toml";
/// The host's keyring, as `apply` reads it by default.
pub const KEYRING_DIR: &str = "/etc/infrakit/keys";
/// The folder on the NoCloud volume holding the release and the binary.
pub const SEED_DIR: &str = "infrakit";

pub struct Options<'a> {
    pub provider: Provider,
    /// The keys to pin (the artifact verified against them).
    pub keys: &'a [PublicKey],
    /// `--hosts`, if given.
    pub hosts: Option<&'a Path>,
    pub artifact_url: Option<&'a str>,
    pub infrakit_url: Option<&'a str>,
    /// The binary to carry or pin.
    pub infrakit_binary: &'a Path,
    pub out: &'a Path,
}

/// One host's bundle, as written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Written {
    pub host: String,
    pub user_data: PathBuf,
    /// The size the provider counts (after base64 for OpenStack).
    pub size: usize,
    pub limit: Option<usize>,
    pub form: Form,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<PathBuf>,
}

/// What one host's files will be, before anything is written.
struct Rendered {
    host: Host,
    user_data: Vec<u8>,
    form: Form,
}

/// Makes the bundles for `verified` (checked against `opts.keys`).
pub fn make(opts: &Options<'_>, verified: &Verified) -> Result<Vec<Written>> {
    let manifest = verified.manifest();
    let artifact_name = manifest.artifact_file_name();
    let provider = opts.provider;
    let artifact_url = opts
        .artifact_url
        .map(|u| check_url(u, "--artifact-url", Some(&artifact_name)))
        .transpose()?;
    let infrakit_url = opts
        .infrakit_url
        .map(|u| check_url(u, "--infrakit-url", None))
        .transpose()?;
    if provider != Provider::Nocloud {
        let flag = if artifact_url.is_none() {
            Some((
                "--artifact-url",
                format!("where {artifact_name}, its .minisig and manifest are served"),
            ))
        } else if infrakit_url.is_none() {
            Some((
                "--infrakit-url",
                "where the infrakit binary is served".to_owned(),
            ))
        } else {
            None
        };
        if let Some((flag, what)) = flag {
            return Err(Error::usage(
                format!("--provider {}", provider.name()),
                format!(
                    "the host downloads the release at first boot: give {flag} ({what}), \
                     or use --provider nocloud to carry it on the seed volume"
                ),
            ));
        }
    }
    let binary_sha = binary_sha256(opts.infrakit_binary)?;
    let manifest_sha = verified.manifest_sha256();
    let hosts = match opts.hosts {
        Some(path) => hosts::load(path)?,
        None => vec![hosts::single(&manifest.name)],
    };
    if provider != Provider::Nocloud
        && let Some(h) = hosts.iter().find(|h| h.network_config.is_some())
    {
        return Err(Error::usage(
            format!("--provider {}", provider.name()),
            format!(
                "host {} has network-config, which only a NoCloud seed carries; the cloud provides the network",
                h.name
            ),
        ));
    }
    let release = format!("{} {}", manifest.name, manifest.version);
    let pins = Pins {
        infrakit_sha256: binary_sha.to_string(),
        infrakit_url: infrakit_url.unwrap_or_default(),
        artifact_url: artifact_url.unwrap_or_default(),
        artifact_name: artifact_name.clone(),
        manifest_sha256: manifest_sha.to_string(),
        release: release.clone(),
    };
    let script = first_boot_script(&pins);
    let mut packages: BTreeSet<String> = manifest.prerequisites.iter().cloned().collect();
    if !pins.infrakit_url.is_empty() || !pins.artifact_url.is_empty() {
        // The first-boot script downloads with curl.
        packages.extend(["ca-certificates".to_owned(), "curl".to_owned()]);
    }
    let packages: Vec<String> = packages.into_iter().collect();
    let mut rendered = Vec::with_capacity(hosts.len());
    for host in hosts {
        let config = cloud_config(&host, opts, &release, manifest_sha, &packages, &script);
        let (user_data, form) = config.deliver(provider, &host.name)?;
        rendered.push(Rendered {
            host,
            user_data,
            form,
        });
    }
    std::fs::create_dir_all(opts.out).map_err(Error::io(opts.out, "creating output directory"))?;
    let staging = tempfile::Builder::new()
        .prefix(".infrakit-bundle-")
        .tempdir_in(opts.out)
        .map_err(Error::io(opts.out, "creating a staging directory"))?;
    let mut moves: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut written = Vec::new();
    let carried = if provider == Provider::Nocloud {
        carried_files(
            verified,
            opts.infrakit_binary,
            &binary_sha,
            staging.path(),
            &pins,
        )?
    } else {
        Vec::new()
    };
    for r in &rendered {
        let name = format!("{}.user-data", r.host.name);
        let staged = staging.path().join(&name);
        write_file(&staged, &r.user_data)?;
        let final_path = opts.out.join(&name);
        let mut seed = None;
        if provider == Provider::Nocloud {
            let dir = staging.path().join(format!("{}.seed", r.host.name));
            std::fs::create_dir(&dir).map_err(Error::io(&dir, "creating a staging directory"))?;
            let mut files = carried.clone();
            let meta = dir.join("meta-data");
            write_file(&meta, meta_data(&r.host, &r.user_data).as_bytes())?;
            files.push(("user-data".to_owned(), staged.clone()));
            files.push(("meta-data".to_owned(), meta));
            if let Some(net) = &r.host.network_config {
                let path = dir.join("network-config");
                write_file(&path, net.as_bytes())?;
                files.push(("network-config".to_owned(), path));
            }
            let iso_name = format!("{}.seed.iso", r.host.name);
            let iso = staging.path().join(&iso_name);
            seed::make_iso(&iso, &files, manifest.source_date_epoch)?;
            let iso_final = opts.out.join(&iso_name);
            moves.push((iso, iso_final.clone()));
            seed = Some(iso_final);
        }
        moves.push((staged, final_path.clone()));
        let budget = provider.budget();
        written.push(Written {
            host: r.host.name.clone(),
            user_data: final_path,
            size: budget.map_or(r.user_data.len(), |b| b.size_of(r.user_data.len())),
            limit: budget.map(|b| b.limit),
            form: r.form,
            seed,
        });
    }
    for (from, to) in moves {
        std::fs::rename(&from, &to).map_err(Error::io(&to, "moving into place"))?;
    }
    Ok(written)
}

/// The values the first-boot script pins.
struct Pins {
    infrakit_sha256: String,
    infrakit_url: String,
    artifact_url: String,
    artifact_name: String,
    manifest_sha256: String,
    release: String,
}

/// `'…'` for POSIX sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn first_boot_script(p: &Pins) -> String {
    let pins = [
        ("INFRAKIT_SHA256", &p.infrakit_sha256),
        ("INFRAKIT_URL", &p.infrakit_url),
        ("ARTIFACT_URL", &p.artifact_url),
        ("ARTIFACT_NAME", &p.artifact_name),
        ("MANIFEST_SHA256", &p.manifest_sha256),
        ("RELEASE", &p.release),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", sh_quote(v)))
    .collect::<Vec<_>>()
    .join("\n");
    FIRST_BOOT.replacen("@PINS@", &pins, 1)
}

/// An `http(s)://` URL with nothing a shell or cloud-init could misread;
/// the artifact's must end in its file name (the `.minisig` and manifest are
/// fetched from beside it).
fn check_url(url: &str, flag: &str, file: Option<&str>) -> Result<String> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 2048
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && !url.contains(['\'', '"', '\\', '`', '$', '?', '#'])
        // No user:password@: user-data is stored and shown in the clear.
        && !url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or_default().contains('@'));
    if !ok {
        return Err(Error::usage(
            flag,
            format!(
                "{url:?} is not a plain http(s) URL (no credentials, quotes, spaces, query or fragment): \
                 user-data is stored in the clear, so serve releases where hosts need no secret to read them"
            ),
        ));
    }
    if let Some(file) = file
        && !url.ends_with(&format!("/{file}"))
    {
        return Err(Error::usage(
            flag,
            format!(
                "{url:?} must end in /{file}, the artifact's own name: its .minisig and manifest are fetched from beside it"
            ),
        ));
    }
    Ok(url.to_owned())
}

fn cloud_config(
    host: &Host,
    opts: &Options<'_>,
    release: &str,
    manifest_sha: &Sha256,
    packages: &[String],
    script: &str,
) -> CloudConfig {
    let mut keys: Vec<&PublicKey> = opts.keys.iter().collect();
    keys.sort_by_key(|k| k.key_id());
    let mut files: Vec<File> = keys
        .iter()
        .map(|k| File {
            path: format!("{KEYRING_DIR}/{}.pub", k.key_id()),
            mode: 0o644,
            content: k.to_file(),
        })
        .collect();
    if host.hostname.is_some() || !host.params.is_empty() {
        files.push(File {
            path: HOST_VALUES_PATH.to_owned(),
            mode: 0o644,
            content: host_values(host),
        });
    }
    for (unit, cpus) in &host.cpu_affinity {
        files.push(File {
            path: format!("/etc/systemd/system/{unit}.d/60-infrakit-host.conf"),
            mode: 0o644,
            content: format!(
                "# This host's CPU pinning, from its InfraKit bundle (docs/first-boot.md).\n\
                 [Service]\nCPUAffinity=\nCPUAffinity={cpus}\n"
            ),
        });
    }
    files.push(File {
        path: FIRST_BOOT_PATH.to_owned(),
        mode: 0o700,
        content: script.to_owned(),
    });
    CloudConfig {
        header: vec![
            format!(
                "InfraKit first-boot bundle: release {release} (manifest sha256 {}) for host {}, provider {}.",
                manifest_sha,
                host.name,
                opts.provider.name()
            ),
            "Written by `infrakit bundle` (docs/first-boot.md). No secrets: slots are filled after first boot.".to_owned(),
        ],
        hostname: host.hostname.clone(),
        admin: (!host.ssh_authorized_keys.is_empty()).then(|| Admin {
            user: host.admin_user.clone(),
            group: host.admin_group.clone(),
            password_hash: host.admin_password_hash.clone(),
            ssh_authorized_keys: host.ssh_authorized_keys.clone(),
        }),
        packages: packages.to_vec(),
        files,
        runcmd: vec![FIRST_BOOT_PATH.to_owned()],
    }
}

/// `/etc/infrakit/host.toml`: the host's own values, sorted.
fn host_values(host: &Host) -> String {
    let mut table = toml::Table::new();
    table.insert("host".into(), toml::Value::String(host.name.clone()));
    if let Some(h) = &host.hostname {
        table.insert("hostname".into(), toml::Value::String(h.clone()));
    }
    if !host.params.is_empty() {
        table.insert("params".into(), toml::Value::Table(host.params.clone()));
    }
    format!(
        "# This host's own values, written at first boot by its InfraKit bundle\n\
         # (docs/first-boot.md). Not part of the signed release; never secrets.\n{}",
        toml::to_string(&table).unwrap_or_default()
    )
}

/// NoCloud `meta-data`: the instance id changes with the user-data, so a
/// new bundle is a new first boot.
fn meta_data(host: &Host, user_data: &[u8]) -> String {
    let digest = Sha256::of(user_data).to_string();
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        userdata::q(&format!("infrakit-{}-{}", host.name, &digest[..16])),
        userdata::q(host.hostname.as_deref().unwrap_or(&host.name))
    )
}

/// The sha256 of the binary at `path`, streamed; a file that is not ELF is
/// refused.
fn binary_sha256(path: &Path) -> Result<Sha256> {
    let io = |action| Error::io(path, action);
    let mut file = std::fs::File::open(path).map_err(io("reading the infrakit binary"))?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Err(Error::input(
            path,
            "is not an executable (ELF) file: give the infrakit binary hosts should run with --infrakit-binary",
        ));
    }
    file.rewind().map_err(io("reading the infrakit binary"))?;
    let mut reader = HashingReader::new(file);
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(io("reading the infrakit binary"))?;
    Ok(reader.finish().0)
}

/// The release and the binary, staged for the seed volume; the binary is
/// copied (streamed) and must still have the pinned digest.
fn carried_files(
    verified: &Verified,
    binary: &Path,
    binary_sha: &Sha256,
    staging: &Path,
    pins: &Pins,
) -> Result<Vec<(String, PathBuf)>> {
    let m = verified.manifest();
    let artifact = verified.artifact();
    let bin = staging.join("infrakit");
    let mut source =
        std::fs::File::open(binary).map_err(Error::io(binary, "reading the infrakit binary"))?;
    let mut copy =
        HashingWriter::new(std::fs::File::create(&bin).map_err(Error::io(&bin, "writing"))?);
    std::io::copy(&mut source, &mut copy).map_err(Error::io(&bin, "writing"))?;
    let (_, copied, _) = copy.finish();
    if &copied != binary_sha {
        return Err(Error::check(format!(
            "{}: changed while bundling (sha256 {copied}, pinned {binary_sha}); run bundle again",
            binary.display()
        )));
    }
    let manifest_name = crate::artifact::manifest::file_name(&m.name);
    let manifest = staging.join(&manifest_name);
    let mut file = std::fs::File::create(&manifest).map_err(Error::io(&manifest, "writing"))?;
    verified.write_manifest(&mut file, &manifest)?;
    let sig = staging.join(format!("{}.minisig", pins.artifact_name));
    write_file(&sig, verified.signature_bytes())?;
    Ok(vec![
        (format!("{SEED_DIR}/infrakit"), bin),
        (
            format!("{SEED_DIR}/{}", pins.artifact_name),
            artifact.to_path_buf(),
        ),
        (format!("{SEED_DIR}/{}.minisig", pins.artifact_name), sig),
        (format!("{SEED_DIR}/{manifest_name}"), manifest),
    ])
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(Error::io(path, "writing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_quoted_for_sh() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
        let s = first_boot_script(&Pins {
            infrakit_sha256: "ab".into(),
            infrakit_url: String::new(),
            artifact_url: "https://x/base.tar.zst".into(),
            artifact_name: "base.tar.zst".into(),
            manifest_sha256: "cd".into(),
            release: "base 0.1.0".into(),
        });
        assert!(s.contains("\nINFRAKIT_URL=''\nARTIFACT_URL='https://x/base.tar.zst'\n"));
        assert!(!s.contains("@PINS@"));
    }

    #[test]
    fn urls_are_plain_and_name_the_artifact() {
        assert!(
            check_url(
                "https://r.example/v1/base.tar.zst",
                "f",
                Some("base.tar.zst")
            )
            .is_ok()
        );
        for bad in [
            "ftp://x/base.tar.zst",
            "https://x/base.tar.zst?sig=1",
            "https://x/a'b/base.tar.zst",
            "https://x/other.tar.zst",
            "https://x/ base.tar.zst",
            "https://user:secret@x/base.tar.zst",
        ] {
            assert!(check_url(bad, "f", Some("base.tar.zst")).is_err(), "{bad}");
        }
    }
}
