//! The content-addressed download cache (`$XDG_CACHE_HOME/infrakit/`, the
//! directory given by `cli`): `sha256/<hex>` holds a file whose SHA-256 is
//! `<hex>`, `partial/` transfers in progress, `extracted/<hex>/<input>/` members
//! taken from archives (`take`). A download streams into
//! `partial/<hex>.partial` while hashing, resumes a kept partial file with
//! an HTTP `Range` request, and is renamed to its final name only after its
//! digest matched; a file under its final name is still re-hashed before
//! use (`Cache::check`), so a tampered cache is refused, never trusted.
//! `Mirrors` rewrite URL prefixes for fetching only: callers record the
//! upstream URL.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::trust::digest::{HashingReader, Sha256};

/// `--mirror FROM=TO`: URLs starting with FROM are fetched from TO instead.
#[derive(Clone, Debug, Default)]
pub struct Mirrors(Vec<(String, String)>);

impl Mirrors {
    /// Parses `FROM=TO` items (both http(s):// URL prefixes).
    pub fn parse(items: &[String]) -> Result<Mirrors> {
        let mut out = Vec::new();
        for item in items {
            let bad = |m: &str| Error::usage(format!("--mirror {item}"), m);
            let (from, to) = item
                .split_once('=')
                .ok_or_else(|| bad("write it as FROM=TO, two URL prefixes"))?;
            if from.is_empty() || to.is_empty() {
                return Err(bad("write it as FROM=TO, two URL prefixes"));
            }
            if !(to.starts_with("http://") || to.starts_with("https://")) {
                return Err(bad("TO must be an http(s):// URL prefix"));
            }
            out.push((from.to_owned(), to.to_owned()));
        }
        // The longest matching FROM wins.
        out.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(Mirrors(out))
    }

    /// Where to fetch `url` from.
    pub fn rewrite(&self, url: &str) -> String {
        for (from, to) in &self.0 {
            if let Some(rest) = url.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        url.to_owned()
    }
}

/// What is being downloaded, for messages: the input's name and its
/// upstream URL (the one the lock records), and where it is fetched from.
pub struct Asset<'a> {
    pub input: &'a str,
    pub url: &'a str,
    pub fetch_url: String,
}

/// The cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

/// A copy buffer: transfers and hashing stream, never holding a file.
const CHUNK: usize = 256 << 10;

impl Cache {
    pub fn new(root: PathBuf) -> Cache {
        Cache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the file with digest `sha` lives (whether or not it is there).
    pub fn file(&self, sha: &Sha256) -> PathBuf {
        self.root.join("sha256").join(sha.to_string())
    }

    /// Where the members taken from the archive `sha` are extracted.
    pub fn extracted(&self, sha: &Sha256) -> PathBuf {
        self.root.join("extracted").join(sha.to_string())
    }

    fn dir(&self, sub: &str) -> Result<PathBuf> {
        let dir = self.root.join(sub);
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir, "creating the cache directory"))?;
        Ok(dir)
    }

    /// The cached file for `sha`, re-hashed: `None` when absent; a file
    /// whose content no longer has that digest is a failed check (exit 1)
    /// naming the input, both digests and the fix.
    pub fn check(&self, input: &str, sha: &Sha256) -> Result<Option<PathBuf>> {
        let path = self.file(sha);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "opening cached input")(e)),
        };
        let got = hash_all(file).map_err(Error::io(&path, "reading cached input"))?;
        if got != *sha {
            return Err(Error::check(format!(
                "input {input}: the cached file {} has sha256 {got}, the lock says {sha}: the cache was modified; delete the file and run `infrakit fetch` again",
                path.display()
            )));
        }
        Ok(Some(path))
    }

    /// Downloads `asset` into the cache and returns its digest. With
    /// `expected` (a locked input) a kept partial transfer is resumed and
    /// the result must have that digest (else exit 1, both digests named,
    /// and the partial file removed); without it (locking) the transfer
    /// starts afresh and the digest is whatever arrived. A transfer cut
    /// mid-way keeps its partial file (exit 2, run again to resume).
    pub fn download(
        &self,
        asset: &Asset,
        expected: Option<&Sha256>,
        fix: &str,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Sha256> {
        let partial_dir = self.dir("partial")?;
        let key = match expected {
            Some(sha) => sha.to_string(),
            None => format!("url-{}", Sha256::of(asset.url.as_bytes())),
        };
        let partial = partial_dir.join(format!("{key}.partial"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(Error::io(&partial, "opening a partial download"))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                Error::usage(
                    partial.display(),
                    format!(
                        "input {}: another infrakit is downloading it; wait for it to finish",
                        asset.input
                    ),
                )
            },
        )?;
        if expected.is_none() {
            file.set_len(0)
                .map_err(Error::io(&partial, "truncating a partial download"))?;
        }
        let digest = match self.transfer(asset, &mut file, &partial, progress) {
            Ok(d) => d,
            Err(e) => {
                // Keep only what a later run can resume: bytes of a locked
                // asset. Locking always starts afresh.
                let empty = file.metadata().map_or(true, |m| m.len() == 0);
                if expected.is_none() || empty {
                    let _ = std::fs::remove_file(&partial);
                }
                return Err(e);
            }
        };
        if let Some(want) = expected
            && digest != *want
        {
            let _ = std::fs::remove_file(&partial);
            return Err(Error::check(format!(
                "input {}: {} has sha256 {digest}, the lock says {want}; nothing was cached. {fix}",
                asset.input, asset.fetch_url
            )));
        }
        let dest_dir = self.dir("sha256")?;
        let dest = self.file(&digest);
        std::fs::rename(&partial, &dest)
            .map_err(Error::io(&dest, "moving a download into place"))?;
        File::open(&dest_dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io(&dest_dir, "syncing the cache directory"))?;
        Ok(digest)
    }

    /// Brings the partial `file` to the end of the asset, resuming from its
    /// length, and returns the digest of the whole.
    fn transfer(
        &self,
        asset: &Asset,
        file: &mut File,
        partial: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Sha256> {
        let net = |m: String| Error::Input {
            location: format!("input {} ({})", asset.input, asset.fetch_url),
            message: m,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut retried = false;
        loop {
            let have = file
                .metadata()
                .map_err(Error::io(partial, "reading a partial download"))?
                .len();
            let mut request = agent.get(&asset.fetch_url);
            if have > 0 {
                request = request.header("Range", format!("bytes={have}-"));
            }
            let mut response = request
                .call()
                .map_err(|e| net(format!("fetching: {e}; check the URL, the mirror and the network, then run the command again")))?;
            let status = response.status().as_u16();
            let resumed = match status {
                200 => false,
                206 if have > 0 => true,
                416 if have > 0 && !retried => {
                    // The kept bytes do not fit what the server has now.
                    retried = true;
                    file.set_len(0)
                        .map_err(Error::io(partial, "truncating a partial download"))?;
                    continue;
                }
                404 => {
                    return Err(net(
                        "not found (HTTP 404): check the input's url and version, or the mirror"
                            .into(),
                    ));
                }
                code => {
                    return Err(net(format!(
                        "the server answered HTTP {code}; try again later or use another --mirror"
                    )));
                }
            };
            if resumed {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !range.starts_with(&format!("bytes {have}-")) {
                    return Err(net(format!(
                        "asked for bytes {have}- and the server sent {range:?}; delete {} and run again",
                        partial.display()
                    )));
                }
            } else {
                file.set_len(0)
                    .map_err(Error::io(partial, "truncating a partial download"))?;
            }
            let kept = if resumed { have } else { 0 };
            // One hasher over the kept bytes and then the new ones.
            file.seek(SeekFrom::Start(0))
                .map_err(Error::io(partial, "reading a partial download"))?;
            let mut hasher = crate::trust::digest::HashingWriter::new(std::io::sink());
            std::io::copy(&mut (&mut *file).take(kept), &mut hasher)
                .map_err(Error::io(partial, "reading a partial download"))?;
            file.seek(SeekFrom::End(0))
                .map_err(Error::io(partial, "reading a partial download"))?;
            let length = response.body().content_length();
            let total = length.map_or(0, |l| l + kept);
            let mut body = response.body_mut().as_reader();
            let mut buf = vec![0u8; CHUNK];
            let mut done = kept;
            progress(done, total);
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = file.sync_data();
                        return Err(net(format!(
                            "the transfer was cut after {done} bytes ({e}); run the command again: `fetch` resumes a locked input where it stopped"
                        )));
                    }
                };
                file.write_all(&buf[..n])
                    .map_err(Error::io(partial, "writing a download"))?;
                hasher
                    .write_all(&buf[..n])
                    .map_err(Error::io(partial, "hashing a download"))?;
                done += n as u64;
                progress(done, total);
            }
            if total > 0 && done != total {
                let _ = file.sync_data();
                return Err(net(format!(
                    "the transfer ended after {done} of {total} bytes; run the command again: `fetch` resumes a locked input where it stopped"
                )));
            }
            file.sync_all()
                .map_err(Error::io(partial, "syncing a download"))?;
            let (_, digest, _) = hasher.finish();
            return Ok(digest);
        }
    }

    /// Downloads a small file (a signature or checksum list) of at most
    /// `limit` bytes into memory; it is checked, never cached.
    pub fn small(&self, asset: &Asset, limit: u64) -> Result<Vec<u8>> {
        let net = |m: String| Error::Input {
            location: format!("input {} ({})", asset.input, asset.fetch_url),
            message: m,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let mut response = agent
            .get(&asset.fetch_url)
            .call()
            .map_err(|e| net(format!("fetching: {e}; check the URL and the network")))?;
        match response.status().as_u16() {
            200 => {}
            code => {
                return Err(net(format!(
                    "the server answered HTTP {code}; check the signature url"
                )));
            }
        }
        let mut out = Vec::new();
        response
            .body_mut()
            .as_reader()
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| net(format!("downloading: {e}")))?;
        if out.len() as u64 > limit {
            return Err(net(format!("larger than {limit} bytes")));
        }
        Ok(out)
    }
}

/// SHA-256 of everything `r` yields.
pub fn hash_all(r: impl Read) -> std::io::Result<Sha256> {
    let mut hashing = HashingReader::new(r);
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    Ok(hashing.finish().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mirror_prefix_wins() {
        let m = Mirrors::parse(&[
            "https://github.com/=http://127.0.0.1:1/gh/".into(),
            "https://github.com/sigp/=http://127.0.0.1:1/sigp/".into(),
        ])
        .unwrap();
        assert_eq!(
            m.rewrite("https://github.com/sigp/lighthouse/x.tar.gz"),
            "http://127.0.0.1:1/sigp/lighthouse/x.tar.gz"
        );
        assert_eq!(
            m.rewrite("https://github.com/a/b"),
            "http://127.0.0.1:1/gh/a/b"
        );
        assert_eq!(m.rewrite("https://other/a"), "https://other/a");
        for bad in ["nothing", "=x", "https://a/=ftp://b/", "https://a/="] {
            assert!(Mirrors::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tampered_cache_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let sha = Sha256::of(b"good");
        assert_eq!(cache.check("x", &sha).unwrap(), None);
        std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
        std::fs::write(cache.file(&sha), b"good").unwrap();
        assert_eq!(cache.check("x", &sha).unwrap(), Some(cache.file(&sha)));
        std::fs::write(cache.file(&sha), b"evil").unwrap();
        let err = cache.check("x", &sha).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        let msg = err.to_string();
        assert!(msg.contains(&sha.to_string()), "{msg}");
        assert!(msg.contains(&Sha256::of(b"evil").to_string()), "{msg}");
    }
}
