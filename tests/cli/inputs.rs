//! Pinned upstream inputs: `inputs`, `lock` and `fetch` against a loopback
//! HTTP server this test starts (a small Python server with Range support
//! and fault injection), serving stand-in inputs built here with the stock
//! tools (`dpkg-deb` with xz and zstd data, GNU tar with gzip, xz and zstd,
//! a small executable), reached through `--mirror`. The members taken from
//! them (`inputs::take`) are judged against the files they were built from.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use infrakit::inputs::cache::Cache;
use infrakit::inputs::take::{Taken, take};
use infrakit::inputs::{decl, lock};

use crate::support::*;

const UPSTREAM: &str = "https://upstream.invalid/";

/// A loopback server: serves `dir`, logs every request (path and Range
/// header) to `requests.log` beside it, and injects the fault named for a
/// path in `faults.json` (`"500"`, or `"cut:N"`: send the headers of the
/// whole body, N bytes of it, then close).
const SERVER: &str = r#"
import http.server, json, os, sys
root, log, faults = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        rng = self.headers.get("Range")
        with open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "range": rng}) + "\n")
        try:
            fault = json.load(open(faults)).get(self.path)
        except FileNotFoundError:
            fault = None
        if fault == "500":
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = os.path.join(root, self.path.lstrip("/"))
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        start, status = 0, 200
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        self.end_headers()
        if fault and fault.startswith("cut:"):
            self.wfile.write(body[: int(fault[4:])])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

struct Upstream {
    child: Child,
    port: u16,
    /// What the server serves.
    dir: PathBuf,
    state: tempfile::TempDir,
}

impl Upstream {
    fn start() -> Upstream {
        require_tool("python3");
        let state = tempdir();
        let dir = state.path().join("www");
        fs::create_dir_all(&dir).expect("mkdir");
        let script = state.path().join("server.py");
        fs::write(&script, SERVER).expect("writing server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .arg(state.path().join("requests.log"))
            .arg(state.path().join("faults.json"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the server says its port");
        let port = line.trim().parse().expect("a port");
        Upstream {
            child,
            port,
            dir,
            state,
        }
    }

    /// `--mirror UPSTREAM=<this server>`.
    fn mirror(&self) -> String {
        format!("--mirror={UPSTREAM}=http://127.0.0.1:{}/", self.port)
    }

    fn serve(&self, name: &str, bytes: impl AsRef<[u8]>) {
        write(&self.dir.join(name), bytes);
    }

    fn fault(&self, path: &str, fault: Option<&str>) {
        let value = match fault {
            Some(f) => serde_json::json!({ format!("/{path}"): f }),
            None => serde_json::json!({}),
        };
        fs::write(self.state.path().join("faults.json"), value.to_string()).expect("faults");
    }

    /// Every request so far: (path, Range header).
    fn requests(&self) -> Vec<(String, Option<String>)> {
        let text = fs::read_to_string(self.state.path().join("requests.log")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("log JSON");
                (
                    v["path"].as_str().expect("path").to_owned(),
                    v["range"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stand-in upstream files: a tree packed every way.
struct Stand {
    /// The tree the archives were made from.
    src: PathBuf,
    _dir: tempfile::TempDir,
    /// File name → bytes, as served.
    files: Vec<(String, Vec<u8>)>,
}

/// A pseudo-random binary, big enough to be cut mid-way.
fn blob(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn build_stand_ins() -> Stand {
    for t in ["tar", "dpkg-deb", "xz", "zstd", "gzip"] {
        require_tool(t);
    }
    let dir = tempdir();
    let src = dir.path().join("src");
    write(&src.join("usr/local/bin/node"), blob(400_000, 1));
    chmod(&src.join("usr/local/bin/node"), 0o755);
    write(&src.join("usr/share/doc/node/README"), b"read me\n");
    symlink("node", &src.join("usr/local/bin/node-link"));
    let mut files = Vec::new();
    for (ext, flag) in [("gz", "-z"), ("xz", "-J"), ("zst", "--zstd")] {
        let name = format!("node-1.0.tar.{ext}");
        let out = dir.path().join(&name);
        tool(
            dir.path(),
            "tar",
            &["--sort=name", flag, "-cf", s(&out), "-C", s(&src), "."],
        )
        .ok();
        files.push((name, fs::read(&out).expect("tarball")));
    }
    let pkg = dir.path().join("pkg");
    tool(dir.path(), "cp", &["-a", s(&src), s(&pkg)]).ok();
    write(
        &pkg.join("DEBIAN/control"),
        "Package: node\nVersion: 1.0\nArchitecture: all\nMaintainer: T <t@example.org>\nDescription: stand-in\n",
    );
    // A maintainer script that must never run.
    write(
        &pkg.join("DEBIAN/postinst"),
        "#!/bin/sh\ntouch /tmp/infrakit-postinst-ran\n",
    );
    chmod(&pkg.join("DEBIAN/postinst"), 0o755);
    for comp in ["xz", "zstd"] {
        let name = format!("node_1.0_{comp}.deb");
        let out = dir.path().join(&name);
        tool(
            dir.path(),
            "dpkg-deb",
            &[
                "--root-owner-group",
                &format!("-Z{comp}"),
                "--build",
                s(&pkg),
                s(&out),
            ],
        )
        .ok();
        let listing = tool(dir.path(), "ar", &["t", s(&out)]).ok().stdout;
        let data = if comp == "xz" { "xz" } else { "zst" };
        assert!(listing.contains(&format!("data.tar.{data}")), "{listing}");
        files.push((name, fs::read(&out).expect("deb")));
    }
    files.push(("tool-1.0".into(), b"#!/bin/sh\necho tool\n".to_vec()));
    Stand {
        src,
        _dir: dir,
        files,
    }
}

/// The members every archive input takes.
const MEMBERS: &str = "[input.members]\n\
    \"usr/local/bin/node\" = { path = \"usr/bin/node\", mode = 0o755 }\n\
    \"./usr/share/doc/node/README\" = { path = \"usr/share/doc/node/README\", mode = 0o644 }\n";

fn archive_input(name: &str, kind: &str, file: &str) -> String {
    format!(
        "[[input]]\nname = \"{name}\"\nversion = \"1.0\"\nurl = \"{UPSTREAM}{file}\"\nkind = \"{kind}\"\n{MEMBERS}\n"
    )
}

fn file_input(name: &str, version: &str) -> String {
    format!(
        "[[input]]\nname = \"{name}\"\nversion = \"{version}\"\nurl = \"{UPSTREAM}tool-{{version}}\"\nkind = \"file\"\npath = \"usr/bin/tool\"\nmode = 0o755\n\n"
    )
}

/// A repo whose profile names the adapter `chain` with `adapter_toml`.
fn repo_with(adapter_toml: &str) -> Repo {
    repo_params(adapter_toml, "")
}

/// Like `repo_with`, with `params` (TOML lines) under the profile's `[params]`.
fn repo_params(adapter_toml: &str, params: &str) -> Repo {
    let repo = Repo::new();
    repo.overlay("base", "");
    repo.file(
        "adapters/chain/adapter.toml",
        format!("description = \"test chain\"\n\n{adapter_toml}"),
    );
    repo.profile(
        &["base"],
        &format!("adapters = [\"chain\"]\n[params]\n{params}"),
    );
    repo
}

fn every_input() -> String {
    let mut toml = String::new();
    toml.push_str(&archive_input("tgz", "tar", "node-1.0.tar.gz"));
    toml.push_str(&archive_input("txz", "tar", "node-1.0.tar.xz"));
    toml.push_str(&archive_input("tzst", "tar", "node-1.0.tar.zst"));
    toml.push_str(&archive_input("debxz", "deb", "node_1.0_xz.deb"));
    toml.push_str(&archive_input("debzst", "deb", "node_1.0_zstd.deb"));
    toml.push_str(&file_input("tool", "1.0"));
    toml
}

/// `infrakit ARGS` with the cache in `cache`.
fn run(repo: &Repo, cache: &Path, args: &[&str]) -> Run {
    infrakit_env(repo.path(), args, &[("XDG_CACHE_HOME", s(cache))])
}

fn cached_files(cache: &Path) -> Vec<String> {
    let dir = cache.join("infrakit/sha256");
    if dir.exists() {
        list_files(&dir)
    } else {
        Vec::new()
    }
}

fn partial_files(cache: &Path) -> Vec<String> {
    let dir = cache.join("infrakit/partial");
    if dir.exists() {
        list_files(&dir)
    } else {
        Vec::new()
    }
}

fn read_lock(repo: &Repo) -> toml::Table {
    let text = fs::read_to_string(repo.path().join("profiles/p.lock")).expect("a lock");
    text.parse().expect("lock TOML")
}

fn locked_sha(repo: &Repo, name: &str) -> String {
    let lock = read_lock(repo);
    lock["input"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{name} not locked"))["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned()
}

#[test]
fn lock_fetch_and_take_every_kind() {
    let stand = build_stand_ins();
    let server = Upstream::start();
    for (name, bytes) in &stand.files {
        server.serve(name, bytes);
    }
    let repo = repo_with(&every_input());
    let cache = tempdir();
    let mirror = server.mirror();

    // Before locking: listed, no digests.
    let listed = run(&repo, cache.path(), &["inputs", PROFILE, "--json"]).ok();
    let doc: serde_json::Value = serde_json::from_str(&listed.stdout).expect("JSON");
    let inputs = doc["inputs"].as_array().expect("inputs");
    assert_eq!(inputs.len(), 6);
    assert_eq!(inputs[0]["name"], "tgz");
    assert_eq!(inputs[0]["kind"], "tar");
    assert_eq!(inputs[0]["url"], format!("{UPSTREAM}node-1.0.tar.gz"));
    assert!(inputs[0]["sha256"].is_null());
    assert_eq!(
        inputs[0]["members"],
        serde_json::json!(["usr/local/bin/node", "usr/share/doc/node/README"])
    );
    assert_eq!(inputs[5]["url"], format!("{UPSTREAM}tool-1.0"));

    run(&repo, cache.path(), &["lock", PROFILE, &mirror]).ok();
    let lock_text = fs::read_to_string(repo.path().join("profiles/p.lock")).expect("lock");
    assert!(
        !lock_text.contains("127.0.0.1"),
        "a mirror in the lock: {lock_text}"
    );
    for (name, file) in [("tgz", "node-1.0.tar.gz"), ("debzst", "node_1.0_zstd.deb")] {
        let bytes = &stand.files.iter().find(|(n, _)| n == file).expect("file").1;
        assert_eq!(locked_sha(&repo, name), sha256_hex(bytes), "{name}");
    }
    let names: Vec<String> = read_lock(&repo)["input"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "the lock is sorted");

    // Listed with digests now.
    let listed = run(&repo, cache.path(), &["inputs", PROFILE, "--json"]).ok();
    let doc: serde_json::Value = serde_json::from_str(&listed.stdout).expect("JSON");
    assert_eq!(
        doc["inputs"][0]["sha256"].as_str(),
        Some(locked_sha(&repo, "tgz").as_str())
    );

    // A fetch from a fresh cache, --locked: everything downloaded and verified.
    let cache2 = tempdir();
    run(
        &repo,
        cache2.path(),
        &["fetch", PROFILE, "--locked", &mirror],
    )
    .ok();
    let mut want: Vec<String> = stand.files.iter().map(|(_, b)| sha256_hex(b)).collect();
    want.sort();
    assert_eq!(cached_files(cache2.path()), want);
    assert_eq!(partial_files(cache2.path()), Vec::<String>::new());
    // A second fetch downloads nothing.
    let before = server.requests().len();
    run(
        &repo,
        cache2.path(),
        &["fetch", PROFILE, "--locked", &mirror],
    )
    .ok();
    assert_eq!(server.requests().len(), before);

    // take(): exactly the declared members, with their modes and bytes.
    let profile =
        infrakit::compose::profile::Profile::load(&repo.path().join(PROFILE)).expect("profile");
    let declared = decl::read(&profile).expect("inputs");
    let locked = lock::Lock::read(&lock::path_for(&profile)).expect("lock");
    let store = Cache::new(cache2.path().join("infrakit"));
    let node = fs::read(stand.src.join("usr/local/bin/node")).expect("node");
    for input in &declared {
        let sha = locked.entries[&input.name].sha256;
        let taken = take(input, &sha, &store, "infrakit fetch").expect("take");
        let shown: Vec<(String, u32)> = taken
            .iter()
            .map(|t| (t.image_path.to_string(), t.mode))
            .collect();
        if input.name == "tool" {
            assert_eq!(shown, [("usr/bin/tool".to_owned(), 0o755)]);
            assert_eq!(
                fs::read(&taken[0].source).expect("tool"),
                b"#!/bin/sh\necho tool\n"
            );
            continue;
        }
        assert_eq!(
            shown,
            [
                ("usr/bin/node".to_owned(), 0o755),
                ("usr/share/doc/node/README".to_owned(), 0o644)
            ],
            "{}",
            input.name
        );
        assert!(taken.iter().all(|t: &Taken| t.input == input.name));
        assert_eq!(
            fs::read(&taken[0].source).expect("node"),
            node,
            "{}",
            input.name
        );
        assert_eq!(fs::read(&taken[1].source).expect("README"), b"read me\n");
        // Only the declared members were written.
        let extracted = store.extracted(&sha).join(&input.name);
        assert!(taken[0].source.starts_with(&extracted));
        let files: Vec<String> = list_files(&extracted)
            .into_iter()
            .filter(|p| extracted.join(p).is_file())
            .collect();
        assert_eq!(
            files,
            ["usr/local/bin/node", "usr/share/doc/node/README"],
            "{}",
            input.name
        );
    }
    assert!(
        !Path::new("/tmp/infrakit-postinst-ran").exists(),
        "a maintainer script ran"
    );
}

#[test]
fn take_refuses_links_missing_members_and_a_tampered_cache() {
    let stand = build_stand_ins();
    let server = Upstream::start();
    for (name, bytes) in &stand.files {
        server.serve(name, bytes);
    }
    let mut toml = String::new();
    for (name, kind, file) in [
        ("tzst", "tar", "node-1.0.tar.zst"),
        ("debxz", "deb", "node_1.0_xz.deb"),
    ] {
        toml.push_str(&archive_input(name, kind, file));
    }
    let repo = repo_with(&toml);
    let cache = tempdir();
    run(&repo, cache.path(), &["fetch", PROFILE, &server.mirror()]).ok();
    let profile =
        infrakit::compose::profile::Profile::load(&repo.path().join(PROFILE)).expect("profile");
    let declared = decl::read(&profile).expect("inputs");
    let locked = lock::Lock::read(&lock::path_for(&profile)).expect("lock");
    let store = Cache::new(cache.path().join("infrakit"));
    let path = |s: &str| infrakit::model::RelPath::new(s).expect("path");
    for input in &declared {
        let sha = locked.entries[&input.name].sha256;
        // A link declared as a file.
        let mut link = input.clone();
        link.members.insert(
            path("usr/local/bin/node-link"),
            decl::Target {
                path: path("usr/bin/node-link"),
                mode: 0o755,
            },
        );
        let err = take(&link, &sha, &store, "infrakit fetch").expect_err("a link");
        assert_eq!(err.exit_code(), 1);
        let msg = err.to_string();
        has(
            &msg,
            &[
                &input.name,
                "usr/local/bin/node-link is a link where a file is declared",
            ],
        );
        // A member the archive lacks.
        let mut missing = input.clone();
        missing.members.insert(
            path("usr/bin/absent"),
            decl::Target {
                path: path("usr/bin/absent"),
                mode: 0o755,
            },
        );
        let err = take(&missing, &sha, &store, "infrakit fetch").expect_err("missing");
        has(
            &err.to_string(),
            &["declared member usr/bin/absent is not in it"],
        );
        assert!(!store.extracted(&sha).exists(), "a refused take left files");
        // A directory declared as a file.
        let mut dir = input.clone();
        dir.members.insert(
            path("usr/share/doc/node"),
            decl::Target {
                path: path("usr/share/doc/node-dir"),
                mode: 0o644,
            },
        );
        let err = take(&dir, &sha, &store, "infrakit fetch").expect_err("a dir");
        has(
            &err.to_string(),
            &["is a directory where a file is declared"],
        );
    }

    // A tampered cached file: refused, both digests named, nothing extracted.
    let input = &declared[0];
    let sha = locked.entries[&input.name].sha256;
    let cached = store.file(&sha);
    let mut bytes = fs::read(&cached).expect("cached");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    chmod(&cached, 0o644);
    fs::write(&cached, &bytes).expect("tamper");
    let err = take(input, &sha, &store, "infrakit fetch").expect_err("tampered");
    assert_eq!(err.exit_code(), 1);
    has(
        &err.to_string(),
        &[&input.name, &sha.to_string(), &sha256_hex(&bytes)],
    );
    assert!(!store.extracted(&sha).exists());
    // `fetch` is the fix: it replaces the modified copy.
    let fixed = run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    )
    .ok();
    has(&fixed.stderr, &["the cached copy had been modified"]);
    assert_eq!(
        sha256_hex(&fs::read(&cached).expect("cached")),
        sha.to_string()
    );
    take(input, &sha, &store, "infrakit fetch").expect("take after the fix");
}

#[test]
fn a_digest_mismatch_is_refused_and_nothing_is_cached() {
    let server = Upstream::start();
    let good = blob(300_000, 7);
    server.serve("tool-1.0", &good);
    let repo = repo_with(&file_input("tool", "1.0"));
    let cache = tempdir();
    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).ok();
    let want = locked_sha(&repo, "tool");
    assert_eq!(want, sha256_hex(&good));

    // Upstream swaps the asset under the same URL and version.
    let evil = blob(300_000, 8);
    server.serve("tool-1.0", &evil);
    let fresh = tempdir();
    let out = run(
        &repo,
        fresh.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    );
    let out = out.expect_code(1);
    has(
        &out.stderr,
        &[
            "input tool",
            &want,
            &sha256_hex(&evil),
            "infrakit lock profiles/p.toml",
            "profiles/p.lock",
        ],
    );
    assert_eq!(cached_files(fresh.path()), Vec::<String>::new());
    assert_eq!(partial_files(fresh.path()), Vec::<String>::new());
    // The lock is untouched.
    assert_eq!(locked_sha(&repo, "tool"), want);
}

#[test]
fn a_cut_transfer_resumes_with_a_range_request() {
    let server = Upstream::start();
    let bytes = blob(2_000_000, 3);
    server.serve("tool-1.0", &bytes);
    let repo = repo_with(&file_input("tool", "1.0"));
    let lock_cache = tempdir();
    run(
        &repo,
        lock_cache.path(),
        &["lock", PROFILE, &server.mirror()],
    )
    .ok();
    let sha = sha256_hex(&bytes);

    let cache = tempdir();
    server.fault("tool-1.0", Some("cut:700000"));
    let cut = run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    );
    let cut = cut.expect_code(2);
    has(
        &cut.stderr,
        &["input tool", "after 700000", "resumes a locked input"],
    );
    // Nothing under the final name; the partial transfer is kept.
    assert_eq!(cached_files(cache.path()), Vec::<String>::new());
    let partial = cache.path().join(format!("infrakit/partial/{sha}.partial"));
    let kept = fs::read(&partial).expect("a kept partial file");
    assert_eq!(kept, bytes[..700_000]);

    server.fault("tool-1.0", None);
    run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    )
    .ok();
    assert_eq!(cached_files(cache.path()), [sha.as_str()]);
    assert_eq!(
        fs::read(cache.path().join(format!("infrakit/sha256/{sha}"))).expect("cached"),
        bytes
    );
    assert!(!partial.exists());
    let last = server.requests().pop().expect("a request");
    assert_eq!(
        last,
        ("/tool-1.0".to_owned(), Some("bytes=700000-".to_owned()))
    );
}

#[test]
fn server_errors_and_404_are_network_errors() {
    let server = Upstream::start();
    server.serve("tool-1.0", b"tool\n");
    let repo = repo_with(&file_input("tool", "1.0"));
    let cache = tempdir();
    server.fault("tool-1.0", Some("500"));
    let out = run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).expect_code(2);
    has(&out.stderr, &["input tool", "HTTP 500"]);
    assert!(!repo.path().join("profiles/p.lock").exists());
    server.fault("tool-1.0", None);
    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).ok();

    fs::remove_file(server.dir.join("tool-1.0")).expect("rm");
    let fresh = tempdir();
    let out = run(
        &repo,
        fresh.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    );
    let out = out.expect_code(2);
    has(&out.stderr, &["input tool", "not found (HTTP 404)"]);
    assert_eq!(cached_files(fresh.path()), Vec::<String>::new());
    assert_eq!(partial_files(fresh.path()), Vec::<String>::new());
}

#[test]
fn locked_refuses_a_missing_or_changed_entry() {
    let server = Upstream::start();
    server.serve("tool-1.0", b"one\n");
    server.serve("tool-2.0", b"two\n");
    let repo = repo_with(&file_input("tool", "1.0"));
    let cache = tempdir();
    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).ok();
    let lock_before = fs::read(repo.path().join("profiles/p.lock")).expect("lock");

    // A changed version.
    repo.file("adapters/chain/adapter.toml", file_input("tool", "2.0"));
    let out = run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    );
    let out = out.expect_code(1);
    has(
        &out.stderr,
        &[
            "input tool",
            "version 1.0 is now 2.0",
            "--locked",
            "infrakit lock profiles/p.toml",
        ],
    );
    // A missing entry.
    repo.file(
        "adapters/chain/adapter.toml",
        format!(
            "{}{}",
            file_input("tool", "1.0"),
            file_input("other", "2.0").replace("usr/bin/tool", "usr/bin/other")
        ),
    );
    let out = run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    );
    let out = out.expect_code(1);
    has(
        &out.stderr,
        &["input other", "it is not in profiles/p.lock", "--locked"],
    );
    assert_eq!(
        fs::read(repo.path().join("profiles/p.lock")).expect("lock"),
        lock_before,
        "--locked changed the lock"
    );
    // Without --locked, fetch locks the new input.
    run(&repo, cache.path(), &["fetch", PROFILE, &server.mirror()]).ok();
    assert_eq!(locked_sha(&repo, "other"), sha256_hex(b"two\n"));
}

#[test]
fn bad_declarations_are_refused_with_their_location() {
    let repo = repo_with(&format!("{}surprise = 1\n", file_input("tool", "1.0")));
    let cache = tempdir();
    let line = assert_refused(
        &run(&repo, cache.path(), &["inputs", PROFILE]),
        &repo.path().join("dist"),
    );
    has(
        &line,
        &[
            "adapters/chain/adapter.toml:11:1",
            "unknown field `surprise`",
        ],
    );
    let repo = repo_with(&format!(
        "{}{}",
        file_input("tool", "1.0"),
        file_input("tool", "1.0")
    ));
    let line = assert_refused(
        &run(&repo, cache.path(), &["lock", PROFILE]),
        &repo.path().join("dist"),
    );
    has(&line, &["input \"tool\" is already declared"]);
    let repo = repo_with(&file_input("tool", "1.0"));
    let line = assert_refused(
        &run(
            &repo,
            cache.path(),
            &["lock", PROFILE, "--mirror", "nonsense"],
        ),
        &repo.path().join("dist"),
    );
    has(&line, &["--mirror nonsense", "FROM=TO"]);
}

/// A GnuPG home with a fresh signing key: (home, fingerprint).
fn gpg_key(dir: &Path, name: &str) -> (PathBuf, String) {
    require_tool("gpg");
    let home = dir.join(format!("gnupg-{name}"));
    fs::create_dir_all(&home).expect("mkdir");
    chmod(&home, 0o700);
    let gpg = |args: &[&str]| {
        tool_with(dir, "gpg", args, |c| {
            c.env("GNUPGHOME", &home);
        })
    };
    gpg(&[
        "--batch",
        "--passphrase",
        "",
        "--quick-gen-key",
        &format!("{name} <{name}@example.org>"),
        "ed25519",
        "sign",
        "never",
    ])
    .ok();
    let listing = gpg(&["--with-colons", "--list-keys"]).ok().stdout;
    let fpr = listing
        .lines()
        .find(|l| l.starts_with("fpr:"))
        .and_then(|l| l.split(':').nth(9))
        .expect("a fingerprint")
        .to_owned();
    (home, fpr)
}

/// Stops the gpg-agent each GnuPG home started, when dropped.
struct Agents(Vec<PathBuf>);

impl Drop for Agents {
    fn drop(&mut self) {
        for home in &self.0 {
            let _ = Command::new("gpgconf")
                .args(["--kill", "all"])
                .env("GNUPGHOME", home)
                .status();
        }
    }
}

fn gpg_in(home: &Path, args: &[&str]) -> Run {
    tool_with(Path::new("/"), "gpg", args, |c| {
        c.env("GNUPGHOME", home);
    })
}

#[test]
fn lock_checks_upstream_openpgp_signatures_with_gpgv() {
    require_tool("gpgv");
    let keys = tempdir();
    let (home, fpr) = gpg_key(keys.path(), "upstream");
    let (other_home, _) = gpg_key(keys.path(), "mallory");
    let _agents = Agents(vec![home.clone(), other_home.clone()]);
    let server = Upstream::start();
    let asset = server.dir.join("tool-1.0");
    write(&asset, b"#!/bin/sh\necho signed\n");
    let sign = |home: &Path| {
        gpg_in(
            home,
            &[
                "--batch",
                "--yes",
                "--armor",
                "--detach-sign",
                "-o",
                s(&server.dir.join("tool-1.0.asc")),
                s(&asset),
            ],
        )
        .ok();
    };
    let toml = format!(
        "{}[input.signature]\nkind = \"openpgp\"\nurl = \"{UPSTREAM}tool-{{version}}.asc\"\nfingerprint = \"{fpr}\"\n",
        file_input("tool", "1.0")
    );
    let repo = repo_with(&toml);
    let cache = tempdir();

    // No key in adapters/chain/keys: a bad-input error naming where it goes.
    sign(&home);
    let out = run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).expect_code(2);
    has(&out.stderr, &["adapters/chain/keys", &format!("{fpr}.asc")]);

    let exported = gpg_in(&home, &["--armor", "--export", &fpr]).ok().stdout;
    repo.file(&format!("adapters/chain/keys/{fpr}.asc"), exported);

    // Signed by another key: refused, nothing locked, nothing cached.
    sign(&other_home);
    let out = run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).expect_code(1);
    has(
        &out.stderr,
        &["input tool", "not a good signature by", &fpr],
    );
    assert!(!repo.path().join("profiles/p.lock").exists());
    assert_eq!(cached_files(cache.path()), Vec::<String>::new());

    // Signed by upstream's key, but over other bytes: refused.
    let real = fs::read(&asset).expect("asset");
    sign(&home);
    write(&asset, b"#!/bin/sh\necho evil\n");
    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).expect_code(1);
    assert!(!repo.path().join("profiles/p.lock").exists());

    // The genuine asset and signature: locked.
    write(&asset, &real);
    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).ok();
    assert_eq!(locked_sha(&repo, "tool"), sha256_hex(&real));

    // --upstream-keys overrides the adapter's keys/.
    fs::remove_file(repo.path().join("profiles/p.lock")).expect("rm");
    let elsewhere = tempdir();
    let out = run(
        &repo,
        cache.path(),
        &[
            "lock",
            PROFILE,
            &server.mirror(),
            "--upstream-keys",
            s(elsewhere.path()),
        ],
    )
    .expect_code(2);
    has(&out.stderr, &[s(elsewhere.path())]);
}

#[test]
fn lock_checks_an_upstream_checksum_list() {
    let server = Upstream::start();
    let asset = b"#!/bin/sh\necho listed\n";
    server.serve("tool-1.0", asset);
    let toml = format!(
        "{}[input.signature]\nkind = \"checksums\"\nurl = \"{UPSTREAM}checksums.txt\"\n",
        file_input("tool", "1.0")
    );
    let repo = repo_with(&toml);
    let cache = tempdir();
    let wrong = sha256_hex(b"something else");
    server.serve(
        "checksums.txt",
        format!("{wrong}  tool-1.0\n{}  other\n", sha256_hex(b"x")),
    );
    let out = run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).expect_code(1);
    has(&out.stderr, &["input tool", &wrong, &sha256_hex(asset)]);
    assert!(!repo.path().join("profiles/p.lock").exists());
    server.serve(
        "checksums.txt",
        format!("{}  tool-1.0\n", sha256_hex(asset)),
    );
    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).ok();
    assert_eq!(locked_sha(&repo, "tool"), sha256_hex(asset));
}

#[test]
fn an_image_is_pinned_by_its_manifest_digest() {
    let server = Upstream::start();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    server.serve("v2/aztecprotocol/aztec/manifests/2.1.2", manifest);
    let toml = "[[input]]\nname = \"aztec\"\nversion = \"2.1.2\"\nurl = \"docker.io/aztecprotocol/aztec:{version}\"\nkind = \"image\"\n";
    let repo = repo_with(toml);
    let cache = tempdir();
    let mirror = format!(
        "--mirror=https://registry-1.docker.io/=http://127.0.0.1:{}/",
        server.port
    );
    run(&repo, cache.path(), &["lock", PROFILE, &mirror]).ok();
    assert_eq!(locked_sha(&repo, "aztec"), sha256_hex(manifest));
    let lock = read_lock(&repo);
    assert_eq!(
        lock["input"][0]["url"].as_str(),
        Some("docker.io/aztecprotocol/aztec:2.1.2")
    );
    // Nothing to download for an image.
    run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &mirror],
    )
    .ok();
    assert_eq!(cached_files(cache.path()), Vec::<String>::new());
}

/// Python's tarfile writes what GNU tar will not: members named `../x`
/// and `/x`, and a symlink to `/` followed by a member below it.
const HOSTILE_TAR: &str = r#"
import io, sys, tarfile
out, tag = sys.argv[1], sys.argv[2]
with tarfile.open(out, "w:gz") as t:
    def add(name, data=b"x\n", kind=tarfile.REGTYPE, target=""):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = 0o755
        if kind == tarfile.SYMTYPE:
            info.linkname = target
            t.addfile(info)
        else:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    add("../" + tag + "-dotdot")
    add("/tmp/" + tag + "-absolute")
    add("usr/lib", kind=tarfile.SYMTYPE, target="/tmp")
    add("usr/lib/" + tag + "-through-link", b"owned\n")
    add("usr/bin/ok", b"ok\n")
"#;

#[test]
fn take_never_writes_outside_its_directory() {
    let server = Upstream::start();
    let work = tempdir();
    let script = work.path().join("hostile.py");
    fs::write(&script, HOSTILE_TAR).expect("script");
    let tag = format!("infrakit-escape-{}", std::process::id());
    let tarball = server.dir.join("hostile-1.0.tar.gz");
    tool(work.path(), "python3", &[s(&script), s(&tarball), &tag]).ok();
    let toml = format!(
        "[[input]]\nname = \"hostile\"\nversion = \"1.0\"\nurl = \"{UPSTREAM}hostile-1.0.tar.gz\"\nkind = \"tar\"\n\
         [input.members]\n\"usr/bin/ok\" = {{ path = \"usr/bin/ok\", mode = 0o755 }}\n\
         \"usr/lib/{tag}-through-link\" = {{ path = \"usr/lib/x\", mode = 0o644 }}\n"
    );
    let repo = repo_with(&toml);
    let cache = tempdir();
    run(&repo, cache.path(), &["fetch", PROFILE, &server.mirror()]).ok();
    let profile =
        infrakit::compose::profile::Profile::load(&repo.path().join(PROFILE)).expect("profile");
    let declared = decl::read(&profile).expect("inputs");
    let locked = lock::Lock::read(&lock::path_for(&profile)).expect("lock");
    let store = Cache::new(cache.path().join("infrakit"));
    let sha = locked.entries["hostile"].sha256;
    let taken = take(&declared[0], &sha, &store, "infrakit fetch").expect("take");
    // The member below the symlinked directory is a plain file in a real
    // directory of the extraction, never written through the link.
    let through = store
        .extracted(&sha)
        .join("hostile")
        .join(format!("usr/lib/{tag}-through-link"));
    assert_eq!(taken[1].source, through);
    assert_eq!(fs::read(&through).expect("member"), b"owned\n");
    assert!(
        !fs::symlink_metadata(store.extracted(&sha).join("hostile/usr/lib"))
            .expect("usr/lib")
            .file_type()
            .is_symlink()
    );
    for outside in [
        PathBuf::from(format!("/tmp/{tag}-absolute")),
        PathBuf::from(format!("/tmp/{tag}-through-link")),
        store.extracted(&sha).join(format!("{tag}-dotdot")),
        store.root().join(format!("extracted/{tag}-dotdot")),
        store.root().join(format!("{tag}-dotdot")),
    ] {
        assert!(!outside.exists(), "{} was written", outside.display());
    }
    let files: Vec<String> = list_files(&store.extracted(&sha).join("hostile"))
        .into_iter()
        .filter(|p| store.extracted(&sha).join("hostile").join(p).is_file())
        .collect();
    assert_eq!(
        files,
        [
            "usr/bin/ok".to_owned(),
            format!("usr/lib/{tag}-through-link")
        ]
    );

    // A declared member that would climb out is refused where it is declared.
    let bad = toml.replace("\"usr/bin/ok\" = {", "\"../usr/bin/ok\" = {");
    repo.file("adapters/chain/adapter.toml", bad);
    let line = assert_refused(
        &run(&repo, cache.path(), &["inputs", PROFILE]),
        &repo.path().join("dist"),
    );
    has(
        &line,
        &["adapters/chain/adapter.toml:7:1", "`..` component"],
    );
}

#[test]
fn build_takes_locked_inputs_from_the_cache_or_the_command_line_only() {
    let stand = build_stand_ins();
    let server = Upstream::start();
    for (name, bytes) in &stand.files {
        server.serve(name, bytes);
    }
    // Two file inputs, of which the parameter picks one.
    let mut toml = String::from("[params.flavour]\ntype = \"string\"\ndefault = \"a\"\n\n");
    toml.push_str(&archive_input("debzst", "deb", "node_1.0_zstd.deb"));
    toml.push_str(&file_input("tool", "1.0").replace(
        "kind = \"file\"",
        "kind = \"file\"\nwhen = \"flavour == a\"",
    ));
    toml.push_str(
        &file_input("other", "1.0")
            .replace("usr/bin/tool", "usr/bin/other")
            .replace(
                "kind = \"file\"",
                "kind = \"file\"\nwhen = \"flavour == b\"",
            ),
    );
    let repo = repo_params(&toml, "");
    let cache = tempdir();
    let build = |out: &str, extra: &[&str]| {
        let mut args = vec!["build", PROFILE, "--out", out];
        args.extend_from_slice(extra);
        run(&repo, cache.path(), &args)
    };

    // Without a lock: refused, naming the command that fixes it.
    let refused = build("dist", &[]).expect_code(2);
    has(
        &refused.stderr,
        &["input debzst", "is not in", "p.lock", "infrakit lock"],
    );
    assert!(!repo.path().join("dist").exists());

    run(&repo, cache.path(), &["lock", PROFILE, &server.mirror()]).ok();
    // Not in the cache (lock downloads into it: start from an empty one):
    // refused, naming fetch.
    let fresh = tempdir();
    let refused = run(&repo, fresh.path(), &["build", PROFILE, "--out", "dist"]).expect_code(2);
    has(
        &refused.stderr,
        &["not in the cache", "infrakit fetch", "--locked"],
    );
    run(
        &repo,
        cache.path(),
        &["fetch", PROFILE, "--locked", &server.mirror()],
    )
    .ok();
    // The build itself never uses the network: stop the server first.
    drop(server);
    build("dist", &[]).ok();
    build("again", &[]).ok();
    let bytes = |d: &str| fs::read(repo.path().join(d).join("p.tar.zst")).expect("artifact");
    assert_eq!(
        bytes("dist"),
        bytes("again"),
        "the same inputs give the same bytes"
    );

    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(repo.path().join("dist/p.manifest.json")).expect("manifest"),
    )
    .expect("JSON");
    let inputs = manifest["inputs"].as_array().expect("inputs");
    let names: Vec<&str> = inputs.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["debzst", "tool"],
        "only the inputs whose `when` holds"
    );
    assert_eq!(inputs[0]["sha256"], locked_sha(&repo, "debzst"));
    assert_eq!(inputs[0]["url"], format!("{UPSTREAM}node_1.0_zstd.deb"));
    assert_eq!(inputs[0]["layer"], "chain");
    let entry = |path: &str| {
        manifest["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("{path} not in the manifest"))
            .clone()
    };
    assert_eq!(entry("usr/bin/node")["input"], "debzst");
    assert_eq!(entry("usr/bin/node")["mode"], "0755");
    assert_eq!(entry("usr/bin/tool")["input"], "tool");
    assert!(
        manifest["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["path"] != "usr/bin/other")
    );
    // GNU tar finds the upstream bytes under the declared path and mode.
    let out = repo.path().join("x");
    fs::create_dir_all(&out).unwrap();
    tool(
        repo.path(),
        "tar",
        &["--zstd", "-xf", "dist/p.tar.zst", "-C", s(&out)],
    )
    .ok();
    assert_eq!(
        fs::read(out.join("usr/bin/node")).unwrap(),
        fs::read(stand.src.join("usr/local/bin/node")).unwrap()
    );
    assert_eq!(mode(&out.join("usr/bin/node")), 0o755);

    // A tampered cache file is refused with both digests.
    let sha = locked_sha(&repo, "tool");
    let cached = cache.path().join("infrakit/sha256").join(&sha);
    chmod(&cached, 0o644);
    write(&cached, "#!/bin/sh\necho evil\n");
    let refused = build("tampered", &[]).expect_code(1);
    has(
        &refused.stderr,
        &["input tool", &sha, "the cache was modified"],
    );
    assert!(!repo.path().join("tampered").exists());

    // --input: the locked file from elsewhere, checked, into a fresh cache;
    // the wrong file is refused.
    fs::remove_file(&cached).unwrap();
    let wrong = repo.path().join("wrong-tool");
    write(&wrong, "not the tool\n");
    let arg = format!("tool={}", wrong.display());
    let refused = build("wrong", &["--input", &arg]).expect_code(1);
    has(&refused.stderr, &["input tool", "the lock says", &sha]);
    let right = repo.path().join("right-tool");
    let tool_bytes = &stand.files.iter().find(|(n, _)| n == "tool-1.0").unwrap().1;
    write(&right, tool_bytes);
    let arg = format!("tool={}", right.display());
    build("given", &["--input", &arg]).ok();
    assert_eq!(bytes("given"), bytes("dist"));
}
