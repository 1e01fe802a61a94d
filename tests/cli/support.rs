//! Shared helpers: run the binary, make fixture repos and keys, require tools.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::Digest as _;

/// The profile every throw-away `Repo` builds.
pub const PROFILE: &str = "profiles/p.toml";

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
    pub fn from(out: Output) -> Run {
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
    clear_build_env(&mut cmd).envs(env.iter().copied());
    Run::from(cmd.output().expect("infrakit runs"))
}

/// Removes the variables that steer a build from `cmd`'s environment, so the
/// caller's environment cannot leak into a run.
pub fn clear_build_env(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("SOURCE_DATE_EPOCH")
        .env_remove("INFRAKIT_SIGN_KEY")
        .env_remove("INFRAKIT_PASSWORD_FILE")
}

/// A `Command` for the stock tool `program` in `cwd` (a missing tool fails).
fn tool_command(cwd: &Path, program: &str, args: &[&str]) -> Command {
    require_tool(program);
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    cmd
}

/// Runs a stock tool; panics if it cannot be started.
pub fn tool(cwd: &Path, program: &str, args: &[&str]) -> Run {
    tool_with(cwd, program, args, |_| {})
}

/// Like `tool`, after `setup` has adjusted the command (its environment).
pub fn tool_with(
    cwd: &Path,
    program: &str,
    args: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Run {
    let mut cmd = tool_command(cwd, program, args);
    setup(&mut cmd);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    Run::from(out)
}

/// Runs a stock tool with `input` on its stdin.
pub fn tool_stdin(cwd: &Path, program: &str, args: &[&str], input: &[u8]) -> Run {
    let mut child = tool_command(cwd, program, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input)
        .expect("writing stdin");
    Run::from(child.wait_with_output().expect("waiting"))
}

/// Runs a stock tool that must succeed and returns its raw stdout.
pub fn tool_bytes(cwd: &Path, program: &str, args: &[&str]) -> Vec<u8> {
    let out = tool_command(cwd, program, args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
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

/// The repo's base profile built into `w/dist` and signed with a new key
/// pair `w/release.{key,pub}`; returns the public key.
pub fn signed_base_release(w: &Path) -> PathBuf {
    let (key, public) = keypair(w, "release");
    copy_repo_profiles(w);
    infrakit_env(
        w,
        &["build", "profiles/base.toml", "--out", "dist"],
        &[("INFRAKIT_SIGN_KEY", s(&key))],
    )
    .ok();
    public
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

/// A path as `&str`, for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the tests run as root (`id -u` is 0).
pub fn is_root() -> bool {
    tool(Path::new("/"), "id", &["-u"]).ok().stdout.trim() == "0"
}

/// The permission bits (with setuid/setgid/sticky) of `path`, not following
/// a symlink.
pub fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every path under `root`, not following links: type, mode, owner, and the
/// digest of a file or the target of a link. Two equal snapshots mean the
/// root is byte-for-byte unchanged.
pub fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for item in walkdir::WalkDir::new(root).sort_by_file_name() {
        let item = item.expect("walking the tree");
        let path = item.path();
        let m = path.symlink_metadata().expect("lstat");
        let rel = path.strip_prefix(root).expect("below the root").display();
        let what = if m.file_type().is_symlink() {
            format!("-> {}", fs::read_link(path).expect("readlink").display())
        } else if m.is_file() {
            sha256_hex(&fs::read(path).expect("reading a file"))
        } else {
            "dir".into()
        };
        out.push(format!(
            "{rel} {:o} {}:{} {what}",
            m.mode(),
            m.uid(),
            m.gid()
        ));
    }
    out
}

/// This repository (its profiles/ and overlays/).
pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Copies this repository's profiles/ and overlays/ into the directory `dest`.
pub fn copy_repo_profiles(dest: &Path) {
    tool(repo_dir(), "cp", &["-a", "profiles", "overlays", s(dest)]).ok();
}

// ---------------------------------------------------------------------------
// Refusals (tests/cli/bad_input.rs and features.rs).
// ---------------------------------------------------------------------------

/// Asserts the shape of a refusal: exit 2, nothing on stdout, exactly one
/// stderr line starting with `infrakit: `, no panic, and `out` absent or
/// empty. Returns the line without its newline.
pub fn assert_refused(run: &Run, out: &Path) -> String {
    let all = format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        run.code, run.stdout, run.stderr
    );
    assert_eq!(run.code, 2, "{all}");
    assert!(!all.contains("panicked"), "{all}");
    assert!(!all.contains("RUST_BACKTRACE"), "{all}");
    assert_eq!(run.stdout, "", "{all}");
    assert!(run.stderr.ends_with('\n'), "{all}");
    let line = run.stderr.trim_end_matches('\n');
    assert!(!line.contains('\n'), "more than one line: {all}");
    assert!(line.starts_with("infrakit: error: "), "{all}");
    if out.exists() {
        assert_eq!(list_files(out), Vec::<String>::new(), "left behind: {all}");
    }
    line.to_owned()
}

/// `infrakit ARGS` in `dir`, which must be refused (`assert_refused`, with
/// `dir/dist` as the output); returns the one stderr line.
pub fn refuse(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let run = infrakit_env(dir, args, env);
    assert_refused(&run, &dir.join("dist"))
}

/// Asserts `line` contains every needle.
pub fn has(line: &str, needles: &[&str]) {
    for n in needles {
        assert!(line.contains(n), "{line:?} lacks {n:?}");
    }
}

/// A throw-away repo: `overlays/<layer>/…` and `profiles/p.toml`.
pub struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        Repo { dir: tempdir() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` at `rel` (relative to the repo); returns the path.
    pub fn file(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path().join(rel);
        write(&p, contents);
        p
    }

    /// Writes `overlays/<layer>/overlay.toml` (and makes sure `root/` exists).
    pub fn overlay(&self, layer: &str, toml: &str) {
        fs::create_dir_all(self.path().join("overlays").join(layer).join("root")).expect("mkdir");
        self.file(&format!("overlays/{layer}/overlay.toml"), toml);
    }

    /// Writes `overlays/<layer>/root/<rel>`.
    pub fn root_file(&self, layer: &str, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        self.file(&format!("overlays/{layer}/root/{rel}"), contents)
    }

    /// Writes `profiles/p.toml`: name, version, overlays on lines 1 to 3,
    /// then `extra` (so a `[params]` table there starts on line 4).
    pub fn profile(&self, overlays: &[&str], extra: &str) {
        let list: Vec<String> = overlays.iter().map(|o| format!("{o:?}")).collect();
        self.file(
            PROFILE,
            format!(
                "name = \"p\"\nversion = \"1.0.0\"\noverlays = [{}]\n{extra}",
                list.join(", ")
            ),
        );
    }

    /// `infrakit build profiles/p.toml --out OUT`.
    pub fn build_to(&self, out: &str) -> Run {
        infrakit(self.path(), &["build", PROFILE, "--out", out])
    }

    /// A build to `dist` that must be refused; returns the one stderr line.
    pub fn refused(&self) -> String {
        refuse(self.path(), &["build", PROFILE, "--out", "dist"], &[])
    }
}

// ---------------------------------------------------------------------------
// A loopback http server (tests/cli/apply.rs and cli_surface.rs).
// ---------------------------------------------------------------------------

/// `python3 -m http.server` on 127.0.0.1 serving `dir`; killed on drop.
pub struct Server {
    child: std::process::Child,
    port: u16,
}

impl Server {
    pub fn start(dir: &Path) -> Server {
        use std::io::BufRead;
        require_tool("python3");
        let mut child = std::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "0",
                "--directory",
                s(dir),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m http.server starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the server says where it listens");
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let port = line
            .split(" port ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Server { child, port }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }

    /// The loopback port it listens on (tests/cli/vm.rs forwards a guest
    /// address to it).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Hostile artifacts, validly signed (tests/cli/apply.rs and differential.rs).
// ---------------------------------------------------------------------------

/// tests/cli/craft.py: rewrites a genuine artifact into one hostile case.
const CRAFT: &str = include_str!("craft.py");

/// Crafts `case` (a case of tests/cli/craft.py) from the genuine `artifact`
/// as release `version` into the directory `out`, and signs it with stock
/// minisign and `secret` the way a release is signed (the trusted comment
/// binds name, version and manifest digest). Every digest is right, so only
/// the member checks can refuse it. `smuggle` names the member the hiding
/// cases hide (craft.py's default when `None`). Returns the artifact.
pub fn craft(
    case: &str,
    artifact: &Path,
    out: &Path,
    version: &str,
    secret: &Path,
    smuggle: Option<&str>,
) -> PathBuf {
    fs::create_dir_all(out).expect("mkdir");
    let script = out.join("craft.py");
    fs::write(&script, CRAFT).expect("writing craft.py");
    let mut args = vec![s(&script), case, s(artifact), s(out), version];
    args.extend(smuggle);
    let run = tool(out, "python3", &args);
    assert_eq!(run.code, 0, "craft.py {case}: {}", run.stderr);
    let file_name = artifact.file_name().and_then(|n| n.to_str()).expect("name");
    let (stem, _) = file_name
        .split_once(".tar.")
        .expect("NAME.tar.zst or NAME.tar.gz");
    let manifest = fs::read(out.join(format!("{stem}.manifest.json"))).expect("manifest");
    let value: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let name = value["name"].as_str().expect("name");
    let format = value["archive"]["format"].as_str().expect("format");
    let crafted = out.join(format!("{stem}.{format}"));
    let comment = format!(
        "name:{name} version:{version} manifest-sha256:{}",
        sha256_hex(&manifest)
    );
    let sig = format!("{}.minisig", s(&crafted));
    let args = [
        "-S",
        "-s",
        s(secret),
        "-m",
        s(&crafted),
        "-x",
        &sig,
        "-t",
        &comment,
    ];
    tool(out, "minisign", &args).ok();
    crafted
}

/// `run` was refused (exit 2) for want of a spill file in `tmpdir`, named.
pub fn refused_spill(run: Run, tmpdir: &Path) {
    let run = run.expect_code(2);
    assert!(
        run.stderr
            .contains(&format!("{}: creating a spill file", tmpdir.display())),
        "{}",
        run.stderr
    );
}
