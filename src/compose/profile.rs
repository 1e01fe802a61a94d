//! Profiles (`profiles/<name>.toml`): what to compose and how to name it.
//! Parsing is strict (unknown keys are errors with file, line and column) and
//! yields a validated `Profile`; nothing here reads overlays or the clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::compose::params::ProfileParams;
use crate::error::{Error, Result};
use crate::trust::digest::Sha256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ProfileFile {
    name: Spanned<String>,
    version: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    source_date_epoch: Option<Spanned<i64>>,
    overlays: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    adapters: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    params: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    image: Option<ImageFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ImageFile {
    suite: Spanned<String>,
    #[serde(default)]
    arch: Option<Spanned<String>>,
    #[serde(default)]
    mirror: Option<Spanned<String>>,
    packages: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    cmdline: Option<Spanned<String>>,
    size: Spanned<String>,
}

/// The Debian suites an image can be built from.
pub const IMAGE_SUITES: [&str; 2] = ["bookworm", "trixie"];
/// Where Debian packages come from unless `[image] mirror` says otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The kernel command line unless `[image] cmdline` says otherwise (the
/// root is added by the image build).
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200";

/// `[image]`: the base OS of a bootable disk image (docs/images.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDecl {
    pub suite: String,
    pub arch: String,
    pub mirror: String,
    /// Installed on top of the minimal base (Essential, required, apt); sorted.
    pub packages: Vec<String>,
    pub cmdline: String,
    /// The disk's size in bytes, a whole number of MiB.
    pub size: u64,
}

/// Whether `name` is a valid Debian package name (Debian policy 5.6.1).
pub fn valid_package_name(name: &str) -> bool {
    name.len() >= 2
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// `"2G"`, `"1536M"`: bytes, a whole number of MiB.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let mib = match unit {
        "G" => n.checked_mul(1024)?,
        "M" => n,
        _ => return None,
    };
    mib.checked_mul(1 << 20)
}

impl ImageFile {
    fn check(self, path: &Path, text: &str) -> Result<ImageDecl> {
        let at = |span: std::ops::Range<usize>, msg: String| {
            Error::input_at_offset(path, text, span.start, msg)
        };
        if !IMAGE_SUITES.contains(&self.suite.get_ref().as_str()) {
            return Err(at(
                self.suite.span(),
                format!(
                    "[image] suite {:?} is not one of {}",
                    self.suite.get_ref(),
                    IMAGE_SUITES.join(", ")
                ),
            ));
        }
        let arch = match self.arch {
            None => "amd64".to_owned(),
            Some(a) if a.get_ref() == "amd64" => a.into_inner(),
            Some(a) => {
                return Err(at(
                    a.span(),
                    format!(
                        "[image] arch {:?}: only amd64 (x86-64 UEFI) images are built",
                        a.get_ref()
                    ),
                ));
            }
        };
        let mirror = match self.mirror {
            None => DEFAULT_MIRROR.to_owned(),
            Some(m) => {
                let url = m.get_ref().trim_end_matches('/');
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                let ok = rest.is_some_and(|r| {
                    !r.is_empty()
                        && !r.contains('@')
                        && r.bytes()
                            .all(|b| b.is_ascii_graphic() && !b"\"'`$\\".contains(&b))
                });
                if !ok {
                    return Err(at(
                        m.span(),
                        format!(
                            "[image] mirror {:?} must be an http:// or https:// URL without credentials, quotes or spaces",
                            m.get_ref()
                        ),
                    ));
                }
                url.to_owned()
            }
        };
        let mut packages: Vec<String> = Vec::new();
        for p in self.packages.get_ref() {
            if !valid_package_name(p.get_ref()) {
                return Err(at(
                    p.span(),
                    format!(
                        "[image] package {:?} is not a Debian package name",
                        p.get_ref()
                    ),
                ));
            }
            if packages.contains(p.get_ref()) {
                return Err(at(
                    p.span(),
                    format!("[image] package {:?} is listed twice", p.get_ref()),
                ));
            }
            packages.push(p.get_ref().clone());
        }
        packages.sort();
        if packages.is_empty() {
            return Err(at(
                self.packages.span(),
                "[image] packages is empty: list at least a kernel (linux-image-amd64)".to_owned(),
            ));
        }
        let cmdline = match self.cmdline {
            None => DEFAULT_CMDLINE.to_owned(),
            Some(c) => {
                let v = c.get_ref();
                if v.is_empty()
                    || !v.bytes().all(|b| (b' '..=b'~').contains(&b))
                    || v.split(' ').any(|w| w.starts_with("root="))
                {
                    return Err(at(
                        c.span(),
                        "[image] cmdline must be printable ASCII and must not set root= (the build sets it)".to_owned(),
                    ));
                }
                c.into_inner()
            }
        };
        let size = parse_size(self.size.get_ref())
            .filter(|s| *s >= 1 << 30)
            .ok_or_else(|| {
                at(
                    self.size.span(),
                    format!(
                        "[image] size {:?} must be at least 1G, written like \"2G\" or \"1536M\"",
                        self.size.get_ref()
                    ),
                )
            })?;
        Ok(ImageDecl {
            suite: self.suite.into_inner(),
            arch,
            mirror,
            packages,
            cmdline,
            size,
        })
    }
}

/// A layer named by a profile, resolved to a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRef {
    /// As written in the profile: the provenance recorded in the manifest.
    pub name: String,
    pub dir: PathBuf,
}

/// A validated profile.
#[derive(Clone, Debug)]
pub struct Profile {
    pub path: PathBuf,
    pub name: String,
    pub version: semver::Version,
    pub description: Option<String>,
    pub source_date_epoch: Option<u64>,
    pub layers: Vec<LayerRef>,
    /// The adapters (`adapters/<name>/`), composed after the overlays.
    pub adapters: Vec<LayerRef>,
    /// SHA-256 of the profile file's bytes.
    pub digest: Sha256,
    /// `[params]`, checked against the overlays' declarations when they load.
    pub params: ProfileParams,
    /// `[image]`, for `infrakit image`.
    pub image: Option<ImageDecl>,
}

/// Whether `name` is a valid profile name: `[a-z0-9-]+`, not starting with `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Profile {
    /// Reads and validates the profile at `path`.
    pub fn load(path: &Path) -> Result<Profile> {
        let bytes = std::fs::read(path).map_err(Error::io(path, "reading profile"))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::input(path, "profile is not valid UTF-8"))?;
        Profile::parse(path, &text)
    }

    /// Parses profile `text` read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Profile> {
        let file: ProfileFile = crate::error::parse_toml(path, text)?;
        let at = |span: std::ops::Range<usize>, msg: String| {
            Error::input_at_offset(path, text, span.start, msg)
        };

        if !valid_name(file.name.get_ref()) {
            return Err(at(
                file.name.span(),
                format!(
                    "name {:?} must be lowercase letters, digits and `-`",
                    file.name.get_ref()
                ),
            ));
        }
        let version = semver::Version::parse(file.version.get_ref()).map_err(|e| {
            at(
                file.version.span(),
                format!(
                    "version {:?} is not semver ({e}); write it like \"1.2.3\"",
                    file.version.get_ref()
                ),
            )
        })?;
        let source_date_epoch = match file.source_date_epoch {
            None => None,
            Some(v) => Some(u64::try_from(*v.get_ref()).map_err(|_| {
                at(
                    v.span(),
                    "source-date-epoch must not be negative".to_owned(),
                )
            })?),
        };

        let base = path.parent().unwrap_or(Path::new("."));
        let repo = base.parent().unwrap_or(Path::new(".."));
        let resolve = |kind: &str,
                       folder: &str,
                       items: &[Spanned<String>],
                       taken: &mut Vec<LayerRef>| {
            for item in items {
                let name = item.get_ref();
                let dir = if name.starts_with("./") || name.starts_with("../") {
                    base.join(name)
                } else if valid_name(name) {
                    repo.join(folder).join(name)
                } else {
                    return Err(at(
                        item.span(),
                        format!(
                            "{kind} {name:?} is neither a bare name ([a-z0-9-]+) nor a path starting with ./ or ../"
                        ),
                    ));
                };
                if taken.iter().any(|l| l.name == *name) {
                    return Err(at(item.span(), format!("{kind} {name:?} is listed twice")));
                }
                if !dir.is_dir() {
                    return Err(at(
                        item.span(),
                        format!(
                            "{kind} {name:?} not found: {} is not a directory",
                            dir.display()
                        ),
                    ));
                }
                taken.push(LayerRef {
                    name: name.clone(),
                    dir,
                });
            }
            Ok(())
        };
        let mut layers: Vec<LayerRef> = Vec::new();
        resolve("overlay", "overlays", file.overlays.get_ref(), &mut layers)?;
        let mut adapters: Vec<LayerRef> = Vec::new();
        if let Some(list) = &file.adapters {
            resolve("adapter", "adapters", list.get_ref(), &mut adapters)?;
        }
        if let Some(clash) = adapters
            .iter()
            .find(|a| layers.iter().any(|l| l.name == a.name))
        {
            return Err(Error::input(
                path,
                format!(
                    "{:?} is both an overlay and an adapter: layer names must be unique",
                    clash.name
                ),
            ));
        }
        if layers.is_empty() {
            return Err(at(
                file.overlays.span(),
                "overlays is empty: name at least one overlay".to_owned(),
            ));
        }

        let image = file.image.map(|i| i.check(path, text)).transpose()?;
        Ok(Profile {
            image,
            path: path.to_path_buf(),
            name: file.name.into_inner(),
            version,
            description: file.description,
            source_date_epoch,
            layers,
            adapters,
            digest: Sha256::of(text.as_bytes()),
            params: ProfileParams {
                values: file.params,
                path: path.to_path_buf(),
                text: text.to_owned(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("overlays/base/root")).unwrap();
        std::fs::create_dir_all(dir.path().join("profiles/extra")).unwrap();
        dir
    }

    fn parse(dir: &Path, text: &str) -> Result<Profile> {
        Profile::parse(&dir.join("profiles/p.toml"), text)
    }

    #[test]
    fn resolves_bare_and_relative_overlays() {
        let dir = repo();
        let p = parse(
            dir.path(),
            "name = \"p\"\nversion = \"1.0.0\"\noverlays = [\"base\", \"./extra\"]\n",
        )
        .unwrap();
        assert_eq!(p.layers[0].dir, dir.path().join("overlays/base"));
        assert_eq!(p.layers[1].dir, dir.path().join("profiles/./extra"));
        assert_eq!(p.layers[1].name, "./extra");
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let dir = repo();
        let err = parse(
            dir.path(),
            "name = \"p\"\nversion = \"1.0.0\"\noverlays = [\"base\"]\nsurprise = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("p.toml:4:1: unknown field `surprise`"),
            "{err}"
        );
    }

    #[test]
    fn bad_version_and_name_are_located() {
        let dir = repo();
        let err = parse(
            dir.path(),
            "name = \"p\"\nversion = \"one\"\noverlays = [\"base\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("p.toml:2:11: version \"one\" is not semver"),
            "{err}"
        );
        let err = parse(
            dir.path(),
            "name = \"P!\"\nversion = \"1.0.0\"\noverlays = [\"base\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("p.toml:1:8: name"), "{err}");
    }

    #[test]
    fn missing_overlay_is_an_error() {
        let dir = repo();
        let err = parse(
            dir.path(),
            "name = \"p\"\nversion = \"1.0.0\"\noverlays = [\"nope\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("overlay \"nope\" not found"), "{err}");
    }
}
