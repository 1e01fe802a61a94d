"""Decodes user-data files the way cloud-init itself does, with its own
library (run with Debian's /usr/bin/python3, where cloud-init lives):
UserDataProcessor (gzip, MIME) and cc_write_files.extract_contents
(b64, gz+b64). Prints one JSON object per file: its parts' content types,
the cloud-config keys, and every write_files entry with its decoded content
(base64, so any bytes survive JSON). YAML is read with cloud-init's own
util.load_yaml."""

import base64
import json
import sys

from cloudinit import util
from cloudinit.config.cc_write_files import canonicalize_extraction, extract_contents
from cloudinit.user_data import UserDataProcessor


def decode(path):
    with open(path, "rb") as f:
        raw = f.read()
    message = UserDataProcessor({}).process(raw)
    types, configs = [], []
    for part in message.walk():
        if part.get_content_maintype() == "multipart":
            continue
        types.append(part.get_content_type())
        if part.get_content_type() == "text/cloud-config":
            # cloud-init's own loader: it returns None (and cloud-init then
            # ignores the part) where YAML does not parse.
            cfg = util.load_yaml(part.get_payload(decode=True))
            if not isinstance(cfg, dict):
                sys.exit(f"{path}: cloud-init reads no cloud-config from it: {cfg!r}")
            configs.append(cfg)
    out = {"path": path, "types": types, "gzip": raw[:2] == b"\x1f\x8b"}
    if len(configs) == 1:
        cfg = configs[0]
        files = []
        for w in cfg.get("write_files", []):
            content = extract_contents(
                w.get("content", ""), canonicalize_extraction(w.get("encoding"))
            )
            if isinstance(content, str):
                content = content.encode()
            files.append(
                {
                    "path": w["path"],
                    "permissions": w.get("permissions"),
                    "owner": w.get("owner"),
                    "encoding": w.get("encoding"),
                    "content": base64.b64encode(content).decode(),
                }
            )
        cfg["write_files"] = files
        out["config"] = cfg
    return out


print(json.dumps([decode(p) for p in sys.argv[1:]]))
