//! `infrakit image`: bootable disks judged by stock tools and by booting
//! them. Each profile's image is built twice and compared byte for byte
//! (diffoscope on a difference), checked with `sfdisk --verify`, `e2fsck
//! -fn` on the root, `fsck.vfat -n` on the ESP and `qemu-img check`, then
//! booted under QEMU with OVMF (UEFI, TCG) and a NoCloud seed. The report
//! comes from `tests/vm/image-report.sh`, delivered as user-data.
//!
//! The Debian packages come from the cache `scripts/test` fills
//! (`${INFRAKIT_VM_CACHE:-/var/cache/infrakit-vmtest}/xdg`, `infrakit fetch
//! --only packages`); the tests never reach the network. Building needs
//! root (mmdebstrap's root mode).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chain_profiles;
use crate::support::{self, infrakit_env, keypair, require_tool, s, tool, write};
use crate::vm::{self, Section};

const REPORT: &str = include_str!("../vm/image-report.sh");
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// For all of one QEMU session (several boots under TCG).
const SESSION_TIMEOUT: Duration = Duration::from_secs(900);
const REPORT_DONE: &str = "===== REPORT DONE =====";

/// Where `scripts/test` put the profiles' locked packages.
fn package_cache() -> PathBuf {
    let root = std::env::var_os("INFRAKIT_VM_CACHE").map_or_else(
        || PathBuf::from("/var/cache/infrakit-vmtest"),
        PathBuf::from,
    );
    root.join("xdg")
}

fn image_tools() {
    assert!(
        support::is_root(),
        "the image tests need root (mmdebstrap's root mode); run them as root"
    );
    for t in [
        "mmdebstrap",
        "apt-ftparchive",
        "mkfs.ext4",
        "debugfs",
        "e2fsck",
        "mkfs.vfat",
        "fsck.vfat",
        "mcopy",
        "sfdisk",
        "qemu-img",
        "qemu-system-x86_64",
        "xorriso",
        "diffoscope",
    ] {
        require_tool(t);
    }
    assert!(
        Path::new(OVMF_CODE).is_file(),
        "{OVMF_CODE} is missing: install ovmf"
    );
}

/// `infrakit image PROFILE --out OUT --format qcow2` in `w`, signed with
/// `key`; `extra` adds arguments.
fn image(w: &Path, profile: &str, out: &str, key: &Path, extra: &[&str]) -> PathBuf {
    let cache = package_cache();
    let mut args = vec![
        "image",
        profile,
        "--out",
        out,
        "--sign-key",
        s(key),
        "--format",
        "qcow2",
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    infrakit_env(w, &args, &[("XDG_CACHE_HOME", s(&cache))]).ok();
    eprintln!(
        "image: {profile} built into {out} in {} s",
        started.elapsed().as_secs()
    );
    w.join(out)
}

/// Two builds of the same image, into `A` and `B`, at the same time (the
/// package install is mostly one core's work).
fn twice(w: &Path, profile: &str, key: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    std::thread::scope(|scope| {
        let b = scope.spawn(|| image(w, profile, "B", key, extra));
        let a = image(w, profile, "A", key, extra);
        (a, b.join().expect("the second build panicked"))
    })
}

/// The manifest of the image in `dir`.
fn manifest(dir: &Path, name: &str) -> Value {
    serde_json::from_slice(&fs::read(dir.join(format!("{name}.image.json"))).unwrap()).unwrap()
}

/// Both builds wrote the same bytes, file for file; on a difference,
/// diffoscope shows it.
fn assert_identical(a: &Path, b: &Path, name: &str) {
    let files = [
        format!("{name}.img"),
        format!("{name}.qcow2"),
        format!("{name}.img.zst"),
        format!("{name}.image.json"),
        format!("{name}.img.minisig"),
    ];
    let mut differ = Vec::new();
    let listing = |d: &Path| {
        let mut names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        listing(a),
        listing(b),
        "the two builds wrote different files"
    );
    for f in files.iter().filter(|f| a.join(f).exists()) {
        let (x, y) = (a.join(f), b.join(f));
        let same = tool(Path::new("/"), "cmp", &["-s", s(&x), s(&y)]).code == 0;
        if !same {
            differ.push(f.clone());
        }
    }
    if differ.is_empty() {
        return;
    }
    let mut report = String::new();
    for f in &differ {
        let run = tool(
            Path::new("/"),
            "timeout",
            &[
                "900",
                "diffoscope",
                "--max-report-size",
                "200000",
                "--text",
                "-",
                s(&a.join(f)),
                s(&b.join(f)),
            ],
        );
        report.push_str(&format!("--- diffoscope {f}:\n{}\n", run.stdout));
    }
    panic!("two builds of the {name} image differ in {differ:?}:\n{report}");
}

/// Copies `len` bytes at `start` of `disk` into `out` (sparse).
fn extract(disk: &Path, start: u64, len: u64, out: &Path) {
    const MIB: u64 = 1 << 20;
    assert!(start.is_multiple_of(MIB) && len.is_multiple_of(MIB));
    tool(
        Path::new("/"),
        "dd",
        &[
            &format!("if={}", s(disk)),
            &format!("of={}", s(out)),
            "bs=1M",
            &format!("skip={}", start / MIB),
            &format!("count={}", len / MIB),
            "conv=sparse",
            "status=none",
        ],
    )
    .ok();
}

/// The stock tools accept the image in `dir`: the partition table, both
/// filesystems, the qcow2 form; `infrakit verify` accepts the raw disk and
/// the qcow2 with the public key.
fn assert_checks_clean(dir: &Path, name: &str, public: &Path) {
    let img = dir.join(format!("{name}.img"));
    let m = manifest(dir, name);
    let run = tool(dir, "sfdisk", &["--verify", s(&img)]);
    assert_eq!(run.code, 0, "sfdisk --verify: {}{}", run.stdout, run.stderr);
    let dump = tool(dir, "sfdisk", &["--dump", s(&img)]).ok().stdout;
    assert!(dump.contains("label: gpt"), "{dump}");
    let parts = tmp_parts(dir);
    for p in m["partitions"].as_array().unwrap() {
        let start = p["start"].as_u64().unwrap();
        let size = p["size"].as_u64().unwrap();
        let guid = p["guid"].as_str().unwrap().to_ascii_uppercase();
        assert!(
            dump.contains(&guid),
            "sfdisk shows no partition {guid}:\n{dump}"
        );
        let out = parts.join(p["name"].as_str().unwrap());
        extract(&img, start, size, &out);
        let bytes_sha = support::sha256_hex(&fs::read(&out).unwrap());
        assert_eq!(bytes_sha, p["sha256"].as_str().unwrap(), "partition {p}");
        let run = match p["filesystem"].as_str().unwrap() {
            "ext4" => tool(dir, "e2fsck", &["-fn", s(&out)]),
            "vfat" => tool(dir, "fsck.vfat", &["-n", s(&out)]),
            other => panic!("unexpected filesystem {other}"),
        };
        assert_eq!(
            run.code, 0,
            "fsck of the {} partition: {}{}",
            p["name"], run.stdout, run.stderr
        );
        fs::remove_file(&out).unwrap();
    }
    let qcow2 = dir.join(format!("{name}.qcow2"));
    let run = tool(dir, "qemu-img", &["check", s(&qcow2)]);
    assert_eq!(run.code, 0, "qemu-img check: {}{}", run.stdout, run.stderr);
    for f in [&img, &qcow2] {
        let run = support::infrakit(dir, &["verify", s(f), "--key", s(public)]);
        assert_eq!(run.code, 0, "verify {}: {}", f.display(), run.stderr);
    }
}

fn tmp_parts(dir: &Path) -> PathBuf {
    let p = dir.parent().unwrap().join("parts");
    fs::create_dir_all(&p).unwrap();
    p
}

/// User-data: the report script as a per-boot script, its `plan` prepended.
fn user_data(plan: &[&str]) -> Vec<u8> {
    let script = REPORT.replacen(
        "set -u\n",
        &format!("set -u\nplan=({})\n", plan.join(" ")),
        1,
    );
    let doc = serde_json::json!({
        "write_files": [{
            "path": "/var/lib/cloud/scripts/per-boot/infrakit-image-test.sh",
            "permissions": "0755",
            "content": script,
        }],
    });
    // JSON is YAML: cloud-config as one JSON document.
    format!("#cloud-config\n{doc}\n").into_bytes()
}

/// Boots a sparse copy of `image` grown to 3 GiB (the root grows into it),
/// under OVMF, with the seed and `extra` read-only disks attached; returns
/// the console once the report is done (after every planned reboot).
fn boot(dir: &Path, image: &Path, seed: &Path, extra: &[&Path]) -> String {
    let disk = dir.join("disk.img");
    tool(dir, "cp", &["--sparse=always", s(image), s(&disk)]).ok();
    tool(dir, "truncate", &["-s", "3G", s(&disk)]).ok();
    let vars = dir.join("OVMF_VARS.fd");
    fs::copy(OVMF_VARS, &vars).unwrap();
    let console = dir.join("console.log");
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        "2048".into(),
        "-smp".into(),
        "1".into(),
        "-nographic".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", s(&console)),
        "-drive".into(),
        format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", s(&vars)),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", s(&disk)),
        "-drive".into(),
        format!("file={},format=raw,media=cdrom,readonly=on", s(seed)),
        // User-mode network restricted to the guest and QEMU itself: DHCP
        // answers, nothing beyond does.
        "-netdev".into(),
        "user,id=net0,restrict=on".into(),
        "-device".into(),
        "virtio-net-pci,netdev=net0,romfile=".into(),
        "-device".into(),
        "virtio-rng-pci".into(),
    ];
    for e in extra {
        args.push("-drive".into());
        args.push(format!("file={},format=raw,if=virtio,readonly=on", s(e)));
    }
    let _turn = vm::boot_turn();
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let read =
        || String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).replace('\r', "");
    let mut done_at: Option<Instant> = None;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if done_at.is_none() && read().contains(REPORT_DONE) {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(30))
            || started.elapsed() > SESSION_TIMEOUT
        {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = read();
    let kept = std::env::temp_dir().join(format!(
        "infrakit-image-console-{}.log",
        image.file_stem().unwrap().to_string_lossy()
    ));
    fs::write(&kept, &text).unwrap();
    assert!(
        text.contains(REPORT_DONE),
        "the image's report did not finish in {} s (whole console: {}); qemu stderr:\n{}\nconsole tail:\n{}",
        started.elapsed().as_secs(),
        kept.display(),
        fs::read_to_string(dir.join("qemu.err")).unwrap_or_default(),
        vm::tail(&text, 100)
    );
    eprintln!("image: report done after {} s", started.elapsed().as_secs());
    text
}

/// A NoCloud seed naming the host `hostname`, with the report's `plan`.
fn seed(dir: &Path, hostname: &str, plan: &[&str]) -> PathBuf {
    let d = dir.join("seed");
    fs::create_dir_all(&d).unwrap();
    vm::nocloud_seed(
        &d,
        &user_data(plan),
        &format!("instance-id: {hostname}-1\nlocal-hostname: {hostname}\n"),
    )
}

struct Report {
    console: String,
    sections: std::collections::BTreeMap<String, Section>,
}

impl Report {
    fn get(&self, boot: u32, name: &str) -> &Section {
        let key = format!("b{boot}-{name}");
        self.sections.get(&key).unwrap_or_else(|| {
            panic!(
                "no section {key} (have {:?}); console tail:\n{}",
                self.sections.keys().collect::<Vec<_>>(),
                vm::tail(&self.console, 120)
            )
        })
    }

    /// `infrakit status --json` of boot `boot`, and its exit code.
    fn status(&self, boot: u32) -> (i32, Value) {
        let st = self.get(boot, "status");
        let json = serde_json::from_str(st.text.lines().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("boot {boot} status: {e}: {}", st.text));
        (st.rc, json)
    }

    /// `systemctl list-units` state (LOAD ACTIVE SUB) of `unit` in boot `boot`.
    fn unit(&self, boot: u32, unit: &str) -> Vec<String> {
        let fields = vm::unit_state(&self.get(boot, "units").text, unit);
        fields.get(1..).map(<[String]>::to_vec).unwrap_or_default()
    }
}

fn report(console: String) -> Report {
    Report {
        sections: vm::parse_sections(&console),
        console,
    }
}

/// What every booted image shows: multi-user reached, the seed's hostname,
/// the hardened sshd, the release's firewall, the ESP mounted, the root
/// grown to the disk.
fn assert_host(r: &Report, boot: u32, hostname: &str) {
    assert_eq!(r.get(boot, "multi-user").text, "active");
    assert_eq!(r.get(boot, "hostname").text, hostname);
    let sshd = &r.get(boot, "sshd-T").text;
    for line in [
        "passwordauthentication no",
        "permitrootlogin no",
        "allowgroups infrakit-admin",
        "authenticationmethods publickey",
    ] {
        assert!(
            sshd.lines().any(|l| l == line),
            "sshd -T lacks {line:?}:\n{sshd}"
        );
    }
    let nft = r.get(boot, "nft");
    assert_eq!(nft.rc, 0, "{}", nft.text);
    assert!(nft.text.contains("table inet infrakit {"), "{}", nft.text);
    assert!(nft.text.contains("policy drop"), "{}", nft.text);
    for unit in [
        "ssh.service",
        "fail2ban.service",
        "systemd-timesyncd.service",
    ] {
        assert_eq!(
            r.unit(boot, unit),
            ["loaded", "active", "running"],
            "{unit}"
        );
    }
    assert_eq!(
        r.unit(boot, "infrakit-firewall.service")[..2],
        ["loaded", "active"]
    );
    let efi = &r.get(boot, "efi").text;
    assert!(
        efi.starts_with("vfat") && efi.contains("BOOTX64.EFI"),
        "{efi}"
    );
    let sizes: Vec<u64> = r
        .get(boot, "root-size")
        .text
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    // A 2 GiB image (a 1790 MiB root) on a 3 GiB disk: the partition and
    // the filesystem grew into the rest.
    const MIB: u64 = 1 << 20;
    assert!(
        sizes[0] > 2700 * MIB && sizes[1] > 2600 * MIB,
        "root not grown: {sizes:?}"
    );
}

fn assert_release(r: &Report, boot: u32, name: &str, version: &str) {
    let (rc, st) = r.status(boot);
    assert_eq!(rc, 0, "boot {boot}: infrakit status is not clean: {st}");
    assert_eq!(st["release"]["name"], name, "{st}");
    assert_eq!(st["release"]["version"], version, "{st}");
    assert_eq!(st["drift"], serde_json::json!([]), "{st}");
    assert_eq!(st["errors"], serde_json::json!([]), "{st}");
    assert_eq!(st["missing_prerequisites"], serde_json::json!([]), "{st}");
}

#[test]
fn base_image_is_reproducible_checks_clean_boots_and_upgrades_in_place() {
    image_tools();
    let w = chain_profiles::workspace();
    let w = w.path();
    let (key, public) = keypair(w, "release");
    let (a, b) = twice(w, "profiles/base.toml", &key, &["--format", "raw.zst"]);
    assert_identical(&a, &b, "base");
    assert_checks_clean(&a, "base", &public);
    let zst = b.join("base.img.zst");
    let run = support::infrakit(w, &["verify", s(&zst), "--key", s(&public)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let m = manifest(&a, "base");
    assert_eq!(m["suite"], "bookworm");
    assert!(
        m["packages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "linux-image-cloud-amd64"),
        "{m}"
    );

    // Release 2 on its own disk, signed by the same key.
    infrakit_env(
        w,
        &[
            "build",
            "profiles/base.toml",
            "--out",
            "r2",
            "--release-version",
            "0.2.0",
        ],
        &[("INFRAKIT_SIGN_KEY", s(&key))],
    )
    .ok();
    let r2 = w.join("release2.iso");
    let run = tool(
        &w.join("r2"),
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-o",
            s(&r2),
            "-V",
            "RELEASE2",
            "-J",
            "-r",
            "base.tar.zst",
            "base.tar.zst.minisig",
            "base.manifest.json",
        ],
    );
    assert_eq!(run.code, 0, "xorriso: {}", run.stderr);

    // A tampered copy fails verify; the untampered image still passes.
    let root = m["partitions"][1]["start"].as_u64().unwrap();
    let file = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(a.join("base.img"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8; 1];
    let at = root + 1024 + 4096 * 3;
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
    drop(file);
    let run = support::infrakit(w, &["verify", s(&a.join("base.img")), "--key", s(&public)]);
    assert_eq!(run.code, 1, "a tampered image verified: {}", run.stderr);
    assert!(run.stderr.contains("signature"), "{}", run.stderr);

    let vmdir = w.join("vm");
    fs::create_dir_all(&vmdir).unwrap();
    let seed = seed(&vmdir, "imagehost", &["apply", "rollback", "done"]);
    let r = report(boot(&vmdir, &b.join("base.img"), &seed, &[&r2]));
    assert_host(&r, 1, "imagehost");
    assert_release(&r, 1, "base", "0.1.0");
    let applied = r.get(1, "apply");
    assert_eq!(
        applied.rc, 0,
        "apply of release 2 in the guest: {}",
        applied.text
    );
    assert_host(&r, 2, "imagehost");
    assert_release(&r, 2, "base", "0.2.0");
    let rolled = r.get(2, "rollback");
    assert_eq!(rolled.rc, 0, "rollback in the guest: {}", rolled.text);
    assert_host(&r, 3, "imagehost");
    assert_release(&r, 3, "base", "0.1.0");
}

#[test]
fn monad_image_is_reproducible_and_boots_with_its_secret_slots_missing() {
    image_tools();
    let w = chain_profiles::workspace();
    let w = w.path();
    let (key, public) = keypair(w, "release");
    // Upstream reserves 4 GiB of 2 MiB pages and 4 of 1 GiB at boot: more
    // than the 2 GiB test VM has (the reservation would starve the guest).
    let profile = w.join("profiles/monad-validator.toml");
    let text = fs::read_to_string(&profile).unwrap().replace(
        "[params]\n",
        "[params]\nhugepages-1g = 0\nhugepages-2m = 0\n",
    );
    write(&profile, text);
    chain_profiles::build_with(
        w,
        "profiles/monad-validator.toml",
        "out",
        &[("INFRAKIT_SIGN_KEY", s(&key))],
    );
    let artifact = w.join("out/monad-validator.tar.zst");
    let args = ["--artifact", s(&artifact)];
    let (a, b) = twice(w, "profiles/monad-validator.toml", &key, &args);
    assert_identical(&a, &b, "monad-validator");
    assert_checks_clean(&a, "monad-validator", &public);
    let m = manifest(&a, "monad-validator");
    assert_eq!(m["suite"], "trixie");
    let release: Value =
        serde_json::from_slice(&fs::read(w.join("out/monad-validator.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["artifact"]["sha256"], release["archive"]["sha256"]);

    let vmdir = w.join("vm");
    fs::create_dir_all(&vmdir).unwrap();
    let seed = seed(&vmdir, "monad-1", &["signers"]);
    let r = report(boot(&vmdir, &a.join("monad-validator.img"), &seed, &[]));
    assert_host(&r, 1, "monad-1");
    let (rc, st) = r.status(1);
    assert_eq!(rc, 1, "status must fail while secret slots are empty: {st}");
    assert_eq!(st["release"]["name"], "monad-validator", "{st}");
    assert_eq!(st["drift"], serde_json::json!([]), "{st}");
    assert_eq!(st["errors"], serde_json::json!([]), "{st}");
    assert_eq!(st["missing_prerequisites"], serde_json::json!([]), "{st}");
    let mut missing: Vec<&str> = st["missing_secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let mut declared: Vec<&str> = release["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    missing.sort();
    declared.sort();
    assert_eq!(missing, declared, "{st}");
    assert!(declared.contains(&"id-secp") && declared.contains(&"keystore-password"));
    let start = r.get(1, "signer-start");
    assert_ne!(
        start.rc, 0,
        "the signer started without its secrets: {}",
        start.text
    );
    let show = &r.get(1, "signer-show").text;
    assert!(
        show.contains("ActiveState=failed") || show.contains("ActiveState=inactive"),
        "{show}"
    );
    assert!(
        show.contains("ExecMainStartTimestampMonotonic=0"),
        "monad-node ran: {show}"
    );
    assert_ne!(
        r.unit(1, "monad-bft.service").get(1).map(String::as_str),
        Some("active")
    );
}

#[test]
fn image_build_refuses_an_altered_cached_package_and_a_profile_without_image() {
    image_tools();
    let w = chain_profiles::workspace();
    let w = w.path();
    let (key, _) = keypair(w, "release");
    // A copy of the package cache (hard links) with one .deb replaced.
    let cache = w.join("cache-copy");
    fs::create_dir_all(&cache).unwrap();
    tool(
        w,
        "cp",
        &[
            "-al",
            s(&package_cache().join("infrakit")),
            s(&cache.join("infrakit")),
        ],
    )
    .ok();
    let lock = fs::read_to_string(w.join("profiles/base.image.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&lock).unwrap();
    let sudo = lock["package"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("sudo"))
        .unwrap();
    let sha = sudo["sha256"].as_str().unwrap();
    let version = sudo["version"].as_str().unwrap();
    let cached = cache.join("infrakit/sha256").join(sha);
    let mut bytes = fs::read(&cached).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::remove_file(&cached).unwrap(); // a new file: the shared cache keeps its copy
    write(&cached, &bytes);
    let got = support::sha256_hex(&bytes);
    let run = infrakit_env(
        w,
        &[
            "image",
            "profiles/base.toml",
            "--out",
            "X",
            "--sign-key",
            s(&key),
        ],
        &[("XDG_CACHE_HOME", s(&cache))],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    let named = format!("package sudo {version}");
    for needle in [named.as_str(), sha, got.as_str()] {
        assert!(
            run.stderr.contains(needle),
            "lacks {needle}: {}",
            run.stderr
        );
    }
    let left: Vec<String> = fs::read_dir(w.join("X"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with(".infrakit-image") || n.ends_with(".img")),
        "left behind: {left:?}"
    );

    // No [image]: exit 2 naming the profile.
    let run = infrakit_env(
        w,
        &[
            "image",
            "profiles/aztec-node.toml",
            "--out",
            "Y",
            "--sign-key",
            s(&key),
        ],
        &[("XDG_CACHE_HOME", s(&cache))],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("profiles/aztec-node.toml") && run.stderr.contains("[image]"),
        "{}",
        run.stderr
    );
    // An image lock made for another package list: exit 2 naming the lock.
    let profile = w.join("profiles/base.toml");
    let text = fs::read_to_string(&profile)
        .unwrap()
        .replace("\"udev\",", "\"udev\", \"curl\",");
    write(&profile, text);
    let run = infrakit_env(
        w,
        &[
            "image",
            "profiles/base.toml",
            "--out",
            "Z",
            "--sign-key",
            s(&key),
        ],
        &[("XDG_CACHE_HOME", s(&cache))],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("base.image.lock") && run.stderr.contains("infrakit lock"),
        "{}",
        run.stderr
    );
}
