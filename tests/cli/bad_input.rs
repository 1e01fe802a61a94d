//! Bad input: every mistake a user can make in a profile, an overlay or on
//! the command line is one clear line on stderr (`infrakit: FILE[:LINE:COL]:
//! what is wrong; what to do`), exit code 2, no panic, and no output left
//! behind (the output directory is absent or empty: no temp files either).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use crate::support::*;

const GOOD_PROFILE: &str = "name = \"p\"\nversion = \"1.0.0\"\noverlays = [\"a\"]\n";
const TWO_LAYERS: &str = "name = \"p\"\nversion = \"1.0.0\"\noverlays = [\"a\", \"b\"]\n";

/// A small valid repo: overlay `a` with `etc/motd`, an empty overlay `b`, and
/// `profiles/p.toml` using `a` only.
fn repo() -> Repo {
    let repo = Repo::new();
    repo.root_file("a", "etc/motd", "hello\n");
    fs::create_dir_all(repo.path().join("overlays/b/root")).expect("mkdir");
    repo.file(PROFILE, GOOD_PROFILE);
    repo
}

#[test]
fn the_base_repo_builds() {
    // Control: every case below changes one thing in this repo.
    let dir = repo();
    infrakit(dir.path(), &["build", PROFILE, "--out", "dist"]).ok();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    infrakit(dir.path(), &["build", PROFILE, "--out", "dist2"]).ok();
}

// ---- profiles -------------------------------------------------------------

#[test]
fn malformed_toml() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        "name = \"x\nversion = \"1.0.0\"\n",
    );
    let line = dir.refused();
    // The string runs to the end of line 1 (9 characters): column 10.
    has(
        &line,
        &["infrakit: error: profiles/p.toml:1:10: ", "string"],
    );
}

#[test]
fn malformed_toml_unclosed_array() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        "# a comment\nname = \"p\"\nversion = \"1.0.0\"\noverlays = [\"a\"\n",
    );
    let line = dir.refused();
    has(&line, &["infrakit: error: profiles/p.toml:4:", "array"]);
}

#[test]
fn unknown_key_in_profile() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        format!("{GOOD_PROFILE}surprise = 1\n"),
    );
    let line = dir.refused();
    has(
        &line,
        &[
            "infrakit: error: profiles/p.toml:4:1: unknown field `surprise`",
            "expected one of",
            "`source-date-epoch`",
        ],
    );
}

#[test]
fn missing_required_key() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        "name = \"p\"\nversion = \"1.0.0\"\n",
    );
    let line = dir.refused();
    has(&line, &["infrakit: error: profiles/p.toml:", "`overlays`"]);
}

#[test]
fn bad_version() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        "name = \"p\"\nversion = \"one\"\noverlays = [\"a\"]\n",
    );
    let line = dir.refused();
    has(
        &line,
        &[
            "infrakit: error: profiles/p.toml:2:11: version \"one\" is not semver",
            "write it like \"1.2.3\"",
        ],
    );
}

#[test]
fn bad_name_golden() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        "name = \"P!\"\nversion = \"1.0.0\"\noverlays = [\"a\"]\n",
    );
    assert_eq!(
        dir.refused(),
        "infrakit: error: profiles/p.toml:1:8: name \"P!\" must be lowercase letters, digits and `-`"
    );
}

#[test]
fn negative_source_date_epoch() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        format!("{GOOD_PROFILE}source-date-epoch = -5\n"),
    );
    let line = dir.refused();
    has(
        &line,
        &["infrakit: error: profiles/p.toml:4:21: source-date-epoch must not be negative"],
    );
}

#[test]
fn missing_overlay_golden() {
    let dir = repo();
    write(
        &dir.path().join(PROFILE),
        "name = \"p\"\nversion = \"1.0.0\"\noverlays = [\"a\", \"nope\"]\n",
    );
    assert_eq!(
        dir.refused(),
        "infrakit: error: profiles/p.toml:3:18: overlay \"nope\" not found: overlays/nope is not a directory"
    );
}

#[test]
fn empty_and_duplicate_and_malformed_overlay_lists() {
    let dir = repo();
    let cases = [
        (
            "overlays = []\n",
            "infrakit: error: profiles/p.toml:3:12: overlays is empty: name at least one overlay",
        ),
        (
            "overlays = [\"a\", \"a\"]\n",
            "infrakit: error: profiles/p.toml:3:18: overlay \"a\" is listed twice",
        ),
        (
            "overlays = [\"a/b\"]\n",
            "infrakit: error: profiles/p.toml:3:13: overlay \"a/b\" is neither a bare name",
        ),
    ];
    for (overlays, want) in cases {
        write(
            &dir.path().join(PROFILE),
            format!("name = \"p\"\nversion = \"1.0.0\"\n{overlays}"),
        );
        has(&dir.refused(), &[want]);
    }
}

#[test]
fn profile_not_utf8() {
    let dir = repo();
    write(&dir.path().join(PROFILE), b"name = \"\xff\"\n");
    has(
        &dir.refused(),
        &["infrakit: error: profiles/p.toml: profile is not valid UTF-8"],
    );
}

#[test]
fn missing_profile_file() {
    let dir = repo();
    let line = refuse(
        dir.path(),
        &["build", "profiles/missing.toml", "--out", "dist"],
        &[],
    );
    has(
        &line,
        &["infrakit: error: profiles/missing.toml: reading profile: No such file or directory"],
    );
}

// ---- overlays -------------------------------------------------------------

#[test]
fn unknown_key_in_overlay_toml() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(&dir.path().join("overlays/b/overlay.toml"), "bogus = 1\n");
    has(
        &dir.refused(),
        &["infrakit: error: overlays/b/overlay.toml:1:1: unknown field `bogus`"],
    );
    // Inside a table too.
    write(
        &dir.path().join("overlays/b/overlay.toml"),
        "[[dir]]\npath = \"var/x\"\nmodee = 0o700\n",
    );
    has(
        &dir.refused(),
        &["infrakit: error: overlays/b/overlay.toml:3:1: unknown field `modee`"],
    );
}

#[test]
fn malformed_overlay_toml() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(&dir.path().join("overlays/b/overlay.toml"), "[[dir\n");
    has(
        &dir.refused(),
        &["infrakit: error: overlays/b/overlay.toml:1:6: "],
    );
}

#[test]
fn bad_values_in_overlay_toml() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    let cases = [
        (
            "[[dir]]\npath = \"var/x\"\nuid = -1\n",
            "infrakit: error: overlays/b/overlay.toml:3:7: uid -1 is out of range",
        ),
        (
            "[[dir]]\npath = \"var/x\"\nmode = 0o17777\n",
            "infrakit: error: overlays/b/overlay.toml:3:8: mode 8191 is not a permission mode; write it in octal like 0o644",
        ),
        (
            "[[dir]]\npath = \"../x\"\n",
            "infrakit: error: overlays/b/overlay.toml:2:8: bad path",
        ),
        (
            "[[attr]]\npath = \"nothing/*\"\nmode = 0o600\n",
            "infrakit: error: overlays/b/overlay.toml:2:8: attr pattern \"nothing/*\" matches nothing",
        ),
        (
            "replace = [\"etc/motd\"]\n",
            "infrakit: error: overlays/b/overlay.toml:1:12: replace names etc/motd, which this overlay does not provide",
        ),
    ];
    for (toml, want) in cases {
        write(&dir.path().join("overlays/b/overlay.toml"), toml);
        has(&dir.refused(), &[want]);
    }
}

#[test]
fn escaping_symlink_in_overlay_toml_golden() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(
        &dir.path().join("overlays/b/overlay.toml"),
        "[[symlink]]\npath = \"etc/x\"\ntarget = \"../../../etc/shadow\"\n",
    );
    assert_eq!(
        dir.refused(),
        "infrakit: error: overlays/b/overlay.toml:3:10: symlink etc/x -> ../../../etc/shadow escapes the root; point it inside the tree"
    );
}

#[test]
fn escaping_symlink_in_root() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    symlink(
        "../../../etc/shadow",
        &dir.path().join("overlays/b/root/etc/x"),
    );
    assert_eq!(
        dir.refused(),
        "infrakit: error: overlays/b/root/etc/x: symlink etc/x -> ../../../etc/shadow escapes the root; point it inside the tree"
    );
    // One `..` too many at the top level as well.
    fs::remove_file(dir.path().join("overlays/b/root/etc/x")).expect("rm");
    symlink("..", &dir.path().join("overlays/b/root/up"));
    has(
        &dir.refused(),
        &["infrakit: error: overlays/b/root/up: symlink up -> .. escapes the root"],
    );
}

/// Regression: every link stayed inside on its own, but `esc -> up/..`
/// through `up -> .` resolves to the root's parent; the chain crosses layers.
#[test]
fn symlink_chain_escaping_the_root_golden() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    symlink(".", &dir.path().join("overlays/a/root/up"));
    symlink("up/..", &dir.path().join("overlays/b/root/esc"));
    assert_eq!(
        dir.refused(),
        "infrakit: error: profiles/p.toml: symlink esc -> up/.. (layer \"b\") resolves above the root; point it inside the tree"
    );
}

/// Regression: a multi-byte character in a digest field panicked `inspect`.
#[test]
fn inspect_of_a_manifest_with_a_bad_digest_is_an_error_not_a_panic() {
    let dir = tempdir();
    let bad = format!(
        "{{\"archive\":{{\"format\":\"tar.zst\",\"sha256\":\"a\u{e9}{}\",\"size\":1,\"tar_sha256\":\"{}\",\"tar_size\":1}},\"entries\":[],\"layers\":[],\"name\":\"p\",\"profile_sha256\":\"{}\",\"schema\":1,\"source_date_epoch\":0,\"version\":\"1.0.0\"}}\n",
        "a".repeat(61),
        "a".repeat(64),
        "a".repeat(64)
    );
    write(&dir.path().join("p.manifest.json"), bad);
    let run = infrakit(dir.path(), &["inspect", "p.manifest.json"]).expect_code(2);
    assert!(
        run.stderr.contains("expected 64 lowercase hex digits"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("panicked"), "{run:?}");
}

#[test]
fn two_layer_conflict_golden() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(&dir.path().join("overlays/b/root/etc/motd"), "other\n");
    assert_eq!(
        dir.refused(),
        "infrakit: error: profiles/p.toml: conflict at etc/motd: provided by layer \"a\" and layer \"b\"; \
         add it to `replace` in \"b\"'s overlay.toml (adapter.toml for an adapter) if the upper layer should win"
    );
    // Control: with `replace` it builds.
    write(
        &dir.path().join("overlays/b/overlay.toml"),
        "replace = [\"etc/motd\"]\n",
    );
    infrakit(dir.path(), &["build", PROFILE, "--out", "dist"]).ok();
}

#[test]
fn explicit_directory_conflict() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(
        &dir.path().join("overlays/b/overlay.toml"),
        "[[dir]]\npath = \"etc\"\nmode = 0o700\n",
    );
    has(
        &dir.refused(),
        &[
            "infrakit: error: profiles/p.toml: conflict at directory etc:",
            "replace",
        ],
    );
}

#[test]
fn type_clash_file_vs_dir() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(&dir.path().join("overlays/b/root/etc/motd/inner"), "x\n");
    has(
        &dir.refused(),
        &[
            "infrakit: error: profiles/p.toml: type clash at etc/motd: layer \"a\" has a file, layer \"b\" a dir",
        ],
    );
}

#[test]
fn symlink_declared_over_a_file_of_the_same_overlay() {
    let dir = repo();
    write(&dir.path().join(PROFILE), TWO_LAYERS);
    write(&dir.path().join("overlays/b/root/etc/motd"), "x\n");
    write(
        &dir.path().join("overlays/b/overlay.toml"),
        "[[symlink]]\npath = \"etc/motd\"\ntarget = \"issue\"\n",
    );
    has(
        &dir.refused(),
        &[
            "infrakit: error: overlays/b/overlay.toml:2:8: etc/motd is declared as a symlink but this overlay already provides it",
        ],
    );
}

#[test]
fn fifo_in_root() {
    let dir = repo();
    let fifo = dir.path().join("overlays/a/root/etc/pipe");
    tool(dir.path(), "mkfifo", &[s(&fifo)]).ok();
    has(
        &dir.refused(),
        &[
            "infrakit: error: overlays/a/root/etc/pipe: a fifo cannot be part of an overlay; remove it from root/",
        ],
    );
}

#[test]
fn non_utf8_file_name_in_root() {
    let dir = repo();
    let name = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
    let path = dir.path().join("overlays/a/root/etc").join(name);
    write(&path, "x\n");
    has(
        &dir.refused(),
        &[
            "infrakit: error: overlays/a/root/etc/bad-",
            "file name is not valid UTF-8; rename it",
        ],
    );
}

/// Runs `infrakit build profiles/p.toml --out OUT` as `nobody` when we are
/// root (root reads mode-0000 files), as ourselves otherwise.
fn build_unprivileged(dir: &Path, out: &str) -> Run {
    if !is_root() {
        return infrakit(dir, &["build", PROFILE, "--out", out]);
    }
    require_tool("setpriv");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["build", PROFILE, "--out", out])
        .current_dir(dir);
    Run::from(clear_build_env(&mut cmd).output().expect("setpriv runs"))
}

/// Every directory 0755 and file 0644 (so `nobody` can read the tree), and
/// an empty directory `w` that the build may write in (owned by `nobody`
/// when we are root). Returns `w`.
fn open_up(dir: &Path) -> std::path::PathBuf {
    for e in walkdir::WalkDir::new(dir).follow_links(false) {
        let e = e.expect("walk");
        if e.file_type().is_dir() {
            chmod(e.path(), 0o755);
        } else if e.file_type().is_file() {
            chmod(e.path(), 0o644);
        }
    }
    let w = dir.join("w");
    fs::create_dir_all(&w).expect("mkdir w");
    if is_root() {
        std::os::unix::fs::chown(&w, Some(65534), Some(65534)).expect("chown w");
    }
    w
}

/// Every file below `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    list_files(dir)
        .into_iter()
        .map(|n| {
            let bytes = fs::read(dir.join(&n)).expect("read");
            (n, bytes)
        })
        .collect()
}

/// A repo whose overlay `a` has an unreadable `etc/secret`: the build fails
/// only after it has started writing (the file is opened while archiving).
fn repo_with_unreadable_file() -> (Repo, std::path::PathBuf) {
    let dir = repo();
    let secret = dir.path().join("overlays/a/root/etc/secret");
    write(&secret, "s3cret\n");
    let w = open_up(dir.path());
    chmod(&secret, 0o000);
    (dir, w)
}

const UNREADABLE: &str = "infrakit: error: overlays/a/root/etc/secret: opening for reading: Permission denied (os error 13)\n";

#[test]
fn unreadable_file_leaves_earlier_outputs_alone() {
    let dir = repo();
    let secret = dir.path().join("overlays/a/root/etc/secret");
    write(&secret, "s3cret\n");
    open_up(dir.path());
    // A good build first: its outputs must survive the failed one intact.
    let first = build_unprivileged(dir.path(), "w/dist").ok();
    assert!(first.stdout.contains("built p 1.0.0"), "{}", first.stdout);
    let before = snapshot(&dir.path().join("w/dist"));
    assert_eq!(before.len(), 2, "{before:?}");

    chmod(&secret, 0o000);
    let run = build_unprivileged(dir.path(), "w/dist");
    // The output directory is not empty here (earlier outputs): check the
    // line by hand, then that exactly the earlier files remain, unchanged.
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert_eq!(run.stderr, UNREADABLE);
    assert!(
        before == snapshot(&dir.path().join("w/dist")),
        "outputs changed or temp files left behind"
    );
}

#[test]
fn unreadable_file_leaves_no_output_directory() {
    let (dir, w) = repo_with_unreadable_file();
    let run = build_unprivileged(dir.path(), "w/dist");
    let line = assert_refused(&run, &w.join("dist"));
    assert_eq!(format!("{line}\n"), UNREADABLE);
    assert_eq!(list_files(&w), Vec::<String>::new(), "left behind in w/");
}

#[test]
fn unreadable_file_leaves_no_nested_output_directories() {
    // `--out` may name several missing levels; a failed build must remove
    // every level it created, not only the last.
    let (dir, w) = repo_with_unreadable_file();
    let run = build_unprivileged(dir.path(), "w/new/nested/dist");
    let line = assert_refused(&run, &w.join("new/nested/dist"));
    assert_eq!(format!("{line}\n"), UNREADABLE);
    assert_eq!(list_files(&w), Vec::<String>::new(), "left behind in w/");
}

#[test]
fn unreadable_directory_and_overlay_toml() {
    let dir = repo();
    write(&dir.path().join("overlays/a/root/etc/locked/f"), "x\n");
    write(
        &dir.path().join("overlays/a/overlay.toml"),
        "[[dir]]\npath = \"var\"\n",
    );
    let w = open_up(dir.path());
    let locked = dir.path().join("overlays/a/root/etc/locked");
    chmod(&locked, 0o000);
    let run = build_unprivileged(dir.path(), "w/dist");
    has(
        &assert_refused(&run, &w.join("dist")),
        &[
            "infrakit: error: overlays/a/root/etc/locked: walking overlay: ",
            "Permission denied",
        ],
    );
    chmod(&locked, 0o755);
    let toml = dir.path().join("overlays/a/overlay.toml");
    chmod(&toml, 0o000);
    let run = build_unprivileged(dir.path(), "w/dist");
    has(
        &assert_refused(&run, &w.join("dist")),
        &[
            "infrakit: error: overlays/a/overlay.toml: reading overlay.toml: ",
            "Permission denied",
        ],
    );
    assert_eq!(list_files(&w), Vec::<String>::new(), "left behind in w/");
}

// ---- flags and environment --------------------------------------------------

#[test]
fn level_out_of_range() {
    let dir = repo();
    let line = refuse(
        dir.path(),
        &["build", PROFILE, "--out", "dist", "--level", "99"],
        &[],
    );
    assert_eq!(
        line,
        "infrakit: error: --level: 99 is out of range for tar.zst: use 1 to 22"
    );
    let line = refuse(
        dir.path(),
        &[
            "build", PROFILE, "--out", "dist", "--format", "tar.gz", "--level", "-1",
        ],
        &[],
    );
    has(
        &line,
        &["infrakit: error: --level: -1 is out of range for tar.gz"],
    );
}

#[test]
fn bad_source_date_epoch_golden() {
    let dir = repo();
    let line = refuse(
        dir.path(),
        &["build", PROFILE, "--out", "dist"],
        &[("SOURCE_DATE_EPOCH", "abc")],
    );
    assert_eq!(
        line,
        "infrakit: error: SOURCE_DATE_EPOCH: \"abc\" is not a number of seconds since 1970"
    );
    let line = refuse(
        dir.path(),
        &["build", PROFILE, "--out", "dist"],
        &[("SOURCE_DATE_EPOCH", "-1")],
    );
    has(&line, &["infrakit: error: SOURCE_DATE_EPOCH: \"-1\""]);
}

#[test]
fn bad_release_version() {
    let dir = repo();
    let line = refuse(
        dir.path(),
        &[
            "build",
            PROFILE,
            "--out",
            "dist",
            "--release-version",
            "two",
        ],
        &[],
    );
    has(
        &line,
        &["infrakit: error: --release-version: \"two\" is not semver"],
    );
}

#[test]
fn out_dir_is_a_file() {
    let dir = repo();
    write(&dir.path().join("dist"), "not a directory\n");
    let run = infrakit(dir.path(), &["build", PROFILE, "--out", "dist"]);
    let line = assert_refused(&run, &dir.path().join("nothing-here"));
    has(
        &line,
        &["infrakit: error: dist: creating output directory: "],
    );
    assert_eq!(
        fs::read(dir.path().join("dist")).expect("read"),
        b"not a directory\n"
    );
}

#[test]
fn verify_missing_artifact() {
    // A missing input file is an I/O error (exit 2) naming that file, not a
    // failed check (exit 1) about its signature.
    let dir = repo();
    let (_, public) = keypair(dir.path(), "k");
    let line = refuse(
        dir.path(),
        &["verify", "dist/nope.tar.zst", "--key", s(&public)],
        &[],
    );
    has(&line, &["infrakit: error: dist/nope.tar.zst"]);
}

#[test]
fn verify_deleted_artifact_beside_its_signature() {
    let dir = repo();
    let (key, public) = keypair(dir.path(), "k");
    infrakit(
        dir.path(),
        &["build", PROFILE, "--out", "dist", "--sign-key", s(&key)],
    )
    .ok();
    fs::remove_file(dir.path().join("dist/p.tar.zst")).expect("rm");
    let run = infrakit(
        dir.path(),
        &["verify", "dist/p.tar.zst", "--key", s(&public)],
    );
    let line = assert_refused(&run, &dir.path().join("nothing-here"));
    has(&line, &["infrakit: error: dist/p.tar.zst: "]);
}

#[test]
fn verify_without_a_key_reads_the_host_keyring() {
    // Like apply, verify trusts /etc/infrakit/keys unless --key or --keyring
    // says otherwise; a machine without one is told how to give keys.
    assert!(
        !Path::new("/etc/infrakit/keys").exists(),
        "this test needs a machine without a host keyring"
    );
    let dir = repo();
    let line = refuse(dir.path(), &["verify", "dist/p.tar.zst"], &[]);
    has(
        &line,
        &[
            "infrakit: error: /etc/infrakit/keys: no keyring here",
            "--keyring DIR or --key FILE",
        ],
    );
    // --key and --keyring are one or the other: a usage error.
    let run = infrakit(
        dir.path(),
        &[
            "verify",
            "dist/p.tar.zst",
            "--key",
            "k.pub",
            "--keyring",
            ".",
        ],
    );
    assert_eq!((run.code, run.stdout.as_str()), (2, ""), "{run:?}");
    assert!(run.stderr.starts_with("infrakit: error: "), "{run:?}");
    has(&run.stderr, &["cannot be used with"]);
}

#[test]
fn verify_missing_key_file() {
    let dir = repo();
    let line = refuse(
        dir.path(),
        &["verify", "dist/p.tar.zst", "--key", "nope.pub"],
        &[],
    );
    has(
        &line,
        &["infrakit: error: nope.pub: reading public key: No such file or directory"],
    );
}
