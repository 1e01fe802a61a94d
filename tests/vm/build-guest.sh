#!/usr/bin/env bash
# Builds the Debian bookworm guest the VM tests boot (tests/cli/vm.rs):
#
#   tests/vm/build-guest.sh OUT
#
# OUT gets rootfs.raw (sparse 3 GiB ext4 made by `mkfs.ext4 -d`), vmlinuz and
# initrd.img (for QEMU's direct kernel boot) and packages.txt (`dpkg -l`).
# It is built in OUT.tmp.$$ and renamed into place, so OUT is either absent or
# complete. Needs root (mmdebstrap's root mode; mkfs.ext4 -d keeps owners),
# mmdebstrap and network access to the mirror. Every file baked into the guest
# is written by this script, so the harness keys its cache on this file's
# content alone. See tests/vm/README.md.
set -euo pipefail

MIRROR=http://deb.debian.org/debian
SUITE=bookworm
DISK_SIZE=3G
PACKAGES=(
  linux-image-cloud-amd64 initramfs-tools systemd-sysv udev
  cloud-init openssh-server nftables fail2ban python3-systemd sudo systemd-timesyncd
  ifupdown isc-dhcp-client curl ca-certificates iproute2 procps netbase
  xz-utils util-linux mount e2fsprogs locales
)

# The test-only report: runs once cloud-init is done, prints one section per
# item to the serial console between markers, then powers the guest off.
# Each section's output is gathered first and printed in one piece, so that
# console messages cannot land inside it.
report_script() {
  cat <<'EOF'
#!/bin/bash
# infrakit-vmtest-report: test-only, baked in by tests/vm/build-guest.sh.
# Prints `===== BEGIN name =====` ... `===== END name rc=N =====` sections
# to /dev/ttyS0 once cloud-init has finished, then powers off.
set -u
exec >/dev/ttyS0 2>&1 </dev/null
# Quieten the console: kernel printk, and systemd's status lines
# (SIGRTMIN+21 to PID 1 turns them off).
dmesg -n 1 || true
kill -s SIGRTMIN+21 1 || true

timeout 300 cloud-init status --wait >/dev/null 2>&1
wait_rc=$?

section() {
  local name=$1 cmd=$2 out rc
  out=$(timeout 120 bash -c "$cmd" 2>&1)
  rc=$?
  if [ -n "$out" ]; then
    printf '===== BEGIN %s =====\n%s\n===== END %s rc=%d =====\n' "$name" "$out" "$name" "$rc"
  else
    printf '===== BEGIN %s =====\n===== END %s rc=%d =====\n' "$name" "$name" "$rc"
  fi
}

section cloud-init-wait "echo 'cloud-init status --wait' rc=$wait_rc; exit $wait_rc"
section cloud-init-status 'cloud-init status --long'
section infrakit-status 'if [ -x /usr/local/bin/infrakit ]; then /usr/local/bin/infrakit status --json; else exit 127; fi'
section sshd-T 'mkdir -p /run/sshd; sshd -T -C user=admin,host=vm,addr=127.0.0.1'
section nft 'nft list ruleset'
section units 'systemctl list-units --type=service --all --no-legend --plain --no-pager'
section failure-marker 'cat /var/lib/infrakit/first-boot.failed'
section admin 'id admin && passwd -S admin'
section first-boot-log 'cat /var/log/infrakit-first-boot.log'
# rc: the first failing of ls and readlink, else 0.
section laid-down 'ls -la /usr/local/bin /var/lib/infrakit /etc/infrakit 2>&1; a=$?; readlink /var/lib/infrakit/current; b=$?; [ "$a" -ne 0 ] && exit "$a"; exit "$b"'
section cloud-init-output 'tail -n 80 /var/log/cloud-init-output.log'
# rc 1: no warning, error or traceback in the log (grep found nothing).
section cloud-init-errors "set -o pipefail; grep -E 'WARNING|ERROR|Traceback' /var/log/cloud-init.log | tail -n 60"
printf '===== REPORT DONE =====\n'
systemctl poweroff
EOF
}

# WantedBy=multi-user.target but ordered after cloud-final.service, which is
# itself After=multi-user.target: with default dependencies the target would
# be ordered after this unit and systemd would break the cycle by dropping a
# job. DefaultDependencies=no avoids the implicit target ordering.
report_unit() {
  cat <<'EOF'
[Unit]
Description=InfraKit VM test report (test-only)
DefaultDependencies=no
Requires=sysinit.target
After=sysinit.target basic.target cloud-final.service

[Service]
Type=oneshot
ExecStart=/usr/local/libexec/infrakit-vmtest-report
StandardOutput=journal
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
}

# Runs as mmdebstrap's customize hook: $1 is the guest's root.
customize() {
  local root=$1
  # Host files mmdebstrap copies in.
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  printf '/dev/vda / ext4 defaults 0 1\n' >"$root/etc/fstab"

  # Offline apt: no sources and no lists, so cloud-init's `packages:`
  # (apt-get update, then apt-get install of installed packages) succeeds
  # without a mirror.
  : >"$root/etc/apt/sources.list"
  rm -rf "$root/etc/apt/sources.list.d"
  mkdir -p "$root/etc/apt/sources.list.d"
  rm -rf "$root/var/lib/apt/lists"
  mkdir -p "$root/var/lib/apt/lists/partial"
  rm -f "$root"/var/cache/apt/*.bin
  chroot "$root" apt-get update
  chroot "$root" apt-get install -y nftables sudo
  if [ -n "$(find "$root/var/lib/apt/lists" -type f -not -name lock -print -quit)" ]; then
    echo "build-guest: apt-get update left package lists behind" >&2
    exit 1
  fi

  # cloud-init's locale module sets LANG=en_US.UTF-8 and fails (status:
  # error) when that locale cannot be generated: have it generated already.
  printf 'en_US.UTF-8 UTF-8\n' >"$root/etc/locale.gen"
  chroot "$root" locale-gen
  chroot "$root" update-locale LANG=en_US.UTF-8

  # No timers that fire at boot, nothing waiting for a network that never
  # comes, no getty writing a login prompt onto the report's console.
  local unit
  for unit in apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
    dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
    systemd-networkd-wait-online.service serial-getty@ttyS0.service; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
  done
  rm -f "$root"/etc/systemd/system/timers.target.wants/*

  # Only the NoCloud seed (and None): no probing of cloud metadata services.
  # Network: cloud-init's fallback (DHCP on the first NIC), rendered as ENI
  # (first in 22.4's renderer priority) for ifupdown's networking.service;
  # QEMU's user-mode DHCP answers it.
  cat >"$root/etc/cloud/cloud.cfg.d/05_infrakit_vmtest.cfg" <<'EOF'
# test-only (tests/vm/build-guest.sh)
datasource_list: [ NoCloud, None ]
EOF
  grep -q '^source /etc/network/interfaces.d/\*' "$root/etc/network/interfaces" || {
    echo "build-guest: /etc/network/interfaces does not source interfaces.d" >&2
    exit 1
  }

  mkdir -p "$root/usr/local/libexec"
  report_script >"$root/usr/local/libexec/infrakit-vmtest-report"
  chmod 0755 "$root/usr/local/libexec/infrakit-vmtest-report"
  report_unit >"$root/etc/systemd/system/infrakit-vmtest-report.service"
  systemctl --root="$root" enable infrakit-vmtest-report.service
}

if [ "${1:-}" = --customize ]; then
  customize "${2:?--customize ROOT}"
  exit 0
fi

out=${1:?usage: build-guest.sh OUT}
[ "$(id -u)" = 0 ] || { echo "build-guest: must run as root (mmdebstrap root mode, mkfs.ext4 -d owners)" >&2; exit 1; }
for t in mmdebstrap mkfs.ext4 dpkg-query; do
  command -v "$t" >/dev/null || { echo "build-guest: $t is missing" >&2; exit 1; }
done
if [ -e "$out" ]; then
  echo "build-guest: $out already exists" >&2
  exit 1
fi

self=$(readlink -f "$0")
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp"

include=$(IFS=,; echo "${PACKAGES[*]}")
# The hook re-enters this script (env var, so any path works; run by bash,
# so it need not be executable).
export INFRAKIT_VMTEST_SELF="$self"
# shellcheck disable=SC2016 # $1 and the variable expand in mmdebstrap's sh.
mmdebstrap --mode=root --variant=minbase --include="$include" \
  --customize-hook='bash "$INFRAKIT_VMTEST_SELF" --customize "$1"' \
  "$SUITE" "$tmp/root" "$MIRROR"

kernels=("$tmp"/root/boot/vmlinuz-*)
initrds=("$tmp"/root/boot/initrd.img-*)
if [ "${#kernels[@]}" != 1 ] || [ ! -f "${kernels[0]}" ]; then
  echo "build-guest: want one kernel, got ${kernels[*]}" >&2
  exit 1
fi
if [ "${#initrds[@]}" != 1 ] || [ ! -f "${initrds[0]}" ]; then
  echo "build-guest: want one initrd, got ${initrds[*]}" >&2
  exit 1
fi
cp "${kernels[0]}" "$tmp/vmlinuz"
cp "${initrds[0]}" "$tmp/initrd.img"
COLUMNS=200 dpkg-query --admindir="$tmp/root/var/lib/dpkg" -l >"$tmp/packages.txt"

truncate -s "$DISK_SIZE" "$tmp/rootfs.raw"
mkfs.ext4 -q -F -L rootfs -d "$tmp/root" "$tmp/rootfs.raw"
rm -rf "$tmp/root"

mv -T "$tmp" "$out"
trap - EXIT
echo "build-guest: $out ready"
