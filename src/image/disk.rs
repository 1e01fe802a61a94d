//! The disk: an EFI system partition (vfat, made by `mkfs.vfat` and filled
//! by mtools' `mcopy`), an ext4 root (`mkfs.ext4 -d` from the staged tree,
//! then a `debugfs` pass that sets the times `mke2fs` copies from the
//! staging filesystem), and a GPT written by `sfdisk`, the partitions
//! copied in at their offsets (zero blocks skipped, so the raw image stays
//! sparse). Identifiers are UUIDv8s hashed from a seed (the profile's name
//! and version) and a role; times are `SOURCE_DATE_EPOCH`; mke2fs reads
//! our own configuration, not the build host's /etc/mke2fs.conf.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::image::{run, utf8};
use crate::trust::digest::{HashingWriter, Sha256};

pub const MIB: u64 = 1 << 20;
/// The EFI system partition's size: room for two kernels and initrds.
pub const ESP_SIZE: u64 = 256 * MIB;
/// GPT type of an EFI system partition.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT type of an x86-64 root partition (the Discoverable Partitions
/// Specification's), so systemd and growpart know it.
pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// ext4 as the image makes it, whatever the build host's defaults.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// A UUID derived from `seed` and `role`: the first 16 bytes of their
/// SHA-256, marked version 8 (RFC 9562's custom layout), variant 10.
pub fn derived_uuid(seed: &str, role: &str) -> String {
    let digest = Sha256::of(format!("infrakit image\0{seed}\0{role}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest.as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Every identifier of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    pub disk: String,
    pub esp_part: String,
    pub root_part: String,
    pub root_fs: String,
    pub root_hash_seed: String,
    /// The FAT volume serial, 8 hex digits.
    pub esp_serial: String,
}

impl Ids {
    pub fn new(seed: &str) -> Ids {
        Ids {
            disk: derived_uuid(seed, "disk"),
            esp_part: derived_uuid(seed, "partition esp"),
            root_part: derived_uuid(seed, "partition root"),
            root_fs: derived_uuid(seed, "filesystem root"),
            root_hash_seed: derived_uuid(seed, "filesystem root hash seed"),
            esp_serial: derived_uuid(seed, "filesystem esp")[..8].to_owned(),
        }
    }
}

/// Where the partitions lie on a disk of `size` bytes: 1 MiB of GPT and
/// alignment, the ESP, the root up to 1 MiB before the end (the backup GPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub esp_start: u64,
    pub root_start: u64,
    pub root_size: u64,
}

impl Layout {
    pub fn new(size: u64) -> Layout {
        let esp_start = MIB;
        let root_start = esp_start + ESP_SIZE;
        Layout {
            size,
            esp_start,
            root_start,
            root_size: size - MIB - root_start,
        }
    }
}

/// Files for the ESP: (path in the ESP, source).
pub struct EspFiles {
    pub loader: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The boot loader's configuration: no menu, no editing the command line
/// at the console (that would be a root shell for anyone at the console).
pub const LOADER_CONF: &str = "timeout 0\neditor no\ndefault infrakit.conf\n";

/// The boot entry for `title`, with the root found by PARTUUID.
pub fn boot_entry(title: &str, root_part: &str, cmdline: &str) -> String {
    format!(
        "title {title}\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTUUID={root_part} ro {cmdline}\n"
    )
}

/// Makes the ESP image `out`: systemd-boot as the removable-media loader
/// (`EFI/BOOT/BOOTX64.EFI`, found without NVRAM entries), its
/// configuration, the boot entry, the kernel and the initrd. Every
/// directory is created by copying a one-child chain, and files one at a
/// time, so nothing depends on the staging directory's listing order.
pub fn make_esp(
    work: &Path,
    files: &EspFiles,
    entry: &str,
    ids: &Ids,
    sde: u64,
    out: &Path,
) -> Result<()> {
    let stage = work.join("esp");
    let mk = |rel: &str| {
        let p = stage.join(rel);
        std::fs::create_dir_all(&p).map_err(Error::io(&p, "staging the ESP"))
    };
    mk("EFI/BOOT")?;
    mk("loader/entries")?;
    mk("files")?;
    let copy = |from: &Path, rel: &str| {
        let to = stage.join(rel);
        std::fs::copy(from, &to).map_err(Error::io(from, "staging the ESP"))?;
        Ok::<_, Error>(())
    };
    copy(&files.loader, "EFI/BOOT/BOOTX64.EFI")?;
    copy(&files.kernel, "files/vmlinuz")?;
    copy(&files.initrd, "files/initrd.img")?;
    let put = |rel: &str, text: &str| {
        let p = stage.join(rel);
        std::fs::write(&p, text).map_err(Error::io(&p, "staging the ESP"))
    };
    put("files/loader.conf", LOADER_CONF)?;
    put("loader/entries/infrakit.conf", entry)?;
    run(
        Command::new("touch")
            .args(["-h", "-d", &format!("@{sde}")])
            .args(walk_sorted(&stage)?),
        "dating the ESP's files",
    )?;
    let out_s = utf8(out)?;
    run(
        Command::new("mkfs.vfat")
            .args(["-C", "--invariant", "-F", "32", "-n", "ESP", "-i"])
            .arg(&ids.esp_serial)
            .arg(out_s)
            .arg((ESP_SIZE / 1024).to_string()),
        "making the ESP (mkfs.vfat)",
    )?;
    let image = out_s.to_owned();
    let mcopy = |args: &[&str]| {
        let mut c = Command::new("mcopy");
        c.env("TZ", "UTC")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &image, "-m", "-Q"])
            .args(args);
        run(&mut c, "filling the ESP (mcopy)").map(drop)
    };
    let s = |rel: &str| stage.join(rel).to_string_lossy().into_owned();
    mcopy(&["-s", &s("EFI"), "::/"])?;
    mcopy(&["-s", &s("loader"), "::/"])?;
    mcopy(&[&s("files/loader.conf"), "::/loader/loader.conf"])?;
    mcopy(&[&s("files/vmlinuz"), "::/vmlinuz"])?;
    mcopy(&[&s("files/initrd.img"), "::/initrd.img"])?;
    Ok(())
}

/// Every path under `dir` (itself included), sorted.
fn walk_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        i += 1;
        let meta = std::fs::symlink_metadata(&p).map_err(Error::io(&p, "reading the tree"))?;
        if meta.is_dir() {
            let mut names: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(Error::io(&p, "reading the tree"))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .map_err(Error::io(&p, "reading the tree"))?;
            names.sort();
            out.extend(names);
        }
    }
    Ok(out)
}

/// Makes the ext4 root image `out` (`size` bytes) from the tree `root`.
pub fn make_root(
    work: &Path,
    root: &Path,
    ids: &Ids,
    sde: u64,
    size: u64,
    out: &Path,
) -> Result<()> {
    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF).map_err(Error::io(&conf, "writing mke2fs.conf"))?;
    let fake_time = sde.to_string();
    run(
        Command::new("mkfs.ext4")
            .env("MKE2FS_CONFIG", &conf)
            .env("E2FSPROGS_FAKE_TIME", &fake_time)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "root",
                "-U",
                &ids.root_fs,
                "-E",
            ])
            .arg(format!(
                "hash_seed={},lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                ids.root_hash_seed
            ))
            .arg("-d")
            .arg(root)
            .arg(out)
            .arg(format!("{}k", size / 1024)),
        "making the root filesystem (mkfs.ext4)",
    )?;
    // mke2fs 1.47.0 copies atime, ctime and crtime from the staging tree;
    // set them all to SOURCE_DATE_EPOCH (mtimes were clamped before).
    let cmds = work.join("debugfs.cmds");
    let mut text = String::new();
    for path in walk_sorted(root)? {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let rel = format!(
            "/{}",
            rel.to_str().ok_or_else(|| {
                Error::input(&path, "the image root holds a name that is not UTF-8")
            })?
        );
        // debugfs's parser takes a double-quoted argument verbatim up to
        // the next quote; a backslash is an ordinary character.
        if rel.contains(['"', '\n']) {
            return Err(Error::input(
                &path,
                "the image root holds a name with a double quote or newline",
            ));
        }
        for field in ["atime", "ctime", "crtime"] {
            text.push_str(&format!("sif \"{rel}\" {field} @{sde}\n"));
        }
    }
    std::fs::write(&cmds, text).map_err(Error::io(&cmds, "writing debugfs commands"))?;
    run(
        Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", &fake_time)
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(out),
        "dating the root filesystem (debugfs)",
    )?;
    Ok(())
}

/// Writes the disk `out`: the GPT by sfdisk, then the partition images at
/// their offsets; returns the ESP's and the root's SHA-256, taken as they
/// are copied.
pub fn assemble(
    layout: &Layout,
    ids: &Ids,
    esp: &Path,
    root: &Path,
    work: &Path,
    out: &Path,
) -> Result<(Sha256, Sha256)> {
    let disk = File::create(out).map_err(Error::io(out, "creating the disk image"))?;
    disk.set_len(layout.size)
        .map_err(Error::io(out, "sizing the disk image"))?;
    let script = work.join("gpt.sfdisk");
    let sectors = |b: u64| b / 512;
    std::fs::write(
        &script,
        format!(
            "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\ntable-length: 128\nsector-size: 512\n\n\
             start={}, size={}, type={ESP_TYPE}, uuid={}, name=\"esp\"\n\
             start={}, size={}, type={ROOT_TYPE}, uuid={}, name=\"root\"\n",
            ids.disk,
            sectors(layout.esp_start),
            sectors(ESP_SIZE),
            ids.esp_part,
            sectors(layout.root_start),
            sectors(layout.root_size),
            ids.root_part,
        ),
    )
    .map_err(Error::io(&script, "writing the partition table script"))?;
    let stdin =
        File::open(&script).map_err(Error::io(&script, "reading the partition table script"))?;
    run(
        Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel", "--wipe", "never"])
            .arg(out)
            .stdin(stdin),
        "writing the partition table (sfdisk)",
    )?;
    let esp_sha = copy_at(esp, &disk, layout.esp_start, ESP_SIZE, out)?;
    let root_sha = copy_at(root, &disk, layout.root_start, layout.root_size, out)?;
    disk.sync_all()
        .map_err(Error::io(out, "syncing the disk image"))?;
    Ok((esp_sha, root_sha))
}

/// Copies the partition image `from` (exactly `size` bytes) into `disk` at
/// `offset`, skipping all-zero blocks (the disk file reads them as zeros);
/// returns the SHA-256 of every byte copied.
fn copy_at(from: &Path, disk: &File, offset: u64, size: u64, disk_path: &Path) -> Result<Sha256> {
    let src = File::open(from).map_err(Error::io(from, "reading a partition image"))?;
    let len = src
        .metadata()
        .map_err(Error::io(from, "reading a partition image"))?
        .len();
    if len != size {
        return Err(Error::usage(
            from.display(),
            format!("the partition image is {len} bytes, its partition {size}"),
        ));
    }
    let mut buf = vec![0u8; MIB as usize];
    let mut digest = HashingWriter::new(std::io::sink());
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(MIB) as usize;
        src.read_exact_at(&mut buf[..n], at)
            .map_err(Error::io(from, "reading a partition image"))?;
        std::io::Write::write_all(&mut digest, &buf[..n])
            .map_err(Error::io(from, "hashing a partition image"))?;
        if buf[..n].iter().any(|b| *b != 0) {
            disk.write_all_at(&buf[..n], offset + at)
                .map_err(Error::io(disk_path, "writing the disk image"))?;
        }
        at += n as u64;
    }
    Ok(digest.finish().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_distinct_and_well_formed() {
        let a = Ids::new("base 0.1.0");
        assert_eq!(a, Ids::new("base 0.1.0"));
        assert_ne!(a.disk, Ids::new("base 0.1.1").disk);
        let all = [
            &a.disk,
            &a.esp_part,
            &a.root_part,
            &a.root_fs,
            &a.root_hash_seed,
        ];
        for u in all {
            assert_eq!(u.len(), 36);
            assert_eq!(&u[14..15], "8", "{u}");
            assert!("89ab".contains(&u[19..20]), "{u}");
        }
        let set: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(set.len(), all.len());
        assert_eq!(a.esp_serial.len(), 8);
    }

    #[test]
    fn layout_fills_the_disk() {
        let l = Layout::new(2048 * MIB);
        assert_eq!(l.esp_start, MIB);
        assert_eq!(l.root_start, 257 * MIB);
        assert_eq!(l.root_start + l.root_size, 2047 * MIB);
    }
}
