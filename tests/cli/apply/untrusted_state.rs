//! The host's own state is untrusted input (issue 9, sections 2-4): planted
//! records, links and release directories under `var/lib/infrakit` are
//! refused or ignored, never followed out of the root; `status` never
//! reports "clean" when it could not check; `apply` converges and its dry
//! run decides as the real run does.

use super::*;

/// A root with release 2 active, an `outside` directory beside it holding a
/// canary file, and the state directory's path.
struct Scene {
    root: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new(f: &Fleet, name: &str, with_release: bool) -> Scene {
        let root = f.root(name);
        if with_release {
            f.apply(&f.v2, &root, &[]).ok();
        }
        let outside = f.dir().join(format!("{name}-outside"));
        fs::create_dir_all(outside.join("victim")).unwrap();
        write(&outside.join("victim/canary"), "keep me\n");
        Scene { root, outside }
    }

    fn state(&self) -> PathBuf {
        state_dir(&self.root)
    }

    /// A relative path from the state directory up to `outside`.
    fn climb(&self) -> String {
        let depth = self
            .state()
            .strip_prefix(self.root.parent().unwrap())
            .unwrap()
            .components()
            .count();
        let up = "../".repeat(depth);
        format!(
            "{up}{}",
            self.outside.file_name().unwrap().to_str().unwrap()
        )
    }

    fn snapshots(&self) -> (Vec<String>, Vec<String>) {
        (snapshot(&self.root), snapshot(&self.outside))
    }
}

/// Runs `args` (with `--root` and, for apply, the keyring) and checks the
/// exit code, the message and that neither the root nor `outside` changed.
fn refused(f: &Fleet, scene: &Scene, args: &[&str], code: i32, needles: &[&str]) -> Run {
    let before = scene.snapshots();
    let mut argv: Vec<&str> = args.to_vec();
    argv.extend(["--root", s(&scene.root)]);
    if args[0] == "apply" || args[0] == "rollback" {
        argv.extend(["--keyring", s(&f.keyring)]);
    }
    let run = infrakit(f.dir(), &argv).expect_code(code);
    has(&run.stderr, needles);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(scene.snapshots(), before, "the root or outside changed");
    run
}

/// A journal as apply writes it, activating `to` and stopping `stop_before`.
fn planted_journal(to: &str, stop_before: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "action": "apply", "from": null, "to": to,
        "created_dirs": [], "adopted": [], "history": [], "applied_at": 0,
        "hooks": {"stop_before": stop_before, "stop_after": [], "daemon_reload": false,
                  "sysusers": false, "tmpfiles": false, "sysctl": false, "firewall": false,
                  "restart": [], "start": []}
    })
}

#[test]
fn a_planted_journal_cannot_lead_apply_out_of_the_root() {
    let f = Fleet::new();
    let scene = Scene::new(&f, "journal", true);
    // The attack of the issue: a journal whose target climbs out of the root
    // made the next apply remove `outside/victim` recursively.
    let journal = planted_journal(&(scene.climb() + "/victim"), &[]);
    write(&scene.state().join("journal.json"), journal.to_string());
    refused(
        &f,
        &scene,
        &["apply", s(&f.v2)],
        2,
        &["journal.json", "is not a release id"],
    );
    refused(&f, &scene, &["rollback"], 2, &["journal.json"]);
    let run = status(&scene.root, &[]).expect_code(2);
    has(&run.stderr, &["could not check", "journal.json"]);
    // A hook smuggled in as a unit name is refused the same way.
    let journal = planted_journal("p-9.0.0-000000000000", &["--now; rm -rf /"]);
    write(&scene.state().join("journal.json"), journal.to_string());
    refused(
        &f,
        &scene,
        &["apply", s(&f.v2)],
        2,
        &["journal.json", "not a systemd unit name"],
    );
}

#[test]
fn records_with_unsafe_ids_are_refused_naming_the_file() {
    let f = Fleet::new();
    let scene = Scene::new(&f, "records", true);
    let record_path = scene.state().join("state.json");
    let genuine = fs::read_to_string(&record_path).unwrap();
    let mut record: serde_json::Value = serde_json::from_str(&genuine).unwrap();
    record["history"] = serde_json::json!([scene.climb()]);
    write(&record_path, record.to_string());
    refused(
        &f,
        &scene,
        &["apply", s(&f.v2)],
        2,
        &["state.json", "is not a release id"],
    );
    refused(&f, &scene, &["rollback"], 2, &["state.json"]);
    write(&record_path, genuine);

    // current pointing out of releases/.
    let current = scene.state().join("current");
    let genuine_target = fs::read_link(&current).unwrap();
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(format!("releases/{}", scene.climb()), &current).unwrap();
    refused(
        &f,
        &scene,
        &["apply", s(&f.v2)],
        2,
        &["current", "not at a release"],
    );
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&genuine_target, &current).unwrap();

    // release.json claiming another release than its directory.
    let id = genuine_target
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let info_path = scene
        .state()
        .join("releases")
        .join(&id)
        .join("release.json");
    let genuine_info = fs::read_to_string(&info_path).unwrap();
    let mut info: serde_json::Value = serde_json::from_str(&genuine_info).unwrap();
    info["version"] = "2.0.1".into();
    write(&info_path, info.to_string());
    refused(
        &f,
        &scene,
        &["apply", s(&f.v2)],
        2,
        &["release.json", "lies in the directory of"],
    );
    write(&info_path, genuine_info);
    status(&scene.root, &[]).ok();
}

#[test]
fn symlinks_in_the_state_directory_are_never_followed() {
    let f = Fleet::new();
    // The state directory itself, on an empty root and on one with state.
    let empty = Scene::new(&f, "sym-empty", false);
    fs::create_dir_all(empty.root.join("var/lib")).unwrap();
    std::os::unix::fs::symlink(&empty.outside, empty.state()).unwrap();
    refused(
        &f,
        &empty,
        &["apply", s(&f.v2)],
        2,
        &["var/lib/infrakit", "symlink"],
    );
    refused(
        &f,
        &empty,
        &["apply", s(&f.v2), "--dry-run"],
        2,
        &["symlink"],
    );
    has(
        &status(&empty.root, &[]).expect_code(2).stderr,
        &["could not check", "symlink"],
    );
    // A parent of it.
    let parent = Scene::new(&f, "sym-parent", false);
    fs::create_dir_all(parent.root.join("var")).unwrap();
    std::os::unix::fs::symlink(&parent.outside, parent.root.join("var/lib")).unwrap();
    refused(&f, &parent, &["apply", s(&f.v2)], 2, &["symlink"]);

    // lock, releases and backups on a root with state.
    for (name, what) in [("lock", "lock"), ("releases", "releases")] {
        let scene = Scene::new(&f, &format!("sym-{name}"), true);
        let path = scene.state().join(what);
        if path.is_dir() {
            fs::rename(&path, scene.outside.join("moved")).unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
        // To a file that does not exist: a followed O_CREAT would make it.
        std::os::unix::fs::symlink(scene.outside.join("victim/made-through-link"), &path).unwrap();
        refused(
            &f,
            &scene,
            &["apply", s(&f.v1), "--allow-downgrade"],
            2,
            &[what, "symlink"],
        );
    }
    // backups: --adopt must not move the host's file out of the root.
    let scene = Scene::new(&f, "sym-backups", false);
    write(&scene.root.join("etc/app/a.conf"), "the host's own\n");
    fs::create_dir_all(scene.state()).unwrap();
    std::os::unix::fs::symlink(scene.outside.join("victim"), scene.state().join("backups"))
        .unwrap();
    let run = refused(
        &f,
        &scene,
        &["apply", s(&f.v1), "--adopt"],
        2,
        &["backups", "symlink"],
    );
    assert!(!run.stdout.contains("activated"));
}

#[test]
fn a_planted_release_directory_is_never_activated_by_its_name() {
    let f = Fleet::new();
    // Stage release 2 on one root and copy its directory, doctored, into a
    // root that runs release 1: the next apply must extract afresh.
    let donor = Scene::new(&f, "donor", true);
    let scene = Scene::new(&f, "planted", false);
    f.apply(&f.v1, &scene.root, &[]).ok();
    let id = fs::read_link(donor.state().join("current")).unwrap();
    let id = id.file_name().unwrap().to_owned();
    let planted = scene.state().join("releases").join(&id);
    tool(
        Path::new("/"),
        "cp",
        &[
            "-a",
            s(&donor.state().join("releases").join(&id)),
            s(&planted),
        ],
    )
    .ok();
    write(&planted.join("rootfs/etc/app/a.conf"), "a = evil\n");
    write(&planted.join("rootfs/etc/app/backdoor"), "evil\n");
    let run = f.apply(&f.v2, &scene.root, &[]).ok();
    has(&run.stdout, &["activated p-2.0.0-"]);
    assert_eq!(
        fs::read_to_string(scene.root.join("etc/app/a.conf")).unwrap(),
        "a = 2\n"
    );
    assert!(!planted.join("rootfs/etc/app/backdoor").exists());
    assert_eq!(view(&scene.root), view(&donor.root));
    status(&scene.root, &[]).ok();
}

#[test]
fn a_signed_version_that_is_no_safe_path_component_is_refused_before_writing() {
    let f = Fleet::new();
    // The signer signs whatever manifest it is given: re-sign release 1's
    // manifest with a version that would climb out of releases/.
    let version = "1.5.0/../../../../outside";
    let art = resign(&f, &f.v1, "unsafe-version", |m| {
        m["version"] = version.into()
    });
    assert_refused_untouched(
        &f,
        &art,
        &["1.5.0/../../../../outside", "safe name and version"],
    );
}

#[test]
fn status_never_reports_clean_when_it_could_not_check() {
    let f = Fleet::new();
    let prom = f.dir().join("infrakit.prom");
    let metric = |name: &str| -> String {
        let text = fs::read_to_string(&prom).unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    // A root that does not exist.
    let missing = f.dir().join("no-such-root");
    let run = status(&missing, &["--textfile", s(&prom)]).expect_code(2);
    has(&run.stderr, &["could not check", "no-such-root"]);
    assert!(!run.stdout.contains("drift: 0 path(s)\n"), "{}", run.stdout);
    assert_eq!(metric("infrakit_status_error"), "1");

    // A deleted current, and a dangling one.
    let scene = Scene::new(&f, "status", true);
    status(&scene.root, &["--textfile", s(&prom)]).ok();
    assert_eq!(metric("infrakit_status_error"), "0");
    let current = scene.state().join("current");
    let target = fs::read_link(&current).unwrap();
    fs::remove_file(&current).unwrap();
    has(
        &status(&scene.root, &["--textfile", s(&prom)])
            .expect_code(2)
            .stderr,
        &["current", "is missing"],
    );
    assert_eq!(metric("infrakit_status_error"), "1");
    std::os::unix::fs::symlink("releases/p-7.0.0-000000000000", &current).unwrap();
    has(
        &status(&scene.root, &[]).expect_code(2).stderr,
        &["could not check", "p-7.0.0-000000000000"],
    );
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&target, &current).unwrap();

    // Files the caller may not read are not drift: run as nobody with the
    // release tree closed to others.
    let rootfs = scene.state().join(&target).join("rootfs");
    chmod(f.dir(), 0o755);
    chmod(&rootfs, 0o700);
    let run = tool_with(
        Path::new("/"),
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            s(&bin()),
            "status",
            "--root",
            s(&scene.root),
            "--json",
        ],
        |c| {
            clear_build_env(c);
        },
    )
    .expect_code(2);
    let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(report["drift"], serde_json::json!([]), "{}", run.stdout);
    let errors = report["errors"].to_string();
    has(&errors, &["rootfs", "Permission denied"]);
    has(&run.stderr, &["could not check"]);
    chmod(&rootfs, 0o755);
    status(&scene.root, &[]).ok();
}

#[test]
fn status_lists_retained_releases_with_their_applied_at_times() {
    let f = Fleet::new();
    let root = f.root("times");
    f.apply(&f.v1, &root, &[]).ok();
    f.apply(&f.v2, &root, &[]).ok();
    let run = status(&root, &["--json"]).ok();
    let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let retained = report["retained"].as_array().unwrap();
    assert_eq!(retained.len(), 2, "{}", run.stdout);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (r, version, active) in [
        (&retained[0], "1.0.0", false),
        (&retained[1], "2.0.0", true),
    ] {
        assert!(
            r["id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("p-{version}-"))
        );
        assert_eq!(r["active"], active);
        let at = r["applied_at"].as_u64().unwrap();
        assert!(now - at < 600, "applied_at {at} is not recent");
    }
    let human = status(&root, &[]).ok().stdout;
    let year = &tool(Path::new("/"), "date", &["-u", "+%Y-"]).ok().stdout;
    has(&human, &["retained:", "(active)", "applied ", year.trim()]);
}

#[test]
fn re_applying_the_active_release_repairs_drift_and_its_dry_run_says_so() {
    let f = Fleet::new();
    let root = f.root("repair");
    f.apply(&f.v2, &root, &[]).ok();
    let clean = view(&root);
    // Already active and clean: nothing to do, in the dry run and for real.
    for extra in [&["--dry-run"][..], &[]] {
        let run = f.apply(&f.v2, &root, extra).ok();
        has(&run.stdout, &["already active", "nothing to do"]);
    }
    // Drift of every kind: a link replaced by a file, a link deleted, the
    // release's own copy edited.
    let live = root.join("etc/app/new.conf");
    fs::remove_file(&live).unwrap();
    write(&live, "edited in place\n");
    fs::remove_file(root.join("etc/app/current.conf")).unwrap();
    let id = fs::read_link(state_dir(&root).join("current")).unwrap();
    let copy = state_dir(&root).join(&id).join("rootfs/usr/bin/app-tool");
    chmod(&copy, 0o755);
    write(&copy, "tampered\n");
    status(&root, &[]).expect_code(1);
    let before = snapshot(&root);
    let run = f.apply(&f.v2, &root, &["--dry-run", "-q"]).ok();
    has(
        &run.stdout,
        &[
            "would repair",
            "repair  etc/app/new.conf",
            "repair  etc/app/current.conf",
            "repair  usr/bin/app-tool",
        ],
    );
    assert_eq!(snapshot(&root), before, "the dry run wrote");
    let run = f.apply(&f.v2, &root, &[]).ok();
    has(&run.stdout, &["repaired p-2.0.0-", "3 repaired"]);
    assert_eq!(view(&root), clean);
    status(&root, &[]).ok();
    // The file that stood in the link's place is kept, not lost.
    let kept = state_dir(&root)
        .join("backups")
        .join(id.file_name().unwrap())
        .join("etc/app/new.conf");
    assert_eq!(fs::read_to_string(kept).unwrap(), "edited in place\n");
    // And once more: converged.
    has(&f.apply(&f.v2, &root, &[]).ok().stdout, &["nothing to do"]);
}

#[test]
fn identical_host_files_are_adopted_without_adopt() {
    let f = Fleet::new();
    let root = f.root("identical");
    // What a stock image might already carry: the same bytes and link.
    write(&root.join("etc/app/a.conf"), "a = 1\n");
    std::os::unix::fs::symlink("a.conf", root.join("etc/app/current.conf")).unwrap();
    let run = f.apply(&f.v1, &root, &["--dry-run"]).ok();
    has(
        &run.stdout,
        &[
            "identical to the release",
            "etc/app/a.conf",
            "etc/app/current.conf",
        ],
    );
    f.apply(&f.v1, &root, &[]).ok();
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(state_dir(&root).join("state.json")).unwrap()).unwrap();
    let adopted = record["adopted"].as_object().unwrap();
    assert!(
        adopted.contains_key("etc/app/a.conf") && adopted.contains_key("etc/app/current.conf"),
        "{record}"
    );
    status(&root, &[]).ok();
    // Different bytes are still a conflict without --adopt.
    let other = f.root("different");
    write(&other.join("etc/app/a.conf"), "a = 0\n");
    let run = f.apply(&f.v1, &other, &[]).expect_code(1);
    has(&run.stderr, &["etc/app/a.conf", "--adopt"]);
}

#[test]
fn dry_run_exits_as_the_real_run_would() {
    let f = Fleet::new();
    // A root that does not exist: 2 for both.
    let missing = f.dir().join("absent-root");
    for extra in [&["--dry-run"][..], &[]] {
        let run = f.apply(&f.v1, &missing, extra).expect_code(2);
        has(&run.stderr, &["absent-root", "--root"]);
        assert!(!missing.exists());
    }
    // A conflict: 1 for both.
    let root = f.root("conflict");
    write(&root.join("etc/app/a.conf"), "mine\n");
    for extra in [&["--dry-run"][..], &[]] {
        f.apply(&f.v1, &root, extra).expect_code(1);
    }
    // A root the caller may not write: 2 for both (run as nobody).
    chmod(f.dir(), 0o755);
    let ro = f.root("read-only");
    let binary = bin();
    let as_nobody = |extra: &[&str]| {
        let mut args = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            s(&binary),
            "apply",
            s(&f.v1),
            "--root",
            s(&ro),
            "--keyring",
            s(&f.keyring),
        ];
        args.extend_from_slice(extra);
        tool_with(f.dir(), "setpriv", &args, |c| {
            clear_build_env(c);
        })
    };
    let before = snapshot(&ro);
    let dry = as_nobody(&["--dry-run"]);
    let real = as_nobody(&[]);
    assert_eq!(
        (dry.code, real.code),
        (2, 2),
        "dry: {}\nreal: {}",
        dry.stderr,
        real.stderr
    );
    has(&dry.stderr, &["read-only", "ermission denied"]);
    has(&real.stderr, &["read-only", "ermission denied"]);
    assert_eq!(snapshot(&ro), before);
}

#[test]
fn a_refusal_while_extracting_leaves_an_empty_root_empty() {
    let f = Fleet::new();
    let artifact = craft(&f, "digest");
    let scene = Scene::new(&f, "empty-extract", false);
    let run = refused(
        &f,
        &scene,
        &["apply", s(&artifact)],
        1,
        &["content is 6 bytes"],
    );
    assert!(!run.stdout.contains("activated"));
    assert!(!scene.state().exists());
}

#[test]
fn rollback_checks_the_retained_release_again_before_activating_it() {
    let f = Fleet::new();
    let scene = Scene::new(&f, "rollback-check", false);
    f.apply(&f.v1, &scene.root, &[]).ok();
    f.apply(&f.v2, &scene.root, &[]).ok();
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(scene.state().join("state.json")).unwrap()).unwrap();
    let v1_id = record["history"][0].as_str().unwrap().to_owned();
    let v1_dir = scene.state().join("releases").join(&v1_id);
    let file = v1_dir.join("rootfs/etc/app/a.conf");
    let genuine = fs::read(&file).unwrap();

    // Its files edited: refused by the file check.
    chmod(&file, 0o644);
    write(&file, "a = evil\n");
    refused(
        &f,
        &scene,
        &["rollback"],
        1,
        &[&v1_id, "no longer matches its manifest", "etc/app/a.conf"],
    );

    // Its manifest edited to match: refused, the signature names another manifest.
    let manifest_path = v1_dir.join("manifest.json");
    let genuine_manifest = fs::read(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&genuine_manifest).unwrap();
    for e in m["entries"].as_array_mut().unwrap() {
        if e["path"] == "etc/app/a.conf" {
            e["sha256"] = sha256_hex(b"a = evil\n").into();
            e["size"] = 9.into();
        }
    }
    write(&manifest_path, serde_json::to_vec(&m).unwrap());
    refused(
        &f,
        &scene,
        &["rollback"],
        1,
        &[&v1_id, "not vouched for", "not the one its signature names"],
    );
    write(&manifest_path, &genuine_manifest);
    write(&file, &genuine);

    // A keyring without the release key: refused too.
    let (_, stranger) = keypair(f.dir(), "stranger");
    let other_ring = f.dir().join("other-ring");
    fs::create_dir_all(&other_ring).unwrap();
    fs::copy(&stranger, other_ring.join("stranger.pub")).unwrap();
    let before = scene.snapshots();
    let run = infrakit(
        f.dir(),
        &[
            "rollback",
            "--root",
            s(&scene.root),
            "--keyring",
            s(&other_ring),
        ],
    )
    .expect_code(1);
    has(&run.stderr, &["not vouched for", "not a trusted key"]);
    assert_eq!(scene.snapshots(), before);

    // Intact, with the right keyring: rolled back.
    let run = infrakit(
        f.dir(),
        &[
            "rollback",
            "--root",
            s(&scene.root),
            "--keyring",
            s(&f.keyring),
        ],
    )
    .ok();
    has(&run.stdout, &["activated p-1.0.0-"]);
    status(&scene.root, &[]).ok();
}

#[test]
fn a_planted_journal_undoes_nothing_its_release_does_not_vouch_for() {
    let f = Fleet::new();
    let scene = Scene::new(&f, "vouch", true);
    // An empty host directory no release has, and a planted journal that
    // claims apply created it (and adopted a host file), for the release
    // that is active: recovery "completes" it.
    fs::create_dir_all(scene.root.join("srv/data")).unwrap();
    let id = fs::read_link(scene.state().join("current")).unwrap();
    let id = id.file_name().unwrap().to_str().unwrap().to_owned();
    let mut journal = planted_journal(&id, &[]);
    journal["history"] = serde_json::json!([id]);
    journal["created_dirs"] = serde_json::json!(["srv", "srv/data"]);
    journal["adopted"] = serde_json::json!(["etc/hostname"]);
    write(&scene.state().join("journal.json"), journal.to_string());
    let run = f.apply(&f.v2, &scene.root, &[]).ok();
    has(&run.stdout, &["completed the interrupted apply"]);
    assert!(
        scene.root.join("srv/data").is_dir(),
        "a directory the release never had was removed"
    );
    assert_eq!(
        fs::read_to_string(scene.root.join("etc/hostname")).unwrap(),
        "host-1\n"
    );
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(scene.state().join("state.json")).unwrap()).unwrap();
    assert!(!record.to_string().contains("srv"), "{record}");
    assert!(
        !record["adopted"]
            .as_object()
            .unwrap()
            .contains_key("etc/hostname")
    );
    status(&scene.root, &[]).ok();
}
