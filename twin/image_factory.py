"""The twin's Image Factory: the schematics API of siderolabs/image-factory on 127.0.0.1.

- `POST /schematics` with a YAML (or JSON) schematic: 201 and `{"id": ..., "schematic": ...}`; a body that is
  not a schematic (unknown fields: the factory decodes with KnownFields) is 400 with the decoder's message
  (internal/frontend/http/configuration.go handleSchematicCreate, pkg/schematic Unmarshal; http.go maps the
  InvalidErrorTag to 400).
- `GET /schematics/<id>`: the schematic as YAML, or 404 `schematic not found` (handleSchematicGet).

The ID is the SHA-256 of the schematic as the factory marshals it (pkg/schematic Schematic.ID), computed by
homelab.versions.schematic_id, which is checked against IDs the real factory gave (docs/twin.md). What it
registers goes into `World.schematics`, from which the twin's talosctl decides whether an installer image of
the factory can be pulled. The installer images themselves are not served: nothing pulls them.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

import yaml

from twin.state import World

_SCHEMATIC_KEYS = {"overlay", "customization"}
_CUSTOMIZATION_KEYS = {"embeddedMachineConfiguration", "extraKernelArgs", "meta", "systemExtensions", "bootloader",
                       "secureboot", "diskImage"}


def _invalid(doc: Any) -> str | None:
    """What the factory's strict decoder says about a body that is not a schematic; None when it is one."""
    if not isinstance(doc, dict):
        return f"yaml: unmarshal errors:\n  line 1: cannot unmarshal !!{type(doc).__name__} into schematic.Schematic"
    for key in doc:
        if key not in _SCHEMATIC_KEYS:
            return f"yaml: unmarshal errors:\n  line 1: field {key} not found in type schematic.Schematic"
    custom = doc.get("customization") or {}
    if not isinstance(custom, dict):
        return "yaml: unmarshal errors:\n  line 1: cannot unmarshal into schematic.Customization"
    for key in custom:
        if key not in _CUSTOMIZATION_KEYS:
            return f"yaml: unmarshal errors:\n  line 2: field {key} not found in type schematic.Customization"
    return None


class ImageFactory:
    def __init__(self, world: World, endpoint: str = "/schematics") -> None:
        self.world = world
        self.endpoint = endpoint.rstrip("/") or "/schematics"
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.host, self.port = "127.0.0.1", 0

    @property
    def registry(self) -> str:
        """host:port, what talhelper's `imageFactory.registryURL` names."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        factory = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                factory.requests.append((self.command, self.path, code))
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                if self.path.rstrip("/") != factory.endpoint:
                    return self._reply(404, b"404 page not found\n", "text/plain; charset=utf-8")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, 1 << 20))
                try:
                    doc = yaml.safe_load(raw) if raw.strip() else {}
                except yaml.YAMLError as e:
                    return self._reply(400, f"{e}\n".encode(), "text/plain; charset=utf-8")
                problem = _invalid(doc if doc is not None else {})
                if problem:
                    return self._reply(400, f"{problem}\n".encode(), "text/plain; charset=utf-8")
                from homelab.versions import schematic_id, schematic_yaml

                sid = schematic_id(doc or {})
                with factory.world.lock:
                    factory.world.schematics.setdefault(sid, dict(doc or {}))
                body = json.dumps({"id": sid, "schematic": schematic_yaml(doc or {})}).encode() + b"\n"
                return self._reply(201, body, "application/json")

            def do_GET(self) -> None:
                prefix = factory.endpoint + "/"
                if not self.path.startswith(prefix):
                    return self._reply(404, b"404 page not found\n", "text/plain; charset=utf-8")
                sid = self.path[len(prefix):]
                with factory.world.lock:
                    schematic = factory.world.schematics.get(sid)
                if schematic is None:
                    return self._reply(404, b"schematic not found\n", "text/plain; charset=utf-8")
                from homelab.versions import schematic_yaml

                return self._reply(200, schematic_yaml(schematic).encode(), "application/yaml")

        httpd = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"image-factory:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
