//! The `[[input]]` tables of adapters (docs/inputs.md): pinned upstream
//! artifacts, strictly parsed and validated into `Input`s. `read` collects
//! the inputs of a profile from each adapter's `adapter.toml`, taking only
//! its `input` key: every other key belongs to the adapter loader
//! (`compose::adapter`), which validates it. Nothing here downloads or
//! evaluates a `when` against parameters (the build does, with `When::holds`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::compose::profile::{Profile, valid_name};
use crate::error::{Error, Result};
use crate::model::RelPath;

/// What an input is and what the build takes from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The downloaded file itself is one image file.
    File,
    /// A `.tar.gz`, `.tar.xz` or `.tar.zst`: declared members are taken.
    Tar,
    /// A Debian package: declared members of its `data.tar.{xz,zst,gz}`.
    Deb,
    /// A container image reference, pinned by digest; no files are taken.
    Image,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Tar => "tar",
            Kind::Deb => "deb",
            Kind::Image => "image",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a taken file goes in the image, and its mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub path: RelPath,
    pub mode: u32,
}

/// How upstream signs the asset (checked by `lock` before it records a digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signature {
    /// A detached OpenPGP signature at `url`, by the key with `fingerprint`
    /// (40 upper-case hex digits).
    OpenPgp { url: String, fingerprint: String },
    /// A SHA-256 list (`<hex>  <file name>` lines) at `url`.
    Checksums { url: String },
}

/// `when = "<param> == <value>"`: the input is used only when it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct When {
    pub param: String,
    pub value: String,
}

impl When {
    /// Parses `param == value`.
    pub fn parse(s: &str) -> Result<When, String> {
        let (param, value) = s.split_once("==").ok_or_else(|| {
            format!("when {s:?} must read `<param> == <value>`, e.g. \"client == geth\"")
        })?;
        let (param, value) = (param.trim(), value.trim());
        if !valid_name(param) || value.is_empty() || value.contains("==") {
            return Err(format!(
                "when {s:?} must read `<param> == <value>` with a parameter name ([a-z0-9-]+) and a value"
            ));
        }
        Ok(When {
            param: param.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Whether it holds, given the string value of each parameter.
    pub fn holds(&self, value_of: impl Fn(&str) -> Option<String>) -> bool {
        value_of(&self.param).is_some_and(|v| v == self.value)
    }
}

/// One validated `[[input]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub name: String,
    /// The adapter that declares it, as the profile names it (the layer).
    pub adapter: String,
    /// The adapter's directory (its `keys/` hold upstream signing keys).
    pub dir: PathBuf,
    /// `adapter.toml:line:col` of its table, for messages.
    pub at: String,
    pub version: String,
    /// As written, with `{version}` not yet substituted (see `url`).
    pub url_template: String,
    pub kind: Kind,
    /// `kind = "file"`: where the file goes.
    pub file: Option<Target>,
    /// `kind = "tar"`/`"deb"`: member path in the archive → target.
    pub members: BTreeMap<RelPath, Target>,
    pub signature: Option<Signature>,
    pub when: Option<When>,
}

impl Input {
    /// The upstream URL (for an image, the reference `registry/repo:tag`).
    pub fn url(&self) -> String {
        self.url_template.replace("{version}", &self.version)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawInput {
    name: Spanned<String>,
    version: Spanned<String>,
    url: Spanned<String>,
    kind: Spanned<Kind>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<i64>>,
    #[serde(default)]
    members: Option<Spanned<BTreeMap<Spanned<String>, RawTarget>>>,
    #[serde(default)]
    signature: Option<Spanned<RawSignature>>,
    #[serde(default)]
    when: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    path: Spanned<String>,
    mode: Spanned<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SignatureKind {
    Openpgp,
    Checksums,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    kind: Spanned<SignatureKind>,
    url: Spanned<String>,
    #[serde(default)]
    fingerprint: Option<Spanned<String>>,
}

/// The only key of `adapter.toml` read here; the others are the adapter
/// loader's.
#[derive(Debug, Deserialize)]
struct AdapterInputs {
    #[serde(default)]
    input: Vec<Spanned<RawInput>>,
}

/// The inputs of every adapter `profile` names, in adapter then file
/// order. Two inputs with one name are an error.
pub fn read(profile: &Profile) -> Result<Vec<Input>> {
    let mut all: Vec<Input> = Vec::new();
    for adapter in &profile.adapters {
        let path = adapter.dir.join("adapter.toml");
        let bytes = std::fs::read(&path).map_err(Error::io(&path, "reading adapter"))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::input(&path, "adapter.toml is not valid UTF-8"))?;
        for input in parse(&path, &text, &adapter.name)? {
            if let Some(first) = all.iter().find(|i| i.name == input.name) {
                return Err(Error::Input {
                    location: input.at.clone(),
                    message: format!(
                        "input {:?} is already declared at {}: input names must be unique in a profile",
                        input.name, first.at
                    ),
                });
            }
            all.push(input);
        }
    }
    Ok(all)
}

/// The `[[input]]` tables of `text`, the contents of `path`, an adapter
/// named `adapter` in the profile.
pub fn parse(path: &Path, text: &str, adapter: &str) -> Result<Vec<Input>> {
    let file: AdapterInputs = crate::error::parse_toml(path, text)?;
    file.input
        .into_iter()
        .map(|raw| Checker { path, text }.input(raw, adapter))
        .collect::<Result<Vec<_>>>()
        .and_then(|inputs| {
            let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
            for i in &inputs {
                if let Some(first) = seen.insert(&i.name, &i.at) {
                    return Err(Error::Input {
                        location: i.at.clone(),
                        message: format!(
                            "input {:?} is already declared at {first}: input names must be unique in a profile",
                            i.name
                        ),
                    });
                }
            }
            Ok(inputs)
        })
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn at(&self, span: std::ops::Range<usize>, message: impl fmt::Display) -> Error {
        Error::input_at_offset(self.path, self.text, span.start, message)
    }

    fn location(&self, span: &std::ops::Range<usize>) -> String {
        let (line, col) = crate::error::line_column(self.text, span.start);
        format!("{}:{line}:{col}", self.path.display())
    }

    fn rel_path(&self, s: &Spanned<String>) -> Result<RelPath> {
        RelPath::new(s.get_ref()).map_err(|m| self.at(s.span(), m))
    }

    fn mode(&self, m: &Spanned<i64>) -> Result<u32> {
        u32::try_from(*m.get_ref())
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                self.at(
                    m.span(),
                    format!("mode {} is not a file mode (0o0 to 0o7777)", m.get_ref()),
                )
            })
    }

    fn input(&self, raw: Spanned<RawInput>, adapter: &str) -> Result<Input> {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = raw.name.get_ref();
        if !valid_name(name) {
            return Err(self.at(
                raw.name.span(),
                format!("input name {name:?} must be lowercase letters, digits and `-`"),
            ));
        }
        let version = raw.version.get_ref();
        if version.is_empty()
            || !version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+-~".contains(c))
        {
            return Err(self.at(
                raw.version.span(),
                format!(
                    "version {version:?} must be letters, digits and `.`, `_`, `+`, `-`, `~` (it goes into the URL)"
                ),
            ));
        }
        let kind = *raw.kind.get_ref();
        let url = raw.url.get_ref().replace("{version}", version);
        let is_http = url.starts_with("https://") || url.starts_with("http://");
        if kind == Kind::Image {
            if is_http || url.contains(['@', ' ']) || !url.contains('/') || !url.contains(':') {
                return Err(self.at(
                    raw.url.span(),
                    "an image input's url is a reference `registry/repository:tag` (no scheme, no digest: `lock` records the digest)",
                ));
            }
        } else if !is_http || url.contains(['?', '#', ' ']) {
            return Err(self.at(
                raw.url.span(),
                format!(
                    "url {url:?} must be an http(s):// URL without query or fragment, naming the upstream asset"
                ),
            ));
        }
        let present = |what: &str, span: Option<std::ops::Range<usize>>| match span {
            Some(span) => Err(self.at(
                span,
                format!("`{what}` does not apply to an input of kind {kind}"),
            )),
            None => Ok(()),
        };
        let mut file = None;
        let mut members = BTreeMap::new();
        match kind {
            Kind::File => {
                present("members", raw.members.as_ref().map(|m| m.span()))?;
                let (Some(path), Some(mode)) = (&raw.path, &raw.mode) else {
                    return Err(self.at(
                        span,
                        format!(
                            "input {name:?} of kind file needs `path` (its place in the image) and `mode`"
                        ),
                    ));
                };
                file = Some(Target {
                    path: self.rel_path(path)?,
                    mode: self.mode(mode)?,
                });
            }
            Kind::Tar | Kind::Deb => {
                present("path", raw.path.as_ref().map(|p| p.span()))?;
                present("mode", raw.mode.as_ref().map(|m| m.span()))?;
                let Some(table) = &raw.members else {
                    return Err(self.at(
                        span,
                        format!(
                            "input {name:?} of kind {kind} needs [input.members]: member path = {{ path, mode }}"
                        ),
                    ));
                };
                if table.get_ref().is_empty() {
                    return Err(self.at(table.span(), "members is empty: name what to take"));
                }
                let mut targets: BTreeMap<RelPath, &Spanned<String>> = BTreeMap::new();
                for (member, target) in table.get_ref() {
                    let to = self.rel_path(&target.path)?;
                    if let Some(other) = targets.insert(to.clone(), member) {
                        return Err(self.at(
                            target.path.span(),
                            format!(
                                "members {:?} and {:?} both go to {to}",
                                other.get_ref(),
                                member.get_ref()
                            ),
                        ));
                    }
                    let from = self.rel_path(member)?;
                    let target = Target {
                        path: to,
                        mode: self.mode(&target.mode)?,
                    };
                    if let Some(parent) = members.keys().find(|m: &&RelPath| {
                        from.ancestors().contains(m) || m.ancestors().contains(&from)
                    }) {
                        return Err(self.at(
                            member.span(),
                            format!(
                                "members {parent} and {from} are a file and a path under it: a member is a file, so nothing lies under it"
                            ),
                        ));
                    }
                    if members.insert(from, target).is_some() {
                        return Err(self.at(
                            member.span(),
                            format!("member {:?} is listed twice", member.get_ref()),
                        ));
                    }
                }
            }
            Kind::Image => {
                present("path", raw.path.as_ref().map(|p| p.span()))?;
                present("mode", raw.mode.as_ref().map(|m| m.span()))?;
                present("members", raw.members.as_ref().map(|m| m.span()))?;
                present("signature", raw.signature.as_ref().map(|s| s.span()))?;
            }
        }
        let signature = match raw.signature {
            None => None,
            Some(sig) => Some(self.signature(sig, version)?),
        };
        let when = match &raw.when {
            None => None,
            Some(w) => Some(When::parse(w.get_ref()).map_err(|m| self.at(w.span(), m))?),
        };
        Ok(Input {
            name: name.clone(),
            adapter: adapter.to_owned(),
            dir: self.path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            at: self.location(&span),
            version: version.clone(),
            url_template: raw.url.into_inner(),
            kind,
            file,
            members,
            signature,
            when,
        })
    }

    fn signature(&self, sig: Spanned<RawSignature>, version: &str) -> Result<Signature> {
        let span = sig.span();
        let sig = sig.into_inner();
        let url = sig.url.get_ref().replace("{version}", version);
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains(['?', '#'])
        {
            return Err(self.at(
                sig.url.span(),
                format!(
                    "signature url {url:?} must be an http(s):// URL without query or fragment"
                ),
            ));
        }
        match sig.kind.get_ref() {
            SignatureKind::Checksums => match sig.fingerprint {
                Some(f) => Err(self.at(
                    f.span(),
                    "a checksums signature has no fingerprint (only openpgp does)",
                )),
                None => Ok(Signature::Checksums { url }),
            },
            SignatureKind::Openpgp => {
                let Some(f) = sig.fingerprint else {
                    return Err(self.at(
                        span,
                        "an openpgp signature needs `fingerprint`: the signing key's 40 hex digits",
                    ));
                };
                let fingerprint: String = f
                    .get_ref()
                    .chars()
                    .filter(|c| *c != ' ')
                    .collect::<String>()
                    .to_ascii_uppercase();
                if fingerprint.len() != 40 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(self.at(
                        f.span(),
                        format!(
                            "fingerprint {:?} must be the key's full fingerprint: 40 hex digits",
                            f.get_ref()
                        ),
                    ));
                }
                Ok(Signature::OpenPgp { url, fingerprint })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(text: &str) -> Result<Vec<Input>> {
        parse(Path::new("adapters/x/adapter.toml"), text, "x")
    }

    #[test]
    fn a_deb_input_with_members_and_signature() {
        let inputs = parse_one(
            "description = \"ignored here\"\n[[service]]\nname = \"s\"\n\
             [[input]]\nname = \"monad\"\nversion = \"0.16.2\"\n\
             url = \"https://h/monad_{version}_amd64.deb\"\nkind = \"deb\"\n\
             when = \"chain == mainnet\"\n\
             [input.members]\n\"./usr/local/bin/monad-node\" = { path = \"usr/bin/monad-node\", mode = 0o755 }\n\
             [input.signature]\nkind = \"openpgp\"\nurl = \"https://h/monad_{version}.deb.asc\"\n\
             fingerprint = \"50fb7cc55b2e8afa59fe03b7aa5ed56a7fbf253e\"\n",
        )
        .unwrap();
        assert_eq!(inputs.len(), 1);
        let i = &inputs[0];
        assert_eq!(i.url(), "https://h/monad_0.16.2_amd64.deb");
        assert_eq!(i.at, "adapters/x/adapter.toml:4:1");
        let member = RelPath::new("usr/local/bin/monad-node").unwrap();
        assert_eq!(i.members[&member].path.as_str(), "usr/bin/monad-node");
        assert_eq!(i.members[&member].mode, 0o755);
        assert_eq!(
            i.signature,
            Some(Signature::OpenPgp {
                url: "https://h/monad_0.16.2.deb.asc".into(),
                fingerprint: "50FB7CC55B2E8AFA59FE03B7AA5ED56A7FBF253E".into()
            })
        );
        let when = i.when.as_ref().unwrap();
        assert!(when.holds(|p| (p == "chain").then(|| "mainnet".to_owned())));
        assert!(!when.holds(|_| Some("testnet".to_owned())));
    }

    #[test]
    fn refusals_name_line_and_column() {
        let head = "[[input]]\nname = \"a\"\nversion = \"1\"\n";
        let cases = [
            (
                "url = \"https://h/a\"\nkind = \"file\"\npath = \"usr/bin/a\"\nmode = 0o755\nsurprise = 1\n",
                "adapter.toml:8:1: unknown field `surprise`",
            ),
            (
                "url = \"https://h/a\"\nkind = \"file\"\npath = \"../a\"\nmode = 0o755\n",
                "adapter.toml:6:8: \"../a\" has a `..` component",
            ),
            (
                "url = \"https://h/a\"\nkind = \"tar\"\npath = \"a\"\n",
                "adapter.toml:6:8: `path` does not apply to an input of kind tar",
            ),
            (
                "url = \"ftp://h/a\"\nkind = \"file\"\npath = \"a\"\nmode = 0o755\n",
                "adapter.toml:4:7: url \"ftp://h/a\" must be an http(s):// URL",
            ),
            (
                "url = \"https://h/a\"\nkind = \"file\"\npath = \"a\"\nmode = 0o755\nwhen = \"x = y\"\n",
                "adapter.toml:8:8: when \"x = y\" must read",
            ),
            (
                "url = \"https://h/a\"\nkind = \"file\"\npath = \"a\"\nmode = 0o755\n\
                 [input.signature]\nkind = \"openpgp\"\nurl = \"https://h/a.asc\"\nfingerprint = \"ABC\"\n",
                "adapter.toml:11:15: fingerprint \"ABC\" must be the key's full fingerprint",
            ),
            (
                "url = \"https://h/a\"\nkind = \"tar\"\n[input.members]\n\"a\" = { path = \"x\", mode = 0o755 }\n\"b\" = { path = \"x\", mode = 0o755 }\n",
                "adapter.toml:8:16: members \"a\" and \"b\" both go to x",
            ),
            (
                "url = \"https://h/a\"\nkind = \"tar\"\n[input.members]\n\"a\" = { path = \"x\", mode = 0o755 }\n\"a/b\" = { path = \"y\", mode = 0o755 }\n",
                "members a and a/b are a file and a path under it",
            ),
            (
                "url = \"docker.io/a/b:1\"\nkind = \"image\"\n[input.signature]\nkind = \"checksums\"\nurl = \"https://h/s\"\n",
                "`signature` does not apply to an input of kind image",
            ),
        ];
        for (rest, want) in cases {
            let err = parse_one(&format!("{head}{rest}")).unwrap_err().to_string();
            assert!(err.contains(want), "{rest}\n{err}");
        }
    }

    #[test]
    fn two_inputs_with_one_name_are_refused() {
        let one = "[[input]]\nname = \"a\"\nversion = \"1\"\nurl = \"https://h/a\"\nkind = \"file\"\npath = \"a\"\nmode = 0o755\n";
        let err = parse_one(&format!("{one}{one}")).unwrap_err().to_string();
        assert!(
            err.contains(
                "adapter.toml:8:1: input \"a\" is already declared at adapters/x/adapter.toml:1:1"
            ),
            "{err}"
        );
    }
}
