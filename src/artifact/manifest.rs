//! The manifest (`<name>.manifest.json`): what the artifact must contain,
//! entry by entry, with provenance and digests. Written as canonical JSON
//! (sorted keys, compact, one trailing newline) so equal inputs give equal
//! bytes; parsed strictly (unknown fields and bad paths are refused).

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::artifact::archive::{Digests, Format, Summary};
use crate::artifact::pieces::{Pieces, PiecesError};
use crate::compose::adapter::AdapterFacts;
use crate::compose::profile::Profile;
use crate::model::{Kind, PackedTree, RelPath};
use crate::trust::digest::Sha256;

pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
// Fields of every manifest type are declared in sorted order: serde writes
// them in declaration order, which makes the output canonical without an
// intermediate `serde_json::Value` (a test keeps the two in step).
pub struct Manifest {
    pub archive: ArchiveInfo,
    pub entries: Vec<ManifestEntry>,
    /// Pinned upstream inputs the adapters took files from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputInfo>,
    pub layers: Vec<LayerInfo>,
    pub name: String,
    /// Debian packages the host OS must carry (checked by `status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prerequisites: Vec<String>,
    pub profile_sha256: Sha256,
    pub schema: u32,
    /// Paths the host must provide (keys, passwords, JWT secrets): never
    /// part of the artifact, checked by `status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretSlot>,
    /// Every systemd service the adapters render, with its role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceInfo>,
    pub source_date_epoch: u64,
    pub version: String,
}

/// A pinned upstream input, as built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputInfo {
    /// `file`, `tar`, `deb` or `image`.
    pub kind: String,
    /// The adapter that declares it.
    pub layer: String,
    pub name: String,
    /// The downloaded asset's sha256 (for `image`: the image digest).
    pub sha256: Sha256,
    /// The upstream URL (or image reference), as locked.
    pub url: String,
    pub version: String,
}

/// A secret slot: a path the operator provides on each host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSlot {
    pub description: String,
    pub group: String,
    /// `dir` for a directory the host fills; a regular file otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The adapter that declares it.
    pub layer: String,
    #[serde(with = "octal")]
    pub mode: u32,
    pub name: String,
    pub owner: String,
    /// Absolute path on the host.
    pub path: String,
    /// The units that consume it (each refuses to start without it).
    pub units: Vec<String>,
}

/// A systemd service of the release and its role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInfo {
    /// The adapter that declares it.
    pub layer: String,
    /// `signer` (signs with validator keys: never two releases' signers at
    /// once) or `service`.
    pub role: String,
    /// The unit's name, e.g. `monad-bft.service`.
    pub unit: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    /// How many entries of the composed tree come from this layer.
    pub entries: u64,
    /// As the profile names it.
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveInfo {
    pub format: String,
    /// The compressed artifact.
    pub sha256: Sha256,
    pub size: u64,
    /// The uncompressed tar stream (stable across zstd versions).
    pub tar_sha256: Sha256,
    pub tar_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    File,
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub gid: u32,
    /// The pinned input a file was taken from (its provenance within its
    /// layer, the adapter that declares the input).
    /// Shared (`Arc`): a release has a handful of inputs and layers, and
    /// `EntryReader` gives every entry of one the same string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Arc<str>>,
    pub layer: Arc<str>,
    /// Octal permission bits, like "0644".
    #[serde(with = "octal")]
    pub mode: u32,
    pub path: RelPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub uid: u32,
}

mod octal {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        crate::trust::digest::deserialize_str(
            d,
            "four octal digits",
            |s| match u32::from_str_radix(s, 8) {
                Ok(m) if m <= 0o7777 && s.len() == 4 => Ok(m),
                _ => Err(format!("bad mode {s:?}: want four octal digits")),
            },
        )
    }
}

impl Manifest {
    /// The manifest of `tree` as archived with `summary`, without its
    /// entries: `entries` makes them one at a time, and
    /// `write_canonical_json_streamed` writes them in their place, so that
    /// a large tree's manifest is never held in memory.
    pub fn new(
        profile: &Profile,
        version: &str,
        source_date_epoch: u64,
        format: Format,
        tree: &PackedTree,
        summary: &Summary,
        adapters: &AdapterFacts,
    ) -> Manifest {
        let layers = profile
            .layers
            .iter()
            .chain(&profile.adapters)
            .map(|l| LayerInfo {
                name: l.name.clone(),
                entries: tree.entries_of(&l.name) as u64,
            })
            .collect();
        Manifest {
            schema: SCHEMA,
            name: profile.name.clone(),
            version: version.to_owned(),
            source_date_epoch,
            inputs: adapters
                .inputs
                .iter()
                .map(|i| InputInfo {
                    kind: i.kind.clone(),
                    layer: i.layer.clone(),
                    name: i.name.clone(),
                    sha256: i.sha256,
                    url: i.url.clone(),
                    version: i.version.clone(),
                })
                .collect(),
            prerequisites: adapters.prerequisites.clone(),
            secrets: adapters
                .secrets
                .iter()
                .map(|s| SecretSlot {
                    description: s.description.clone(),
                    group: s.group.clone(),
                    kind: (s.kind != "file").then(|| s.kind.clone()),
                    layer: s.layer.clone(),
                    mode: s.mode,
                    name: s.name.clone(),
                    owner: s.owner.clone(),
                    path: s.path.clone(),
                    units: s.units.clone(),
                })
                .collect(),
            services: adapters
                .services
                .iter()
                .map(|s| ServiceInfo {
                    layer: s.layer.clone(),
                    role: s.role.as_str().to_owned(),
                    unit: s.unit.clone(),
                })
                .collect(),
            profile_sha256: profile.digest,
            layers,
            archive: ArchiveInfo {
                format: format.extension().to_owned(),
                sha256: summary.sha256,
                size: summary.size,
                tar_sha256: summary.tar_sha256,
                tar_size: summary.tar_size,
            },
            entries: Vec::new(),
        }
    }

    /// The manifest entries of `tree`, in order, with the digests its files
    /// had as they were archived (`Summary::files`).
    pub fn entries<'t>(
        tree: &'t PackedTree,
        digests: &'t Digests,
    ) -> impl Iterator<Item = crate::Result<ManifestEntry>> + 't {
        let mut digests = digests.iter();
        tree.iter()
            .map(move |item| -> crate::Result<ManifestEntry> {
                let (path, e) = item?;
                let input = match &e.kind {
                    Kind::File {
                        source: crate::model::Source::Input(taken),
                        ..
                    } => Some(Arc::clone(&taken.input)),
                    _ => None,
                };
                let (kind, size, sha256, target) = match e.kind {
                    Kind::Dir => (EntryType::Dir, None, None, None),
                    Kind::File { size, .. } => (
                        EntryType::File,
                        Some(size),
                        digests.next().transpose()?,
                        None,
                    ),
                    Kind::Symlink { target } => (EntryType::Symlink, None, None, Some(target)),
                };
                Ok(ManifestEntry {
                    input,
                    path,
                    kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    size,
                    sha256,
                    target,
                    layer: Arc::clone(&e.layer),
                })
            })
    }

    /// Canonical JSON: keys sorted at every level, no insignificant
    /// whitespace, one trailing newline.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_canonical_json(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }

    /// Streams the canonical JSON to `w` (no whole-manifest buffer).
    pub fn write_canonical_json<W: std::io::Write>(&self, mut w: W) -> std::io::Result<()> {
        serde_json::to_writer(&mut w, self).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    }

    /// Streams the canonical JSON of this manifest with `entries` as its
    /// entries, serialised one at a time: the same bytes as
    /// `write_canonical_json` of the manifest holding them (a test keeps the
    /// two in step). Returns how many entries were written. The manifest
    /// itself must hold none.
    /// An entry that cannot be made is its error; a write's names `path`.
    pub fn write_canonical_json_streamed<W: std::io::Write>(
        &self,
        entries: impl Iterator<Item = crate::Result<ManifestEntry>>,
        mut w: W,
        path: &Path,
    ) -> crate::Result<u64> {
        let failed = |e| crate::Error::io(path, "writing manifest")(e);
        // Written without entries, the manifest has `"entries":[]` right
        // after its `archive` object (keys are in order): the entries go
        // between the brackets.
        const EMPTY: &[u8] = b"},\"entries\":[]";
        let head = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .map_err(&failed)?;
        let at = match memchr::memmem::find(&head, EMPTY) {
            Some(at) if self.entries.is_empty() => at + EMPTY.len() - 1,
            _ => {
                return Err(failed(std::io::Error::other(
                    "a manifest streamed with its entries must hold none itself",
                )));
            }
        };
        w.write_all(&head[..at]).map_err(&failed)?;
        let mut count = 0u64;
        for entry in entries {
            let entry = entry?;
            if count > 0 {
                w.write_all(b",").map_err(&failed)?;
            }
            serde_json::to_writer(&mut w, &entry)
                .map_err(std::io::Error::other)
                .map_err(&failed)?;
            count += 1;
        }
        w.write_all(&head[at..]).map_err(&failed)?;
        w.write_all(b"\n").map_err(&failed)?;
        Ok(count)
    }

    /// The entry at `path`, found by bisection: the entries are sorted
    /// (`EntryCheck`, whenever a manifest is read).
    pub fn entry(&self, path: &RelPath) -> Option<&ManifestEntry> {
        let at = self.entries.binary_search_by(|e| e.path.cmp(path)).ok()?;
        self.entries.get(at)
    }

    /// Whether the release has an entry at `path` (see `entry`).
    pub fn has(&self, path: &RelPath) -> bool {
        self.entry(path).is_some()
    }

    /// Parses manifest bytes; the error says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        Manifest::checked(serde_json::from_slice(bytes).map_err(|e| e.to_string())?)
    }

    /// Parses a manifest as it is read from `from` (to its end, at most
    /// `max` bytes), a piece at a time (`EntryReader`), without holding its
    /// bytes; also gives their SHA-256. A failed read, or more than `max`
    /// bytes, is the outer error, a malformed manifest the inner one.
    /// `entries`: whether to parse and keep the entries too, or only to
    /// split them off (the head alone is parsed). Kept, they are counted
    /// first, so that their list is allocated once at its size (grown by
    /// doubling, it would peak at half as much again).
    pub fn read(
        mut from: &std::fs::File,
        max: u64,
        entries: bool,
    ) -> std::io::Result<(Result<Manifest, String>, Sha256)> {
        let mut count = 0usize;
        if entries {
            let mut pieces = Pieces::new(&mut from, max, false);
            // A hint only: the second read reports what is wrong, if anything.
            while let Ok(Some(_)) = pieces.next_entry() {
                count += 1;
            }
            std::io::Seek::rewind(&mut from)?;
        }
        let mut reader = EntryReader::new(from, max, true);
        // At most a million ahead, as `verify::bind` allows.
        let mut kept = Vec::with_capacity(count.min(1 << 20));
        let parsed = reader
            .read_all(entries.then_some(&mut kept))
            .map_err(|e| match e {
                PiecesError::Io(e) => e,
                PiecesError::TooLarge(max) => too_large(max),
                PiecesError::Malformed(m) => std::io::Error::other(m),
            })?;
        let read = reader.finish();
        let Some(digest) = read.sha256 else {
            return Err(std::io::Error::other("the manifest was not hashed"));
        };
        let manifest = parsed.and_then(|()| {
            let mut m = Manifest::parse_head(&read.head)?;
            m.entries = kept;
            Ok(m)
        });
        Ok((manifest, digest))
    }

    /// What the types cannot say: the schema, the format, the order of the
    /// entries and the fields each kind has.
    fn checked(mut m: Manifest) -> Result<Manifest, String> {
        // Parsing grew the list by doubling: give the slack back, it lives
        // as long as the command (a third of a large manifest's memory).
        m.entries.shrink_to_fit();
        m.check_head()?;
        let mut order = EntryCheck::default();
        m.entries.iter().try_for_each(|e| order.check(e))?;
        Ok(m)
    }

    /// Parses the head `Pieces` kept (the manifest with `"entries":[]`)
    /// and checks it; the entries are `EntryReader`'s.
    pub fn parse_head(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        m.check_head()?;
        Ok(m)
    }

    /// The checks `checked` makes of everything but the entries.
    fn check_head(&self) -> Result<(), String> {
        if self.schema != SCHEMA {
            return Err(format!(
                "schema {} is not supported (want {SCHEMA})",
                self.schema
            ));
        }
        if Format::parse(&self.archive.format).is_none() {
            return Err(format!("unknown archive format {:?}", self.archive.format));
        }
        Ok(())
    }

    /// The artifact's file name: `<name>.<format>`.
    pub fn artifact_file_name(&self) -> String {
        format!("{}.{}", self.name, self.archive.format)
    }
}

/// What a signature's trusted comment binds: the artifact's name and
/// version and the manifest's digest, as
/// `name:<name> version:<version> manifest-sha256:<hex>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub version: String,
    pub manifest_sha256: Sha256,
}

impl Binding {
    pub fn to_comment(&self) -> String {
        format!(
            "name:{} version:{} manifest-sha256:{}",
            self.name, self.version, self.manifest_sha256
        )
    }

    /// Parses a trusted comment exactly as `to_comment` writes it.
    pub fn parse(comment: &str) -> Result<Binding, String> {
        let fields: Vec<&str> = comment.split(' ').collect();
        let [name, version, digest] = fields[..] else {
            return Err(format!("{comment:?} is not an infrakit trusted comment"));
        };
        let get = |field: &str, key: &str| {
            field
                .strip_prefix(key)
                .map(str::to_owned)
                .ok_or_else(|| format!("{comment:?} lacks {key}"))
        };
        Ok(Binding {
            name: get(name, "name:")?,
            version: get(version, "version:")?,
            manifest_sha256: get(digest, "manifest-sha256:")?.parse()?,
        })
    }
}

fn too_large(max: u64) -> std::io::Error {
    std::io::Error::other(format!("larger than {max} bytes"))
}

/// The checks of each entry in turn: the order the archive is written in,
/// strictly (no duplicates), and the fields each kind has.
#[derive(Default)]
pub struct EntryCheck {
    last: Option<RelPath>,
}

impl EntryCheck {
    pub fn check(&mut self, e: &ManifestEntry) -> Result<(), String> {
        if let Some(last) = &self.last
            && *last >= e.path
        {
            return Err(format!(
                "entry {} comes after {last}: entries must be sorted and unique",
                e.path
            ));
        }
        self.last = Some(e.path.clone());
        let fields = (e.size.is_some(), e.sha256.is_some(), e.target.is_some());
        let ok = match e.kind {
            EntryType::Dir => fields == (false, false, false),
            EntryType::File => fields == (true, true, false),
            EntryType::Symlink => fields == (false, false, true),
        };
        if !ok {
            return Err(format!(
                "entry {} has the wrong fields for a {:?} (files: size and sha256; symlinks: target; directories: neither)",
                e.path, e.kind
            ));
        }
        // A tar link name ends at its first NUL: such a target would
        // read differently elsewhere, and infrakit never builds one.
        if let Some(target) = &e.target
            && (target.is_empty() || target.contains('\0'))
        {
            return Err(format!(
                "entry {}: symlink target {target:?} is empty or holds a NUL byte",
                e.path
            ));
        }
        Ok(())
    }
}

/// A manifest's entries parsed and checked one at a time as it is read
/// (`Pieces`), without holding the file or the list.
pub struct EntryReader<R> {
    pieces: Pieces<R>,
    check: EntryCheck,
    /// The layer and input names seen, each held once (at most `SHARED`).
    shared: Vec<Arc<str>>,
}

/// What `EntryReader::finish` gives: the head (`Manifest::parse_head`),
/// the file's SHA-256 (if it was hashed) and size, and how many entries it
/// holds.
pub struct Read {
    pub head: Vec<u8>,
    pub sha256: Option<Sha256>,
    pub size: u64,
    pub entries: u64,
}

impl<R: std::io::Read> EntryReader<R> {
    /// Reads at most `max` bytes; `hash`: whether to hash them.
    pub fn new(from: R, max: u64, hash: bool) -> EntryReader<R> {
        EntryReader {
            pieces: Pieces::new(from, max, hash),
            check: EntryCheck::default(),
            shared: Vec::new(),
        }
    }

    /// The next entry, parsed and checked; `None` at the end of the file.
    pub fn next_entry(&mut self) -> Result<Option<ManifestEntry>, PiecesError> {
        let Some(bytes) = self.pieces.next_entry()? else {
            return Ok(None);
        };
        let mut entry: ManifestEntry = serde_json::from_slice(bytes).map_err(|e| {
            let at = match &self.check.last {
                Some(last) => format!("the entry after {last}"),
                None => "the first entry".to_owned(),
            };
            PiecesError::Malformed(format!("{at}: {e}"))
        })?;
        self.check.check(&entry).map_err(PiecesError::Malformed)?;
        self.share(&mut entry.layer);
        if let Some(input) = &mut entry.input {
            self.share(input);
        }
        Ok(Some(entry))
    }

    /// Replaces `name` with the same name seen before, if it was.
    fn share(&mut self, name: &mut Arc<str>) {
        /// Names kept for sharing: a release has a few layers and inputs.
        const SHARED: usize = 64;
        match self.shared.iter().find(|s| ***s == **name) {
            Some(seen) => *name = Arc::clone(seen),
            None if self.shared.len() < SHARED => self.shared.push(Arc::clone(name)),
            None => {}
        }
    }

    /// Reads the file to its end: each entry parsed, checked and pushed to
    /// `keep`, or, without `keep`, skipped unparsed. A malformed manifest
    /// is the inner error, read on to its end all the same (so `finish`
    /// gives the whole file's digest, and one too large is `TooLarge`);
    /// reading errors and `TooLarge` are the outer one.
    pub fn read_all(
        &mut self,
        mut keep: Option<&mut Vec<ManifestEntry>>,
    ) -> Result<Result<(), String>, PiecesError> {
        let split = loop {
            let next = match keep.as_deref_mut() {
                Some(entries) => self.next_entry().map(|e| e.map(|e| entries.push(e))),
                None => self.pieces.next_entry().map(|e| e.map(|_| ())),
            };
            match next {
                Ok(Some(())) => {}
                Ok(None) => return Ok(Ok(())),
                Err(PiecesError::Malformed(m)) => break m,
                Err(e) => return Err(e),
            }
        };
        match self.pieces.drain() {
            Ok(()) | Err(PiecesError::Malformed(_)) => Ok(Err(split)),
            Err(e) => Err(e),
        }
    }

    /// The entries of a manifest read before, read again: each checked as
    /// `next_entry` checks it, then, at the end, an error unless the file
    /// still has the digest `want` (hashed: `new(.., true)`). `error` makes
    /// the errors: of the reading, or `None` for a changed digest.
    pub fn rechecked<E>(
        mut self,
        want: Sha256,
        error: impl Fn(Option<PiecesError>) -> E,
    ) -> impl Iterator<Item = Result<ManifestEntry, E>> {
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            done = true;
            match self.next_entry() {
                Ok(Some(entry)) => {
                    done = false;
                    Some(Ok(entry))
                }
                Ok(None) => (self.finish().sha256 != Some(want)).then(|| Err(error(None))),
                Err(e) => Some(Err(error(Some(e)))),
            }
        })
    }

    /// Once `next_entry` gave `None`: see `Read`.
    pub fn finish(&mut self) -> Read {
        let (head, sha256, size, entries) = self.pieces.finish();
        Read {
            head,
            sha256,
            size,
            entries,
        }
    }
}

/// `<name>.manifest.json`.
pub fn file_name(name: &str) -> String {
    format!("{name}.manifest.json")
}

/// A small valid manifest (release `n` 1.0.0, one file), for tests.
#[cfg(test)]
impl Manifest {
    pub(crate) fn sample() -> Manifest {
        let entry = ManifestEntry {
            input: None,
            path: RelPath::new("etc/motd").unwrap(),
            kind: EntryType::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: Some(3),
            sha256: Some(Sha256::of(b"hi\n")),
            target: None,
            layer: "base".into(),
        };
        Manifest {
            schema: SCHEMA,
            name: "n".into(),
            version: "1.0.0".into(),
            source_date_epoch: 0,
            inputs: Vec::new(),
            prerequisites: Vec::new(),
            secrets: Vec::new(),
            services: Vec::new(),
            profile_sha256: Sha256::of(b""),
            layers: vec![LayerInfo {
                name: "base".into(),
                entries: 1,
            }],
            archive: ArchiveInfo {
                format: "tar.zst".into(),
                sha256: Sha256::of(b"a"),
                size: 1,
                tar_sha256: Sha256::of(b"t"),
                tar_size: 2,
            },
            entries: vec![entry],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_round_trips() {
        let m = Manifest::sample();
        let json = m.to_canonical_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.starts_with("{\"archive\":{\"format\":\"tar.zst\",\"sha256\""),
            "{text}"
        );
        assert!(text.contains("\"mode\":\"0644\""));
        assert!(text.ends_with("}\n") && !text.contains(": "));
        assert_eq!(Manifest::parse(&json).unwrap(), m);
        // Declaration order is the canonical order: the same bytes as a
        // sorted-key `serde_json::Value` (whose maps are BTreeMaps).
        let value = serde_json::to_value(&m).unwrap();
        let mut sorted = serde_json::to_vec(&value).unwrap();
        sorted.push(b'\n');
        assert_eq!(json, sorted);

        // Entries out of order or twice, or with another kind's fields: refused.
        let mut dup = m.clone();
        dup.entries.push(dup.entries[0].clone());
        let err = Manifest::parse(&dup.to_canonical_json()).unwrap_err();
        assert!(err.contains("sorted and unique"), "{err}");
        let mut odd = m.clone();
        odd.entries[0].target = Some("x".into());
        let err = Manifest::parse(&odd.to_canonical_json()).unwrap_err();
        assert!(err.contains("wrong fields"), "{err}");
        let mut bare = m;
        bare.entries[0].kind = EntryType::Symlink;
        bare.entries[0].size = None;
        bare.entries[0].sha256 = None;
        let err = Manifest::parse(&bare.to_canonical_json()).unwrap_err();
        assert!(err.contains("wrong fields"), "{err}");
        // Symlink targets a tar link name cannot hold whole: refused.
        let mut link = bare;
        for (target, ok) in [("motd", true), ("", false), ("motd\0../../x", false)] {
            link.entries[0].target = Some(target.into());
            let parsed = Manifest::parse(&link.to_canonical_json());
            assert_eq!(parsed.is_ok(), ok, "{target:?}: {parsed:?}");
        }
    }

    #[test]
    fn read_gives_the_whole_manifest_or_its_head_and_bisection_finds_entries() {
        let entry = |path: &str| ManifestEntry {
            path: RelPath::new(path).unwrap(),
            ..Manifest::sample().entries[0].clone()
        };
        // Component order: `a/c` before `a-b`, which sorts first bytewise.
        let m = Manifest {
            entries: ["a/b", "a/c", "a-b", "b", "d/e", "z"].map(entry).to_vec(),
            ..Manifest::sample()
        };
        let json = m.to_canonical_json();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &json).unwrap();
        for whole in [true, false] {
            std::io::Seek::rewind(&mut file).unwrap();
            let (read, sha256) = Manifest::read(&file, 1 << 20, whole).unwrap();
            let want = Manifest {
                entries: if whole { m.entries.clone() } else { Vec::new() },
                ..m.clone()
            };
            assert_eq!((read.unwrap(), sha256), (want, Sha256::of(&json)));
        }
        // Cut short: refused either way, and the digest is of what was read.
        let mut cut = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut cut, &json[..json.len() / 2]).unwrap();
        for whole in [true, false] {
            std::io::Seek::rewind(&mut cut).unwrap();
            let (read, sha256) = Manifest::read(&cut, 1 << 20, whole).unwrap();
            assert!(read.unwrap_err().contains("cut short"));
            assert_eq!(sha256, Sha256::of(&json[..json.len() / 2]));
        }
        for e in &m.entries {
            assert_eq!(m.entry(&e.path), Some(e));
        }
        for absent in ["a", "a/d", "c", "zz"] {
            assert!(!m.has(&RelPath::new(absent).unwrap()), "{absent}");
        }
    }

    #[test]
    fn streamed_entries_give_the_bytes_of_the_whole_manifest() {
        let mut m = Manifest::sample();
        let second = ManifestEntry {
            path: RelPath::new("etc/tricky").unwrap(),
            kind: EntryType::Symlink,
            size: None,
            sha256: None,
            // Text like the splice point, inside a string.
            target: Some("},\"entries\":[]".into()),
            ..m.entries[0].clone()
        };
        m.entries.push(second);
        m.name = "},\"entries\":[]".into();
        m.archive.format = "},\"entries\":[]".into();
        for n in 0..=m.entries.len() {
            let whole = Manifest {
                entries: m.entries[..n].to_vec(),
                ..m.clone()
            };
            let head = Manifest {
                entries: Vec::new(),
                ..m.clone()
            };
            let mut streamed = Vec::new();
            let count = head
                .write_canonical_json_streamed(
                    whole.entries.clone().into_iter().map(Ok),
                    &mut streamed,
                    Path::new("m.json"),
                )
                .unwrap();
            assert_eq!(count, n as u64);
            assert_eq!(
                String::from_utf8(streamed).unwrap(),
                String::from_utf8(whole.to_canonical_json()).unwrap()
            );
        }
        // A manifest that holds entries itself is not streamed into.
        let err = m
            .write_canonical_json_streamed(std::iter::empty(), Vec::new(), Path::new("m.json"))
            .unwrap_err();
        assert!(err.to_string().contains("must hold none"), "{err}");
    }

    #[test]
    fn binding_round_trips_and_is_strict() {
        let b = Binding {
            name: "base".into(),
            version: "1.2.3".into(),
            manifest_sha256: Sha256::of(b"m"),
        };
        assert_eq!(Binding::parse(&b.to_comment()), Ok(b.clone()));
        assert!(Binding::parse(&b.to_comment().replace(' ', "  ")).is_err());
        assert!(Binding::parse(&format!("{} extra:1", b.to_comment())).is_err());
        assert!(Binding::parse(&b.to_comment().to_uppercase()).is_err());
    }

    #[test]
    fn parse_refuses_escaping_paths_and_unknown_fields() {
        let good = r#"{"gid":0,"layer":"b","mode":"0644","path":"PATH","type":"dir","uid":0}"#;
        for bad in ["../etc", "/etc", "a//b", "a/"] {
            let e = good.replace("PATH", bad);
            assert!(serde_json::from_str::<ManifestEntry>(&e).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<ManifestEntry>(&good.replace("PATH", "etc")).is_ok());
        let extra = good.replace("PATH", "etc").replace("{", "{\"x\":1,");
        assert!(serde_json::from_str::<ManifestEntry>(&extra).is_err());
    }

    /// `bytes` read a piece at a time by `EntryReader`, `step` bytes a read,
    /// put together again.
    fn read_in_pieces(bytes: &[u8], step: usize) -> Result<Manifest, String> {
        struct Slow<'a>(&'a [u8], usize);
        impl std::io::Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut reader = EntryReader::new(Slow(bytes, step), 1 << 30, true);
        let mut entries = Vec::new();
        reader
            .read_all(Some(&mut entries))
            .map_err(|e| format!("{e:?}"))??;
        let read = reader.finish();
        assert_eq!(read.sha256, Some(Sha256::of(bytes)));
        assert_eq!(read.size, bytes.len() as u64);
        assert_eq!(read.entries, entries.len() as u64);
        let mut m = Manifest::parse_head(&read.head)?;
        m.entries = entries;
        Ok(m)
    }

    /// A manifest whose strings hold what a careless scanner would take
    /// for structure.
    fn tricky() -> Manifest {
        let mut m = Manifest::sample();
        m.name = "n\"],\"entries\":[{".into();
        let mut names = ["a", "a/]b{\"", "a/]b{\"/c\\", "a/b", "a/entries"];
        names.sort_by_key(|n| RelPath::new(n).unwrap());
        m.entries = names
            .iter()
            .map(|p| ManifestEntry {
                path: RelPath::new(p).unwrap(),
                kind: EntryType::Symlink,
                size: None,
                sha256: None,
                target: Some("\\\"]}".into()),
                layer: "\\".into(),
                ..m.entries[0].clone()
            })
            .collect();
        m
    }

    #[test]
    fn entries_read_in_pieces_are_the_whole_manifest() {
        for m in [Manifest::sample(), tricky()] {
            let canonical = m.to_canonical_json();
            let pretty = serde_json::to_vec_pretty(&m).unwrap();
            for bytes in [&canonical, &pretty] {
                assert_eq!(Manifest::parse(bytes).unwrap(), m);
                for step in [1, 2, 3, 7, 64, 1 << 20] {
                    assert_eq!(read_in_pieces(bytes, step).unwrap(), m, "step {step}");
                }
            }
        }
        // Every entry of a layer shares one name.
        let read = read_in_pieces(&tricky().to_canonical_json(), 64).unwrap();
        let first = &read.entries[0].layer;
        assert!(read.entries.iter().all(|e| Arc::ptr_eq(&e.layer, first)));
        let mut none = Manifest::sample();
        none.entries.clear();
        assert_eq!(read_in_pieces(&none.to_canonical_json(), 5).unwrap(), none);
    }

    #[test]
    fn pieces_refuse_what_the_whole_parse_refuses() {
        let good = String::from_utf8(tricky().to_canonical_json()).unwrap();
        let list = |s: &str| {
            let a = s.find("\"entries\":[").unwrap() + "\"entries\":".len();
            let b = s.find("],\"layers\"").unwrap() + 1;
            (a, b)
        };
        let (a, b) = list(&good);
        let one = r#"{"gid":0,"layer":"b","mode":"0755","path":"x","type":"dir","uid":0}"#;
        let with_list = |l: &str| format!("{}{l}{}", &good[..a], &good[b..]);
        // The key spelled with an escape: serde reads "entries", the pieces
        // find no list and refuse it (infrakit writes no escaped key).
        let escaped = good.replacen("\"entries\":", "\"\\u0065ntries\":", 1);
        assert_eq!(Manifest::parse(escaped.as_bytes()).unwrap(), tricky());
        assert!(read_in_pieces(escaped.as_bytes(), 4).is_err());
        let cases = [
            // Two lists.
            good.replacen(
                "\"layers\":",
                &format!("\"entries\":[{one}],\"layers\":"),
                1,
            ),
            with_list("{}"),
            with_list("[1]"),
            with_list(&format!("[{one}{one}]")),
            with_list(&format!("[{one},]")),
            with_list(&format!("[,{one}]")),
            with_list(&format!("[{one},{one}]")), // not unique
            with_list(&format!("[{}]", one.replace("\"x\"", "\"../x\""))),
            with_list("[{\"gid\":0}]"),
            with_list(&format!("[{one}")),
            good.replace('}', ""),
            format!("{good}{good}"),
        ];
        for bad in &cases {
            assert!(Manifest::parse(bad.as_bytes()).is_err(), "{bad}");
            for step in [1, 7, 1 << 20] {
                assert!(
                    read_in_pieces(bad.as_bytes(), step).is_err(),
                    "{step}: {bad}"
                );
            }
        }
        // The cases are bad for the reason given, not by accident.
        assert_eq!(
            read_in_pieces(with_list(&format!("[{one}]")).as_bytes(), 3)
                .unwrap()
                .entries
                .len(),
            1
        );
        assert!(read_in_pieces(good.as_bytes(), 3).is_ok());
    }

    #[test]
    fn pieces_stop_at_the_limit() {
        let bytes = Manifest::sample().to_canonical_json();
        let max = bytes.len() as u64 - 1;
        let mut reader = EntryReader::new(bytes.as_slice(), max, false);
        let err = loop {
            match reader.next_entry() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("read past the limit"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, PiecesError::TooLarge(m) if m == max),
            "{err:?}"
        );
        let mut reader = EntryReader::new(bytes.as_slice(), max + 1, false);
        assert!(reader.next_entry().unwrap().is_some());
        assert!(reader.next_entry().unwrap().is_none());
        assert_eq!(reader.finish().sha256, None);
    }
}
