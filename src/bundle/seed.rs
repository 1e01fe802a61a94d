//! The NoCloud seed volume: an ISO 9660 image labelled `cidata` made by
//! stock `xorriso` (not genisoimage, which is not reproducible), every date
//! set to the release's `SOURCE_DATE_EPOCH`, so the same files give the
//! same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Writes `out` holding `files` (`(path on the volume, source file)`).
pub fn make_iso(out: &Path, files: &[(String, PathBuf)], source_date_epoch: u64) -> Result<()> {
    let mut cmd = Command::new("xorriso");
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .args(["-as", "mkisofs", "-quiet", "-o"])
        .arg(out)
        .args(["-V", "cidata", "-J", "-r"])
        .arg("--set_all_file_dates")
        .arg(format!("={source_date_epoch}"))
        .arg("-graft-points");
    let mut sorted: Vec<&(String, PathBuf)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, source) in sorted {
        let mut spec = std::ffi::OsString::from(format!("{name}="));
        spec.push(source.as_os_str());
        cmd.arg(spec);
    }
    let output = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::usage(
                "--provider nocloud",
                "the seed ISO is made with xorriso, which is not installed: apt-get install xorriso",
            )
        } else {
            Error::io(Path::new("xorriso"), "running")(e)
        }
    })?;
    if !output.status.success() {
        return Err(Error::input(
            out,
            format!(
                "xorriso failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(())
}
