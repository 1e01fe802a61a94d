//! Real first boots (issue 11): a Debian bookworm guest (tests/vm/) boots
//! under QEMU with a bundle; cloud-init runs it; the guest's report unit
//! prints what the booted system says (tests/cli/vm.rs parses it).
//!
//! 1. a NoCloud seed made by `infrakit bundle --provider nocloud`;
//! 2. `--provider ec2` user-data delivered through a NoCloud seed, the
//!    binary and the artifact downloaded from the test's loopback server
//!    (the only address the guest can reach);
//! 3. a tampered artifact, 4. a wrong pinned key, 5. a binary whose digest
//!    differs: nothing laid down, the failure marker and console line
//!    present, `cloud-init status` an error, `infrakit status` exit 1.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;
use crate::vm::{Boot, GUEST_URL, boot, nocloud_seed};

const HOSTS: &str = "[hosts.vm-1]\nhostname = \"vm-1.test.internal\"\n\
ssh-authorized-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4 ops@laptop\"]\n\
admin-password-hash = \"$y$j9T$Qm9vdGVkLmJ5LmluZnJha2l0$Zk9yIHRlc3RzIG9ubHksIG5vdCBhIHJlYWwgcGFzc3dvcmQ\"\n\
[hosts.vm-1.params]\npublic-ip = \"192.0.2.10\"\n";

/// A signed base release and the key pair, in `w`.
struct Setup {
    public: PathBuf,
    hosts: PathBuf,
    binary: PathBuf,
}

/// The infrakit the guest runs: this build, stripped (the test build's
/// debug info makes it ten times larger; the code is the same).
fn guest_binary(w: &Path) -> PathBuf {
    let out = w.join("infrakit-stripped");
    tool(w, "strip", &["-o", s(&out), s(&bin())]).ok();
    out
}

fn setup(w: &Path) -> Setup {
    let public = signed_base_release(w);
    let hosts = w.join("hosts.toml");
    write(&hosts, HOSTS);
    Setup {
        public,
        hosts,
        binary: guest_binary(w),
    }
}

/// `--provider ec2` bundle for vm-1 that downloads from the test server.
fn ec2_bundle(w: &Path, setup: &Setup, out: &str) -> PathBuf {
    infrakit(
        w,
        &[
            "bundle",
            "dist/base.tar.zst",
            "--provider",
            "ec2",
            "--key",
            s(&setup.public),
            "--hosts",
            s(&setup.hosts),
            "--artifact-url",
            &format!("{GUEST_URL}/base.tar.zst"),
            "--infrakit-url",
            &format!("{GUEST_URL}/infrakit"),
            "--infrakit-binary",
            s(&setup.binary),
            "--out",
            out,
        ],
    )
    .ok();
    w.join(out).join("vm-1.user-data")
}

/// Boots vm-1 with its `--provider ec2` user-data in a NoCloud seed (what
/// EC2's metadata service would hand cloud-init), the test server serving
/// the release and the binary as `alter(w, served_dir)` leaves them.
fn boot_ec2(name: &str, alter: impl FnOnce(&Path, &Path)) -> Boot {
    let w = tempdir();
    let w = w.path();
    let setup = setup(w);
    let ud = ec2_bundle(w, &setup, "bundles");
    let dir = served(w, &setup, name);
    alter(w, &dir);
    let seed = nocloud_seed(
        &w.join("seed"),
        &fs::read(ud).unwrap(),
        &format!("instance-id: i-{name}\nlocal-hostname: vm-1\n"),
    );
    boot(&seed, Some(&dir))
}

/// The directory the test server serves: the release and the binary.
fn served(w: &Path, setup: &Setup, name: &str) -> PathBuf {
    let dir = w.join(format!("served-{name}"));
    fs::create_dir_all(&dir).unwrap();
    for f in ["base.tar.zst", "base.tar.zst.minisig", "base.manifest.json"] {
        fs::copy(w.join("dist").join(f), dir.join(f)).unwrap();
    }
    fs::copy(&setup.binary, dir.join("infrakit")).unwrap();
    dir
}

/// `infrakit status --json`'s one line (the report section also holds
/// stderr, after it).
fn status_json(text: &str) -> Value {
    serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// What a booted host that ran its release shows.
fn assert_release_runs(b: &Boot) {
    let ci = b.section("cloud-init-status");
    assert!(
        ci.rc == 0 && ci.text.contains("status: done"),
        "cloud-init did not finish cleanly:\n{}",
        b.tail(80)
    );
    let st = b.section("infrakit-status");
    assert_eq!(st.rc, 0, "infrakit status is not clean:\n{}", st.text);
    let report = status_json(&st.text);
    assert_eq!(report["release"]["name"], "base", "{report}");
    assert!(report["drift"].as_array().unwrap().is_empty(), "{report}");
    assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");
    assert!(report["first_boot_failed"].is_null(), "{report}");
    let sshd = &b.section("sshd-T").text;
    for line in [
        "passwordauthentication no",
        "permitrootlogin no",
        "allowgroups infrakit-admin",
        "x11forwarding no",
        "allowtcpforwarding no",
        "maxauthtries 3",
        "authenticationmethods publickey",
    ] {
        assert!(
            sshd.lines().any(|l| l == line),
            "sshd -T lacks {line:?}:\n{sshd}"
        );
    }
    let nft = b.section("nft");
    assert!(
        nft.text.contains("table inet infrakit {"),
        "the release's firewall is not loaded:\n{}",
        nft.text
    );
    let units = &b.section("units").text;
    // `systemctl list-units --plain`: UNIT LOAD ACTIVE SUB DESCRIPTION.
    let state = |unit: &str| crate::vm::unit_state(units, unit);
    for unit in [
        "ssh.service",
        "fail2ban.service",
        "systemd-timesyncd.service",
    ] {
        assert_eq!(
            state(unit)[1..],
            ["loaded", "active", "running"],
            "{unit} is not running:\n{units}"
        );
    }
    // A oneshot the release enables: it ran and stays active.
    assert_eq!(
        state("infrakit-firewall.service")[1..],
        ["loaded", "active", "exited"],
        "infrakit-firewall.service did not run:\n{units}"
    );
    assert_ne!(b.section("failure-marker").rc, 0, "a failure marker exists");
    // The admin from the hosts file: in the admin group, with the hashed
    // password sudo asks for (`passwd -S`: P = usable password).
    let admin = b.section("admin");
    assert!(
        admin.rc == 0
            && admin.text.contains("(infrakit-admin)")
            && admin.text.lines().any(|l| l.starts_with("admin P ")),
        "the admin account is not as the bundle says:\n{}",
        admin.text
    );
    assert!(
        b.console
            .contains("infrakit first boot: base 0.1.0 is active"),
        "no success line on the console:\n{}",
        b.tail(80)
    );
}

/// What a host whose first boot was refused shows: nothing of the release
/// laid down, the reason recorded and printed, cloud-init's status an error.
fn assert_refused(b: &Boot, reason: &[&str]) -> String {
    let marker = b.section("failure-marker");
    assert_eq!(marker.rc, 0, "no failure marker:\n{}", b.tail(80));
    for r in reason {
        assert!(
            marker.text.contains(r),
            "marker lacks {r:?}: {}",
            marker.text
        );
    }
    let line = b
        .console
        .lines()
        .find(|l| l.contains("infrakit first boot FAILED: "))
        .unwrap_or_else(|| panic!("no failure line on the console:\n{}", b.tail(80)));
    assert!(line.contains(marker.text.trim()), "{line}");
    let ci = b.section("cloud-init-status");
    assert!(
        ci.rc != 0 && ci.text.contains("status: error"),
        "cloud-init does not report the error:\n{}",
        ci.text
    );
    let nft = b.section("nft");
    assert!(
        nft.rc == 0 && !nft.text.contains("table inet infrakit"),
        "a firewall was loaded (or nft failed): {}",
        nft.text
    );
    let laid = &b.section("laid-down").text;
    assert!(
        !laid.contains("current ->") && !laid.contains("releases"),
        "something was laid down:\n{laid}"
    );
    let sshd = b.section("sshd-T");
    assert!(
        sshd.rc == 0
            && sshd.text.contains("passwordauthentication")
            && !sshd.text.contains("allowgroups"),
        "the release's sshd configuration is in place (or sshd -T failed): {}",
        sshd.text
    );
    marker.text.clone()
}

#[test]
fn nocloud_seed_first_boot_runs_the_release() {
    let w = tempdir();
    let w = w.path();
    let setup = setup(w);
    infrakit(
        w,
        &[
            "bundle",
            "dist/base.tar.zst",
            "--provider",
            "nocloud",
            "--key",
            s(&setup.public),
            "--hosts",
            s(&setup.hosts),
            "--infrakit-binary",
            s(&setup.binary),
            "--out",
            "bundles",
        ],
    )
    .ok();
    let b = boot(&w.join("bundles/vm-1.seed.iso"), None);
    assert_release_runs(&b);
    // The stock image's /etc/motd was in the release's way: adopted and recorded.
    let out = &b.section("cloud-init-output").text;
    assert!(
        out.contains("etc/motd"),
        "no adoption of /etc/motd shown:\n{out}"
    );
}

#[test]
fn ec2_user_data_downloads_from_the_test_server_and_runs_the_release() {
    let b = boot_ec2("ok", |_, _| {});
    assert_release_runs(&b);
}

#[test]
fn a_tampered_artifact_is_refused_at_first_boot() {
    let b = boot_ec2("tampered", |_, dir| {
        let artifact = dir.join("base.tar.zst");
        let mut bytes = fs::read(&artifact).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&artifact, bytes).unwrap();
    });
    assert_refused(&b, &["infrakit apply base 0.1.0", "verification failed"]);
    // The pinned binary was installed: status reports the failed first boot.
    let st = b.section("infrakit-status");
    assert_eq!(st.rc, 1, "{}", st.text);
    let report = status_json(&st.text);
    assert!(report["release"].is_null(), "{report}");
    // stderr (captured with stdout) says why too.
    assert!(st.text.contains("first boot failed"), "{}", st.text);
    assert!(
        report["first_boot_failed"]
            .as_str()
            .unwrap()
            .contains("verification failed"),
        "{report}"
    );
}

#[test]
fn an_artifact_signed_by_another_key_is_refused_at_first_boot() {
    // The same release signed by a key the bundle does not pin.
    let b = boot_ec2("other-key", |w, dir| {
        let (other, _) = keypair(w, "other");
        infrakit_env(
            w,
            &["build", "profiles/base.toml", "--out", "dist-other"],
            &[("INFRAKIT_SIGN_KEY", s(&other))],
        )
        .ok();
        fs::copy(
            w.join("dist-other/base.tar.zst.minisig"),
            dir.join("base.tar.zst.minisig"),
        )
        .unwrap();
    });
    let marker = assert_refused(&b, &["infrakit apply base 0.1.0", "not a trusted key"]);
    assert!(marker.contains("verification failed"), "{marker}");
    assert_eq!(b.section("infrakit-status").rc, 1);
}

#[test]
fn an_infrakit_binary_with_another_digest_is_never_installed() {
    // Still a working binary, one byte longer: only its digest differs.
    let b = boot_ec2("binary", |_, dir| {
        let mut binary = fs::read(dir.join("infrakit")).unwrap();
        binary.push(0);
        fs::write(dir.join("infrakit"), binary).unwrap();
    });
    assert_refused(
        &b,
        &[
            "the infrakit binary has sha256",
            "the bundle pins",
            "nothing installed",
        ],
    );
    // Never installed, so never run.
    assert_eq!(b.section("infrakit-status").rc, 127);
    assert!(
        !b.section("laid-down").text.contains(" infrakit\n"),
        "{}",
        b.section("laid-down").text
    );
}
