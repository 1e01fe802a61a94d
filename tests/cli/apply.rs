//! `apply`, `rollback` and `status` against temp roots, with real signed
//! artifacts. The root is judged from outside: a full listing with digests
//! (`snapshot`) for "nothing changed", and the root as the kernel resolves it
//! (`view`) for "wholly the old release or wholly the new one". Malicious
//! archives are made by tests/cli/craft.py (a genuine release with one thing
//! changed), compressed by stock zstd and signed by stock minisign, so only
//! the extraction checks can refuse them.

// Test helpers fail loudly: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::support::*;

/// Two releases of profile `p` (1.0.0 and 2.0.0) signed by a trusted key,
/// and a keyring holding that key.
struct Fleet {
    repo: Repo,
    keyring: PathBuf,
    secret: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

/// A file of `n` pseudo-random bytes (a "binary").
fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

const UNIT: &str = "[Unit]\nDescription=app\n\n[Service]\nUser=app\nExecStart=/usr/bin/app-tool\n";

/// A repository, a release signing key, and a keyring trusting it.
fn keyed_repo() -> (Repo, PathBuf, PathBuf) {
    let repo = Repo::new();
    let (secret, public) = keypair(repo.path(), "release");
    let keyring = repo.path().join("keyring");
    fs::create_dir_all(&keyring).unwrap();
    fs::copy(&public, keyring.join("release.pub")).unwrap();
    (repo, secret, keyring)
}

impl Fleet {
    fn new() -> Fleet {
        let (repo, secret, keyring) = keyed_repo();
        // Release 1.
        repo.overlay(
            "app",
            "[[attr]]\npath = \"usr/bin/app-tool\"\nmode = 0o755\n\n\
             [[symlink]]\npath = \"etc/app/current.conf\"\ntarget = \"a.conf\"\n",
        );
        repo.root_file("app", "etc/app/a.conf", "a = 1\n");
        repo.root_file("app", "etc/app/old.conf", "old = yes\n");
        repo.root_file("app", "etc/systemd/system/app.service", UNIT);
        repo.root_file("app", "usr/bin/app-tool", noise(4096, 1));
        repo.profile(&["app"], "");
        let v1 = Fleet::build(&repo, &secret, "d1", "1.0.0");
        // Release 2: a changed, old gone, new file and directory, a big file.
        repo.root_file("app", "etc/app/a.conf", "a = 2\n");
        fs::remove_file(repo.path().join("overlays/app/root/etc/app/old.conf")).unwrap();
        repo.root_file("app", "etc/app/new.conf", "new = yes\n");
        repo.root_file("app", "opt/app/data/blob.bin", noise(1 << 20, 2));
        let v2 = Fleet::build(&repo, &secret, "d2", "2.0.0");
        Fleet {
            repo,
            keyring,
            secret,
            v1,
            v2,
        }
    }

    fn build(repo: &Repo, secret: &Path, out: &str, version: &str) -> PathBuf {
        infrakit(
            repo.path(),
            &[
                "build",
                PROFILE,
                "--out",
                out,
                "--sign-key",
                s(secret),
                "--release-version",
                version,
            ],
        )
        .ok();
        repo.path().join(out).join("p.tar.zst")
    }

    fn dir(&self) -> &Path {
        self.repo.path()
    }

    /// `infrakit apply ARTIFACT --root ROOT --keyring KEYRING EXTRA...`.
    fn apply(&self, artifact: &Path, root: &Path, extra: &[&str]) -> Run {
        let mut args = vec![
            "apply",
            s(artifact),
            "--root",
            s(root),
            "--keyring",
            s(&self.keyring),
        ];
        args.extend_from_slice(extra);
        infrakit(self.dir(), &args)
    }

    /// A fresh root with a host `/etc` (mode 0750) and a host file in it.
    fn root(&self, name: &str) -> PathBuf {
        let root = self.dir().join(name);
        fs::create_dir_all(root.join("etc")).unwrap();
        chmod(&root.join("etc"), 0o750);
        write(&root.join("etc/hostname"), "host-1\n");
        root
    }
}

fn status(root: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["status", "--root", s(root)];
    args.extend_from_slice(extra);
    infrakit(Path::new("/"), &args)
}

/// The root as a program on the host sees it, without InfraKit's state: each
/// non-directory path resolved as the kernel does (a link that dangles is
/// absent), with the type, mode, owner and digest or target of what it
/// resolves to.
fn view(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let walk = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !e.path().ends_with("var/lib/infrakit"));
    for item in walk {
        let item = item.unwrap();
        let path = item.path();
        let m = path.symlink_metadata().unwrap();
        if m.is_dir() {
            continue;
        }
        // One hop, as the farm link is one: its target is then taken as is
        // (a file, or the release's own symlink).
        let (at, m) = if m.file_type().is_symlink() {
            let link = fs::read_link(path).unwrap();
            let farm = link
                .to_string_lossy()
                .contains("var/lib/infrakit/current/rootfs/");
            let target = path.parent().unwrap().join(&link);
            match target.symlink_metadata() {
                Ok(tm) if farm && target.starts_with(root) => (target, tm),
                Ok(_) => (path.to_path_buf(), m),
                Err(_) => continue,
            }
        } else {
            (path.to_path_buf(), m)
        };
        let what = if m.file_type().is_symlink() {
            format!("-> {}", fs::read_link(&at).unwrap().display())
        } else {
            sha256_hex(&fs::read(&at).unwrap())
        };
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        out.insert(
            rel,
            format!("{:o} {}:{} {what}", m.mode(), m.uid(), m.gid()),
        );
    }
    out
}

fn state_dir(root: &Path) -> PathBuf {
    root.join("var/lib/infrakit")
}

// ---------------------------------------------------------------------------
// Lay-down, drift, rollback, foreign files.
// ---------------------------------------------------------------------------

#[test]
fn apply_lays_down_the_release_and_status_is_clean() {
    let f = Fleet::new();
    let root = f.root("root");
    let run = f.apply(&f.v1, &root, &[]).ok();
    has(&run.stdout, &["activated p-1.0.0-", "hooks (not run"]);
    has(&run.stdout, &["systemctl daemon-reload", "app.service"]);
    // The host's /etc keeps its own mode although the manifest says 0755;
    // its own file stays.
    assert_eq!(mode(&root.join("etc")), 0o750);
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "host-1\n"
    );
    // Every file reads as built, with the manifest's mode.
    assert_eq!(
        fs::read_to_string(root.join("etc/app/a.conf")).unwrap(),
        "a = 1\n"
    );
    assert_eq!(
        fs::read(root.join("usr/bin/app-tool")).unwrap(),
        noise(4096, 1)
    );
    assert_eq!(
        fs::metadata(root.join("usr/bin/app-tool")).unwrap().mode() & 0o7777,
        0o755
    );
    // Directories the host lacked are created with the manifest's mode.
    assert_eq!(mode(&root.join("etc/app")), 0o755);
    let run = status(&root, &[]).ok();
    has(&run.stdout, &["active: p 1.0.0", "drift: 0 path(s)"]);
    // The JSON report agrees.
    let run = status(&root, &["--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["release"]["version"], "1.0.0");
    assert_eq!(v["drift"].as_array().unwrap().len(), 0);
    // Applying the same artifact again changes nothing.
    let before = snapshot(&root);
    let run = f.apply(&f.v1, &root, &[]).ok();
    has(&run.stdout, &["already active"]);
    assert_eq!(snapshot(&root), before);
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    let before = snapshot(&root);
    let run = f.apply(&f.v2, &root, &["--dry-run"]).ok();
    has(&run.stdout, &["dry run: would activate p-2.0.0-"]);
    has(
        &run.stdout,
        &[
            "add     etc/app/new.conf",
            "change  etc/app/a.conf",
            "remove  etc/app/old.conf",
        ],
    );
    assert_eq!(snapshot(&root), before);
    // On an empty root too: not even the state directory appears.
    let empty = f.dir().join("empty");
    fs::create_dir(&empty).unwrap();
    f.apply(&f.v1, &empty, &["--dry-run"]).ok();
    assert_eq!(list_files(&empty), Vec::<String>::new());
}

/// The plan of an upgrade merges the two releases' sorted entries: what it
/// adds, changes and removes, in manifest order, is what the two manifests
/// say, for names whose order differs bytewise and by component (`a-b`,
/// `a.b/`, `a/`, `a0`), a directory gone with all it held, and one added;
/// and the upgraded root has the second release's paths and no others.
#[test]
fn an_upgrades_plan_is_the_difference_of_the_two_manifests() {
    let (repo, secret, keyring) = keyed_repo();
    repo.overlay("app", "");
    repo.profile(&["app"], "");
    let v1_files = [
        ("etc/a-b", "1"),
        ("etc/a.b/x", "x"),
        ("etc/a/b", "b"),
        ("etc/a/c/d", "d"),
        ("etc/a0", "0"),
        ("etc/z", "z"),
        ("opt/k/1", "1"),
        ("opt/k/2", "2"),
        ("zz/last", "l"),
    ];
    for (path, body) in v1_files {
        repo.root_file("app", path, body);
    }
    let v1 = Fleet::build(&repo, &secret, "d1", "1.0.0");
    let gone = ["etc/a.b/x", "etc/a/c/d", "etc/z", "opt/k/2", "zz/last"];
    for path in gone {
        fs::remove_file(repo.path().join("overlays/app/root").join(path)).unwrap();
    }
    for dir in ["etc/a/c", "zz"] {
        fs::remove_dir(repo.path().join("overlays/app/root").join(dir)).unwrap();
    }
    for (path, body) in [
        ("etc/a-b", "2"),
        ("etc/a.b/y", "y"),
        ("etc/a/c0", "c0"),
        ("opt/k/3", "3"),
        ("usr/new/n", "n"),
    ] {
        repo.root_file("app", path, body);
    }
    let v2 = Fleet::build(&repo, &secret, "d2", "2.0.0");
    let f = Fleet {
        repo,
        keyring,
        secret,
        v1,
        v2,
    };
    // The oracle: the manifests' entries by path, compared as JSON.
    let entries = |out: &str| -> Vec<serde_json::Value> {
        let text = fs::read_to_string(f.dir().join(out).join("p.manifest.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        doc["entries"].as_array().unwrap().clone()
    };
    let (old, new) = (entries("d1"), entries("d2"));
    let find = |list: &[serde_json::Value], path: &serde_json::Value| {
        list.iter().find(|e| e["path"] == *path).cloned()
    };
    let differ = |o: &serde_json::Value, e: &serde_json::Value| {
        if o["type"] == "dir" && e["type"] == "dir" {
            ["mode", "uid", "gid"].iter().any(|k| o[k] != e[k])
        } else {
            o != e
        }
    };
    let added: Vec<_> = new
        .iter()
        .filter(|e| find(&old, &e["path"]).is_none())
        .map(|e| e["path"].clone())
        .collect();
    let removed: Vec<_> = old
        .iter()
        .filter(|o| find(&new, &o["path"]).is_none())
        .map(|o| o["path"].clone())
        .collect();
    let changed: Vec<_> = new
        .iter()
        .filter(|e| find(&old, &e["path"]).is_some_and(|o| differ(&o, e)))
        .map(|e| e["path"].clone())
        .collect();
    assert_eq!(changed, vec![serde_json::json!("etc/a-b")]);
    for path in ["etc/a.b/y", "etc/a/c0", "opt/k/3", "usr/new", "usr/new/n"] {
        assert!(
            added.contains(&serde_json::json!(path)),
            "{path} in {added:?}"
        );
    }
    for path in gone.iter().chain(&["etc/a/c", "zz"]) {
        assert!(
            removed.contains(&serde_json::json!(path)),
            "{path} in {removed:?}"
        );
    }
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    let run = f.apply(&f.v2, &root, &["--dry-run", "--json"]).ok();
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let list = |k: &str| doc["plan"][k].as_array().unwrap().clone();
    assert_eq!(list("added"), added, "{}", run.stdout);
    assert_eq!(list("changed"), changed, "{}", run.stdout);
    assert_eq!(list("removed"), removed, "{}", run.stdout);
    f.apply(&f.v2, &root, &[]).ok();
    let mut want: Vec<String> = new
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        // The host's file, and the state directory's parents.
        .chain(["etc/hostname", "var", "var/lib"].map(str::to_owned))
        .collect();
    want.sort();
    let mut have = host_paths(&root);
    have.sort();
    assert_eq!(have, want);
}

/// A plan lists every path of a release; past 2 MiB its lists go to a
/// file in `TMPDIR`. Here 2,600 files with 1,000-byte paths: an apply with no
/// usable `TMPDIR` is refused naming it (exit 2) with the root untouched; with
/// one, every path is laid down, the `--json` plan lists them all, and
/// nothing is left in `TMPDIR`.
#[test]
fn a_release_whose_plan_spills_to_tmpdir_is_laid_down_whole() {
    let (repo, secret, keyring) = keyed_repo();
    repo.overlay("app", "");
    let deep: Vec<String> = (0..4).map(|i| format!("{i}").repeat(200)).collect();
    let deep = format!("opt/{}", deep.join("/"));
    let files: Vec<String> = (0..2600).map(|i| format!("{deep}/f{i:04}")).collect();
    for path in &files {
        repo.root_file("app", path, path.len().to_string());
    }
    repo.profile(&["app"], "");
    let v1 = Fleet::build(&repo, &secret, "d1", "1.0.0");
    let f = Fleet {
        v2: v1.clone(),
        repo,
        keyring,
        secret,
        v1,
    };
    let root = f.root("root");
    let apply = |tmpdir: &Path, extra: &[&str]| {
        let mut args = vec![
            "apply",
            s(&f.v1),
            "--root",
            s(&root),
            "--keyring",
            s(&f.keyring),
        ];
        args.extend_from_slice(extra);
        infrakit_env(f.dir(), &args, &[("TMPDIR", s(tmpdir))])
    };

    let before = snapshot(&root);
    let missing = f.dir().join("no-such-tmp");
    refused_spill(apply(&missing, &[]), &missing);
    assert_eq!(snapshot(&root), before);

    let tmp = tempdir();
    let run = apply(tmp.path(), &["--dry-run", "--json"]).ok();
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let added = doc["plan"]["added"].as_array().unwrap();
    // The files, their 5 directories and `opt`.
    assert_eq!(added.len(), files.len() + 5, "{}", &run.stdout[..200]);
    assert_eq!(added.last().unwrap(), files.last().unwrap().as_str());
    assert_eq!(snapshot(&root), before);

    apply(tmp.path(), &[]).ok();
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    for path in &files {
        assert_eq!(
            fs::read_to_string(root.join(path)).unwrap(),
            path.len().to_string()
        );
    }
    let status = infrakit(f.dir(), &["status", "--root", s(&root)]).ok();
    has(&status.stdout, &["p-1.0.0-"]);
}

#[test]
fn upgrade_then_rollback_restores_the_previous_release_exactly() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    let v1_view = view(&root);
    let v1_paths = host_paths(&root);
    f.apply(&f.v2, &root, &[]).ok();
    let v2_view = view(&root);
    assert_ne!(v1_view, v2_view);
    // Files only the old release had are gone; new ones are there.
    assert!(root.join("etc/app/old.conf").symlink_metadata().is_err());
    assert_eq!(
        fs::read_to_string(root.join("etc/app/new.conf")).unwrap(),
        "new = yes\n"
    );
    assert_eq!(
        fs::read(root.join("opt/app/data/blob.bin")).unwrap(),
        noise(1 << 20, 2)
    );
    status(&root, &[]).ok();
    let run = infrakit(
        f.dir(),
        &["rollback", "--root", s(&root), "--keyring", s(&f.keyring)],
    )
    .ok();
    has(
        &run.stdout,
        &["activated p-1.0.0-", "(was p-2.0.0-", "rollback)"],
    );
    assert_eq!(view(&root), v1_view);
    // The directories release 2 created are gone again.
    assert_eq!(host_paths(&root), v1_paths);
    status(&root, &[]).ok();
    // Nothing older is retained: a second rollback is refused.
    let run = infrakit(
        f.dir(),
        &["rollback", "--root", s(&root), "--keyring", s(&f.keyring)],
    )
    .expect_code(1);
    has(&run.stderr, &["nothing to roll back"]);
    // And release 2 applies again (it is newer than the active 1.0.0).
    f.apply(&f.v2, &root, &[]).ok();
    assert_eq!(view(&root), v2_view);
}

/// The retained release's manifest is read back from the state directory
/// as untrusted input (parsed as it is read): one that is cut short, one of
/// another release, and a symlink in its place are each refused, by status
/// and by an apply that would replace the release, and the root stays as it
/// was.
#[test]
fn a_retained_manifest_that_is_not_the_releases_is_refused() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    let releases = state_dir(&root).join("releases");
    let id = fs::read_dir(&releases)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| !n.starts_with('.'))
        .expect("the retained release");
    let manifest = releases.join(&id).join("manifest.json");
    let signed = fs::read(&manifest).unwrap();
    let other = fs::read(f.v2.with_file_name("p.manifest.json")).unwrap();
    let cut = signed[..signed.len() / 2].to_vec();
    for (case, bytes, needle) in [
        (
            "cut short",
            Some(cut),
            "ends inside its entries list: it is cut short",
        ),
        ("another release's", Some(other), "is not the manifest of"),
        ("a symlink", None, "under a symlink"),
    ] {
        fs::remove_file(&manifest).unwrap();
        match bytes {
            Some(b) => fs::write(&manifest, b).unwrap(),
            None => std::os::unix::fs::symlink("../../../../etc/hostname", &manifest).unwrap(),
        }
        let before = snapshot(&root);
        let run = status(&root, &[]).expect_code(2);
        has(
            &run.stderr,
            &[&format!("releases/{id}/manifest.json"), needle],
        );
        let run = f.apply(&f.v2, &root, &[]).expect_code(2);
        has(
            &run.stderr,
            &[&format!("releases/{id}/manifest.json"), needle],
        );
        assert_eq!(snapshot(&root), before, "{case}: the root changed");
    }
    fs::remove_file(&manifest).unwrap();
    fs::write(&manifest, &signed).unwrap();
    status(&root, &[]).ok();
}

#[test]
fn retained_releases_are_configurable() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    f.apply(&f.v2, &root, &["--retain", "2"]).ok();
    let v3 = Fleet::build(&f.repo, &f.secret, "d3", "3.0.0");
    f.apply(&v3, &root, &["--retain", "2"]).ok();
    let mut releases = list_files(&state_dir(&root).join("releases"));
    releases.retain(|p| !p.contains('/'));
    assert_eq!(releases.len(), 2, "{releases:?}");
    assert!(
        releases.iter().all(|r| !r.starts_with("p-1.0.0")),
        "{releases:?}"
    );
}

#[test]
fn drift_is_detected_after_edit_delete_and_chmod() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v2, &root, &[]).ok();
    fs::write(root.join("etc/app/a.conf"), "a = hacked\n").unwrap();
    fs::remove_file(root.join("etc/app/new.conf")).unwrap();
    chmod(&root.join("usr/bin/app-tool"), 0o777);
    let textfile = f.dir().join("metrics/infrakit.prom");
    fs::create_dir_all(textfile.parent().unwrap()).unwrap();
    let run = status(&root, &["--textfile", s(&textfile)]).expect_code(1);
    has(&run.stdout, &["drift: 3 path(s)"]);
    has(
        &run.stdout,
        &[
            "modified   etc/app/a.conf",
            "missing    etc/app/new.conf",
            "mode-owner usr/bin/app-tool",
        ],
    );
    has(&run.stderr, &["3 drifted path(s)"]);
    // The metrics parse with the Prometheus client library's own parser
    // (Debian's python3-prometheus-client, for Debian's python3).
    let py = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as parse\n\
              m = {s.name: s for f in parse(open(sys.argv[1]).read()) for s in f.samples}\n\
              print(int(m['infrakit_drift_files'].value), m['infrakit_release_info'].labels['version'], int(m['infrakit_missing_secrets'].value), int(m['infrakit_activation_interrupted'].value))\n";
    let run = tool(f.dir(), "/usr/bin/python3", &["-c", py, s(&textfile)]).ok();
    assert_eq!(run.stdout.trim(), "3 2.0.0 0 0");
    // JSON names each kind.
    let run = status(&root, &["--json"]).expect_code(1);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let kinds: Vec<&str> = v["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["modified", "missing", "mode-owner"]);
}

#[test]
fn foreign_files_are_not_replaced_without_adopt() {
    let f = Fleet::new();
    let root = f.root("root");
    write(&root.join("etc/app/a.conf"), "the host's own\n");
    let before = snapshot(&root);
    let run = f.apply(&f.v1, &root, &[]).expect_code(1);
    has(&run.stderr, &["refused", "etc/app/a.conf", "--adopt"]);
    assert_eq!(snapshot(&root), before);
    // A host directory where the release has a file is never adopted.
    let other = f.root("other");
    fs::create_dir_all(other.join("etc/app/old.conf")).unwrap();
    let run = f.apply(&f.v1, &other, &["--adopt"]).expect_code(1);
    has(&run.stderr, &["etc/app/old.conf", "never adopted"]);
    // With --adopt the host's file is moved aside to a recorded backup.
    let run = f.apply(&f.v1, &root, &["--adopt"]).ok();
    has(&run.stdout, &["activated"]);
    assert_eq!(
        fs::read_to_string(root.join("etc/app/a.conf")).unwrap(),
        "a = 1\n"
    );
    let backups = state_dir(&root).join("backups");
    let saved: Vec<String> = list_files(&backups)
        .into_iter()
        .filter(|p| p.ends_with("a.conf"))
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(
        fs::read_to_string(backups.join(&saved[0])).unwrap(),
        "the host's own\n"
    );
    status(&root, &[]).ok();
    // When a release no longer has an adopted path, the host's file returns.
    let other = f.root("adopt-old");
    write(&other.join("etc/app/old.conf"), "host old\n");
    f.apply(&f.v1, &other, &["--adopt"]).ok();
    assert_eq!(
        fs::read_to_string(other.join("etc/app/old.conf")).unwrap(),
        "old = yes\n"
    );
    f.apply(&f.v2, &other, &[]).ok();
    assert_eq!(
        fs::read_to_string(other.join("etc/app/old.conf")).unwrap(),
        "host old\n"
    );
    status(&other, &[]).ok();
}

#[test]
fn a_release_may_not_ship_the_state_directory() {
    let f = Fleet::new();
    f.repo
        .root_file("app", "var/lib/infrakit/current/rootfs/etc/passwd", "x\n");
    let evil = Fleet::build(&f.repo, &f.secret, "d-evil", "3.0.0");
    assert_refused_untouched(&f, &evil, &["state directory", "var/lib/infrakit"]);
}

// ---------------------------------------------------------------------------
// Refusals before anything is written.
// ---------------------------------------------------------------------------

/// Applies `artifact` to a root with release 2 active and to an empty root:
/// it must exit 1 and both roots must be byte-for-byte unchanged.
fn assert_refused_untouched(f: &Fleet, artifact: &Path, needles: &[&str]) {
    assert_refused_on(f, artifact, needles, true);
}

/// Like `assert_refused_untouched`; the empty root only when `empty_too`.
fn assert_refused_on(f: &Fleet, artifact: &Path, needles: &[&str], empty_too: bool) {
    let tag = sha256_hex(s(artifact).as_bytes());
    let root = f.root(&format!("r-{tag}"));
    f.apply(&f.v2, &root, &[]).ok();
    let mut roots = vec![root];
    if empty_too {
        let empty = f.dir().join(format!("e-{tag}"));
        fs::create_dir_all(&empty).unwrap();
        roots.push(empty);
    }
    for r in &roots {
        let before = snapshot(r);
        let run = f.apply(artifact, r, &[]).expect_code(1);
        has(&run.stderr, needles);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        assert_eq!(snapshot(r), before, "{} changed", r.display());
    }
}

/// Copies the artifact, its manifest and signature into `dir` under `name`.
fn copy_release(from: &Path, dir: &Path, name: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let src_dir = from.parent().unwrap();
    let art = dir.join(format!("{name}.tar.zst"));
    fs::copy(from, &art).unwrap();
    fs::copy(
        src_dir.join("p.tar.zst.minisig"),
        dir.join(format!("{name}.tar.zst.minisig")),
    )
    .unwrap();
    fs::copy(
        src_dir.join("p.manifest.json"),
        dir.join(format!("{name}.manifest.json")),
    )
    .unwrap();
    art
}

#[test]
fn unsigned_untrusted_tampered_downgraded_and_renamed_artifacts_are_refused() {
    let f = Fleet::new();
    // Unsigned: no .minisig beside it.
    let unsigned = copy_release(&f.v2, &f.dir().join("unsigned"), "p");
    fs::remove_file(f.dir().join("unsigned/p.tar.zst.minisig")).unwrap();
    assert_refused_untouched(&f, &unsigned, &["no signature found", "unsigned"]);
    // Signed by a key the keyring does not hold.
    let (stranger, _) = keypair(f.dir(), "stranger");
    let untrusted = Fleet::build(&f.repo, &stranger, "stranger-out", "9.0.0");
    assert_refused_untouched(&f, &untrusted, &["verification failed"]);
    // Tampered: one byte of the artifact flipped. The members are staged
    // while the file's signature is checked beside them: the staging
    // directory is gone again and the signature is what the error names,
    // whatever the members showed.
    let flipped = |from: &Path, dir: &str| {
        let tampered = copy_release(from, &f.dir().join(dir), "p");
        let mut bytes = fs::read(&tampered).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&tampered, bytes).unwrap();
        tampered
    };
    let signature = [
        "verification failed",
        "signature does not match the artifact",
    ];
    assert_refused_untouched(&f, &flipped(&f.v2, "tampered"), &signature);
    // Tampered, onto a root whose release lost a link that the new release
    // keeps: that link is restored only once the signature matched (the
    // links of new paths are made beside the staging, and reverted).
    let lost = f.root("lost-link");
    f.apply(&f.v1, &lost, &[]).ok();
    fs::remove_file(lost.join("etc/app/a.conf")).unwrap();
    let before = snapshot(&lost);
    let run = f
        .apply(&flipped(&f.v2, "tampered-lost"), &lost, &[])
        .expect_code(1);
    has(&run.stderr, &signature);
    assert_eq!(snapshot(&lost), before, "{} changed", lost.display());
    // Tampered and a downgrade: the signature's verdict still comes first.
    assert_refused_on(&f, &flipped(&f.v1, "tampered-v1"), &signature, false);
    // Downgraded: release 1 onto a root running release 2.
    // (An empty root runs nothing, so there it is no downgrade.)
    assert_refused_on(&f, &f.v1, &["not newer", "--allow-downgrade"], false);
    // Renamed, with its manifest and signature renamed alike.
    let renamed = copy_release(&f.v2, &f.dir().join("renamed"), "q");
    assert_refused_untouched(&f, &renamed, &["renamed", "p.tar.zst"]);
    // Renamed alone: its manifest is not beside it under the new name.
    let alone = copy_release(&f.v2, &f.dir().join("alone"), "q");
    fs::remove_file(f.dir().join("alone/q.manifest.json")).unwrap();
    assert_refused_untouched(&f, &alone, &["no manifest", "renamed"]);
    // An empty keyring refuses everything (bad input: exit 2).
    let root = f.root("nokeys");
    let before = snapshot(&root);
    let nokeys = f.dir().join("nokeys-ring");
    fs::create_dir_all(&nokeys).unwrap();
    let run = infrakit(
        f.dir(),
        &[
            "apply",
            s(&f.v2),
            "--root",
            s(&root),
            "--keyring",
            s(&nokeys),
        ],
    )
    .expect_code(2);
    has(&run.stderr, &["no trusted keys"]);
    assert_eq!(snapshot(&root), before);
    // --allow-downgrade is the explicit way back.
    let root = f.root("down");
    f.apply(&f.v2, &root, &[]).ok();
    f.apply(&f.v1, &root, &["--allow-downgrade"]).ok();
    has(&status(&root, &[]).ok().stdout, &["active: p 1.0.0"]);
}

// ---------------------------------------------------------------------------
// Malicious archives: signed by the trusted key, refused while extracting.
// ---------------------------------------------------------------------------

/// Every refusal class of the extraction (cases of tests/cli/craft.py),
/// each with what the error says.
const ATTACKS: [(&str, &str); 13] = [
    ("absolute", "expected etc/app/a.conf here"),
    ("dotdot", "expected etc/app/a.conf here"),
    ("through-symlink", "lies under zz, which is not a directory"),
    ("hardlink", "hard link ('1') is never produced"),
    ("device", "character device ('3') is never produced"),
    ("fifo", "fifo ('6') is never produced"),
    ("setuid", "mode/owner 4755"),
    ("duplicate", "here (archive order follows the manifest)"),
    ("size", "size 6, the manifest says 7"),
    ("digest", "content is 6 bytes with sha256"),
    ("extra", "extra member not in the manifest"),
    ("truncated", "the archive is truncated"),
    ("trailing", "after the end of the archive"),
];

/// The signed malicious artifact for `case`, crafted from release 1 as
/// version 1.5.0 in its own directory.
fn craft(f: &Fleet, case: &str) -> PathBuf {
    let dir = f.dir().join(format!("attack-{case}"));
    crate::support::craft(case, &f.v1, &dir, "1.5.0", &f.secret, None)
}

#[test]
fn malicious_archives_are_refused_while_extracting_and_the_root_is_untouched() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    let v1_view = view(&root);
    // The one attack aimed outside the root names the host's own path.
    let host_target = Path::new("/etc/app/a.conf");
    let host_had = host_target.symlink_metadata().is_ok();
    for (case, needle) in ATTACKS {
        let artifact = craft(&f, case);
        // Authentic: the signature and both digests hold.
        let run = infrakit(
            f.dir(),
            &[
                "verify",
                s(&artifact),
                "--key",
                s(&f.keyring.join("release.pub")),
            ],
        );
        assert_eq!(
            run.code, 1,
            "{case}: verify must fail on the members: {}",
            run.stderr
        );
        assert!(!run.stderr.contains("signature"), "{case}: {}", run.stderr);
        let before = snapshot(&root);
        let run = f.apply(&artifact, &root, &[]);
        assert_eq!(run.code, 1, "{case}: {}\n{}", run.stdout, run.stderr);
        has(&run.stderr, &["verification failed", needle]);
        assert!(!run.stderr.contains("panicked"), "{case}: {}", run.stderr);
        assert_eq!(snapshot(&root), before, "{case}: the root changed");
        assert_eq!(view(&root), v1_view, "{case}");
        status(&root, &[]).ok();
    }
    // Nothing was written outside the root either.
    assert_eq!(host_target.symlink_metadata().is_ok(), host_had);
}

// ---------------------------------------------------------------------------
// Crash consistency and write failures.
// ---------------------------------------------------------------------------

/// The syscalls through which apply changes anything (and opens files).
const WRITES: &str = "openat,openat2,write,mkdir,mkdirat,symlink,symlinkat,rename,renameat,renameat2,\
                      unlink,unlinkat,rmdir,fchown,fchownat,fchmod,fchmodat,syncfs,fsync,fdatasync";

/// `cp -a FROM TO`: a root in a given state, to start each run from.
fn copy_root(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    tool(Path::new("/"), "cp", &["-a", s(from), s(to)]).ok();
}

/// The paths under `root` outside InfraKit's state.
fn host_paths(root: &Path) -> Vec<String> {
    list_files(root)
        .into_iter()
        .filter(|p| !p.starts_with("var/lib/infrakit"))
        .collect()
}

/// Whether `root` holds an interrupted activation (a journal) or extraction
/// (a partial release), which `status` must report.
fn interrupted(root: &Path) -> bool {
    has_partial(root) || state_dir(root).join("journal.json").exists()
}

/// Whether `root` holds a partial release (`releases/.<id>.partial`).
fn has_partial(root: &Path) -> bool {
    fs::read_dir(state_dir(root).join("releases"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with('.'))
}

/// `wrapper` run with `args`, then `infrakit apply ARTIFACT --root ROOT`
/// with the fleet's keyring (and `-q` when `quiet`) as the wrapped command.
fn wrapped_apply(
    f: &Fleet,
    wrapper: &str,
    args: &[&str],
    artifact: &Path,
    root: &Path,
    quiet: bool,
) -> Run {
    let bin = bin();
    let mut argv = args.to_vec();
    argv.extend([s(&bin), "apply", s(artifact), "--root", s(root)]);
    argv.extend(["--keyring", s(&f.keyring)]);
    if quiet {
        argv.push("-q");
    }
    tool(f.dir(), wrapper, &argv)
}

/// Applies release 2 onto `root` under strace and returns every traced
/// call in order: (syscall, its occurrence number in its thread, the
/// strace line). strace counts `inject=…:when=N` per thread: the farm
/// links are made on a thread of their own while the main one extracts.
fn trace_apply(f: &Fleet, root: &Path) -> Vec<(String, usize, String)> {
    let log = f.dir().join("strace.log");
    let trace = format!("trace={WRITES}");
    let args = ["-f", "-qq", "-o", s(&log), "-e", &trace];
    wrapped_apply(f, "strace", &args, &f.v2, root, true).ok();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (tid, rest) = l.split_once(' ')?;
            let name = rest.trim_start().split('(').next()?.to_owned();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None;
            }
            let n = seen.entry((tid.to_owned(), name.clone())).or_default();
            *n += 1;
            Some((name, *n, l.to_owned()))
        })
        .collect()
}

/// Applies release 2 onto `root`, killed with SIGKILL (strace's syscall
/// injection) on entering the `nth` call of `name`.
fn kill_apply_at(f: &Fleet, root: &Path, name: &str, nth: usize) -> Run {
    let trace = format!("trace={name}");
    let inject = format!("inject={name}:signal=KILL:when={nth}");
    let args = ["-f", "-qq", "-o", "/dev/null", "-e", &trace, "-e", &inject];
    wrapped_apply(f, "strace", &args, &f.v2, root, true)
}

#[test]
fn rollback_completes_an_activation_interrupted_after_the_switch_first() {
    let f = Fleet::new();
    let base = f.root("base");
    f.apply(&f.v1, &base, &[]).ok();
    let v1_view = view(&base);
    let traced = f.dir().join("traced");
    copy_root(&base, &traced);
    let calls = trace_apply(&f, &traced);
    let switch = calls
        .iter()
        .position(|(_, _, l)| l.contains("current.new") && l.contains("rename"))
        .expect("the switch is a rename");
    // Killed on the first call after the switch: release 2 shows, the
    // journal is still there, state.json does not list release 2 yet.
    let (name, nth, line) = &calls[switch + 1];
    let root = f.dir().join("crashed");
    copy_root(&base, &root);
    let run = kill_apply_at(&f, &root, name, *nth);
    assert_eq!(run.code, -1, "{line} did not kill apply: {}", run.stderr);
    assert!(state_dir(&root).join("journal.json").exists());
    has(
        &status(&root, &[]).expect_code(1).stdout,
        &["interrupted", "after the switch"],
    );
    // rollback completes the activation, then rolls it back to release 1.
    let run = infrakit(
        f.dir(),
        &["rollback", "--root", s(&root), "--keyring", s(&f.keyring)],
    )
    .ok();
    has(&run.stdout, &["activated p-1.0.0-", "(was p-2.0.0-"]);
    assert_eq!(view(&root), v1_view);
    status(&root, &[]).ok();
}

#[test]
fn sigkill_at_any_point_of_activation_leaves_the_old_or_the_new_release() {
    let f = Fleet::new();
    let base = f.root("base");
    f.apply(&f.v1, &base, &[]).ok();
    let old_view = view(&base);
    let old_paths = host_paths(&base);
    let done = f.dir().join("done");
    copy_root(&base, &done);
    f.apply(&f.v2, &done, &[]).ok();
    let new_view = view(&done);
    assert_ne!(old_view, new_view);

    // One traced run lists the syscalls of applying release 2.
    let traced = f.dir().join("traced");
    copy_root(&base, &traced);
    let calls = trace_apply(&f, &traced);
    let start = calls
        .iter()
        .position(|(_, _, l)| l.contains("\"lock\"") && l.contains("O_CREAT"))
        .expect("apply takes its lock before it writes");
    let window = &calls[start..];
    assert!(window.len() >= 50, "only {} calls to kill at", window.len());
    let switch = window
        .iter()
        .position(|(_, _, l)| l.contains("current.new") && l.contains("rename"))
        .expect("the switch is a rename");
    // At least 50 points (the window has 50 calls or more) spread evenly,
    // plus the switch and its neighbours.
    let mut points: Vec<usize> = (0..60).map(|i| i * (window.len() - 1) / 59).collect();
    points.extend([switch.saturating_sub(1), switch, switch + 1]);
    points.sort_unstable();
    points.dedup();

    let (mut olds, mut news, mut staging_with_links) = (0, 0, 0);
    for (i, &p) in points.iter().enumerate() {
        let (name, nth, line) = &window[p];
        let root = f.dir().join(format!("crash-{i}"));
        copy_root(&base, &root);
        let run = kill_apply_at(&f, &root, name, *nth);
        assert_eq!(
            run.code, -1,
            "point {p} ({line}) did not kill apply: {}",
            run.stderr
        );
        let now = view(&root);
        let what = format!("killed before call {p} of {}: {line}", window.len());
        if now == old_view {
            olds += 1;
            // Links are made beside the extraction: killed there, the root
            // holds new (dangling) links while the release is still partial.
            let new_links = host_paths(&root).len() > old_paths.len();
            if new_links && has_partial(&root) && state_dir(&root).join("journal.json").exists() {
                staging_with_links += 1;
            }
            // Status tells, then the next apply reverts (or finds nothing
            // to do), and the root is exactly the old release again.
            let st = status(&root, &[]).expect_code(i32::from(interrupted(&root)));
            if st.code != 0 {
                has(&st.stdout, &["interrupted"]);
            }
            let run = f.apply(&f.v1, &root, &[]).ok();
            has(&run.stdout, &["already active"]);
            assert_eq!(view(&root), old_view, "{what}");
            assert_eq!(host_paths(&root), old_paths, "{what}");
            status(&root, &[]).ok();
        } else {
            assert_eq!(now, new_view, "{what}: a mix of old and new");
            news += 1;
            let st = status(&root, &[]).expect_code(i32::from(interrupted(&root)));
            if st.code != 0 {
                has(&st.stdout, &["interrupted", "completes"]);
            }
        }
        // Either way, applying release 2 completes the move.
        f.apply(&f.v2, &root, &[]).ok();
        assert_eq!(view(&root), new_view, "{what}");
        assert_eq!(host_paths(&root), host_paths(&done), "{what}");
        status(&root, &[]).ok();
        assert!(!state_dir(&root).join("journal.json").exists(), "{what}");
        let _ = fs::remove_dir_all(&root);
    }
    eprintln!(
        "{} kill points over {} calls: {olds} left release 1 ({staging_with_links} while \
         staging with new links made), {news} release 2",
        points.len(),
        window.len()
    );
    assert!(olds > 0 && news > 0, "old {olds}, new {news}");
    assert!(
        staging_with_links > 0,
        "no kill point while links and staging overlap"
    );
}

/// Applies release 2 to a copy of a root running release 1, in `shell`
/// (`sh -c`, with the root's path as $1 and the command after it), and
/// checks that it failed and changed nothing.
fn assert_write_failure_keeps_release_1(f: &Fleet, base: &Path, wrap: &str, needle: &str) {
    let root = f.dir().join("limited");
    copy_root(base, &root);
    let before = snapshot(&root);
    let old_view = view(&root);
    let run = wrapped_apply(f, "sh", &["-c", wrap, "sh", s(&root)], &f.v2, &root, false);
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    has(&run.stderr, &[needle]);
    assert_eq!(view(&root), old_view);
    assert_eq!(snapshot(&root), before);
    status(&root, &[]).ok();
}

#[test]
fn a_write_failure_mid_apply_leaves_the_previous_release_active() {
    let f = Fleet::new();
    let base = f.root("base");
    f.apply(&f.v1, &base, &[]).ok();
    // A file-size limit below release 2's 1 MiB file (SIGXFSZ ignored, so
    // the write fails with EFBIG instead of killing the process).
    assert_write_failure_keeps_release_1(
        &f,
        &base,
        "trap '' XFSZ; ulimit -f 512; shift; exec \"$@\"",
        "File too large",
    );
}

#[test]
fn a_full_filesystem_mid_apply_leaves_the_previous_release_active() {
    let f = Fleet::new();
    let base = f.root("base");
    f.apply(&f.v1, &base, &[]).ok();
    // The root on its own small tmpfs (in a private mount namespace): room
    // for release 1 and the copy, not for release 2's 1 MiB file. The
    // listing before and after is taken inside the namespace.
    let listing = f.dir().join("listing");
    let script = format!(
        "set -e; root=$1; shift; mount -t tmpfs -o size=768k tmpfs \"$root\"; \
         cp -a {base}/. \"$root\"; \
         ls() {{ (cd \"$root\" && find . -printf '%p %y %m %U:%G %l\\n' | sort && find . -type f -exec sha256sum {{}} + | sort); }}; \
         ls > {listing}.before; \
         set +e; \"$@\"; rc=$?; set -e; \
         ls > {listing}.after; \
         {bin} status --root \"$root\" > {listing}.status; \
         exit $rc",
        base = s(&base),
        listing = s(&listing),
        bin = s(&bin()),
    );
    let root = f.dir().join("small");
    fs::create_dir_all(&root).unwrap();
    let args = ["-m", "sh", "-c", &script, "sh", s(&root)];
    let run = wrapped_apply(&f, "unshare", &args, &f.v2, &root, false);
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    has(&run.stderr, &["No space left on device"]);
    let before = fs::read_to_string(listing.with_extension("before")).unwrap();
    let after = fs::read_to_string(listing.with_extension("after")).unwrap();
    assert!(before.contains("etc/app/old.conf"), "{before}");
    assert_eq!(after, before);
    let st = fs::read_to_string(listing.with_extension("status")).unwrap();
    has(&st, &["active: p 1.0.0", "drift: 0 path(s)"]);
}

// ---------------------------------------------------------------------------
// http(s) artifacts, from a loopback server the test starts and stops.
// ---------------------------------------------------------------------------

#[test]
fn apply_takes_an_http_url_and_verifies_what_it_downloads() {
    let f = Fleet::new();
    let root = f.root("root");
    f.apply(&f.v1, &root, &[]).ok();
    // A tampered artifact on the server is refused, the root unchanged.
    let bad = copy_release(&f.v2, &f.dir().join("served-bad"), "p");
    let mut bytes = fs::read(&bad).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x40;
    fs::write(&bad, bytes).unwrap();
    let before = snapshot(&root);
    {
        let server = Server::start(&f.dir().join("served-bad"));
        let run = f
            .apply(Path::new(&server.url("p.tar.zst")), &root, &[])
            .expect_code(1);
        has(&run.stderr, &["verification failed"]);
        assert_eq!(snapshot(&root), before);
        // No signature on the server: refused as unsigned.
        fs::remove_file(f.dir().join("served-bad/p.tar.zst.minisig")).unwrap();
        let run = f
            .apply(Path::new(&server.url("p.tar.zst")), &root, &[])
            .expect_code(1);
        has(&run.stderr, &["no signature found"]);
        // A missing artifact is an I/O error naming the URL.
        let run = f
            .apply(Path::new(&server.url("q.tar.zst")), &root, &[])
            .expect_code(2);
        has(&run.stderr, &["q.tar.zst", "404"]);
        assert_eq!(snapshot(&root), before);
    }
    let server = Server::start(f.v2.parent().unwrap());
    let run = f
        .apply(Path::new(&server.url("p.tar.zst")), &root, &[])
        .ok();
    has(&run.stdout, &["activated p-2.0.0-"]);
    has(
        &status(&root, &[]).ok().stdout,
        &["active: p 2.0.0", "drift: 0 path(s)"],
    );
}

#[test]
fn services_can_read_their_files_through_the_links_whatever_the_umask() {
    let f = Fleet::new();
    let root = f.root("root");
    chmod(&root.join("etc"), 0o755);
    let args = ["-c", "umask 077; exec \"$@\"", "sh"];
    wrapped_apply(&f, "sh", &args, &f.v1, &root, false).ok();
    let state = state_dir(&root);
    for d in [state.clone(), state.join("releases")] {
        assert_eq!(mode(&d), 0o755, "{}", d.display());
    }
    // An unprivileged user reads a 0644 file of the release through its link.
    let run = tool(
        f.dir(),
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            s(&root.join("etc/app/a.conf")),
        ],
    )
    .ok();
    assert_eq!(run.stdout, "a = 1\n");
}

mod roles_and_slots;
mod untrusted_state;

/// A copy of release `from` in `dir` whose manifest `edit` changed, signed
/// again with the release key (stock minisign, trusted comment binding name,
/// version and the new manifest's digest): what a signer vouches for,
/// whatever it says. The artifact's bytes stay the same.
fn resign(f: &Fleet, from: &Path, dir: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = f.dir().join(dir);
    let art = copy_release(from, &dir, "p");
    let manifest = dir.join("p.manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    edit(&mut m);
    let text = serde_json::to_vec(&m).unwrap();
    fs::write(&manifest, &text).unwrap();
    let version = m["version"].as_str().unwrap();
    let comment = format!(
        "name:p version:{version} manifest-sha256:{}",
        sha256_hex(&text)
    );
    let sig = format!("{}.minisig", s(&art));
    let args = [
        "-S",
        "-s",
        s(&f.secret),
        "-m",
        s(&art),
        "-x",
        &sig,
        "-t",
        &comment,
    ];
    tool(f.dir(), "minisign", &args).ok();
    art
}
