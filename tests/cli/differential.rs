//! What `verify` accepts is what every extractor extracts. A corpus of
//! hostile artifacts, each crafted from a genuine release by
//! tests/cli/craft.py and validly signed by the trusted key, goes through
//! `infrakit verify`: each must be refused (exit 1), or GNU tar, bsdtar and
//! Python's tarfile must all list exactly the members infrakit verified
//! (type, name, link target, size, mode, owner), in order. The cases other
//! readers really do read differently are shown to be so, so it is their
//! refusal that keeps the property; `apply` refuses the smuggling ones with
//! the root byte-for-byte unchanged and nothing written outside it.

// Test helpers fail loudly: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::support::*;

/// What must become of a crafted case.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// Verified, and listed alike by every tool.
    Accepted,
    /// Exit 1 with `needle` in the message. `elsewhere`: some stock tool
    /// lists it other than the manifest says (or fails on it), so accepting
    /// it would make "verified" false for that tool's users.
    Refused {
        needle: &'static str,
        elsewhere: bool,
    },
}

use Verdict::Accepted;

/// Refused: a shape infrakit's writer never makes.
const fn refused(needle: &'static str) -> Verdict {
    Verdict::Refused {
        needle,
        elsewhere: false,
    }
}

/// Refused, and read differently by some stock tool.
const fn read_differently(needle: &'static str) -> Verdict {
    Verdict::Refused {
        needle,
        elsewhere: true,
    }
}

/// Every case of tests/cli/craft.py and its verdict.
const CASES: &[(&str, Verdict)] = &[
    // Controls: the genuine tar, compressed by other means.
    ("identity", Accepted),
    ("identity-gz", Accepted),
    ("identity-zstd-19", Accepted),
    // The four shapes of issue 9.
    (
        "pax-and-long-name",
        read_differently("PAX extended header ('x') is never produced"),
    ),
    (
        "symlink-with-data",
        read_differently("etc/app/current.conf: a symlink with 1024 bytes of data"),
    ),
    (
        "non-utf8-name",
        read_differently(r"etc/app/a.con\xff: expected etc/app/a.con"),
    ),
    (
        "gzip-second-member",
        read_differently("data after the end of the gzip member"),
    ),
    (
        "gzip-trailing-bytes",
        read_differently("data after the end of the gzip member"),
    ),
    // Other compressed shapes.
    (
        "gzip-file-name",
        refused("gzip header is not the one infrakit writes"),
    ),
    (
        "gzip-extra-field",
        refused("gzip header is not the one infrakit writes"),
    ),
    (
        "gzip-os-byte",
        refused("gzip header is not the one infrakit writes"),
    ),
    (
        "zstd-skippable-after",
        refused("data after the end of the zstd frame"),
    ),
    (
        "zstd-skippable-before",
        refused("does not start with a zstd frame"),
    ),
    (
        "zstd-two-frames",
        refused("data after the end of the zstd frame"),
    ),
    // Headers other writers make.
    (
        "dir-with-data",
        read_differently("etc/app/: a directory with 1024 bytes of data"),
    ),
    (
        "pax-global-header",
        read_differently("PAX global header ('g') is never produced"),
    ),
    (
        "pax-path",
        read_differently("PAX extended header ('x') is never produced"),
    ),
    (
        "pax-mtime",
        refused("PAX extended header ('x') is never produced"),
    ),
    (
        "ustar-prefix",
        refused("header records (regular file ('0')) where infrakit writes (GNU long name"),
    ),
    (
        "long-name-for-short-name",
        refused("etc/app/a.conf: header records (GNU long name ('L'), regular file ('0'))"),
    ),
    (
        "base256-mtime",
        refused("etc/app/a.conf: its mtime field is not"),
    ),
    (
        "base256-size",
        refused("etc/app/a.conf: its size field is not"),
    ),
    (
        "old-regular-type",
        refused("old-style regular file ('\\0') is never produced"),
    ),
    (
        "sparse",
        read_differently("GNU sparse file ('S') is never produced"),
    ),
    (
        "foreign-encoder",
        refused("etc/: its checksum field is not"),
    ),
    (
        "terminal-escape-name",
        read_differently(r"etc/app/\u{1b}]0;owned\u{7}a.conf: expected etc/app/a.conf here"),
    ),
    (
        "file-trailing-slash",
        read_differently("etc/app/a.conf/: expected etc/app/a.conf here"),
    ),
    (
        "symlink-target-nul",
        read_differently("symlink target \"a.conf\\0/../../x\" is empty or holds a NUL byte"),
    ),
    (
        "trailing-zero-blocks",
        refused("data after the end of the archive"),
    ),
    ("missing-end", refused("end-of-archive blocks are missing")),
    // Members aimed outside the release or at something else.
    (
        "absolute",
        read_differently("/etc/app/a.conf: expected etc/app/a.conf here"),
    ),
    (
        "dotdot",
        read_differently("etc/app/../app/a.conf: expected etc/app/a.conf here"),
    ),
    ("through-symlink", refused("zz/evil: lies under zz")),
    (
        "hardlink",
        read_differently("hard link ('1') is never produced"),
    ),
    (
        "device",
        read_differently("character device ('3') is never produced"),
    ),
    ("fifo", read_differently("fifo ('6') is never produced")),
    ("setuid", read_differently("mode/owner 4755 0:0")),
    (
        "duplicate",
        read_differently("etc/app/a.conf: expected etc/app/café.conf here"),
    ),
    ("size", read_differently("size 6, the manifest says 7")),
    ("digest", refused("content is 6 bytes with sha256")),
    (
        "extra",
        read_differently("zz: extra member not in the manifest"),
    ),
    ("truncated", read_differently("the archive is truncated")),
    ("trailing", refused("data after the end of the archive")),
];

/// A genuine release (1.0.0, both formats) of a tree with every header
/// shape infrakit writes: names and link targets at and over 100 bytes
/// (GNU `L` and `K` records), a space and a non-ASCII name, a setuid-free
/// executable; and the trusted key pair.
struct Corpus {
    repo: Repo,
    secret: PathBuf,
    keyring: PathBuf,
    zst: PathBuf,
    gz: PathBuf,
}

const UNIT: &str = "[Unit]\nDescription=app\n\n[Service]\nUser=app\nExecStart=/usr/bin/app-tool\n";

impl Corpus {
    fn new() -> Corpus {
        let repo = Repo::new();
        let (secret, public) = keypair(repo.path(), "release");
        let keyring = repo.path().join("keyring");
        fs::create_dir_all(&keyring).unwrap();
        fs::copy(&public, keyring.join("release.pub")).unwrap();
        let name_100 = format!("opt/b/{}", "f".repeat(94));
        let dir_99 = format!("opt/c/{}", "g".repeat(93));
        let dir_100 = format!("opt/d/{}", "h".repeat(94));
        let target_100 = format!("/{}", "t".repeat(99));
        let long_file = format!("opt/app/{}/{}/file", "d".repeat(60), "e".repeat(50));
        assert_eq!((name_100.len(), dir_99.len() + 1), (100, 100));
        assert_eq!((dir_100.len() + 1, target_100.len()), (101, 100));
        repo.overlay(
            "app",
            &format!(
                "[[attr]]\npath = \"usr/bin/app-tool\"\nmode = 0o755\n\n\
                 [[symlink]]\npath = \"etc/app/current.conf\"\ntarget = \"a.conf\"\n\n\
                 [[symlink]]\npath = \"etc/app/far\"\ntarget = \"{LONG_TARGET}\"\n\n\
                 [[symlink]]\npath = \"etc/app/edge\"\ntarget = \"{target_100}\"\n\n\
                 [[dir]]\npath = \"{dir_99}\"\n\n[[dir]]\npath = \"{dir_100}\"\n"
            ),
        );
        repo.root_file("app", "etc/app/a.conf", "a = 1\n");
        repo.root_file("app", "etc/app/old.conf", "old = yes\n");
        repo.root_file("app", "etc/app/with space.conf", "space = yes\n");
        repo.root_file("app", "etc/app/café.conf", "utf8 = yes\n");
        repo.root_file("app", "etc/systemd/system/app.service", UNIT);
        repo.root_file("app", "usr/bin/app-tool", vec![0x7f; 4096]);
        repo.root_file("app", &long_file, "long\n");
        repo.root_file("app", &name_100, "exactly 100\n");
        repo.profile(&["app"], "");
        let build = |format: &str| {
            let args = ["build", PROFILE, "--out", format, "--format", format];
            let sign = ["--sign-key", s(&secret)];
            infrakit(repo.path(), &[&args[..], &sign].concat()).ok();
            repo.path().join(format).join(format!("p.{format}"))
        };
        let zst = build("tar.zst");
        let gz = build("tar.gz");
        Corpus {
            repo,
            secret,
            keyring,
            zst,
            gz,
        }
    }

    fn dir(&self) -> &Path {
        self.repo.path()
    }

    fn verify(&self, artifact: &Path) -> Run {
        let key = self.keyring.join("release.pub");
        infrakit(self.dir(), &["verify", s(artifact), "--key", s(&key)])
    }

    fn apply(&self, artifact: &Path, root: &Path) -> Run {
        let args = ["apply", s(artifact), "--root", s(root)];
        infrakit(
            self.dir(),
            &[&args[..], &["--keyring", s(&self.keyring)]].concat(),
        )
    }
}

/// One member as a listing shows it: type letter (`-`, `d`, `l`, `h`...),
/// name (a directory's without its `/`), link target, size, permission
/// bits, uid, gid.
type Member = (char, String, String, u64, u32, u64, u64);

/// What one tool listed, and its complaints (exit code, stderr, lines it
/// did not understand).
struct Listed {
    tool: &'static str,
    members: Vec<Member>,
    trouble: String,
}

impl Listed {
    fn agrees(&self, want: &[Member]) -> bool {
        self.trouble.is_empty() && self.members == want
    }

    fn report(&self, want: &[Member]) -> String {
        let extra: Vec<_> = self.members.iter().filter(|m| !want.contains(m)).collect();
        let missing: Vec<_> = want.iter().filter(|m| !self.members.contains(m)).collect();
        format!(
            "{}: lists {:?} beyond the manifest, lacks {missing:?}; {}",
            self.tool, extra, self.trouble
        )
    }
}

/// The members the manifest beside `artifact` lists: what infrakit verifies.
fn manifest_members(artifact: &Path) -> Vec<Member> {
    let name = artifact.file_name().unwrap().to_str().unwrap();
    let stem = name.split_once(".tar.").unwrap().0;
    let path = artifact.with_file_name(format!("{stem}.manifest.json"));
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_owned();
    manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = match e["type"].as_str().unwrap() {
                "dir" => 'd',
                "file" => '-',
                _ => 'l',
            };
            (
                kind,
                text(e, "path"),
                text(e, "target"),
                e["size"].as_u64().unwrap_or(0),
                u32::from_str_radix(e["mode"].as_str().unwrap(), 8).unwrap(),
                e["uid"].as_u64().unwrap(),
                e["gid"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Permission bits from `ls -l` letters (`rwsr-x--T`...), after the type.
fn mode_of(perms: &str) -> Option<u32> {
    let c: Vec<char> = perms.chars().skip(1).collect();
    if c.len() != 9 {
        return None;
    }
    let mut mode = 0;
    for (at, special) in [(0, 0o4000), (3, 0o2000), (6, 0o1000)] {
        let shift = 6 - at;
        mode |=
            (u32::from(c[at] == 'r') << (shift + 2)) | (u32::from(c[at + 1] == 'w') << (shift + 1));
        mode |= match c[at + 2] {
            'x' => 1 << shift,
            's' | 't' => (1 << shift) | special,
            'S' | 'T' => special,
            '-' => 0,
            _ => return None,
        };
    }
    Some(mode)
}

/// The first `n` whitespace-separated fields of `line` and the rest.
fn fields(line: &str, n: usize) -> (Vec<&str>, &str) {
    let mut rest = line;
    let mut out = Vec::new();
    for _ in 0..n {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    (out, rest.trim_start())
}

/// One `-tv` line of GNU tar or bsdtar: `fields` fields before the name,
/// with the permissions, uid, gid and size at the given positions.
fn parse_line(line: &str, n: usize, [uid, gid, size]: [usize; 3]) -> Option<Member> {
    let (f, rest) = fields(line, n);
    let kind = f.first()?.chars().next()?;
    let (name, target) = match kind {
        'l' => rest.split_once(" -> ")?,
        'h' => rest.split_once(" link to ")?,
        _ => (rest, ""),
    };
    let (uid, gid) = if uid == gid {
        f.get(uid)?.split_once('/')?
    } else {
        (*f.get(uid)?, *f.get(gid)?)
    };
    let name = if kind == 'd' {
        name.strip_suffix('/').unwrap_or(name)
    } else {
        name
    };
    Some((
        kind,
        name.to_owned(),
        target.to_owned(),
        f.get(size)?.parse().ok()?,
        mode_of(f.first()?)?,
        uid.parse().ok()?,
        gid.parse().ok()?,
    ))
}

/// A `-tv` listing by `program`, parsed line by line.
fn ls_listing(
    tool: &'static str,
    artifact: &Path,
    args: &[&str],
    parse: impl Fn(&str) -> Option<Member>,
) -> Listed {
    let mut all = args.to_vec();
    all.push(s(artifact));
    let run = tool_with(artifact.parent().unwrap(), tool, &all, |cmd| {
        cmd.env("LC_ALL", "C.UTF-8").env("TZ", "UTC");
    });
    let mut trouble = String::new();
    if run.code != 0 || !run.stderr.is_empty() {
        trouble = format!("exit {}: {}", run.code, run.stderr.trim_end());
    }
    let mut members = Vec::new();
    for line in run.stdout.lines() {
        match parse(line) {
            Some(m) => members.push(m),
            None => trouble.push_str(&format!(" unparsed line {line:?}")),
        }
    }
    Listed {
        tool,
        members,
        trouble,
    }
}

/// Python's tarfile (zstd archives through stock `zstd -d`).
const LIST_PY: &str = r#"
import io, json, subprocess, sys, tarfile
path = sys.argv[1]
if path.endswith(".zst"):
    data = subprocess.run(["zstd", "-q", "-d", "-c", path], stdout=subprocess.PIPE, check=True).stdout
    archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
else:
    archive = tarfile.open(path, mode="r:gz")
def text(s):
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
kinds = {tarfile.REGTYPE: "-", tarfile.AREGTYPE: "-", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l",
         tarfile.LNKTYPE: "h", tarfile.CHRTYPE: "c", tarfile.BLKTYPE: "b", tarfile.FIFOTYPE: "p"}
print(json.dumps([[kinds.get(m.type, "?"), text(m.name), text(m.linkname), m.size, m.mode,
                   m.uid, m.gid] for m in archive]))
"#;

fn python_listing(artifact: &Path) -> Listed {
    let dir = artifact.parent().unwrap();
    let script = dir.join("list.py");
    fs::write(&script, LIST_PY).unwrap();
    let run = tool(dir, "python3", &[s(&script), s(artifact)]);
    let mut trouble = String::new();
    if run.code != 0 || !run.stderr.is_empty() {
        trouble = format!("exit {}: {}", run.code, run.stderr.trim_end());
    }
    let members = serde_json::from_str::<Vec<(String, String, String, u64, u32, u64, u64)>>(
        run.stdout.trim(),
    )
    .map(|all| {
        all.into_iter()
            .map(|(k, n, t, size, mode, uid, gid)| {
                (k.chars().next().unwrap_or('?'), n, t, size, mode, uid, gid)
            })
            .collect()
    })
    .unwrap_or_default();
    Listed {
        tool: "python3 tarfile",
        members,
        trouble,
    }
}

/// The artifact as GNU tar, bsdtar and Python's tarfile list it.
fn listings(artifact: &Path) -> [Listed; 3] {
    let gnu = ["--numeric-owner", "--quoting-style=literal", "-tvf"];
    // GNU: perms uid/gid size date time name; bsdtar: perms links uid gid
    // size month day year|time name.
    [
        ls_listing("tar", artifact, &gnu, |l| parse_line(l, 5, [1, 1, 2])),
        ls_listing("bsdtar", artifact, &["-tvf"], |l| {
            parse_line(l, 8, [2, 3, 4])
        }),
        python_listing(artifact),
    ]
}

/// The tools that do not list `artifact` as exactly its manifest's members.
fn disagreeing(artifact: &Path) -> Vec<String> {
    let want = manifest_members(artifact);
    listings(artifact)
        .iter()
        .filter(|l| !l.agrees(&want))
        .map(|l| l.report(&want))
        .collect()
}

/// Crafts `case` from the genuine tar.zst as release 1.5.0, signed.
fn craft_case(c: &Corpus, case: &str, smuggle: Option<&str>) -> PathBuf {
    let tag = if smuggle.is_some() { "apply-" } else { "" };
    let out = c.dir().join(format!("{tag}{case}"));
    craft(case, &c.zst, &out, "1.5.0", &c.secret, smuggle)
}

#[test]
fn verify_accepts_only_archives_gnu_tar_bsdtar_and_python_list_as_verified() {
    let c = Corpus::new();
    // The corpus covers every case the crafter knows.
    let script = c.dir().join("craft-list.py");
    fs::write(&script, include_str!("craft.py")).unwrap();
    let code = "import importlib.util as u, sys; s = u.spec_from_file_location('c', sys.argv[1]); \
                m = u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(m.CASES))";
    let known = tool(c.dir(), "python3", &["-c", code, s(&script)])
        .ok()
        .stdout;
    let listed: BTreeSet<&str> = CASES.iter().map(|(name, _)| *name).collect();
    assert_eq!(known.split_whitespace().collect::<BTreeSet<_>>(), listed);
    assert_eq!(listed.len(), CASES.len(), "a case listed twice");

    // Genuine artifacts, as `infrakit build` writes them: accepted, and
    // every tool lists exactly the manifest.
    for genuine in [&c.zst, &c.gz] {
        c.verify(genuine).ok();
        assert_eq!(disagreeing(genuine), Vec::<String>::new(), "{genuine:?}");
    }

    let mut failures = Vec::new();
    for &(case, verdict) in CASES {
        let artifact = craft_case(&c, case, None);
        let run = c.verify(&artifact);
        let out = format!("{}{}", run.stdout, run.stderr);
        if out.contains("panicked") || out.contains("signature") {
            failures.push(format!("{case}: {out}"));
        }
        // The property: refused with exit 1, or listed alike everywhere.
        match run.code {
            0 => failures.extend(
                disagreeing(&artifact)
                    .iter()
                    .map(|d| format!("{case}: {d}")),
            ),
            1 => {}
            code => failures.push(format!("{case}: exit {code}: {out}")),
        }
        // The verdict.
        match verdict {
            Accepted if run.code != 0 => failures.push(format!("{case}: refused: {out}")),
            Verdict::Refused { needle, elsewhere } => {
                if run.code != 1 || !run.stderr.contains(needle) {
                    failures.push(format!("{case}: want exit 1 with {needle:?}: {out}"));
                }
                // The attack is real: refusing it is what keeps the property.
                if elsewhere && disagreeing(&artifact).is_empty() {
                    failures.push(format!("{case}: every tool lists the manifest"));
                }
            }
            Accepted => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn apply_refuses_smuggling_archives_and_leaves_root_and_surroundings_untouched() {
    let c = Corpus::new();
    let root = c.dir().join("root");
    write(&root.join("etc/hostname"), "host-1\n");
    c.apply(&c.zst, &root).ok();
    // Where the smuggled member aims: outside the root, by absolute path.
    let outside = c.dir().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let smuggle = outside.join("smuggled");
    for case in [
        "pax-and-long-name",
        "symlink-with-data",
        "dir-with-data",
        "gzip-second-member",
        "non-utf8-name",
    ] {
        let artifact = craft_case(&c, case, Some(s(&smuggle)));
        if case != "non-utf8-name" {
            // Another extractor would write it.
            let lists_it = listings(&artifact).iter().any(|l| {
                l.members
                    .iter()
                    .any(|m| m.1.trim_start_matches('/') == s(&smuggle).trim_start_matches('/'))
            });
            assert!(lists_it, "{case}: no tool sees the smuggled member");
        }
        let root_before = snapshot(&root);
        let all_before = snapshot(c.dir());
        let run = c.apply(&artifact, &root).expect_code(1);
        has(&run.stderr, &["verification failed", s(&artifact)]);
        assert!(!run.stderr.contains("panicked"), "{case}: {}", run.stderr);
        assert_eq!(snapshot(&root), root_before, "{case}: the root changed");
        assert_eq!(snapshot(c.dir()), all_before, "{case}: something changed");
        assert!(!smuggle.exists(), "{case}");
    }
    infrakit(Path::new("/"), &["status", "--root", s(&root)]).ok();
}
