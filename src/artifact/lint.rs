//! Lint: what must never ship in an artifact. Secret material (private keys,
//! minisign/signify secret keys, EIP-2335 keystores, JWT secrets, mnemonic-
//! like word lists, files named like keys), world-writable paths, setuid/
//! setgid files an overlay did not allow, and services that would run as
//! root without saying so. Every finding names the path and its layer.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Read;

use base64::Engine as _;
use memchr::memmem;
use serde::Serialize;

use crate::compose::adapter::SecretEnv;
use crate::error::{Error, Result};
use crate::model::{Entry, Kind, PackedTree, RelPath, Source};

/// How much of each file the content rules read. Secrets are small (keys,
/// keystores, JWT secrets and mnemonics are all well under this).
const SCAN_LIMIT: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub path: String,
    pub layer: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (layer {:?}): {} [{}]",
            self.path, self.layer, self.message, self.rule
        )
    }
}

/// Lints `tree`, reading the head of every file; `allow_setuid` lists the
/// paths overlays allow to be setuid/setgid. (`build` runs the same checks
/// but feeds `content` from the archive's own single read of each file.)
pub fn lint(tree: &PackedTree, allow_setuid: &BTreeSet<RelPath>) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    for item in tree.iter() {
        let (path, entry) = item?;
        out.extend(metadata(&path, &entry, allow_setuid));
        if let Kind::File { source, .. } = &entry.kind {
            out.extend(content(&path, &entry, &read_head(&path, source)?));
        }
    }
    Ok(out)
}

/// A secret-looking value an adapter sets in a unit's `environment` or an
/// `[[env]]` file: environment is readable by anyone who can inspect the
/// process (and the file ships in the artifact); a secret belongs in a
/// secret slot.
pub fn secret_environment(e: &SecretEnv) -> Finding {
    Finding {
        rule: "secret-environment",
        path: e.path.clone(),
        layer: e.layer.clone(),
        message: format!(
            "{} looks like a secret (its name says PASSWORD, SECRET, TOKEN, PRIVATE or KEY) and is set to a value; \
             declare a [[secret]] slot and pass it as a credential instead",
            e.key
        ),
    }
}

/// How many bytes of a file the content rules look at.
pub fn scan_limit() -> usize {
    SCAN_LIMIT as usize
}

fn finding(rule: &'static str, path: &RelPath, entry: &Entry, message: String) -> Finding {
    Finding {
        rule,
        path: path.to_string(),
        layer: entry.layer.to_string(),
        message,
    }
}

/// The rules that need no file content: modes, names.
pub fn metadata(path: &RelPath, entry: &Entry, allow_setuid: &BTreeSet<RelPath>) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut find = |rule, message| out.push(finding(rule, path, entry, message));
    match &entry.kind {
        Kind::Dir => {
            if entry.mode & 0o002 != 0 && entry.mode & 0o1000 == 0 {
                find(
                    "world-writable",
                    format!(
                        "directory is world-writable ({:04o}) without the sticky bit",
                        entry.mode
                    ),
                );
            }
        }
        Kind::Symlink { .. } => {}
        Kind::File { .. } => {
            if entry.mode & 0o002 != 0 {
                find(
                    "world-writable",
                    format!("file is world-writable ({:04o})", entry.mode),
                );
            }
            if entry.mode & 0o6000 != 0 && !allow_setuid.contains(path) {
                find(
                    "setuid",
                    format!(
                        "file is setuid/setgid ({:04o}); list it in allow-setuid of its overlay if that is intended",
                        entry.mode
                    ),
                );
            }
            if let Some(why) = secret_name(path) {
                find("secret-name", why);
            }
        }
    }
    out
}

/// The rules that look at a regular file's first bytes (`head`, at most
/// `scan_limit()` of them).
pub fn content(path: &RelPath, entry: &Entry, head: &[u8]) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(why) = secret_content(head) {
        out.push(finding("secret-content", path, entry, why));
    }
    if is_service_unit(path)
        && let Some(why) = implicit_root(head)
    {
        out.push(finding("unit-root", path, entry, why));
    }
    out
}

fn read_head(path: &RelPath, source: &Source) -> Result<Vec<u8>> {
    match source {
        Source::Bytes(b) => Ok(b[..b.len().min(SCAN_LIMIT as usize)].to_vec()),
        Source::Overlay(_) | Source::Input(_) => {
            let p = crate::artifact::archive::source_path(path, source).expect("a file on disk");
            let file = std::fs::File::open(&p).map_err(Error::io(&p, "opening for reading"))?;
            let mut head = Vec::new();
            file.take(SCAN_LIMIT)
                .read_to_end(&mut head)
                .map_err(Error::io(&p, "reading"))?;
            Ok(head)
        }
    }
}

fn secret_name(path: &RelPath) -> Option<String> {
    let name = path.as_str().rsplit('/').next().unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let keyish = [
        "id_rsa",
        "id_dsa",
        "id_ecdsa",
        "id_ed25519",
        "jwt.hex",
        "jwtsecret",
        "jwt.secret",
        "jwt-secret",
        "jwt.txt",
    ];
    if keyish.contains(&lower.as_str()) {
        return Some(format!(
            "{name} is named like a private key or JWT secret; hosts provide it as a secret slot"
        ));
    }
    if (lower.starts_with("keystore-") && lower.ends_with(".json")) || lower.ends_with(".keystore")
    {
        return Some(format!(
            "{name} is named like a validator keystore; hosts provide keystores as secret slots"
        ));
    }
    if lower.ends_with(".key")
        || lower.ends_with(".sec")
        || lower.ends_with(".pem") && lower.contains("priv")
    {
        return Some(format!(
            "{name} is named like a private key; ship public keys only"
        ));
    }
    if path
        .as_str()
        .split('/')
        .any(|c| c == "validator_keys" || c == "validator-keys")
    {
        return Some(
            "path lies under a validator_keys directory; validator keys never ship in an artifact"
                .to_owned(),
        );
    }
    None
}

fn secret_content(head: &[u8]) -> Option<String> {
    // Valid UTF-8 (nearly every file) is borrowed; only the rest is copied.
    let text = std::str::from_utf8(head).map_or_else(|_| String::from_utf8_lossy(head), Cow::from);
    let bytes = text.as_bytes();
    // A PEM header anywhere, also inside a config value or a JSON string.
    for at in memmem::find_iter(bytes, "-----BEGIN ") {
        let rest = &text[at + "-----BEGIN ".len()..];
        let label: String = rest
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == ' ')
            .collect();
        if label.ends_with("PRIVATE KEY") || label.ends_with("PRIVATE KEY BLOCK") {
            return Some(format!("contains a private key ({})", label.trim()));
        }
    }
    // Only comment lines and lines of at least a key line's length can
    // match below: the others are skipped before they are trimmed.
    let comments = memmem::find(bytes, b"untrusted comment:").is_some();
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes).chain([bytes.len()]) {
        let line = &text[start..end];
        start = end + 1;
        if !comments && line.len() < 140 {
            continue;
        }
        let line = line.trim();
        if line.starts_with("untrusted comment:") && line.contains("secret key") {
            return Some("contains a minisign or signify secret key".to_owned());
        }
        // Only lines of a minisign (212) or signify (140) secret key's length.
        if !matches!(line.len(), 140 | 212) {
            continue;
        }
        if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(line) {
            if raw.len() == 158 && raw.starts_with(b"Ed") && &raw[4..6] == b"B2" {
                return Some("contains a minisign secret key".to_owned());
            }
            if raw.len() == 104 && raw.starts_with(b"EdBK") {
                return Some("contains a signify secret key".to_owned());
            }
        }
    }
    let trimmed = text.trim();
    let hex = trimmed.strip_prefix("0x").unwrap_or(trimmed);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(
            "is a bare 64-hex-digit value, shaped like a JWT secret or private key".to_owned(),
        );
    }
    if trimmed.starts_with('{') && trimmed.contains("\"crypto\"") && is_keystore(trimmed) {
        return Some("is an EIP-2335 keystore (crypto.kdf/checksum/cipher)".to_owned());
    }
    // At most 25 words are looked at: anything longer is not a seed phrase.
    let words: Vec<&str> = trimmed.split_whitespace().take(25).collect();
    if [12, 15, 18, 21, 24].contains(&words.len())
        && words
            .iter()
            .all(|w| (3..=8).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase()))
    {
        return Some(format!(
            "is a list of {} lowercase words, shaped like a mnemonic seed phrase",
            words.len()
        ));
    }
    None
}

fn is_keystore(text: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    let crypto = &v["crypto"];
    crypto.get("kdf").is_some()
        && crypto.get("checksum").is_some()
        && crypto.get("cipher").is_some()
}

fn is_service_unit(path: &RelPath) -> bool {
    let p = path.as_str();
    p.ends_with(".service")
        && [
            "etc/systemd/system/",
            "usr/lib/systemd/system/",
            "lib/systemd/system/",
        ]
        .iter()
        .any(|d| p.strip_prefix(d).is_some_and(|rest| !rest.contains('/')))
}

/// A service unit with no `User=` and no `DynamicUser=yes` runs as root.
fn implicit_root(unit: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(unit);
    let mut section = "";
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section != "[Service]" {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match (key.trim(), value.trim()) {
            ("User", v) if !v.is_empty() => return None,
            ("DynamicUser", "yes" | "true" | "1" | "on") => return None,
            _ => {}
        }
    }
    Some("service runs as root without saying so: set User= to its account (or User=root if it must be root)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_rules() {
        assert!(secret_content(b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n").is_some());
        assert!(secret_content(b"-----BEGIN PUBLIC KEY-----\nabc\n").is_none());
        assert!(secret_content(b"TLS_KEY=\"-----BEGIN EC PRIVATE KEY-----\\nabc\"\n").is_some());
        assert!(secret_content(format!("0x{}\n", "ab".repeat(32)).as_bytes()).is_some());
        assert!(
            secret_content(
                b"{\"crypto\":{\"kdf\":{},\"checksum\":{},\"cipher\":{}},\"version\":4}"
            )
            .is_some()
        );
        let words =
            "abandon ability able about above absent absorb abstract absurd abuse access accident";
        assert!(secret_content(words.as_bytes()).is_some());
        assert!(secret_content(b"PasswordAuthentication no\n").is_none());
    }

    #[test]
    fn unit_rule() {
        assert!(implicit_root(b"[Service]\nExecStart=/bin/x\n").is_some());
        assert!(implicit_root(b"[Service]\nUser=monad\n").is_none());
        assert!(implicit_root(b"[Service]\nDynamicUser=yes\n").is_none());
        assert!(implicit_root(b"[Unit]\nUser=x\n[Service]\nExecStart=/bin/x\n").is_some());
    }
}
