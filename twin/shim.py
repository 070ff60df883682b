"""The executables in workdir/bin: tiny stdlib-only scripts that forward to the control endpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE = '''#!{python} -S
# {tool} of the simulated homelab: forwards argv, cwd and environment to the twin at {url}.
# One HTTP/1.0 request on a plain socket: importing http.client would cost ~20 ms of every call, twice what
# starting the real talosctl (a Go binary) costs.
import json, os, socket, sys
body = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "caller": os.getppid(),
                   "env": {{k: v for k, v in os.environ.items() if k in {env_keys!r}}}}}).encode()
head = ("POST /{tool} HTTP/1.0\\r\\nContent-Type: application/json\\r\\nX-Twin-Token: {token}\\r\\n"
        "Content-Length: %d\\r\\n\\r\\n" % len(body)).encode()
try:
    with socket.create_connection(({host!r}, {port})) as conn:
        conn.sendall(head + body)
        chunks = []
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks).partition(b"\\r\\n\\r\\n")[2])  # every answer is JSON, errors too
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
