"""`homelab server`: a Prefect server on one machine whose concurrency leases survive a restart.

Prefect keeps the leases of global concurrency limits in memory unless told otherwise
(`PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE` defaults to `prefect.server.concurrency.lease_storage.memory`,
prefect/settings/models/server/concurrency.py), while the slots they hold are counted in the database.
A restart then forgets every lease and keeps its slot: the `homelab-disruption` lock stays taken for
good, and a holder that survived the restart can no longer renew (`POST /v2/concurrency_limits/leases/
{id}/renew` answers 410, prefect/server/api/concurrency_limits_v2.py). So this command runs, side by side:

- a redis-server bound to 127.0.0.1 whose append-only file lives in the home and is fsynced on every
  write (`appendfsync always`): a lease created just before a SIGKILL is there after the restart;
- `prefect server start` with the lease storage of prefect-redis (prefect_redis/lease_storage.py),
  pointed at that redis, and its database: SQLite in the home, or a PostgreSQL given by URL; its
  repossessor (prefect/server/services/repossessor.py) frees the slots of a lease nobody renews, on its
  next pass after the lease expires.

It prints the API URL once the server answers, and runs until SIGINT or SIGTERM, which stop the Prefect
server first (it may still be writing leases) and redis second. SIGKILL of this process kills both
children too: each is started with PR_SET_PDEATHSIG, so the kernel kills it the moment its parent dies,
whatever killed the parent, and in a process group of its own, so a Ctrl-C in a terminal reaches only
this process and the shutdown keeps its order. Their ids and start times are kept in `server.pids`, and
a later start on the same home kills any that still live: should a death signal ever be missed, a second
redis must not write the same append-only file. A lock on `server.lock` keeps two of these off one home, and the kernel drops it when its
holder dies, so a killed server leaves no stale lock. When a child dies on its own the whole server
stops with exit code 1: the database and the leases are on disk, and a restart by the service manager
brings both back together.

Linux only (PR_SET_PDEATHSIG, /proc). Run it as a process of its own: the children are started with a
preexec hook, which is unsafe in a process with threads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORT = 4200
LEASE_STORAGE = "prefect_redis.lease_storage"
# The server's default pass is every 15 s; the lock's lease is 60 s (the server's minimum), so a
# killed holder's slot frees within 65 s instead of 75 s.
REPOSSESSOR_LOOP_SECONDS = 5.0
INSTALL_HINT = ("install the Debian package redis-server: scripts/install-system-packages.sh as root "
                "(apt-get install --no-install-recommends redis-server)")
DATABASE_URL_ENV = "HOMELAB_DATABASE_URL"
# Prefect's own names for the database URL (prefect/settings/models/server/database.py, connection_url,
# the first wins): one set where this command starts is used, not silently replaced by SQLite.
PREFECT_DATABASE_URL_ENVS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
# The async drivers Prefect's server accepts: it picks its configuration by dialect
# (server/database/dependencies.py) and opens the URL with SQLAlchemy's create_async_engine, which
# refuses a sync driver such as plain postgresql:// (psycopg2) only once the server is starting.
DATABASE_SCHEMES = ("postgresql+asyncpg", "sqlite+aiosqlite")
# The inherited environment passes through to the Prefect server, except these: a redis URL there
# would win over the host and port set here (prefect_redis/client.py, RedisMessagingSettings), and the
# database URL is the one set here under Prefect's first name.
_DROPPED_PREFIXES = ("PREFECT_REDIS_MESSAGING_",)
_DROPPED_NAMES = frozenset({*PREFECT_DATABASE_URL_ENVS, DATABASE_URL_ENV})
_PR_SET_PDEATHSIG = 1
_STOP_SECONDS = 10.0


class ServerError(Exception):
    """The server cannot start: the message says what is wrong and what to do. `code` is the exit code:
    2 for a configuration to fix (redis-server missing, the home in use), 1 for a start that failed."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "homelab" / "server"


def api_url(host: str, port: int) -> str:
    return f"http://{_url_host(host)}:{port}/api"


def redis_args(executable: str, directory: Path, port: int) -> list[str]:
    """The redis-server command line: local only, every write fsynced to the append-only file."""
    return [executable,
            "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes",
            "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always",
            # The append-only file is the record; snapshots would only add writes.
            "--save", "",
            "--daemonize", "no", "--logfile", str(directory / "redis.log"), "--loglevel", "notice"]


def sqlite_url(home: Path) -> str:
    return f"sqlite+aiosqlite:///{home / 'prefect.db'}"


def database_url(given: str | None, environ: Mapping[str, str]) -> str | None:
    """The database to use: the one given (--database-url or HOMELAB_DATABASE_URL), else one of Prefect's
    own variables in environ; None for SQLite in the home. Raises ServerError for a URL Prefect cannot use."""
    url = given or next((environ[name] for name in PREFECT_DATABASE_URL_ENVS if environ.get(name)), None)
    if url is None:
        return None
    scheme = urlsplit(url).scheme
    if scheme not in DATABASE_SCHEMES:
        raise ServerError(
            f"database URL {redact(url)}: expected postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE (or "
            f"sqlite+aiosqlite:///PATH), got scheme {scheme or '(none)'!r}; the Prefect server needs an async "
            f"driver", code=2)
    return url


def prefect_settings(home: Path, host: str, port: int, redis_port: int | None = None,
                     redis_url: str | None = None,
                     repossessor_seconds: float = REPOSSESSOR_LOOP_SECONDS,
                     database: str | None = None) -> dict[str, str]:
    """Every setting this command makes for `prefect server start` (docs/server.md lists them)."""
    settings = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database or sqlite_url(home),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": f"{repossessor_seconds:g}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if redis_url is not None:
        settings["PREFECT_REDIS_MESSAGING_URL"] = redis_url
    elif redis_port is not None:
        settings.update({"PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
                         "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
                         "PREFECT_REDIS_MESSAGING_DB": "0"})
    else:
        raise ValueError("a redis port or a redis URL is needed")
    return settings


def child_environment(base: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_NAMES}
    env.update(settings)
    return env


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    # Host and port as written: .hostname lowercases and drops an IPv6 address's brackets, and .port
    # raises on a port that is not a number, in the very message that reports a bad URL.
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


# --- processes ---------------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None]:
    """A preexec hook: the child gets SIGKILL when this process dies."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the hook must not import
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then no death signal would ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a pid reused
    by another process from the one recorded; None when no such process runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def kill_leftovers(pids_file: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL the processes recorded by an earlier server on this home that still run; returns their ids."""
    try:
        recorded = json.loads(pids_file.read_text())
    except (OSError, ValueError):
        return []
    killed = []
    for pid, started in recorded.values():
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(start_time(pid) is not None for pid in killed):
        if time.monotonic() > deadline:
            raise ServerError(f"processes {killed} of an earlier server on {pids_file.parent} survive SIGKILL")
        time.sleep(0.05)
    return killed


def _record(pids_file: Path, procs: Mapping[str, subprocess.Popen[bytes]]) -> None:
    data = {name: [p.pid, start_time(p.pid)] for name, p in procs.items()}
    tmp = pids_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(pids_file)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _connect_host(host: str) -> str:
    """Where to reach a server listening on host: a wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], timeout: float = _STOP_SECONDS) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the server --------------------------------------------------------------------------------


@dataclass
class _Signals:
    received: int | None = None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum


def _ping_redis(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.exceptions.RedisError:  # refused, or still loading its append-only file
        return False


def check_redis(url: str, err: IO[str]) -> None:
    """A redis given by URL must answer; without an fsynced append-only file, say what a restart loses."""
    from prefect_redis.connection import redis_from_url
    from redis.exceptions import RedisError, ResponseError

    shown = redact(url)
    secret = urlsplit(url).password
    try:
        client = redis_from_url(url, socket_timeout=5, socket_connect_timeout=5)
        client.ping()
    except (RedisError, ValueError) as e:
        message = (str(e).replace(secret, "***") if secret else str(e)).rstrip(".")
        raise ServerError(f"redis at {shown} does not answer PING: {message}; start it, or leave out "
                          f"--redis-url to have this command run one", code=2) from None
    try:
        config = client.config_get("append*")
    except ResponseError:  # CONFIG is often disabled on managed redis
        err.write(f"homelab server: cannot read the persistence settings of redis at {shown}; leases survive "
                  f"a restart of that redis only with appendonly yes (and appendfsync always)\n")
        return
    if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
        err.write(f"homelab server: redis at {shown} has appendonly {config.get('appendonly')}, appendfsync "
                  f"{config.get('appendfsync')}: leases written shortly before that redis restarts are lost; "
                  f"set appendonly yes and appendfsync always\n")


def _start_redis(home: Path, signals: _Signals) -> tuple[subprocess.Popen[bytes], int] | None:
    """redis-server and its port once it answers PING; None when a signal came first."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise ServerError(f"redis-server not found: {INSTALL_HINT}", code=2)
    directory = home / "redis"
    directory.mkdir(mode=0o700, exist_ok=True)
    log = directory / "redis.log"
    for _attempt in range(3):
        port = free_port()
        log_size = log.stat().st_size if log.exists() else 0
        proc = subprocess.Popen(redis_args(executable, directory, port), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent(), process_group=0)
        # Loading a long append-only file takes a while; the PING answers once it is loaded.
        deadline = time.monotonic() + 60
        while proc.poll() is None and not signals.received and time.monotonic() < deadline:
            if _ping_redis(port):
                return proc, port
            time.sleep(0.05)
        _stop(proc)
        if signals.received:
            return None
        try:
            with log.open(errors="replace") as f:
                f.seek(log_size)
                new_lines = f.read()
        except OSError:  # it died before opening its log
            break
        # The free port was taken between the check and redis's bind: try another.
        if "Address already in use" not in new_lines:
            break
    raise ServerError(f"redis-server did not start (see {log}):\n{_tail(log)}")


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, home: Path | None = None,
          redis_url: str | None = None, repossessor_seconds: float = REPOSSESSOR_LOOP_SECONDS,
          ready_timeout: float = 120.0, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr,
          database: str | None = None) -> int:
    """Run redis and the Prefect server until SIGINT/SIGTERM (0) or until one of them dies (1).

    `database`: a database URL (see database_url); without one, SQLite in the home. The URL goes to
    `out`; messages to `err`, a real file, which the Prefect server writes to as well. Raises ServerError
    when they cannot start: nothing it started is left running then.
    """
    database = database_url(database, os.environ)
    home = (home or default_home()).expanduser().resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = (home / "server.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise ServerError(f"another homelab server runs on {home}; stop it, or give another --home",
                              code=2) from None
        raise
    pids_file = home / "server.pids"
    signals = _Signals()
    previous = {s: signal.signal(s, signals.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        killed = kill_leftovers(pids_file)
        if killed:
            err.write(f"homelab server: killed {killed}, left running by an earlier server on {home}\n")
        if redis_url is not None:
            check_redis(redis_url, err)
            settings = prefect_settings(home, host, port, redis_url=redis_url,
                                        repossessor_seconds=repossessor_seconds, database=database)
        else:
            started = _start_redis(home, signals)
            if started is None:
                return 0
            procs["redis"], redis_port = started
            _record(pids_file, procs)
            settings = prefect_settings(home, host, port, redis_port=redis_port,
                                        repossessor_seconds=repossessor_seconds, database=database)
        err.write(f"homelab server: database {redact(database) if database else sqlite_url(home)}\n")
        err.flush()
        # Its stdout (a banner) goes to our stderr, so that our stdout carries the URL alone.
        procs["prefect"] = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=child_environment(os.environ, settings), cwd=home, stdin=subprocess.DEVNULL,
            stdout=err.fileno(), stderr=err.fileno(), preexec_fn=_die_with_parent(), process_group=0)
        _record(pids_file, procs)
        _wait_ready(procs, f"http://{_url_host(_connect_host(host))}:{port}/api/health", ready_timeout, signals)
        if signals.received:
            return 0
        out.write(api_url(host, port) + "\n")
        out.flush()
        while not signals.received:
            dead = [name for name, p in procs.items() if p.poll() is not None]
            if dead:
                err.write(f"homelab server: {' and '.join(dead)} exited (code "
                          f"{', '.join(str(procs[n].returncode) for n in dead)}); stopping the rest\n")
                return 1
            time.sleep(0.2)
        return 0
    finally:
        # The Prefect server first: it may still be writing leases to redis while it shuts down.
        for name in ("prefect", "redis"):
            if name in procs:
                _stop(procs[name])
        pids_file.unlink(missing_ok=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
        lock.close()


def _wait_ready(procs: Mapping[str, subprocess.Popen[Any]], health: str, timeout: float, signals: _Signals) -> None:
    # No proxy from the environment: the server is local.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while not signals.received:
        for name, p in procs.items():
            if p.poll() is not None:
                raise ServerError(f"{name} exited with code {p.returncode} before the server was ready "
                                  f"(its output is above)")
        try:
            with opener.open(health, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"the Prefect server did not answer {health} within {timeout:g} s")
        time.sleep(0.1)
