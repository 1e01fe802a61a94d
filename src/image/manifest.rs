//! `NAME.image.json`: what an image holds, in canonical JSON (keys sorted,
//! no insignificant whitespace): every package (name, version, sha256), the
//! release artifact, the keys the host trusts, the infrakit binary, the
//! disk and each partition with its identifiers and digest, and the other
//! forms written (qcow2, zstd). The signature on `NAME.img` binds its
//! digest in the trusted comment, as for an artifact.

use serde::{Deserialize, Serialize};

use crate::trust::digest::Sha256;

pub const SCHEMA: u32 = 1;
/// The manifest's `kind`: an artifact manifest has none.
pub const KIND: &str = "disk-image";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub arch: String,
    pub artifact: ArtifactRef,
    pub cmdline: String,
    pub disk: FileRef,
    /// Other forms of the same disk: `qcow2`, `raw.zst`.
    pub forms: Vec<FileRef>,
    pub infrakit_sha256: Sha256,
    pub kind: String,
    pub name: String,
    pub packages: Vec<PackageRef>,
    pub partitions: Vec<Partition>,
    pub schema: u32,
    pub source_date_epoch: u64,
    pub suite: String,
    pub trusted_keys: Vec<String>,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    pub file: String,
    pub key_id: String,
    pub manifest_sha256: Sha256,
    pub name: String,
    pub sha256: Sha256,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub file: String,
    /// The disk's GPT GUID (for the raw disk only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    pub sha256: Sha256,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRef {
    pub name: String,
    pub sha256: Sha256,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub filesystem: String,
    /// The filesystem's UUID (ext4) or volume serial (vfat).
    pub filesystem_id: String,
    pub guid: String,
    pub name: String,
    pub number: u32,
    pub sha256: Sha256,
    pub size: u64,
    pub start: u64,
    pub type_guid: String,
}

impl ImageManifest {
    /// Canonical JSON: every struct declares its fields in sorted order.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("an image manifest serialises");
        out.push(b'\n');
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<ImageManifest, String> {
        let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.kind != KIND || m.schema != SCHEMA {
            return Err(format!(
                "kind {:?} schema {} is not an image manifest this infrakit reads ({KIND:?} schema {SCHEMA})",
                m.kind, m.schema
            ));
        }
        for f in std::iter::once(&m.disk).chain(&m.forms) {
            if f.file.contains('/') || f.file.starts_with('.') {
                return Err(format!("file name {:?} is not a plain name", f.file));
            }
        }
        Ok(m)
    }

    /// The entry for the file named `name`: the disk or another form.
    pub fn file(&self, name: &str) -> Option<&FileRef> {
        std::iter::once(&self.disk)
            .chain(&self.forms)
            .find(|f| f.file == name)
    }
}
