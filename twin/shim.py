"""The executables in workdir/bin: tiny stdlib-only scripts that forward to the control endpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE = '''#!{python} -S
# {tool} of the simulated homelab: forwards argv, cwd and environment to the twin at {url}.
import http.client, json, os, sys
body = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "caller": os.getppid(),
                   "env": {{k: v for k, v in os.environ.items() if k in {env_keys!r}}}}})
try:
    conn = http.client.HTTPConnection({host!r}, {port}, timeout=None)
    conn.request("POST", "/{tool}", body, {{"Content-Type": "application/json", "X-Twin-Token": {token!r}}})
    reply = json.loads(conn.getresponse().read())
except (OSError, ValueError) as e:
    sys.stderr.write("{tool}: the simulated homelab at {url} does not answer (" + str(e) + "); is `homelab twin up` running?\\n")
    sys.exit(1)
except KeyboardInterrupt:
    sys.exit(130)
sys.stdout.write(reply["stdout"])
sys.stderr.write(reply["stderr"])
sys.exit(reply["code"])
'''

ENV_KEYS = ("TALOSCONFIG", "CEPH_CONF", "KUBECONFIG", "HOME")


def write_shim(bin_dir: Path, tool: str, url: str, token: str) -> Path:
    """bin_dir/tool, executable, forwarding to the control endpoint at url (http://127.0.0.1:port)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    text = TEMPLATE.format(python=sys.executable, tool=tool, url=url, host=host, port=int(port), token=token,
                           env_keys=ENV_KEYS)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / tool
    tmp = path.with_name(f".{tool}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)
    return path
