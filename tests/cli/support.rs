//! Shared helpers: run the binary, make fixture repos and keys, require tools.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `infrakit` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_infrakit"))
}

/// The result of one run, with helpers for asserting on it.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code {} (want {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn ok(self) -> Run {
        self.expect_code(0)
    }
}

/// Runs `infrakit ARGS` in `cwd` with a clean, predictable environment.
pub fn infrakit(cwd: &Path, args: &[&str]) -> Run {
    infrakit_env(cwd, args, &[])
}

/// Like `infrakit`, with extra environment variables.
pub fn infrakit_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(cwd);
    cmd.env_remove("SOURCE_DATE_EPOCH")
        .env_remove("INFRAKIT_SIGN_KEY")
        .env_remove("INFRAKIT_PASSWORD_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::from(cmd.output().expect("infrakit runs"))
}

/// Runs a stock tool; panics if it cannot be started.
pub fn tool(cwd: &Path, program: &str, args: &[&str]) -> Run {
    require_tool(program);
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    Run::from(out)
}

/// The oracles are part of the test contract: a missing one is a failure,
/// never a skip. `scripts/test` installs them all.
pub fn require_tool(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: run scripts/test, which installs every oracle"
    );
}

pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    fs::write(path, contents).expect("write");
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn symlink(target: &str, link: &Path) {
    fs::create_dir_all(link.parent().expect("has a parent")).expect("mkdir");
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

/// A long path (> 100 bytes) used by the fixture, to exercise GNU long names.
pub const LONG_DIR: &str = "opt/validator/a-rather-long-directory-name-for-testing-gnu-long-names/and-another-level-of-depth-here";
/// A symlink target longer than 100 bytes.
pub const LONG_TARGET: &str = "/opt/validator/a-rather-long-directory-name-for-testing-gnu-long-names/and-another-level-of-depth-here/bin/validator-client";

/// Writes a small but complete fixture repo into `root`, creating files in
/// the given order (`reverse` flips it): two overlays (`base`, `chain`), a
/// replacement, an executable, a symlink, a long path, a long link target,
/// modes and owners from overlay.toml, and `profiles/fixture.toml`.
pub fn fixture_repo(root: &Path, reverse: bool) {
    let mut files: Vec<(&str, &[u8])> = vec![
        ("overlays/base/root/etc/motd", b"base motd\n"),
        (
            "overlays/base/root/etc/ssh/sshd_config.d/50-infrakit.conf",
            b"PasswordAuthentication no\n",
        ),
        (
            "overlays/base/root/etc/sysctl.d/90-infrakit.conf",
            b"kernel.kptr_restrict = 2\n",
        ),
        (
            "overlays/base/root/usr/local/bin/healthcheck",
            b"#!/bin/sh\nexit 0\n",
        ),
        (
            "overlays/chain/root/etc/motd",
            b"chain motd replaces base\n",
        ),
        ("overlays/chain/root/etc/chain/env", b"NETWORK=mainnet\n"),
        ("overlays/chain/root/etc/chain/empty", b""),
    ];
    let long_file = format!("overlays/chain/root/{LONG_DIR}/bin/validator-client");
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    files.push((long_file.as_str(), &big));
    if reverse {
        files.reverse();
    }
    for (path, contents) in &files {
        write(&root.join(path), contents);
    }
    chmod(
        &root.join("overlays/base/root/usr/local/bin/healthcheck"),
        0o755,
    );
    chmod(&root.join(&long_file), 0o750);
    symlink(
        "../motd",
        &root.join("overlays/chain/root/etc/chain/motd-link"),
    );
    write(
        &root.join("overlays/base/overlay.toml"),
        "[[attr]]\npath = \"etc/ssh/sshd_config.d/*.conf\"\nmode = 0o600\n\n\
         [[dir]]\npath = \"var/lib/infrakit\"\nmode = 0o700\n\n\
         [[symlink]]\npath = \"etc/localtime\"\ntarget = \"/usr/share/zoneinfo/Etc/UTC\"\n",
    );
    write(
        &root.join("overlays/chain/overlay.toml"),
        format!(
            "replace = [\"etc/motd\"]\n\n\
             [[attr]]\npath = \"etc/chain/**\"\nuid = 990\ngid = 990\n\n\
             [[dir]]\npath = \"var/lib/chain\"\nmode = 0o750\nuid = 990\ngid = 990\n\n\
             [[symlink]]\npath = \"usr/local/bin/validator-client\"\ntarget = \"{LONG_TARGET}\"\n"
        ),
    );
    write(
        &root.join("profiles/fixture.toml"),
        "name = \"fixture\"\nversion = \"1.2.3\"\nsource-date-epoch = 1700000000\noverlays = [\"base\", \"chain\"]\n",
    );
}

/// A fresh key pair made by `infrakit keygen` in `dir`: (secret, public).
pub fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let prefix = dir.join(name);
    infrakit(dir, &["keygen", "--out", prefix.to_str().expect("utf-8")]).ok();
    (prefix.with_extension("key"), prefix.with_extension("pub"))
}

/// A temp dir that other users can enter (for tests that drop privileges).
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    dir
}

/// Every file below `dir`, relative, sorted.
pub fn list_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            let e = e.expect("walk");
            e.path()
                .strip_prefix(dir)
                .expect("prefix")
                .display()
                .to_string()
        })
        .collect();
    out.sort();
    out
}
