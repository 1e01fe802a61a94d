//! QEMU test harness: boots a real Debian bookworm guest (built by
//! `tests/vm/build-guest.sh`, cached outside the repository) with a cloud-init
//! NoCloud seed, and reads back what happened inside from the report that a
//! test-only unit in the guest prints on the serial console once cloud-init
//! is done. See tests/vm/README.md for the guest, the cache and the traps.
//!
//! The API for VM tests: [`guest`], [`boot`], [`nocloud_seed`], [`Boot`],
//! [`Section`], [`GUEST_URL`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::support::{self, Server, s};

/// The only address the guest can reach, when [`boot`] is given a directory
/// to serve: port 80 there is forwarded to a loopback `support::Server`.
pub(crate) const GUEST_URL: &str = "http://10.0.2.100";

/// The build script, relative to the repository. Its content is the cache key.
const BUILD_SCRIPT: &str = "tests/vm/build-guest.sh";

/// How long one boot may take, from QEMU's start to its exit (TCG, no KVM).
const BOOT_TIMEOUT: Duration = Duration::from_secs(360);

/// After the report's last line, how long the guest gets to power off before
/// it is killed (the report is complete either way).
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// Printed by the guest's report script after its last section.
const REPORT_DONE: &str = "===== REPORT DONE =====";

/// Virtual CPUs. Measured on the 2-core test machine under TCG: see
/// tests/vm/README.md.
const SMP: &str = "1";

/// The cached guest: a read-only ext4 root and the kernel and initrd to boot
/// it with directly. Boots never write to it (each has a qcow2 overlay).
#[derive(Debug)]
pub(crate) struct Guest {
    /// `${INFRAKIT_VM_CACHE:-/var/cache/infrakit-vmtest}/guest-<key>`.
    pub(crate) dir: PathBuf,
    /// Sparse 3 GiB ext4 image of the guest's root (`/dev/vda`).
    pub(crate) rootfs: PathBuf,
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: PathBuf,
    /// `dpkg -l` of the guest.
    pub(crate) packages: PathBuf,
}

/// Builds the guest once per cache key, or reuses the cached one; at most
/// once per test process. The key is the first 16 hex digits of the SHA-256
/// of `tests/vm/build-guest.sh`, so any change to the guest rebuilds it. The
/// build runs under an `flock` on `<cache>/build.lock`, so concurrent test
/// processes never build at once. Building needs root, mmdebstrap and the
/// Debian mirror (about 2 minutes); reuse needs neither.
pub(crate) fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(build_or_reuse)
}

fn build_or_reuse() -> Guest {
    let script =
        fs::read(support::repo_dir().join(BUILD_SCRIPT)).expect("reading the build script");
    let key = &support::sha256_hex(&script)[..16];
    let cache = PathBuf::from(
        std::env::var_os("INFRAKIT_VM_CACHE")
            .unwrap_or_else(|| "/var/cache/infrakit-vmtest".into()),
    );
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));
    let dir = cache.join(format!("guest-{key}"));
    let lock = fs::File::create(cache.join("build.lock")).expect("opening the cache's lock file");
    lock.lock().expect("locking the guest cache");

    if !dir.exists() {
        assert!(
            support::is_root(),
            "building the VM test guest needs root (mmdebstrap, mkfs.ext4 -d); \
             run the tests as root or provide a built cache in INFRAKIT_VM_CACHE"
        );
        for t in ["mmdebstrap", "mkfs.ext4", "dpkg-query", "bash"] {
            support::require_tool(t);
        }
        // Leftovers of a build that was killed (the script cleans up otherwise).
        for entry in fs::read_dir(&cache).expect("listing the cache") {
            let path = entry.expect("cache entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(&format!("guest-{key}.tmp.")) {
                let _ = fs::remove_dir_all(&path);
            }
        }
        // Run the very bytes that were hashed.
        let copy = cache.join(format!("build-guest-{key}.sh"));
        fs::write(&copy, &script).expect("writing the build script's copy");
        let log_path = cache.join(format!("guest-{key}.log"));
        let log = fs::File::create(&log_path).expect("creating the build log");
        eprintln!(
            "vm: building the guest into {} (a few minutes; log {})",
            dir.display(),
            log_path.display()
        );
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(&copy)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .status()
            .expect("running tests/vm/build-guest.sh");
        let _ = fs::remove_file(&copy);
        assert!(
            status.success(),
            "tests/vm/build-guest.sh failed ({status}); the end of {}:\n{}",
            log_path.display(),
            tail(&fs::read_to_string(&log_path).unwrap_or_default(), 60)
        );
        eprintln!("vm: guest built in {} s", started.elapsed().as_secs());
    }
    drop(lock);

    let guest = Guest {
        rootfs: dir.join("rootfs.raw"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        packages: dir.join("packages.txt"),
        dir,
    };
    for f in [&guest.rootfs, &guest.kernel, &guest.initrd, &guest.packages] {
        assert!(
            f.is_file(),
            "the cached guest lacks {}: remove {} to rebuild it",
            f.display(),
            guest.dir.display()
        );
    }
    guest
}

/// One section of the guest's report: the output (stdout and stderr) of one
/// command and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Section {
    pub(crate) rc: i32,
    /// The command's output, lines joined by `\n`, no trailing newline.
    pub(crate) text: String,
}

/// What one boot showed.
#[derive(Debug)]
pub(crate) struct Boot {
    /// The whole serial console (carriage returns removed).
    pub(crate) console: String,
    /// The report's sections by name. Always present after a completed boot:
    /// `cloud-init-wait` (rc of `cloud-init status --wait`),
    /// `cloud-init-status`, `infrakit-status` (rc 127, no text, when
    /// /usr/local/bin/infrakit is missing), `sshd-T`, `nft`, `units`,
    /// `failure-marker` (rc 1 when absent), `laid-down` (rc: the first failing
    /// of its `ls` and `readlink`), `cloud-init-output`, `cloud-init-errors`
    /// (rc 1 when nothing matched). A command that hangs is cut at 120 s (rc 124).
    pub(crate) sections: BTreeMap<String, Section>,
    /// From QEMU's start to the end of the report.
    pub(crate) elapsed: Duration,
}

impl Boot {
    /// The section `name`; panics with the console's tail if the report
    /// has no such section.
    pub(crate) fn section(&self, name: &str) -> &Section {
        self.sections.get(name).unwrap_or_else(|| {
            panic!(
                "the guest's report has no section {name:?} (has {:?}); console tail:\n{}",
                self.sections.keys().collect::<Vec<_>>(),
                tail(&self.console, 80)
            )
        })
    }

    /// The console's last `lines` lines, for assertion messages.
    pub(crate) fn tail(&self, lines: usize) -> String {
        tail(&self.console, lines)
    }
}

/// Makes a NoCloud seed ISO (`seed.iso`, volume label `cidata`) in `dir`
/// from `user_data` and `meta_data` with `xorriso -as mkisofs`; returns its path.
pub(crate) fn nocloud_seed(dir: &Path, user_data: &[u8], meta_data: &str) -> PathBuf {
    let files = dir.join("seed-files");
    support::write(&files.join("user-data"), user_data);
    support::write(&files.join("meta-data"), meta_data);
    let iso = dir.join("seed.iso");
    let run = support::tool(
        &files,
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-o",
            s(&iso),
            "-V",
            "cidata",
            "-J",
            "-r",
            "user-data",
            "meta-data",
        ],
    );
    assert_eq!(run.code, 0, "xorriso: {}", run.stderr);
    iso
}

/// Kills QEMU if a boot is abandoned by a panic.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the cached guest with the NoCloud seed `seed_iso` (attached as a
/// read-only CD-ROM) and returns its report. The guest's root is a fresh
/// qcow2 overlay on the cached image, so nothing persists between boots.
///
/// Networking is QEMU user mode with `restrict=on`: the guest gets an address
/// by DHCP (10.0.2.15) and can reach nothing else. If `serve` is a directory,
/// a loopback `support::Server` serves it and the guest reaches it as
/// [`GUEST_URL`] (`http://10.0.2.100/`, port 80, through a `guestfwd` that
/// runs `socat` per connection); no other address answers.
///
/// Boots are serialised within the test process (the machine has 2 cores and
/// TCG is slow). Panics with the console's tail if the guest does not finish
/// its report within 6 minutes or stops before it.
/// One QEMU at a time in this test process (2 cores, TCG): every boot,
/// here and in the image tests, holds this while its guest runs.
pub(crate) fn boot_turn() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn boot(seed_iso: &Path, serve: Option<&Path>) -> Boot {
    let guest = guest();
    for t in ["qemu-system-x86_64", "qemu-img", "socat"] {
        support::require_tool(t);
    }
    let seed_iso = fs::canonicalize(seed_iso)
        .unwrap_or_else(|e| panic!("seed ISO {}: {e}", seed_iso.display()));
    let _turn = boot_turn();

    let tmp = support::tempdir();
    let overlay = tmp.path().join("root.qcow2");
    let run = support::tool(
        tmp.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            s(&guest.rootfs),
            s(&overlay),
        ],
    );
    assert_eq!(run.code, 0, "qemu-img create: {}", run.stderr);

    let server = serve.map(Server::start);
    let mut netdev = String::from("user,id=net0,restrict=on");
    if let Some(server) = &server {
        // The cmd: form spawns one socat per guest connection, so any number
        // of sequential connections work (a chardev guestfwd serves one).
        netdev.push_str(&format!(
            ",guestfwd=tcp:10.0.2.100:80-cmd:socat - TCP:127.0.0.1:{}",
            server.port()
        ));
    }
    let console_path = tmp.path().join("console.log");
    let qemu_log = tmp.path().join("qemu.log");
    let args = qemu_args(guest, &overlay, &seed_iso, &netdev, &console_path);
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(fs::File::create(&qemu_log).expect("qemu log"))
        .stderr(fs::File::create(tmp.path().join("qemu.err")).expect("qemu log"))
        .spawn()
        .expect("starting qemu-system-x86_64");
    let mut qemu = Qemu(child);

    let read_console =
        || String::from_utf8_lossy(&fs::read(&console_path).unwrap_or_default()).replace('\r', "");
    let mut done_at: Option<Instant> = None;
    let mut elapsed = Duration::ZERO;
    let exited = loop {
        if let Some(status) = qemu.0.try_wait().expect("waiting for qemu") {
            break Some(status);
        }
        if done_at.is_none() && read_console().contains(REPORT_DONE) {
            done_at = Some(Instant::now());
            elapsed = started.elapsed();
        }
        if let Some(at) = done_at
            && at.elapsed() > POWEROFF_GRACE
        {
            break None; // reported, but slow to power off: the Drop kills it
        }
        if started.elapsed() > BOOT_TIMEOUT {
            let _ = qemu.0.kill();
            let _ = qemu.0.wait();
            panic!(
                "the guest did not finish its report within {} s; qemu {}\nconsole tail:\n{}",
                BOOT_TIMEOUT.as_secs(),
                args.join(" "),
                tail(&read_console(), 80)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(qemu);
    drop(server);
    let console = read_console();
    if !console.contains(REPORT_DONE) {
        let err = fs::read_to_string(tmp.path().join("qemu.err")).unwrap_or_default();
        panic!(
            "the guest stopped before its report was done (qemu: {exited:?}, {} s)\nqemu stderr:\n{err}\nconsole tail:\n{}",
            started.elapsed().as_secs(),
            tail(&console, 80)
        );
    }
    if elapsed.is_zero() {
        elapsed = started.elapsed();
    }
    eprintln!("vm: report done after {} s", elapsed.as_secs());
    Boot {
        sections: parse_sections(&console),
        console,
        elapsed,
    }
}

/// The QEMU command line (without the program) for one boot.
fn qemu_args(
    guest: &Guest,
    overlay: &Path,
    seed_iso: &Path,
    netdev: &str,
    console: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-smp",
        SMP,
        "-m",
        "1536",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(format!("file:{}", s(console)));
    args.extend([
        "-kernel".into(),
        s(&guest.kernel).into(),
        "-initrd".into(),
        s(&guest.initrd).into(),
        "-append".into(),
        // panic=-1 with -no-reboot: a kernel panic ends QEMU at once.
        "root=/dev/vda rw console=ttyS0 loglevel=4 panic=-1".into(),
        "-drive".into(),
        format!(
            "file={},format=qcow2,if=virtio",
            s(overlay).replace(',', ",,")
        ),
        "-drive".into(),
        format!(
            "file={},format=raw,media=cdrom,readonly=on",
            s(seed_iso).replace(',', ",,")
        ),
        "-netdev".into(),
        netdev.into(),
        "-device".into(),
        "virtio-net-pci,netdev=net0,romfile=".into(),
        "-device".into(),
        "virtio-rng-pci".into(),
    ]);
    args
}

/// The report's sections in `console`: the lines between
/// `===== BEGIN name =====` and `===== END name rc=N =====`. Markers are
/// found anywhere in a line (a kernel message may precede one on the same
/// line); an unterminated section is dropped.
pub(crate) fn parse_sections(console: &str) -> BTreeMap<String, Section> {
    let mut sections = BTreeMap::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in console.lines() {
        if let Some(at) = line.find("===== BEGIN ") {
            let rest = &line[at + "===== BEGIN ".len()..];
            if let Some(name) = rest.strip_suffix(" =====") {
                open = Some((name.to_string(), Vec::new()));
                continue;
            }
        }
        if let Some(at) = line.find("===== END ") {
            let rest = &line[at + "===== END ".len()..];
            let end = rest
                .strip_suffix(" =====")
                .and_then(|r| r.rsplit_once(" rc="))
                .and_then(|(name, rc)| Some((name, rc.parse::<i32>().ok()?)));
            if let Some((name, rc)) = end
                && let Some((open_name, lines)) = open.take_if(|(n, _)| n == name)
            {
                if at > 0 {
                    // Output without a final newline ran into the marker.
                    let mut lines = lines;
                    lines.push(&line[..at]);
                    sections.insert(open_name, section(rc, &lines));
                } else {
                    sections.insert(open_name, section(rc, &lines));
                }
                continue;
            }
        }
        if let Some((_, lines)) = &mut open {
            lines.push(line);
        }
    }
    sections
}

fn section(rc: i32, lines: &[&str]) -> Section {
    Section {
        rc,
        text: lines.join("\n"),
    }
}

/// `unit`'s line of `systemctl list-units --plain` output (UNIT LOAD ACTIVE
/// SUB DESCRIPTION): its first four fields, or none when it is not listed.
pub(crate) fn unit_state(units: &str, unit: &str) -> Vec<String> {
    units
        .lines()
        .map(|l| {
            l.split_whitespace()
                .take(4)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|f| f.first().map(String::as_str) == Some(unit))
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn report_sections_parse_around_console_noise() {
    let console = "\
[    1.0] kernel says hi
===== BEGIN a =====
line 1
[   12.3] a kernel line inside
===== END a rc=0 =====
junk ===== BEGIN b =====
===== END b rc=127 =====
===== BEGIN c =====
no newline===== END c rc=1 =====
===== BEGIN d =====
half of it, then a hangup cut the wri===== BEGIN d =====
all of it
===== END d rc=0 =====
===== BEGIN cut =====
never ended
";
    let got = parse_sections(console);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
    // A block written again after a hangup cut it: the last copy counts.
    assert_eq!(
        got["d"],
        Section {
            rc: 0,
            text: "all of it".into()
        }
    );
    assert_eq!(
        got["a"],
        Section {
            rc: 0,
            text: "line 1\n[   12.3] a kernel line inside".into()
        }
    );
    assert_eq!(
        got["b"],
        Section {
            rc: 127,
            text: String::new()
        }
    );
    assert_eq!(
        got["c"],
        Section {
            rc: 1,
            text: "no newline".into()
        }
    );
}

/// One boot: the guest reads a NoCloud seed, gets its network from QEMU's
/// DHCP, fetches a file from the test's loopback server as GUEST_URL, cannot
/// reach any other address, and its report says cloud-init is done.
#[test]
fn guest_boots_a_nocloud_seed_and_reaches_only_the_test_server() {
    let tmp = support::tempdir();
    let served = tmp.path().join("served");
    // Unique per run, so a stale or cached answer cannot pass.
    let token =
        support::sha256_hex(format!("{:?}{}", Instant::now(), std::process::id()).as_bytes());
    let hello = format!("hello from the test server {}", &token[..16]);
    support::write(&served.join("hello.txt"), format!("{hello}\n"));

    // A second loopback server the guest must NOT reach: without
    // restrict=on, QEMU's user net hands 10.0.2.2:PORT to the host's
    // 127.0.0.1:PORT and this fetch would succeed (tried: curl exit 0).
    let decoy_dir = tmp.path().join("decoy");
    support::write(&decoy_dir.join("hello.txt"), "decoy\n");
    let decoy = Server::start(&decoy_dir);
    let decoy_port = decoy.port();

    let user_data = format!(
        "#cloud-config\n\
         runcmd:\n\
         \x20 - [sh, -c, 'curl -fsS --max-time 30 -o /root/hello.txt {GUEST_URL}/hello.txt; echo \"fetch rc=$?\"']\n\
         \x20 - [sh, -c, 'echo \"fetched: $(cat /root/hello.txt)\"']\n\
         \x20 - [sh, -c, 'curl -fsS --max-time 10 http://10.0.2.2:{decoy_port}/hello.txt; echo \"host rc=$?\"']\n\
         \x20 - [sh, -c, 'curl -fsS --max-time 10 http://192.0.2.1/ >/dev/null 2>&1; echo \"outside rc=$?\"']\n\
         \x20 - [sh, -c, 'echo runcmd finished']\n"
    );
    let seed = nocloud_seed(
        tmp.path(),
        user_data.as_bytes(),
        "instance-id: vmtest-smoke\nlocal-hostname: vm\n",
    );
    let run = support::tool(
        tmp.path(),
        "cloud-init",
        &[
            "schema",
            "--config-file",
            s(&tmp.path().join("seed-files/user-data")),
        ],
    );
    assert_eq!(
        run.code, 0,
        "cloud-init schema: {}{}",
        run.stdout, run.stderr
    );

    let boot = boot(&seed, Some(&served));

    eprintln!("vm: smoke boot took {} s", boot.elapsed.as_secs());
    let status = boot.section("cloud-init-status");
    assert_eq!(
        status.rc,
        0,
        "cloud-init status --long:\n{}\nconsole tail:\n{}",
        status.text,
        boot.tail(60)
    );
    assert!(
        status.text.lines().any(|l| l.trim() == "status: done"),
        "cloud-init status --long:\n{}",
        status.text
    );
    assert_eq!(boot.section("cloud-init-wait").rc, 0);

    let output = &boot.section("cloud-init-output").text;
    let said = |prefix: &str| -> Vec<&str> {
        output
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    };
    assert_eq!(said("fetch rc="), ["0"], "cloud-init output:\n{output}");
    assert_eq!(
        said("fetched: "),
        [hello.as_str()],
        "cloud-init output:\n{output}"
    );
    drop(decoy);
    assert!(
        !output.contains("decoy"),
        "the guest reached the host's loopback:\n{output}"
    );
    // curl: 7 = could not connect, 28 = timed out; either way, nothing came back.
    for (what, rc) in [("host", said("host rc=")), ("outside", said("outside rc="))] {
        assert_eq!(
            rc.len(),
            1,
            "no {what} line in cloud-init output:\n{output}"
        );
        assert!(
            ["7", "28"].contains(&rc[0]),
            "{what} address: curl exit {} (want 7 or 28: unreachable)\n{output}",
            rc[0]
        );
    }
    assert_eq!(
        said("runcmd finished"),
        [""],
        "cloud-init output:\n{output}"
    );

    // The rest of the report is there and plausible for a bare guest.
    assert_eq!(boot.section("infrakit-status").rc, 127);
    assert_eq!(boot.section("failure-marker").rc, 1);
    let sshd = boot.section("sshd-T");
    assert_eq!(sshd.rc, 0, "sshd -T:\n{}", sshd.text);
    assert!(
        sshd.text.lines().any(|l| l.starts_with("port 22")),
        "sshd -T:\n{}",
        sshd.text
    );
    let units = &boot.section("units").text;
    assert!(
        units
            .lines()
            .any(|l| l.starts_with("cloud-final.service ") && l.contains(" active ")),
        "units:\n{units}"
    );
    let errors = boot.section("cloud-init-errors");
    assert_eq!(
        errors.rc, 1,
        "cloud-init.log has warnings or errors:\n{}",
        errors.text
    );
}
