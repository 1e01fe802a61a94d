#!/bin/bash
# The image tests' per-boot report (tests/cli/bootable_image.rs): cloud-init's
# scripts-per-boot runs it at the end of every boot (it arrives as user-data
# write_files, never in the image). It prints `===== BEGIN bN-name =====` ...
# `===== END bN-name rc=R =====` sections on the serial console, N the boot's
# number, then does the plan's step for that boot: `apply` (release 2 from the
# disk labelled RELEASE2) or `rollback`, then a reboot; `signers` (try to
# start the Monad signer without its secrets); `done` (power off). The test
# prepends `plan=(...)`.
set -u
# Every line goes through a fresh open of the console: a getty starting on
# ttyS0 hangs up (vhangup) every descriptor opened before it, and writes
# through those fail from then on.
exec </dev/null >/dev/null 2>&1
# A getty that starts while a long block is being written hangs up the
# descriptor halfway: the block is written again through a fresh open (the
# parser keeps the last BEGIN before an END, so a cut copy is ignored).
say() {
  local format=$1 _
  shift
  for _ in 1 2 3; do
    # shellcheck disable=SC2059 # the format is each caller's literal
    printf "$format" "$@" >/dev/ttyS0 && return 0
    sleep 1
  done
}
dmesg -n 1 || true
kill -s SIGRTMIN+21 1 || true
counter=/var/lib/infrakit-image-test.boots
n=$(($(cat "$counter" 2>/dev/null || echo 0) + 1))
echo "$n" >"$counter"
sync

section() {
  local name="b$n-$1" out rc
  out=$(timeout 120 bash -c "$2" 2>&1)
  rc=$?
  say '===== BEGIN %s =====\n%s\n===== END %s rc=%d =====\n' "$name" "$out" "$name" "$rc"
}

section hostname 'hostname'
section multi-user 'systemctl is-active multi-user.target'
section status '/usr/local/bin/infrakit status --json'
section sshd-T 'mkdir -p /run/sshd; sshd -T -C user=admin,host=vm,addr=127.0.0.1'
section nft 'nft list table inet infrakit'
section units 'systemctl list-units --type=service --all --no-legend --plain --no-pager'
section root-size 'lsblk -bno SIZE /dev/disk/by-partlabel/root; df -B1 --output=size / | tail -n 1'
section efi 'findmnt -no FSTYPE /boot/efi; ls /boot/efi/EFI/BOOT'

step=${plan[$((n - 1))]:-done}
case $step in
  apply)
    mkdir -p /mnt/release2
    section apply 'mount -o ro /dev/disk/by-label/RELEASE2 /mnt/release2 && /usr/local/bin/infrakit apply /mnt/release2/base.tar.zst'
    ;;
  rollback)
    section rollback '/usr/local/bin/infrakit rollback'
    ;;
  signers)
    section signer-start 'systemctl start --job-mode=ignore-requirements monad-bft.service'
    section signer-show 'systemctl show -p ActiveState -p Result -p AssertResult -p ExecMainStartTimestampMonotonic monad-bft.service'
    ;;
esac
case $step in
  apply | rollback)
    say '===== BOOT %s DONE =====\n' "$n"
    systemctl reboot
    ;;
  *)
    say '===== REPORT DONE =====\n'
    systemctl poweroff
    ;;
esac
