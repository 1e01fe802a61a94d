#!/bin/sh
# InfraKit first boot, written by `infrakit bundle` (docs/first-boot.md).
#
# cloud-init runs this once per instance as its only runcmd entry: cloud-init
# verifies nothing itself and runs runcmd without `set -e`, so all the logic
# is here, and it fails closed. Order: the infrakit binary's sha256 against
# the pin below, then `infrakit apply`, which checks the artifact's signature
# against the pinned keys in /etc/infrakit/keys before anything is laid down,
# and the signed manifest's sha256 against the pin (no other release, however
# validly signed, is applied). On any failure nothing else is changed, the
# reason goes to /var/lib/infrakit/first-boot.failed (`infrakit status`
# reports it), one line goes to the console, and the exit status is 1, so
# `cloud-init status` reports an error.
set -eu
umask 077
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# Pinned by `infrakit bundle`. An empty URL means: on the NoCloud seed volume.
@PINS@

STATE=/var/lib/infrakit
MARKER="$STATE/first-boot.failed"
BIN=/usr/local/bin/infrakit
KEYRING=/etc/infrakit/keys
LOG=/var/log/infrakit-first-boot.log
step='starting'
work=''
mnt=''
recorded=''

cleanup() {
    if [ -n "$mnt" ]; then
        umount "$mnt" 2>/dev/null || true
        rmdir "$mnt" 2>/dev/null || true
    fi
    if [ -n "$work" ]; then
        rm -rf "$work"
    fi
}

# Records why the first boot failed and says so on the console.
record() {
    recorded=1
    reason=$(printf '%s' "$1" | tr -d '\000-\037' | cut -c 1-900)
    if mkdir -p "$STATE" && chmod 0700 "$STATE" &&
        printf '%s\n' "$reason" >"$MARKER.tmp" && mv -f "$MARKER.tmp" "$MARKER"; then
        :
    else
        echo "infrakit first boot: could not write $MARKER" >&2
    fi
    echo "infrakit first boot FAILED: $reason" >&2
}

fail() {
    record "$1"
    exit 1
}

on_exit() {
    rc=$?
    trap - EXIT
    if [ "$rc" -ne 0 ] && [ -z "$recorded" ]; then
        record "$step failed (exit status $rc)"
    fi
    cleanup
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

fetch() {
    curl --fail --silent --show-error --location --proto '=http,https' \
        --retry 5 --retry-connrefused --connect-timeout 20 --max-time 900 \
        --output "$2" "$1"
}

step='checking the pinned keys'
found=''
for key in "$KEYRING"/*.pub; do
    if [ -f "$key" ]; then found=1; fi
done
[ -n "$found" ] || fail "no pinned keys in $KEYRING: nothing can be trusted"

# On disk, not in /run: a tmpfs there holds a few hundred MB at most.
work=$(mktemp -d /var/tmp/infrakit-first-boot.XXXXXX) || fail "cannot make a work directory under /var/tmp"
# apply downloads the artifact into $TMPDIR: on disk too (/tmp may be a tmpfs).
TMPDIR="$work"
export TMPDIR

if [ -z "$INFRAKIT_URL" ] || [ -z "$ARTIFACT_URL" ]; then
    step='mounting the seed volume'
    dev=$(blkid -l -o device -t LABEL=cidata 2>/dev/null || true)
    if [ -z "$dev" ]; then dev=$(blkid -l -o device -t LABEL=CIDATA 2>/dev/null || true); fi
    [ -n "$dev" ] || fail "no NoCloud seed volume (label cidata) to read the release from"
    mnt=$(mktemp -d /run/infrakit-seed.XXXXXX) || fail "cannot make a mount point under /run"
    mount -o ro "$dev" "$mnt" || fail "cannot mount the seed volume $dev"
fi

step='fetching the infrakit binary'
if [ -n "$INFRAKIT_URL" ]; then
    fetch "$INFRAKIT_URL" "$work/infrakit" || fail "cannot download the infrakit binary from $INFRAKIT_URL"
else
    cp "$mnt/infrakit/infrakit" "$work/infrakit" || fail "no infrakit binary on the seed volume"
fi

step='checking the infrakit binary'
got=$(sha256sum "$work/infrakit" | cut -d ' ' -f 1)
[ "$got" = "$INFRAKIT_SHA256" ] ||
    fail "the infrakit binary has sha256 $got, the bundle pins $INFRAKIT_SHA256: refused, nothing installed"

step='installing the infrakit binary'
mkdir -p /usr/local/bin
if ! { cp "$work/infrakit" "$BIN.new" && chmod 0755 "$BIN.new" && mv -f "$BIN.new" "$BIN"; }; then
    fail "cannot install $BIN"
fi

step='applying the release'
if [ -n "$ARTIFACT_URL" ]; then
    src="$ARTIFACT_URL"
else
    src="$mnt/infrakit/$ARTIFACT_NAME"
fi
if ! "$BIN" apply "$src" --keyring "$KEYRING" --adopt --manifest-sha256 "$MANIFEST_SHA256" >"$work/apply.log" 2>&1; then
    cat "$work/apply.log" >>"$LOG" || true
    why=$(grep 'infrakit: error:' "$work/apply.log" | tail -n 1 | sed 's/^infrakit: error: //')
    fail "infrakit apply $RELEASE: ${why:-failed, see $LOG}"
fi
cat "$work/apply.log" >>"$LOG" || true
# The plan (adopted files, hooks run) goes to cloud-init-output.log too.
cat "$work/apply.log" || true
rm -f "$MARKER"
echo "infrakit first boot: $RELEASE is active"
