//! The firewall beside a container engine (issue 10, Aztec): Docker
//! publishes ports by DNAT, so their packets cross the forward hook, not the
//! input hook, and a ruleset that flushes everything wipes Docker's rules.
//! Three network namespaces stand in for a client, the host and a
//! container; the host carries nftables rules shaped like the ones Docker
//! installs (DNAT of the published ports, forward accepts) beside InfraKit's
//! ruleset, built from a profile. The client may reach exactly the port
//! declared public and forwarded; the loopback-published port and the
//! unpublished admin port stay closed; reloading InfraKit's ruleset leaves
//! Docker's tables as they were. The same namespaces then check each chain
//! profile's ruleset (built from stand-in inputs) with listeners on the
//! host: exactly the declared public ports answer, TCP and UDP; loopback
//! ports and undeclared ones time out; allow-listed ones answer only the
//! allowed address.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::*;

const HOST: &str = "127.0.12.1";
const CLIENT: &str = "127.0.12.2";
/// A second client address, outside any allow-list.
const OTHER: &str = "127.0.12.3";
const BRIDGE: &str = "127.0.13.1";
const CONTAINER: &str = "127.0.13.2";

/// `container.py ADDR`: TCP listeners on each port and a UDP echo on 40400
/// at ADDR, answering with the peer's address.
const CONTAINER_PY: &str = r#"
import socket, sys, threading
def tcp(s, port):
    while True:
        c, a = s.accept()
        c.sendall(("port %d peer %s\n" % (port, a[0])).encode()); c.close()
def udp(s, port):
    while True:
        d, a = s.recvfrom(100)
        s.sendto(("udp %d peer %s" % (port, a[0])).encode(), a)
# Every socket listens before "ready" is printed.
for p in (40400, 8080, 8880):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(16)
    threading.Thread(target=tcp, args=(s, p), daemon=True).start()
# Bound to the container's address, so replies leave from it (an unbound
# socket would pick a loopback source for a 127.x peer).
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 40400))
threading.Thread(target=udp, args=(u, 40400), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// `host.py ADDR PROTO/PORT...`: a TCP listener (all addresses) or a UDP
/// echo (at ADDR, so replies leave from it) on each, answering with the
/// peer's address.
const HOST_PY: &str = r#"
import socket, sys, threading
addr = sys.argv[1]
def tcp(s, port):
    while True:
        c, a = s.accept()
        c.sendall(("port %d peer %s\n" % (port, a[0])).encode()); c.close()
def udp(s, port):
    while True:
        d, a = s.recvfrom(100)
        s.sendto(("udp %d peer %s" % (port, a[0])).encode(), a)
# Every socket is bound (and listening) before "ready" is printed.
for job in sys.argv[2:]:
    proto, port = job.split("/")
    port = int(port)
    if proto == "tcp":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(16)
        threading.Thread(target=tcp, args=(s, port), daemon=True).start()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
        threading.Thread(target=udp, args=(s, port), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// `probe.py SRC DST PROTO/PORT...`: all at once, one line each, in order:
/// `open <banner>`, `timeout` or `error <message>`.
const PROBE_PY: &str = r#"
import socket, sys, threading
src, dst = sys.argv[1], sys.argv[2]
jobs = sys.argv[3:]
out = [None] * len(jobs)
def probe(i, job):
    proto, port = job.split("/")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind); s.settimeout(1.5); s.bind((src, 0))
    try:
        s.connect((dst, int(port)))
        if proto == "udp":
            s.send(b"hello")
        out[i] = "open " + s.recv(200).decode().strip()
    except socket.timeout:
        out[i] = "timeout"
    except OSError as e:
        out[i] = "error %s" % e
    finally:
        s.close()
threads = [threading.Thread(target=probe, args=(i, j)) for i, j in enumerate(jobs)]
for t in threads: t.start()
for t in threads: t.join()
print("\n".join(out))
"#;

/// Docker's rules for a container at CONTAINER publishing 40400/tcp+udp on
/// every address and 8080 on 127.0.0.1 only (as its iptables backend
/// installs them, written in nft): DNAT in `ip nat`, accepts in `ip filter`.
const DOCKER_NFT: &str = r#"
table ip nat {
	chain DOCKER {
		iifname != "docker0" tcp dport 40400 dnat to 127.0.13.2:40400
		iifname != "docker0" udp dport 40400 dnat to 127.0.13.2:40400
		iifname != "docker0" ip daddr 127.0.0.1 tcp dport 8080 dnat to 127.0.13.2:8080
	}
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local jump DOCKER
	}
}
table ip filter {
	chain DOCKER {
		ip daddr 127.0.13.2 iifname != "docker0" oifname "docker0" tcp dport 40400 accept
		ip daddr 127.0.13.2 iifname != "docker0" oifname "docker0" udp dport 40400 accept
		ip daddr 127.0.13.2 iifname != "docker0" oifname "docker0" tcp dport 8080 accept
	}
	chain FORWARD {
		type filter hook forward priority filter; policy drop;
		oifname "docker0" ct state established,related accept
		oifname "docker0" jump DOCKER
		iifname "docker0" accept
	}
}
"#;

/// A child process killed (and reaped) when dropped, a panic included.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Namespaces {
    names: [String; 3],
    container: Option<Child>,
    scripts: tempfile::TempDir,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Some(mut c) = self.container.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "delete", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    tool(Path::new("/"), "ip", args).ok();
}

impl Namespaces {
    fn new() -> Namespaces {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "ikctr-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let names = [format!("{id}-c"), format!("{id}-h"), format!("{id}-k")];
        let scripts = tempdir();
        write(&scripts.path().join("container.py"), CONTAINER_PY);
        write(&scripts.path().join("probe.py"), PROBE_PY);
        write(&scripts.path().join("host.py"), HOST_PY);
        let mut n = Namespaces {
            names,
            container: None,
            scripts,
        };
        let [c, h, k] = n.names.clone();
        for ns in [&c, &h, &k] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", "vc", "netns", &c, "type", "veth", "peer", "name", "vh", "netns", &h,
        ]);
        ip(&[
            "link", "add", "docker0", "netns", &h, "type", "veth", "peer", "name", "eth0", "netns",
            &k,
        ]);
        for (ns, dev) in [(&c, "vc"), (&h, "vh"), (&h, "docker0"), (&k, "eth0")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        // Loopback-range addresses between namespaces: route_localnet lets
        // them cross (and be forwarded by) the veths; no rp_filter.
        for ns in [&c, &h, &k] {
            let mut args = vec!["netns", "exec", ns, "sysctl", "-qw"];
            args.extend([
                "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.all.rp_filter=0",
            ]);
            ip(&args);
            for dev in ["vc", "vh", "docker0", "eth0"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", ns, "sysctl", "-qw"])
                    .arg(format!("net.ipv4.conf.{dev}.route_localnet=1"))
                    .arg(format!("net.ipv4.conf.{dev}.rp_filter=0"))
                    .stderr(Stdio::null())
                    .status();
            }
        }
        ip(&[
            "netns",
            "exec",
            &h,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            "vc",
        ]);
        ip(&["-n", &c, "addr", "add", &format!("{OTHER}/24"), "dev", "vc"]);
        ip(&["-n", &h, "addr", "add", &format!("{HOST}/24"), "dev", "vh"]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{BRIDGE}/24"),
            "dev",
            "docker0",
        ]);
        ip(&[
            "-n",
            &k,
            "addr",
            "add",
            &format!("{CONTAINER}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &k,
            "route",
            "add",
            "127.0.12.0/24",
            "via",
            BRIDGE,
            "dev",
            "eth0",
        ]);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &k, "python3"])
            .arg(n.scripts.path().join("container.py"))
            .arg(CONTAINER)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the container's listeners");
        let out = child.stdout.take().unwrap();
        n.container = Some(child);
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        n
    }

    /// Listeners in the host namespace itself on `jobs` (`tcp/N`, `udp/N`).
    fn serve_on_host(&self, jobs: &[&str]) -> Child {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.names[1], "python3"])
            .arg(self.scripts.path().join("host.py"))
            .arg(HOST)
            .args(jobs)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the host's listeners");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        child
    }

    fn host(&self) -> &str {
        &self.names[1]
    }

    fn nft(&self, args: &[&str]) -> Run {
        let mut all = vec!["netns", "exec", self.host(), "nft"];
        all.extend_from_slice(args);
        tool(Path::new("/"), "ip", &all).ok()
    }

    fn load(&self, ruleset: &Path) {
        let run = self.nft(&["-f", s(ruleset)]);
        assert!(run.stderr.is_empty(), "nft -f: {}", run.stderr);
    }

    fn probe(&self, jobs: &[&str]) -> Vec<String> {
        self.probe_from(CLIENT, jobs)
    }

    fn probe_from(&self, src: &str, jobs: &[&str]) -> Vec<String> {
        let script = self.scripts.path().join("probe.py");
        let mut args = vec![
            "netns",
            "exec",
            &self.names[0],
            "python3",
            s(&script),
            src,
            HOST,
        ];
        args.extend_from_slice(jobs);
        let out = tool(Path::new("/"), "ip", &args).ok().stdout;
        out.lines().map(str::to_owned).collect()
    }
}

/// The ruleset InfraKit builds for a profile whose overlay declares 40400
/// public (forwarded or not) and 8080 loopback only.
fn ruleset(dir: &Path, forward: bool) -> PathBuf {
    let repo = Repo::new();
    repo.overlay(
        "node",
        &format!(
            "[[port]]\nport = 40400\nexposure = \"public\"\nforward = {forward}\n\n\
             [[port]]\nport = 40400\nproto = \"udp\"\nexposure = \"public\"\nforward = {forward}\n\n\
             [[port]]\nport = 8080\nexposure = \"loopback\"\n"
        ),
    );
    repo.root_file("node", "etc/node.conf", "x\n");
    repo.profile(&["node"], "");
    repo.build_to("dist").ok();
    let out = dir.join(format!("firewall-{forward}.nft"));
    let text = tool(
        repo.path(),
        "tar",
        &[
            "--zstd",
            "-xOf",
            "dist/p.tar.zst",
            "etc/infrakit/firewall.nft",
        ],
    )
    .ok()
    .stdout;
    assert!(!text.contains("flush ruleset"), "{text}");
    write(&out, text);
    out
}

#[test]
fn published_container_ports_open_only_as_declared_and_docker_rules_survive_reloads() {
    require_tool("nft");
    require_tool("python3");
    let dir = tempdir();
    let forwarded = ruleset(dir.path(), true);
    let plain = ruleset(dir.path(), false);
    let n = Namespaces::new();
    let docker = dir.path().join("docker.nft");
    write(&docker, DOCKER_NFT);
    n.load(&docker);
    let docker_tables = || {
        let nat = n.nft(&["list", "table", "ip", "nat"]).stdout;
        let filter = n.nft(&["list", "table", "ip", "filter"]).stdout;
        (nat, filter)
    };
    let before = docker_tables();

    // InfraKit's ruleset without `forward`: its forward chain drops what
    // Docker DNATs, so even the public port is closed.
    n.load(&plain);
    assert_eq!(n.probe(&["tcp/40400"]), ["timeout"]);

    // With `forward = true`: exactly 40400 (tcp and udp) reaches the
    // container, from the client's own address; 8080 (published on
    // 127.0.0.1 only) and 8880 (not published) do not.
    n.load(&forwarded);
    let got = n.probe(&["tcp/40400", "udp/40400", "tcp/8080", "tcp/8880"]);
    assert_eq!(
        got,
        [
            format!("open port 40400 peer {CLIENT}"),
            format!("open udp 40400 peer {CLIENT}"),
            "timeout".to_owned(),
            "timeout".to_owned(),
        ]
    );
    // Reloading InfraKit's ruleset (as its unit does) leaves Docker's
    // tables exactly as they were, and the container reachable.
    n.load(&forwarded);
    n.load(&forwarded);
    assert_eq!(docker_tables(), before);
    assert_eq!(
        n.probe(&["tcp/40400"]),
        [format!("open port 40400 peer {CLIENT}")]
    );
    let tables = n.nft(&["list", "tables"]).stdout;
    has(
        &tables,
        &["table ip nat", "table ip filter", "table inet infrakit"],
    );
}

/// Builds `profile` (a repo profile, or one written from it with `edit`)
/// from stand-ins and checks from the client namespace that exactly the
/// `open` ports answer (from CLIENT; `open_to_client_only` from CLIENT but
/// not from OTHER) and the `closed` ones time out, TCP and UDP, with a
/// listener on every one of them on the host.
fn ports_as_declared(
    profile: &str,
    edit: &[(&str, &str)],
    open: &[&str],
    open_to_client_only: &[&str],
    closed: &[&str],
) {
    require_tool("nft");
    let w = crate::chain_profiles::workspace();
    let mut path = format!("profiles/{profile}.toml");
    if !edit.is_empty() {
        let mut text = std::fs::read_to_string(w.path().join(&path)).unwrap();
        for (from, to) in edit {
            assert!(text.contains(from), "{from:?} not in {path}");
            text = text.replace(from, to);
        }
        let name = format!("{profile}-variant");
        text = text.replace(
            &format!("name = \"{profile}\""),
            &format!("name = \"{name}\""),
        );
        path = format!("profiles/{name}.toml");
        write(&w.path().join(&path), text);
    }
    let root = crate::chain_profiles::build(w.path(), &path, "fw");
    let ruleset = root.join("etc/infrakit/firewall.nft");
    let n = Namespaces::new();
    n.load(&ruleset);
    let all: Vec<&str> = open
        .iter()
        .chain(open_to_client_only)
        .chain(closed)
        .copied()
        .collect();
    let _listener = KillOnDrop(n.serve_on_host(&all));
    let got = n.probe(&all);
    let mut wrong = Vec::new();
    for (job, got) in all.iter().zip(&got) {
        let answers = got.starts_with("open ");
        let want = open.contains(job) || open_to_client_only.contains(job);
        if answers != want || (!want && got != "timeout") {
            wrong.push(format!("{job} from {CLIENT}: {got}"));
        }
    }
    for (job, got) in open_to_client_only
        .iter()
        .zip(n.probe_from(OTHER, open_to_client_only))
    {
        if got != "timeout" {
            wrong.push(format!("{job} from {OTHER}: {got} (want timeout)"));
        }
    }
    assert!(wrong.is_empty(), "{profile}:\n{}", wrong.join("\n"));
}

const UNDECLARED: [&str; 2] = ["tcp/2222", "udp/2222"];

#[test]
fn monad_validator_opens_exactly_its_public_ports() {
    let mut closed = vec!["tcp/8080", "tcp/8081", "tcp/4317", "tcp/4318", "tcp/8889"];
    closed.extend(UNDECLARED);
    ports_as_declared(
        "monad-validator",
        &[],
        &["tcp/8000", "udp/8000", "udp/8001"],
        &[],
        &closed,
    );
    // RPC allow-listed to the client's address only.
    ports_as_declared(
        "monad-validator",
        &[(
            "[params]\n",
            "[params]\nrpc-exposure = \"allow-listed\"\nrpc-cidrs = [\"127.0.12.2/32\"]\n",
        )],
        &["tcp/8000"],
        &["tcp/8080", "tcp/8081"],
        &["tcp/4317", "tcp/2222"],
    );
}

#[test]
fn ethereum_validator_opens_exactly_its_public_ports() {
    let mut closed = vec![
        "tcp/8545",
        "tcp/8546",
        "tcp/8551",
        "tcp/5052",
        "tcp/5054",
        "tcp/5064",
        "tcp/18550",
        "tcp/6060",
        "udp/9200",
    ];
    closed.extend(UNDECLARED);
    ports_as_declared(
        "ethereum-validator",
        &[],
        &["tcp/30303", "udp/30303", "tcp/9000", "udp/9000", "udp/9001"],
        &[],
        &closed,
    );
    // reth opens its discv5 port 9200/udp; nimbus has no QUIC port.
    ports_as_declared(
        "ethereum-validator",
        &[
            ("execution-client = \"geth\"", "execution-client = \"reth\""),
            (
                "consensus-client = \"lighthouse\"",
                "consensus-client = \"nimbus\"",
            ),
            (
                "validator-client = \"lighthouse\"",
                "validator-client = \"nimbus\"",
            ),
        ],
        &["tcp/30303", "udp/30303", "udp/9200", "tcp/9000", "udp/9000"],
        &[],
        &["udp/9001", "tcp/8008", "tcp/8108", "tcp/8551", "tcp/2222"],
    );
}

#[test]
fn aztec_node_opens_exactly_its_p2p_port() {
    let mut closed = vec!["tcp/8080", "tcp/8880"];
    closed.extend(UNDECLARED);
    ports_as_declared("aztec-node", &[], &["tcp/40400", "udp/40400"], &[], &closed);
}
