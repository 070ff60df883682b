"""Talos, the external system: ``talosctl`` spoken in the domain's words.

Every call is an argv list ``[talosctl, --talosconfig P, --context C, <command> ...]``, run with a
subprocess timeout taken from the caller's monotonic deadline. Failures raise TalosError
subclasses whose ``retryable`` says whether running again can help (a node that reboots refuses
connections for a while; a refused upgrade stays refused). Error text carries the command and
stderr's last line, never the talosconfig or the environment.

The output readers are pure functions (``parse_*``) over the formats of talosctl v1.11:
protojson lines of ``version --json``, tab-aligned tables of ``etcd members`` / ``etcd status``,
and the stream of indented JSON objects of ``get <resource> -o json``. Importable without Prefect.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homelab.gates import EtcdMember, EtcdStatus
from homelab.upgrade import RunningImage, UpgradeOptions, talos_upgrade_argv, upgrade_k8s_argv

DEFAULT_TIMEOUT_S = 60.0
# Time talosctl gets beyond its own --timeout / --wait-timeout to report before it is killed.
GRACE_S = 30.0

# What talosctl prints when the node cannot be reached (yet): gRPC Unavailable / DeadlineExceeded
# and the socket errors under them. A node in the middle of a reboot answers like this.
_UNAVAILABLE = re.compile(
    r"connection refused|code = Unavailable|code = DeadlineExceeded|deadline exceeded|connection reset"
    r"|no route to host|i/o timeout|transport is closing|error reading from server|\bEOF\b"
    r"|network is unreachable|connection error|server closed the stream",
    re.IGNORECASE,
)


class TalosError(Exception):
    """Base of the Talos errors; ``retryable`` says whether running again can help."""

    retryable = False

    def __init__(self, message: str, *, command: str = "", returncode: int | None = None, stderr_tail: str = ""):
        self.command = command
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(message)


class TalosUnavailable(TalosError):
    """No answer from the Talos API (connection refused, deadline exceeded): expected while a node
    reboots; a retry within the deadline can help."""

    retryable = True


class TalosTimeout(TalosUnavailable):
    """talosctl did not finish within the time the deadline left."""


class TalosCommandError(TalosError):
    """Talos answered and refused, or talosctl failed in a way a retry will not change."""


class TalosAborted(TalosError):
    """talosctl was killed on purpose before it finished (the run lost its lock)."""


class TalosOutputError(TalosCommandError):
    """talosctl's output is not in the format this module reads."""


# --- output readers (pure) --------------------------------------------------------------------


def _nonempty_lines(text: str) -> list[str]:
    return [ln.rstrip("\r\n") for ln in text.splitlines() if ln.strip()]


def last_line(text: str) -> str:
    lines = _nonempty_lines(text)
    return lines[-1].strip()[:500] if lines else ""


def parse_version_output(text: str, nodes: Sequence[str] = ()) -> dict[str, str]:
    """node -> server Talos tag from ``talosctl version`` (``--json`` protojson lines or the text form).

    The client's own version ("Client:" section) is ignored. A reply without node metadata (one node,
    addressed directly) is attributed to the only node asked.
    """
    out: dict[str, str] = {}
    unnamed: list[str] = []
    section: str | None = None
    node: str | None = None
    for raw in _nonempty_lines(text):
        line = raw.strip()
        if line.startswith("{"):
            try:
                msg = json.loads(line)
            except json.JSONDecodeError as e:
                raise TalosOutputError(f"talosctl version --json: a line is not JSON ({e}): {line[:120]}") from None
            tag = ((msg.get("version") or {}).get("tag"))
            host = (msg.get("metadata") or {}).get("hostname")
            if not tag:
                raise TalosOutputError(f"talosctl version --json: no version.tag in {line[:120]}")
            if host:
                out[host] = tag
            else:
                unnamed.append(tag)
            continue
        if line in ("Client:", "Server:"):
            section, node = line[:-1], None
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if section == "Server" and key == "NODE":
            node = value
        elif section == "Server" and key == "Tag":
            if node:
                out[node] = value
            else:
                unnamed.append(value)
    if unnamed:
        if len(unnamed) == 1 and len(nodes) == 1 and nodes[0] not in out:
            out[nodes[0]] = unnamed[0]
        else:
            raise TalosOutputError(f"talosctl version: {len(unnamed)} server replies without a node name")
    return out


_COL_SEP = re.compile(r"\S+(?: \S+)*")


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a talosctl table (Go tabwriter, columns padded by 3 spaces) keyed by header.

    Cells are cut at the header's column positions, so an empty cell (ERRORS when healthy, often the
    last column) reads as "" and a cell with single spaces inside ("6.0 MB (29.08%)") stays whole.
    """
    lines = _nonempty_lines(text)
    if not lines:
        return []
    header = lines[0]
    cols = [(m.start(), m.group(0)) for m in _COL_SEP.finditer(header)]
    rows: list[dict[str, str]] = []
    for line in lines[1:]:
        aligned = all(start == 0 or start >= len(line) or line[start - 1] == " " for start, _ in cols)
        if aligned:
            row = {}
            for i, (start, name) in enumerate(cols):
                end = cols[i + 1][0] if i + 1 < len(cols) else None
                row[name] = line[start:end].strip() if start < len(line) else ""
        else:
            cells = re.split(r"\s{2,}", line.strip())
            row = {name: (cells[i] if i < len(cells) else "") for i, (_, name) in enumerate(cols)}
            if len(cells) > len(cols):
                row[cols[-1][1]] = "  ".join(cells[len(cols) - 1:])
        rows.append(row)
    return rows


def _int(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None


def _urls(text: str) -> tuple[str, ...]:
    return tuple(u for u in (p.strip() for p in text.split(",")) if u)


def parse_etcd_members(text: str) -> list[EtcdMember]:
    """``talosctl etcd members``: NODE (only when the reply names the node) ID HOSTNAME PEER URLS
    CLIENT URLS LEARNER."""
    rows = parse_table(text)
    if rows and "ID" not in rows[0]:
        raise TalosOutputError(f"talosctl etcd members: no ID column in {text.splitlines()[0][:120]!r}")
    return [EtcdMember(id=r["ID"], hostname=r.get("HOSTNAME", ""), peer_urls=_urls(r.get("PEER URLS", "")),
                       client_urls=_urls(r.get("CLIENT URLS", "")), learner=r.get("LEARNER", "").lower() == "true",
                       node=r.get("NODE") or None)
            for r in rows]


def parse_etcd_status(text: str) -> list[EtcdStatus]:
    """``talosctl etcd status``: NODE MEMBER DB SIZE IN USE LEADER RAFT INDEX RAFT TERM RAFT APPLIED INDEX
    LEARNER [PROTOCOL STORAGE] ERRORS; NODE only when nodes are targeted, ERRORS empty when healthy."""
    rows = parse_table(text)
    if rows and "MEMBER" not in rows[0]:
        raise TalosOutputError(f"talosctl etcd status: no MEMBER column in {text.splitlines()[0][:120]!r}")
    return [EtcdStatus(node=r.get("NODE") or None, member=r["MEMBER"], db_size=r.get("DB SIZE", ""),
                       in_use=r.get("IN USE", ""), leader=r.get("LEADER", ""),
                       raft_index=_int(r.get("RAFT INDEX", "")), raft_term=_int(r.get("RAFT TERM", "")),
                       raft_applied_index=_int(r.get("RAFT APPLIED INDEX", "")),
                       learner=r.get("LEARNER", "").lower() == "true", errors=r.get("ERRORS", ""),
                       protocol=r.get("PROTOCOL") or None, storage=r.get("STORAGE") or None)
            for r in rows]


def iter_json_stream(text: str) -> Iterator[dict[str, Any]]:
    """The objects of ``talosctl get ... -o json``: indented JSON objects one after another, no array."""
    decoder = json.JSONDecoder()
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise TalosOutputError(f"talosctl get -o json: not a JSON object stream at offset {i}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TalosOutputError(f"talosctl get -o json: expected objects, found {type(obj).__name__}")
        yield obj


@dataclass(frozen=True)
class MachineStatus:
    node: str | None
    stage: str
    ready: bool
    unmet_conditions: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        unmet = f", unmet: {'; '.join(self.unmet_conditions)}" if self.unmet_conditions else ""
        return f"stage {self.stage}, {'ready' if self.ready else 'not ready'}{unmet}"


def parse_machinestatus(text: str) -> list[MachineStatus]:
    out = []
    for obj in iter_json_stream(text):
        spec = obj.get("spec") or {}
        status = spec.get("status") or {}
        unmet = tuple(f"{c.get('name', '?')}: {c.get('reason', '')}".rstrip(": ")
                      for c in status.get("unmetConditions") or [])
        out.append(MachineStatus(node=obj.get("node") or None, stage=str(spec.get("stage", "unknown")),
                                 ready=bool(status.get("ready")), unmet_conditions=unmet))
    return out


def parse_extensions(text: str, nodes: Sequence[str] = ()) -> dict[str, RunningImage]:
    """``talosctl get extensions -o json``: per node the `schematic` extension's version (the Image Factory
    schematic ID: siderolabs/image-factory internal/artifacts/schematic.go schematicExtension) and the names
    of the others (spec is pkg/machinery/extensions Layer: image, metadata{name, version, ...})."""
    names: dict[str, list[str]] = {}
    schematic: dict[str, str | None] = {}
    for obj in iter_json_stream(text):
        node = str(obj.get("node") or (nodes[0] if len(nodes) == 1 else ""))
        meta = ((obj.get("spec") or {}).get("metadata")) or {}
        name = str(meta.get("name") or "")
        names.setdefault(node, [])
        schematic.setdefault(node, None)
        if name == "schematic":
            schematic[node] = str(meta.get("version") or "") or None
        elif name:
            names[node].append(name)
    # A node that answered with no extension at all prints nothing: it runs none.
    out = {n: RunningImage(schematic.get(n), tuple(sorted(names.get(n, [])))) for n in names}
    return out


_NODE_ERROR = re.compile(r"^\s*\*\s+(?P<node>[^\s:]+(?::\d+)?):\s(?P<msg>.*)$")


def parse_node_errors(stderr: str) -> dict[str, str]:
    """node -> error from talosctl's multi-error list (`N error(s) occurred:` then `\t* <node>: <error>`)."""
    out: dict[str, str] = {}
    for line in (stderr or "").splitlines():
        m = _NODE_ERROR.match(line)
        if m:
            out.setdefault(m.group("node"), m.group("msg").strip())
    return out


def config_diff_changed(text: str) -> bool:
    """``apply-config --dry-run``: True when it printed a "Config diff:" with changes, False for "No changes."."""
    if "No changes." in text:
        return False
    if "Config diff:" in text:
        return True
    raise TalosOutputError("talosctl apply-config --dry-run printed neither \"Config diff:\" nor \"No changes.\"")


# --- the client -------------------------------------------------------------------------------


def remaining(deadline: float | None, default: float) -> float:
    """Seconds a call may take: the default, cut to what the monotonic deadline leaves."""
    if deadline is None:
        return default
    return min(default, deadline - time.monotonic())


KILL_GRACE_S = 5.0


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to talosctl's session, SIGKILL after KILL_GRACE_S (homelab/lease.py counts on it)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class ApplyResult:
    changed: bool | None  # known only for a dry run
    output: str


class Talosctl:
    """talosctl with one talosconfig and context. Methods block until talosctl exits or the deadline."""

    def __init__(self, path: str = "talosctl", talosconfig: Path | None = None, context: str | None = None,
                 env: Mapping[str, str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.path = path
        self.talosconfig = talosconfig
        self.context = context
        self.env = dict(env or {})
        self.timeout_s = timeout_s

    # -- plumbing --

    def argv(self, *args: str) -> list[str]:
        """The full argv of a talosctl command: global flags right after the executable."""
        base = [self.path]
        if self.talosconfig is not None:
            base += ["--talosconfig", str(self.talosconfig)]
        if self.context:
            base += ["--context", self.context]
        return base + list(args)

    def with_globals(self, argv: Sequence[str]) -> list[str]:
        """A planned argv (``[talosctl, cmd, ...]``) with this client's executable and global flags."""
        return self.argv(*argv[1:])

    def run(self, args: Sequence[str], timeout_s: float | None = None, deadline: float | None = None,
            abort: threading.Event | None = None, stderr_sink: list[str] | None = None) -> str:
        """Run ``talosctl <args>``; stdout on success, else a TalosError. When `abort` is set while it
        runs (the disruption lock's ownership ran out), talosctl is killed and TalosAborted raised.
        `stderr_sink` gets talosctl's stderr (its progress, `--debug`'s console logs), success or not."""
        stdout, stderr, code, shown = self._exec(args, timeout_s, deadline, abort, stderr_sink)
        if code != 0:
            raise self._failure(shown, code, stdout, stderr)
        return stdout

    def run_nodes(self, args: Sequence[str], deadline: float | None = None) -> tuple[str, dict[str, str]]:
        """A command sent to several nodes: (stdout of the replies that came, node -> error of the others).

        talosctl prints the nodes that answered and collects the others' errors: commands built on
        FilterMessages (version, etcd members/status) warn `WARNING: N error(s) occurred:` on stderr and exit
        0 unless every node failed; `get` prints what came and exits 1 (talos v1.11.5
        pkg/machinery/client/reply.go filterMessages, pkg/cli/output.go Warning, cmd/talosctl/cmd/talos/get.go).
        A node missing from stdout is a node that did not answer."""
        stdout, stderr, code, shown = self._exec(args, None, deadline, None, None)
        errors = parse_node_errors(stderr)
        if code != 0 and not stdout.strip():
            raise self._failure(shown, code, stdout, stderr)
        if code != 0 and not errors:
            raise self._failure(shown, code, stdout, stderr)
        return stdout, errors

    @staticmethod
    def _failure(shown: str, code: int, stdout: str, stderr: str) -> TalosError:
        tail = last_line(stderr) or last_line(stdout)
        cls = TalosUnavailable if _UNAVAILABLE.search(stderr or "") else TalosCommandError
        return cls(f"`{shown}` failed (exit {code}): {tail or 'no error output'}",
                   command=shown, returncode=code, stderr_tail=tail)

    def _exec(self, args: Sequence[str], timeout_s: float | None, deadline: float | None,
              abort: threading.Event | None, stderr_sink: list[str] | None) -> tuple[str, str, int, str]:
        argv = self.argv(*args)
        shown = shlex.join(["talosctl", *args])
        budget = remaining(deadline, timeout_s if timeout_s is not None else self.timeout_s)
        if budget <= 0:
            raise TalosTimeout(f"`{shown}` not started: the deadline has passed", command=shown)
        try:
            # A session of its own: a SIGTERM to the caller's process group leaves it to us to stop it,
            # and the kill below reaches whatever talosctl started.
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, **self.env}, stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise TalosCommandError(f"talosctl executable {self.path!r} not found; set talosctl_path in the "
                                    f"Talos block", command=shown) from None
        except PermissionError:
            raise TalosCommandError(f"talosctl executable {self.path!r} is not executable", command=shown) from None
        ends = time.monotonic() + budget
        try:
            while True:
                step = min(0.2, ends - time.monotonic()) if abort is not None else ends - time.monotonic()
                try:
                    stdout, stderr = proc.communicate(timeout=max(0.0, step))
                    break
                except subprocess.TimeoutExpired:
                    if abort is not None and abort.is_set():
                        _stop(proc)
                        raise TalosAborted(f"`{shown}` was stopped: this run no longer holds the disruption lock",
                                           command=shown) from None
                    if time.monotonic() >= ends:
                        _stop(proc)
                        _, err = proc.communicate()
                        if stderr_sink is not None and err:
                            stderr_sink.append(err)
                        tail = last_line(err or "")
                        raise TalosTimeout(f"`{shown}` did not finish within {budget:.0f}s"
                                           + (f"; last: {tail}" if tail else ""), command=shown,
                                           stderr_tail=tail) from None
        except BaseException:
            if proc.poll() is None:  # interrupted (a signal, a cancel): never leave talosctl behind
                _stop(proc)
            raise
        if stderr_sink is not None and stderr:
            stderr_sink.append(stderr)
        return stdout, stderr, proc.returncode, shown

    # -- reads --

    def version(self, nodes: Sequence[str], deadline: float | None = None) -> dict[str, str]:
        """node -> Talos tag each node's server reports; a node that did not answer is missing."""
        stdout, _ = self.run_nodes(["version", "--nodes", ",".join(nodes), "--json"], deadline=deadline)
        out = parse_version_output(stdout, nodes)
        # apid names each reply by the address it was sent to (--nodes); a reply named otherwise
        # (the machine's hostname) can still be attributed when only one node was asked.
        if len(nodes) == 1 and len(out) == 1 and nodes[0] not in out:
            return {nodes[0]: next(iter(out.values()))}
        return out

    def etcd_members(self, node: str, deadline: float | None = None) -> list[EtcdMember]:
        return parse_etcd_members(self.run(["etcd", "members", "--nodes", node], deadline=deadline))

    def etcd_status(self, nodes: Sequence[str], deadline: float | None = None) -> list[EtcdStatus]:
        """A row per member that answered; the etcd gate names the members without one."""
        stdout, _ = self.run_nodes(["etcd", "status", "--nodes", ",".join(nodes)], deadline=deadline)
        return parse_etcd_status(stdout)

    def etcd_state(self, node: str, deadline: float | None = None) -> str:
        """"running" when the node's etcd answers `etcd status`, "stopped" when machined answers but etcd's
        port does not (the upgrade sequence stopped it), else TalosUnavailable (the node does not answer)."""
        try:
            self.run(["etcd", "status", "--nodes", node], deadline=deadline)
        except TalosError as e:
            if ":2379" in str(e) or "etcd is not running" in str(e):
                return "stopped"
            raise
        return "running"

    def boot_id(self, node: str, deadline: float | None = None) -> str:
        """The kernel's boot ID, as talosctl's action tracker reads it to tell that a node rebooted
        (cmd/talosctl/pkg/talos/action/tracker.go getBootID: /proc/sys/kernel/random/boot_id)."""
        text = self.run(["read", "--nodes", node, "/proc/sys/kernel/random/boot_id"], deadline=deadline).strip()
        if not re.fullmatch(r"[0-9a-f-]{36}", text):
            raise TalosOutputError(f"talosctl read boot_id --nodes {node}: not a boot ID: {text[:80]!r}")
        return text

    def running_images(self, nodes: Sequence[str], deadline: float | None = None) -> dict[str, RunningImage]:
        """node -> the schematic and extensions it runs (`get extensions`); a node that did not answer is
        missing. Without node names in the reply (one node, no apid proxy) the only node asked is meant."""
        stdout, _ = self.run_nodes(["get", "extensions", "--nodes", ",".join(nodes), "-o", "json"],
                                   deadline=deadline)
        return parse_extensions(stdout, nodes)

    def machinestatus(self, node: str, deadline: float | None = None) -> MachineStatus:
        items = parse_machinestatus(self.run(["get", "machinestatus", "--nodes", node, "-o", "json"],
                                             deadline=deadline))
        if not items:
            raise TalosOutputError(f"talosctl get machinestatus --nodes {node}: no resource in the reply")
        return items[0]

    def health(self, control_planes: Sequence[str], workers: Sequence[str] = (), wait_timeout_s: float = 300,
               deadline: float | None = None) -> str:
        """``talosctl health`` run on the first control plane; raises unless every check passes."""
        wait = max(1, int(remaining(deadline, wait_timeout_s)))
        args = ["health", "--nodes", control_planes[0], "--control-plane-nodes", ",".join(control_planes)]
        if workers:
            args += ["--worker-nodes", ",".join(workers)]
        args += ["--wait-timeout", f"{wait}s"]
        return self.run(args, timeout_s=wait + GRACE_S, deadline=None if deadline is None else deadline + GRACE_S)

    # -- changes --

    def upgrade(self, node_ip: str, image: str, timeout_s: float, force: bool = False,
                deadline: float | None = None, options: UpgradeOptions = UpgradeOptions()) -> str:
        """``talosctl upgrade --wait``: returns once the node is back with a new boot ID."""
        t = max(1, int(remaining(deadline, timeout_s)))
        argv = talos_upgrade_argv(self.path, node_ip, image, t, force, options)
        return self.run(argv[1:], timeout_s=t + GRACE_S,
                        deadline=None if deadline is None else deadline + GRACE_S)

    def upgrade_k8s(self, to: str, dry_run: bool = False, node: str | None = None, timeout_s: float = 1800,
                    deadline: float | None = None, abort: threading.Event | None = None) -> str:
        argv = upgrade_k8s_argv(self.path, to, dry_run, node)
        return self.run(argv[1:], timeout_s=timeout_s, deadline=deadline, abort=abort)

    def etcd_snapshot(self, path: Path, node: str, deadline: float | None = None) -> Path:
        """A consistent etcd snapshot from one member, written to ``path`` (checked non-empty)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run(["etcd", "snapshot", str(path), "--nodes", node], timeout_s=300, deadline=deadline)
        if not path.is_file() or path.stat().st_size == 0:
            raise TalosCommandError(f"etcd snapshot from {node}: talosctl succeeded but {path} is missing or "
                                    f"empty; check free space there and run again",
                                    command=f"talosctl etcd snapshot {path} --nodes {node}")
        return path

    def apply_config(self, node: str, file: Path, insecure: bool = False, dry_run: bool = False,
                     deadline: float | None = None) -> ApplyResult:
        args = ["apply-config", "--nodes", node, "--file", str(file)]
        if insecure:
            args.append("--insecure")
        if dry_run:
            args.append("--dry-run")
        out = self.run(args, deadline=deadline)
        return ApplyResult(config_diff_changed(out) if dry_run else None, out)

    def bootstrap(self, node: str, deadline: float | None = None) -> None:
        self.run(["bootstrap", "--nodes", node], deadline=deadline)

    def kubeconfig(self, path: Path, node: str, deadline: float | None = None) -> Path:
        """Write the cluster's admin kubeconfig to ``path`` (replacing it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run(["kubeconfig", str(path), "--nodes", node, "--force"], deadline=deadline)
        if not path.is_file():
            raise TalosCommandError(f"talosctl kubeconfig from {node} succeeded but wrote no {path}",
                                    command=f"talosctl kubeconfig {path} --nodes {node}")
        return path
