//! `infrakit bundle` (issue 11), judged by cloud-init itself: for every repo
//! profile and every provider, `cloud-init schema` accepts the user-data and
//! cloud-init's own library decodes it (gzip and gz+b64 included) to exactly
//! the files and command the test expects, computed here from the keys,
//! hosts file, binary and manifest; the first-boot script passes
//! shellcheck. The NoCloud seed ISO reads back with xorriso as built and is
//! byte-identical across builds. Over-budget user-data, secrets in host
//! values and a key the artifact does not verify against are refused with
//! nothing written. The first boot booted for real is in tests/cli/vm.rs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;

use crate::chain_profiles::{build_with, workspace};
use crate::support::*;

const TEMPLATE: &str = include_str!("../../src/bundle/first-boot.sh");
const DECODER: &str = include_str!("userdata.py");
const SERVER: &str = "http://10.0.2.100";

const PROVIDERS: [&str; 7] = [
    "ec2",
    "gcp",
    "azure",
    "hetzner",
    "digitalocean",
    "openstack",
    "nocloud",
];

/// Two hosts: a small one, and one whose allow-list pushes the plain
/// user-data over EC2's and Hetzner's budgets (so they deliver gzip and
/// gz+b64) but not the others'.
fn hosts_toml() -> String {
    let cidrs: Vec<String> = (0..2000)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 250, i % 250))
        .collect();
    format!(
        "[hosts.val-1]\nhostname = \"val-1.fra.example.net\"\n\
         ssh-authorized-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4 ops@laptop\"]\n\
         admin-password-hash = \"$y$j9T$Qm9vdGVkLmJ5LmluZnJha2l0$Zk9yIHRlc3RzIG9ubHksIG5vdCBhIHJlYWwgcGFzc3dvcmQ\"\n\
         [hosts.val-1.params]\npublic-ip = \"203.0.113.10\"\nbft-cpus = \"8-11\"\n\
         triedb-partuuid = \"0b9a5c3e-7c55-4c9a-9c57-2f6c1f1d7e11\"\n\
         [hosts.val-1.units.\"monad-bft.service\"]\ncpu-affinity = \"8-11\"\n\n\
         [hosts.big]\nhostname = \"big\"\n[hosts.big.params]\nallow-cidrs = [{}]\n",
        cidrs.join(", ")
    )
}

fn decode(dir: &Path, files: &[PathBuf]) -> Vec<Value> {
    require_tool("/usr/bin/python3");
    let script = dir.join("userdata.py");
    write(&script, DECODER);
    let mut args = vec![s(&script)];
    args.extend(files.iter().map(|f| s(f)));
    let run = tool(dir, "/usr/bin/python3", &args).ok();
    serde_json::from_str(&run.stdout).unwrap()
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

/// The first-boot script as the test expects it for these pins.
fn expected_script(pins: &[(&str, &str)]) -> String {
    let lines: Vec<String> = pins.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
    TEMPLATE.replacen("@PINS@", &lines.join("\n"), 1)
}

struct Release {
    name: String,
    artifact: PathBuf,
    manifest: Value,
    manifest_sha: String,
}

fn signed_release(w: &Path, profile: &str, key: &Path) -> Release {
    let name = Path::new(profile).file_stem().unwrap().to_str().unwrap();
    let out = format!("dist-{name}");
    if name == "base" {
        // No inputs and no services: a plain build.
        infrakit_env(
            w,
            &["build", profile, "--out", &out],
            &[("INFRAKIT_SIGN_KEY", s(key))],
        )
        .ok();
    } else {
        build_with(w, profile, &out, &[("INFRAKIT_SIGN_KEY", s(key))]);
    }
    let dir = w.join(&out);
    let manifest_bytes = fs::read(dir.join(format!("{name}.manifest.json"))).unwrap();
    Release {
        artifact: dir.join(format!("{name}.tar.zst")),
        name: name.to_owned(),
        manifest: serde_json::from_slice(&manifest_bytes).unwrap(),
        manifest_sha: sha256_hex(&manifest_bytes),
    }
}

#[test]
fn every_profile_and_provider_gives_user_data_cloud_init_accepts_and_decodes_as_meant() {
    require_tool("cloud-init");
    require_tool("shellcheck");
    let w = workspace();
    let w = w.path();
    let (key, public) = keypair(w, "release");
    let pub_text = fs::read_to_string(&public).unwrap();
    let key_id = pub_text
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    let hosts = w.join("hosts.toml");
    write(&hosts, hosts_toml());
    let host_params: toml::Table = toml::from_str(&hosts_toml()).unwrap();
    // A small stand-in binary keeps the seed ISOs small; the VM tests carry
    // the real one.
    let binary = w.join("infrakit-stand-in");
    fs::copy("/usr/bin/true", &binary).unwrap();
    let binary_sha = sha256_hex(&fs::read(&binary).unwrap());
    let mut forms = BTreeMap::new();
    for profile in [
        "profiles/base.toml",
        "profiles/monad-validator.toml",
        "profiles/ethereum-validator.toml",
        "profiles/aztec-node.toml",
    ] {
        let r = signed_release(w, profile, &key);
        // What its first boot's apply would run: only the base's enabled
        // units start; an adapter's (the chain's database, its daemons)
        // wait for the operator and the host's secrets.
        let keyring = w.join("keyring");
        fs::create_dir_all(&keyring).unwrap();
        fs::copy(&public, keyring.join("release.pub")).unwrap();
        let empty = w.join(format!("empty-root-{}", r.name));
        fs::create_dir_all(&empty).unwrap();
        let plan = infrakit(
            w,
            &[
                "apply",
                s(&r.artifact),
                "--root",
                s(&empty),
                "--keyring",
                s(&keyring),
                "--dry-run",
                "--json",
            ],
        )
        .ok();
        let plan: Value = serde_json::from_str(&plan.stdout).unwrap();
        let started: Vec<String> = plan["plan"]["hooks"]["after"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c[1] == "restart")
            .flat_map(|c| {
                c.as_array().unwrap()[2..]
                    .iter()
                    .map(|u| u.as_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(
            started,
            [
                "fail2ban.service",
                "infrakit-firewall.service",
                "systemd-timesyncd.service"
            ],
            "{profile}: {plan}"
        );
        let artifact_name = format!("{}.tar.zst", r.name);
        for provider in PROVIDERS {
            let out = w.join(format!("bundles-{}-{provider}", r.name));
            let artifact_url = format!("{SERVER}/{}/{artifact_name}", r.name);
            let infrakit_url = format!("{SERVER}/infrakit");
            let mut args = vec![
                "bundle",
                s(&r.artifact),
                "--provider",
                provider,
                "--key",
                s(&public),
                "--hosts",
                s(&hosts),
                "--infrakit-binary",
                s(&binary),
                "--out",
                s(&out),
                "--json",
            ];
            let downloads = provider != "nocloud";
            if downloads {
                args.extend([
                    "--artifact-url",
                    &artifact_url,
                    "--infrakit-url",
                    &infrakit_url,
                ]);
            }
            let run = infrakit(w, &args).ok();
            let report: Value = serde_json::from_str(&run.stdout).unwrap();
            let files: Vec<PathBuf> = ["val-1", "big"]
                .iter()
                .map(|h| out.join(format!("{h}.user-data")))
                .collect();
            for decoded in decode(w, &files) {
                let path = PathBuf::from(decoded["path"].as_str().unwrap());
                let host = path.file_stem().unwrap().to_str().unwrap().to_owned();
                let bundle = report["bundles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["host"] == host.as_str())
                    .unwrap();
                let form = bundle["form"].as_str().unwrap().to_owned();
                forms.insert((provider, host.clone()), form.clone());
                assert_eq!(decoded["gzip"], form == "gzip", "{path:?}");
                assert_eq!(decoded["types"], serde_json::json!(["text/cloud-config"]));
                // The schema checker reads text: gzip is checked as cloud-init
                // sees it after gunzipping.
                let text_path = if form == "gzip" {
                    let plain = w.join(format!("{host}-{provider}-{}.gunzipped", r.name));
                    let bytes = tool_bytes(w, "gzip", &["-dc", s(&path)]);
                    write(&plain, bytes);
                    plain
                } else {
                    path.clone()
                };
                let schema = tool(w, "cloud-init", &["schema", "--config-file", s(&text_path)]);
                assert!(
                    schema.code == 0 && schema.stdout.contains("Valid cloud-config"),
                    "{path:?}: {schema:?}"
                );
                let cfg = &decoded["config"];
                // The command: exactly one runcmd entry, the script.
                assert_eq!(
                    cfg["runcmd"],
                    serde_json::json!([["/usr/local/lib/infrakit/first-boot"]]),
                    "{path:?}"
                );
                // Packages: the manifest's prerequisites, plus curl to download.
                let mut packages: Vec<String> = r.manifest["prerequisites"]
                    .as_array()
                    .map(|a| a.iter().map(|p| p.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                if downloads {
                    packages.extend(["ca-certificates".to_owned(), "curl".to_owned()]);
                }
                packages.sort();
                packages.dedup();
                let got: Vec<String> = cfg["packages"]
                    .as_array()
                    .map(|a| a.iter().map(|p| p.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                assert_eq!(got, packages, "{path:?}");
                // The files: the pinned key, the host's values, the script.
                let wf: BTreeMap<String, &Value> = cfg["write_files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| (f["path"].as_str().unwrap().to_owned(), f))
                    .collect();
                let key_path = format!("/etc/infrakit/keys/{key_id}.pub");
                let drop_in = "/etc/systemd/system/monad-bft.service.d/60-infrakit-host.conf";
                let mut want_files = vec![
                    "/etc/infrakit/host.toml".to_owned(),
                    key_path.clone(),
                    "/usr/local/lib/infrakit/first-boot".to_owned(),
                ];
                if host == "val-1" {
                    want_files.push(drop_in.to_owned());
                    assert_eq!(
                        String::from_utf8(b64(&wf[drop_in]["content"])).unwrap(),
                        "# This host's CPU pinning, from its InfraKit bundle (docs/first-boot.md).\n\
                         [Service]\nCPUAffinity=\nCPUAffinity=8-11\n"
                    );
                    assert_eq!(wf[drop_in]["permissions"], "0644");
                }
                want_files.sort();
                assert_eq!(
                    wf.keys().cloned().collect::<Vec<_>>(),
                    want_files,
                    "{path:?}"
                );
                for f in wf.values() {
                    assert_eq!(f["owner"], "root:root");
                }
                assert_eq!(
                    String::from_utf8(b64(&wf[&key_path]["content"])).unwrap(),
                    pub_text
                );
                assert_eq!(wf[&key_path]["permissions"], "0644");
                let values: toml::Table = toml::from_str(
                    &String::from_utf8(b64(&wf["/etc/infrakit/host.toml"]["content"])).unwrap(),
                )
                .unwrap();
                let want = &host_params["hosts"][&host];
                assert_eq!(values["hostname"], want["hostname"], "{path:?}");
                assert_eq!(values["params"], want["params"], "{path:?}");
                let script_file = &wf["/usr/local/lib/infrakit/first-boot"];
                assert_eq!(script_file["permissions"], "0700");
                let script = String::from_utf8(b64(&script_file["content"])).unwrap();
                let (au, iu) = if downloads {
                    (artifact_url.as_str(), infrakit_url.as_str())
                } else {
                    ("", "")
                };
                let release = format!("{} {}", r.name, r.manifest["version"].as_str().unwrap());
                assert_eq!(
                    script,
                    expected_script(&[
                        ("INFRAKIT_SHA256", &binary_sha),
                        ("INFRAKIT_URL", iu),
                        ("ARTIFACT_URL", au),
                        ("ARTIFACT_NAME", &artifact_name),
                        ("MANIFEST_SHA256", &r.manifest_sha),
                        ("RELEASE", &release),
                    ]),
                    "{path:?}"
                );
                let script_path = w.join(format!("first-boot-{host}-{provider}-{}", r.name));
                write(&script_path, &script);
                tool(w, "shellcheck", &[s(&script_path)]).ok();
                // The admin account: only for the host with keys.
                if host == "val-1" {
                    assert_eq!(cfg["hostname"], "val-1");
                    assert_eq!(cfg["fqdn"], "val-1.fra.example.net");
                    let users = cfg["users"].as_array().unwrap();
                    assert_eq!(users.len(), 1);
                    assert_eq!(users[0]["groups"], "infrakit-admin");
                    assert_eq!(users[0]["lock_passwd"], false);
                    assert_eq!(
                        users[0]["hashed_passwd"],
                        want["admin-password-hash"].as_str().unwrap()
                    );
                    assert_eq!(
                        users[0]["ssh_authorized_keys"],
                        want["ssh-authorized-keys"]
                            .as_array()
                            .map(|a| serde_json::json!(
                                a.iter().map(|k| k.as_str().unwrap()).collect::<Vec<_>>()
                            ))
                            .unwrap()
                    );
                } else {
                    assert!(cfg.get("users").is_none(), "{path:?}");
                }
            }
        }
    }
    // Every form was exercised and each provider's budget chose as documented.
    assert_eq!(forms[&("ec2", "big".to_owned())], "gzip");
    assert_eq!(forms[&("hetzner", "big".to_owned())], "gz-b64-files");
    for p in ["gcp", "azure", "digitalocean", "openstack", "nocloud"] {
        assert_eq!(forms[&(p, "big".to_owned())], "text", "{p}");
    }
    for p in PROVIDERS {
        assert_eq!(forms[&(p, "val-1".to_owned())], "text", "{p}");
    }
}

/// Extracts `iso` with `xorriso -osirrox` into `dir`.
fn read_back(w: &Path, iso: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    tool(
        w,
        "xorriso",
        &["-osirrox", "on", "-indev", s(iso), "-extract", "/", s(dir)],
    )
    .ok();
}

#[test]
fn the_seed_iso_reads_back_as_built_and_two_builds_are_identical() {
    require_tool("xorriso");
    let w = tempdir();
    let w = w.path();
    let public = signed_base_release(w);
    let hosts = w.join("hosts.toml");
    write(
        &hosts,
        "[hosts.bm-1]\nhostname = \"bm-1\"\nnetwork-config = \"\"\"\nversion: 2\nethernets:\n  eno1:\n    dhcp4: true\n\"\"\"\n",
    );
    let bundle = |out: &str| {
        infrakit(
            w,
            &[
                "bundle",
                "dist/base.tar.zst",
                "--provider",
                "nocloud",
                "--key",
                s(&public),
                "--hosts",
                s(&hosts),
                "--out",
                out,
            ],
        )
        .ok()
    };
    bundle("a");
    // Different input mtimes and a later run must not change a byte.
    tool(
        w,
        "touch",
        &["-d", "2030-01-01", "dist/base.tar.zst", s(&hosts)],
    )
    .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    bundle("b");
    let a = fs::read(w.join("a/bm-1.seed.iso")).unwrap();
    let b = fs::read(w.join("b/bm-1.seed.iso")).unwrap();
    assert!(a == b, "two builds of the seed ISO differ");
    assert_eq!(
        fs::read(w.join("a/bm-1.user-data")).unwrap(),
        fs::read(w.join("b/bm-1.user-data")).unwrap()
    );
    // Volume label and file list as built.
    let label = tool(w, "xorriso", &["-indev", "a/bm-1.seed.iso", "-pvd_info"]);
    assert!(label.stdout.contains("Volume Id    : cidata"), "{label:?}");
    let back = w.join("back");
    read_back(w, &w.join("a/bm-1.seed.iso"), &back);
    assert_eq!(
        list_files(&back),
        [
            "infrakit",
            "infrakit/base.manifest.json",
            "infrakit/base.tar.zst",
            "infrakit/base.tar.zst.minisig",
            "infrakit/infrakit",
            "meta-data",
            "network-config",
            "user-data",
        ]
    );
    let same = |on_iso: &str, built: &Path| {
        assert!(
            fs::read(back.join(on_iso)).unwrap() == fs::read(built).unwrap(),
            "{on_iso} differs from {built:?}"
        );
    };
    same("user-data", &w.join("a/bm-1.user-data"));
    same("infrakit/base.tar.zst", &w.join("dist/base.tar.zst"));
    same(
        "infrakit/base.tar.zst.minisig",
        &w.join("dist/base.tar.zst.minisig"),
    );
    same(
        "infrakit/base.manifest.json",
        &w.join("dist/base.manifest.json"),
    );
    same("infrakit/infrakit", &bin());
    let net = fs::read_to_string(back.join("network-config")).unwrap();
    assert!(
        net.starts_with("version: 2\n") && !net.contains("network:"),
        "{net}"
    );
    let meta = fs::read_to_string(back.join("meta-data")).unwrap();
    let ud_sha = sha256_hex(&fs::read(w.join("a/bm-1.user-data")).unwrap());
    assert_eq!(
        meta,
        format!(
            "instance-id: \"infrakit-bm-1-{}\"\nlocal-hostname: \"bm-1\"\n",
            &ud_sha[..16]
        )
    );
    // The carried artifact verifies from the volume with stock minisign.
    tool(
        w,
        "minisign",
        &[
            "-Vm",
            s(&back.join("infrakit/base.tar.zst")),
            "-p",
            s(&public),
        ],
    )
    .ok();
}

#[test]
fn refusals_write_nothing() {
    let w = tempdir();
    let w = w.path();
    let public = signed_base_release(w);
    let (_, other) = keypair(w, "other");
    let urls = [
        "--artifact-url",
        "https://releases.example/base/base.tar.zst",
        "--infrakit-url",
        "https://releases.example/infrakit",
    ];
    let ec2_with_hosts = |hosts: &'static str| -> Vec<&str> {
        let mut args = vec!["--provider", "ec2", "--key", s(&public), "--hosts", hosts];
        args.extend_from_slice(&urls);
        args
    };
    let run = |args: &[&str], code: i32| -> String {
        let mut all = vec!["bundle", "dist/base.tar.zst", "--out", "out"];
        all.extend_from_slice(args);
        let r = infrakit(w, &all).expect_code(code);
        assert!(!w.join("out").exists() || list_files(&w.join("out")).is_empty());
        r.stderr
    };
    // A key the artifact does not verify against: hosts would refuse it.
    let e = run(&["--provider", "ec2", "--key", s(&other)], 1);
    has(&e, &["not a trusted key", "no bundle was made"]);
    // Downloading providers need both URLs.
    let e = run(&["--provider", "ec2", "--key", s(&public)], 2);
    has(&e, &["--provider ec2", "--artifact-url"]);
    // The artifact URL must name the artifact (its signature lies beside it).
    let e = run(
        &[
            "--provider",
            "gcp",
            "--key",
            s(&public),
            "--artifact-url",
            "https://r.example/latest",
            "--infrakit-url",
            "https://r.example/infrakit",
        ],
        2,
    );
    has(&e, &["--artifact-url", "must end in /base.tar.zst"]);
    // Secrets never go into user-data: refused naming the file and line.
    write(
        &w.join("secret.toml"),
        "[hosts.a]\nhostname = \"a\"\n[hosts.a.params]\nkeystore-password = \"hunter2\"\n",
    );
    let e = run(&ec2_with_hosts("secret.toml"), 2);
    has(
        &e,
        &[
            "secret.toml:4:",
            "params.keystore-password",
            "secret slots",
            "docs/first-boot.md",
        ],
    );
    assert!(!e.contains("hunter2"), "{e}");
    // Over budget: incompressible host values over EC2's 16,384 bytes even
    // gzipped; one host over fails the whole run (the other is not written).
    let noise: String = (0..30_000u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).rotate_left(13) ^ 0x5bd1_e995;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    [(x % 62) as usize],
            )
        })
        .collect();
    write(
        &w.join("big.toml"),
        format!("[hosts.fine]\n[hosts.huge]\n[hosts.huge.params]\nnote = \"{noise}\"\n"),
    );
    let e = run(&ec2_with_hosts("big.toml"), 2);
    has(
        &e,
        &[
            "--provider ec2: user-data for host huge is ",
            "bytes (gzipped), over ec2's limit of 16384 bytes",
            "never truncated",
            "--provider nocloud",
        ],
    );
    // The same host fits NoCloud, which has no limit.
    infrakit(
        w,
        &[
            "bundle",
            "dist/base.tar.zst",
            "--out",
            "out",
            "--provider",
            "nocloud",
            "--key",
            s(&public),
            "--hosts",
            "big.toml",
            "--infrakit-binary",
            "/usr/bin/true",
        ],
    )
    .ok();
    assert!(w.join("out/huge.seed.iso").is_file());
    // No staging directory is left behind.
    assert!(
        fs::read_dir(w.join("out")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "a staging directory was left in out/"
    );
}

#[test]
fn apply_refuses_another_validly_signed_release_than_the_pinned_manifest() {
    let w = tempdir();
    let w = w.path();
    let _public = signed_base_release(w);
    let keys = w.join("keys");
    fs::create_dir(&keys).unwrap();
    fs::copy(w.join("release.pub"), keys.join("release.pub")).unwrap();
    let root = w.join("root");
    fs::create_dir(&root).unwrap();
    let before = snapshot(&root);
    let wrong = "ab".repeat(32);
    let e = infrakit(
        w,
        &[
            "apply",
            "dist/base.tar.zst",
            "--root",
            s(&root),
            "--keyring",
            s(&keys),
            "--manifest-sha256",
            &wrong,
        ],
    )
    .expect_code(1);
    has(
        &e.stderr,
        &["validly signed", "not abab", "--manifest-sha256"],
    );
    assert_eq!(snapshot(&root), before, "a refused apply changed the root");
    // A failed first boot, as the bundle's script records it: status says so.
    let state = root.join("var/lib/infrakit");
    fs::create_dir_all(&state).unwrap();
    chmod(&state, 0o700);
    write(
        &state.join("first-boot.failed"),
        "infrakit apply base 0.1.0: verification failed: signed by key 0123, which is not a trusted key\n",
    );
    let prom = w.join("infrakit.prom");
    let st = infrakit(
        w,
        &[
            "status",
            "--root",
            s(&root),
            "--json",
            "--textfile",
            s(&prom),
        ],
    )
    .expect_code(1);
    let report: Value = serde_json::from_str(&st.stdout).unwrap();
    assert!(
        report["first_boot_failed"]
            .as_str()
            .unwrap()
            .contains("not a trusted key"),
        "{report}"
    );
    assert!(
        fs::read_to_string(&prom)
            .unwrap()
            .contains("\ninfrakit_first_boot_failed 1\n")
    );
    let text = infrakit(w, &["status", "--root", s(&root)]).expect_code(1);
    has(
        &text.stdout,
        &["first boot failed: infrakit apply base 0.1.0"],
    );
    // The pinned manifest applies, and a release now active supersedes the marker.
    let manifest_sha = sha256_hex(&fs::read(w.join("dist/base.manifest.json")).unwrap());
    infrakit(
        w,
        &[
            "apply",
            "dist/base.tar.zst",
            "--root",
            s(&root),
            "--keyring",
            s(&keys),
            "--manifest-sha256",
            &manifest_sha,
        ],
    )
    .ok();
    assert!(!state.join("first-boot.failed").exists());
    infrakit(w, &["status", "--root", s(&root), "--textfile", s(&prom)]).ok();
    assert!(
        fs::read_to_string(&prom)
            .unwrap()
            .contains("\ninfrakit_first_boot_failed 0\n")
    );
}
