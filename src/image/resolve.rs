//! Resolving `[image]` to exact packages, with stock apt in a throwaway
//! configuration: `apt-get update` fetches the suite's `InRelease` and
//! `Packages` and checks them against the archive keyring (any warning,
//! an unsigned or badly signed index among them, fails: `--error-on=any`);
//! `apt-get install --print-uris` resolves the minimal base (Essential,
//! Priority required, apt: mmdebstrap's `minbase`) plus the listed packages
//! against an empty system; `apt-cache show` then gives each chosen
//! version's `Filename` and `SHA256` from the index apt verified. Nothing
//! is installed and nothing of the host's apt configuration is read.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::compose::profile::ImageDecl;
use crate::error::{Error, Result};
use crate::image::lock::{ImageLock, Package, request};
use crate::image::run;
use crate::trust::digest::Sha256;

/// What mmdebstrap's `minbase` variant installs before `--include`.
pub const MINBASE: &str = "?or(?essential,?priority(required))";

/// Resolves `decl` against the archive at `fetch_mirror` (the declared
/// mirror, or where `--mirror` sends it), trusting only `keyring`.
pub fn resolve(decl: &ImageDecl, keyring: &Path, fetch_mirror: &str) -> Result<ImageLock> {
    let tmp = tempfile::Builder::new()
        .prefix("infrakit-apt-")
        .tempdir()
        .map_err(Error::io(
            &std::env::temp_dir(),
            "creating a temporary directory",
        ))?;
    let root = tmp.path();
    for dir in [
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "etc/apt/trusted.gpg.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
    ] {
        std::fs::create_dir_all(root.join(dir))
            .map_err(Error::io(&root.join(dir), "creating apt's directories"))?;
    }
    let keyring = std::fs::canonicalize(keyring)
        .map_err(Error::io(keyring, "finding the archive keyring"))?;
    let write = |rel: &str, text: String| {
        std::fs::write(root.join(rel), text)
            .map_err(Error::io(&root.join(rel), "writing apt's configuration"))
    };
    write("var/lib/dpkg/status", String::new())?;
    write(
        "etc/apt/sources.list",
        format!(
            "deb [signed-by={}] {fetch_mirror} {} main\n",
            super::utf8(&keyring)?,
            decl.suite
        ),
    )?;
    let root_str = super::utf8(root)?;
    write(
        "apt.conf",
        format!(
            "Dir \"{root_str}/\";\n\
             Dir::State::status \"{root_str}/var/lib/dpkg/status\";\n\
             Dir::Etc::Trusted \"/nonexistent\";\n\
             Dir::Etc::TrustedParts \"{root_str}/etc/apt/trusted.gpg.d/\";\n\
             APT::Architecture \"{arch}\";\n\
             APT::Architectures {{ \"{arch}\"; }};\n\
             Acquire::Languages \"none\";\n\
             APT::Install-Recommends \"false\";\n\
             Debug::NoLocking \"true\";\n",
            arch = decl.arch
        ),
    )?;
    let apt = |tool: &str| {
        let mut c = Command::new(tool);
        c.env("APT_CONFIG", root.join("apt.conf"))
            .env("LC_ALL", "C.UTF-8")
            .env_remove("APT_CONFIG_FILE");
        c
    };
    run(
        apt("apt-get").args(["-q", "update", "--error-on=any"]),
        "checking the archive's signed indexes",
    )?;
    let mut install = apt("apt-get");
    install
        .args(["install", "--print-uris", "-qq", MINBASE, "apt"])
        .args(&decl.packages);
    let uris = run(&mut install, "resolving the image's packages")?;
    let uris = String::from_utf8_lossy(&uris);
    let mut wanted: Vec<(String, String)> = Vec::new();
    for line in uris.lines() {
        // 'URL' name_version_arch.deb SIZE HASH
        let mut fields = line.split(' ');
        let (Some(_url), Some(file)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".deb") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('_').collect();
        let [name, version, _arch] = parts[..] else {
            return Err(Error::usage(
                "apt-get",
                format!("cannot read the package file name {file:?}"),
            ));
        };
        wanted.push((name.to_owned(), version.replace("%3a", ":")));
    }
    if wanted.is_empty() {
        return Err(Error::usage(
            "apt-get",
            "resolved no packages: check [image] suite and mirror",
        ));
    }
    let mut show = apt("apt-cache");
    show.args(["show", "--no-all-versions"])
        .args(wanted.iter().map(|(n, v)| format!("{n}={v}")));
    let stanzas = run(&mut show, "reading the signed index")?;
    let index = parse_stanzas(&String::from_utf8_lossy(&stanzas));
    let mut packages = BTreeMap::new();
    for (name, version) in &wanted {
        let found = index
            .iter()
            .find(|s| s.get("Package") == Some(name) && s.get("Version") == Some(version))
            .ok_or_else(|| {
                Error::usage(
                    "apt-cache",
                    format!("the index has no stanza for {name} {version}"),
                )
            })?;
        let field = |k: &str| {
            found.get(k).cloned().ok_or_else(|| {
                Error::usage(
                    "apt-cache",
                    format!("{name} {version}: the index has no {k} field"),
                )
            })
        };
        let sha256: Sha256 = field("SHA256")?.parse().map_err(|e: String| {
            Error::usage("apt-cache", format!("{name} {version}: SHA256: {e}"))
        })?;
        let size = field("Size")?.parse().map_err(|_| {
            Error::usage(
                "apt-cache",
                format!("{name} {version}: Size is not a number"),
            )
        })?;
        let filename = field("Filename")?;
        if filename.starts_with('/') || filename.split('/').any(|c| c == "..") {
            return Err(Error::usage(
                "apt-cache",
                format!("{name} {version}: Filename {filename:?} leaves the archive"),
            ));
        }
        packages.insert(
            name.clone(),
            Package {
                name: name.clone(),
                version: version.clone(),
                arch: field("Architecture")?,
                url: format!("{}/{filename}", decl.mirror),
                size,
                sha256,
            },
        );
    }
    Ok(ImageLock {
        suite: decl.suite.clone(),
        arch: decl.arch.clone(),
        mirror: decl.mirror.clone(),
        request: request(decl),
        packages: packages.into_values().collect(),
    })
}

/// deb822 stanzas as field maps (continuation lines are dropped: the
/// fields read here are single-line).
fn parse_stanzas(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if !line.starts_with([' ', '\t'])
            && let Some((k, v)) = line.split_once(':')
        {
            cur.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_parse() {
        let s = parse_stanzas(
            "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nSHA256: ff\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0]["Version"], "1");
        assert_eq!(s[1]["SHA256"], "ff");
    }
}
