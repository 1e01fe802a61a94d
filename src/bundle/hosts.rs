//! `--hosts HOSTS.toml`: one `[hosts.<name>]` table per host with the values
//! that belong to that host and never to the signed artifact (hostname,
//! admin SSH keys, `params` such as its public IP or CPU pinning). Read as
//! untrusted input: every name, key and value is checked, and anything that
//! looks like a secret is refused (secret slots are filled after first boot,
//! never from user-data, which the provider stores in the clear).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};

/// One host's values, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// The bundle's file name stem (`<name>.user-data`).
    pub name: String,
    pub hostname: Option<String>,
    pub admin_user: String,
    pub admin_group: String,
    pub ssh_authorized_keys: Vec<String>,
    /// The admin's password as a crypt(3) hash (yescrypt or SHA-512), for
    /// sudo: never the password itself.
    pub admin_password_hash: Option<String>,
    /// `/etc/infrakit/host.toml`'s `[params]`: sorted, checked values.
    pub params: toml::Table,
    /// NoCloud `network-config` (v1 or v2, without a top-level `network:`).
    pub network_config: Option<String>,
    /// Per-unit host tuning: unit name → its `CPUAffinity=` (a drop-in).
    pub cpu_affinity: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    hosts: BTreeMap<String, Spanned<HostToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HostToml {
    hostname: Option<Spanned<String>>,
    admin_user: Option<Spanned<String>>,
    admin_group: Option<Spanned<String>>,
    #[serde(default)]
    ssh_authorized_keys: Vec<Spanned<String>>,
    admin_password_hash: Option<Spanned<String>>,
    #[serde(default)]
    params: BTreeMap<String, Spanned<toml::Value>>,
    network_config: Option<Spanned<String>>,
    #[serde(default)]
    units: BTreeMap<String, Spanned<UnitToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct UnitToml {
    cpu_affinity: Spanned<String>,
}

/// The base overlay's default admin group (its `admin-group` parameter).
pub const DEFAULT_ADMIN_GROUP: &str = "infrakit-admin";
pub const DEFAULT_ADMIN_USER: &str = "admin";

/// Words that mark a value as a secret: such values are filled on the host
/// after first boot (docs/first-boot.md), never carried in user-data.
const SECRET_WORDS: [&str; 9] = [
    "password",
    "passphrase",
    "secret",
    "private",
    "keystore",
    "jwt",
    "mnemonic",
    "token",
    "seed",
];

/// The one host of a bundle made without `--hosts`: named after the artifact.
pub fn single(name: &str) -> Host {
    Host {
        name: name.to_owned(),
        hostname: None,
        admin_user: DEFAULT_ADMIN_USER.to_owned(),
        admin_group: DEFAULT_ADMIN_GROUP.to_owned(),
        ssh_authorized_keys: Vec::new(),
        admin_password_hash: None,
        params: toml::Table::new(),
        network_config: None,
        cpu_affinity: BTreeMap::new(),
    }
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<Vec<Host>> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path, "reading hosts file"))?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Vec<Host>> {
    let file: HostsFile = crate::error::parse_toml(path, text)?;
    if file.hosts.is_empty() {
        return Err(Error::input(
            path,
            "declares no host: add a [hosts.<name>] table per host",
        ));
    }
    let at = |offset: usize, message: String| Error::input_at_offset(path, text, offset, message);
    let mut hosts = Vec::with_capacity(file.hosts.len());
    for (name, table) in file.hosts {
        let start = table.span().start;
        let h = table.into_inner();
        check_file_name(&name).map_err(|m| at(start, format!("host name {name:?} {m}")))?;
        // An optional string, checked where it stands; `what` prefixes the message.
        let checked = |v: Option<Spanned<String>>,
                       check: fn(&str) -> Result<(), String>,
                       what: &str|
         -> Result<Option<String>> {
            v.map(|s| {
                check(s.get_ref()).map_err(|m| at(s.span().start, format!("{what}{m}")))?;
                Ok(s.into_inner())
            })
            .transpose()
        };
        let hostname = checked(h.hostname, check_hostname, "")?;
        let admin_user = checked(h.admin_user, check_account, "admin-user ")?
            .unwrap_or_else(|| DEFAULT_ADMIN_USER.to_owned());
        let admin_group = checked(h.admin_group, check_account, "admin-group ")?
            .unwrap_or_else(|| DEFAULT_ADMIN_GROUP.to_owned());
        let mut keys = Vec::new();
        for k in h.ssh_authorized_keys {
            check_ssh_key(k.get_ref()).map_err(|m| at(k.span().start, m))?;
            keys.push(k.into_inner());
        }
        let admin_password_hash = checked(h.admin_password_hash, check_password_hash, "")?;
        if !keys.is_empty() && admin_password_hash.is_none() {
            return Err(at(
                start,
                format!(
                    "host {name:?} has ssh-authorized-keys but no admin-password-hash: the base's sudo \
                     asks the admin for their password, so without one nobody can become root; \
                     give a hash made with `mkpasswd -m yescrypt` (docs/first-boot.md)"
                ),
            ));
        }
        let mut params = toml::Table::new();
        for (key, value) in h.params {
            let offset = value.span().start;
            check_param(&key, value.get_ref())
                .map_err(|m| at(offset, format!("params.{key}: {m}")))?;
            params.insert(key, value.into_inner());
        }
        let network_config = checked(h.network_config, check_network_config, "")?;
        let mut cpu_affinity = BTreeMap::new();
        for (unit, values) in h.units {
            let start = values.span().start;
            check_service_name(&unit).map_err(|m| at(start, format!("units.{unit:?}: {m}")))?;
            let cpus = values.into_inner().cpu_affinity;
            check_cpu_list(cpus.get_ref()).map_err(|m| {
                at(
                    cpus.span().start,
                    format!("units.{unit:?}.cpu-affinity: {m}"),
                )
            })?;
            cpu_affinity.insert(unit, cpus.into_inner());
        }
        hosts.push(Host {
            name,
            cpu_affinity,
            hostname,
            admin_user,
            admin_group,
            ssh_authorized_keys: keys,
            admin_password_hash,
            params,
            network_config,
        });
    }
    Ok(hosts)
}

/// A name safe as a file name stem: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it names the bundle's files)".into())
    }
}

/// A crypt(3) hash of a strong scheme: yescrypt (`$y$`), SHA-512 (`$6$`)
/// or bcrypt (`$2b$`); a plain password is refused.
fn check_password_hash(hash: &str) -> Result<(), String> {
    let scheme_ok = ["$y$", "$6$", "$2b$", "$2y$"]
        .iter()
        .any(|p| hash.starts_with(p));
    let chars_ok = hash
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"$./=".contains(&b));
    if scheme_ok && chars_ok && hash.len() >= 40 && hash.len() <= 256 {
        Ok(())
    } else {
        Err(
            "admin-password-hash is not a crypt hash like \"$y$j9T$...\": give the output of \
             `mkpasswd -m yescrypt` (or -m sha-512), never the password"
                .into(),
        )
    }
}

/// A systemd service name: `[A-Za-z0-9:_.@-]+.service`, not starting with `-`.
fn check_service_name(unit: &str) -> Result<(), String> {
    let ok = unit.len() <= 256
        && !unit.starts_with(['-', '.'])
        && unit.ends_with(".service")
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("is not a service name like \"monad-bft.service\"".into())
    }
}

/// `CPUAffinity=` syntax as used here: CPU numbers and ranges, comma-separated
/// ("8-11", "1-7,16").
fn check_cpu_list(cpus: &str) -> Result<(), String> {
    let item_ok = |item: &str| {
        let mut ends = item.splitn(2, '-');
        let mut num = || {
            ends.next().is_some_and(|n| {
                !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit())
            })
        };
        let first = num();
        first && (!item.contains('-') || num())
    };
    if !cpus.is_empty() && cpus.split(',').all(item_ok) {
        Ok(())
    } else {
        Err(format!(
            "{cpus:?} is not a CPU list like \"8-11\" or \"1-7,16\""
        ))
    }
}

/// RFC 1123 labels, dot-separated, at most 253 characters.
fn check_hostname(h: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.len() <= 253 && h.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "hostname {h:?} is not a host name: letters, digits and '-' in dot-separated labels of at most 63"
        ))
    }
}

/// A Debian user or group name.
fn check_account(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a user or group name: lowercase letters, digits, '_' and '-', starting with a letter"
        ))
    }
}

/// One `authorized_keys` line: a known key type, base64, an optional comment.
fn check_ssh_key(line: &str) -> Result<(), String> {
    const TYPES: [&str; 8] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-dss",
    ];
    let mut fields = line.split(' ');
    let kind = fields.next().unwrap_or_default();
    let blob = fields.next().unwrap_or_default();
    let ok = TYPES.contains(&kind)
        && kind != "ssh-dss"
        && blob.len() >= 16
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        && line.bytes().all(|b| matches!(b, b' '..=b'~'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "ssh-authorized-keys: {:?} is not a public key line like \"ssh-ed25519 AAAA... you@host\" (no options, no DSA keys)",
            line.chars().take(40).collect::<String>()
        ))
    }
}

fn check_param(key: &str, value: &toml::Value) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 64
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
    if !key_ok {
        return Err("names are lowercase letters, digits, '-' and '_'".into());
    }
    if let Some(word) = SECRET_WORDS.iter().find(|w| key.contains(*w)) {
        return Err(format!(
            "looks like a secret ({word:?}): user-data is stored in the clear by the provider, \
             so secrets are never carried in it; fill the release's secret slots on the host after \
             first boot (docs/first-boot.md)"
        ));
    }
    check_value(value)
}

fn check_value(value: &toml::Value) -> Result<(), String> {
    match value {
        toml::Value::String(s) => check_text(s),
        toml::Value::Integer(_) | toml::Value::Boolean(_) => Ok(()),
        toml::Value::Array(items) => items.iter().try_for_each(|v| match v {
            toml::Value::String(s) => check_text(s),
            toml::Value::Integer(_) | toml::Value::Boolean(_) => Ok(()),
            _ => Err("lists hold strings, integers or booleans".into()),
        }),
        _ => Err("values are strings, integers, booleans or lists of them".into()),
    }
}

/// Printable ASCII, and nothing that looks like key material.
fn check_text(s: &str) -> Result<(), String> {
    if !s.bytes().all(|b| matches!(b, b' '..=b'~')) {
        return Err(
            "host values are printable ASCII (no control, line-separator or bidi characters)"
                .into(),
        );
    }
    if s.contains("-----BEGIN") || is_hex_key(s) {
        return Err(
            "looks like private key material: secrets are never carried in user-data; \
             fill the release's secret slots on the host after first boot (docs/first-boot.md)"
                .into(),
        );
    }
    Ok(())
}

/// `0x` and 64 hex digits: how Ethereum and Aztec tools print private keys.
fn is_hex_key(s: &str) -> bool {
    s.strip_prefix("0x")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_network_config(text: &str) -> Result<(), String> {
    if text.lines().any(|l| l.starts_with("network:")) {
        return Err(
            "network-config must not have a top-level `network:` key (NoCloud assumes it): \
             start with `version: 2` (or 1)"
                .into(),
        );
    }
    if !text
        .lines()
        .any(|l| l.trim_end() == "version: 1" || l.trim_end() == "version: 2")
    {
        return Err("network-config needs a top-level `version: 1` or `version: 2`".into());
    }
    if !text.bytes().all(|b| matches!(b, b' '..=b'~' | b'\n')) {
        return Err(
            "network-config is printable ASCII lines (no tabs, no control or line-separator characters)"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<Host>> {
        parse(Path::new("hosts.toml"), text)
    }

    #[test]
    fn reads_hosts_with_defaults() {
        let hosts = parse_str(
            "[hosts.val-1]\nhostname = \"val-1.example\"\nssh-authorized-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBase64 ops@x\"]\nadmin-password-hash = \"$y$j9T$abcdefghijklmnop$0123456789abcdefghijklmnopqrstuvwxyzABCDE\"\n[hosts.val-1.params]\npublic-ip = \"203.0.113.10\"\nbft-cpus = \"8-11\"\n",
        )
        .expect("valid");
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].admin_group, DEFAULT_ADMIN_GROUP);
        assert_eq!(hosts[0].params.len(), 2);
    }

    #[test]
    fn refuses_secrets_naming_the_line() {
        let e = parse_str("[hosts.a]\n[hosts.a.params]\nkeystore-password = \"hunter2\"\n")
            .expect_err("secret");
        let m = e.to_string();
        assert!(m.starts_with("hosts.toml:3:"), "{m}");
        assert!(m.contains("secret"), "{m}");
        let key = format!("[hosts.a.params]\nfee = \"0x{}\"\n", "ab".repeat(32));
        let e = parse_str(&format!("[hosts.a]\n{key}")).expect_err("key material");
        assert!(e.to_string().contains("private key material"), "{e}");
    }

    #[test]
    fn refuses_bad_names_keys_and_network_config() {
        for (text, needle) in [
            ("[hosts.\"../x\"]\n", "host name"),
            ("[hosts.a]\nhostname = \"a_b\"\n", "not a host name"),
            (
                "[hosts.a]\nssh-authorized-keys = [\"command=\\\"x\\\" ssh-ed25519 AAAA\"]\n",
                "public key line",
            ),
            (
                "[hosts.a]\nnetwork-config = \"network:\\n  version: 2\\n\"\n",
                "top-level `network:`",
            ),
            ("[hosts.a]\nbogus = 1\n", "unknown field"),
            (
                "[hosts.a]\nssh-authorized-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA\"]\n",
                "no admin-password-hash",
            ),
            (
                "[hosts.a]\nadmin-password-hash = \"hunter2hunter2hunter2hunter2hunter2hunter2\"\n",
                "not a crypt hash",
            ),
            (
                "[hosts.a.params]\nnote = \"x\u{2028}bootcmd: [[sh]]\"\n",
                "printable ASCII",
            ),
            (
                "[hosts.a.units.\"x.service\"]\ncpu-affinity = \"8-11; rm\"\n",
                "not a CPU list",
            ),
            (
                "[hosts.a.units.\"../x.service\"]\ncpu-affinity = \"1\"\n",
                "not a service name",
            ),
            ("", "missing field"),
        ] {
            let e = parse_str(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().starts_with("hosts.toml"), "{e}");
        }
    }
}
