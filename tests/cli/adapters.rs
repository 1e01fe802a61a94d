//! Adapters, judged by the tools that read their output on a host
//! (ORACLES.md): a test adapter made here (a dummy executable in its
//! `root/`, every kind of service the format has, secret slots, sysctl,
//! udev, an environment file, `when`) is composed over the repo's real base
//! overlay and built with the real binary; GNU tar extracts it into `R`;
//! `systemd-analyze verify` and `security --offline=yes`,
//! `systemd-sysusers` and `systemd-tmpfiles` judge R; the manifest must list
//! services with roles, slots with their consumers, and prerequisites. The
//! refusals (a file at a slot path, `[[input]]` before inputs are wired, a
//! secret-looking environment value) are shown being refused.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::*;

/// The highest `systemd-analyze security` exposure any adapter service
/// running a native binary may have (issue 10).
const MAX_EXPOSURE: f64 = 2.5;

const ADAPTER: &str = r#"
description = "Test chain: every kind of service an adapter declares"
prerequisites = ["liburing2", "libboost-fiber1.83.0", "liburing2"]

[params.chain]
type = "string"
default = "testnet"
[params.node-cpus]
type = "string"
default = "2-3"
[params.client]
type = "string"
default = "alpha"

[[user]]
name = "tchain"
home = "/var/lib/tchain"
[[group]]
name = "tchain"
gid = 951
[[group]]
name = "tchain-ipc"
[[tmpfile]]
type = "d"
path = "/var/lib/tchain-extra"
mode = 0o750
user = "tchain"
group = "tchain"

[[port]]
port = 30399
proto = "udp"
exposure = "public"

[[secret]]
name = "keystore-password"
path = "/etc/tchain/keystore-password"
group = "tchain"
mode = 0o640
description = "Password of the signing keystore"

[[secret]]
name = "id-key"
path = "/etc/tchain/id-key"
owner = "tchain"
mode = 0o600
description = "Node identity key, read in place"
credential = false

[[service]]
name = "tchain-signer"
description = "Test chain signer (100% test)"
role = "signer"
exec = ["/usr/bin/tchain-node", "--chain", "{{ params.chain }}",
        "--password-file", "{{ credentials }}/keystore-password",
        "--identity", "{{ secrets['id-key'].path }}",
        "--rpc", "127.0.0.1:8545", "--label", "50% done $HOME"]
user = "tchain"
group = "tchain"
supplementary-groups = ["tchain-ipc"]
state = ["/var/lib/tchain"]
secrets = ["keystore-password", "id-key"]
environment = { RUST_LOG = "info,h2=warn" }
environment-files = ["/etc/tchain/tchain.env"]
limits = { NOFILE = 1048576, MEMLOCK = "infinity" }
after = ["network-online.target"]
wants = ["network-online.target"]
wanted-by = "multi-user.target"
cpu-affinity-param = "node-cpus"

[[service]]
name = "tchain-db"
description = "Test chain database on a raw device"
exec = ["/usr/bin/tchain-node", "--db", "/dev/tchain-db"]
user = "tchain"
devices = ["/dev/tchain-db rw"]
state = ["/var/lib/tchain-db"]
wanted-by = "multi-user.target"

[[service]]
name = "tchain-rpc"
description = "Test chain RPC"
exec = ["/usr/bin/tchain-node", "--rpc-only", "--bind", "127.0.0.1"]
user = "dynamic"
state = ["/var/lib/tchain-rpc"]
wanted-by = "multi-user.target"

[[service]]
name = "tchain-prune"
description = "Test chain pruning"
type = "oneshot"
exec = ["/usr/bin/tchain-node", "--prune"]
user = "dynamic"
timer = { on-calendar = "hourly", persistent = true }

[[service]]
name = "tchain-js"
description = "Test chain JIT helper"
exec = ["/usr/bin/tchain-node", "--js"]
user = "dynamic"
memory-deny-write-execute = false
address-families = ["AF_UNIX"]

[[service]]
name = "tchain-alpha"
description = "Only with client alpha"
exec = ["/usr/bin/tchain-node", "--alpha"]
when = "client == alpha"

[[service]]
name = "tchain-beta"
description = "Only with client beta"
exec = ["/usr/bin/tchain-node", "--beta"]
when = "client == beta"

[sysctl]
"net.core.rmem_max" = "62500000"
"vm.max_map_count" = 262144

[[udev]]
name = "90-tchain-db"
rules = ['ENV{ID_PART_ENTRY_NAME}=="tchain-db", GROUP="tchain", MODE="0660", SYMLINK+="tchain-db"']

[[env]]
path = "/etc/tchain/tchain.env"
mode = 0o640
group = "tchain"
[env.vars]
CHAIN = "tchain_{{ params.chain }}"
"#;

/// The units the adapter renders (`when` leaves tchain-beta out).
const SERVICES: [&str; 6] = [
    "tchain-alpha.service",
    "tchain-db.service",
    "tchain-js.service",
    "tchain-prune.service",
    "tchain-rpc.service",
    "tchain-signer.service",
];

/// A repo: the real profiles/ and overlays/, `adapters/tchain/` (the
/// adapter above with `extra` appended) and `profiles/chain.toml`
/// composing base and tchain.
fn repo(extra: &str) -> tempfile::TempDir {
    let tmp = tempdir();
    let w = tmp.path();
    copy_repo_profiles(w);
    let a = w.join("adapters/tchain");
    fs::create_dir_all(a.join("root/usr/bin")).unwrap();
    write(&a.join("adapter.toml"), format!("{ADAPTER}{extra}"));
    write(&a.join("root/usr/bin/tchain-node"), "#!/bin/sh\nexit 0\n");
    chmod(&a.join("root/usr/bin/tchain-node"), 0o755);
    write(
        &w.join("profiles/chain.toml"),
        "name = \"chain\"\nversion = \"0.1.0\"\nsource-date-epoch = 1767225600\n\
         overlays = [\"base\"]\nadapters = [\"tchain\"]\n",
    );
    tmp
}

/// Builds profiles/chain.toml and extracts it into `R` with GNU tar.
fn build(tmp: &tempfile::TempDir) -> PathBuf {
    let w = tmp.path();
    infrakit(w, &["build", "profiles/chain.toml", "--out", "dist"]).ok();
    let root = w.join("R");
    fs::create_dir(&root).unwrap();
    tool(
        w,
        "tar",
        &[
            "--zstd",
            "-xpf",
            "dist/chain.tar.zst",
            "-C",
            "R",
            "--numeric-owner",
        ],
    )
    .ok();
    root
}

fn clean(run: Run, what: &str) -> Run {
    assert!(
        run.code == 0 && run.stderr.trim().is_empty(),
        "{what}: exit {} (want 0 and an empty stderr)\nstdout:\n{}\nstderr:\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
    run
}

/// `cp -a SRC/. DST` (merging) or `cp -a SRC DST`.
fn copy_into(src: &str, dst: &Path) {
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let src = if dst.is_dir() && Path::new(src).is_dir() {
        format!("{src}/.")
    } else {
        src.to_owned()
    };
    tool(Path::new("/"), "cp", &["-a", &src, dst.to_str().unwrap()]).ok();
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

#[test]
fn adapter_units_pass_systemd_analyze_verify_and_score_at_most_2_5() {
    require_tool("systemd-analyze");
    let tmp = repo("");
    let root = build(&tmp);
    let units = root.join("usr/lib/systemd/system");
    let mut ours: Vec<String> = fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("tchain-"))
        .collect();
    ours.sort();
    let mut want: Vec<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
    want.push("tchain-prune.timer".to_owned());
    want.sort();
    assert_eq!(ours, want, "tchain-beta's `when` does not hold");

    // The unit text: sandbox always on, the declared settings, escaping.
    let signer = read(&root, "usr/lib/systemd/system/tchain-signer.service");
    for line in [
        "ExecStart=/usr/bin/tchain-node --chain testnet --password-file ${CREDENTIALS_DIRECTORY}/keystore-password --identity /etc/tchain/id-key --rpc 127.0.0.1:8545 --label \"50%% done $HOME\"",
        "Description=Test chain signer (100%% test)",
        "LoadCredential=keystore-password:/etc/tchain/keystore-password",
        "AssertPathExists=/etc/tchain/id-key",
        "User=tchain",
        "SupplementaryGroups=tchain-ipc",
        "StateDirectory=tchain",
        "ReadWritePaths=/var/lib/tchain",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
        "LimitMEMLOCK=infinity",
        "Environment=\"RUST_LOG=info,h2=warn\"",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            signer.lines().any(|l| l == line),
            "{line:?} missing:\n{signer}"
        );
    }
    let db = read(&root, "usr/lib/systemd/system/tchain-db.service");
    assert!(
        db.contains("\nPrivateDevices=no\nDevicePolicy=closed\nDeviceAllow=/dev/tchain-db rw\n")
    );
    assert!(
        read(&root, "usr/lib/systemd/system/tchain-rpc.service").contains("\nDynamicUser=yes\n")
    );
    assert!(
        read(&root, "usr/lib/systemd/system/tchain-js.service")
            .contains("\nMemoryDenyWriteExecute=no\n")
    );
    assert_eq!(
        read(
            &root,
            "etc/systemd/system/tchain-signer.service.d/50-cpu.conf"
        )
        .lines()
        .skip(1)
        .collect::<Vec<_>>(),
        ["[Service]", "CPUAffinity=2-3", "AllowedCPUs=2-3"]
    );
    for (link, unit) in [
        (
            "multi-user.target.wants/tchain-signer.service",
            "tchain-signer.service",
        ),
        (
            "multi-user.target.wants/tchain-rpc.service",
            "tchain-rpc.service",
        ),
        (
            "timers.target.wants/tchain-prune.timer",
            "tchain-prune.timer",
        ),
    ] {
        let target = fs::read_link(root.join("etc/systemd/system").join(link)).unwrap();
        assert_eq!(target, Path::new("/usr/lib/systemd/system").join(unit));
    }
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/tchain-js.service")
            .exists()
    );

    // R gets the host's units (the targets ours hook into).
    copy_into("/usr/lib/systemd/system", &units);
    let root_arg = format!("--root={}", root.display());
    for unit in want
        .iter()
        .map(String::as_str)
        .chain(["multi-user.target", "timers.target"])
    {
        clean(
            tool(
                tmp.path(),
                "systemd-analyze",
                &["verify", &root_arg, "--man=no", unit],
            ),
            &format!("systemd-analyze verify {unit}"),
        );
    }

    // Every service runs the dummy native binary: each must score at most 2.5.
    let mut scores = Vec::new();
    for unit in SERVICES {
        let run = tool(
            tmp.path(),
            "systemd-analyze",
            &["security", "--offline=yes", &root_arg, "--no-pager", unit],
        );
        let line = run
            .stdout
            .lines()
            .find(|l| l.contains(&format!("Overall exposure level for {unit}")))
            .unwrap_or_else(|| {
                panic!(
                    "no overall score for {unit}:\n{}\n{}",
                    run.stdout, run.stderr
                )
            });
        let score: f64 = line
            .rsplit_once(": ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
        eprintln!("systemd-analyze security {unit}: {score:.1}");
        scores.push((unit, score, run.stdout));
    }
    for (unit, score, report) in &scores {
        assert!(
            *score <= MAX_EXPOSURE,
            "{unit}: exposure {score} above {MAX_EXPOSURE}:\n{report}"
        );
    }
}

#[test]
fn manifest_lists_services_with_roles_secrets_with_consumers_and_prerequisites() {
    let tmp = repo("");
    build(&tmp);
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(tmp.path().join("dist/chain.manifest.json")).unwrap())
            .unwrap();
    let services: Vec<(String, String, String)> = m["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["unit"].as_str().unwrap().to_owned(),
                s["role"].as_str().unwrap().to_owned(),
                s["layer"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = SERVICES
        .iter()
        .map(|u| {
            let role = if *u == "tchain-signer.service" {
                "signer"
            } else {
                "service"
            };
            ((*u).to_owned(), role.to_owned(), "tchain".to_owned())
        })
        .collect();
    assert_eq!(services, want);
    assert_eq!(
        m["secrets"],
        serde_json::json!([
            {"description": "Node identity key, read in place", "group": "root", "layer": "tchain",
             "mode": "0600", "name": "id-key", "owner": "tchain", "path": "/etc/tchain/id-key",
             "units": ["tchain-signer.service"]},
            {"description": "Password of the signing keystore", "group": "tchain", "layer": "tchain",
             "mode": "0640", "name": "keystore-password", "owner": "root",
             "path": "/etc/tchain/keystore-password", "units": ["tchain-signer.service"]}
        ])
    );
    assert_eq!(
        m["prerequisites"],
        serde_json::json!(["libboost-fiber1.83.0", "liburing2"])
    );
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["base", "tchain"]);
    // Nothing at a slot path ships.
    let entries = m["entries"].as_array().unwrap();
    assert!(!entries.iter().any(|e| {
        e["path"].as_str().unwrap().starts_with("etc/tchain/id-key")
            || e["path"]
                .as_str()
                .unwrap()
                .starts_with("etc/tchain/keystore")
    }));
    // `lint` agrees the composed profile is clean.
    infrakit(tmp.path(), &["lint", "profiles/chain.toml"]).ok();
}

#[test]
fn sysusers_and_tmpfiles_accept_the_generated_files() {
    let tmp = repo("");
    let root = build(&tmp);
    let root_arg = format!("--root={}", root.display());
    let dry = tool(tmp.path(), "systemd-sysusers", &[&root_arg, "--dry-run"]).ok();
    let all = format!("{}{}", dry.stdout, dry.stderr);
    assert!(
        !all.to_lowercase().contains("warn") && !all.to_lowercase().contains("error"),
        "{all}"
    );
    assert!(all.contains("Creating group 'tchain-ipc'"), "{all}");
    assert!(all.contains("Creating user 'tchain'"), "{all}");
    use std::os::unix::fs::MetadataExt;
    // The environment file's group is the fixed GID the adapter declares,
    // carried in the archive (no tmpfiles line needed on an applied host).
    let env = fs::metadata(root.join("etc/tchain/tchain.env")).unwrap();
    assert_eq!((env.mode() & 0o7777, env.uid(), env.gid()), (0o640, 0, 951));
    assert!(
        all.contains("Creating group 'tchain' with GID 951"),
        "{all}"
    );
    for f in ["passwd", "group", "shadow", "gshadow"] {
        copy_into(&format!("/etc/{f}"), &root.join(format!("etc/{f}")));
    }
    tool(tmp.path(), "systemd-sysusers", &[&root_arg]).ok();
    let group = read(&root, "etc/group");
    assert!(
        group.lines().any(|l| l.starts_with("tchain:x:951:")),
        "{group}"
    );
    let passwd = read(&root, "etc/passwd");
    let user = passwd
        .lines()
        .find(|l| l.starts_with("tchain:"))
        .expect("sysusers made tchain");
    assert_eq!(user.split(':').nth(3), Some("951"), "{user}");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    clean(
        tool(tmp.path(), "systemd-tmpfiles", &[&root_arg, "--create"]),
        "systemd-tmpfiles --create",
    );
    let extra = fs::symlink_metadata(root.join("var/lib/tchain-extra")).unwrap();
    assert!(extra.is_dir());
    assert_eq!(
        (extra.mode() & 0o7777, extra.uid(), extra.gid()),
        (0o750, uid, 951)
    );
    // The adapter's port reaches the one ruleset.
    assert!(read(&root, "etc/infrakit/firewall.nft").contains("30399"));
    assert_eq!(
        read(&root, "etc/tchain/tchain.env").lines().nth(1),
        Some("CHAIN=\"tchain_testnet\"")
    );
    assert!(
        read(&root, "etc/sysctl.d/90-tchain.conf")
            .ends_with("net.core.rmem_max = 62500000\nvm.max_map_count = 262144\n")
    );
    assert!(read(&root, "etc/udev/rules.d/90-tchain-db.rules").contains("SYMLINK+=\"tchain-db\""));
}

#[test]
fn a_file_at_a_secret_slot_path_is_refused_in_any_layer() {
    // In the adapter's own root/.
    let tmp = repo("");
    let w = tmp.path();
    let planted = w.join("adapters/tchain/root/etc/tchain/keystore-password");
    write(&planted, "hunter2\n");
    let line = refuse(w, &["build", "profiles/chain.toml", "--out", "dist"], &[]);
    has(
        &line,
        &[
            "\"keystore-password\"",
            "/etc/tchain/keystore-password",
            "layer \"tchain\"",
        ],
    );
    assert!(!w.join("dist").exists(), "nothing written");

    // In an overlay below the adapter, even though the adapter would not
    // provide the path itself.
    let tmp = repo("");
    let w = tmp.path();
    write(&w.join("profiles/keys/root/etc/tchain/id-key"), "secret\n");
    write(
        &w.join("profiles/chain.toml"),
        "name = \"chain\"\nversion = \"0.1.0\"\noverlays = [\"base\", \"./keys\"]\nadapters = [\"tchain\"]\n",
    );
    let line = refuse(w, &["build", "profiles/chain.toml", "--out", "dist"], &[]);
    has(
        &line,
        &["\"id-key\"", "/etc/tchain/id-key", "layer \"./keys\""],
    );
    assert!(!w.join("dist").exists(), "nothing written");
}

#[test]
fn inputs_need_a_lock_entry_before_a_build() {
    let tmp = repo(
        "\n[[input]]\nname = \"tchain\"\nversion = \"1.0.0\"\nurl = \"https://example.invalid/t-{version}\"\nkind = \"file\"\npath = \"usr/bin/t\"\nmode = 0o755\n",
    );
    let line = refuse(
        tmp.path(),
        &["build", "profiles/chain.toml", "--out", "dist"],
        &[],
    );
    has(
        &line,
        &["input tchain", "adapter.toml", "is not in", "infrakit lock"],
    );
}

#[test]
fn a_secret_looking_environment_value_is_a_lint_finding() {
    let tmp = repo(
        "\n[[service]]\nname = \"tchain-leak\"\nexec = [\"/usr/bin/tchain-node\"]\nenvironment = { API_TOKEN = \"abc\" }\n",
    );
    let w = tmp.path();
    let run = infrakit(w, &["build", "profiles/chain.toml", "--out", "dist"]).expect_code(1);
    has(
        &run.stderr,
        &["API_TOKEN", "tchain-leak.service", "secret-environment"],
    );
    assert!(!w.join("dist").exists(), "nothing written");
    let run = infrakit(w, &["lint", "profiles/chain.toml"]).expect_code(1);
    has(
        &format!("{}{}", run.stdout, run.stderr),
        &["API_TOKEN", "secret-environment"],
    );
}

#[test]
fn a_bad_adapter_key_is_located() {
    let tmp =
        repo("\n[[service]]\nname = \"x\"\nexec = [\"/usr/bin/tchain-node\"]\nprivileged = true\n");
    let line = refuse(
        tmp.path(),
        &["build", "profiles/chain.toml", "--out", "dist"],
        &[],
    );
    has(
        &line,
        &[
            "adapters/tchain/adapter.toml:",
            "unknown field `privileged`",
        ],
    );
}

/// The `.wants/` links `tchain-*` units have in `etc/systemd/system` of `root`.
fn wants_links(root: &Path) -> std::collections::BTreeMap<String, String> {
    let base = root.join("etc/systemd/system");
    let mut links = std::collections::BTreeMap::new();
    for e in walkdir::WalkDir::new(&base).min_depth(2).max_depth(2) {
        let e = e.unwrap();
        let name = e.file_name().to_str().unwrap();
        if e.path_is_symlink() && name.starts_with("tchain-") {
            let rel = e.path().strip_prefix(&base).unwrap().display().to_string();
            let target = fs::read_link(e.path()).unwrap().display().to_string();
            links.insert(rel, target);
        }
    }
    links
}

#[test]
fn enablement_links_match_systemctl_enable() {
    require_tool("systemctl");
    let tmp = repo("");
    let root = build(&tmp);
    let shipped = wants_links(&root);
    assert_eq!(
        shipped.keys().collect::<Vec<_>>(),
        [
            "multi-user.target.wants/tchain-db.service",
            "multi-user.target.wants/tchain-rpc.service",
            "multi-user.target.wants/tchain-signer.service",
            "timers.target.wants/tchain-prune.timer",
        ]
    );
    // The oracle: `systemctl enable` of every unit in a fresh root holding
    // the same unit files (and the host's) makes exactly these links, from
    // the units' own [Install] sections; units without one stay disabled.
    let s = tmp.path().join("S");
    copy_into("/usr/lib/systemd/system", &s.join("usr/lib/systemd/system"));
    let mut units = Vec::new();
    for e in fs::read_dir(root.join("usr/lib/systemd/system")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with("tchain-") {
            copy_into(
                root.join("usr/lib/systemd/system")
                    .join(&name)
                    .to_str()
                    .unwrap(),
                &s.join("usr/lib/systemd/system").join(&name),
            );
            units.push(name);
        }
    }
    units.sort();
    let s_arg = s.display().to_string();
    let mut args = vec!["--root", &s_arg, "enable"];
    args.extend(units.iter().map(String::as_str));
    let run = tool(tmp.path(), "systemctl", &args);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(shipped, wants_links(&s), "artifact vs systemctl enable");
}

/// `apply --json` reports the signer-down window when the release it
/// replaces has signers, and `null` when there were none to stop.
#[test]
fn apply_reports_the_signer_down_window() {
    let tmp = repo("");
    let w = tmp.path();
    let (key, public) = crate::support::keypair(w, "release");
    for (out, version) in [("d1", "1.0.0"), ("d2", "2.0.0")] {
        infrakit(
            w,
            &[
                "build",
                "profiles/chain.toml",
                "--out",
                out,
                "--sign-key",
                key.to_str().unwrap(),
                "--release-version",
                version,
            ],
        )
        .ok();
    }
    let root = w.join("root");
    fs::create_dir(&root).unwrap();
    let keyring = w.join("keys");
    fs::create_dir(&keyring).unwrap();
    fs::copy(&public, keyring.join("release.pub")).unwrap();
    let apply = |out: &str| -> serde_json::Value {
        let run = infrakit(
            w,
            &[
                "apply",
                &format!("{out}/chain.tar.zst"),
                "--root",
                root.to_str().unwrap(),
                "--keyring",
                keyring.to_str().unwrap(),
                "--json",
            ],
        )
        .ok();
        serde_json::from_str(&run.stdout).unwrap()
    };
    let first = apply("d1");
    assert!(first["signer_down_ms"].is_null(), "{first}");
    let second = apply("d2");
    let ms = second["signer_down_ms"].as_f64();
    assert!(ms.is_some_and(|ms| ms >= 0.0), "{second}");
    assert_eq!(second["hooks_run"], false, "{second}");
}
