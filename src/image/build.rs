//! `infrakit image`: the signed, verified release and the locked Debian
//! packages made into one bootable disk.
//!
//! 1. The profile's `[image]` and its image lock (present and up to date),
//!    the release verified against the keys the host will trust, its
//!    prerequisites among the locked packages.
//! 2. Each locked `.deb` copied from the cache into a local repository,
//!    hashed as it is copied (a digest other than the lock's fails the
//!    build, naming the package and both digests); `apt-ftparchive` indexes
//!    it.
//! 3. `mmdebstrap` installs the base from that repository alone (root
//!    mode: maintainer scripts run as root in a chroot, and files keep
//!    their owners; the one step that needs root).
//! 4. The host's files mmdebstrap leaves behind (resolv.conf, hostname, SSH
//!    host keys, its sources.list) replaced; fstab by PARTUUID; the release
//!    laid down with `apply`'s own code; the trusted keys and this infrakit
//!    binary installed; every newer time clamped to `SOURCE_DATE_EPOCH`.
//! 5. The ESP, the ext4 root and the GPT (`disk`); the qcow2 and zstd forms;
//!    the manifest; the signature on the raw disk, binding the manifest.
//!
//! Everything is made in a temporary directory inside the output directory
//! and renamed into place at the end, the signature last: a failed build
//! leaves nothing half-written.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::artifact::manifest::Binding;
use crate::compose::profile::{ImageDecl, Profile};
use crate::error::{Error, Result};
use crate::host::apply::{ApplyOptions, apply};
use crate::host::state::State;
use crate::image::disk::{self, EspFiles, Ids, Layout};
use crate::image::lock::{self, ImageLock, Package};
use crate::image::manifest::{
    ArtifactRef, FileRef, ImageManifest, KIND, PackageRef, Partition, SCHEMA,
};
use crate::image::{run, utf8};
use crate::inputs::cache::Cache;
use crate::trust::digest::{HashingWriter, Sha256};
use crate::trust::sign::{PublicKey, SecretKey};
use crate::trust::verify::{self, Verified, VerifyOptions};

/// Where the booted host keeps its trusted keys (`apply`'s default keyring).
const KEYS_DIR: &str = "etc/infrakit/keys";
/// Where the image installs infrakit.
const BINARY: &str = "usr/local/bin/infrakit";
/// cloud-init settings the image ships: no locale generation (the image
/// has no `locales`; C.UTF-8 is built in).
const CLOUD_CFG: &str = "# Written by infrakit image (docs/images.md).\nlocale: false\n";

/// Which forms of the disk to write besides the raw one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Forms {
    pub qcow2: bool,
    pub zstd: bool,
}

pub struct ImageOptions<'a> {
    /// The profile's path, for messages.
    pub profile: &'a Path,
    /// `preflight` of that profile.
    pub prepared: &'a Prepared,
    pub out_dir: &'a Path,
    /// The release, signed (`NAME.tar.zst` with its `.minisig` and manifest).
    pub artifact: &'a Path,
    pub sign_key: &'a SecretKey,
    /// Keys the host trusts besides the signing key's public key.
    pub trust: &'a [PublicKey],
    /// The infrakit binary to install (normally this one).
    pub infrakit_binary: &'a Path,
    /// The input cache `infrakit fetch` filled.
    pub cache: &'a Path,
    pub forms: Forms,
    /// `SOURCE_DATE_EPOCH` from the environment, if set.
    pub source_date_epoch: Option<u64>,
}

/// What a build wrote.
pub struct Built {
    pub manifest: ImageManifest,
    /// Every file written, in the output directory.
    pub files: Vec<PathBuf>,
    pub key_id: String,
}

/// Reports a step: `(what, done, total)`; a total of 0 is a step without a
/// measure.
pub type Progress<'a> = &'a dyn Fn(&str, u64, u64);

/// The profile, its `[image]` and its image lock, refused (exit 2) when
/// there is no `[image]` or the lock is missing or out of date: checked
/// before anything is built.
pub fn preflight(path: &Path) -> Result<Prepared> {
    let profile = Profile::load(path)?;
    let decl = profile.image.clone().ok_or_else(|| {
        Error::input(
            path,
            "has no [image] table: declare the base OS (suite, packages, size) as docs/images.md shows",
        )
    })?;
    let locked = read_lock(&lock::path_for(&profile), &decl, path)?;
    Ok(Prepared {
        profile,
        decl,
        locked,
    })
}

/// What `preflight` checked: the profile, its `[image]` and its lock.
pub struct Prepared {
    pub profile: Profile,
    pub decl: ImageDecl,
    pub locked: ImageLock,
}

pub fn build(opts: &ImageOptions<'_>, progress: Progress<'_>) -> Result<Built> {
    let Prepared {
        profile,
        decl,
        locked,
    } = opts.prepared;
    // Modes of what this build and the tools it runs create must not depend
    // on the caller's umask (a group-writable /etc/infrakit/keys would also
    // make the booted host refuse its keyring).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let sde = opts
        .source_date_epoch
        .or(profile.source_date_epoch)
        .ok_or_else(|| {
            Error::input(
                opts.profile,
                "no source-date-epoch: set it in the profile or SOURCE_DATE_EPOCH",
            )
        })?;

    let mut keys = vec![opts.sign_key.public()];
    for k in opts.trust {
        if !keys.iter().any(|have| have.key_id() == k.key_id()) {
            keys.push(k.clone());
        }
    }
    // The signature and digests now; `apply` below checks every member as
    // it lays the release down (as `infrakit apply` does).
    let verified = verify::authenticate(
        &VerifyOptions {
            artifact: opts.artifact,
            manifest: None,
            signature: None,
            keys: &keys,
        },
        &|done, total| progress("verifying", done, total),
    )?;
    let release = verified.manifest();
    if release.name != profile.name {
        return Err(Error::usage(
            opts.artifact.display(),
            format!(
                "is a release of {}, not of the profile {}: give --artifact a release built from it",
                release.name, profile.name
            ),
        ));
    }
    let missing: Vec<&str> = release
        .prerequisites
        .iter()
        .filter(|p| !locked.packages.iter().any(|l| &l.name == *p))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Error::input(
            opts.profile,
            format!(
                "the release needs {} on the host: add them to [image] packages and run `infrakit lock {}`",
                missing.join(", "),
                opts.profile.display()
            ),
        ));
    }

    std::fs::create_dir_all(opts.out_dir).map_err(Error::io(opts.out_dir, "creating"))?;
    let work = tempfile::Builder::new()
        .prefix(".infrakit-image-")
        .tempdir_in(opts.out_dir)
        .map_err(Error::io(opts.out_dir, "creating a work directory"))?;
    let work = work.path();

    let repo = work.join("repo");
    stage_packages(
        locked,
        &Cache::new(opts.cache.to_path_buf()),
        &repo,
        opts.profile,
        progress,
    )?;
    index_repo(&repo, &locked.suite)?;

    if !rustix::process::geteuid().is_root() {
        return Err(Error::usage(
            "infrakit image",
            "must run as root: mmdebstrap installs the base in root mode (maintainer scripts run \
             as root in a chroot, files keep their owners); docs/images.md says which steps need root",
        ));
    }
    let root = work.join("root");
    progress("installing the base (mmdebstrap)", 0, 0);
    bootstrap(decl, locked, &repo, &root, sde)?;

    let seed = format!("{} {}", release.name, release.version);
    let ids = Ids::new(&seed);
    let layout = Layout::new(decl.size);
    progress("laying down the release", 0, 0);
    let infrakit_sha256 = finish_root(
        &root,
        decl,
        &ids,
        &verified,
        &keys,
        opts.infrakit_binary,
        sde,
    )?;

    let boot = root.join("boot");
    let esp_files = EspFiles {
        loader: root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        kernel: only(&boot, "vmlinuz-")?,
        initrd: only(&boot, "initrd.img-")?,
    };
    if !esp_files.loader.is_file() {
        return Err(Error::input(
            opts.profile,
            "the image has no usr/lib/systemd/boot/efi/systemd-bootx64.efi: add systemd-boot-efi to [image] packages",
        ));
    }
    let title = format!("{} {}", release.name, release.version);
    let entry = disk::boot_entry(&title, &ids.root_part, &decl.cmdline);
    let esp_img = work.join("esp.img");
    let root_img = work.join("root.img");
    progress("making the ESP", 0, 0);
    disk::make_esp(work, &esp_files, &entry, &ids, sde, &esp_img)?;
    progress("making the root filesystem", 0, 0);
    disk::make_root(work, &root, &ids, sde, layout.root_size, &root_img)?;
    std::fs::remove_dir_all(&root).map_err(Error::io(&root, "removing the staged root"))?;

    let name = &release.name;
    let disk_name = format!("{name}.img");
    let disk_path = work.join(&disk_name);
    progress("assembling the disk", 0, 0);
    // The partitions' digests come from the copy into the disk.
    let (esp_sha, root_sha) = disk::assemble(&layout, &ids, &esp_img, &root_img, work, &disk_path)?;
    let partitions = vec![
        Partition {
            filesystem: "vfat".to_owned(),
            filesystem_id: ids.esp_serial.clone(),
            guid: ids.esp_part.clone(),
            name: "esp".to_owned(),
            number: 1,
            sha256: esp_sha,
            size: disk::ESP_SIZE,
            start: layout.esp_start,
            type_guid: disk::ESP_TYPE.to_owned(),
        },
        Partition {
            filesystem: "ext4".to_owned(),
            filesystem_id: ids.root_fs.clone(),
            guid: ids.root_part.clone(),
            name: "root".to_owned(),
            number: 2,
            sha256: root_sha,
            size: layout.root_size,
            start: layout.root_start,
            type_guid: disk::ROOT_TYPE.to_owned(),
        },
    ];
    std::fs::remove_file(&esp_img).map_err(Error::io(&esp_img, "removing"))?;
    std::fs::remove_file(&root_img).map_err(Error::io(&root_img, "removing"))?;

    let disk_file =
        File::open(&disk_path).map_err(Error::io(&disk_path, "reading the disk image"))?;
    let (prehash, disk_sha, disk_size) =
        crate::trust::verify::hash_file(&disk_file, &disk_path, &|d, t| {
            progress("hashing the disk", d, t)
        })?;
    let mut forms = Vec::new();
    let mut outputs = vec![disk_name.clone()];
    if opts.forms.qcow2 {
        let file = format!("{name}.qcow2");
        let path = work.join(&file);
        progress("writing qcow2", 0, 0);
        run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&disk_path)
                .arg(&path),
            "writing the qcow2 form (qemu-img convert)",
        )?;
        forms.push(file_ref(&file, &path, progress)?);
        outputs.push(file);
    }
    if opts.forms.zstd {
        let file = format!("{name}.img.zst");
        let path = work.join(&file);
        compress(&disk_path, &path, &|d, t| progress("compressing", d, t))?;
        forms.push(file_ref(&file, &path, progress)?);
        outputs.push(file);
    }

    let artifact_name = opts
        .artifact
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let manifest = ImageManifest {
        arch: locked.arch.clone(),
        artifact: ArtifactRef {
            file: artifact_name,
            key_id: verified.key_id().to_owned(),
            manifest_sha256: *verified.manifest_sha256(),
            name: release.name.clone(),
            sha256: release.archive.sha256,
            version: release.version.clone(),
        },
        cmdline: decl.cmdline.clone(),
        disk: FileRef {
            file: disk_name.clone(),
            guid: Some(ids.disk.clone()),
            sha256: disk_sha,
            size: disk_size,
        },
        forms,
        infrakit_sha256,
        kind: KIND.to_owned(),
        name: release.name.clone(),
        packages: locked
            .packages
            .iter()
            .map(|p| PackageRef {
                name: p.name.clone(),
                sha256: p.sha256,
                version: p.version.clone(),
            })
            .collect(),
        partitions,
        schema: SCHEMA,
        source_date_epoch: sde,
        suite: locked.suite.clone(),
        trusted_keys: keys.iter().map(PublicKey::key_id).collect(),
        version: release.version.clone(),
    };
    let manifest_bytes = manifest.to_canonical_json();
    let manifest_name = format!("{name}.image.json");
    write_file(&work.join(&manifest_name), &manifest_bytes)?;
    let comment = Binding {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        manifest_sha256: Sha256::of(&manifest_bytes),
    };
    let sig_name = format!("{name}.img.minisig");
    write_file(
        &work.join(&sig_name),
        opts.sign_key
            .sign(&prehash, &comment.to_comment())
            .as_bytes(),
    )?;

    // Forms not built this time would contradict the new manifest.
    for stale in [format!("{name}.qcow2"), format!("{name}.img.zst")] {
        if !outputs.contains(&stale) {
            let p = opts.out_dir.join(&stale);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(&p, "removing a stale form")(e));
                }
                _ => {}
            }
        }
    }
    outputs.push(manifest_name);
    outputs.push(sig_name);
    let mut files = Vec::new();
    for file in outputs {
        let to = opts.out_dir.join(&file);
        std::fs::rename(work.join(&file), &to).map_err(Error::io(&to, "moving into place"))?;
        files.push(to);
    }
    Ok(Built {
        manifest,
        files,
        key_id: opts.sign_key.public().key_id(),
    })
}

/// The image lock, refused (exit 2) when missing or made for another
/// `[image]`.
fn read_lock(path: &Path, decl: &ImageDecl, profile: &Path) -> Result<ImageLock> {
    let fix = format!(
        "run `infrakit lock {}` and commit the lock",
        profile.display()
    );
    let Some(locked) = ImageLock::read(path)? else {
        return Err(Error::input(path, format!("no image lock: {fix}")));
    };
    if locked.request != lock::request(decl)
        || (
            locked.suite.as_str(),
            locked.arch.as_str(),
            locked.mirror.as_str(),
        ) != (
            decl.suite.as_str(),
            decl.arch.as_str(),
            decl.mirror.as_str(),
        )
    {
        return Err(Error::input(
            path,
            format!("was resolved for another [image] (suite, mirror or packages changed): {fix}"),
        ));
    }
    Ok(locked)
}

/// Copies every locked `.deb` from the cache into `repo/pool`, checking
/// each against the lock's digest as it is copied.
fn stage_packages(
    locked: &ImageLock,
    cache: &Cache,
    repo: &Path,
    profile: &Path,
    progress: Progress<'_>,
) -> Result<()> {
    let pool = repo.join("pool");
    std::fs::create_dir_all(&pool).map_err(Error::io(&pool, "creating the local repository"))?;
    let total: u64 = locked.packages.iter().map(|p| p.size).sum();
    let mut done = 0;
    for p in &locked.packages {
        let from = cache.file(&p.sha256);
        let src = match File::open(&from) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::usage(
                    format!("package {} {}", p.name, p.version),
                    format!(
                        "is not in the cache ({}): run `infrakit fetch {}`",
                        from.display(),
                        profile.display()
                    ),
                ));
            }
            Err(e) => return Err(Error::io(&from, "reading a cached package")(e)),
        };
        let to = pool.join(p.file_name());
        let dst = File::create(&to).map_err(Error::io(&to, "staging a package"))?;
        let mut hashing = HashingWriter::new(dst);
        copy_counting(src, &mut hashing, &from, &mut |n| {
            done += n;
            progress("staging packages", done, total);
        })?;
        let (_, got, _) = hashing.finish();
        check_package(p, got, &from)?;
    }
    Ok(())
}

fn check_package(p: &Package, got: Sha256, from: &Path) -> Result<()> {
    if got != p.sha256 {
        return Err(Error::check(format!(
            "package {} {}: the cached .deb {} has sha256 {got}, the image lock says {}; \
             remove it and run `infrakit fetch`",
            p.name,
            p.version,
            from.display(),
            p.sha256
        )));
    }
    Ok(())
}

fn copy_counting(
    mut src: File,
    dst: &mut impl Write,
    from: &Path,
    each: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(from, "reading")(e)),
        };
        dst.write_all(&buf[..n])
            .map_err(Error::io(from, "copying"))?;
        each(n as u64);
    }
}

/// `apt-ftparchive`: the pool's `Packages` and a `Release` naming the
/// suite, so mmdebstrap resolves against it as against the archive.
fn index_repo(repo: &Path, suite: &str) -> Result<()> {
    let dists = repo.join("dists").join(suite);
    let bin = dists.join("main/binary-amd64");
    std::fs::create_dir_all(&bin).map_err(Error::io(&bin, "creating the local repository"))?;
    let packages = run(
        Command::new("apt-ftparchive")
            .current_dir(repo)
            .args(["packages", "pool"]),
        "indexing the local repository (apt-ftparchive)",
    )?;
    write_file(&bin.join("Packages"), &packages)?;
    let field = |k: &str, v: &str| format!("APT::FTPArchive::Release::{k}={v}");
    let release = run(
        Command::new("apt-ftparchive")
            .current_dir(repo)
            .args([
                "-o",
                &field("Suite", suite),
                "-o",
                &field("Codename", suite),
            ])
            .args([
                "-o",
                &field("Components", "main"),
                "-o",
                &field("Architectures", "amd64"),
            ])
            .args(["release", &format!("dists/{suite}")]),
        "indexing the local repository (apt-ftparchive)",
    )?;
    write_file(&dists.join("Release"), &release)
}

/// mmdebstrap: the minimal base plus `[image] packages`, from the local
/// repository only.
fn bootstrap(
    decl: &ImageDecl,
    locked: &ImageLock,
    repo: &Path,
    root: &Path,
    sde: u64,
) -> Result<()> {
    let source = format!(
        "deb [trusted=yes] copy://{} {} main",
        utf8(repo)?,
        locked.suite
    );
    run(
        Command::new("mmdebstrap")
            .env("SOURCE_DATE_EPOCH", sde.to_string())
            .env("LC_ALL", "C.UTF-8")
            .env_remove("APT_CONFIG")
            .args(["--mode=root", "--variant=minbase", "--quiet"])
            .arg(format!("--architectures={}", locked.arch))
            .arg(format!("--include={}", decl.packages.join(",")))
            .arg("--aptopt=Acquire::Languages \"none\"")
            .arg(&locked.suite)
            .arg(root)
            .arg(source),
        "installing the base (mmdebstrap)",
    )
    .map(drop)
}

/// Makes the installed base into this image's root; returns the installed
/// infrakit binary's digest.
fn finish_root(
    root: &Path,
    decl: &ImageDecl,
    ids: &Ids,
    verified: &Verified,
    keys: &[PublicKey],
    binary: &Path,
    sde: u64,
) -> Result<Sha256> {
    let at = |rel: &str| root.join(rel);
    let remove = |rel: &str| match std::fs::remove_file(at(rel)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(&at(rel), "removing")(e))
        }
        _ => Ok(()),
    };
    // What mmdebstrap or the packages' scripts took from the build host or
    // made at random: each host makes its own at first boot.
    for entry in std::fs::read_dir(at("etc/ssh"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path()).map_err(Error::io(&entry.path(), "removing"))?;
        }
    }
    write_file(&at("etc/hostname"), b"localhost\n")?;
    remove("etc/resolv.conf")?;
    if at("usr/lib/systemd/systemd-resolved").exists() {
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            at("etc/resolv.conf"),
        )
        .map_err(Error::io(&at("etc/resolv.conf"), "linking"))?;
    }
    let sources_d = at("etc/apt/sources.list.d");
    for entry in std::fs::read_dir(&sources_d)
        .into_iter()
        .flatten()
        .flatten()
    {
        std::fs::remove_file(entry.path()).map_err(Error::io(&entry.path(), "removing"))?;
    }
    write_file(
        &at("etc/apt/sources.list"),
        format!("deb {} {} main\n", decl.mirror, decl.suite).as_bytes(),
    )?;
    std::fs::create_dir_all(at("boot/efi")).map_err(Error::io(&at("boot/efi"), "creating"))?;
    write_file(
        &at("etc/fstab"),
        format!(
            "# Written by infrakit image: the root and the ESP by partition UUID.\n\
             PARTUUID={} / ext4 errors=remount-ro 0 1\n\
             PARTUUID={} /boot/efi vfat umask=0077,nofail 0 2\n",
            ids.root_part, ids.esp_part
        )
        .as_bytes(),
    )?;
    if at("etc/cloud/cloud.cfg.d").is_dir() {
        write_file(
            &at("etc/cloud/cloud.cfg.d/90_infrakit.cfg"),
            CLOUD_CFG.as_bytes(),
        )?;
    }
    if at("usr/lib/systemd/systemd-networkd").exists() {
        run(
            Command::new("systemctl")
                .arg(format!("--root={}", utf8(root)?))
                .args(["enable", "--quiet", "systemd-networkd.service"]),
            "enabling systemd-networkd (systemctl --root)",
        )?;
    }

    // The release, exactly as `apply` lays it down on a host (its file
    // signature was checked by `authenticate` already).
    let mut state = State::open(root)?;
    apply(
        &mut state,
        verified,
        &ApplyOptions {
            dry_run: false,
            allow_downgrade: false,
            adopt: true,
            retain: 2,
            now: sde,
        },
        &mut || Ok(()),
    )?;
    let keys_dir = at(KEYS_DIR);
    std::fs::create_dir_all(&keys_dir).map_err(Error::io(&keys_dir, "creating"))?;
    for key in keys {
        write_file(
            &keys_dir.join(format!("{}.pub", key.key_id())),
            key.to_file().as_bytes(),
        )?;
    }
    let src = File::open(binary).map_err(Error::io(binary, "reading the infrakit binary"))?;
    let dst_path = at(BINARY);
    let dst = File::create(&dst_path).map_err(Error::io(&dst_path, "installing infrakit"))?;
    let mut hashing = HashingWriter::new(dst);
    copy_counting(src, &mut hashing, binary, &mut |_| {})?;
    let (dst, sha, _) = hashing.finish();
    drop(dst);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst_path, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io(&dst_path, "installing infrakit"))?;

    // Everything this build wrote, dated SOURCE_DATE_EPOCH.
    let stamp = format!("@{sde}");
    run(
        Command::new("find").arg(root).args([
            "-xdev", "-newermt", &stamp, "-exec", "touch", "-h", "-d", &stamp, "{}", "+",
        ]),
        "dating the root's files",
    )?;
    Ok(sha)
}

/// The one file in `dir` whose name starts with `prefix`.
fn only(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(Error::io(dir, "reading"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(Error::usage(
            dir.display(),
            format!(
                "holds {n} {prefix}* files, not one: list exactly one kernel package in [image] packages"
            ),
        )),
    }
}

fn file_ref(file: &str, path: &Path, progress: Progress<'_>) -> Result<FileRef> {
    let src = File::open(path).map_err(Error::io(path, "reading"))?;
    let total = src.metadata().map_or(0, |m| m.len());
    let mut hashing = HashingWriter::new(std::io::sink());
    let mut done = 0;
    copy_counting(src, &mut hashing, path, &mut |n| {
        done += n;
        progress(&format!("hashing {file}"), done, total);
    })?;
    let (_, sha256, _) = hashing.finish();
    Ok(FileRef {
        file: file.to_owned(),
        guid: None,
        sha256,
        size: done,
    })
}

/// The zstd form: the same multithreaded encoder as artifacts, whose
/// output does not depend on the worker count.
fn compress(from: &Path, to: &Path, progress: &dyn Fn(u64, u64)) -> Result<()> {
    let src = File::open(from).map_err(Error::io(from, "reading the disk image"))?;
    let total = src.metadata().map_or(0, |m| m.len());
    let dst = File::create(to).map_err(Error::io(to, "writing"))?;
    let mut enc = zstd::stream::Encoder::new(dst, 6).map_err(Error::io(to, "compressing"))?;
    enc.multithread(2).map_err(Error::io(to, "compressing"))?;
    let mut done = 0;
    copy_counting(src, &mut enc, from, &mut |n| {
        done += n;
        progress(done, total);
    })?;
    let dst = enc.finish().map_err(Error::io(to, "compressing"))?;
    dst.sync_all().map_err(Error::io(to, "writing"))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(Error::io(path, "writing"))
}
