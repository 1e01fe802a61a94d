//! Bootable disk images (docs/images.md): a profile's `[image]` table names
//! a Debian base, `lock` pins its packages from the archive's signed
//! indexes (`lock`, `resolve`), `fetch` puts them into the cache, and
//! `infrakit image` installs them with stock `mmdebstrap` from a local
//! repository made from the cache, lays the signed release down with
//! `apply`'s own code, and assembles a GPT disk with stock tools: an EFI
//! system partition (vfat, systemd-boot) and an ext4 root (`build`, `disk`).
//! Every identifier derives from the profile's name and version and a role,
//! every time from `SOURCE_DATE_EPOCH`, so the same lock, cache and
//! artifact give the same bytes. `verify` checks an image as it does an
//! artifact: signature first, then the manifest it binds, then the digest.

pub mod build;
pub mod disk;
pub mod lock;
pub mod manifest;
pub mod resolve;
pub mod verify;

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// Runs a stock tool, failing (exit 2) with its command line and the end of
/// its output when it exits non-zero; returns its stdout.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| {
        Error::usage(
            what,
            format!("cannot run {shown}: {e}; install it (docs/images.md lists the tools)"),
        )
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::usage(
            what,
            format!("{shown} failed ({}):\n{}", out.status, tail.join("\n")),
        ));
    }
    Ok(out.stdout)
}

/// `path` as a `&str` for a tool's command line; paths the build makes are
/// UTF-8 unless the output directory is not.
pub(crate) fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        Error::usage(
            path.display(),
            "is not valid UTF-8: use an output directory with a UTF-8 path",
        )
    })
}
