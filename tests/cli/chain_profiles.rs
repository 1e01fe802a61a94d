//! The repo's chain profiles (issue 10) build from stand-in inputs, pass
//! lint, and every unit they render passes `systemd-analyze verify` with an
//! empty stderr; every service that runs a native binary scores at most 2.5
//! in `systemd-analyze security --offline=yes`. The stand-ins
//! (tests/cli/standins.py) are made in the test with the stock tools
//! (`dpkg-deb`, Python's tarfile), have the member paths each adapter
//! declares, are locked by a lock written for them (the repo holds no
//! checksum), served on loopback and fetched through `--mirror`; the build
//! itself reads only the cache. Every Ethereum client combination builds.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::*;

const STANDINS: &str = include_str!("standins.py");
const MAX_EXPOSURE: f64 = 2.5;

/// Units that do not run a native binary under their own sandbox, with why
/// their score says little; their scores are printed, not enforced.
const NOT_NATIVE: [(&str, &str); 2] = [
    (
        "aztec-node.service",
        "runs the docker client; the node runs in a container under dockerd",
    ),
    (
        "aztec-sequencer.service",
        "runs the docker client; the node runs in a container under dockerd",
    ),
];

/// A copy of the repo's profiles, overlays and adapters.
pub(crate) fn workspace() -> tempfile::TempDir {
    let w = tempdir();
    tool(
        repo_dir(),
        "cp",
        &["-a", "profiles", "overlays", "adapters", s(w.path())],
    )
    .ok();
    w
}

/// Builds `profile` (relative to `w`) from stand-ins into `w/out`; returns
/// the extracted root.
pub(crate) fn build(w: &Path, profile: &str, out: &str) -> PathBuf {
    build_with(w, profile, out, &[])
}

/// `build`, with `env` (a signing key, say) for the build itself.
pub(crate) fn build_with(w: &Path, profile: &str, out: &str, env: &[(&str, &str)]) -> PathBuf {
    require_tool("dpkg-deb");
    let script = w.join("standins.py");
    write(&script, STANDINS);
    let cache = w.join("cache");
    let inputs = w.join(format!("inputs-{out}"));
    let made = tool_with(
        w,
        "python3",
        &[s(&script), s(w), profile, s(&inputs)],
        |c| {
            c.env("INFRAKIT", bin());
        },
    )
    .ok();
    // Served on loopback, fetched through --mirror like release CI does
    // with an internal mirror; the build itself reads only the cache.
    let server = Server::start(&inputs.join("served"));
    // The inputs only: an [image] table's Debian packages are not needed to
    // build the release (and would come from the network).
    let mut fetch = vec![
        "fetch".to_owned(),
        profile.to_owned(),
        "--locked".to_owned(),
        "--only".to_owned(),
        "inputs".to_owned(),
    ];
    for prefix in made.stdout.split_whitespace() {
        let host = prefix.trim_end_matches('/').rsplit('/').next().unwrap();
        fetch.push(format!(
            "--mirror={prefix}={}",
            server.url(&format!("{host}/"))
        ));
    }
    let fetch: Vec<&str> = fetch.iter().map(String::as_str).collect();
    infrakit_env(w, &fetch, &[("XDG_CACHE_HOME", s(&cache))]).ok();
    drop(server);
    let mut build_env = vec![("XDG_CACHE_HOME", s(&cache))];
    build_env.extend_from_slice(env);
    infrakit_env(w, &["build", profile, "--out", out], &build_env).ok();
    infrakit_env(w, &["lint", profile], &[("XDG_CACHE_HOME", s(&cache))]).ok();
    let root = w.join(format!("R-{out}"));
    fs::create_dir_all(&root).unwrap();
    let name = Path::new(profile).file_stem().unwrap().to_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(w.join(out).join(format!("{name}.manifest.json"))).unwrap(),
    )
    .unwrap();
    let artifact = w.join(out).join(format!("{name}.tar.zst"));
    tool(
        w,
        "tar",
        &[
            "--zstd",
            "-xpf",
            s(&artifact),
            "-C",
            s(&root),
            "--numeric-owner",
        ],
    )
    .ok();
    // What the host OS provides and the units run: systemd's own units
    // (never over the release's own: -n), a shell, nft and the docker
    // client (stand-ins).
    tool(
        Path::new("/"),
        "cp",
        &[
            "-an",
            "/usr/lib/systemd/system/.",
            s(&root.join("usr/lib/systemd/system")),
        ],
    )
    .ok();
    for bin in ["bin/sh", "usr/bin/docker", "usr/sbin/nft"] {
        let dest = root.join(bin);
        if dest.symlink_metadata().is_err() {
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            write(&dest, "#!/bin/sh\n");
            chmod(&dest, 0o755);
        }
    }
    assert!(
        !manifest["services"].as_array().unwrap().is_empty(),
        "{profile} renders no service"
    );
    root
}

/// Every unit file the release ships, checked with `systemd-analyze
/// verify` (empty stderr); each declared service's exposure.
fn analyze(w: &Path, root: &Path, services: &[String], files: &[String]) -> Vec<(String, f64)> {
    require_tool("systemd-analyze");
    let root_arg = format!("--root={}", root.display());
    for unit in files {
        let run = tool(
            w,
            "systemd-analyze",
            &["verify", &root_arg, "--man=no", unit],
        );
        assert!(
            run.code == 0 && run.stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: exit {}\n{}{}",
            run.code,
            run.stdout,
            run.stderr
        );
    }
    let mut scores = Vec::new();
    for unit in services {
        let run = tool(
            w,
            "systemd-analyze",
            &["security", "--offline=yes", &root_arg, "--no-pager", unit],
        );
        let score: f64 = run
            .stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .and_then(|l| l.rsplit_once(": "))
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no score for {unit}:\n{}{}", run.stdout, run.stderr));
        scores.push((unit.clone(), score));
    }
    scores
}

/// The services the manifest declares, and every unit file the release
/// ships (rendered or hand-written, services and timers).
fn units(w: &Path, out: &str, name: &str) -> (Vec<String>, Vec<String>) {
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(w.join(out).join(format!("{name}.manifest.json"))).unwrap(),
    )
    .unwrap();
    let services = manifest["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["unit"].as_str().unwrap().to_owned())
        .collect();
    let files = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str())
        .filter_map(|p| {
            p.strip_prefix("usr/lib/systemd/system/")
                .or_else(|| p.strip_prefix("etc/systemd/system/"))
        })
        .filter(|u| !u.contains('/') && (u.ends_with(".service") || u.ends_with(".timer")))
        .map(str::to_owned)
        .collect();
    (services, files)
}

fn check(w: &Path, profile: &str, out: &str) {
    let root = build(w, profile, out);
    let name = Path::new(profile).file_stem().unwrap().to_str().unwrap();
    let (services, files) = units(w, out, name);
    assert!(files.len() >= services.len(), "{files:?}");
    eprintln!("{profile}: systemd-analyze verify: {}", files.join(" "));
    for (unit, score) in analyze(w, &root, &services, &files) {
        let exempt = NOT_NATIVE.iter().find(|(u, _)| *u == unit);
        eprintln!(
            "{profile}: systemd-analyze security {unit}: {score:.1}{}",
            exempt.map_or(String::new(), |(_, why)| format!(" (not enforced: {why})"))
        );
        if exempt.is_none() {
            assert!(
                score <= MAX_EXPOSURE,
                "{profile}: {unit} scores {score} (> {MAX_EXPOSURE})"
            );
        }
    }
}

#[test]
fn monad_validator_builds_lints_and_its_units_verify() {
    let w = workspace();
    check(w.path(), "profiles/monad-validator.toml", "monad");
}

#[test]
fn aztec_node_and_sequencer_build_lint_and_their_units_verify() {
    let w = workspace();
    check(w.path(), "profiles/aztec-node.toml", "aztec-node");
    let base = fs::read_to_string(w.path().join("profiles/aztec-node.toml")).unwrap();
    let text = base
        .replace("name = \"aztec-node\"", "name = \"aztec-sequencer\"")
        .replace("aztec-role = \"node\"", "aztec-role = \"sequencer\"");
    assert_ne!(text, base);
    write(&w.path().join("profiles/aztec-sequencer.toml"), text);
    check(w.path(), "profiles/aztec-sequencer.toml", "aztec-sequencer");
}

#[test]
fn every_ethereum_client_combination_builds_lints_and_its_units_verify() {
    let w = workspace();
    let base = fs::read_to_string(w.path().join("profiles/ethereum-validator.toml")).unwrap();
    for el in ["geth", "reth"] {
        for cl in ["lighthouse", "nimbus"] {
            for vc in ["none", cl] {
                let name = format!("eth-{el}-{cl}-{vc}");
                let text = base
                    .replace(
                        "name = \"ethereum-validator\"",
                        &format!("name = \"{name}\""),
                    )
                    .replace(
                        "execution-client = \"geth\"",
                        &format!("execution-client = \"{el}\""),
                    )
                    .replace(
                        "consensus-client = \"lighthouse\"",
                        &format!("consensus-client = \"{cl}\""),
                    )
                    .replace(
                        "validator-client = \"lighthouse\"",
                        &format!("validator-client = \"{vc}\""),
                    );
                assert_ne!(text, base);
                let profile = format!("profiles/{name}.toml");
                write(&w.path().join(&profile), text);
                check(w.path(), &profile, &name);
            }
        }
    }
}
