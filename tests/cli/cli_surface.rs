//! The command line as a whole (issue 9, "One CLI"): shell completions and
//! man pages generated from the clap definitions and judged by the real
//! shells, groff and man; `diff` between two real builds, judged by Python's
//! tarfile; the `--json` envelope of every command on success and failure,
//! with the exit code of the same run without `--json`; `-q` and dry-run
//! plans; a build asked to sign that cannot; URLs for `verify`, `inspect`
//! and `diff` from a loopback server; a renamed artifact; `inspect` reading
//! the archive itself; and the keyring's rules (no key file others can
//! write, no symlink to one, no two keys under one key id).

// Test helpers fail loudly: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

/// Two signed releases of profile `p` and a keyring with their key. From
/// 1.0.0 to 2.0.0 one file's content, one's mode, one's owner and one
/// link's target change, a file is removed, and a layer with a directory
/// and a file is added.
struct Two {
    repo: Repo,
    secret: PathBuf,
    public: PathBuf,
    keyring: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

impl Two {
    fn new() -> Two {
        let repo = Repo::new();
        let (secret, public) = keypair(repo.path(), "release");
        let keyring = repo.path().join("keyring");
        fs::create_dir_all(&keyring).unwrap();
        fs::copy(&public, keyring.join("release.pub")).unwrap();
        repo.root_file("base", "etc/motd", "hello\n");
        repo.root_file("base", "etc/gone.conf", "old\n");
        repo.overlay(
            "app",
            "[[attr]]\npath = \"usr/bin/tool\"\nmode = 0o755\n\n\
             [[symlink]]\npath = \"etc/app/current\"\ntarget = \"a.conf\"\n",
        );
        repo.root_file("app", "etc/app/a.conf", "a = 1\n");
        repo.root_file("app", "etc/app/b.conf", "b\n");
        repo.root_file("app", "usr/bin/tool", "#!/bin/sh\n");
        repo.profile(&["base", "app"], "");
        let v1 = Two::build(&repo, &secret, "d1", "1.0.0");
        repo.root_file("app", "etc/app/a.conf", "a = 2\n");
        repo.overlay(
            "app",
            "[[attr]]\npath = \"usr/bin/tool\"\nmode = 0o750\n\n\
             [[attr]]\npath = \"etc/app/b.conf\"\nuid = 990\ngid = 990\n\n\
             [[symlink]]\npath = \"etc/app/current\"\ntarget = \"b.conf\"\n",
        );
        fs::remove_file(repo.path().join("overlays/base/root/etc/gone.conf")).unwrap();
        repo.root_file("extra", "etc/extra/new.conf", "new\n");
        repo.profile(&["base", "app", "extra"], "");
        let v2 = Two::build(&repo, &secret, "d2", "2.0.0");
        Two {
            repo,
            secret,
            public,
            keyring,
            v1,
            v2,
        }
    }

    fn build(repo: &Repo, secret: &Path, out: &str, version: &str) -> PathBuf {
        let args = [
            "build",
            PROFILE,
            "--out",
            out,
            "--sign-key",
            s(secret),
            "--release-version",
            version,
        ];
        infrakit(repo.path(), &args).ok();
        repo.path().join(out).join("p.tar.zst")
    }

    fn dir(&self) -> &Path {
        self.repo.path()
    }

    /// An empty directory to apply to.
    fn root(&self, name: &str) -> PathBuf {
        let root = self.dir().join(name);
        fs::create_dir_all(&root).unwrap();
        root
    }

    /// `infrakit ARGS` in the repo.
    fn run(&self, args: &[&str]) -> Run {
        infrakit(self.dir(), args)
    }
}

/// Copies the artifact, its manifest and signature into `dir` as `name`.
fn copy_release(from: &Path, dir: &Path, name: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let src = from.parent().unwrap();
    for (have, want) in [
        ("p.tar.zst", format!("{name}.tar.zst")),
        ("p.tar.zst.minisig", format!("{name}.tar.zst.minisig")),
        ("p.manifest.json", format!("{name}.manifest.json")),
    ] {
        fs::copy(src.join(have), dir.join(want)).unwrap();
    }
    dir.join(format!("{name}.tar.zst"))
}

fn parse(run: &Run) -> Value {
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "one JSON document on one line: {run:?}"
    );
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"))
}

/// Runs `args` without and with `--json`: both must exit `code`, the plain
/// run with one `infrakit: error: ` message on stderr and no JSON, the
/// `--json` run with the same stderr and the envelope on stdout, whose
/// error is that message, `code` and `kind`. Returns the envelope.
fn fails_alike(t: &Two, args: &[&str], command: &str, code: i32, kind: &str) -> Value {
    let plain = t.run(args);
    let mut with = args.to_vec();
    with.push("--json");
    let json = t.run(&with);
    assert_eq!(plain.code, code, "{args:?}: {plain:?}");
    assert_eq!(json.code, code, "{with:?}: {json:?}");
    assert!(!plain.stdout.starts_with('{'), "{plain:?}");
    assert!(plain.stderr.starts_with("infrakit: error: "), "{plain:?}");
    assert_eq!(json.stderr, plain.stderr, "{with:?}");
    let doc = parse(&json);
    assert_eq!(doc["schema"], 1, "{doc}");
    assert_eq!(doc["command"], command, "{doc}");
    assert_eq!(doc["ok"], false, "{doc}");
    assert_eq!(doc["error"]["exit_code"], code, "{doc}");
    assert_eq!(doc["error"]["kind"], kind, "{doc}");
    let message = plain.stderr.trim_end().strip_prefix("infrakit: error: ");
    assert_eq!(doc["error"]["message"].as_str(), message, "{doc}");
    doc
}

/// Runs `args` with `--json`, which must succeed with `ok: true`.
fn succeeds_json(t: &Two, args: &[&str], command: &str) -> Value {
    let mut with = args.to_vec();
    with.push("--json");
    let doc = parse(&t.run(&with).ok());
    assert_eq!(
        (&doc["schema"], &doc["command"], &doc["ok"]),
        (&Value::from(1), &Value::from(command), &Value::from(true)),
        "{doc}"
    );
    assert!(doc.get("error").is_none(), "{doc}");
    doc
}

// ---------------------------------------------------------------------------
// Completions and man pages, generated from the clap definitions.
// ---------------------------------------------------------------------------

/// The subcommands `infrakit --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let help = infrakit(Path::new("/"), &["--help"]).ok().stdout;
    let list = help.split("Commands:\n").nth(1).unwrap();
    let names: Vec<String> = list
        .lines()
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .filter(|n| n != "help")
        .collect();
    for want in ["verify", "apply", "inspect", "diff", "completions", "man"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    names
}

#[test]
fn bash_completions_load_and_complete_subcommands_and_flags() {
    let dir = tempdir();
    let script = infrakit(dir.path(), &["completions", "bash"]).ok().stdout;
    let file = dir.path().join("infrakit.bash");
    write(&file, &script);
    tool(dir.path(), "bash", &["-n", s(&file)]).ok();
    // Sourced, it registers a completion function; called as bash would,
    // it completes subcommand names and each subcommand's flags.
    let probe = "source \"$1\"\ncomplete -p infrakit\n\
                 COMP_WORDS=(infrakit ''); COMP_CWORD=1; _infrakit infrakit '' infrakit; echo \"words: ${COMPREPLY[*]}\"\n\
                 COMP_WORDS=(infrakit verify --ke); COMP_CWORD=2; _infrakit infrakit --ke verify; echo \"verify: ${COMPREPLY[*]}\"\n\
                 COMP_WORDS=(infrakit completions ''); COMP_CWORD=2; _infrakit infrakit '' completions; echo \"shells: ${COMPREPLY[*]}\"\n";
    let run = tool(dir.path(), "bash", &["-c", probe, "bash", s(&file)]).ok();
    let line = |p: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap_or_else(|| panic!("no {p} in {}", run.stdout))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(
        run.stdout.starts_with("complete ") && run.stdout.contains("-F _infrakit infrakit"),
        "{}",
        run.stdout
    );
    let words = line("words: ");
    for sub in subcommands() {
        assert!(words.contains(&sub), "{sub} not completed: {words:?}");
    }
    assert_eq!(line("verify: "), ["--key", "--keyring"]);
    let shells = line("shells: ");
    let shells: Vec<&str> = shells
        .iter()
        .map(String::as_str)
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(shells, ["bash", "zsh", "fish"]);
}

#[test]
fn zsh_and_fish_completions_are_valid_scripts_of_their_shells() {
    let dir = tempdir();
    let zsh = infrakit(dir.path(), &["completions", "zsh"]).ok().stdout;
    assert!(zsh.starts_with("#compdef infrakit\n"), "{zsh}");
    let file = dir.path().join("_infrakit");
    write(&file, &zsh);
    tool(dir.path(), "zsh", &["-n", s(&file)]).ok();
    let fish = infrakit(dir.path(), &["completions", "fish"]).ok().stdout;
    let file = dir.path().join("infrakit.fish");
    write(&file, &fish);
    tool(dir.path(), "fish", &["--no-execute", s(&file)]).ok();
    // fish itself completes from the script.
    let probe = "source $argv[1]; complete -C 'infrakit ver'; complete -C 'infrakit diff --k'";
    let run = tool(dir.path(), "fish", &["-c", probe, s(&file)]).ok();
    let words: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(words, ["verify", "--key", "--keyring"], "{}", run.stdout);
    // An unknown shell is a usage error.
    let run = infrakit(dir.path(), &["completions", "tcsh"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.starts_with("infrakit: error: "), "{run:?}");
}

#[test]
fn man_pages_are_written_for_every_subcommand_and_render_without_warnings() {
    let dir = tempdir();
    let out = dir.path().join("share/man/man1");
    infrakit(dir.path(), &["-q", "man", "--out", s(&out)]).ok();
    let mut want: Vec<String> = subcommands()
        .iter()
        .map(|c| format!("infrakit-{c}.1"))
        .collect();
    want.push("infrakit.1".to_owned());
    want.sort();
    assert_eq!(list_files(&out), want);
    for page in &want {
        let path = out.join(page);
        assert_eq!(mode(&path), 0o644, "{page}");
        // groff with every warning on: nothing to say.
        let run = tool(
            dir.path(),
            "groff",
            &["-man", "-Tutf8", "-ww", "-z", s(&path)],
        )
        .ok();
        assert_eq!(run.stderr, "", "{page}");
        // man renders it, without warnings, with its own name and options.
        let run = tool_with(
            dir.path(),
            "man",
            &["--warnings", "-E", "UTF-8", "-l", s(&path)],
            |c| {
                c.env("MANWIDTH", "100").env("PAGER", "cat");
            },
        )
        .ok();
        assert_eq!(run.stderr, "", "{page}");
        let name = page.trim_end_matches(".1");
        let words: Vec<&str> = run.stdout.split_whitespace().collect();
        assert!(
            words.windows(2).any(|w| w == [name, "-"]),
            "{page}: {}",
            run.stdout
        );
    }
    let man = |page: &str| {
        tool_with(dir.path(), "man", &["-l", s(&out.join(page))], |c| {
            c.env("MANWIDTH", "200").env("PAGER", "cat");
        })
        .ok()
        .stdout
    };
    has(
        &man("infrakit-verify.1"),
        &["--keyring <DIR>", "--key <PUB>", "--json"],
    );
    has(&man("infrakit.1"), &["infrakit-diff(1)", "infrakit-man(1)"]);
}

// ---------------------------------------------------------------------------
// diff between two real builds.
// ---------------------------------------------------------------------------

/// Python's tarfile (on tars that stock zstd decompressed) says what
/// changed from one artifact to the other: added, removed, and per path
/// which of type, content, mode, owner, target differ.
fn tarfile_diff(dir: &Path, a: &Path, b: &Path) -> Value {
    let tars: Vec<PathBuf> = [a, b]
        .iter()
        .enumerate()
        .map(|(i, art)| {
            let tar = dir.join(format!("oracle-{i}.tar"));
            tool(dir, "zstd", &["-q", "-f", "-d", s(art), "-o", s(&tar)]).ok();
            tar
        })
        .collect();
    let py = "import hashlib, json, sys, tarfile\n\
              def load(p):\n\
              \x20   out = {}\n\
              \x20   with tarfile.open(p) as t:\n\
              \x20       for m in t.getmembers():\n\
              \x20           typ = 'dir' if m.isdir() else 'symlink' if m.issym() else 'file'\n\
              \x20           data = hashlib.sha256(t.extractfile(m).read()).hexdigest() if m.isfile() else None\n\
              \x20           out[m.name] = dict(type=typ, content=data, mode=m.mode, owner=[m.uid, m.gid], target=m.linkname if m.issym() else None)\n\
              \x20   return out\n\
              a, b = load(sys.argv[1]), load(sys.argv[2])\n\
              fields = ('type', 'content', 'mode', 'owner', 'target')\n\
              changed = {p: [f for f in fields if a[p][f] != b[p][f]] for p in sorted(a.keys() & b.keys())}\n\
              print(json.dumps({'added': sorted(b.keys() - a.keys()), 'removed': sorted(a.keys() - b.keys()),\n\
              \x20                 'changed': {p: f for p, f in changed.items() if f}}))\n";
    let run = tool(
        dir,
        "/usr/bin/python3",
        &["-c", py, s(&tars[0]), s(&tars[1])],
    )
    .ok();
    serde_json::from_str(&run.stdout).unwrap()
}

#[test]
fn diff_of_two_builds_agrees_with_tarfile_in_json_and_in_words() {
    let t = Two::new();
    let oracle = tarfile_diff(t.dir(), &t.v1, &t.v2);
    let doc = succeeds_json(&t, &["diff", s(&t.v1), s(&t.v2)], "diff");
    let paths = |v: &Value| -> Vec<String> {
        let mut p: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect();
        p.sort();
        p
    };
    let e = &doc["entries"];
    assert_eq!(Value::from(paths(&e["added"])), oracle["added"], "{doc}");
    assert_eq!(
        Value::from(paths(&e["removed"])),
        oracle["removed"],
        "{doc}"
    );
    let changed: serde_json::Map<String, Value> = e["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap().to_owned(), c["fields"].clone()))
        .collect();
    assert_eq!(Value::Object(changed.clone()), oracle["changed"], "{doc}");
    // The fixture exercises every kind of change.
    let fields = |p: &str| changed[p].clone();
    assert_eq!(fields("etc/app/a.conf"), serde_json::json!(["content"]));
    assert_eq!(fields("usr/bin/tool"), serde_json::json!(["mode"]));
    assert_eq!(fields("etc/app/b.conf"), serde_json::json!(["owner"]));
    assert_eq!(fields("etc/app/current"), serde_json::json!(["target"]));
    assert_eq!(
        oracle["added"],
        serde_json::json!(["etc/extra", "etc/extra/new.conf"])
    );
    assert_eq!(oracle["removed"], serde_json::json!(["etc/gone.conf"]));
    // Versions, artifact and inputs, layers.
    assert_eq!(doc["version"]["a"], "1.0.0");
    assert_eq!(doc["version"]["b"], "2.0.0");
    assert_eq!(doc["version"]["changed"], true);
    assert_eq!(doc["name"]["changed"], false);
    assert_eq!(doc["profile_sha256"]["changed"], true);
    assert_eq!(doc["source_date_epoch"]["changed"], false);
    let m2: Value =
        serde_json::from_slice(&fs::read(t.dir().join("d2/p.manifest.json")).unwrap()).unwrap();
    assert_eq!(doc["artifact"]["b"], m2["archive"]);
    let extra = doc["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "extra")
        .unwrap();
    assert_eq!((&extra["a"], &extra["b"]), (&Value::Null, &Value::from(2)));
    assert_eq!(doc["a"]["path"], s(&t.v1));
    assert_eq!(doc["a"]["verified"], false);

    // In words: one line per entry.
    let run = t.run(&["diff", s(&t.v1), s(&t.v2)]).ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    for want in [
        "release:   p 1.0.0 -> p 2.0.0",
        "entries:   2 added, 1 removed, 4 changed",
        "layer:     extra: absent -> 2 entries",
        "  - etc/gone.conf  file 0644 0:0 4 bytes",
        "  + etc/extra/new.conf  file 0644 0:0 4 bytes",
        "  ~ usr/bin/tool  mode 0755 -> 0750",
        "  ~ etc/app/b.conf  owner 0:0 -> 990:990",
        "  ~ etc/app/current  target a.conf -> b.conf",
    ] {
        assert!(lines.contains(&want), "{want:?} in:\n{}", run.stdout);
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  ~ etc/app/a.conf  content 6 bytes sha256 ")),
        "{}",
        run.stdout
    );
    let inputs = format!(
        "inputs:    profile sha256 {} -> {}; source date {} (same)",
        doc["profile_sha256"]["a"].as_str().unwrap(),
        doc["profile_sha256"]["b"].as_str().unwrap(),
        doc["source_date_epoch"]["a"]
    );
    assert!(
        lines.contains(&inputs.as_str()),
        "{inputs:?} in:\n{}",
        run.stdout
    );
    // -q does not hide what diff is run to show.
    assert_eq!(
        t.run(&["-q", "diff", s(&t.v1), s(&t.v2)]).ok().stdout,
        run.stdout
    );

    // The manifests alone say the same; with the keyring both sides are
    // verified first.
    let m = |v: &Path| v.with_file_name("p.manifest.json");
    let by_manifest = succeeds_json(&t, &["diff", s(&m(&t.v1)), s(&m(&t.v2))], "diff");
    assert_eq!(by_manifest["entries"], doc["entries"]);
    let keyring = s(&t.keyring);
    let verified = succeeds_json(
        &t,
        &["diff", s(&t.v1), s(&t.v2), "--keyring", keyring],
        "diff",
    );
    assert_eq!(verified["entries"], doc["entries"]);
    assert_eq!(verified["b"]["verified"], true);
    let key_id = verified["b"]["key_id"].as_str().unwrap().to_owned();
    let run = t
        .run(&["diff", s(&t.v1), s(&t.v2), "--keyring", keyring])
        .ok();
    has(&run.stdout, &[&format!("(signed by key {key_id})")]);
    // A manifest has no signature to check: asking is a usage error.
    let doc = fails_alike(
        &t,
        &["diff", s(&m(&t.v1)), s(&t.v2), "--keyring", keyring],
        "diff",
        2,
        "input",
    );
    has(
        doc["error"]["message"].as_str().unwrap(),
        &["carries no signature"],
    );
    // An artifact beside another release's manifest is refused, not diffed.
    let swapped = t.dir().join("swapped");
    copy_release(&t.v2, &swapped, "p");
    fs::copy(&t.v1, swapped.join("p.tar.zst")).unwrap();
    let doc = fails_alike(
        &t,
        &["diff", s(&t.v1), s(&swapped.join("p.tar.zst"))],
        "diff",
        1,
        "check",
    );
    has(
        doc["error"]["message"].as_str().unwrap(),
        &["swapped/p.tar.zst", "do not belong together"],
    );
}

// ---------------------------------------------------------------------------
// --json on every command, on success and failure; -q.
// ---------------------------------------------------------------------------

#[test]
fn every_json_command_prints_the_envelope_and_fails_with_the_plain_exit_code() {
    let t = Two::new();
    let keyring = s(&t.keyring);
    let (v1, v2) = (s(&t.v1), s(&t.v2));
    // A tampered copy and a keyring without the key.
    let bad = copy_release(&t.v2, &t.dir().join("bad"), "p");
    let mut bytes = fs::read(&bad).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x10;
    fs::write(&bad, bytes).unwrap();
    let (_, stranger) = keypair(t.dir(), "stranger");
    let other_ring = t.dir().join("other-ring");
    fs::create_dir_all(&other_ring).unwrap();
    fs::copy(&stranger, other_ring.join("stranger.pub")).unwrap();
    let other = s(&other_ring);

    // verify
    let doc = succeeds_json(&t, &["verify", v2, "--keyring", keyring], "verify");
    assert_eq!(doc["version"], "2.0.0");
    assert_eq!(doc["artifact"], v2);
    let public = fs::read_to_string(&t.public).unwrap();
    assert!(
        public.contains(doc["key_id"].as_str().unwrap()),
        "{doc} {public}"
    );
    fails_alike(
        &t,
        &["verify", s(&bad), "--keyring", keyring],
        "verify",
        1,
        "check",
    );
    fails_alike(
        &t,
        &["verify", v2, "--keyring", other],
        "verify",
        1,
        "check",
    );
    fails_alike(
        &t,
        &["verify", "nope.tar.zst", "--key", s(&t.public)],
        "verify",
        2,
        "io",
    );
    fails_alike(
        &t,
        &["verify", v2, "--keyring", "no-such-dir"],
        "verify",
        2,
        "input",
    );
    // A command line clap refuses, with --json: the same envelope.
    let doc = fails_alike(&t, &["verify", v2, "--bogus"], "verify", 2, "usage");
    has(doc["error"]["message"].as_str().unwrap(), &["--bogus"]);

    // apply, its dry run, rollback
    let root = t.root("root");
    let root_s = s(&root);
    fn apply_args<'a>(
        artifact: &'a str,
        root: &'a str,
        ring: &'a str,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec!["apply", artifact, "--root", root, "--keyring", ring];
        args.extend_from_slice(extra);
        args
    }
    let apply = |artifact, extra| apply_args(artifact, root_s, keyring, extra);
    let doc = succeeds_json(&t, &apply(v1, &["--dry-run"]), "apply");
    assert_eq!(doc["action"], "dry-run");
    assert!(
        doc["plan"]["added"]
            .as_array()
            .unwrap()
            .contains(&Value::from("etc/motd")),
        "{doc}"
    );
    assert_eq!(list_files(&root), Vec::<String>::new(), "a dry run wrote");
    fails_alike(&t, &apply(s(&bad), &[]), "apply", 1, "check");
    fails_alike(&t, &apply(s(&bad), &["--dry-run"]), "apply", 1, "check");
    let mut no_ring = apply(v1, &[]);
    no_ring[5] = "no-such-dir";
    fails_alike(&t, &no_ring, "apply", 2, "input");
    assert_eq!(list_files(&root), Vec::<String>::new(), "a refusal wrote");
    fails_alike(
        &t,
        &["rollback", "--root", root_s, "--keyring", keyring],
        "rollback",
        1,
        "refused",
    );
    let doc = succeeds_json(&t, &apply(v1, &[]), "apply");
    assert_eq!(doc["action"], "activated");
    assert_eq!(
        doc["release"].as_str().unwrap().split('-').nth(1),
        Some("1.0.0")
    );
    assert_eq!(doc["artifact"], v1);
    assert_eq!(doc["root"], root_s);
    let doc = succeeds_json(&t, &apply(v1, &[]), "apply");
    assert_eq!(doc["action"], "already-active");
    let doc = succeeds_json(&t, &apply(v2, &[]), "apply");
    assert!(
        doc["from"].as_str().unwrap().starts_with("p-1.0.0-"),
        "{doc}"
    );
    fails_alike(&t, &apply(v1, &[]), "apply", 1, "refused");
    let doc = succeeds_json(
        &t,
        &[
            "rollback",
            "--root",
            root_s,
            "--keyring",
            keyring,
            "--dry-run",
        ],
        "rollback",
    );
    assert_eq!(doc["action"], "dry-run");
    let doc = succeeds_json(
        &t,
        &["rollback", "--root", root_s, "--keyring", keyring],
        "rollback",
    );
    assert_eq!(doc["action"], "activated");
    fails_alike(
        &t,
        &["rollback", "--root", root_s, "--keyring", keyring],
        "rollback",
        1,
        "refused",
    );

    // status: clean, then drifted (written through a link of the release).
    let doc = succeeds_json(&t, &["status", "--root", root_s], "status");
    assert_eq!(doc["release"]["version"], "1.0.0");
    fs::write(root.join("etc/motd"), "edited\n").unwrap();
    let doc = fails_alike(&t, &["status", "--root", root_s], "status", 1, "unhealthy");
    assert_eq!(doc["drift"][0]["path"], "etc/motd", "{doc}");

    // lint: clean, with findings (which the failure still carries), missing.
    let doc = succeeds_json(&t, &["lint", PROFILE], "lint");
    assert_eq!(doc["findings"], Value::Array(Vec::new()));
    let dirty = Repo::new();
    dirty.root_file("a", "etc/node/jwt.hex", "x\n");
    dirty.profile(&["a"], "");
    let profile = dirty.path().join(PROFILE);
    let doc = fails_alike(&t, &["lint", s(&profile)], "lint", 1, "lint");
    assert_eq!(doc["findings"][0]["path"], "etc/node/jwt.hex", "{doc}");
    fails_alike(&t, &["lint", "profiles/nope.toml"], "lint", 2, "io");

    // inspect
    let doc = succeeds_json(&t, &["inspect", v2], "inspect");
    assert_eq!(doc["manifest"]["version"], "2.0.0");
    fails_alike(&t, &["inspect", "nope.tar.zst"], "inspect", 2, "io");
    fails_alike(
        &t,
        &["inspect", s(&bad), "--keyring", keyring],
        "inspect",
        1,
        "check",
    );

    // diff
    fails_alike(&t, &["diff", v1, "nope.manifest.json"], "diff", 2, "io");
}

#[test]
fn quiet_hides_confirmations_but_never_a_dry_run_plan_or_a_report() {
    let t = Two::new();
    let root = t.root("root");
    let keyring = s(&t.keyring);
    let apply = |quiet: bool, artifact: &Path, extra: &[&str]| {
        let mut args = vec![];
        if quiet {
            args.push("-q");
        }
        args.extend([
            "apply",
            s(artifact),
            "--root",
            s(&root),
            "--keyring",
            keyring,
        ]);
        args.extend_from_slice(extra);
        t.run(&args).ok()
    };
    // The dry run's plan is what was asked for: -q prints it all the same.
    let loud = apply(false, &t.v1, &["--dry-run"]);
    has(
        &loud.stdout,
        &["dry run: would activate p-1.0.0-", "  add     etc/motd"],
    );
    assert_eq!(apply(true, &t.v1, &["--dry-run"]).stdout, loud.stdout);
    // -q after the subcommand means the same.
    let mut args = vec!["apply", s(&t.v1), "--root", s(&root), "--keyring", keyring];
    args.extend(["--dry-run", "--quiet"]);
    assert_eq!(t.run(&args).ok().stdout, loud.stdout);
    // A real apply's summary only confirms: -q hides it.
    assert_eq!(apply(true, &t.v1, &[]).stdout, "");
    apply(false, &t.v2, &[]);
    let rollback = |quiet: bool| {
        let mut args = if quiet { vec!["-q"] } else { vec![] };
        args.extend([
            "rollback",
            "--root",
            s(&root),
            "--keyring",
            s(&t.keyring),
            "--dry-run",
        ]);
        t.run(&args).ok().stdout
    };
    let loud = rollback(false);
    has(
        &loud,
        &[
            "dry run: would activate p-1.0.0-",
            "  remove  etc/extra/new.conf",
        ],
    );
    assert_eq!(rollback(true), loud);
    // status's report and inspect's listing are what they are run to show.
    let status = |q: &[&str]| {
        let mut args = q.to_vec();
        args.extend(["status", "--root", s(&root)]);
        t.run(&args).ok().stdout
    };
    assert_eq!(status(&["-q"]), status(&[]));
    has(&status(&["-q"]), &["active: p 2.0.0"]);
    let inspect = t.run(&["inspect", s(&t.v2)]).ok().stdout;
    assert_eq!(t.run(&["-q", "inspect", s(&t.v2)]).ok().stdout, inspect);
    // verify's and build's confirmations go; --json stays.
    let verify = ["verify", s(&t.v2), "--keyring", keyring];
    has(&t.run(&verify).ok().stdout, &["verified p 2.0.0"]);
    let mut quiet = vec!["-q"];
    quiet.extend(verify);
    assert_eq!(t.run(&quiet).ok().stdout, "");
    quiet.push("--json");
    assert_eq!(parse(&t.run(&quiet).ok())["ok"], true);
}

// ---------------------------------------------------------------------------
// A build asked to sign that cannot.
// ---------------------------------------------------------------------------

#[test]
fn a_build_asked_to_sign_that_cannot_fails_and_leaves_no_artifact() {
    let t = Two::new();
    let build = ["build", PROFILE, "--out", "dist"];
    // Set but empty: an error, not an unsigned artifact.
    let line = refuse(t.dir(), &build, &[("INFRAKIT_SIGN_KEY", "")]);
    has(
        &line,
        &[
            "infrakit: error: INFRAKIT_SIGN_KEY: is set but empty",
            "unset it",
        ],
    );
    // A key that cannot be read, or a password file variable set but empty.
    let line = refuse(t.dir(), &build, &[("INFRAKIT_SIGN_KEY", "missing.key")]);
    has(&line, &["infrakit: error: missing.key: reading secret key"]);
    let env = [
        ("INFRAKIT_SIGN_KEY", s(&t.secret)),
        ("INFRAKIT_PASSWORD_FILE", ""),
    ];
    let line = refuse(t.dir(), &build, &env);
    has(&line, &["INFRAKIT_PASSWORD_FILE: is set but empty"]);
    // --sign-key wins over the variable.
    let mut args = build.to_vec();
    args.extend(["--sign-key", s(&t.secret)]);
    infrakit_env(t.dir(), &args, &[("INFRAKIT_SIGN_KEY", "")]).ok();
    assert!(t.dir().join("dist/p.tar.zst.minisig").exists());
    // Unset: an unsigned build, with the warning.
    fs::remove_dir_all(t.dir().join("dist")).unwrap();
    let run = t.run(&build).ok();
    assert!(
        run.stderr.starts_with("infrakit: warning: ") && run.stderr.contains("UNSIGNED"),
        "{run:?}"
    );
    assert!(!t.dir().join("dist/p.tar.zst.minisig").exists());
}

// ---------------------------------------------------------------------------
// URLs, renamed artifacts, inspect reading the archive.
// ---------------------------------------------------------------------------

#[test]
fn verify_inspect_and_diff_take_urls_and_errors_name_the_url() {
    let t = Two::new();
    let keyring = s(&t.keyring);
    let server = Server::start(t.v2.parent().unwrap());
    let url = server.url("p.tar.zst");
    let doc = succeeds_json(&t, &["verify", &url, "--keyring", keyring], "verify");
    assert_eq!(
        (&doc["artifact"], &doc["version"]),
        (&Value::from(url.as_str()), &Value::from("2.0.0"))
    );
    let run = t.run(&["inspect", &url]).ok();
    has(
        &run.stdout,
        &[
            "version:     2.0.0",
            &format!("file:        {url}: "),
            "as the manifest says",
        ],
    );
    let run = t.run(&["inspect", &url, "--keyring", keyring]).ok();
    has(&run.stdout, &["signature:   verified: signed by key "]);
    let manifest_url = server.url("p.manifest.json");
    let doc = succeeds_json(&t, &["inspect", &manifest_url], "inspect");
    assert_eq!(doc["source"], "manifest");
    let doc = succeeds_json(&t, &["diff", s(&t.v1), &url], "diff");
    assert_eq!(doc["b"]["path"], url);
    assert_eq!(doc["version"]["b"], "2.0.0");

    // Broken releases on a server: errors name the URLs, never the
    // temporary copies, and exit as they do for local files.
    let served = t.dir().join("served");
    let bad = copy_release(&t.v2, &served, "p");
    let mut bytes = fs::read(&bad).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&bad, bytes).unwrap();
    copy_release(&t.v2, &served, "q");
    fs::remove_file(served.join("q.manifest.json")).unwrap();
    copy_release(&t.v2, &served, "r");
    let server = Server::start(&served);
    let cases: [(&str, &[&str], &str); 4] = [
        ("p.tar.zst", &["signature does not match"], "p.tar.zst"),
        (
            "q.tar.zst",
            &["no manifest found", "renamed"],
            "q.manifest.json",
        ),
        (
            "r.tar.zst",
            &["renamed", "signed name", "p.tar.zst"],
            "r.tar.zst",
        ),
        ("s.tar.zst", &["404", "check the URL"], "s.tar.zst"),
    ];
    for (file, needles, names) in cases {
        let url = server.url(file);
        let code = if file == "s.tar.zst" { 2 } else { 1 };
        for cmd in [
            vec!["verify", url.as_str(), "--keyring", keyring],
            vec!["inspect", url.as_str(), "--keyring", keyring],
        ] {
            let kind = if code == 2 { "input" } else { "check" };
            let doc = fails_alike(&t, &cmd, cmd[0], code, kind);
            let message = doc["error"]["message"].as_str().unwrap();
            has(message, needles);
            has(message, &[&server.url(names)]);
            assert!(!message.contains("infrakit-fetch"), "{message}");
            assert!(!message.contains("/tmp/"), "{message}");
        }
    }
}

#[test]
fn verify_refuses_a_renamed_artifact_with_the_exit_code_of_apply() {
    let t = Two::new();
    let keyring = s(&t.keyring);
    // Renamed with its signature and manifest; renamed alone.
    let renamed = copy_release(&t.v2, &t.dir().join("renamed"), "q");
    let alone = copy_release(&t.v2, &t.dir().join("alone"), "q");
    fs::remove_file(t.dir().join("alone/q.manifest.json")).unwrap();
    for (artifact, needles) in [
        (&renamed, &["q.tar.zst", "renamed", "p.tar.zst"][..]),
        (&alone, &["no manifest found", "renamed"][..]),
    ] {
        let verify = t
            .run(&["verify", s(artifact), "--keyring", keyring])
            .expect_code(1);
        has(&verify.stderr, needles);
        let root = t.root("r");
        let apply = t
            .run(&[
                "apply",
                s(artifact),
                "--root",
                s(&root),
                "--keyring",
                keyring,
            ])
            .expect_code(1);
        has(&apply.stderr, needles);
        assert_eq!(list_files(&root), Vec::<String>::new());
    }
    // The same bytes under the signed name pass.
    t.run(&[
        "verify",
        s(&copy_release(&t.v2, &t.dir().join("back"), "p")),
        "--keyring",
        keyring,
    ])
    .ok();
}

#[test]
fn inspect_reads_the_archive_not_only_the_manifest_beside_it() {
    let t = Two::new();
    // An artifact alone: its members come from the archive, as GNU tar lists them.
    let bare = t.dir().join("bare");
    fs::create_dir_all(&bare).unwrap();
    fs::copy(&t.v2, bare.join("p.tar.zst")).unwrap();
    let artifact = bare.join("p.tar.zst");
    let listed = tool(t.dir(), "tar", &["--zstd", "-tf", s(&artifact)])
        .ok()
        .stdout;
    let want: Vec<String> = listed
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    let doc = succeeds_json(&t, &["inspect", s(&artifact)], "inspect");
    assert_eq!(doc["manifest"], Value::Null);
    assert_eq!(doc["artifact"]["matches_manifest"], Value::Null);
    let got: Vec<String> = doc["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, want);
    let size = fs::metadata(&artifact).unwrap().len();
    assert_eq!(doc["artifact"]["size"], size);
    assert_eq!(
        doc["artifact"]["sha256"],
        sha256_hex(&fs::read(&artifact).unwrap())
    );
    let run = t.run(&["inspect", s(&artifact)]).ok();
    has(
        &run.stdout,
        &[
            "manifest:    none beside the artifact",
            &format!("entries:     {}", want.len()),
        ],
    );
    // Another release's artifact beside this manifest: inspect says so,
    // member by member, instead of showing the manifest as if it were true.
    let swapped = t.dir().join("swapped");
    copy_release(&t.v2, &swapped, "p");
    fs::copy(&t.v1, swapped.join("p.tar.zst")).unwrap();
    let artifact = swapped.join("p.tar.zst");
    let doc = succeeds_json(&t, &["inspect", s(&artifact)], "inspect");
    assert_eq!(doc["artifact"]["matches_manifest"], false);
    let member = |p: &str| {
        doc["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["path"] == p)
            .unwrap_or_else(|| panic!("{p} in {doc}"))
            .clone()
    };
    assert_eq!(member("etc/app/a.conf")["matches_manifest"], false);
    assert_eq!(member("etc/gone.conf")["layer"], Value::Null);
    assert_eq!(member("etc/motd")["matches_manifest"], true);
    assert_eq!(
        doc["missing_from_archive"],
        serde_json::json!(["etc/extra", "etc/extra/new.conf"])
    );
    let run = t.run(&["inspect", s(&artifact)]).ok();
    has(
        &run.stdout,
        &[
            "the manifest says otherwise, so they do not belong together",
            "etc/app/a.conf  [app; DIFFERS from the manifest]",
            "etc/gone.conf  [NOT in the manifest]",
            "missing:     etc/extra/new.conf (in the manifest, not in the archive)",
        ],
    );
    // With a key, inspect verifies first: the swap is refused.
    let run = t
        .run(&["inspect", s(&artifact), "--key", s(&t.public)])
        .expect_code(1);
    has(&run.stderr, &["verification failed"]);
}

// ---------------------------------------------------------------------------
// The keyring.
// ---------------------------------------------------------------------------

/// Runs apply, verify and inspect against `keyring`: all three must refuse
/// with exit 2 and the same message naming `names`, the root untouched.
fn keyring_refused(t: &Two, keyring: &Path, names: &[&str]) {
    let root = t.root(&format!("root-{}", sha256_hex(s(keyring).as_bytes())));
    let ring = s(keyring);
    let runs = [
        t.run(&["apply", s(&t.v2), "--root", s(&root), "--keyring", ring]),
        t.run(&["verify", s(&t.v2), "--keyring", ring]),
        t.run(&["inspect", s(&t.v2), "--keyring", ring]),
    ];
    for run in &runs {
        let line = assert_refused(run, &root);
        has(&line, names);
        assert_eq!(line, assert_refused(&runs[0], &root));
    }
    assert_eq!(list_files(&root), Vec::<String>::new());
}

#[test]
fn key_files_anyone_but_root_can_write_are_refused_even_through_a_symlink() {
    use std::os::unix::fs::{chown, symlink};
    let t = Two::new();
    let ring = |name: &str| {
        let dir = t.dir().join(name);
        fs::create_dir_all(&dir).unwrap();
        chmod(&dir, 0o755);
        dir
    };
    let key = |dir: &Path, mode: u32| {
        let p = dir.join("release.pub");
        fs::copy(&t.public, &p).unwrap();
        chmod(&p, mode);
        p
    };
    for mode in [0o664, 0o646, 0o666] {
        let dir = ring(&format!("ring-{mode:o}"));
        let p = key(&dir, mode);
        keyring_refused(
            &t,
            &dir,
            &[
                &format!(
                    "infrakit: error: {}: the key file is writable by its group or by others (mode {mode:04o})",
                    p.display()
                ),
                "chmod go-w",
            ],
        );
    }
    // A symlink to a key file others can write.
    let elsewhere = ring("elsewhere");
    let target = key(&elsewhere, 0o666);
    let link_ring = ring("ring-link");
    symlink(&target, link_ring.join("release.pub")).unwrap();
    keyring_refused(
        &t,
        &link_ring,
        &[
            &format!(
                "{}: the key file it links to, {}, is writable",
                link_ring.join("release.pub").display(),
                target.display()
            ),
            "chmod go-w",
        ],
    );
    // A key file owned by another user.
    let dir = ring("ring-owner");
    let p = key(&dir, 0o644);
    chown(&p, Some(65534), Some(65534)).unwrap();
    keyring_refused(&t, &dir, &["is owned by uid 65534", "chown it to root"]);
    // A keyring directory others can write (sticky or not).
    for mode in [0o777, 0o1777, 0o775] {
        let dir = ring(&format!("ring-dir-{mode:o}"));
        key(&dir, 0o644);
        chmod(&dir, mode);
        keyring_refused(
            &t,
            &dir,
            &["the keyring directory is writable by its group or by others"],
        );
    }
    // --key files follow the same rule.
    let loose = key(&ring("loose"), 0o666);
    let run = t.run(&["verify", s(&t.v2), "--key", s(&loose)]);
    has(
        &assert_refused(&run, &t.dir().join("none")),
        &["chmod go-w"],
    );
    // A symlink to a key only root can write is fine.
    fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let root = t.root("linked-root");
    t.run(&[
        "apply",
        s(&t.v2),
        "--root",
        s(&root),
        "--keyring",
        s(&link_ring),
    ])
    .ok();
}

/// A key pair whose key id is `genuine`'s but whose key is `stranger`'s:
/// the secret key file rewritten by Python (key id and checksum), the
/// public key beside it. Returns (secret, public).
fn forge_key_id(dir: &Path, genuine_pub: &Path, stranger: (&Path, &Path)) -> (PathBuf, PathBuf) {
    let (secret, public) = (dir.join("forged.key"), dir.join("forged.pub"));
    let py = "import base64, hashlib, sys\n\
              def raw(p): return base64.b64decode(open(p).read().splitlines()[1])\n\
              key_id = raw(sys.argv[1])[2:10]\n\
              sk = bytearray(raw(sys.argv[2]))\n\
              assert sk[2:4] == b'\\0\\0', 'an unencrypted key'\n\
              sk[54:62] = key_id\n\
              sk[126:158] = hashlib.blake2b(b'Ed' + key_id + bytes(sk[62:126]), digest_size=32).digest()\n\
              pk = b'Ed' + key_id + raw(sys.argv[3])[10:]\n\
              open(sys.argv[4], 'w').write('untrusted comment: forged\\n' + base64.b64encode(bytes(sk)).decode() + '\\n')\n\
              open(sys.argv[5], 'w').write('untrusted comment: forged\\n' + base64.b64encode(pk).decode() + '\\n')\n";
    tool(
        dir,
        "/usr/bin/python3",
        &[
            "-c",
            py,
            s(genuine_pub),
            s(stranger.0),
            s(stranger.1),
            s(&secret),
            s(&public),
        ],
    )
    .ok();
    chmod(&public, 0o644);
    (secret, public)
}

#[test]
fn two_keys_with_one_key_id_are_refused_as_ambiguous() {
    let t = Two::new();
    let (stranger_key, stranger_pub) = keypair(t.dir(), "stranger");
    let (forged_key, forged_pub) = forge_key_id(t.dir(), &t.public, (&stranger_key, &stranger_pub));
    // The forger signs a release under the genuine key's id.
    let forged = Two::build(&t.repo, &forged_key, "forged-out", "9.0.0");
    let sig = fs::read_to_string(forged.with_file_name("p.tar.zst.minisig")).unwrap();
    let genuine_sig = fs::read_to_string(t.v2.with_file_name("p.tar.zst.minisig")).unwrap();
    // Line 1 names the signing key's id.
    let id_line = |s: &str| s.lines().next().unwrap().to_owned();
    assert_eq!(id_line(&sig), id_line(&genuine_sig), "the same key id");
    // Against the genuine key alone, the forgery fails and the genuine passes.
    t.run(&["verify", s(&forged), "--keyring", s(&t.keyring)])
        .expect_code(1);
    t.run(&["verify", s(&t.v2), "--keyring", s(&t.keyring)])
        .ok();
    // The forged key planted in the keyring, sorting first: before, the
    // first key of that id won and the genuine release was rejected. Now
    // the keyring is refused as ambiguous, for every artifact, naming both.
    let ring = t.dir().join("ring-dup");
    fs::create_dir_all(&ring).unwrap();
    fs::copy(&forged_pub, ring.join("a-planted.pub")).unwrap();
    fs::copy(&t.public, ring.join("release.pub")).unwrap();
    let names = [
        "release.pub: has key id",
        "like ",
        "a-planted.pub, but is a different key",
        "the keyring is ambiguous; remove the key you do not trust",
    ];
    keyring_refused(&t, &ring, &names);
    let run = t.run(&["verify", s(&forged), "--keyring", s(&ring)]);
    has(&assert_refused(&run, &ring.join("none")), &names);
    // The same with --key files.
    let run = t.run(&[
        "verify",
        s(&t.v2),
        "--key",
        s(&forged_pub),
        "--key",
        s(&t.public),
    ]);
    has(&assert_refused(&run, &ring.join("none")), &["ambiguous"]);
    // The same key twice is no ambiguity.
    let twice = t.dir().join("ring-twice");
    fs::create_dir_all(&twice).unwrap();
    fs::copy(&t.public, twice.join("release.pub")).unwrap();
    fs::copy(&t.public, twice.join("release-copy.pub")).unwrap();
    t.run(&["verify", s(&t.v2), "--keyring", s(&twice)]).ok();
}
