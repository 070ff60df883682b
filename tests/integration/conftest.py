"""Shared integration fixtures: one real Prefect server per session, and ASGI apps under real uvicorn."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Before Prefect starts its server subprocess, which inherits these.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Stored events become readable within a second instead of five.
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")
# The server renders the links of notifications, so it needs its UI's address, as a real one does
# (see the operator guide).
os.environ.setdefault("PREFECT_UI_URL", "http://prefect.homelab.test")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A real Prefect server (SQLite in a temp dir) for the whole session; PREFECT_API_URL points at it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        url = PREFECT_API_URL.value()
        assert url, "prefect_test_harness started no server"
        yield str(url)


@pytest.fixture
def serve_asgi() -> Iterator[Callable[..., str]]:
    """Start an ASGI app under uvicorn on a free 127.0.0.1 port; returns its base URL. Stopped at teardown."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any, startup_timeout: float = 10.0) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on", access_log=False))
        thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on 127.0.0.1:{port} did not start within {startup_timeout}s")
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
