//! `infrakit verify NAME.img` (or `NAME.qcow2`, `NAME.img.zst`): the
//! signature `NAME.img.minisig` by a trusted key first, then the manifest
//! `NAME.image.json` its trusted comment binds, then the file's digest and
//! size against the manifest. The raw disk is checked against the
//! signature itself; another form, whose bytes the signature does not
//! cover, through the signed comment and the manifest's digest for it.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::manifest::ImageManifest;
use crate::trust::sign::PublicKey;
use crate::trust::verify::{binding, hash_file, read_manifest, read_signature, same_release};

/// The file name's stem and whether it is the raw disk, for an image file.
fn stem(path: &Path) -> Option<(String, bool)> {
    let name = path.file_name()?.to_str()?;
    if let Some(s) = name.strip_suffix(".img") {
        return Some((s.to_owned(), true));
    }
    name.strip_suffix(".img.zst")
        .or_else(|| name.strip_suffix(".qcow2"))
        .map(|s| (s.to_owned(), false))
}

/// Whether `path` names a disk image rather than an artifact.
pub fn is_image(path: &Path) -> bool {
    stem(path).is_some()
}

fn beside(path: &Path, suffix: &str) -> PathBuf {
    let (s, _) = stem(path).unwrap_or_default();
    path.with_file_name(format!("{s}{suffix}"))
}

/// An image whose signature, manifest and digest were checked.
pub struct VerifiedImage {
    pub manifest: ImageManifest,
    pub key_id: String,
}

pub fn verify(
    path: &Path,
    keys: &[PublicKey],
    progress: &dyn Fn(u64, u64),
) -> Result<VerifiedImage> {
    if keys.is_empty() {
        return Err(Error::usage(
            "--key",
            "give at least one trusted public key",
        ));
    }
    let Some((_, raw)) = stem(path) else {
        return Err(Error::usage(
            path.display(),
            "is not NAME.img, NAME.qcow2 or NAME.img.zst",
        ));
    };
    let sig_path = beside(path, ".img.minisig");
    let manifest_path = beside(path, ".image.json");
    let file = File::open(path).map_err(Error::io(path, "opening image"))?;
    let (_, signature) = read_signature(&sig_path, "image")?;
    let manifest_bytes = read_manifest(&manifest_path)?;
    let (prehash, sha256, size) = hash_file(&file, path, progress)?;
    let key = if raw {
        signature.verify(keys, &prehash)
    } else {
        signature.verify_comment(keys)
    }
    .map_err(|m| Error::check(format!("{}: {m}", path.display())))?;
    let (claimed, _) = binding(
        &signature,
        &sig_path,
        &manifest_path,
        &crate::trust::digest::Sha256::of(&manifest_bytes),
    )?;
    let manifest = ImageManifest::parse(&manifest_bytes).map_err(|m| {
        Error::check(format!(
            "{}: signed manifest is malformed: {m}",
            manifest_path.display()
        ))
    })?;
    same_release(&claimed, &manifest.name, &manifest.version, &sig_path)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let Some(entry) = manifest.file(name) else {
        return Err(Error::check(format!(
            "{}: the signed manifest lists no file of this name: use the image under its signed name",
            path.display()
        )));
    };
    if raw != (entry.file == manifest.disk.file) {
        return Err(Error::check(format!(
            "{}: not the signed raw disk",
            path.display()
        )));
    }
    if (sha256, size) != (entry.sha256, entry.size) {
        return Err(Error::check(format!(
            "{}: image is {size} bytes with sha256 {sha256}, the manifest says {} bytes with {}",
            path.display(),
            entry.size,
            entry.sha256
        )));
    }
    Ok(VerifiedImage {
        manifest,
        key_id: key.key_id(),
    })
}
