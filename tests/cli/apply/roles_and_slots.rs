//! What a release declares about its host (issue 10): signer services are
//! stopped before the switch and started after it, one at a time, never two
//! releases' at once; `status` checks the secret slots and the host
//! prerequisites the manifest lists. The manifests here are release 1 and 2
//! re-signed with those declarations, as an adapter build writes them.

use super::*;

/// `m` with `app.service` declared a signer.
fn with_signer(m: &mut serde_json::Value) {
    m["services"] = serde_json::json!([
        {"layer": "app", "role": "signer", "unit": "app.service"}
    ]);
}

#[test]
fn signers_stop_before_the_switch_and_start_after_it_in_apply_and_rollback() {
    let f = Fleet::new();
    let v1 = resign(&f, &f.v1, "signer-1", |m| {
        m["version"] = "1.0.1".into();
        with_signer(m);
    });
    let v2 = resign(&f, &f.v2, "signer-2", |m| {
        m["version"] = "2.0.1".into();
        with_signer(m);
    });
    let root = f.root("signers");
    // A first apply starts no signer: its keys may not be in place yet.
    let first = f.apply(&v1, &root, &["--dry-run", "--json"]).ok();
    let plan: serde_json::Value = serde_json::from_str(first.stdout.trim()).unwrap();
    assert_eq!(plan["plan"]["hooks"]["before"], serde_json::json!([]));
    let after = plan["plan"]["hooks"]["after"]
        .as_array()
        .expect("a list of commands");
    assert!(!after.iter().any(|c| c[1] == "start"), "{after:?}");
    f.apply(&v1, &root, &[]).ok();

    let hooks = |run: Run| -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        let list = |k: &str| serde_json::from_value(doc["plan"]["hooks"][k].clone()).unwrap();
        (list("before"), list("after"))
    };
    let stop = vec!["systemctl".to_owned(), "stop".into(), "app.service".into()];
    let start = vec!["systemctl".to_owned(), "start".into(), "app.service".into()];
    // apply 1 -> 2: the old signer is down before the switch (even though
    // its unit file did not change), started after it, alone and last.
    let (before, after) = hooks(f.apply(&v2, &root, &["--dry-run", "--json"]).ok());
    assert_eq!(before, vec![stop.clone()]);
    let starts: Vec<usize> = (0..after.len())
        .filter(|i| after[*i][1] == "start")
        .collect();
    assert_eq!(starts, vec![after.len() - 1], "{after:?}");
    assert_eq!(after[starts[0]], start);
    // The human plan says the same, in order.
    let human = f.apply(&v2, &root, &["--dry-run"]).ok().stdout;
    let at = |needle: &str| {
        human
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} in\n{human}"))
    };
    assert!(at("systemctl stop app.service") < at("systemctl start app.service"));
    f.apply(&v2, &root, &[]).ok();

    // rollback 2 -> 1 follows the same rule: release 1's signer is started
    // only after release 2's was stopped and the switch happened.
    let run = infrakit(
        f.dir(),
        &[
            "rollback",
            "--root",
            s(&root),
            "--keyring",
            s(&f.keyring),
            "--dry-run",
            "--json",
        ],
    )
    .ok();
    let (before, after) = hooks(run);
    assert_eq!(before, vec![stop]);
    assert_eq!(after.last(), Some(&start), "started last: {after:?}");
    assert_eq!(after.iter().filter(|c| **c == start).count(), 1);
    assert!(
        !after
            .iter()
            .any(|c| c[1] == "try-restart" && c.contains(&"app.service".to_owned()))
    );
}

#[test]
fn status_reports_each_missing_or_wrong_secret_slot_and_missing_prerequisites() {
    let f = Fleet::new();
    let art = resign(&f, &f.v1, "slots", |m| {
        m["version"] = "1.0.2".into();
        m["prerequisites"] = serde_json::json!(["docker.io", "liburing2"]);
        m["secrets"] = serde_json::json!([{
            "description": "keystore password", "group": "app", "layer": "app", "mode": "0640",
            "name": "keystore-password", "owner": "root", "path": "/etc/app/keystore-password",
            "units": ["app.service"]
        }, {
            "description": "validator keystores", "group": "app", "kind": "dir", "layer": "app",
            "mode": "0700", "name": "validators", "owner": "root", "path": "/var/lib/app/validators",
            "units": ["app.service"]
        }]);
    });
    let root = f.root("slots");
    write(&root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    write(&root.join("etc/group"), "root:x:0:\napp:x:990:\n");
    f.apply(&art, &root, &[]).ok();
    let prom = f.dir().join("slots.prom");
    let report = |code: i32| -> serde_json::Value {
        let run = status(&root, &["--json", "--textfile", s(&prom)]).expect_code(code);
        serde_json::from_str(run.stdout.trim()).unwrap()
    };
    let metric = |name: &str| {
        let text = fs::read_to_string(&prom).unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let doc = report(1);
    assert_eq!(doc["missing_secrets"][0]["problem"], "missing", "{doc}");
    assert_eq!(doc["missing_secrets"][1]["problem"], "missing", "{doc}");
    assert_eq!(doc["release_secrets"], 2);
    // A directory slot wants a directory.
    let dir = root.join("var/lib/app/validators");
    write(&dir, "a file\n");
    let doc = report(1);
    assert_eq!(doc["missing_secrets"][1]["problem"], "is not a directory");
    fs::remove_file(&dir).unwrap();
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(0), Some(990)).unwrap();
    chmod(&dir, 0o700);
    let doc = report(1);
    assert_eq!(doc["missing_secrets"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(
        doc["missing_prerequisites"],
        serde_json::json!(["docker.io", "liburing2"])
    );
    assert_eq!(
        metric("infrakit_missing_secrets"),
        "1",
        "the directory slot is provided now"
    );
    assert_eq!(metric("infrakit_missing_prerequisites"), "2");
    let human = status(&root, &[]).expect_code(1).stdout;
    has(
        &human,
        &[
            "keystore-password (/etc/app/keystore-password): missing",
            "docker.io liburing2",
        ],
    );

    let slot = root.join("etc/app/keystore-password");
    write(&slot, "hunter2\n");
    chmod(&slot, 0o644);
    let doc = report(1);
    has(
        doc["missing_secrets"][0]["problem"].as_str().unwrap(),
        &["owned by 0:0", "root:app"],
    );
    std::os::unix::fs::chown(&slot, Some(0), Some(990)).unwrap();
    let doc = report(1);
    has(
        doc["missing_secrets"][0]["problem"].as_str().unwrap(),
        &["mode 0644 allows more"],
    );
    chmod(&slot, 0o600);
    // Provided correctly (a stricter mode is fine), and the packages installed.
    write(
        &root.join("var/lib/dpkg/status"),
        "Package: docker.io\nStatus: install ok installed\nVersion: 1\n\n\
         Package: liburing2\nStatus: deinstall ok config-files\n\n",
    );
    let doc = report(1);
    assert_eq!(doc["missing_secrets"], serde_json::json!([]));
    assert_eq!(
        doc["missing_prerequisites"],
        serde_json::json!(["liburing2"])
    );
    write(
        &root.join("var/lib/dpkg/status"),
        "Package: docker.io\nStatus: install ok installed\n\nPackage: liburing2\nStatus: install ok installed\n",
    );
    report(0);
    assert_eq!(metric("infrakit_missing_secrets"), "0");
    assert_eq!(metric("infrakit_missing_prerequisites"), "0");
}

#[test]
fn a_unit_name_systemd_could_not_load_is_refused_before_anything_is_written() {
    let f = Fleet::new();
    // Release 1 (as a signer declares it) names a unit "-H evil.service":
    // moving on from it would hand that to systemctl and to the journal.
    let odd = resign(&f, &f.v1, "odd-unit", |m| {
        m["version"] = "1.0.3".into();
        m["services"] = serde_json::json!([
            {"layer": "app", "role": "signer", "unit": "-H evil.service"}
        ]);
    });
    let root = f.root("odd-unit");
    f.apply(&odd, &root, &[]).ok();
    let before = snapshot(&root);
    let run = f.apply(&f.v2, &root, &[]).expect_code(1);
    has(&run.stderr, &["-H evil.service", "not a systemd unit name"]);
    assert_eq!(snapshot(&root), before, "the refusal wrote");
    status(&root, &[]).ok();
}
