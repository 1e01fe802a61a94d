"""Crafts one hostile variant of a genuine infrakit artifact (tests/cli).

usage: craft.py CASE ARTIFACT OUT_DIR VERSION [SMUGGLE]

ARTIFACT is a NAME.tar.zst or NAME.tar.gz built by `infrakit build`, with
NAME.manifest.json beside it. Writes OUT_DIR/NAME.<format> and
OUT_DIR/NAME.manifest.json (version VERSION, every digest made right), so
only infrakit's member checks can refuse the result; the caller signs it.
SMUGGLE is the name of the member some cases hide (default etc/app/smuggled).

The genuine tar is split into its members and written back with the same
encoder infrakit's writer uses (checked: the untouched members come out
byte for byte as they went in), so each case changes only what it names.
Compression is stock zstd, or gzip members written here byte by byte.
"""

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

BLOCK = 512
END = bytes(2 * BLOCK)


def padded(data):
    return data + bytes(-len(data) % BLOCK)


def octal(value, width):
    """tar-rs's number field: zero-filled octal digits, then one NUL."""
    digits = b"%o" % value
    assert len(digits) < width, (value, width)
    return digits.rjust(width - 1, b"0") + b"\0"


def base256(value, width):
    """GNU's binary number field: high bit set, big-endian value."""
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def block(name, kind, size=0, mode=0o644, uid=0, gid=0, mtime=0, link=b"",
          magic=b"ustar  \0", patch=()):
    """One header block as tar-rs's GNU header writes it; `patch` is a list
    of (offset, bytes) written over it before the checksum."""
    h = bytearray(BLOCK)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(uid, 8)
    h[116:124] = octal(gid, 8)
    h[124:136] = octal(size, 12)
    h[136:148] = octal(mtime, 12)
    h[156:157] = kind
    h[157:257] = link[:100].ljust(100, b"\0")
    h[257:265] = magic
    for offset, value in patch:
        h[offset:offset + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = octal(sum(h), 8)
    return bytes(h)


def long_record(kind, value):
    """A GNU long-name (L) or long-link (K) record, as infrakit writes it."""
    return block(b"././@LongLink", kind, size=len(value) + 1) + padded(value + b"\0")


def pax(kind, fields):
    """A PAX extended (x) or global (g) header record."""
    body = b""
    for key, value in fields:
        record = b" " + key + b"=" + value + b"\n"
        length = len(record) + 1
        while len(str(length)) + len(record) != length:
            length = len(str(length)) + len(record)
        body += str(length).encode() + record
    return block(b"././@PaxHeader", kind, size=len(body)) + padded(body)


class Member:
    """One member; `raw()` is what infrakit's writer makes of it, with the
    overrides a case sets (`before`: records ahead of it; `header`: the
    whole header instead; `patch`: bytes over its header block)."""

    def __init__(self, name, kind, size=0, mode=0o644, uid=0, gid=0, mtime=0,
                 link=b"", data=b""):
        self.name, self.kind, self.size = name, kind, size
        self.mode, self.uid, self.gid, self.mtime = mode, uid, gid, mtime
        self.link, self.data = link, data
        self.before, self.header, self.patch = b"", None, ()

    def headers(self):
        if self.header is not None:
            return self.header
        out = self.before
        if len(self.name) > 100:
            out += long_record(b"L", self.name)
        if len(self.link) > 100:
            out += long_record(b"K", self.link)
        return out + block(self.name, self.kind, self.size, self.mode, self.uid,
                           self.gid, self.mtime, self.link, patch=self.patch)

    def raw(self):
        return self.headers() + padded(self.data)


def split(tar):
    """The genuine tar as members (long records folded into them)."""
    members, pos, pending = [], 0, {}
    while True:
        h = tar[pos:pos + BLOCK]
        if h == bytes(BLOCK):
            assert tar[pos:] == END, "infrakit ends with two zero blocks"
            return members
        size = int(h[124:135], 8)
        kind = h[156:157]
        data = tar[pos + BLOCK:pos + BLOCK + size]
        pos += BLOCK + len(padded(data))
        if kind in (b"L", b"K"):
            pending[kind] = data[:-1]
            continue
        field = lambda a, b: h[a:b].rstrip(b"\0")
        members.append(Member(
            pending.pop(b"L", field(0, 100)), kind, size,
            int(h[100:107], 8), int(h[108:115], 8), int(h[116:123], 8),
            int(h[136:147], 8), pending.pop(b"K", field(157, 257)), data))


def zstd(data, *args):
    return subprocess.run(["zstd", "-q", "-c", "--check", *args], input=data,
                          stdout=subprocess.PIPE, check=True).stdout


def gz_member(data, flags=0, extra=b"", fname=b"", xfl=0, os_byte=255):
    """One gzip member (RFC 1952), its header fields as given."""
    out = b"\x1f\x8b\x08" + bytes([flags]) + bytes(4) + bytes([xfl, os_byte])
    if flags & 4:
        out += struct.pack("<H", len(extra)) + extra
    if flags & 8:
        out += fname + b"\0"
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    out += deflate.compress(data) + deflate.flush()
    return out + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def skippable(payload):
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


class Craft:
    """What a case edits: the members, the manifest, and how the tar is
    ended and compressed. `tar` (the stream as a whole) and `seen` (what
    infrakit decodes, when a case hides bytes from it) override."""

    def __init__(self, members, man, smuggle):
        self.members, self.man = members, man
        self.sde = man["source_date_epoch"]
        self.end = END
        self.tar = None
        self.seen = None
        self.fmt = "tar.zst"
        self.compress = zstd
        self.smuggled_name = smuggle.encode()
        self.smuggled = Member(self.smuggled_name, b"0", mtime=self.sde,
                               data=b"smuggled\n", size=9).raw()

    def find(self, name):
        return next(i for i, m in enumerate(self.members)
                    if m.name == name.encode())

    def member(self, name):
        return self.members[self.find(name)]

    def long_file(self):
        """The first regular file with a name over 100 bytes."""
        return next(m for m in self.members if len(m.name) > 100 and m.kind == b"0")

    def entry(self, path):
        return next(e for e in self.man["entries"] if e["path"] == path)

    def add(self, name, kind, data=b"", **kw):
        kw.setdefault("mtime", self.sde)
        m = Member(name.encode(), kind, size=len(data), data=data, **kw)
        self.members.append(m)
        return m

    def add_entry(self, path, kind, **kw):
        e = {"path": path, "type": kind, "mode": kw.pop("mode", "0644"),
             "uid": 0, "gid": 0, "layer": "app"}
        e.update(kw)
        self.man["entries"].append(e)

    def gzip(self, **kw):
        self.fmt = "tar.gz"
        self.compress = lambda data: gz_member(data, **kw)


EMPTY = hashlib.sha256(b"").hexdigest()
CASES = {}


def case(fn):
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


# Controls: the same tar, compressed by other means; accepted.
@case
def identity(c):
    pass


@case
def identity_gz(c):
    c.gzip()


@case
def identity_zstd_19(c):
    c.compress = lambda data: zstd(data, "-19")


# A PAX header and a GNU long-name record naming different paths.
@case
def pax_and_long_name(c):
    m = c.long_file()
    m.before = pax(b"x", [(b"path", c.smuggled_name)])


# Data on a symlink or directory holding a whole member.
@case
def symlink_with_data(c):
    m = c.member("etc/app/current.conf")
    m.size, m.data = len(c.smuggled), c.smuggled


@case
def dir_with_data(c):
    m = c.member("etc/app/")
    m.size, m.data = len(c.smuggled), c.smuggled


# A name that is not UTF-8, listed in the manifest after a lossy conversion.
@case
def non_utf8_name(c):
    c.member("etc/app/a.conf").name = b"etc/app/a.con\xff"
    c.entry("etc/app/a.conf")["path"] = "etc/app/a.con\ufffd"


# Compression: more than one gzip member or zstd frame, bytes after them.
@case
def gzip_second_member(c):
    c.gzip()
    c.seen = b"".join(m.raw() for m in c.members)
    c.tar = gz_member(c.seen) + gz_member(c.smuggled + END)
    c.compress = lambda data: data


@case
def gzip_trailing_bytes(c):
    c.fmt = "tar.gz"
    c.compress = lambda data: gz_member(data) + b"trailing bytes\n"


@case
def gzip_file_name(c):
    c.gzip(flags=8, fname=b"p.tar")


@case
def gzip_extra_field(c):
    c.gzip(flags=4, extra=b"IK\x02\x00hi")


@case
def gzip_os_byte(c):
    c.gzip(os_byte=3)


@case
def zstd_skippable_after(c):
    c.compress = lambda data: zstd(data) + skippable(b"infrakit")


@case
def zstd_skippable_before(c):
    c.compress = lambda data: skippable(b"infrakit") + zstd(data)


@case
def zstd_two_frames(c):
    half = len(c.members) // 2
    first = b"".join(m.raw() for m in c.members[:half])
    c.compress = lambda data: zstd(data[:len(first)]) + zstd(data[len(first):])


# Headers other writers make and other readers honour.
@case
def pax_global_header(c):
    c.members[0].before = pax(b"g", [(b"uid", b"4242")])


@case
def pax_path(c):
    c.member("etc/app/a.conf").before = pax(b"x", [(b"path", c.smuggled_name)])


@case
def pax_mtime(c):
    # The same name again, and an mtime the header does not have.
    m = c.member("etc/app/a.conf")
    m.before = pax(b"x", [(b"path", m.name), (b"mtime", b"1")])


@case
def ustar_prefix(c):
    m = c.long_file()
    prefix, _, base = m.name.rpartition(b"/")
    assert len(prefix) <= 155 and len(base) <= 100, m.name
    m.header = block(base, m.kind, m.size, m.mode, m.uid, m.gid, m.mtime,
                     m.link, magic=b"ustar\x0000", patch=[(345, prefix)])


@case
def long_name_for_short_name(c):
    m = c.member("etc/app/a.conf")
    m.before = long_record(b"L", m.name)


@case
def base256_mtime(c):
    c.member("etc/app/a.conf").patch = [(136, base256(c.sde, 12))]


@case
def base256_size(c):
    m = c.member("etc/app/a.conf")
    m.patch = [(124, base256(m.size, 12))]


@case
def old_regular_type(c):
    c.member("etc/app/a.conf").kind = b"\0"


@case
def sparse(c):
    c.add("zz", b"S")
    c.add_entry("zz", "file", size=0, sha256=EMPTY)


@case
def foreign_encoder(c):
    # Python's tarfile writes the same members (GNU format) its own way.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for m in c.members:
            info = tarfile.TarInfo(m.name.decode())
            info.type, info.mode, info.mtime = m.kind, m.mode, m.mtime
            info.uid, info.gid, info.linkname = m.uid, m.gid, m.link.decode()
            info.size = len(m.data)
            t.addfile(info, io.BytesIO(m.data))
    c.tar = buf.getvalue()


@case
def terminal_escape_name(c):
    c.member("etc/app/a.conf").name = b"etc/app/\x1b]0;owned\x07a.conf"


@case
def file_trailing_slash(c):
    c.member("etc/app/a.conf").name = b"etc/app/a.conf/"


@case
def symlink_target_nul(c):
    c.member("etc/app/current.conf").link = b"a.conf\0/../../x"
    c.entry("etc/app/current.conf")["target"] = "a.conf\0/../../x"


@case
def trailing_zero_blocks(c):
    c.end = END + bytes(8 * BLOCK)


@case
def missing_end(c):
    c.end = b""


# Members that would land outside the release or as something else.
@case
def absolute(c):
    c.member("etc/app/a.conf").name = b"/etc/app/a.conf"


@case
def dotdot(c):
    c.member("etc/app/a.conf").name = b"etc/app/../app/a.conf"


@case
def through_symlink(c):
    c.add("zz", b"2", link=b"etc", mode=0o777)
    c.add("zz/evil", b"0", b"x\n")
    c.add_entry("zz", "symlink", mode="0777", target="etc")
    c.add_entry("zz/evil", "file", size=2, sha256=hashlib.sha256(b"x\n").hexdigest())


@case
def hardlink(c):
    c.add("zz", b"1", link=b"etc/app/a.conf")
    c.add_entry("zz", "file", size=0, sha256=EMPTY)


@case
def device(c):
    c.add("zz", b"3").patch = [(329, octal(1, 8)), (337, octal(3, 8))]
    c.add_entry("zz", "file", size=0, sha256=EMPTY)


@case
def fifo(c):
    c.add("zz", b"6")
    c.add_entry("zz", "file", size=0, sha256=EMPTY)


@case
def setuid(c):
    c.member("usr/bin/app-tool").mode = 0o4755


@case
def duplicate(c):
    a = c.find("etc/app/a.conf")
    c.members.insert(a + 1, c.members[a])


@case
def size(c):
    c.entry("etc/app/a.conf")["size"] += 1


@case
def digest(c):
    m = c.member("etc/app/a.conf")
    m.data = b"a = 9\n"
    assert len(m.data) == m.size


@case
def extra(c):
    c.add("zz", b"0", b"surprise\n")


@case
def truncated(c):
    whole = b"".join(m.raw() for m in c.members) + END
    c.tar = whole[:len(whole) // 2]


@case
def trailing(c):
    c.end = END + padded(b"garbage after the end\n")


def main():
    name, artifact, out_dir, version = sys.argv[1:5]
    smuggle = sys.argv[5] if len(sys.argv) > 5 else "etc/app/smuggled"
    stem = os.path.basename(artifact).rsplit(".tar.", 1)[0]
    man_path = os.path.join(os.path.dirname(artifact), stem + ".manifest.json")
    man = json.load(open(man_path))
    raw = open(artifact, "rb").read()
    if artifact.endswith(".gz"):
        tar = zlib.decompress(raw, 31)
    else:
        tar = subprocess.run(["zstd", "-q", "-d", "-c"], input=raw,
                             stdout=subprocess.PIPE, check=True).stdout
    members = split(tar)
    rewritten = b"".join(m.raw() for m in members) + END
    assert rewritten == tar, "the crafter does not reproduce infrakit's tar"
    c = Craft(members, man, smuggle)
    CASES[name](c)
    tar = c.tar if c.tar is not None else b"".join(m.raw() for m in c.members) + c.end
    seen = c.seen if c.seen is not None else tar
    data = c.compress(tar)
    man["version"] = version
    man["archive"].update(format=c.fmt, sha256=hashlib.sha256(data).hexdigest(),
                          size=len(data), tar_sha256=hashlib.sha256(seen).hexdigest(),
                          tar_size=len(seen))
    # RelPath order: component by component ("/" sorts first).
    man["entries"].sort(key=lambda e: e["path"].encode().replace(b"/", b"\0"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.{c.fmt}"), "wb") as f:
        f.write(data)
    with open(os.path.join(out_dir, stem + ".manifest.json"), "w") as f:
        json.dump(man, f, sort_keys=True, separators=(",", ":"))


if __name__ == "__main__":
    main()
