//! Artifacts (and manifests) given as an `http(s)://` URL to `verify`,
//! `apply`, `inspect` or `diff`: the artifact, its `.minisig` and its
//! manifest (beside it, as for local files) are streamed into a private
//! temporary directory, never into the root, and trusted no more than local
//! files: the command then checks the copies exactly as it checks a local
//! artifact. A signature or manifest the server does not have is simply
//! absent, which verification refuses. Errors about the copies name the
//! URLs they came from (`Fetched::own`), never the temporary directory.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Signatures larger than this are refused while downloading.
const SIGNATURE_MAX: u64 = 64 << 10;

/// The downloaded files; they are deleted when this is dropped.
pub struct Fetched {
    dir: tempfile::TempDir,
    /// The URL up to and including its last `/`.
    base: String,
    /// The downloaded copy of the URL's file, under the URL's file name.
    pub path: PathBuf,
}

pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

impl Fetched {
    /// `e` reworded to name the URLs the files came from instead of their
    /// temporary copies.
    pub fn own(&self, e: Error) -> Error {
        e.replace_path_prefix(&self.temp_prefix(), &self.base)
    }

    /// The URL a downloaded `path` came from (`path` itself if it is not one).
    pub fn url_of(&self, path: &Path) -> String {
        let shown = path.display().to_string();
        match shown.strip_prefix(&self.temp_prefix()) {
            Some(rest) => format!("{}{rest}", self.base),
            None => shown,
        }
    }

    fn temp_prefix(&self) -> String {
        format!("{}/", self.dir.path().display())
    }
}

/// Downloads `url`, an artifact (with the `.minisig` and manifest beside
/// it) or a `.manifest.json` alone.
pub fn fetch(url: &str) -> Result<Fetched> {
    let bad = |m: String| Error::usage(url, m);
    let (base, name) = url
        .rsplit_once('/')
        .filter(|(_, n)| !n.is_empty())
        .ok_or_else(|| bad("the URL names no file; give the artifact's own URL".into()))?;
    if name.contains(['?', '#']) {
        return Err(bad(
            "query strings and fragments are not supported: give the artifact's own URL".into(),
        ));
    }
    let stem = name
        .strip_suffix(".tar.zst")
        .or_else(|| name.strip_suffix(".tar.gz"));
    let is_manifest = name.ends_with(".manifest.json");
    if stem.is_none() && !is_manifest {
        return Err(bad(
            "the URL must end in .tar.zst, .tar.gz or .manifest.json".into(),
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("infrakit-fetch-")
        .tempdir()
        .map_err(Error::io(
            &std::env::temp_dir(),
            "creating a download directory",
        ))?;
    let fetched = Fetched {
        path: dir.path().join(name),
        dir,
        base: format!("{base}/"),
    };
    let download_all = || -> Result<()> {
        let here = fetched.dir.path();
        let Some(stem) = stem else {
            return download(
                url,
                &fetched.path,
                Some(crate::trust::verify::MANIFEST_MAX),
                true,
            );
        };
        download(url, &fetched.path, None, true)?;
        download(
            &format!("{url}.minisig"),
            &here.join(format!("{name}.minisig")),
            Some(SIGNATURE_MAX),
            false,
        )?;
        let manifest = crate::artifact::manifest::file_name(stem);
        download(
            &format!("{base}/{manifest}"),
            &here.join(&manifest),
            Some(crate::trust::verify::MANIFEST_MAX),
            false,
        )
    };
    download_all().map_err(|e| fetched.own(e))?;
    Ok(fetched)
}

/// Streams `url` into `dest`. A 404 of an optional file leaves `dest`
/// absent; anything over `limit` bytes is refused.
fn download(url: &str, dest: &Path, limit: Option<u64>, required: bool) -> Result<()> {
    let fail = |m: String| Error::usage(url, m);
    let mut response = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::StatusCode(404)) if !required => return Ok(()),
        Err(e) => return Err(fail(format!("fetching: {e}; check the URL and the server"))),
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
