//! Checks against what upstream publishes, made by `lock` before it records
//! a digest, so the first lock is not blind trust: a detached OpenPGP
//! signature verified by stock `gpgv` against the one key the adapter names
//! by fingerprint (`<keys>/<FINGERPRINT>.asc` or `.gpg`, where `<keys>` is
//! `--upstream-keys DIR` or else the adapter's own `keys/`), or a SHA-256
//! list (`checksums.txt`). And an image reference resolved to the digest of
//! its manifest (list) through the registry's HTTP API. Nothing here trusts
//! the network: a signature must come from the named key, a checksum list
//! must name the asset's file with the digest that arrived.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;

use crate::error::{Error, Result};
use crate::inputs::cache::{Asset, Cache, Mirrors};
use crate::inputs::decl::{Input, Signature};
use crate::trust::digest::Sha256;

/// Signatures and checksum lists larger than this are refused.
const SMALL_MAX: u64 = 1 << 20;
/// Key files larger than this are refused.
const KEY_MAX: u64 = 1 << 20;
/// Manifests larger than this are refused.
const MANIFEST_MAX: u64 = 4 << 20;

/// Checks the downloaded `asset` (a file with digest `sha`) against the
/// signature `input` declares, if any.
pub fn check_signature(
    input: &Input,
    asset: &Path,
    sha: &Sha256,
    cache: &Cache,
    mirrors: &Mirrors,
    upstream_keys: Option<&Path>,
) -> Result<()> {
    let Some(signature) = &input.signature else {
        return Ok(());
    };
    match signature {
        Signature::OpenPgp { url, fingerprint } => {
            let keys = upstream_keys.map_or_else(|| input.dir.join("keys"), Path::to_path_buf);
            let key = ["asc", "gpg"]
                .iter()
                .map(|ext| keys.join(format!("{fingerprint}.{ext}")))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::input(
                        &keys,
                        format!(
                            "input {}: no key {fingerprint}.asc or {fingerprint}.gpg: put upstream's public key there (check its fingerprint out of band)",
                            input.name
                        ),
                    )
                })?;
            let sig = fetch_small(cache, mirrors, &input.name, url)?;
            gpgv(input, &key, &sig, asset, fingerprint, url)
        }
        Signature::Checksums { url } => {
            let list = fetch_small(cache, mirrors, &input.name, url)?;
            let upstream = input.url();
            let file_name = upstream.rsplit('/').next().unwrap_or_default();
            checksum_listed(&list, file_name, sha).map_err(|m| {
                Error::check(format!(
                    "input {}: the checksum list {url} {m}; the download is not what upstream published",
                    input.name
                ))
            })
        }
    }
}

fn fetch_small(cache: &Cache, mirrors: &Mirrors, input: &str, url: &str) -> Result<Vec<u8>> {
    cache.small(
        &Asset {
            input,
            url,
            fetch_url: mirrors.rewrite(url),
        },
        SMALL_MAX,
    )
}

/// Whether `list` (`<hex>  <name>` or `<hex> *<name>` lines) gives
/// `file_name` the digest `sha`; the reason when not.
fn checksum_listed(list: &[u8], file_name: &str, sha: &Sha256) -> Result<(), String> {
    let text = String::from_utf8_lossy(list);
    let mut listed = None;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(hex), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let name = name.trim_start_matches('*').trim_start_matches("./");
        if name == file_name {
            if listed.is_some() {
                return Err(format!("lists {file_name} twice"));
            }
            listed = Some(hex.to_ascii_lowercase());
        }
    }
    match listed {
        None => Err(format!("does not list {file_name}")),
        Some(hex) if hex == sha.to_string() => Ok(()),
        Some(hex) => Err(format!(
            "gives {file_name} sha256 {hex}, the download has {sha}"
        )),
    }
}

/// The binary OpenPGP packets of an ASCII-armoured block (or `bytes`
/// itself when it is not armoured), as `gpgv --keyring` needs them.
fn dearmor(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    let Some(start) = text.find("-----BEGIN PGP PUBLIC KEY BLOCK-----") else {
        return Ok(bytes.to_vec());
    };
    let mut lines = text[start..].lines().skip(1);
    // Armour headers end at the first blank line.
    for line in lines.by_ref() {
        if line.trim().is_empty() {
            break;
        }
    }
    let mut b64 = String::new();
    for line in lines {
        let line = line.trim();
        if line.starts_with("-----END PGP PUBLIC KEY BLOCK-----") {
            return base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .map_err(|e| format!("its armour is not valid base64 ({e})"));
        }
        if line.starts_with('=') {
            continue; // the CRC-24 line
        }
        b64.push_str(line);
    }
    Err("its armour has no END line".into())
}

fn gpgv(
    input: &Input,
    key: &Path,
    signature: &[u8],
    asset: &Path,
    fingerprint: &str,
    sig_url: &str,
) -> Result<()> {
    let key_bytes = read_limited(key, KEY_MAX)?;
    let keyring = dearmor(&key_bytes)
        .map_err(|m| Error::input(key, format!("not an OpenPGP public key: {m}")))?;
    let tmp = tempfile::Builder::new()
        .prefix("infrakit-gpgv-")
        .tempdir()
        .map_err(Error::io(
            &std::env::temp_dir(),
            "creating a directory for gpgv",
        ))?;
    let ring = tmp.path().join("keyring.gpg");
    let sig = tmp.path().join("asset.sig");
    std::fs::write(&ring, &keyring).map_err(Error::io(&ring, "writing a keyring for gpgv"))?;
    std::fs::write(&sig, signature).map_err(Error::io(&sig, "writing a signature for gpgv"))?;
    let out = Command::new("gpgv")
        .arg("--homedir")
        .arg(tmp.path())
        .args(["--status-fd", "1", "--keyring"])
        .arg(&ring)
        .arg(&sig)
        .arg(asset)
        .output()
        .map_err(|e| {
            Error::usage(
                "gpgv",
                format!(
                    "cannot run it ({e}); it checks input {}'s upstream signature: install gpgv",
                    input.name
                ),
            )
        })?;
    let status = String::from_utf8_lossy(&out.stdout);
    // [GNUPG:] VALIDSIG <fpr> <date> <ts> <expire> <ver> <res> <algo> <hash> <class> <primary-fpr>
    let signed_by_key = status.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"VALIDSIG")
            && (f.get(2) == Some(&fingerprint) || f.get(11) == Some(&fingerprint))
    });
    if out.status.success() && signed_by_key {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr);
    let why = why
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::check(format!(
        "input {}: the signature {sig_url} is not a good signature by {fingerprint} over {} (gpgv: {why}); nothing was locked",
        input.name,
        input.url()
    )))
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(Error::io(path, "reading key"))?;
    let mut out = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(Error::io(path, "reading key"))?;
    if out.len() as u64 > limit {
        return Err(Error::input(path, format!("larger than {limit} bytes")));
    }
    Ok(out)
}

/// The registry API URL of an image reference `registry/repo:tag`
/// (`docker.io/x:t` is Docker Hub's `library/x`).
pub fn manifest_url(reference: &str) -> Result<String, String> {
    let (name, tag) = reference
        .rsplit_once(':')
        .filter(|(n, t)| !t.contains('/') && !n.is_empty() && !t.is_empty())
        .ok_or_else(|| format!("{reference:?} has no :tag"))?;
    let (registry, repo) = name
        .split_once('/')
        .ok_or_else(|| format!("{reference:?} has no registry/ prefix"))?;
    let (host, repo) = if registry == "docker.io" {
        let repo = if repo.contains('/') {
            repo.to_owned()
        } else {
            format!("library/{repo}")
        };
        ("registry-1.docker.io".to_owned(), repo)
    } else {
        (registry.to_owned(), repo.to_owned())
    };
    Ok(format!("https://{host}/v2/{repo}/manifests/{tag}"))
}

/// The digest of `input`'s image manifest (list), as the registry serves
/// it (anonymous bearer token when the registry asks for one).
pub fn image_digest(input: &Input, mirrors: &Mirrors) -> Result<Sha256> {
    let reference = input.url();
    let api = manifest_url(&reference).map_err(|m| Error::usage(&input.at, m))?;
    let fetch_url = mirrors.rewrite(&api);
    let net = |m: String| Error::Input {
        location: format!("input {} ({fetch_url})", input.name),
        message: m,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let get = |token: Option<&str>| {
        let mut request = agent.get(&fetch_url).header("Accept", ACCEPT);
        if let Some(t) = token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        request
            .call()
            .map_err(|e| net(format!("fetching the manifest: {e}")))
    };
    let mut response = get(None)?;
    if response.status().as_u16() == 401 {
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let token = bearer_token(&agent, &challenge).map_err(net)?;
        response = get(Some(&token))?;
    }
    match response.status().as_u16() {
        200 => {}
        404 => {
            return Err(net(format!(
                "not found (HTTP 404): check the image reference {reference}"
            )));
        }
        code => return Err(net(format!("the registry answered HTTP {code}"))),
    }
    let claimed = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .body_mut()
        .with_config()
        .limit(MANIFEST_MAX)
        .read_to_vec()
        .map_err(|e| net(format!("reading the manifest: {e}")))?;
    let digest = Sha256::of(&body);
    if let Some(claimed) = claimed
        && claimed != format!("sha256:{digest}")
    {
        return Err(Error::check(format!(
            "input {}: the registry says the manifest of {reference} is {claimed}, its bytes hash to sha256:{digest}",
            input.name
        )));
    }
    Ok(digest)
}

/// An anonymous token for a `Bearer realm="…",service="…",scope="…"` challenge.
fn bearer_token(agent: &ureq::Agent, challenge: &str) -> Result<String, String> {
    let rest = challenge
        .strip_prefix("Bearer ")
        .ok_or_else(|| format!("the registry wants authentication {challenge:?}; only anonymous bearer tokens are supported"))?;
    let mut realm = None;
    let mut query = Vec::new();
    for part in rest.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"');
        match k {
            "realm" => realm = Some(v.to_owned()),
            "service" | "scope" => query.push((k.to_owned(), v.to_owned())),
            _ => {}
        }
    }
    let realm = realm.ok_or("the registry's challenge names no realm")?;
    let mut request = agent.get(&realm);
    for (k, v) in &query {
        request = request.query(k, v);
    }
    let mut response = request
        .call()
        .map_err(|e| format!("fetching a registry token: {e}"))?;
    if response.status().as_u16() != 200 {
        return Err(format!(
            "the token service answered HTTP {}",
            response.status().as_u16()
        ));
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(SMALL_MAX)
        .read_to_vec()
        .map_err(|e| format!("reading a registry token: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("a registry token is not JSON: {e}"))?;
    value
        .get("token")
        .or_else(|| value.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "the token service's answer has no token".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_lists() {
        let sha = Sha256::of(b"x");
        let list = format!("{sha}  a.tar.gz\n{}  *b.tar.gz\n", Sha256::of(b"y"));
        assert!(checksum_listed(list.as_bytes(), "a.tar.gz", &sha).is_ok());
        let err = checksum_listed(list.as_bytes(), "b.tar.gz", &sha).unwrap_err();
        assert!(err.contains(&sha.to_string()) && err.contains(&Sha256::of(b"y").to_string()));
        assert!(checksum_listed(list.as_bytes(), "c", &sha).is_err());
        let twice = format!("{list}{sha}  a.tar.gz\n");
        assert!(checksum_listed(twice.as_bytes(), "a.tar.gz", &sha).is_err());
    }

    #[test]
    fn image_references_name_the_registry_api() {
        assert_eq!(
            manifest_url("docker.io/aztecprotocol/aztec:2.1.2").unwrap(),
            "https://registry-1.docker.io/v2/aztecprotocol/aztec/manifests/2.1.2"
        );
        assert_eq!(
            manifest_url("docker.io/nginx:1").unwrap(),
            "https://registry-1.docker.io/v2/library/nginx/manifests/1"
        );
        assert_eq!(
            manifest_url("ghcr.io/a/b/c:v1").unwrap(),
            "https://ghcr.io/v2/a/b/c/manifests/v1"
        );
        assert!(manifest_url("nginx").is_err());
    }

    #[test]
    fn armour_is_removed() {
        let armoured = "-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: x\n\naGVsbG8=\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(dearmor(armoured.as_bytes()).unwrap(), b"hello");
        assert_eq!(dearmor(&[0x99, 1, 2]).unwrap(), vec![0x99, 1, 2]);
    }
}
