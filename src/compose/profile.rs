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

        Ok(Profile {
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
