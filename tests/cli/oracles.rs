//! Stock tools judge the artifact: GNU tar, bsdtar, zstd, gzip, diff,
//! sha256sum and minisign (ORACLES.md). Every check compares what a tool
//! reports with the manifest *and* with the fixture as `fixture_repo` wrote
//! it, so a bug shared by the writer and the manifest still shows.

// Test code: clippy.toml allows unwrap in tests, but clippy does not count
// helpers outside `#[test]` functions of an integration-test crate as tests.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::*;

// ---------------------------------------------------------------------------
// Helpers (local to this file).
// ---------------------------------------------------------------------------

/// Runs a stock tool with extra environment variables (and `LC_ALL=C`).
fn tool_env(cwd: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    tool_with(cwd, program, args, |cmd| {
        cmd.env("LC_ALL", "C").envs(env.iter().copied());
    })
}

/// `sha256sum FILE` (the stock tool, not our code).
fn sha256sum(path: &Path) -> String {
    let r = tool(Path::new("/"), "sha256sum", &[s(path)]).ok();
    r.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// `date -u -d @EPOCH +FMT`, so dates are not computed by the test itself.
fn utc_date(epoch: u64, fmt: &str) -> String {
    let at = format!("@{epoch}");
    let plus = format!("+{fmt}");
    tool_env(Path::new("/"), "date", &["-u", "-d", &at, &plus], &[])
        .ok()
        .stdout
        .trim_end()
        .to_owned()
}

/// `ls -l`-style permissions: type letter then rwx with setuid/setgid/sticky.
fn perms(kind: char, mode: u32) -> String {
    let mut out = String::from(kind);
    for (shift, special, set, unset) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(match (mode & special != 0, bits & 1 != 0) {
            (true, true) => set,
            (true, false) => unset,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    out
}

/// The first `n` whitespace-separated fields of `line` and the rest.
fn fields(line: &str, n: usize) -> (Vec<&str>, &str) {
    let mut rest = line;
    let mut out = Vec::new();
    for _ in 0..n {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    (out, rest.trim_start())
}

/// One manifest entry, as the tests need it.
#[derive(Clone, Debug, PartialEq)]
struct Want {
    path: String,
    /// `d`, `-` or `l`, as `ls -l` shows it.
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    sha256: Option<String>,
    target: Option<String>,
    layer: String,
}

impl Want {
    /// The tar member name: directories end in `/`.
    fn member(&self) -> String {
        if self.kind == 'd' {
            format!("{}/", self.path)
        } else {
            self.path.clone()
        }
    }

    /// The name as a listing shows it, with ` -> target` for symlinks.
    fn listed(&self) -> String {
        match &self.target {
            Some(t) => format!("{} -> {t}", self.member()),
            None => self.member(),
        }
    }
}

fn entries(manifest: &Value) -> Vec<Want> {
    manifest["entries"]
        .as_array()
        .expect("entries is an array")
        .iter()
        .map(|e| {
            let str_of = |k: &str| e[k].as_str().map(str::to_owned);
            let mode_text = str_of("mode").expect("mode");
            assert_eq!(mode_text.len(), 4, "mode {mode_text:?} is four digits");
            Want {
                path: str_of("path").expect("path"),
                kind: match e["type"].as_str().expect("type") {
                    "dir" => 'd',
                    "file" => '-',
                    "symlink" => 'l',
                    other => panic!("unknown entry type {other}"),
                },
                mode: u32::from_str_radix(&mode_text, 8).expect("octal mode"),
                uid: e["uid"].as_u64().expect("uid"),
                gid: e["gid"].as_u64().expect("gid"),
                size: e["size"].as_u64().unwrap_or(0),
                sha256: str_of("sha256"),
                target: str_of("target"),
                layer: str_of("layer").expect("layer"),
            }
        })
        .collect()
}

/// (path, kind, mode, uid = gid, layer, symlink target).
type SpecEntry = (String, char, u32, u64, &'static str, Option<String>);

/// What `fixture_repo` must compose to, written out by hand from its
/// overlays and overlay.toml files: (path, kind, mode, uid:gid, layer,
/// symlink target). File contents come from `overlays/<layer>/root/<path>`.
fn fixture_spec() -> Vec<SpecEntry> {
    let long = |rest: &str| format!("{LONG_DIR}{rest}");
    let parts: Vec<&str> = LONG_DIR.split('/').collect();
    let mut v = vec![
        ("etc".to_owned(), 'd', 0o755, 0, "base", None),
        ("etc/chain".to_owned(), 'd', 0o755, 0, "chain", None),
        ("etc/chain/empty".to_owned(), '-', 0o644, 990, "chain", None),
        ("etc/chain/env".to_owned(), '-', 0o644, 990, "chain", None),
        (
            "etc/chain/motd-link".to_owned(),
            'l',
            0o777,
            990,
            "chain",
            Some("../motd".to_owned()),
        ),
        (
            "etc/localtime".to_owned(),
            'l',
            0o777,
            0,
            "base",
            Some("/usr/share/zoneinfo/Etc/UTC".to_owned()),
        ),
        // The replacement: chain's motd wins.
        ("etc/motd".to_owned(), '-', 0o644, 0, "chain", None),
        ("etc/ssh".to_owned(), 'd', 0o755, 0, "base", None),
        (
            "etc/ssh/sshd_config.d".to_owned(),
            'd',
            0o755,
            0,
            "base",
            None,
        ),
        (
            "etc/ssh/sshd_config.d/50-infrakit.conf".to_owned(),
            '-',
            0o600,
            0,
            "base",
            None,
        ),
        ("etc/sysctl.d".to_owned(), 'd', 0o755, 0, "base", None),
        (
            "etc/sysctl.d/90-infrakit.conf".to_owned(),
            '-',
            0o644,
            0,
            "base",
            None,
        ),
    ];
    for i in 1..=parts.len() {
        v.push((parts[..i].join("/"), 'd', 0o755, 0, "chain", None));
    }
    v.extend([
        (long("/bin"), 'd', 0o755, 0, "chain", None),
        // 0750 in the source: executable, so the default 0755.
        (long("/bin/validator-client"), '-', 0o755, 0, "chain", None),
        ("usr".to_owned(), 'd', 0o755, 0, "base", None),
        ("usr/local".to_owned(), 'd', 0o755, 0, "base", None),
        ("usr/local/bin".to_owned(), 'd', 0o755, 0, "base", None),
        (
            "usr/local/bin/healthcheck".to_owned(),
            '-',
            0o755,
            0,
            "base",
            None,
        ),
        (
            "usr/local/bin/validator-client".to_owned(),
            'l',
            0o777,
            0,
            "chain",
            Some(LONG_TARGET.to_owned()),
        ),
        ("var".to_owned(), 'd', 0o755, 0, "base", None),
        ("var/lib".to_owned(), 'd', 0o755, 0, "base", None),
        ("var/lib/chain".to_owned(), 'd', 0o750, 990, "chain", None),
        ("var/lib/infrakit".to_owned(), 'd', 0o700, 0, "base", None),
    ]);
    v
}

/// A built fixture: its repo, output paths and parsed manifest.
struct Built {
    dir: tempfile::TempDir,
    artifact: PathBuf,
    manifest_path: PathBuf,
    manifest_bytes: Vec<u8>,
    manifest: Value,
}

impl Built {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn entries(&self) -> Vec<Want> {
        entries(&self.manifest)
    }

    fn sde(&self) -> u64 {
        self.manifest["source_date_epoch"]
            .as_u64()
            .expect("source_date_epoch")
    }
}

/// Builds `profiles/<profile>.toml` of the repo in `dir` into `dist`.
fn build_profile(dir: tempfile::TempDir, profile: &str, format: &str, extra: &[&str]) -> Built {
    let path = format!("profiles/{profile}.toml");
    let mut args = vec!["build", path.as_str(), "--out", "dist"];
    args.extend(["--format", format]);
    args.extend_from_slice(extra);
    infrakit(dir.path(), &args).ok();
    let artifact = dir.path().join(format!("dist/{profile}.{format}"));
    let manifest_path = dir.path().join(format!("dist/{profile}.manifest.json"));
    let manifest_bytes = fs::read(&manifest_path).expect("manifest written");
    let manifest = serde_json::from_slice(&manifest_bytes).expect("manifest is JSON");
    Built {
        dir,
        artifact,
        manifest_path,
        manifest_bytes,
        manifest,
    }
}

/// Builds the shared fixture into `dist` with `extra` build flags.
fn build_fixture_in(dir: tempfile::TempDir, format: &str, extra: &[&str]) -> Built {
    build_profile(dir, "fixture", format, extra)
}

fn build_fixture(format: &str) -> Built {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    build_fixture_in(dir, format, &[])
}

// ---------------------------------------------------------------------------
// The manifest against the fixture as written.
// ---------------------------------------------------------------------------

#[test]
fn fixture_builds_and_verifies() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let (key, public) = keypair(dir.path(), "release");
    let key = key.to_str().unwrap();
    infrakit(
        dir.path(),
        &[
            "build",
            "profiles/fixture.toml",
            "--out",
            "dist",
            "--sign-key",
            key,
        ],
    )
    .ok();
    let public = public.to_str().unwrap();
    let run = infrakit(
        dir.path(),
        &["verify", "dist/fixture.tar.zst", "--key", public],
    )
    .ok();
    assert!(
        run.stdout.contains("verified fixture 1.2.3"),
        "{}",
        run.stdout
    );
}

/// The manifest's entries are exactly `fixture_spec()`, in order, and each
/// file's size and sha256 are those of its source in the winning layer.
fn assert_matches_fixture_spec(b: &Built) {
    let got = b.entries();
    let spec = fixture_spec();
    let got_paths: Vec<&str> = got.iter().map(|e| e.path.as_str()).collect();
    let spec_paths: Vec<&str> = spec.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(got_paths, spec_paths, "entries and their order");
    for (g, (path, kind, mode, id, layer, target)) in got.iter().zip(&spec) {
        let want = (*kind, *mode, *id, *id, *layer, target.clone());
        let have = (
            g.kind,
            g.mode,
            g.uid,
            g.gid,
            g.layer.as_str(),
            g.target.clone(),
        );
        assert_eq!(have, want, "{path}");
        if g.kind == '-' {
            let src = b.root().join(format!("overlays/{layer}/root/{path}"));
            let bytes = fs::read(&src).expect("source file");
            assert_eq!(g.size, bytes.len() as u64, "{path} size");
            assert_eq!(g.sha256.as_deref(), Some(&*sha256_hex(&bytes)), "{path}");
            assert_eq!(g.sha256.as_deref(), Some(&*sha256sum(&src)), "{path}");
        } else {
            assert!(g.sha256.is_none() && g.size == 0, "{path}");
        }
    }
}

#[test]
fn manifest_lists_the_composed_fixture_tree() {
    let b = build_fixture("tar.zst");
    let m = &b.manifest;
    assert_eq!(m["name"], "fixture");
    assert_eq!(m["version"], "1.2.3");
    assert_eq!(m["source_date_epoch"], 1_700_000_000u64);
    assert_eq!(m["archive"]["format"], "tar.zst");
    assert_eq!(
        m["profile_sha256"].as_str().unwrap(),
        sha256sum(&b.root().join("profiles/fixture.toml"))
    );
    assert_matches_fixture_spec(&b);
    let spec = fixture_spec();
    // Layers: how many entries each provides.
    let count = |l: &str| spec.iter().filter(|e| e.4 == l).count() as u64;
    assert_eq!(
        m["layers"],
        serde_json::json!([
            {"entries": count("base"), "name": "base"},
            {"entries": count("chain"), "name": "chain"},
        ])
    );
    // The artifact's own digest and size, by the stock tool.
    assert_eq!(
        m["archive"]["sha256"].as_str().unwrap(),
        sha256sum(&b.artifact)
    );
    assert_eq!(
        m["archive"]["size"].as_u64().unwrap(),
        fs::metadata(&b.artifact).unwrap().len()
    );
    // Canonical JSON: one line, a trailing newline, keys sorted.
    let text = String::from_utf8(b.manifest_bytes.clone()).unwrap();
    assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
    assert_eq!(
        serde_json::to_string(&m).unwrap() + "\n",
        text,
        "serde_json's sorted compact form is the file"
    );
}

// ---------------------------------------------------------------------------
// Listings: GNU tar and bsdtar.
// ---------------------------------------------------------------------------

/// `tar -tvf --numeric-owner --full-time` in UTC equals the manifest, in order.
fn check_gnu_listing(b: &Built, decompress: &str) -> String {
    let r = tool_env(
        b.root(),
        "tar",
        &[
            decompress,
            "-tvf",
            s(&b.artifact),
            "--numeric-owner",
            "--full-time",
            "--quoting-style=literal",
        ],
        &[("TZ", "UTC")],
    )
    .ok();
    assert!(r.stderr.is_empty(), "tar warns: {}", r.stderr);
    let date = utc_date(b.sde(), "%Y-%m-%d %H:%M:%S");
    let want = b.entries();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), want.len(), "GNU tar listing:\n{}", r.stdout);
    for (line, w) in lines.iter().zip(&want) {
        let (f, name) = fields(line, 5);
        let expect_perms = perms(w.kind, w.mode);
        let owner = format!("{}/{}", w.uid, w.gid);
        let size = w.size.to_string();
        let when = format!("{} {}", f[3], f[4]);
        assert_eq!(
            (f[0], f[1], f[2], when.as_str(), name),
            (
                expect_perms.as_str(),
                owner.as_str(),
                size.as_str(),
                date.as_str(),
                w.listed().as_str()
            ),
            "GNU tar line {line:?}"
        );
    }
    r.stdout
}

#[test]
fn gnu_tar_lists_exactly_the_manifest() {
    let b = build_fixture("tar.zst");
    let listing = check_gnu_listing(&b, "--zstd");
    // The long name and the long link target came through whole.
    assert!(listing.contains(&format!("{LONG_DIR}/bin/validator-client\n")));
    assert!(listing.contains(&format!("-> {LONG_TARGET}\n")));
    // GNU tar's own integrity pass over every member: no complaint.
    let r = tool(b.root(), "tar", &["--zstd", "-tf", s(&b.artifact)]).ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
}

#[test]
fn bsdtar_lists_exactly_the_manifest() {
    let b = build_fixture("tar.zst");
    let want = b.entries();
    // 1. `bsdtar -tvf` in archive order: perms, uid, gid, size, date, name.
    let r = tool_env(
        b.root(),
        "bsdtar",
        &["-tvf", s(&b.artifact)],
        &[("TZ", "UTC")],
    )
    .ok();
    assert!(r.stderr.is_empty(), "bsdtar warns: {}", r.stderr);
    let day = utc_date(b.sde(), "%b %e %Y");
    let day: Vec<&str> = day.split_whitespace().collect();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), want.len(), "bsdtar listing:\n{}", r.stdout);
    for (line, w) in lines.iter().zip(&want) {
        let (f, name) = fields(line, 8);
        let expect_perms = perms(w.kind, w.mode);
        let (uid, gid, size) = (w.uid.to_string(), w.gid.to_string(), w.size.to_string());
        assert_eq!(
            (f[0], f[2], f[3], f[4], &f[5..8], name),
            (
                expect_perms.as_str(),
                uid.as_str(),
                gid.as_str(),
                size.as_str(),
                &day[..],
                w.listed().as_str()
            ),
            "bsdtar line {line:?}"
        );
    }
    // 2. bsdtar's mtree view: exact mtime in seconds and libarchive's own
    //    sha256 of every file (mtree lists in its own order: compare as sets).
    let r = tool(
        b.root(),
        "bsdtar",
        &[
            "-cf",
            "-",
            "--format=mtree",
            "--options=!all,type,mode,uid,gid,size,time,link,sha256",
            &format!("@{}", s(&b.artifact)),
        ],
    )
    .ok();
    let mut mtree = std::collections::BTreeMap::new();
    for line in r.stdout.lines().filter(|l| !l.starts_with('#')) {
        let (f, rest) = fields(line, 1);
        let path = f[0].strip_prefix("./").expect("mtree paths start with ./");
        let kv: std::collections::BTreeMap<&str, &str> = rest
            .split_whitespace()
            .map(|kv| kv.split_once('=').expect("key=value"))
            .collect();
        mtree.insert(path.to_owned(), kv);
    }
    assert_eq!(mtree.len(), want.len(), "mtree:\n{}", r.stdout);
    let sde = format!("{}.0", b.sde());
    for w in &want {
        let kv = mtree
            .get(&w.path)
            .unwrap_or_else(|| panic!("{} missing from bsdtar's mtree", w.path));
        let kind = match w.kind {
            'd' => "dir",
            '-' => "file",
            _ => "link",
        };
        assert_eq!(kv["type"], kind, "{}", w.path);
        assert_eq!(kv["time"], sde, "{}", w.path);
        assert_eq!(
            u32::from_str_radix(kv["mode"], 8).unwrap(),
            w.mode,
            "{}",
            w.path
        );
        assert_eq!(kv["uid"], w.uid.to_string(), "{}", w.path);
        assert_eq!(kv["gid"], w.gid.to_string(), "{}", w.path);
        if w.kind == '-' {
            assert_eq!(kv["size"], w.size.to_string(), "{}", w.path);
            assert_eq!(Some(kv["sha256digest"]), w.sha256.as_deref(), "{}", w.path);
        }
        assert_eq!(kv.get("link").copied(), w.target.as_deref(), "{}", w.path);
    }
}

// ---------------------------------------------------------------------------
// Extraction.
// ---------------------------------------------------------------------------

/// The tree the fixture composes to, assembled from the overlay sources with
/// cp (lower layer first, so the replacement wins) plus what overlay.toml adds.
fn assemble_reference(root: &Path, out: &Path) {
    fs::create_dir_all(out).unwrap();
    for layer in ["base", "chain"] {
        let src = root.join(format!("overlays/{layer}/root/."));
        tool(root, "cp", &["-a", s(&src), s(out)]).ok();
    }
    fs::create_dir_all(out.join("var/lib/infrakit")).unwrap();
    fs::create_dir_all(out.join("var/lib/chain")).unwrap();
    symlink("/usr/share/zoneinfo/Etc/UTC", &out.join("etc/localtime"));
    symlink(LONG_TARGET, &out.join("usr/local/bin/validator-client"));
}

/// Every manifest entry is in `out` with its type, mode, owner, mtime and
/// content or target, and nothing else is.
fn check_extracted(b: &Built, out: &Path, who: &str) {
    let want = b.entries();
    let mut on_disk = list_files(out);
    let mut expected: Vec<String> = want.iter().map(|w| w.path.clone()).collect();
    on_disk.sort();
    expected.sort();
    assert_eq!(on_disk, expected, "{who}: extracted paths");
    for w in &want {
        let p = out.join(&w.path);
        let meta = fs::symlink_metadata(&p).unwrap();
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            '-'
        } else {
            '?'
        };
        assert_eq!(kind, w.kind, "{who}: {} type", w.path);
        assert_eq!(
            (meta.uid() as u64, meta.gid() as u64),
            (w.uid, w.gid),
            "{who}: {} owner",
            w.path
        );
        match w.kind {
            'l' => {
                let target = fs::read_link(&p).unwrap();
                assert_eq!(target.to_str(), w.target.as_deref(), "{who}: {}", w.path);
            }
            _ => {
                assert_eq!(
                    meta.permissions().mode() & 0o7777,
                    w.mode,
                    "{who}: {} mode",
                    w.path
                );
                assert_eq!(meta.mtime() as u64, b.sde(), "{who}: {} mtime", w.path);
            }
        }
        if w.kind == '-' {
            let bytes = fs::read(&p).unwrap();
            assert_eq!(bytes.len() as u64, w.size, "{who}: {} size", w.path);
            assert_eq!(
                Some(sha256_hex(&bytes)),
                w.sha256,
                "{who}: {} content",
                w.path
            );
            let src = b
                .root()
                .join(format!("overlays/{}/root/{}", w.layer, w.path));
            assert!(
                fs::read(&src).unwrap() == bytes,
                "{who}: {} differs from {src:?}",
                w.path
            );
        }
    }
}

#[test]
fn extraction_equals_the_composed_tree() {
    assert!(
        is_root(),
        "this test restores owners (990:990) on extraction: run the suite as root, as CI does"
    );
    let b = build_fixture("tar.zst");
    assert_matches_fixture_spec(&b);
    let root = b.root();
    let gnu = root.join("x-gnu");
    let bsd = root.join("x-bsd");
    fs::create_dir(&gnu).unwrap();
    fs::create_dir(&bsd).unwrap();
    let r = tool(
        root,
        "tar",
        &[
            "--zstd",
            "-xpf",
            s(&b.artifact),
            "-C",
            s(&gnu),
            "--numeric-owner",
        ],
    )
    .ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let r = tool(
        root,
        "bsdtar",
        &["-xpf", s(&b.artifact), "-C", s(&bsd), "--numeric-owner"],
    )
    .ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    check_extracted(&b, &gnu, "GNU tar");
    check_extracted(&b, &bsd, "bsdtar");

    // diff against the tree assembled from the sources (replacement included).
    let reference = root.join("reference");
    assemble_reference(root, &reference);
    for out in [&gnu, &bsd] {
        let r = tool(
            root,
            "diff",
            &["-r", "--no-dereference", s(&reference), s(out)],
        );
        assert_eq!(
            r.code, 0,
            "diff -r --no-dereference:\n{}{}",
            r.stdout, r.stderr
        );
    }
    // And the replaced file really is the upper layer's.
    assert_eq!(
        fs::read(gnu.join("etc/motd")).unwrap(),
        b"chain motd replaces base\n"
    );
}

/// GNU tar, given the tree extracted from `b` (owners and modes restored),
/// writes the same tar stream byte for byte, except the header checksum's
/// field format (GNU `%06o\0 `, ours `%07o\0`; ORACLES.md).
fn assert_gnu_tar_recreates(b: &Built) {
    assert!(
        is_root(),
        "needs root to restore owners: run the suite as root"
    );
    let root = b.root();
    let tree = root.join("tree");
    fs::create_dir(&tree).unwrap();
    tool(
        root,
        "tar",
        &["-xpf", s(&b.artifact), "-C", s(&tree), "--numeric-owner"],
    )
    .ok();
    let top: Vec<String> = b
        .entries()
        .into_iter()
        .filter(|e| !e.path.contains('/'))
        .map(|e| e.path)
        .collect();
    let mtime = format!("--mtime=@{}", b.sde());
    let reference = root.join("ref.tar");
    let mut args = vec![
        "--sort=name",
        "--format=gnu",
        "-b1",
        &mtime,
        "--numeric-owner",
        "-C",
        s(&tree),
        "-cf",
        s(&reference),
        "--",
    ];
    args.extend(top.iter().map(String::as_str));
    let r = tool_env(root, "tar", &args, &[]).ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let theirs = fs::read(&reference).unwrap();
    let decompress = if b.artifact.to_string_lossy().ends_with(".gz") {
        "gzip"
    } else {
        "zstd"
    };
    let ours = tool_bytes(root, decompress, &["-dc", s(&b.artifact)]);
    assert_eq!(ours.len(), theirs.len(), "tar stream sizes");
    let octal = |f: &[u8]| {
        let t: String = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as char)
            .collect();
        u64::from_str_radix(t.trim(), 8).expect("octal field")
    };
    let mut pos = 0;
    let mut headers = 0;
    while pos < ours.len() {
        let (a, g) = (&ours[pos..pos + 512], &theirs[pos..pos + 512]);
        if a.iter().all(|&c| c == 0) {
            assert!(g.iter().all(|&c| c == 0), "block at {pos}");
            pos += 512;
            continue;
        }
        headers += 1;
        assert_eq!(a[..148], g[..148], "header at {pos} (before checksum)");
        assert_eq!(a[156..], g[156..], "header at {pos} (after checksum)");
        assert_eq!(
            octal(&a[148..156]),
            octal(&g[148..156]),
            "checksum at {pos}"
        );
        let size = octal(&a[124..136]) as usize;
        let data = size.div_ceil(512) * 512;
        pos += 512;
        assert!(
            ours[pos..pos + data] == theirs[pos..pos + data],
            "data at {pos}"
        );
        pos += data;
    }
    // One header per entry plus the long-name/long-link records.
    assert!(headers >= b.entries().len(), "{headers} headers");
}

#[test]
fn gnu_tar_recreates_the_same_tar_stream() {
    let b = build_fixture("tar.zst");
    assert_gnu_tar_recreates(&b);
}

/// Names and link targets of 99, 100 and 101 bytes (where GNU long-name and
/// long-link records start), a multi-byte character cut by the 100-byte
/// name field, setuid/setgid/sticky modes: GNU tar and bsdtar read them as
/// the manifest says, GNU tar writes the same bytes, and `verify` accepts.
#[test]
fn name_length_boundaries_and_special_modes_match_gnu_tar() {
    let dir = tempdir();
    let root = dir.path();
    let o = root.join("overlays/edge/root");
    let mut names = Vec::new();
    for (c, n) in [('a', 97), ('b', 98), ('c', 99)] {
        // d/ + n letters: 99, 100, 101 bytes.
        names.push(format!("d/{}", c.to_string().repeat(n)));
    }
    // Directories whose member names (with the trailing /) are 99..101 bytes.
    for (c, n) in [('x', 98), ('y', 99), ('z', 100)] {
        names.push(format!("{}/f", c.to_string().repeat(n)));
    }
    // 100 bytes of two-byte characters, and 101 bytes with the cut inside one.
    names.push(format!("u/{}", "\u{e9}".repeat(49)));
    names.push(format!("v/x{}", "\u{e9}".repeat(49)));
    for n in &names {
        write(&o.join(n), format!("{n}\n"));
    }
    write(&o.join("bin/suid"), "#!/bin/sh\n");
    let mut toml = String::from(
        "allow-setuid = [\"bin/suid\"]\n\n\
         [[attr]]\npath = \"bin/suid\"\nmode = 0o4755\n\n\
         [[dir]]\npath = \"srv/shared\"\nmode = 0o2775\ngid = 50\n\n\
         [[dir]]\npath = \"tmp\"\nmode = 0o1777\n\n",
    );
    for (i, n) in [98usize, 99, 100].into_iter().enumerate() {
        // Absolute targets of 99, 100 and 101 bytes.
        let target = format!("/{}", "t".repeat(n));
        toml.push_str(&format!(
            "[[symlink]]\npath = \"links/l{i}\"\ntarget = \"{target}\"\n\n"
        ));
    }
    write(&root.join("overlays/edge/overlay.toml"), toml);
    write(
        &root.join("profiles/edge.toml"),
        "name = \"edge\"\nversion = \"0.0.1\"\nsource-date-epoch = 1234567890\noverlays = [\"edge\"]\n",
    );
    let (key, public) = keypair(root, "k");
    let b = build_profile(dir, "edge", "tar.zst", &["--sign-key", s(&key)]);
    let root = b.root();
    let lens: Vec<usize> = b.entries().iter().map(|e| e.member().len()).collect();
    for want in [99, 100, 101] {
        assert!(lens.contains(&want), "no member of {want} bytes: {lens:?}");
    }
    let modes: Vec<u32> = b.entries().iter().map(|e| e.mode).collect();
    for want in [0o4755, 0o2775, 0o1777] {
        assert!(modes.contains(&want), "mode {want:o} missing");
    }
    check_gnu_listing(&b, "--zstd");
    let r = tool_env(
        b.root(),
        "bsdtar",
        &["-tf", s(&b.artifact)],
        &[("LC_ALL", "C.UTF-8")],
    )
    .ok();
    let listed: Vec<String> = r.stdout.lines().map(str::to_owned).collect();
    let members: Vec<String> = b.entries().iter().map(Want::member).collect();
    assert_eq!(listed, members, "bsdtar names");
    assert_gnu_tar_recreates(&b);
    infrakit(root, &["verify", s(&b.artifact), "--key", s(&public)]).ok();
}

// ---------------------------------------------------------------------------
// Compression containers.
// ---------------------------------------------------------------------------

/// The number in `(N B)` on the line of `zstd -lv` that starts with `label`.
fn zstd_bytes(listing: &str, label: &str) -> u64 {
    let line = listing
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in zstd -lv:\n{listing}"));
    let inner = line
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(" B)"))
        .unwrap_or_else(|| panic!("no byte count in {line:?}"));
    inner.parse().expect("a number")
}

#[test]
fn zstd_checks_the_frame_checksum_and_sizes() {
    let b = build_fixture("tar.zst");
    let root = b.root();
    tool(root, "zstd", &["-t", s(&b.artifact)]).ok();
    let r = tool(root, "zstd", &["-lv", s(&b.artifact)]).ok();
    let listing = r.stdout;
    assert!(
        listing
            .lines()
            .any(|l| l.trim_start().starts_with("Check: XXH64")),
        "no checksum in zstd -lv:\n{listing}"
    );
    assert!(listing.contains("Zstandard Frames: 1"), "{listing}");
    let archive = &b.manifest["archive"];
    assert_eq!(
        zstd_bytes(&listing, "Decompressed Size:"),
        archive["tar_size"].as_u64().unwrap()
    );
    assert_eq!(
        zstd_bytes(&listing, "Compressed Size:"),
        archive["size"].as_u64().unwrap()
    );
    // The uncompressed stream's digest, by the stock tools.
    let tar = root.join("stream.tar");
    tool(root, "zstd", &["-d", "-q", s(&b.artifact), "-o", s(&tar)]).ok();
    assert_eq!(archive["tar_sha256"].as_str().unwrap(), sha256sum(&tar));
    let size = fs::metadata(&tar).unwrap().len();
    assert_eq!(size, archive["tar_size"].as_u64().unwrap());
    assert_eq!(size % 512, 0, "whole tar blocks");
    // A corrupted frame is caught by zstd's checksum.
    let mut bytes = fs::read(&b.artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = root.join("bad.tar.zst");
    fs::write(&bad, &bytes).unwrap();
    assert_ne!(tool(root, "zstd", &["-t", s(&bad)]).code, 0);
}

#[test]
fn gzip_format_carries_the_same_tar_stream() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let zst = build_fixture_in(dir, "tar.zst", &[]);
    let zst_manifest = zst.manifest.clone();
    let zst_listing = check_gnu_listing(&zst, "--zstd");
    let zst_artifact = zst.artifact.clone();
    let kept = zst.root().join("kept.tar.zst");
    fs::copy(&zst_artifact, &kept).unwrap();
    // Same repo, same dist: the gz build replaces the manifest the tar.zst
    // was signed with, so it removes the now-stale tar.zst and its signature.
    let gz = build_fixture_in(zst.dir, "tar.gz", &[]);
    let root = gz.root();
    assert!(!zst_artifact.exists() && gz.artifact.exists());
    tool(root, "gzip", &["-t", s(&gz.artifact)]).ok();
    let gz_listing = check_gnu_listing(&gz, "-z");
    assert_eq!(gz_listing, zst_listing, "GNU tar lists the same entries");
    let (a, b) = (&zst_manifest["archive"], &gz.manifest["archive"]);
    assert_eq!(b["format"], "tar.gz");
    assert_eq!(a["tar_sha256"], b["tar_sha256"], "same tar stream");
    assert_eq!(a["tar_size"], b["tar_size"]);
    assert_eq!(zst_manifest["entries"], gz.manifest["entries"]);
    assert_eq!(b["sha256"].as_str().unwrap(), sha256sum(&gz.artifact));
    // Stock decompressors give that stream.
    let from_gz = tool_bytes(root, "gzip", &["-dc", s(&gz.artifact)]);
    let from_zst = tool_bytes(root, "zstd", &["-dc", s(&kept)]);
    assert_eq!(sha256_hex(&from_gz), b["tar_sha256"].as_str().unwrap());
    assert!(from_gz == from_zst);
    // The gzip header carries no timestamp and OS byte 255 (ORACLES.md).
    let head = fs::read(&gz.artifact).unwrap();
    assert_eq!(&head[..3], &[0x1f, 0x8b, 8], "gzip magic, deflate");
    assert_eq!(&head[4..8], &[0, 0, 0, 0], "gzip mtime 0");
    assert_eq!(head[9], 255, "gzip OS byte");
    let r = tool(root, "gzip", &["-lq", s(&gz.artifact)]).ok();
    let (f, _) = fields(r.stdout.trim(), 2);
    assert_eq!(f[1], b["tar_size"].as_u64().unwrap().to_string(), "gzip -l");
}

/// Open bug: both formats share `<name>.manifest.json`, so building the same
/// profile as tar.zst and then as tar.gz into one `--out` directory replaces
/// the manifest the tar.zst's signature binds, and leaves `fixture.tar.zst`
/// and its `.minisig` behind unverifiable (`verify` exits 1). Whatever the
/// fix (a manifest per format, or removing the stale outputs), every signed
/// artifact left in the directory must verify.
#[test]
fn both_formats_in_one_out_dir_stay_verifiable() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let (key, public) = keypair(dir.path(), "release");
    let b = build_fixture_in(dir, "tar.zst", &["--sign-key", s(&key)]);
    let b = build_fixture_in(b.dir, "tar.gz", &["--sign-key", s(&key)]);
    let root = b.root();
    let mut checked = 0;
    for ext in ["tar.zst", "tar.gz"] {
        let artifact = root.join(format!("dist/fixture.{ext}"));
        let sig = root.join(format!("dist/fixture.{ext}.minisig"));
        if !(artifact.exists() && sig.exists()) {
            continue;
        }
        checked += 1;
        minisign_verify(root, &artifact, &public, &["-H"]).ok();
        let r = infrakit(root, &["verify", s(&artifact), "--key", s(&public)]);
        assert_eq!(
            r.code,
            0,
            "dist/fixture.{ext} and its signature are still there but do not verify: {}\n{:?}",
            r.stderr,
            list_files(&root.join("dist"))
        );
    }
    assert!(checked >= 1, "the last build's artifact is there");
}

// ---------------------------------------------------------------------------
// minisign interoperability.
// ---------------------------------------------------------------------------

/// `minisign -Vm FILE -p PUB` (plus `extra` flags).
fn minisign_verify(cwd: &Path, file: &Path, public: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["-V"];
    args.extend_from_slice(extra);
    args.extend(["-m", s(file), "-p", s(public)]);
    tool(cwd, "minisign", &args)
}

fn expected_comment(b: &Built, version: &str) -> String {
    format!(
        "name:fixture version:{version} manifest-sha256:{}",
        sha256sum(&b.manifest_path)
    )
}

/// The key id minisign prints in a public key's comment line.
fn minisign_key_id(public: &Path) -> String {
    let text = fs::read_to_string(public).unwrap();
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("untrusted comment: minisign public key "))
        .unwrap_or_else(|| panic!("{public:?} has no key id comment: {text}"))
        .trim()
        .to_owned()
}

#[test]
fn infrakit_signatures_verify_with_stock_minisign() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let (key, public) = keypair(dir.path(), "release");
    let b = build_fixture_in(dir, "tar.zst", &["--sign-key", s(&key)]);
    let root = b.root();
    let sig = PathBuf::from(format!("{}.minisig", s(&b.artifact)));
    let text = fs::read_to_string(&sig).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("untrusted comment: "), "{text}");
    assert_eq!(
        lines[2],
        format!("trusted comment: {}", expected_comment(&b, "1.2.3"))
    );
    assert!(text.ends_with('\n'));

    minisign_verify(root, &b.artifact, &public, &[]).ok();
    minisign_verify(root, &b.artifact, &public, &["-H"]).ok();
    let q = minisign_verify(root, &b.artifact, &public, &["-Q"]).ok();
    assert_eq!(q.stdout.trim_end(), expected_comment(&b, "1.2.3"));
    let q = minisign_verify(root, &b.artifact, &public, &["-H", "-Q"]).ok();
    assert_eq!(q.stdout.trim_end(), expected_comment(&b, "1.2.3"));
    // A --release-version is what gets signed.
    let b2 = build_fixture_in(
        {
            let d = tempfile::TempDir::new_in(root).unwrap();
            fixture_repo(d.path(), true);
            d
        },
        "tar.gz",
        &["--sign-key", s(&key), "--release-version", "2.0.0-rc.1"],
    );
    let q = minisign_verify(root, &b2.artifact, &public, &["-H", "-Q"]).ok();
    assert_eq!(q.stdout.trim_end(), expected_comment(&b2, "2.0.0-rc.1"));

    // Stock minisign signs the artifact into `sig` (with `extra` flags), and
    // infrakit verifies that signature with the public key.
    let stock_sign = |extra: &[&str], sig: &Path| {
        let mut args = vec!["-S"];
        args.extend_from_slice(extra);
        args.extend(["-s", s(&key), "-m", s(&b.artifact), "-x", s(sig)]);
        tool(root, "minisign", &args).ok();
    };
    let verify_sig = |sig: &Path| {
        infrakit(
            root,
            &[
                "verify",
                s(&b.artifact),
                "--key",
                s(&public),
                "--signature",
                s(sig),
            ],
        )
    };

    // The other way: stock minisign signs (prehashed, the default) with the
    // key infrakit made, with infrakit's trusted comment: infrakit accepts.
    let own = root.join("stock.minisig");
    let comment = expected_comment(&b, "1.2.3");
    stock_sign(&["-t", &comment], &own);
    let run = verify_sig(&own).ok();
    assert!(
        run.stdout.contains("verified fixture 1.2.3"),
        "{}",
        run.stdout
    );
    // A legacy (non-prehashed) stock signature is refused, as a failed check.
    let legacy = root.join("legacy.minisig");
    stock_sign(&["-l", "-t", &comment], &legacy);
    let run = verify_sig(&legacy).expect_code(1);
    assert!(run.stderr.contains("legacy"), "{}", run.stderr);
    // Stock minisign's own default trusted comment binds no manifest: refused.
    let plain = root.join("plain.minisig");
    stock_sign(&[], &plain);
    verify_sig(&plain).expect_code(1);
}

#[test]
fn stock_unencrypted_key_signs_with_infrakit() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let root = dir.path().to_path_buf();
    let (key, public) = (root.join("stock.key"), root.join("stock.pub"));
    tool(
        &root,
        "minisign",
        &["-G", "-W", "-p", s(&public), "-s", s(&key)],
    )
    .ok();
    let b = build_fixture_in(dir, "tar.zst", &["--sign-key", s(&key)]);
    minisign_verify(&root, &b.artifact, &public, &["-H"]).ok();
    let q = minisign_verify(&root, &b.artifact, &public, &["-Q"]).ok();
    assert_eq!(q.stdout.trim_end(), expected_comment(&b, "1.2.3"));
    let run = infrakit(&root, &["verify", s(&b.artifact), "--key", s(&public)]).ok();
    let id = minisign_key_id(&public);
    assert!(
        run.stdout.contains(&format!("signed by key {id}")),
        "key id {id}: {}",
        run.stdout
    );
}

/// All the scrypt work of the suite (about 1 GiB and a few seconds each) is
/// here, two or three operations at a time: stock minisign's encrypted key
/// signs with infrakit, a wrong password is refused, and infrakit's
/// encrypted key signs with stock minisign.
#[test]
fn encrypted_keys_interoperate_with_stock_minisign() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let root = dir.path();
    let pw = root.join("pw.txt");
    write(&pw, "pw\n");
    let wrong = root.join("wrong.txt");
    write(&wrong, "wrong-horse-battery\n");
    let (ekey, epub) = (root.join("e.key"), root.join("e.pub"));
    let ik = root.join("ik");

    // Phase 1: two keys, in parallel.
    std::thread::scope(|t| {
        t.spawn(|| {
            tool_stdin(
                root,
                "minisign",
                &["-G", "-p", s(&epub), "-s", s(&ekey)],
                b"pw\npw\n",
            )
            .ok();
        });
        infrakit(
            root,
            &["keygen", "--out", s(&ik), "--password-file", s(&pw)],
        )
        .ok();
    });
    let ik_key = root.join("ik.key");
    let ik_pub = root.join("ik.pub");
    let ik_text = fs::read_to_string(&ik_key).unwrap();
    assert!(
        ik_text.starts_with("untrusted comment: minisign encrypted secret key\n"),
        "{ik_text}"
    );
    assert_eq!(
        fs::metadata(&ik_key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let signed_file = root.join("message.txt");
    write(
        &signed_file,
        "signed by stock minisign with an infrakit key\n",
    );

    // Phase 2: build with the right and a wrong password, and stock minisign
    // signs with infrakit's encrypted key, in parallel.
    let (good, bad, stock_sign) = std::thread::scope(|t| {
        let good = t.spawn(|| {
            infrakit(
                root,
                &[
                    "build",
                    "profiles/fixture.toml",
                    "--out",
                    "dist",
                    "--sign-key",
                    s(&ekey),
                    "--password-file",
                    s(&pw),
                ],
            )
        });
        // The wrong password comes through $INFRAKIT_PASSWORD_FILE.
        let bad = t.spawn(|| {
            infrakit_env(
                root,
                &[
                    "build",
                    "profiles/fixture.toml",
                    "--out",
                    "dist-bad",
                    "--sign-key",
                    s(&ekey),
                ],
                &[("INFRAKIT_PASSWORD_FILE", s(&wrong))],
            )
        });
        let stock = tool_stdin(
            root,
            "minisign",
            &[
                "-S",
                "-s",
                s(&ik_key),
                "-m",
                s(&signed_file),
                "-t",
                "interop",
            ],
            b"pw\n",
        );
        (good.join().unwrap(), bad.join().unwrap(), stock)
    });
    good.ok();
    let bad = bad.expect_code(2);
    assert!(bad.stderr.contains("wrong password"), "{}", bad.stderr);
    assert!(
        !bad.stderr.contains("wrong-horse"),
        "password echoed: {}",
        bad.stderr
    );
    let leftovers = fs::read_dir(root.join("dist-bad"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "a failed build leaves no output");
    stock_sign.ok();
    // No password at all: refused before any key derivation.
    let r = infrakit(
        root,
        &[
            "build",
            "profiles/fixture.toml",
            "--out",
            "dist-none",
            "--sign-key",
            s(&ekey),
        ],
    )
    .expect_code(2);
    assert!(r.stderr.contains("encrypted"), "{}", r.stderr);
    assert!(!root.join("dist-none").exists());

    // Phase 3: the stock verifier and ours agree.
    let artifact = root.join("dist/fixture.tar.zst");
    minisign_verify(root, &artifact, &epub, &["-H"]).ok();
    let run = infrakit(root, &["verify", s(&artifact), "--key", s(&epub)]).ok();
    assert!(
        run.stdout
            .contains(&format!("signed by key {}", minisign_key_id(&epub))),
        "{}",
        run.stdout
    );
    let q = minisign_verify(root, &signed_file, &ik_pub, &["-Q"]).ok();
    assert_eq!(q.stdout.trim_end(), "interop");
}

// ---------------------------------------------------------------------------
// keygen and inspect.
// ---------------------------------------------------------------------------

#[test]
fn keygen_never_overwrites_and_sets_modes() {
    let dir = tempdir();
    let root = dir.path();
    // Whatever the umask, the secret key is 0600 and the public key 0644.
    for (umask, name) in [("000", "open"), ("077", "closed"), ("022", "usual")] {
        let prefix = root.join(name);
        let script = format!("umask {umask}; exec \"$0\" keygen --out \"$1\"");
        let r = tool(root, "sh", &["-c", &script, s(&bin()), s(&prefix)]).ok();
        assert!(r.stdout.contains("unencrypted"), "{}", r.stdout);
        assert_eq!(
            mode(&root.join(format!("{name}.key"))),
            0o600,
            "umask {umask}"
        );
        assert_eq!(
            mode(&root.join(format!("{name}.pub"))),
            0o644,
            "umask {umask}"
        );
    }
    // The stock tool takes the unencrypted key and its public half.
    let msg = root.join("m.txt");
    write(&msg, "x\n");
    tool(
        root,
        "minisign",
        &["-S", "-s", s(&root.join("usual.key")), "-m", s(&msg)],
    )
    .ok();
    minisign_verify(root, &msg, &root.join("usual.pub"), &[]).ok();

    // A second keygen to the same prefix is refused; nothing changes.
    let key_before = fs::read(root.join("usual.key")).unwrap();
    let pub_before = fs::read(root.join("usual.pub")).unwrap();
    let r = infrakit(root, &["keygen", "--out", s(&root.join("usual"))]).expect_code(2);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert_eq!(fs::read(root.join("usual.key")).unwrap(), key_before);
    assert_eq!(fs::read(root.join("usual.pub")).unwrap(), pub_before);
    assert_eq!(mode(&root.join("usual.key")), 0o600);

    // Either half existing is enough to refuse, and the other is not made.
    write(&root.join("half.pub"), "not mine\n");
    infrakit(root, &["keygen", "--out", s(&root.join("half"))]).expect_code(2);
    assert!(!root.join("half.key").exists());
    assert_eq!(fs::read(root.join("half.pub")).unwrap(), b"not mine\n");
    write(&root.join("other.key"), "not mine either\n");
    infrakit(root, &["keygen", "--out", s(&root.join("other"))]).expect_code(2);
    assert!(!root.join("other.pub").exists());
    assert_eq!(
        fs::read(root.join("other.key")).unwrap(),
        b"not mine either\n"
    );
    // A dangling symlink is not followed to plant a key elsewhere.
    let elsewhere = root.join("elsewhere.key");
    symlink(s(&elsewhere), &root.join("dangling.key"));
    infrakit(root, &["keygen", "--out", s(&root.join("dangling"))]).expect_code(2);
    assert!(!elsewhere.exists() && !root.join("dangling.pub").exists());
    // No temp files left behind by the refusals.
    let mut names = list_files(root);
    names.sort();
    assert_eq!(
        names,
        [
            "closed.key",
            "closed.pub",
            "dangling.key",
            "half.pub",
            "m.txt",
            "m.txt.minisig",
            "open.key",
            "open.pub",
            "other.key",
            "usual.key",
            "usual.pub",
        ]
    );
}

#[test]
fn inspect_shows_the_manifest() {
    let b = build_fixture("tar.zst");
    let root = b.root();
    // --json, from the manifest or from the artifact: the manifest as
    // written, and from the artifact every member as read, matching it.
    let written: serde_json::Value = serde_json::from_slice(&b.manifest_bytes).unwrap();
    for target in [&b.manifest_path, &b.artifact] {
        let out = Command::new(bin())
            .args(["inspect", s(target), "--json"])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["manifest"], written, "inspect {target:?} --json");
        assert_eq!(doc["schema"], 1);
        assert_eq!(doc["signature"]["checked"], false);
        if target == &b.artifact {
            let members = doc["members"].as_array().unwrap();
            assert_eq!(members.len(), b.entries().len());
            assert!(
                members.iter().all(|m| m["matches_manifest"] == true),
                "{doc}"
            );
            assert_eq!(doc["artifact"]["matches_manifest"], true);
            assert_eq!(doc["artifact"]["sha256"], written["archive"]["sha256"]);
        }
    }
    // Human form: the header and one line per entry.
    let r = infrakit(root, &["inspect", s(&b.artifact)]).ok();
    let m = &b.manifest;
    for want in [
        "name:        fixture".to_owned(),
        "version:     1.2.3".to_owned(),
        format!("source date: {}", b.sde()),
        format!(
            "artifact:    tar.zst {} bytes sha256 {}",
            m["archive"]["size"],
            m["archive"]["sha256"].as_str().unwrap()
        ),
        format!("entries:     {}", b.entries().len()),
    ] {
        assert!(
            r.stdout.lines().any(|l| l == want),
            "{want:?} in:\n{}",
            r.stdout
        );
    }
    assert!(r.stdout.contains("not checked here"), "{}", r.stdout);
    let entry_lines: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(entry_lines.len(), b.entries().len(), "{}", r.stdout);
    for (line, w) in entry_lines.iter().zip(b.entries()) {
        let (f, rest) = fields(line, 2);
        assert_eq!(f, [w.kind.to_string(), format!("{:04o}", w.mode)], "{line}");
        let suffix = match (&w.target, w.kind) {
            (Some(t), _) => format!(" -> {t}"),
            (None, 'd') => "/".to_owned(),
            _ => String::new(),
        };
        let tail = format!("  {}{suffix}  [{}]", w.path, w.layer);
        assert!(rest.ends_with(&tail), "{line:?} should end with {tail:?}");
        assert!(rest.contains(&format!("{}:", w.uid)), "{line}");
    }
}
