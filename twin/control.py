"""The loopback control endpoint: the `talosctl` and `ceph` executables in workdir/bin POST their argv
here and print what comes back. Each request runs in its own thread, so `upgrade --wait` blocks only
its caller.
"""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# tool -> fn(argv, cwd, env) -> (stdout, stderr, exit code)
Tool = Callable[[list[str], str, dict[str, str]], tuple[str, str, int]]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    control: ControlServer


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:
        control = self.server.control
        token = self.headers.get("X-Twin-Token", "")
        if not hmac.compare_digest(token, control.token):
            self._reply(403, {"stdout": "", "stderr": "twin control: bad token\n", "code": 1})
            return
        tool = self.path.strip("/")
        fn = control.tools.get(tool)
        if fn is None:
            self._reply(404, {"stdout": "", "stderr": f"twin control: no tool {tool!r}\n", "code": 127})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            argv = [str(a) for a in body.get("argv", [])]
            call = control.called(tool, argv, int(body.get("caller") or 0))
            try:
                stdout, stderr, code = fn(argv, str(body.get("cwd", ".")), dict(body.get("env") or {}))
            finally:
                call.end = time.time()
        except Exception as e:  # the shim must get an answer, never a hung or reset connection
            log.exception("twin %s %r failed", tool, self.path)
            self._reply(200, {"stdout": "", "stderr": f"twin {tool}: internal error: {type(e).__name__}: {e}\n",
                              "code": 1})
            return
        self._reply(200, {"stdout": stdout, "stderr": stderr, "code": code})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the shim went away (interrupted); nothing to tell


# The commands that change a node or the cluster (talosctl v1.11's mutating verbs, ceph's flag changes):
# what the twin's record counts as a run "acting".
_TALOS_ACTS = frozenset({"upgrade", "upgrade-k8s", "reboot", "shutdown", "reset", "rollback", "bootstrap",
                         "apply-config", "patch"})


@dataclass
class Call:
    """One command a shim forwarded: who ran it (the shim's parent process), when it arrived, when the
    twin finished it (wall-clock seconds, comparable across processes)."""

    tool: str
    argv: list[str]
    caller: int
    start: float
    end: float | None = None

    @property
    def acts(self) -> bool:
        words = [a for a in self.argv if not a.startswith("-")]
        if self.tool == "talosctl":
            return any(w in _TALOS_ACTS for w in words[:3]) and "--dry-run" not in self.argv
        if self.tool == "ceph":
            return any(a == "osd" and b in ("set", "unset") for a, b in zip(words, words[1:], strict=False))
        return False


class ControlServer:
    def __init__(self, token: str, host: str = "127.0.0.1") -> None:
        self.token = token
        self.calls: list[Call] = []
        self._calls_lock = threading.Lock()
        self.host = host
        self.tools: dict[str, Tool] = {}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def called(self, tool: str, argv: list[str], caller: int) -> Call:
        call = Call(tool, argv, caller, time.time())
        with self._calls_lock:
            self.calls.append(call)
        return call

    def acts(self) -> list[Call]:
        """Every mutating command received so far, in arrival order."""
        with self._calls_lock:
            return [c for c in self.calls if c.acts]

    def register(self, name: str, fn: Tool) -> None:
        self.tools[name] = fn

    def start(self) -> None:
        httpd = _Server((self.host, 0), _Handler)
        httpd.control = self
        self._httpd = httpd
        self.url = f"http://{self.host}:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="twin-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(2)
        self._httpd = None
        self._thread = None
