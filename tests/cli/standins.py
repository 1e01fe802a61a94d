"""Stand-in inputs for a profile (tests/cli/chain_profiles.rs).

python3 standins.py REPO PROFILE OUTDIR: asks `infrakit inputs PROFILE --json` (the binary in
$INFRAKIT) what the profile's adapters declare, and makes for every input a stand-in with the
declared member paths (a small shell script for each file: GNU-format tarballs with Python's
tarfile, .debs with dpkg-deb). Each is laid out as OUTDIR/<host>/<path> of its upstream URL, to
be served on loopback and reached through `--mirror https://<host>/=<server>/<host>/`. Writes
REPO/profiles/<name>.lock with the stand-ins' digests (image inputs get a made-up digest) and
prints the --mirror arguments, one per upstream host."""
import hashlib, json, os, subprocess, sys, tarfile, io, shutil
from urllib.parse import urlsplit
repo, profile, out = sys.argv[1:4]
binary = os.environ.get("INFRAKIT", "infrakit")
doc = json.loads(subprocess.run([binary, "inputs", profile, "--json"], cwd=repo, check=True, capture_output=True).stdout)
os.makedirs(out, exist_ok=True)
script = b"#!/bin/sh\nexit 0\n"
entries, args = [], []
# Inputs that share an upstream URL (one tarball, members for two binaries)
# share one stand-in holding every member any of them takes.
members_of = {}
for i in doc["inputs"]:
    members_of.setdefault(i["url"], set()).update(i["members"] or [])
for i in doc["inputs"]:
    i["members"] = sorted(members_of[i["url"]])
for i in doc["inputs"]:
    name, kind = i["name"], i["kind"]
    path = os.path.join(out, "made", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "file":
        open(path, "wb").write(script)
    elif kind == "tar":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as t:
            for m in i["members"]:
                ti = tarfile.TarInfo(m); ti.size = len(script); ti.mode = 0o755
                t.addfile(ti, io.BytesIO(script))
        open(path, "wb").write(buf.getvalue())
    elif kind == "deb":
        root = path + ".root"
        shutil.rmtree(root, ignore_errors=True)
        for m in i["members"]:
            p = os.path.join(root, m.lstrip("./"))
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").write(script); os.chmod(p, 0o755)
        os.makedirs(os.path.join(root, "DEBIAN"))
        open(os.path.join(root, "DEBIAN/control"), "w").write(
            "Package: %s\nVersion: %s\nArchitecture: amd64\nMaintainer: T <t@example.org>\nDescription: stand-in\n" % (name, i["version"]))
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, path], check=True, capture_output=True)
    if kind == "image":
        sha = hashlib.sha256(("stand-in image " + name).encode()).hexdigest()
    else:
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        url = urlsplit(i["url"])
        served = os.path.join(out, "served", url.netloc, url.path.lstrip("/"))
        os.makedirs(os.path.dirname(served), exist_ok=True)
        shutil.copyfile(path, served)
        mirror = "%s://%s/" % (url.scheme, url.netloc)
        if mirror not in args:
            args.append(mirror)
    entries.append((name, kind, i["version"], i["url"], sha))
lock = os.path.join(repo, os.path.dirname(profile), os.path.basename(profile)[:-5] + ".lock")
with open(lock, "w") as f:
    f.write("# stand-in lock\n")
    for name, kind, version, url, sha in sorted(entries):
        f.write('\n[[input]]\nname = "%s"\nkind = "%s"\nversion = "%s"\nurl = "%s"\nsha256 = "%s"\n' % (name, kind, version, url, sha))
print(" ".join(args))  # the upstream prefixes to mirror
