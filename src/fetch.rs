//! Artifacts given to `apply` as an `http(s)://` URL: the artifact, its
//! `.minisig` and its manifest (beside it, as for local files) are streamed
//! into a private temporary directory, never into the root, and trusted no
//! more than local files: `apply` then verifies the copies exactly as it
//! verifies a local artifact. A signature or manifest the server does not
//! have is simply absent, which verification refuses.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Signatures larger than this are refused while downloading.
const SIGNATURE_MAX: u64 = 64 << 10;

/// The downloaded files; they are deleted when this is dropped.
pub struct Fetched {
    _dir: tempfile::TempDir,
    pub artifact: PathBuf,
}

pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// Downloads `url` and the files beside it.
pub fn fetch(url: &str) -> Result<Fetched> {
    let bad = |m: String| Error::usage(url, m);
    let (base, name) = url
        .rsplit_once('/')
        .filter(|(_, n)| !n.is_empty())
        .ok_or_else(|| bad("the URL names no file".into()))?;
    if name.contains(['?', '#']) {
        return Err(bad(
            "query strings and fragments are not supported: give the artifact's own URL".into(),
        ));
    }
    let stem = name
        .strip_suffix(".tar.zst")
        .or_else(|| name.strip_suffix(".tar.gz"))
        .ok_or_else(|| bad("the URL must end in .tar.zst or .tar.gz".into()))?;
    let dir = tempfile::Builder::new()
        .prefix("infrakit-fetch-")
        .tempdir()
        .map_err(Error::io(
            &std::env::temp_dir(),
            "creating a download directory",
        ))?;
    let artifact = dir.path().join(name);
    download(url, &artifact, None, true)?;
    download(
        &format!("{url}.minisig"),
        &dir.path().join(format!("{name}.minisig")),
        Some(SIGNATURE_MAX),
        false,
    )?;
    let manifest = crate::manifest::file_name(stem);
    download(
        &format!("{base}/{manifest}"),
        &dir.path().join(&manifest),
        Some(crate::verify::MANIFEST_MAX),
        false,
    )?;
    Ok(Fetched {
        _dir: dir,
        artifact,
    })
}

/// Streams `url` into `dest`. A 404 of an optional file leaves `dest`
/// absent; anything over `limit` bytes is refused.
fn download(url: &str, dest: &std::path::Path, limit: Option<u64>, required: bool) -> Result<()> {
    let fail = |m: String| Error::usage(url, m);
    let mut response = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::StatusCode(404)) if !required => return Ok(()),
        Err(e) => return Err(fail(format!("fetching: {e}"))),
    };
    let file = File::create(dest).map_err(Error::io(dest, "creating download"))?;
    let mut out = BufWriter::new(file);
    let max = limit.unwrap_or(u64::MAX - 1);
    let mut reader = response.body_mut().as_reader().take(max + 1);
    let copied =
        std::io::copy(&mut reader, &mut out).map_err(|e| fail(format!("downloading: {e}")))?;
    if copied > max {
        return Err(Error::check(format!("{url}: larger than {max} bytes")));
    }
    out.flush().map_err(Error::io(dest, "writing download"))?;
    Ok(())
}
