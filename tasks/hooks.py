"""Pre- and post-node hooks: the operator's own shell command, run once per node with a hard deadline.

A hook is the Homelab block's `pre_node_hook` / `post_node_hook` text, run with `bash -c`: it is the
operator's configuration, not input from a run, so a shell is what they expect. Nothing a run is given
reaches that text: the node travels in the environment (HOMELAB_NODE, HOMELAB_NODE_IP).

Why not prefect-shell's ShellOperation (which ran hooks before), as of prefect-shell 0.3.7:
- `ShellOperation.run()` has no deadline. It does start the shell in a session of its own and signals
  that group when it returns (prefect_shell/commands.py: _process_isolation_kwargs,
  _close_sync_process_tree), but it returns only once the shell and every process still holding its
  output pipe have ended (ShellProcess.wait_for_completion reads the pipes to their end). A deadline
  meant abandoning it on a thread, and the abandoned hook went on running: it wrote its file 20 s
  after the flow ended.
- It runs the command with the worker's whole environment plus `env` (commands.py
  ShellOperation._compile_kwargs_sync: `os.environ.copy()` updated with `self.env`), so a hook could
  read PREFECT_API_AUTH_STRING or the webhook secret.
Here the hook gets a session and process group of its own (start_new_session: setsid(2)); at the
deadline the whole group is stopped (SIGTERM, a short grace, SIGKILL) and waited for; and the
environment holds only PATH, HOME, the node and what the block's `hook_env` names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Set per node by the flow; the block's hook_env may not override them.
NODE_VARIABLES = ("HOMELAB_NODE", "HOMELAB_NODE_IP")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
GRACE_S = 5.0
# After SIGKILL the kernel ends the group at once; this only bounds the wait for it to be gone.
REAP_S = 5.0
TAIL_LINES = 40
LINE_CHARS = 400
# hook_env values this long or longer are masked in the captured output; shorter ones ("1", "true")
# would blank out ordinary words and are not credentials anyway.
MASK_MIN_CHARS = 6
MASK = "********"

Logger = logging.Logger | logging.LoggerAdapter[Any]


class HookConfigError(ValueError):
    """The hook's configuration cannot be used (a bad hook_env name, no bash); nothing was run."""


class HookError(Exception):
    """A hook ended badly: which hook, which node, what happened, what was last printed, what to do."""

    def __init__(self, kind: str, node: str, reason: str, next_step: str, tail: list[str] | None = None,
                 exit_code: int | None = None):
        self.kind, self.node, self.reason, self.next_step = kind, node, reason, next_step
        self.tail = list(tail or [])
        self.exit_code = exit_code
        super().__init__(f"{reason}. Next step: {next_step}")


class HookTimedOut(HookError):
    """The hook overran its deadline; its whole process group was stopped."""


class HookAborted(HookError):
    """The caller asked to stop the hook (the run lost its disruption lock); its process group was stopped."""


@dataclass
class HookResult:
    exit_code: int
    seconds: float
    tail: list[str] = field(default_factory=list)
    # The hook's own process ended but left others running in its group; they were stopped.
    stopped_leftovers: bool = False


def hook_field(kind: str) -> str:
    return f"{kind}_node_hook"


def hook_environment(node: str, ip: str, extra: Mapping[str, str] | None = None,
                     base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a hook: PATH and HOME from `base` (the worker's), the block's `extra`
    variables, then the node. Never anything else of `base`."""
    base = os.environ if base is None else base
    # What a hook may rely on from the worker: where programs are and a home directory. Nothing else.
    env = {"PATH": base.get("PATH") or os.defpath, "HOME": base.get("HOME") or str(Path.home())}
    for name, value in (extra or {}).items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise HookConfigError(f"hook_env of the Homelab block: {name!r} is not an environment variable name "
                                  f"(letters, digits and _, not starting with a digit)")
        if name in NODE_VARIABLES:
            raise HookConfigError(f"hook_env of the Homelab block: {name} is set per node by the flow; "
                                  f"remove it from hook_env")
        if not isinstance(value, str):
            raise HookConfigError(f"hook_env of the Homelab block: the value of {name} must be text, "
                                  f"got {type(value).__name__}")
        env[name] = value
    env["HOMELAB_NODE"] = node
    env["HOMELAB_NODE_IP"] = ip
    return env


def mask(line: str, secrets: list[str]) -> str:
    for s in secrets:
        line = line.replace(s, MASK)
    return line


def group_running(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs. Zombies do not count: a child the hook forked is
    reparented to init when the hook's shell dies, and only init can reap it."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _leader_exited(pid: int) -> bool:
    """Whether the hook's shell has exited, without reaping it (WNOWAIT): while it stays a zombie its pid,
    which is the group's id, cannot be given to another process, so killpg cannot hit a stranger."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


class _Output:
    """The hook's merged stdout/stderr, read without blocking; keeps the last lines only."""

    def __init__(self, pipe: Any, secrets: list[str]):
        self._fd = pipe.fileno()
        os.set_blocking(self._fd, False)
        self._pipe = pipe
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._partial = b""
        self._secrets = secrets
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self.closed = False

    def pump(self, wait_s: float) -> None:
        """Read what is there, waiting at most `wait_s` for something to arrive."""
        if self.closed:
            time.sleep(max(0.0, wait_s))
            return
        if not self._sel.select(max(0.0, wait_s)):
            return
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._close()
                return
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            for raw in complete:
                self._add(raw)
            if len(self._partial) > 4 * LINE_CHARS:  # a huge line without a newline: keep its start
                self._add(self._partial)
                self._partial = b""

    def drain(self, within_s: float) -> None:
        """Read until end of output, or `within_s` passes (a process that left the group may hold the pipe)."""
        ends = time.monotonic() + within_s
        while not self.closed and time.monotonic() < ends:
            self.pump(min(0.05, ends - time.monotonic()))

    def _add(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if len(text) > LINE_CHARS:
            text = text[:LINE_CHARS] + " …"
        self.lines.append(mask(text, self._secrets))

    def _close(self) -> None:
        if self._partial:
            self._add(self._partial)
            self._partial = b""
        self.closed = True
        self._sel.close()
        self._pipe.close()

    def finish(self) -> list[str]:
        if not self.closed:
            self._close()
        return list(self.lines)


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float, out: _Output) -> str:
    """SIGTERM to the whole group, `grace_s` for it to end, then SIGKILL; return once no process of the group
    runs (bounded by REAP_S) and the shell is reaped. Says which signals it took."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    ends = time.monotonic() + grace_s
    while group_running(pgid) and time.monotonic() < ends:
        out.pump(0.05)
    how = "SIGTERM"
    if group_running(pgid):
        _signal_group(pgid, signal.SIGKILL)
        how = f"SIGTERM, then SIGKILL after {grace_s:g} s"
        ends = time.monotonic() + REAP_S
        while group_running(pgid) and time.monotonic() < ends:
            out.pump(0.02)
    proc.wait()
    return how


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail_text(tail: list[str], lines: int = 5, chars: int = 600) -> str:
    text = " | ".join(tail[-lines:])
    return text if len(text) <= chars else "…" + text[-chars:]


def run_hook(command: str, *, kind: str, node: str, ip: str, deadline_s: float,
             extra_env: Mapping[str, str] | None = None, grace_s: float = GRACE_S,
             abort: threading.Event | None = None, log: Logger | None = None) -> HookResult:
    """Run one hook for one node; return once it and everything it started have ended.

    Args:
        command: the block's hook text, run with `bash -c`.
        kind: "pre" or "post".
        node, ip: the node, passed as HOMELAB_NODE and HOMELAB_NODE_IP.
        deadline_s: how long the hook may run; then its whole process group is stopped.
        extra_env: the block's hook_env (its values are masked in the captured output).
        grace_s: between SIGTERM and SIGKILL.
        abort: when set while the hook runs, the hook is stopped the same way (HookAborted).
        log: where the start and the tail of the output go (the run's logger).

    Raises:
        HookConfigError: the configuration cannot be used; nothing ran.
        HookTimedOut: the deadline passed; the group was stopped.
        HookAborted: `abort` was set; the group was stopped.
        HookError: the hook exited non-zero or was killed by a signal.

    Example:
        run_hook(block.pre_node_hook, kind="pre", node="m720q-2", ip="10.42.0.102", deadline_s=600,
                 extra_env=block.hook_env_values(), log=get_run_logger())
    """
    log = log or logging.getLogger(__name__)
    name = hook_field(kind)
    where = f"{name} of the Homelab block for {node} ({ip})"
    env = hook_environment(node, ip, extra_env)
    bash = shutil.which("bash", path=env["PATH"])
    if bash is None:
        raise HookConfigError(f"{where}: no bash on the hook's PATH ({env['PATH']})")
    if deadline_s <= 0:
        raise HookTimedOut(kind, node, f"{where} was not started: its deadline of {deadline_s:g} s has passed",
                           "raise the hook deadline and run again")
    secrets = [v for v in (extra_env or {}).values() if len(v) >= MASK_MIN_CHARS]
    log.info("%s: starting (deadline %g s)", where, deadline_s)
    t0 = time.monotonic()
    ends = t0 + deadline_s
    proc = subprocess.Popen([bash, "-c", command], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    assert proc.stdout is not None
    out = _Output(proc.stdout, secrets)
    stopped_by: str | None = None
    stopped_with = ""
    try:
        while not _leader_exited(proc.pid):
            if time.monotonic() >= ends:
                stopped_by = "deadline"
                break
            if abort is not None and abort.is_set():
                stopped_by = "abort"
                break
            out.pump(min(0.1, max(0.0, ends - time.monotonic())))
        leftovers = False
        if stopped_by is None:
            out.drain(0.2)
            leftovers = group_running(proc.pid)
            if leftovers:
                # The shell is done but something it started in the background still runs; it must not
                # outlive the step it belongs to.
                log.warning("%s: the hook left processes running; stopping them", where)
        if stopped_by is not None or leftovers:
            stopped_with = _stop_group(proc, grace_s, out)
        else:
            proc.wait()
    except BaseException:
        # A cancel, SIGTERM or crash of the run: the hook does not outlive it either.
        _stop_group(proc, grace_s, out)
        out.finish()
        raise
    out.drain(0.5)
    tail = out.finish()
    seconds = time.monotonic() - t0
    code = proc.returncode
    if tail:
        log.log(logging.INFO if stopped_by is None and code == 0 else logging.WARNING,
                "%s: last %d line(s) of output:\n%s", where, len(tail), "\n".join(tail))
    if stopped_by == "deadline":
        raise HookTimedOut(
            kind, node,
            f"{where} did not finish within its {deadline_s:g} s deadline; its whole process group was stopped "
            f"({stopped_with})" + (f"; last output: {_tail_text(tail)}" if tail else ""),
            "make the hook end sooner or raise the hook deadline, then run again", tail)
    if stopped_by == "abort":
        raise HookAborted(kind, node, f"{where} was stopped after {seconds:.1f} s: the run may no longer act "
                          f"on the node", "run again", tail)
    if code != 0:
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        raise HookError(kind, node,
                        f"{where} {how} after {seconds:.1f} s (deadline {deadline_s:g} s)"
                        + (f"; last output: {_tail_text(tail)}" if tail else ""),
                        "fix the hook (its output is in the run's logs) and run again", tail, exit_code=code)
    log.info("%s: done in %.1f s", where, seconds)
    return HookResult(code, seconds, tail, leftovers)
