//! `profiles/<name>.image.lock`: the exact Debian packages an image of the
//! profile installs, as `lock` resolved them from the archive's signed
//! indexes: name, version, architecture, URL and sha256 of every `.deb`.
//! `request` is the digest of what `[image]` asked for (suite,
//! architecture, mirror, packages); a lock whose request differs is out of
//! date. Read strictly (unknown keys, unsorted or repeated packages are
//! errors naming file:line:col) and written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compose::profile::{ImageDecl, Profile};
use crate::error::{Error, Result};
use crate::trust::digest::Sha256;

/// One `.deb` as locked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Where the archive serves it: the mirror and the index's `Filename`.
    pub url: String,
    pub size: u64,
    /// From the signed `Packages` index.
    pub sha256: Sha256,
}

impl Package {
    /// The file name Debian gives it: `name_version_arch.deb`, the epoch's
    /// colon written `%3a` as the archive does.
    pub fn file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

/// A whole image lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageLock {
    pub suite: String,
    pub arch: String,
    pub mirror: String,
    pub request: Sha256,
    #[serde(default, rename = "package")]
    pub packages: Vec<Package>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    suite: String,
    arch: String,
    mirror: String,
    request: Sha256,
    #[serde(default)]
    package: Vec<toml::Spanned<Package>>,
}

const HEADER: &str = "# Written by `infrakit lock`: the Debian packages of this profile's image, \
with their sha256 from the archive's signed indexes. Do not edit.\n\n";

/// `profiles/<name>.image.lock` beside the profile file.
pub fn path_for(profile: &Profile) -> PathBuf {
    profile
        .path
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{}.image.lock", profile.name))
}

/// The digest of what `[image]` asks for: a lock resolved for another
/// request is out of date.
pub fn request(decl: &ImageDecl) -> Sha256 {
    let mut text = format!("{}\n{}\n{}\n", decl.suite, decl.arch, decl.mirror);
    for p in &decl.packages {
        text.push_str(p);
        text.push('\n');
    }
    Sha256::of(text.as_bytes())
}

impl ImageLock {
    /// The lock at `path`, `None` when there is none.
    pub fn read(path: &Path) -> Result<Option<ImageLock>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, "reading image lock")(e)),
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::input(path, "image lock is not valid UTF-8"))?;
        ImageLock::parse(path, &text).map(Some)
    }

    pub fn parse(path: &Path, text: &str) -> Result<ImageLock> {
        let file: LockFile = crate::error::parse_toml(path, text)?;
        let mut packages: Vec<Package> = Vec::with_capacity(file.package.len());
        for spanned in file.package {
            let span = spanned.span();
            let p = spanned.into_inner();
            let at = |m: String| Error::input_at_offset(path, text, span.start, m);
            if packages.last().is_some_and(|l| l.name >= p.name) {
                return Err(at(format!(
                    "package {:?} is out of order or repeated: run `infrakit lock` to rewrite the lock",
                    p.name
                )));
            }
            if !crate::compose::profile::valid_package_name(&p.name)
                || p.version.is_empty()
                || !p
                    .version
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.~:".contains(&b))
                || p.arch != file.arch && p.arch != "all"
            {
                return Err(at(format!(
                    "package {:?} {:?} {:?} is not a valid Debian name, version and architecture",
                    p.name, p.version, p.arch
                )));
            }
            if !p.url.starts_with(&format!("{}/", file.mirror)) {
                return Err(at(format!(
                    "package {:?}: url {} is not under the mirror {}",
                    p.name, p.url, file.mirror
                )));
            }
            packages.push(p);
        }
        Ok(ImageLock {
            suite: file.suite,
            arch: file.arch,
            mirror: file.mirror,
            request: file.request,
            packages,
        })
    }

    pub fn render(&self) -> String {
        let body = toml::to_string(self).expect("an image lock serialises");
        format!("{HEADER}{body}")
    }

    /// Writes the lock to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::inputs::lock::write_atomic(path, self.render().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock() -> ImageLock {
        ImageLock {
            suite: "trixie".into(),
            arch: "amd64".into(),
            mirror: "http://deb.debian.org/debian".into(),
            request: Sha256::of(b"r"),
            packages: ["apt", "zlib1g"]
                .iter()
                .map(|n| Package {
                    name: (*n).into(),
                    version: "1:1.0-1".into(),
                    arch: "amd64".into(),
                    url: format!("http://deb.debian.org/debian/pool/main/x/{n}.deb"),
                    size: 3,
                    sha256: Sha256::of(n.as_bytes()),
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips_and_refuses_disorder_and_strays() {
        let l = lock();
        let text = l.render();
        assert_eq!(
            ImageLock::parse(Path::new("p.image.lock"), &text).unwrap(),
            l
        );
        assert_eq!(l.packages[0].file_name(), "apt_1%3a1.0-1_amd64.deb");
        let swapped = {
            let mut s = l.clone();
            s.packages.reverse();
            s.render()
        };
        let err = ImageLock::parse(Path::new("p.image.lock"), &swapped)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.image.lock:") && err.contains("out of order"),
            "{err}"
        );
        let stray = text.replace("size = 3", "size = 3\nextra = 1");
        let err = ImageLock::parse(Path::new("p.image.lock"), &stray)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
        let elsewhere = text.replacen("http://deb.debian.org/debian/pool", "http://evil/pool", 1);
        let err = ImageLock::parse(Path::new("p.image.lock"), &elsewhere)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not under the mirror"), "{err}");
    }
}
