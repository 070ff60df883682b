"""Shared integration fixtures: one real Prefect server per session, and ASGI apps under real uvicorn.

The session's Prefect server is a `homelab server` subprocess (redis-server beside it, leases in redis),
the way the lock is meant to run. `prefect_server` is its handle: a test can kill -9 it with everything
it started and start it again on the same port and home.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from deployments.server import INSTALL_HINT, start_time

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


def process_tree(root: int) -> list[int]:
    """root and every live process below it, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        if start_time(pid) is not None:
            tree.append(pid)
            queue.extend(children.get(pid, []))
    return tree


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := [p for p in pids if start_time(p) is not None]:
        assert time.monotonic() < deadline, f"processes {alive} still alive {timeout} s after SIGKILL"
        time.sleep(0.02)


class PrefectServer:
    """`homelab server` on a fixed port and home, as a subprocess of the tests."""

    def __init__(self, home: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.home, self.port, self.log, self.env = home, port, log, env or {}
        self.url = f"http://127.0.0.1:{port}/api"
        self.proc: subprocess.Popen[str] | None = None
        self.start_seconds = 0.0

    def start(self, timeout: float = 120.0) -> None:
        """Start it and return once it printed its URL, i.e. once the API answers."""
        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        self._close()  # the pipe of a server killed from outside
        began = time.monotonic()
        # No UI: nothing tests it, and it costs start time.
        env = {**os.environ, "PREFECT_SERVER_UI_ENABLED": "false", **self.env}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "homelab", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--home", str(self.home)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                # Its own session: a Ctrl-C at the terminal reaches pytest only, whose teardown stops it.
                start_new_session=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != self.url:
            self.kill()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"homelab server printed {line!r} instead of {self.url} (log {self.log}):\n{tail}")
        self.start_seconds = round(time.monotonic() - began, 1)

    def processes(self) -> list[int]:
        """The server and everything it started that still runs."""
        return process_tree(self.proc.pid) if self.proc is not None else []

    def kill(self) -> None:
        """SIGKILL the server and everything it started, all at once, and wait until they are gone."""
        if self.proc is None:
            return
        pids = self.processes()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self._close()
        wait_gone(pids)

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as a service manager stops it: it must stop everything it started and exit 0."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = self.processes()
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close()
        wait_gone(pids)
        assert code == 0, f"homelab server exited with {code} on SIGTERM (log {self.log})"


@pytest.fixture(scope="session")
def redis_installed(require_package: Callable[[str], None]) -> None:
    """Skip without redis-server; in CI (CI=true) its absence is a failure."""
    if not shutil.which("redis-server"):
        require_package(f"the Prefect server of the integration tests needs redis-server: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, redis_installed: None) -> Iterator[PrefectServer]:
    """The session's `homelab server` (SQLite and redis data in a temp home); see PrefectServer."""
    base = tmp_path_factory.mktemp("prefect-server")
    server = PrefectServer(base / "home", free_port(), base / "server.log")
    server.start()
    print(f"\nhomelab server ready after {server.start_seconds} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_homelab_server(tmp_path: Path, redis_installed: None) -> Iterator[Callable[..., PrefectServer]]:
    """Start another `homelab server` (own port and home; `env` added to its environment); stopped after the test."""
    servers: list[PrefectServer] = []

    def start(env: dict[str, str] | None = None) -> PrefectServer:
        base = tmp_path / f"server{len(servers)}"
        base.mkdir()
        server = PrefectServer(base / "home", free_port(), base / "server.log", env)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api_url(prefect_server: PrefectServer) -> Iterator[str]:
    """The session server's API URL; PREFECT_API_URL points at it for the whole session."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        # Also the process-wide settings, as prefect_test_harness does: code running in a context copied
        # before this fixture (threads of session fixtures) must reach this server too.
        with _temporary_global_settings_context(get_settings_context()):
            yield prefect_server.url
            _drain_workers()


def _drain_workers() -> None:
    """Send the logs and events still queued before the server stops, as prefect_test_harness does."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


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


# --- PostgreSQL, servers for a whole module, services ----------------------------------------------

POSTGRES_INSTALL_HINT = ("install the Debian package postgresql: scripts/install-system-packages.sh as root "
                         "(apt-get install --no-install-recommends postgresql)")


def postgres_bindir() -> Path | None:
    """Where initdb and postgres are. Debian keeps a server's programs off PATH, in
    /usr/lib/postgresql/<major>/bin, majors side by side: the newest is taken. Elsewhere, initdb on PATH."""
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()]
    if debian:
        return max(debian, key=lambda d: int(d.parts[-2]))
    initdb = shutil.which("initdb")
    # A symlink on PATH leads to the directory that holds the server's other programs too.
    return Path(initdb).resolve().parent if initdb else None


@pytest.fixture(scope="session")
def postgres_installed(require_package: Callable[[str], None]) -> Path:
    """PostgreSQL's bin directory; skips without it (fails under CI=true)."""
    bindir = postgres_bindir()
    if bindir is None:
        require_package(f"the PostgreSQL-backed Prefect server needs initdb and postgres: {POSTGRES_INSTALL_HINT}")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            require_package(f"as root the tests run PostgreSQL as the system user postgres, which Debian's "
                            f"package creates; there is none: {POSTGRES_INSTALL_HINT}")
    return bindir


class Postgres:
    """A PostgreSQL cluster of the tests' own, like the chart's database: initdb into a fresh directory,
    the server on 127.0.0.1 and a free port with password (SCRAM) authentication over TCP, its socket only
    in that directory (where trust lets the superuser in: only the directory's owner and root reach it).

    initdb and postgres refuse to run as root, so as root both run as Debian's system user `postgres`,
    which then owns the directory (made with mkdtemp in the system's temp dir, which that user can reach:
    pytest's own temp dirs are private to the user running the tests)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="homelab-pg-"))
        self.data, self.log = self.directory / "data", self.directory / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_owner: dict[str, Any] = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        # Nothing of the caller's PG* variables (PGHOST, PGPORT, PGDATA…) may redirect these programs.
        self._env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "HOME": str(self.directory)}

    def _run(self, program: str, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([str(self.bindir / program), *args], input=stdin, capture_output=True, text=True,
                              timeout=60, env=self._env, cwd=self.directory, **self._as_owner)
        if done.returncode != 0:
            raise RuntimeError(f"{program} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def start(self, timeout: float = 60.0) -> None:
        self._run("initdb", "--pgdata", str(self.data), "--username", "postgres", "--auth-local", "trust",
                  "--auth-host", "scram-sha-256", "--encoding", "UTF8", "--locale", "C",
                  # The data directory is thrown away after the module: no need to wait for the disk.
                  "--no-sync")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.directory}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env, cwd=self.directory,
                # Its own session: a Ctrl-C at the terminal reaches pytest only, whose teardown stops it.
                start_new_session=True, **self._as_owner)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sql("SELECT 1")
                return
            except RuntimeError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
                    self.stop()
                    raise RuntimeError(f"postgres on 127.0.0.1:{self.port} did not start:\n{tail}") from None
                time.sleep(0.1)

    def sql(self, statements: str, database: str = "postgres") -> str:
        """Run statements as the superuser over the socket; rows as `psql -At` prints them. The statements
        go through stdin, not argv, since they may hold a password."""
        return self._run("psql", "--no-psqlrc", "--host", str(self.directory), "--port", str(self.port),
                         "--username", "postgres", "--dbname", database, "--set", "ON_ERROR_STOP=1",
                         "--no-align", "--tuples-only", "--quiet", stdin=statements)

    def create_database(self, name: str, owner: str, password: str) -> str:
        """A login role (not a superuser, as the chart's `prefect`) owning a new database; its URL for the
        Prefect server. name, owner and password must be plain words: they are not quoted."""
        self.sql(f"CREATE ROLE {owner} LOGIN PASSWORD '{password}';\nCREATE DATABASE {name} OWNER {owner};\n")
        return f"postgresql+asyncpg://{owner}:{password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT is the fast shutdown; SIGTERM would wait for every client to disconnect.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres(postgres_installed: Path) -> Iterator[Postgres]:
    """A started PostgreSQL cluster for the module; see Postgres."""
    cluster = Postgres(postgres_installed)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def start_module_homelab_server(tmp_path_factory: pytest.TempPathFactory,
                                redis_installed: None) -> Iterator[Callable[..., PrefectServer]]:
    """start_homelab_server for a whole module: the servers it starts stop after the module's last test."""
    servers: list[PrefectServer] = []

    def start(env: dict[str, str] | None = None) -> PrefectServer:
        base = tmp_path_factory.mktemp("module-server")
        server = PrefectServer(base / "home", free_port(), base / "server.log", env)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@contextmanager
def _prefect_pointed_at(url: str, auth_string: str | None = None) -> Iterator[None]:
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string is not None:
        updates[PREFECT_API_AUTH_STRING] = auth_string
    # Process-wide too, as prefect_api_url does; nested inside it when the session server is in use.
    with temporary_settings(updates), _temporary_global_settings_context(get_settings_context()):
        try:
            yield
        finally:
            _drain_workers()


@pytest.fixture(scope="session")
def prefect_pointed_at() -> Callable[..., AbstractContextManager[None]]:
    """`with prefect_pointed_at(url, auth_string=None):` this process's Prefect clients (blocks, flows run
    in-process, get_client) use that server instead of the session's."""
    return _prefect_pointed_at


class Service:
    """A command run the way a service manager runs one: its own session, exactly the environment given,
    its output appended to a log. stop() does what systemd's KillMode=control-group does: SIGTERM to the
    process and to everything below it, SIGKILL to whatever still runs after the grace."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.argv, self.log = argv, log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 30.0) -> int | None:
        """Its exit code, or None when it had to be killed."""
        # Collected first: children whose parent exits are re-parented and could no longer be found.
        started = {pid: start_time(pid) for pid in process_tree(self.proc.pid)}
        for pid, began in started.items():
            if start_time(pid) == began:  # not a new process that reuses the id
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        code: int | None = None
        try:
            code = self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        while (alive := [p for p, b in started.items() if start_time(p) == b]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
            code = None
        wait_gone(alive)
        return code


@pytest.fixture(scope="module")
def start_service() -> Iterator[Callable[..., Service]]:
    """Start a Service (argv, env, cwd, log); every one still running is stopped after the module."""
    services: list[Service] = []

    def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Service:
        service = Service(argv, env, cwd, log)
        services.append(service)
        return service

    yield start
    for service in services:
        if service.proc.poll() is None:
            service.stop()


class TcpProxy:
    """A loopback TCP proxy in front of the Prefect server whose cable can be pulled: `cut()` resets
    every connection and refuses new ones; `restore()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="test-proxy").start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone leaves the port accepting.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()  # linger 0: a reset, as a dropped connection looks to the client
            except OSError:
                pass

    def restore(self) -> None:
        self.start()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """tcp_proxy(port): a started TcpProxy in front of 127.0.0.1:port; cut and closed at teardown."""
    proxies: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        proxies.append(TcpProxy(port).start())
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.cut()
