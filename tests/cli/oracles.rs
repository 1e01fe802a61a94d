//! Stock tools judge the artifact: GNU tar, bsdtar, zstd, minisign.

use crate::support::*;

#[test]
fn fixture_builds_and_verifies() {
    let dir = tempdir();
    fixture_repo(dir.path(), false);
    let (key, public) = keypair(dir.path(), "release");
    let key = key.to_str().unwrap();
    infrakit(
        dir.path(),
        &[
            "build",
            "profiles/fixture.toml",
            "--out",
            "dist",
            "--sign-key",
            key,
        ],
    )
    .ok();
    let public = public.to_str().unwrap();
    let run = infrakit(
        dir.path(),
        &["verify", "dist/fixture.tar.zst", "--key", public],
    )
    .ok();
    assert!(
        run.stdout.contains("verified fixture 1.2.3"),
        "{}",
        run.stdout
    );
}
