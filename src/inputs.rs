//! What comes from outside the repo: artifacts given to `apply`, `verify`,
//! `inspect` and `diff` as URLs (`fetch`), and the pinned upstream inputs
//! adapters declare (docs/inputs.md): their declarations (`decl`), the lock
//! file (`lock`), the content-addressed cache (`cache`), upstream
//! signatures and image digests (`upstream`), and the files a build takes
//! from them (`take`).
//!
//! `pin` is the one step `lock` and `fetch` share for each input: keep a
//! lock entry that still matches the declaration, or (unless `--locked`)
//! download the asset, check upstream's signature and record its digest;
//! `ensure_cached` then makes sure a locked asset is in the cache with that
//! digest. Nothing here reads the environment: the cache directory,
//! mirrors and key directory arrive as parameters.

pub mod cache;
pub mod decl;
pub mod fetch;
pub mod lock;
pub mod take;
pub mod upstream;

use std::path::Path;

use crate::error::{Error, Result};
use cache::{Asset, Cache, Mirrors};
use decl::{Input, Kind};
use lock::Locked;

/// Where and how `pin` and `ensure_cached` work.
pub struct Context<'a> {
    pub cache: &'a Cache,
    pub mirrors: &'a Mirrors,
    /// `--upstream-keys DIR`, else each adapter's `keys/`.
    pub upstream_keys: Option<&'a Path>,
    /// `--locked`: a missing or changed lock entry is refused.
    pub locked: bool,
    /// The profile, for the commands that fix things (`infrakit lock <profile>`).
    pub profile: &'a Path,
    /// The lock file, for messages.
    pub lock_path: &'a Path,
}

/// What `pin` or `ensure_cached` did for one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The lock entry still matches the declaration; nothing downloaded.
    Kept,
    /// Downloaded (and signature-checked) and its digest recorded.
    Locked,
    /// Already in the cache with the locked digest.
    Cached,
    /// Downloaded into the cache with the locked digest.
    Downloaded,
    /// The cached copy no longer had its digest; downloaded again.
    Replaced,
}

/// The lock entry for `input`: the existing one when it still matches the
/// declaration, else (unless `ctx.locked`, which refuses with exit 1) a
/// new one, after downloading the asset into the cache and checking
/// upstream's signature or checksum list.
pub fn pin(
    input: &Input,
    existing: Option<&Locked>,
    ctx: &Context,
    progress: &dyn Fn(u64, u64),
) -> Result<(Locked, Outcome)> {
    let why = match existing {
        Some(entry) => match entry.changed(input) {
            None => return Ok((entry.clone(), Outcome::Kept)),
            Some(change) => format!("its lock entry is out of date ({change})"),
        },
        None => format!("it is not in {}", ctx.lock_path.display()),
    };
    if ctx.locked {
        return Err(Error::Refused(format!(
            "input {} ({}): {why}, and --locked forbids changing the lock; run `infrakit lock {}` and commit the lock",
            input.name,
            input.at,
            ctx.profile.display()
        )));
    }
    let url = input.url();
    let sha256 = if input.kind == Kind::Image {
        upstream::image_digest(input, ctx.mirrors)?
    } else {
        let asset = Asset {
            input: &input.name,
            url: &url,
            fetch_url: ctx.mirrors.rewrite(&url),
        };
        let sha = ctx.cache.download(&asset, None, "", progress)?;
        let path = ctx.cache.file(&sha);
        if let Err(e) = upstream::check_signature(
            input,
            &path,
            &sha,
            ctx.cache,
            ctx.mirrors,
            ctx.upstream_keys,
        ) {
            // Unchecked bytes stay out of the cache.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        sha
    };
    Ok((
        Locked {
            name: input.name.clone(),
            kind: input.kind,
            version: input.version.clone(),
            url,
            sha256,
        },
        Outcome::Locked,
    ))
}

/// Makes sure the asset `entry` locks is in the cache with its digest,
/// downloading it (resuming a kept partial transfer) when it is not. A
/// download with another digest is refused (exit 1) naming both digests.
/// Images are not downloaded (the host's container runtime pulls them by
/// digest).
pub fn ensure_cached(
    entry: &Locked,
    ctx: &Context,
    progress: &dyn Fn(u64, u64),
) -> Result<Outcome> {
    if entry.kind == Kind::Image {
        return Ok(Outcome::Kept);
    }
    let replaced = match ctx.cache.check(&entry.name, &entry.sha256) {
        Ok(Some(_)) => return Ok(Outcome::Cached),
        Ok(None) => false,
        Err(e) if e.exit_code() == 1 => {
            // Content-addressed: a file without its digest is garbage.
            let path = ctx.cache.file(&entry.sha256);
            std::fs::remove_file(&path)
                .map_err(Error::io(&path, "removing a modified cache file"))?;
            true
        }
        Err(e) => return Err(e),
    };
    let asset = Asset {
        input: &entry.name,
        url: &entry.url,
        fetch_url: ctx.mirrors.rewrite(&entry.url),
    };
    let fix = format!(
        "If upstream replaced the asset on purpose, check why, then delete its entry from {} and run `infrakit lock {}`.",
        ctx.lock_path.display(),
        ctx.profile.display()
    );
    ctx.cache
        .download(&asset, Some(&entry.sha256), &fix, progress)?;
    Ok(if replaced {
        Outcome::Replaced
    } else {
        Outcome::Downloaded
    })
}
