//! Reproducibility: the same profile gives the same bytes (artifact, manifest,
//! signature) whatever the checkout looks like and whatever the environment
//! of the build, and the Reproducible Builds project's own harness,
//! `reprotest`, agrees. On a mismatch the tests print `diffoscope` output.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::*;

/// The three outputs of a signed build of the fixture profile.
const OUTPUTS: [&str; 3] = [
    "fixture.tar.zst",
    "fixture.manifest.json",
    "fixture.tar.zst.minisig",
];

/// Runs `program ARGS` in `cwd` with extra environment variables, and
/// without the variables that steer a build (as `infrakit_env` does), so the
/// caller's environment cannot leak into what is compared.
fn tool_env(cwd: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    tool_with(cwd, program, args, |cmd| {
        clear_build_env(cmd).envs(env.iter().copied());
    })
}

/// Every path below `root` (not `root` itself), without following symlinks.
fn all_paths(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
        .map(|e| e.expect("walk").into_path())
        .collect()
}

/// Rewrites every mode below `root` as if the checkout had been made under
/// `umask`: exec-ness is kept (it is meaningful), everything else follows
/// the umask. Symlinks are left alone (chmod would follow them).
fn apply_umask(root: &Path, umask: u32) {
    for path in all_paths(root) {
        let meta = fs::symlink_metadata(&path).expect("stat");
        let ft = meta.file_type();
        let mode = if ft.is_dir() || meta.permissions().mode() & 0o111 != 0 {
            0o777 & !umask
        } else if ft.is_file() {
            0o666 & !umask
        } else {
            continue;
        };
        chmod(&path, mode);
    }
}

/// Sets the mtime of every path below `root` (symlinks themselves too) with
/// `touch -h -d @EPOCH`; files get `file_epoch`, the rest `dir_epoch`.
fn set_mtimes(root: &Path, file_epoch: i64, dir_epoch: i64) {
    let paths = all_paths(root);
    let (files, others): (Vec<&PathBuf>, Vec<&PathBuf>) = paths
        .iter()
        .partition(|p| fs::symlink_metadata(p).expect("stat").file_type().is_file());
    for (group, epoch) in [(files, file_epoch), (others, dir_epoch)] {
        let date = format!("@{epoch}");
        let mut args = vec!["-h", "-d", date.as_str()];
        args.extend(group.iter().map(|p| s(p)));
        tool(root, "touch", &args).ok();
    }
}

fn mtime(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).expect("stat").mtime()
}

/// Panics with `diffoscope`'s report unless `a` and `b` have the same bytes.
fn assert_same_bytes(a: &Path, b: &Path) {
    let left = fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let right = fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    if left != right {
        let cwd = a.parent().expect("has a parent");
        let report = tool_env(cwd, "diffoscope", &[s(a), s(b)], &[]);
        panic!(
            "not reproducible: {} and {} differ\ndiffoscope (exit {}):\n{}{}",
            a.display(),
            b.display(),
            report.code,
            report.stdout,
            report.stderr
        );
    }
}

fn manifest_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).expect("read manifest")).expect("manifest is JSON")
}

/// Same profile, two checkouts that differ in everything that must not
/// matter: creation order, umask (modes), mtimes, path (name and depth), and
/// the build's cwd, TZ, locale, HOME and process umask.
#[test]
fn two_different_checkouts_give_identical_bytes() {
    require_tool("diffoscope");
    require_tool("touch");
    let top = tempdir();
    let a = top.path().join("a");
    let b = top
        .path()
        .join("x/y/z/a-much-longer-and-deeper-checkout-name-for-b");
    fixture_repo(&a, false);
    fixture_repo(&b, true);

    // umask 022 for one checkout, 077 for the other.
    apply_umask(&a, 0o022);
    apply_umask(&b, 0o077);
    let exec = "overlays/base/root/usr/local/bin/healthcheck";
    assert_eq!(mode(&a.join(exec)), 0o755);
    assert_eq!(mode(&b.join(exec)), 0o700);
    assert_eq!(mode(&a.join("overlays/base/root/etc/motd")), 0o644);
    assert_eq!(mode(&b.join("overlays/base/root/etc/motd")), 0o600);
    assert_eq!(mode(&b.join("overlays/base/root/etc")), 0o700);

    // Different mtimes, none of them the profile's source-date-epoch.
    set_mtimes(&a, 1_000_000_000, 1_100_000_000);
    set_mtimes(&b, 1_234_567_890, 2_000_000_000);
    let link = "overlays/chain/root/etc/chain/motd-link";
    assert_eq!(mtime(&a.join(link)), 1_100_000_000);
    assert_eq!(mtime(&b.join(link)), 2_000_000_000);
    assert_eq!(mtime(&b.join("overlays/base/root/etc/motd")), 1_234_567_890);

    let keys = top.path().join("keys");
    fs::create_dir(&keys).expect("mkdir keys");
    let (key, public) = keypair(&keys, "release");

    // Build A from its repo root with a relative profile path, in UTC and
    // the C locale.
    let run_a = infrakit_env(
        &a,
        &[
            "build",
            "profiles/fixture.toml",
            "--out",
            "dist",
            "--sign-key",
            s(&key),
        ],
        &[
            ("TZ", "UTC"),
            ("LC_ALL", "C"),
            ("LANG", "C"),
            ("HOME", s(top.path())),
        ],
    )
    .ok();

    // Build B from somewhere else entirely, absolute paths, another time
    // zone and locale, another HOME, and a process umask of 077.
    let elsewhere = top.path().join("elsewhere/cwd");
    fs::create_dir_all(&elsewhere).expect("mkdir");
    let out_b = top.path().join("other-out/dist-b");
    let profile_b = b.join("profiles/fixture.toml");
    let run_b = infrakit_env(
        &elsewhere,
        &[
            "build",
            s(&profile_b),
            "--out",
            s(&out_b),
            "--sign-key",
            s(&key),
        ],
        &[
            ("TZ", "Asia/Kolkata"),
            ("LC_ALL", "C.UTF-8"),
            ("LANG", "C.UTF-8"),
            ("HOME", s(&elsewhere)),
        ],
    );
    let run_b = run_b.ok();
    // The same build under a real umask of 077 (sh sets it, then execs).
    let out_c = top.path().join("umask-077-out");
    let run_c = tool_env(
        &elsewhere,
        "sh",
        &[
            "-c",
            "umask 077 && exec \"$@\"",
            "sh",
            s(&bin()),
            "build",
            s(&profile_b),
            "--out",
            s(&out_c),
            "--sign-key",
            s(&key),
        ],
        &[("TZ", "America/St_Johns"), ("LC_ALL", "C.UTF-8")],
    )
    .ok();
    // And from inside B's profiles/ with a bare file name (the overlays are
    // then found through `..`).
    let out_d = top.path().join("from-profiles-dir");
    let run_d = infrakit_env(
        &b.join("profiles"),
        &[
            "build",
            "fixture.toml",
            "--out",
            s(&out_d),
            "--sign-key",
            s(&key),
        ],
        &[("TZ", "Pacific/Chatham"), ("LC_ALL", "C")],
    )
    .ok();

    let out_a = a.join("dist");
    assert_eq!(list_files(&out_a), {
        let mut v: Vec<String> = OUTPUTS.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    });
    for out in [&out_b, &out_c, &out_d] {
        assert_eq!(list_files(&out_a), list_files(out), "{}", out.display());
        for name in OUTPUTS {
            assert_same_bytes(&out_a.join(name), &out.join(name));
            assert_eq!(
                mode(&out.join(name)),
                0o644,
                "{name} mode under another umask"
            );
        }
    }
    // The summaries name the same digest.
    let digest = |r: &Run| {
        r.stdout
            .lines()
            .next()
            .expect("summary line")
            .rsplit(' ')
            .next()
            .expect("digest")
            .to_owned()
    };
    assert_eq!(digest(&run_a), digest(&run_b));
    assert_eq!(digest(&run_a), digest(&run_c));
    assert_eq!(digest(&run_a), digest(&run_d));

    // What was reproduced is a real, signed artifact.
    tool(
        &out_a,
        "minisign",
        &["-Vm", "fixture.tar.zst", "-p", s(&public), "-H"],
    )
    .ok();
    tool(&out_a, "zstd", &["-tq", "fixture.tar.zst"]).ok();
}

/// SOURCE_DATE_EPOCH from the environment beats the profile's
/// `source-date-epoch`, which beats 0; `--release-version` relabels.
#[test]
fn source_date_epoch_and_release_version() {
    let dir = tempdir();
    let repo = dir.path().join("repo");
    fixture_repo(&repo, false);
    // The same overlays without a source-date-epoch in the profile.
    write(
        &repo.join("profiles/nosde.toml"),
        "name = \"nosde\"\nversion = \"0.0.1\"\noverlays = [\"base\", \"chain\"]\n",
    );
    let (key, public) = keypair(dir.path(), "release");

    let build = |profile: &str, out: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "build",
            profile,
            "--out",
            out,
            "--sign-key",
            s(&key),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        infrakit_env(&repo, &args, env).ok();
        repo.join(out)
    };
    // Every entry's mtime as GNU tar shows it in UTC.
    let mtimes = |artifact: &Path| -> Vec<String> {
        let run = tool_env(
            &repo,
            "tar",
            &[
                "--zstd",
                "-tvf",
                s(artifact),
                "--numeric-owner",
                "--full-time",
            ],
            &[("TZ", "UTC"), ("LC_ALL", "C")],
        )
        .ok();
        let mut dates: Vec<String> = run
            .stdout
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {}", f[3], f[4])
            })
            .collect();
        dates.dedup();
        dates
    };

    // One build of `profile` into `out` with SOURCE_DATE_EPOCH as given
    // (None: unset), checked to record `epoch` in its manifest and `date` as
    // every member's mtime.
    let dated = |profile: &str, out: &str, sde: Option<&str>, epoch: u64, date: &str| {
        let env: Vec<(&str, &str)> = sde.map(|v| ("SOURCE_DATE_EPOCH", v)).into_iter().collect();
        let dir = build(&format!("profiles/{profile}.toml"), out, &[], &env);
        let m = manifest_json(&dir.join(format!("{profile}.manifest.json")));
        assert_eq!(m["source_date_epoch"], epoch, "{out}");
        assert_eq!(
            mtimes(&dir.join(format!("{profile}.tar.zst"))),
            [date],
            "{out}"
        );
        (dir, m)
    };

    // The profile's value: 1700000000 = 2023-11-14 22:13:20 UTC.
    let (from_profile, m) = dated(
        "fixture",
        "d-profile",
        None,
        1_700_000_000,
        "2023-11-14 22:13:20",
    );
    assert_eq!(m["version"], "1.2.3");

    // An empty SOURCE_DATE_EPOCH counts as unset.
    let (empty, _) = dated(
        "fixture",
        "d-empty",
        Some(""),
        1_700_000_000,
        "2023-11-14 22:13:20",
    );
    for name in OUTPUTS {
        assert_same_bytes(&from_profile.join(name), &empty.join(name));
    }

    // The environment overrides it: 1800000000 = 2027-01-15 08:00:00 UTC.
    let (from_env, _) = dated(
        "fixture",
        "d-env",
        Some("1800000000"),
        1_800_000_000,
        "2027-01-15 08:00:00",
    );
    for name in OUTPUTS {
        assert_ne!(
            fs::read(from_profile.join(name)).expect("read"),
            fs::read(from_env.join(name)).expect("read"),
            "{name} must change with SOURCE_DATE_EPOCH"
        );
    }
    // ...and the environment set to the profile's own value changes nothing.
    let (same, _) = dated(
        "fixture",
        "d-same",
        Some("1700000000"),
        1_700_000_000,
        "2023-11-14 22:13:20",
    );
    for name in OUTPUTS {
        assert_same_bytes(&from_profile.join(name), &same.join(name));
    }

    // Neither: 0.
    dated("nosde", "d-zero", None, 0, "1970-01-01 00:00:00");
    // The environment applies to a profile without a value too.
    dated(
        "nosde",
        "d-env-only",
        Some("1800000000"),
        1_800_000_000,
        "2027-01-15 08:00:00",
    );

    // --release-version: the manifest's version and the signed trusted
    // comment (read back by stock minisign) both say 2.0.0.
    let release = build(
        "profiles/fixture.toml",
        "d-release",
        &["--release-version", "2.0.0"],
        &[],
    );
    let manifest = release.join("fixture.manifest.json");
    let m = manifest_json(&manifest);
    assert_eq!(m["version"], "2.0.0");
    assert_eq!(m["source_date_epoch"], 1_700_000_000);
    let sha = tool(&release, "sha256sum", &["fixture.manifest.json"]).ok();
    let sha = sha.stdout.split_whitespace().next().expect("digest");
    let comment = tool(
        &release,
        "minisign",
        &["-Vm", "fixture.tar.zst", "-p", s(&public), "-Q"],
    )
    .ok();
    assert_eq!(
        comment.stdout.trim_end(),
        format!("name:fixture version:2.0.0 manifest-sha256:{sha}")
    );
    let comment = tool(
        &from_profile,
        "minisign",
        &["-Vm", "fixture.tar.zst", "-p", s(&public), "-Q"],
    )
    .ok();
    assert!(
        comment
            .stdout
            .starts_with("name:fixture version:1.2.3 manifest-sha256:"),
        "{}",
        comment.stdout
    );
    // The same --release-version twice: the same bytes.
    let again = build(
        "profiles/fixture.toml",
        "d-release-again",
        &["--release-version", "2.0.0"],
        &[],
    );
    for name in OUTPUTS {
        assert_same_bytes(&release.join(name), &again.join(name));
    }
}

/// A temp dir holding only copies of the repo's own `profiles/` and
/// `overlays/` (reprotest copies its whole source tree).
fn copy_of_repo_profiles() -> tempfile::TempDir {
    let dir = tempdir();
    copy_repo_profiles(dir.path());
    assert_eq!(
        fs::read_dir(dir.path()).expect("ls").count(),
        2,
        "only profiles/ and overlays/"
    );
    dir
}

/// reprotest with every variation this sandbox supports (fileordering
/// needs FUSE; user_group, domain_host, kernel and num_cpus need privileges
/// or are out of scope), as ORACLES.md shows. Takes about a second.
fn reprotest(cwd: &Path, build_command: &str) -> Run {
    require_tool("faketime");
    require_tool("diffoscope");
    tool_env(
        cwd,
        "reprotest",
        &[
            "--vary=-user_group,-domain_host,-fileordering,-kernel,-num_cpus",
            build_command,
            "dist/*",
        ],
        &[],
    )
}

#[test]
fn reprotest_reproduces_the_repos_base_profile() {
    let dir = copy_of_repo_profiles();
    let command = format!("{} build profiles/base.toml --out dist", s(&bin()));
    let run = reprotest(dir.path(), &command);
    assert!(
        run.code == 0 && run.stdout.contains("Reproduction successful"),
        "reprotest (exit {}):\n{}\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("base.tar.zst"), "{}", run.stdout);
    assert!(run.stdout.contains("base.manifest.json"), "{}", run.stdout);
    // reprotest works on copies: the source tree is left as it was.
    assert_eq!(
        fs::read_dir(dir.path()).expect("ls").count(),
        2,
        "reprotest left files in the source tree"
    );
}

/// The fixture (long names, modes, owners, replacements) signed with a key
/// outside the source tree: the signature reproduces too.
#[test]
fn reprotest_reproduces_a_signed_fixture_build() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fixture_repo(&src, false);
    let keys = dir.path().join("keys");
    fs::create_dir(&keys).expect("mkdir");
    let (key, _) = keypair(&keys, "release");
    let command = format!(
        "{} build profiles/fixture.toml --out dist --sign-key {}",
        s(&bin()),
        s(&key)
    );
    let run = reprotest(&src, &command);
    assert!(
        run.code == 0 && run.stdout.contains("Reproduction successful"),
        "reprotest (exit {}):\n{}\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
    for name in OUTPUTS {
        assert!(run.stdout.contains(name), "{name} not compared");
    }
}

/// The harness is live: a build that records its environment is caught.
#[test]
fn reprotest_catches_an_unreproducible_build() {
    let dir = copy_of_repo_profiles();
    let run = reprotest(
        dir.path(),
        "mkdir -p dist && (umask; date; pwd; echo \"$TZ\") > dist/env.txt",
    );
    assert_ne!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.contains("Reproduction successful"),
        "{}",
        run.stdout
    );
}
