"""`talosctl` v1.11 semantics and output formats, run against the twin's World.

`run(world, argv, env, cwd)` is one talosctl invocation: (stdout, stderr, exit code). Node
addresses (10.42.0.x) are labels looked up in the World; nothing here touches the network.
Long commands (upgrade --wait, health) block the calling thread on the World's condition.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from twin.state import ClusterState, Node, World, new_member_id
from twin.talos_gen import apply_patches, load_patch, render_config, run_gen

CLIENT_VERSION = "v1.11.5"
GO_VERSION = "go1.24.9"
BUILT = "2025-11-04T10:40:53Z"
TALOS_PORT = 50000

Result = tuple[str, str, int]
KubeconfigFor = Callable[[str], "str | None"]


class UsageError(Exception):
    pass


# --- flags -------------------------------------------------------------------------------------


@dataclass
class Flag:
    name: str
    short: str | None = None
    kind: str = "str"  # str | bool | list | dur
    default: Any = None


GLOBAL_FLAGS = [
    Flag("talosconfig"), Flag("context"), Flag("nodes", "n", "list", []), Flag("endpoints", "e", "list", []),
    Flag("cluster"), Flag("help", "h", "bool", False),
]

COMMAND_FLAGS: dict[str, list[Flag]] = {
    "version": [Flag("json", None, "bool", False), Flag("short", None, "bool", False),
                Flag("client", None, "bool", False), Flag("insecure", "i", "bool", False)],
    "upgrade": [Flag("image", "i"), Flag("wait", None, "bool", True), Flag("timeout", None, "dur", 1800.0),
                Flag("reboot-mode", "m", "str", "default"), Flag("stage", "s", "bool", False),
                Flag("force", "f", "bool", False), Flag("insecure", None, "bool", False),
                Flag("debug", None, "bool", False), Flag("preserve", "p", "bool", False)],
    "upgrade-k8s": [Flag("to"), Flag("from"), Flag("dry-run", None, "bool", False),
                    Flag("pre-pull-images", None, "bool", True), Flag("upgrade-kubelet", None, "bool", True),
                    Flag("endpoint")],
    "etcd": [],
    "health": [Flag("wait-timeout", None, "dur", 1200.0), Flag("server", None, "bool", True),
               Flag("control-plane-nodes", None, "list", []), Flag("worker-nodes", None, "list", []),
               Flag("init-node"), Flag("k8s-endpoint"), Flag("run-e2e", None, "bool", False)],
    "get": [Flag("output", "o", "str", "table"), Flag("namespace"), Flag("watch", "w", "bool", False),
            Flag("insecure", "i", "bool", False)],
    "apply-config": [Flag("file", "f"), Flag("dry-run", None, "bool", False), Flag("insecure", "i", "bool", False),
                     Flag("mode", "m", "str", "auto"), Flag("config-patch", "p", "list", []),
                     Flag("timeout", None, "dur", 60.0), Flag("cert-fingerprint", None, "list", [])],
    "bootstrap": [Flag("recover-from"), Flag("recover-skip-hash-check", None, "bool", False)],
    "service": [],
    "kubeconfig": [Flag("force", "f", "bool", False), Flag("merge", "m", "bool", True),
                   Flag("force-context-name")],
    "rollback": [],
    "reboot": [Flag("wait", None, "bool", True), Flag("mode", "m", "str", "default"), Flag("timeout", None, "dur", 1800.0),
               Flag("debug", None, "bool", False)],
    "read": [],
}
COMMAND_FLAGS["apply"] = COMMAND_FLAGS["apply-config"]

USAGE = {
    "version": "talosctl version [flags]",
    "upgrade": "talosctl upgrade [flags]",
    "upgrade-k8s": "talosctl upgrade-k8s [flags]",
    "etcd": "talosctl etcd [command]",
    "health": "talosctl health [flags]",
    "get": "talosctl get <type> [<id>] [flags]",
    "apply-config": "talosctl apply-config [flags]",
    "bootstrap": "talosctl bootstrap [flags]",
    "service": "talosctl service [<id> [start|stop|restart|status]] [flags]",
    "kubeconfig": "talosctl kubeconfig [local-path] [flags]",
    "rollback": "talosctl rollback [flags]",
    "reboot": "talosctl reboot [flags]",
    "read": "talosctl read <path> [flags]",
}


def parse_duration(text: str) -> float:
    """A Go duration (30m, 1h30m, 90s, 500ms) in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        raise UsageError(f'invalid argument "{text}": time: missing unit in duration "{text}"')
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise UsageError(f'invalid argument "{text}": time: invalid duration "{text}"')
    return total


def parse_args(argv: list[str], flags: list[Flag]) -> tuple[dict[str, Any], list[str]]:
    """cobra/pflag parsing: --name value, --name=value, -x value, -xvalue, bool flags only as --b[=v]."""
    by_long = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    values: dict[str, Any] = {f.name: (list(f.default) if isinstance(f.default, list) else f.default) for f in flags}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            positional.extend(argv[i + 1:])
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            f = by_long.get(name)
            if f is None:
                raise UsageError(f"unknown flag: --{name}")
        elif a.startswith("-") and len(a) > 1:
            f = by_short.get(a[1])
            if f is None:
                raise UsageError(f"unknown shorthand flag: '{a[1]}' in {a}")
            rest = a[2:]
            eq, val = ("=", rest[1:]) if rest.startswith("=") else (("=", rest) if rest else ("", ""))
        else:
            positional.append(a)
            i += 1
            continue
        if f.kind == "bool":
            if eq:
                if val.lower() not in ("true", "false", "1", "0", "t", "f"):
                    raise UsageError(f'invalid argument "{val}" for "--{f.name}" flag: strconv.ParseBool: parsing "{val}": invalid syntax')
                values[f.name] = val.lower() in ("true", "1", "t")
            else:
                values[f.name] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise UsageError(f"flag needs an argument: --{f.name}")
            val = argv[i + 1]
            i += 2
        else:
            i += 1
        if f.kind == "list":
            values[f.name].extend(v.strip() for v in val.split(",") if v.strip())
        elif f.kind == "dur":
            values[f.name] = parse_duration(val)
        else:
            values[f.name] = val
    return values, positional


# --- output helpers --------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    """Go text/tabwriter with padding 3 (talosctl's tables); trailing blanks dropped."""
    widths: dict[int, int] = {}
    for r in rows:
        for j, c in enumerate(r[:-1]):
            widths[j] = max(widths.get(j, 0), len(c))
    lines = []
    for r in rows:
        parts = [c.ljust(widths[j] + 3) if j < len(r) - 1 else c for j, c in enumerate(r)]
        lines.append("".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def multierror(action: str, errors: list[tuple[str, str]]) -> str:
    n = len(errors)
    body = "".join(f"\t* {ip}: {msg}\n" for ip, msg in errors)
    return f"error {action}: {n} error{'s' if n > 1 else ''} occurred:\n{body}\n"


def unavailable(ip: str, why: str) -> str:
    return (f'rpc error: code = Unavailable desc = connection error: desc = "transport: Error while dialing: '
            f'dial tcp {ip}:{TALOS_PORT}: {why}"')


def sha_of(tag: str) -> str:
    return hashlib.sha1(tag.encode()).hexdigest()[:8]


def humanize_bytes(n: int) -> str:
    """go-humanize Bytes (SI): 21 MB, 6.0 MB, 3.6 MB."""
    if n < 10:
        return f"{n} B"
    units = ["B", "kB", "MB", "GB", "TB"]
    e = 0
    v = float(n)
    while v >= 1000 and e < len(units) - 1:
        v /= 1000
        e += 1
    return f"{v:.1f} {units[e]}" if v < 10 else f"{v:.0f} {units[e]}"


def tag_of(image: str) -> str:
    return image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else "latest"


# --- the command -----------------------------------------------------------------------------


@dataclass
class Invocation:
    world: World
    env: dict[str, str]
    cwd: Path
    kubeconfig_for: KubeconfigFor | None
    nodes: list[str] = field(default_factory=list)
    node_column: bool = True
    cluster_hint: str | None = None
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    def path(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else self.cwd / q


def run(world: World, argv: list[str], env: dict[str, str], cwd: str | Path | None = None,
        kubeconfig_for: KubeconfigFor | None = None) -> Result:
    """One talosctl invocation against the world."""
    inv = Invocation(world, dict(env), Path(cwd or os.getcwd()), kubeconfig_for)
    try:
        return _dispatch(inv, list(argv))
    except UsageError as e:
        cmd = next((a for a in argv if not a.startswith("-")), "")
        usage = USAGE.get(cmd, "talosctl [command]")
        return "", f"Error: {e}\nUsage:\n  {usage}\n\nUse \"talosctl {cmd + ' ' if cmd else ''}--help\" for more information.\n", 1


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The subcommand name (first positional, skipping global flags with values) and the rest."""
    takes_value = {"--talosconfig", "--context", "--nodes", "-n", "--endpoints", "-e", "--cluster"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in takes_value:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a, argv[:i] + argv[i + 1:]
    return None, argv


def _dispatch(inv: Invocation, argv: list[str]) -> Result:
    cmd, rest = _split_command(argv)
    if cmd is None:
        if "--help" in argv or "-h" in argv:
            return "Usage:\n  talosctl [command]\n", "", 0
        raise UsageError("a command is required")
    if cmd == "apply":
        cmd = "apply-config"
    if cmd == "gen":  # local files only: needs neither a talosconfig nor a node
        return run_gen(argv, str(inv.cwd))
    if cmd not in COMMAND_FLAGS:
        raise UsageError(f'unknown command "{cmd}" for "talosctl"')
    flags, pos = parse_args(rest, GLOBAL_FLAGS + COMMAND_FLAGS[cmd])
    if flags["help"]:
        return f"Usage:\n  {USAGE.get(cmd, cmd)}\n", "", 0
    _resolve_targets(inv, flags)
    handler = HANDLERS[cmd]
    return handler(inv, flags, pos)


def _resolve_targets(inv: Invocation, flags: dict[str, Any]) -> None:
    """Nodes from -n, else the talosconfig context's nodes, else its first endpoint (no NODE column)."""
    path = flags["talosconfig"] or inv.env.get("TALOSCONFIG") or os.path.expanduser("~/.talos/config")
    cfg: dict[str, Any] = {}
    try:
        cfg = yaml.safe_load(inv.path(path).read_text()) or {}
    except FileNotFoundError:
        if not flags["nodes"]:
            raise UsageError(f"failed to open config file {path!r}: no such file or directory") from None
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"failed to read config file {path!r}: {e}") from None
    name = flags["context"] or cfg.get("context")
    contexts = cfg.get("contexts") or {}
    ctx = contexts.get(name) if name else None
    if name and ctx is None and cfg:
        raise UsageError(f"context {name!r} is not defined in {path!r}")
    ctx = ctx or {}
    endpoints = flags["endpoints"] or list(ctx.get("endpoints") or [])
    nodes = flags["nodes"] or list(ctx.get("nodes") or [])
    if not endpoints and not nodes:
        raise UsageError("failed to determine endpoints")
    inv.cluster_hint = name
    if nodes:
        inv.nodes, inv.node_column = nodes, True
    else:
        inv.nodes, inv.node_column = endpoints[:1], False


def _reach(inv: Invocation, ip: str, insecure: bool = False) -> tuple[Node | None, str | None]:
    """The node at ip if its Talos API answers this kind of connection, else the client's error."""
    n = inv.world.node_by_ip(ip)
    with inv.world.lock:
        if n is None or n.phase == "off":
            return None, unavailable(ip, "connect: no route to host")
        if n.phase == "maintenance" and n.dhcp_ip and ip != n.dhcp_ip:
            # In maintenance mode the VM has only its DHCP lease; its static address comes with the config.
            return None, unavailable(ip, "connect: no route to host")
        if n.phase in ("rebooting", "installing"):
            return None, unavailable(ip, "connect: connection refused")
        if n.phase == "maintenance" and not insecure:
            return None, ('rpc error: code = Unavailable desc = connection error: desc = "transport: authentication '
                          'handshake failed: tls: failed to verify certificate: x509: certificate signed by unknown authority"')
        if n.phase == "running" and insecure:
            return None, ('rpc error: code = Unavailable desc = connection error: desc = "error reading server preface: '
                          'remote error: tls: certificate required"')
        return n, None


def _done(inv: Invocation, code: int = 0) -> Result:
    return "".join(inv.out), "".join(inv.err), code


def _finish(inv: Invocation, action: str, errors: list[tuple[str, str]]) -> Result:
    """talosctl's end of a multi-node command: the collected node errors, if any, fail it."""
    if errors:
        inv.err.append(multierror(action, errors))
        return _done(inv, 1)
    return _done(inv)


def _finish_filtered(inv: Invocation, action: str, errors: list[tuple[str, str]], answered: bool) -> Result:
    """The end of a command built on FilterMessages (version, etcd members/status): the replies that came are
    printed, the other nodes' errors become `WARNING: N error(s) occurred:` on stderr, and the exit code is 0
    unless every node failed (talos v1.11.5 pkg/machinery/client/reply.go filterMessages returns a nil reply
    only then; cmd/talosctl/cmd/talos/version.go, etcd.go: `cli.Warning("%s", err)`; pkg/cli/output.go Warning;
    go-multierror's list format)."""
    if errors and answered:
        n = len(errors)
        body = "".join(f"\t* {ip}: {msg}\n" for ip, msg in errors)
        inv.err.append(f"WARNING: {n} error{'s' if n > 1 else ''} occurred:\n{body}\n")
        return _done(inv)
    return _finish(inv, action, errors)


def _reachable(inv: Invocation, errors: list[tuple[str, str]], insecure: bool = False) -> Iterator[tuple[str, Node]]:
    """Each target node whose Talos API answers, in order; an unreachable one's error joins `errors`
    where talosctl collects it (between the errors of the nodes before and after it)."""
    for ip in inv.nodes:
        n, err = _reach(inv, ip, insecure)
        if n is None:
            errors.append((ip, err or ""))
            continue
        yield ip, n


def _first_node(inv: Invocation, failure: str) -> Node | None:
    """The first target node, or None after writing `<failure>: <why>` as talosctl does."""
    n, err = _reach(inv, inv.nodes[0])
    if n is None:
        inv.err.append(f"{failure}: {err}\n")
    return n


# --- version ---------------------------------------------------------------------------------


def cmd_version(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    if flags["json"]:
        errors: list[tuple[str, str]] = []
        answered = 0
        for ip, n in _reachable(inv, errors, flags["insecure"]):
            inv.out.append(json.dumps(_version_message(n, _proxied_as(inv, n, ip)), separators=(",", ":")) + "\n")
            answered += 1
        return _finish_filtered(inv, "getting version", errors, answered > 0)
    inv.out.append(f"Client:\n    Tag:         {CLIENT_VERSION}\n    SHA:         {sha_of(CLIENT_VERSION)}\n"
                   f"    Built:\n    Go version:  {GO_VERSION}\n    OS/Arch:     linux/amd64\n")
    if flags["client"]:
        return _done(inv)
    inv.out.append("Server:\n")
    errors = []
    answered = 0
    for ip, n in _reachable(inv, errors, flags["insecure"]):
        node_line = f"    NODE:        {ip}\n" if _proxied_as(inv, n, ip) else ""
        inv.out.append(f"{node_line}    Tag:         {n.talos_version}\n    SHA:         {sha_of(n.talos_version)}\n"
                       f"    Built:\n    Go version:  {GO_VERSION}\n    OS/Arch:     linux/amd64\n"
                       f"    Enabled:     RBAC\n")
        answered += 1
    return _finish_filtered(inv, "getting version", errors, answered > 0)


def _proxied_as(inv: Invocation, n: Node, ip: str) -> str | None:
    """The target apid names a reply by: the --nodes value as the client gave it (apid's proxy backend
    appends metadata.hostname = its target). No name when nothing was proxied: no nodes given (the
    endpoint answers itself) or the maintenance service, which has no apid in front of it."""
    if not inv.node_column or n.phase == "maintenance":
        return None
    return ip


def _version_message(n: Node, target: str | None) -> dict[str, Any]:
    platform = {"name": "metal", "mode": "metal"} if n.platform == "metal" else {"name": n.platform, "mode": "cloud"}
    # protojson leaves an unset message out: no "metadata" key unless apid proxied the call.
    meta: dict[str, Any] = {"metadata": {"hostname": target}} if target else {}
    return {**meta,
            "version": {"tag": n.talos_version, "sha": sha_of(n.talos_version), "built": BUILT,
                        "goVersion": GO_VERSION, "os": "linux", "arch": "amd64"},
            "platform": platform,
            "features": {"rbac": True}}


# --- reboots (upgrade, rollback, reboot) -----------------------------------------------------

# The Upgrade sequence's phases in talos v1.11.5 internal/app/machined/pkg/runtime/v1alpha1/v1alpha1_sequencer.go
# (Sequencer.Upgrade): the installer runs in phase 9; kexec is left out with --reboot-mode powercycle.
UPGRADE_PHASES = ("drain", "cleanup", "dbus", "stopServices", "unmount", "unmountBind", "unmountSystem",
                  "volumeFinalize", "upgrade", "meta", "kexec", "stopEverything", "reboot")
# How machined reports an installer that exited non-zero (internal/pkg/install/install.go RunInstallerContainer,
# v1alpha1_controller.go run/runPhase), as talosctl's tracker shows the sequence's FATAL event
# (cmd/talosctl/pkg/talos/action/node.go handleEvent: "sequence error: %s").
INSTALLER_FAILED = ('sequence error: sequence failed: error running phase 9 in upgrade sequence: task 1/1: failed, '
                    'task "upgrade" failed: exit code 1')
# upgrade-slow: how many reboots' time the installer and the firmware take on that node.
SLOW_UPGRADE_FACTOR = 5.0

# Talos's own compatibility table (pkg/machinery/compatibility/talos1*/talos1*.go): per target minor the oldest
# host its installer accepts, the first host version it refuses to downgrade, and the Kubernetes it runs
# (lowest, first too new). The twin keeps its own copy, taken from the source, so a planner bug does not pass.
TALOS_MINORS: dict[tuple[int, int], tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int],
                                          tuple[int, int, int]]] = {
    (1, 2): ((1, 0, 0), (1, 3, 0), (1, 23, 0), (1, 25, 99)),
    (1, 3): ((1, 0, 0), (1, 5, 0), (1, 24, 0), (1, 26, 99)),
    (1, 4): ((1, 0, 0), (1, 6, 0), (1, 25, 0), (1, 27, 99)),
    (1, 5): ((1, 2, 0), (1, 7, 0), (1, 26, 0), (1, 28, 99)),
    (1, 6): ((1, 3, 0), (1, 8, 0), (1, 24, 0), (1, 29, 99)),
    (1, 7): ((1, 4, 0), (1, 9, 0), (1, 25, 0), (1, 30, 99)),
    (1, 8): ((1, 5, 0), (1, 10, 0), (1, 26, 0), (1, 31, 99)),
    (1, 9): ((1, 8, 0), (1, 11, 0), (1, 27, 0), (1, 32, 99)),
    (1, 10): ((1, 8, 0), (1, 12, 0), (1, 28, 0), (1, 33, 99)),
    (1, 11): ((1, 9, 0), (1, 13, 0), (1, 29, 0), (1, 34, 99)),
    (1, 12): ((1, 10, 0), (1, 14, 0), (1, 30, 0), (1, 35, 99)),
}


def _semver3(text: str) -> tuple[int, int, int]:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)


def installer_preflight(host: str, installer: str) -> str | None:
    """The installer's pre-flight check (cmd/installer/pkg/install/preflight.go talosVersion ->
    compatibility TalosVersion.UpgradeableFrom): its refusal, or None."""
    h, t = _semver3(host), _semver3(installer)
    row = TALOS_MINORS.get(t[:2])
    hs, ts = ".".join(map(str, h)), ".".join(map(str, t))
    if row is None:
        return f"upgrades to version {ts} are not supported"
    if h < row[0]:
        return f"host version {hs} is too old to upgrade to Talos {ts}"
    if h >= row[1]:
        return f"host version {hs} is too new to downgrade to Talos {ts}"
    return None


_FACTORY_INSTALLER = re.compile(r"^[^/]+/(?:[a-z0-9]+-)?installer(?:-secureboot)?/(?P<id>[0-9a-f]{64}):[^/:]+$")


def pull_refusal(world: World, image: str) -> str | None:
    """PullAndValidateInstallerImage (internal/pkg/install/pull.go) before anything changes: an Image Factory
    installer of a schematic the factory does not know has no manifest (image-factory
    internal/frontend/http/registry.go handleManifest: the schematic lookup answers not found). The text is
    containerd's resolver error as image.Pull passes it on."""
    m = _FACTORY_INSTALLER.match(image)
    if m is None:
        return None
    with world.lock:
        if m.group("id") in world.schematics:
            return None
    return (f'rpc error: code = Unknown desc = error validating installer image "{image}": failed to resolve '
            f'reference "{image}": {image}: not found')


def image_contents(world: World, image: str) -> tuple[str, tuple[str, ...]]:
    """(schematic ID, extension names) a node runs after installing `image`: an Image Factory image carries its
    schematic's official extensions and the virtual `schematic` extension (image-factory
    internal/artifacts/schematic.go schematicExtension); any other image none the twin can know."""
    m = _FACTORY_INSTALLER.match(image)
    if m is None:
        return "", ()
    sid = m.group("id")
    with world.lock:
        schematic = world.schematics.get(sid) or {}
    official = (((schematic.get("customization") or {}).get("systemExtensions") or {}).get("officialExtensions")) or []
    return sid, (*sorted(str(e).rsplit("/", 1)[-1] for e in official), "schematic")


@dataclass
class Outcome:
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    # The node's console (kernel log) of this action: what `--debug` prints for a node that failed.
    console: list[str] = field(default_factory=list)


def _log(outcome: Outcome, line: str) -> None:
    outcome.console.append(f"[talos] {line}")


def _stop_services(world: World, n: Node, cordon: bool, stage: str) -> None:
    """The sequence up to the reboot: with `cordon`, Talos cordons the node (NodeCordonedSpecController while the
    stage is upgrading, marking it talos.dev/cordoned: controllers/k8s/node_apply.go ApplyCordoned), then stops
    the pods (the node's OSD with them) and the ephemeral services, etcd and the kubelet among them."""
    with world.lock:
        fields: dict[str, Any] = {"stage": stage}
        if cordon and not n.unschedulable:
            fields.update(unschedulable=True, talos_cordoned=True)
        world.update(n, **fields)
        world.update(n, ready=False, etcd_running=False, kubelet_up=False)
    world.power(n, down=True)


def _boot(world: World, n: Node, **fields: Any) -> None:
    """The node is up again: a new boot ID, its services running. Talos uncordons a node it cordoned itself
    (annotation present), and only such a node, once the stage is booting/running again (ApplyCordoned);
    with `talos_uncordon_seconds` that happens that long after the node is Ready."""
    with world.lock:
        cluster = world.clusters[n.cluster]
        never = world.faults.has("node-never-ready", n.hostname)
        missing = ("kube-system/kube-scheduler",) if (n.role == "controlplane" and
                                                       world.faults.has("static-pod-missing", n.hostname)) else ()
        delay = world.knobs.talos_uncordon_seconds
        uncordon = n.talos_cordoned and n.unschedulable and delay <= 0
        world.update(n, phase="running", stage="", boot_id=str(uuid.uuid4()), etcd_running=bool(n.etcd_member_id),
                     kubelet_up=True, ready=cluster.bootstrapped and not never, booted_at=time.monotonic(),
                     static_pods_missing=missing,
                     **({"unschedulable": False, "talos_cordoned": False} if uncordon else {}), **fields)
        later = n.talos_cordoned and n.unschedulable and delay > 0
    world.power(n, down=False)
    if later:
        world.spawn(partial(_talos_uncordon, world, n, delay), f"uncordon-{n.hostname}")


def _talos_uncordon(world: World, n: Node, delay: float) -> None:
    if not world.sleep(delay):
        return
    with world.lock:
        # Talos touches only what it cordoned: someone who uncordoned meanwhile, or cordoned anew, wins.
        if n.talos_cordoned and n.unschedulable and n.phase == "running":
            world.update(n, unschedulable=False, talos_cordoned=False)


def reboot_node(world: World, n: Node, new_image: str | None, outcome: Outcome, *, rollback: bool = False) -> None:
    """A reboot (talosctl reboot, rollback, apply-config --mode reboot): the Reboot sequence stops pods and
    services without a cordon (a rebooting stage does not cordon: node_cordoned_spec.go) and boots the installed
    image — after a rollback, the previous one."""
    try:
        with world.lock:
            old_version = n.talos_version
            world.update(n, phase="rebooting", ready=False, etcd_running=False, kubelet_up=False, stage="")
        world.power(n, down=True)
        if not world.sleep(world.knobs.reboot_seconds):
            return
        fields: dict[str, Any] = {}
        if rollback and n.previous_version:
            fields = {"talos_version": n.previous_version, "previous_version": old_version,
                      "installer_image": n.installer_image.rsplit(":", 1)[0] + ":" + n.previous_version}
        elif new_image is not None:
            sid, exts = image_contents(world, new_image)
            fields = {"talos_version": tag_of(new_image), "installer_image": new_image,
                      "previous_version": old_version, "staged_image": None, "schematic_id": sid, "extensions": exts}
        _boot(world, n, **fields)
    finally:
        with world.cond:
            outcome.done.set()
            world.cond.notify_all()


def upgrade_node(world: World, n: Node, image: str, outcome: Outcome, *, stage: bool, powercycle: bool) -> None:
    """The Upgrade sequence (Sequencer.Upgrade), or with --stage the StageUpgrade one (Sequencer.StageUpgrade:
    no drain; the installer runs early in the next boot, which reboots once more into the new version).

    - upgrade-fails, or an installer whose pre-flight refuses the host: the installer exits 1 after the node was
      cordoned and its services stopped; machined only logs it (v1alpha1_server.go Upgrade: "upgrade failed:")
      and nothing reboots it: it stays up, cordoned, NotReady, etcd stopped, its stage "rebooting" (a FATAL
      sequence error: controllers/runtime/machine_status.go) — siderolabs/talos #1768, #7423.
    - upgrade-falls-back: the new image does not come up and the boot loader boots the previous entry: the node
      is back with a new boot ID at its old version, which talosctl's tracker takes for done (MachineReady and a
      changed boot ID: cmd/talosctl/pkg/talos/action/tracker.go).
    - upgrade-slow: the node needs SLOW_UPGRADE_FACTOR reboots' time, so a short --timeout gives up while the
      node finishes later (siderolabs/talos #11830)."""
    try:
        phases = [p for p in UPGRADE_PHASES if not (powercycle and p == "kexec")]
        with world.lock:
            old_version = n.talos_version
            refusal = installer_preflight(old_version, tag_of(image))
            fails = world.faults.has("upgrade-fails", n.hostname) or refusal is not None
            falls_back = world.faults.has("upgrade-falls-back", n.hostname)
            slow = world.faults.has("upgrade-slow", n.hostname)
        _log(outcome, f"{'stageUpgrade' if stage else 'upgrade'} sequence: {len(phases)} phase(s)")
        _stop_services(world, n, cordon=True, stage="upgrading")
        if fails and not stage:
            _log(outcome, f'task upgrade (1/1): performing upgrade via "{image}"')
            if refusal:
                _log(outcome, f"pre-flight checks failed: {refusal}")
            _log(outcome, 'task upgrade (1/1): failed: task "upgrade" failed: exit code 1')
            _log(outcome, f"phase upgrade (9/{len(phases)}): failed")
            _log(outcome, "upgrade sequence: failed")
            with world.lock:
                world.update(n, stage="rebooting")
            outcome.error = INSTALLER_FAILED
            return
        with world.lock:
            world.update(n, phase="rebooting", stage="")
        seconds = world.knobs.reboot_seconds * (SLOW_UPGRADE_FACTOR if slow else 1.0) * (2.0 if stage else 1.0)
        if not world.sleep(seconds):
            return
        sid, exts = image_contents(world, image)
        fields: dict[str, Any]
        if fails or falls_back:
            # The staged install failed at boot, or the new entry did not boot: the old entry runs again, and the
            # other entry — what `talosctl rollback` would boot — is the image that failed.
            fields = {"previous_version": tag_of(image)}
            _log(outcome, "boot entry B failed to boot; falling back to entry A")
        else:
            fields = {"talos_version": tag_of(image), "installer_image": image, "previous_version": old_version,
                      "staged_image": None, "schematic_id": sid, "extensions": exts}
        _boot(world, n, **fields)
    finally:
        with world.cond:
            outcome.done.set()
            world.cond.notify_all()


def _rebooted(n: Node, boot: str, outcome: Outcome) -> bool:
    if outcome.done.is_set() and outcome.error:
        return True
    return outcome.done.is_set() and n.boot_id != boot and n.phase == "running"


def _tracked(inv: Invocation, flags: dict[str, Any], action: str,
             prepare: Callable[[Node], str | None],
             start: Callable[[Node, Outcome], Callable[[], None]]) -> Result:
    """Start the action on every node; with --wait follow it like talosctl's action tracker."""
    world = inv.world
    started: list[tuple[str, Node, str, Outcome]] = []
    errors: list[tuple[str, str]] = []
    for ip, n in _reachable(inv, errors, flags.get("insecure", False)):
        refusal = prepare(n)
        if refusal:
            errors.append((ip, refusal))
            continue
        outcome = Outcome()
        boot = n.boot_id  # before the action starts: --wait tracks until it changed
        world.spawn(start(n, outcome), f"{action}-{n.hostname}")
        started.append((ip, n, boot, outcome))
    if errors and not started:
        inv.err.append(multierror(f"performing {action}", errors))
        return _done(inv, 1)
    if not flags.get("wait", True):
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f %z UTC")
        ack = {"upgrade": "Upgrade request received", "rollback": "Rollback request received",
               "reboot": "Reboot request received"}[action]
        rows = [["NODE", "ACK", "STARTED"]] + [[ip, ack, now] for ip, *_ in started]
        inv.out.append(table(rows))
        return _finish(inv, f"performing {action}", errors)
    inv.err.append(f"watching nodes: [{' '.join(ip for ip, *_ in started)}]\n")
    deadline = time.monotonic() + flags.get("timeout", 1800.0)
    failed: list[tuple[str, Outcome]] = []
    for ip, n, boot, outcome in started:
        inv.err.append(f"    * {ip}: task: {action} action: START\n    * {ip}: unavailable, retrying...\n")
        ok = world.wait_for(partial(_rebooted, n, boot, outcome), max(0.0, deadline - time.monotonic()))
        if not ok:
            errors.append((ip, "context deadline exceeded" if not world.stopping else "the simulated homelab stopped"))
            failed.append((ip, outcome))
        elif outcome.error:
            errors.append((ip, outcome.error))
            failed.append((ip, outcome))
        else:
            inv.err.append(f"    * {ip}: events check condition met\n    * {ip}: post check passed\n")
    if flags.get("debug") and failed:
        # tracker.go Run with --debug: the console of every failed node, after the report.
        inv.err.append(f"console logs for nodes {_goq([ip for ip, _ in failed])}:\n")
        inv.err.extend(line + "\n" for _, o in failed for line in o.console)
    return _finish(inv, f"performing {action}", errors)


def etcd_upgrade_check(world: World, n: Node) -> str | None:
    """Talos's etcd ValidateForUpgrade for a control plane: the refusal text, or None."""
    if n.role != "controlplane":
        return None
    with world.lock:
        members = world.clusters[n.cluster].etcd_members()
        if len(members) == 2:
            return ("rpc error: code = Unknown desc = error validating etcd for upgrade: etcd member count(2) is "
                    "insufficient to maintain quorum if upgrade commences")
        for m in members:
            if not m.etcd_running or world.faults.has("etcd-unhealthy", m.hostname):
                return (f"rpc error: code = Unknown desc = error validating etcd for upgrade: etcd member "
                        f"{int(m.etcd_member_id, 16)} is not healthy; all members must be healthy to perform an "
                        f"upgrade: context deadline exceeded")
    return None


def cmd_upgrade(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    """cmd/talosctl/cmd/talos/upgrade.go: --debug implies --wait; an unknown reboot mode is an error of the
    command (not of its usage). The server side is v1alpha1_server.go Upgrade: the image is pulled and
    validated, then (control planes, without --force) etcd is checked, before anything changes."""
    if pos:
        raise UsageError(f'unknown command "{pos[0]}" for "talosctl upgrade"')
    if flags["reboot-mode"].upper() not in ("DEFAULT", "POWERCYCLE"):
        inv.err.append(f"invalid reboot mode: {flags['reboot-mode']}\n")
        return _done(inv, 1)
    if flags["debug"]:
        flags = dict(flags, wait=True)
    image = flags["image"] or f"ghcr.io/siderolabs/installer:{CLIENT_VERSION}"
    world = inv.world

    def prepare(n: Node) -> str | None:
        refusal = pull_refusal(world, image)
        if refusal is None and not flags["force"]:
            refusal = etcd_upgrade_check(world, n)
        return refusal

    def start(n: Node, outcome: Outcome) -> Callable[[], None]:
        return partial(upgrade_node, world, n, image, outcome, stage=flags["stage"],
                       powercycle=flags["reboot-mode"].lower() == "powercycle")

    return _tracked(inv, flags, "upgrade", prepare, start)


def cmd_rollback(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    """v1alpha1_server.go Rollback: the boot loader's entries are swapped, then the node reboots into the other
    one; it answers at once (no tracking)."""
    world = inv.world

    def prepare(n: Node) -> str | None:
        if not n.previous_version:
            return "rpc error: code = Unknown desc = cannot rollback: no previous installation found"
        return None

    def start(n: Node, outcome: Outcome) -> Callable[[], None]:
        return partial(reboot_node, world, n, None, outcome, rollback=True)

    return _tracked(inv, dict(flags, wait=False), "rollback", prepare, start)


def cmd_reboot(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    if flags["mode"] not in ("default", "powercycle"):
        raise UsageError(f'invalid reboot mode "{flags["mode"]}": must be one of default, powercycle')
    world = inv.world

    def start(n: Node, outcome: Outcome) -> Callable[[], None]:
        return partial(reboot_node, world, n, None, outcome)

    return _tracked(inv, flags, "reboot", lambda n: None, start)


def cmd_read(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    """`talosctl read <path>` of the one file the tools here read: the kernel's boot ID, which talosctl's own
    action tracker reads to tell that a node rebooted (action/tracker.go getBootID)."""
    if len(pos) != 1:
        raise UsageError(f"accepts 1 arg(s), received {len(pos)}")
    if len(inv.nodes) > 1:
        inv.err.append('error reading file: "read" command is not supported with multiple nodes\n')
        return _done(inv, 1)
    n = _first_node(inv, "error reading file")
    if n is None:
        return _done(inv, 1)
    if pos[0] != "/proc/sys/kernel/random/boot_id":
        inv.err.append(f"error reading file: rpc error: code = Unknown desc = open {pos[0]}: no such file or "
                       f"directory\n")
        return _done(inv, 1)
    inv.out.append(n.boot_id + "\n")
    return _done(inv)


# --- upgrade-k8s -----------------------------------------------------------------------------


def _kv(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    if not m:
        raise UsageError(f'invalid version "{text}": expected a version like 1.33.0')
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def cmd_upgrade_k8s(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    world = inv.world
    n = _first_node(inv, "error upgrading Kubernetes")
    if n is None:
        return _done(inv, 1)
    cluster = world.clusters[n.cluster]
    with world.lock:
        nodes = [x for x in cluster.nodes.values() if x.installed]
        # pkg/cluster/kubernetes/detect.go DetectLowestVersion: the lowest image tag of the kube-apiserver,
        # -controller-manager, -scheduler (and kube-proxy) pods in kube-system — not the kubelets.
        pods = [_kv(x.control_plane_version) for x in nodes if x.role == "controlplane" and x.control_plane_version]
    if not flags["from"] and not pods:
        inv.err.append("error detecting the lowest Kubernetes version failed to detect lowest Kubernetes version\n")
        return _done(inv, 1)
    frm = _kv(flags["from"]) if flags["from"] else min(pods)
    to = _kv(flags["to"] or "1.34.1")
    fs, ts = ".".join(map(str, frm)), ".".join(map(str, to))
    if not flags["from"]:
        inv.out.append(f"automatically detected the lowest Kubernetes version {fs}\n")
    # siderolabs/go-kubernetes v0.2.26 (talosctl v1.11.5's) kubernetes/upgrade/path.go Path.IsSupported: the same
    # minor or the next one, 1.19 through 1.34; talos_managed.go Upgrade refuses anything else.
    if not (frm[0] == to[0] == 1 and 19 <= frm[1] <= 34 and to[1] - frm[1] in (0, 1) and to[1] <= 34):
        inv.err.append(f'unsupported upgrade path {frm[0]}.{frm[1]}->{to[0]}.{to[1]} (from "{fs}" to "{ts}")\n')
        return _done(inv, 1)
    cps = [x for x in nodes if x.role == "controlplane"]
    workers = [x for x in nodes if x.role == "worker"]
    down = [x.hostname for x in nodes if not x.talos_up]
    inv.out.append(f"discovered controlplane nodes {_goq([x.ip for x in cps])}\n")
    inv.out.append(f"discovered worker nodes {_goq([x.ip for x in workers])}\n")
    if down:
        inv.err.append(f"error: failed to upgrade Kubernetes: nodes {', '.join(down)} are not reachable\n")
        return _done(inv, 1)
    # pkg/cluster/kubernetes/compat.go VerifyVersionCompatibility: every node's Talos must run the target
    # (compatibility/kubernetes_version.go SupportedWith).
    for x in cps + workers:
        row = TALOS_MINORS.get(_semver3(x.talos_version)[:2])
        tv = ".".join(map(str, _semver3(x.talos_version)))
        why = (f"compatibility with version {tv} is not supported" if row is None else
               f"version of Kubernetes {ts} is too old to be used with Talos {tv}" if to < row[2] else
               f"version of Kubernetes {ts} is too new to be used with Talos {tv}" if to >= row[3] else None)
        if why:
            inv.err.append(f'compatibility check failed on node "{x.ip}": {why}\n')
            return _done(inv, 1)
        inv.out.append(f'> "{x.ip}": Talos version {tv} is compatible with Kubernetes version {ts}\n')
    inv.out.append("checking for removed Kubernetes component flags\nchecking for removed Kubernetes API resource versions\n")
    step = world.knobs.reboot_seconds / 20
    for comp in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        inv.out.append(f'updating "{comp}" to version "{ts}"\n')
        for x in cps:
            inv.out.append(f' > "{x.ip}": starting update\n > update {comp}: v{fs} -> {ts}\n')
            if flags["dry-run"]:
                inv.out.append(" > skipped in dry-run\n")
                continue
            inv.out.append(f' > "{x.ip}": machine configuration patched\n > "{x.ip}": waiting for {comp} pod update\n')
            if not world.sleep(step):
                return _done(inv, 1)
            if comp == "kube-scheduler":  # the node's last control-plane pod now runs the new image
                world.update(x, control_plane_version=f"v{ts}")
            inv.out.append(f' < "{x.ip}": successfully updated\n')
    if flags["upgrade-kubelet"]:
        inv.out.append(f'updating kubelet to version "{ts}"\n')
        for x in cps + workers:
            inv.out.append(f' > "{x.ip}": starting update\n > update kubelet: {x.kubelet_version.lstrip("v")} -> {ts}\n')
            if flags["dry-run"]:
                inv.out.append(" > skipped in dry-run\n")
                continue
            inv.out.append(f' > "{x.ip}": machine configuration patched\n > "{x.ip}": waiting for kubelet restart\n')
            if not world.sleep(step):
                return _done(inv, 1)
            world.update(x, kubelet_version=f"v{ts}")
            inv.out.append(f' > "{x.ip}": waiting for node update\n < "{x.ip}": successfully updated\n')
    if not flags["dry-run"]:
        with world.lock:
            cluster.kubernetes_version = f"v{ts}"
            world.changed()
    inv.out.append("updating manifests\n > apply manifest Secret bootstrap-token-wx9fz1\n"
                   " > apply skipped in dry run\n" if flags["dry-run"] else "updating manifests\n")
    return _done(inv)


# --- etcd ------------------------------------------------------------------------------------


# Before bootstrap (and while etcd is down) nothing listens on the node's etcd client port: machined's
# EtcdMemberList dials localhost:2379 (talosctl asks with QueryLocal) and returns the etcd client's error
# unchanged (talos v1.11.5 internal/app/machined/internal/server/v1alpha1/v1alpha1_server.go EtcdMemberList,
# internal/pkg/etcd/etcd.go NewLocalClient). No transcript of it exists (docs/twin.md): gRPC's dial error.
ETCD_NOT_RUNNING = ('rpc error: code = Unavailable desc = connection error: desc = "transport: Error while dialing: '
                    'dial tcp 127.0.0.1:2379: connect: connection refused"')


def _member_row(m: Node) -> list[str]:
    return [m.etcd_member_id, m.hostname, f"https://{m.ip}:2380", f"https://{m.ip}:2379", "false"]


def cmd_etcd(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    if not pos:
        raise UsageError("etcd requires a subcommand: members, status, snapshot, alarm, leave, forfeit-leadership, remove-member")
    sub = pos[0]
    world = inv.world
    if sub == "members":
        rows = [(["NODE"] if inv.node_column else []) + ["ID", "HOSTNAME", "PEER URLS", "CLIENT URLS", "LEARNER"]]
        errors: list[tuple[str, str]] = []
        for ip, n in _reachable(inv, errors):
            if not n.etcd_running:
                errors.append((ip, ETCD_NOT_RUNNING))
                continue
            with world.lock:
                members = world.clusters[n.cluster].etcd_members()
                for m in members:
                    rows.append(([ip] if inv.node_column else []) + _member_row(m))
        if len(rows) > 1:
            inv.out.append(table(rows))
        return _finish_filtered(inv, "getting members", errors, len(rows) > 1)
    if sub == "status":
        rows = [(["NODE"] if inv.node_column else []) +
                ["MEMBER", "DB SIZE", "IN USE", "LEADER", "RAFT INDEX", "RAFT TERM", "RAFT APPLIED INDEX",
                 "LEARNER", "PROTOCOL", "STORAGE", "ERRORS"]]
        errors = []
        for ip, n in _reachable(inv, errors):
            if not n.etcd_running:
                errors.append((ip, ETCD_NOT_RUNNING))
                continue
            with world.lock:
                members = world.clusters[n.cluster].etcd_members()
                leader = next((m for m in members if m.etcd_running), n)
                down = [m for m in members if not m.etcd_running]
            db = 3_600_000 + int(n.etcd_member_id[:4], 16) * 10
            in_use = int(db * 0.6159)
            errs = ""
            if world.faults.has("etcd-unhealthy", n.hostname):
                errs = "etcdserver: mvcc: database space exceeded"
            elif down:
                errs = ", ".join(f"failed to reach the peer {m.etcd_member_id} (context deadline exceeded)" for m in down)
            rows.append(([ip] if inv.node_column else []) +
                        [n.etcd_member_id, humanize_bytes(db), f"{humanize_bytes(in_use)} ({100 * in_use / db:.2f}%)",
                         leader.etcd_member_id, "4703", "2", "4703", "false", "3.6.4", "3.6.0", errs])
        if len(rows) > 1:
            inv.out.append(table(rows))
        return _finish_filtered(inv, "getting status", errors, len(rows) > 1)
    if sub == "snapshot":
        if len(pos) != 2:
            raise UsageError(f"accepts 1 arg(s), received {len(pos) - 1}")
        ip = inv.nodes[0]
        target, err = _reach(inv, ip)
        if target is None or not target.etcd_running:
            inv.err.append(f"error reading file: {err or 'rpc error: code = Unknown desc = etcd is not running'}\n")
            return _done(inv, 1)
        dest = inv.path(pos[1])
        payload = json.dumps({"cluster": target.cluster, "member": target.etcd_member_id, "taken": time.time(),
                              "members": [m.hostname for m in world.clusters[target.cluster].etcd_members()]}).encode()
        data = b"etcd-snapshot-v3\n" + payload + b"\0" * (4096 - len(payload) % 4096)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        inv.out.append(f'etcd snapshot saved to "{pos[1]}" ({len(data)} bytes)\n')
        inv.out.append(f"snapshot info: hash {int(hashlib.sha1(data).hexdigest()[:8], 16):08x}, revision 4703, "
                       f"total keys 1234, total size {len(data)}\n")
        return _done(inv)
    raise UsageError(f'unknown command "{sub}" for "talosctl etcd"')


# --- health ----------------------------------------------------------------------------------


def health_checks(world: World, cluster: ClusterState) -> list[tuple[str, Callable[[], str | None]]]:
    """(description, check) pairs of `talosctl health`; a check returns None when OK, else why not."""
    def nodes() -> list[Node]:
        return [n for n in cluster.nodes.values() if n.installed]

    def etcd_healthy() -> str | None:
        bad = [m.hostname for m in cluster.etcd_members()
               if not m.etcd_running or world.faults.has("etcd-unhealthy", m.hostname)]
        if not cluster.etcd_members():
            return "etcd is not bootstrapped"
        return f"etcd members not healthy: {bad}".replace("'", '"') if bad else None

    def apid() -> str | None:
        bad = [n.ip for n in nodes() if not n.talos_up]
        return f"some nodes are not reachable: {bad}".replace("'", '"') if bad else None

    def kubelet() -> str | None:
        # check/service.go ServiceHealthAssertion's words for a stopped service
        down = apid()
        if down:
            return down
        bad = [n.ip for n in nodes() if not n.kubelet_up]
        return "; ".join(f'{ip}: service "kubelet" not in expected state "Running": current state [Finished]'
                         for ip in bad) or None

    def booted() -> str | None:
        # check/events.go AllNodesBootedAssertion: "nodes are not running: <stage>: [<ips>]"
        down = apid()
        if down:
            return down
        stages: dict[str, list[str]] = {}
        for n in nodes():
            stage = _machine_status(n)["stage"]
            if stage != "running":
                stages.setdefault(stage, []).append(n.ip)
        return ("nodes are not running: " + ", ".join(f"{st}: [{' '.join(sorted(ips))}]"
                                                      for st, ips in sorted(stages.items()))) if stages else None

    def static_pods() -> str | None:
        # check/kubernetes.go K8sControlPlaneStaticPods
        if not cluster.bootstrapped:
            return "no nodes registered in Kubernetes"
        for n in nodes():
            if n.role == "controlplane" and n.static_pods_missing:
                return f"missing static pods on node {n.ip}: [{' '.join(n.static_pods_missing)}]"
        return None

    def components() -> str | None:
        # check/kubernetes.go K8sFullControlPlaneAssertion: one ready pod of each component per control plane
        if not cluster.bootstrapped:
            return "no nodes registered in Kubernetes"
        cps = [n for n in nodes() if n.role == "controlplane"]
        for app in ("kube-apiserver", "kube-scheduler", "kube-controller-manager"):
            running = [n for n in cps if n.talos_up and n.kubelet_up and f"kube-system/{app}" not in n.static_pods_missing]
            if len(running) != len(cps):
                return f"expected number of pods for {app} to be {len(cps)}, got {len(running)}"
        return None

    def k8s_report() -> str | None:
        return None if cluster.bootstrapped else "no nodes registered in Kubernetes"

    def k8s_ready() -> str | None:
        bad = [n.hostname for n in nodes() if not (n.talos_up and n.ready)]
        return f"some nodes are not ready: [{' '.join(bad)}]" if bad else None

    def coredns() -> str | None:
        # pkg/cluster/check/kubernetes.go K8sPodReadyAssertion's texts, for the k8s-app=kube-dns pods.
        if not cluster.bootstrapped or not cluster.cni_ready:
            return 'no ready pods found for namespace "kube-system" and label selector "k8s-app=kube-dns"'
        return cluster.coredns_problem


    def schedulable() -> str | None:
        bad = [n.hostname for n in nodes() if n.unschedulable]
        return f"some nodes are not schedulable: [{' '.join(bad)}]" if bad else None

    return [
        ("etcd to be healthy", etcd_healthy),
        ("etcd members to be consistent across nodes", etcd_healthy),
        ("etcd members to be control plane nodes", lambda: None),
        ("apid to be ready", apid),
        ("all nodes memory sizes", lambda: None),
        ("all nodes disk sizes", lambda: None),
        ("no diagnostics", lambda: None),
        ("kubelet to be healthy", kubelet),
        ("all nodes to finish boot sequence", booted),
        ("all k8s nodes to report", k8s_report),
        ("all control plane static pods to be running", static_pods),
        ("all control plane components to be ready", components),
        ("all k8s nodes to report ready", k8s_ready),
        ("all k8s nodes to report schedulable", schedulable),
        ("kube-proxy to report ready", lambda: None),
        ("coredns to report ready", coredns),
    ]


def cmd_health(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    world = inv.world
    n = _first_node(inv, "healthcheck error")
    if n is None:
        return _done(inv, 1)
    cluster = world.clusters[n.cluster]
    with world.lock:
        ips = [x.ip for x in cluster.nodes.values() if x.installed]
    inv.err.append(f"discovered nodes: {_goq(ips)}\n")
    deadline = time.monotonic() + flags["wait-timeout"]
    for desc, check in health_checks(world, cluster):
        inv.err.append(f"waiting for {desc}: ...\n")
        last: list[str | None] = [None]

        def ok(check: Callable[[], str | None] = check, last: list[str | None] = last, desc: str = desc) -> bool:
            why = check()
            if why and why != last[0]:
                inv.err.append(f"waiting for {desc}: {why}\n")
            last[0] = why
            return why is None

        if not world.wait_for(ok, max(0.0, deadline - time.monotonic())):
            inv.err.append("healthcheck error: rpc error: code = DeadlineExceeded desc = context deadline exceeded\n")
            return _done(inv, 1)
        inv.err.append(f"waiting for {desc}: {'SKIP' if desc.startswith('kube-proxy') else 'OK'}\n")
    return _done(inv)


# --- get -------------------------------------------------------------------------------------


MACHINESTATUS = ("machinestatus", "machinestatuses", "machinestatuses.runtime.talos.dev")
EXTENSIONS = ("extensions", "extensionstatus", "extensionstatuses", "extensionstatuses.runtime.talos.dev")


def _machine_status(n: Node) -> dict[str, Any]:
    """spec of MachineStatus (controllers/runtime/machine_status.go): readiness is judged only while booting or
    running (getReadinessChecks): services apid, machined, kubelet (+ etcd, trustd on a control plane), static
    pods, the Node Ready; in any other stage the machine reports ready with no unmet condition."""
    stage = n.stage or {"running": "running", "maintenance": "maintenance"}.get(n.phase, "booting")
    unmet: list[dict[str, str]] = []
    if stage in ("running", "booting"):
        down = [s for s, up in (("kubelet", n.kubelet_up), ("etcd", n.etcd_running or n.role != "controlplane"))
                if not up]
        if down:
            unmet.append({"name": "services", "reason": f"some services are not healthy: {', '.join(down)}"})
        if n.static_pods_missing:
            unmet.append({"name": "staticPods", "reason": "some static pods are not ready: "
                                                          + ", ".join(n.static_pods_missing)})
        if not n.ready:
            unmet.append({"name": "nodeReady", "reason": f'node "{n.hostname}" is not ready'})
    return {"stage": stage, "status": {"ready": not unmet, "unmetConditions": unmet}}


def _extension_objects(n: Node) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(metadata, spec) of each ExtensionStatus (pkg/machinery/resources/runtime/extension_status.go; spec is
    pkg/machinery/extensions Layer). The `schematic` one is the Image Factory's virtual extension, its version
    the schematic ID and its extraInfo the schematic (image-factory internal/artifacts/schematic.go). The layer
    file names in `image` are not taken from a capture."""
    out = []
    for i, name in enumerate(n.extensions):
        if name == "schematic":
            meta = {"name": "schematic", "version": n.schematic_id, "author": "Image Factory",
                    "description": "Virtual extension which specifies the schematic of the image built with "
                                   "Image Factory.", "compatibility": {"talos": {"version": ">= 1.0.0"}}}
        else:
            meta = {"name": name, "version": n.talos_version, "author": "Sidero Labs",
                    "description": f"{name} system extension", "compatibility": {"talos": {"version": ">= v1.11.0"}}}
        out.append(({"namespace": "runtime", "type": "ExtensionStatuses.runtime.talos.dev", "id": str(i),
                     "version": 1, "owner": "runtime.ExtensionStatusController", "phase": "running",
                     "created": BUILT, "updated": BUILT},
                    {"image": f"{i:03d}.sqsh", "metadata": meta}))
    return out


def cmd_get(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    if not pos:
        raise UsageError("requires at least 1 arg(s), only received 0")
    resource = pos[0].lower()
    if resource not in MACHINESTATUS + EXTENSIONS:
        inv.err.append(f'error getting resources: 1 error occurred:\n\t* {inv.nodes[0]}: rpc error: code = NotFound '
                       f'desc = resource "{pos[0]}" is not registered\n\n')
        return _done(inv, 1)
    errors: list[tuple[str, str]] = []
    objs: list[dict[str, Any]] = []
    for ip, n in _reachable(inv, errors, flags["insecure"]):
        node = ip if inv.node_column else ""
        if resource in MACHINESTATUS:
            objs.append({
                "node": node,
                "metadata": {"namespace": "runtime", "type": "MachineStatuses.runtime.talos.dev", "id": "machine",
                             "version": 3, "owner": "runtime.MachineStatusController", "phase": "running",
                             "created": BUILT, "updated": BUILT},
                "spec": _machine_status(n),
            })
        else:
            objs += [{"node": node, "metadata": meta, "spec": spec} for meta, spec in _extension_objects(n)]
    out = flags["output"]
    if out == "json":
        inv.out.extend(json.dumps(o, indent=4) + "\n" for o in objs)
    elif out == "yaml":
        inv.out.extend(yaml.safe_dump(o, sort_keys=False) + "---\n" for o in objs)
    elif resource in MACHINESTATUS:
        rows = [["NODE", "NAMESPACE", "TYPE", "ID", "VERSION", "STAGE", "READY"]]
        rows += [[o["node"], "runtime", "MachineStatus", "machine", "3", o["spec"]["stage"],
                  str(o["spec"]["status"]["ready"]).lower()] for o in objs]
        inv.out.append(table(rows))
    else:
        rows = [["NODE", "NAMESPACE", "TYPE", "ID", "VERSION", "NAME", "VERSION"]]
        rows += [[o["node"], "runtime", "ExtensionStatus", o["metadata"]["id"], "1", o["spec"]["metadata"]["name"],
                  o["spec"]["metadata"]["version"]] for o in objs]
        inv.out.append(table(rows))
    # cmd/talosctl/cmd/talos/get.go: what came is printed, the other nodes' errors fail the command.
    return _finish(inv, "getting resources", errors)


# --- apply-config, bootstrap, kubeconfig -----------------------------------------------------


def _machine_facts(text: str) -> dict[str, str]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as e:
        raise UsageError(f"failed to parse config: {e}") from None
    doc = next((d for d in docs if "machine" in d), None)
    if doc is None:
        raise UsageError("failed to parse config: the file has no machine section (not a Talos machine config)")
    machine = doc.get("machine") or {}
    facts = {"type": str(machine.get("type", "")),
             "image": str((machine.get("install") or {}).get("image", "")),
             "disk": str((machine.get("install") or {}).get("disk", "")),
             "kubelet": str((machine.get("kubelet") or {}).get("image", ""))}
    return facts


def cni_facts(text: str) -> tuple[str, bool, bool]:
    """(CNI name, kube-proxy disabled, a Cilium install among the inline manifests) of a machine config."""
    try:
        doc = next((d for d in yaml.safe_load_all(text) if isinstance(d, dict) and "cluster" in d), {}) or {}
    except yaml.YAMLError:
        return "flannel", False, False
    cluster = doc.get("cluster") or {}
    cni = str((((cluster.get("network") or {}).get("cni") or {}).get("name")) or "flannel")
    proxy_off = bool((cluster.get("proxy") or {}).get("disabled"))
    cilium = any("cilium" in str(m.get("contents", "")) and "install" in str(m.get("contents", ""))
                 for m in cluster.get("inlineManifests") or [] if isinstance(m, dict))
    return cni, proxy_off, cilium


def _network_after_bootstrap(world: World, cluster: ClusterState) -> None:
    """What runs as the cluster's network once etcd and the API are up, from the first control plane's config.

    - Talos' default flannel reaches the API through KubePrism (talos v1.11.5
      internal/app/machined/pkg/controllers/k8s/control_plane.go: FlannelKubeServiceHost 127.0.0.1 when
      KubePrism is on), so Nodes get Ready even without kube-proxy; but CoreDNS talks to the API through the
      `kubernetes` Service IP, which nothing routes without kube-proxy: it never gets Ready.
    - cni: none and no CNI installed: kubelet reports NetworkPluginNotReady, every Node stays NotReady and
      CoreDNS Pending; with the Cilium install Job among the inline manifests, Cilium comes up (it replaces
      kube-proxy through KubePrism) and both get Ready.
    """
    cp = next((n for n in cluster.control_planes() if n.machine_config), None)
    cni, proxy_off, cilium = cni_facts(cp.machine_config if cp else "")
    if cni == "none" and not cilium:
        cluster.cni_ready, cluster.coredns_problem = False, None
        return
    if cni == "none":  # the install Job runs on the host network once the API answers
        if not world.sleep(world.knobs.reboot_seconds / 2):
            return
    with world.lock:
        cluster.cni_ready = True
        cluster.coredns_problem = ("some pods are not ready: [coredns-78f679c54d-4x2bq coredns-78f679c54d-9tz6m]"
                                   if cni != "none" and proxy_off else None)
        for x in cluster.nodes.values():
            if x.talos_up:
                x.ready = not world.faults.has("node-never-ready", x.hostname)
        world.changed()


def cmd_apply_config(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    if not flags["file"]:
        raise UsageError("no filename supplied for configuration")
    try:
        text = inv.path(flags["file"]).read_text()
    except OSError as e:
        inv.err.append(f"error: failed to read configuration from {flags['file']!r}: {e.strerror or e}\n")
        return _done(inv, 1)
    if flags["config-patch"]:  # as talosctl does: patches are applied to the file before it is sent
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        docs = apply_patches(docs, [load_patch(p, str(inv.cwd)) for p in flags["config-patch"]])
        text = render_config(docs, with_docs=False, with_examples=False)
    facts = _machine_facts(text)
    world = inv.world
    errors: list[tuple[str, str]] = []
    for _ip, n in _reachable(inv, errors, flags["insecure"]):
        mode = flags["mode"]
        details = {"auto": "Applied configuration without a reboot", "no-reboot": "Applied configuration without a reboot",
                   "reboot": "Applied configuration with a reboot", "staged": "Staged configuration to be applied after a reboot",
                   "try": "Applied configuration without a reboot"}.get(mode)
        if details is None:
            raise UsageError(f'invalid mode "{mode}": must be one of auto, no-reboot, reboot, staged, try')
        if n.phase == "maintenance":
            details = "Applied configuration with a reboot"
        if flags["dry-run"]:
            diff = "".join(difflib.unified_diff(n.machine_config.splitlines(True), text.splitlines(True),
                                                "live", "new"))
            inv.out.append(f"Dry run summary:\n{details} (skipped in dry-run).\n\nConfig diff:\n\n"
                           f"{diff if diff else 'No changes.'}\n")
            continue
        if n.phase == "maintenance":
            world.update(n, machine_config=text, phase="installing")
            image = facts["image"] or n.installer_image
            kubelet = tag_of(facts["kubelet"]) if facts["kubelet"] else n.kubelet_version
            world.spawn(partial(_install, world, n, image, kubelet, facts["disk"]), f"install-{n.hostname}")
            continue
        world.update(n, machine_config=text)
        inv.out.append(details + "\n")
        if mode == "reboot":
            world.spawn(partial(reboot_node, world, n, None, Outcome()), f"reboot-{n.hostname}")
    return _finish(inv, "applying new configuration", errors)


def _install(world: World, n: Node, image: str, kubelet: str, disk: str = "") -> None:
    """Maintenance mode -> install to disk -> boot the installed Talos (joins if the cluster is up)."""
    if not world.sleep(world.knobs.reboot_seconds):
        return
    with world.lock:
        if disk and disk != n.disk:
            # The installer finds no such disk; the empty disk boots nothing, so the VM comes up from the
            # ISO again, in maintenance mode.
            world.update(n, phase="maintenance")
            return
        cluster = world.clusters[n.cluster]
        joined = cluster.bootstrapped
        member = new_member_id() if joined and n.role == "controlplane" else n.etcd_member_id
        world.update(n, phase="running", installed=True, talos_version=tag_of(image), installer_image=image,
                     kubelet_version=kubelet if kubelet.startswith("v") else f"v{kubelet}",
                     boot_id=str(uuid.uuid4()), etcd_member_id=member, etcd_running=bool(member),
                     booted_at=time.monotonic(),
                     ready=joined and cluster.cni_ready and not world.faults.has("node-never-ready", n.hostname))
    world.power(n, down=False)


# How long after booting the installed Talos its CRI is not yet up: machined answers bootstrap with
# FailedPrecondition "bootstrap is not available yet" (IsBootstrapAllowed waits 1 s for the cri service).
BOOTSTRAP_NOT_READY_SHARE = 0.3


def cmd_bootstrap(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    """talos v1.11.5 internal/app/machined/internal/server/v1alpha1/v1alpha1_server.go Bootstrap: in this order,
    FailedPrecondition "bootstrap is not available yet" (CRI not up), FailedPrecondition "bootstrap can only
    be performed on a control plane node", FailedPrecondition "time is not in sync yet", AlreadyExists "etcd
    data directory is not empty"; talosctl prints "error executing bootstrap: <gRPC error>"."""
    world = inv.world
    n = _first_node(inv, "error executing bootstrap")
    if n is None:
        return _done(inv, 1)
    with world.lock:
        cluster = world.clusters[n.cluster]
        if time.monotonic() - n.booted_at < world.knobs.reboot_seconds * BOOTSTRAP_NOT_READY_SHARE:
            inv.err.append("error executing bootstrap: rpc error: code = FailedPrecondition desc = bootstrap is not "
                           "available yet\n")
            return _done(inv, 1)
        if n.role != "controlplane":
            inv.err.append("error executing bootstrap: rpc error: code = FailedPrecondition desc = bootstrap can only "
                           "be performed on a control plane node\n")
            return _done(inv, 1)
        if cluster.bootstrapped or n.etcd_member_id:
            inv.err.append("error executing bootstrap: rpc error: code = AlreadyExists desc = etcd data directory "
                           "is not empty\n")
            return _done(inv, 1)
        cluster.bootstrapped = True
        n.etcd_member_id = new_member_id()
        n.etcd_running = True
        world.changed()
    world.spawn(partial(_network_after_bootstrap, world, cluster), f"network-{cluster.name}")
    return _done(inv)


def cmd_service(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    """`talosctl service etcd` (status) in formatters.RenderServicesInfo's layout. Before bootstrap etcd stays
    in its pre state, waiting to join (services/etcd.go PreFunc → buildInitialCluster retries): STATE
    Preparing, HEALTH ? (docs v1.11 advanced/disaster-recovery.md shows it); after: Running, OK."""
    if not pos or pos[0] != "etcd" or (len(pos) > 1 and pos[1] != "status"):
        raise UsageError("the simulated talosctl answers `service etcd [status]` only")
    errors: list[tuple[str, str]] = []
    for ip, n in _reachable(inv, errors):
        rows = []
        if inv.node_column:
            rows.append(["NODE", ip])
        if n.role != "controlplane":
            errors.append((ip, 'rpc error: code = NotFound desc = service "etcd" not registered'))
            continue
        rows.append(["ID", "etcd"])
        if n.etcd_running:
            rows += [["STATE", "Running"], ["HEALTH", "OK"],
                     ["EVENTS", "[Running]: Health check successful (12s ago)"],
                     ["", "[Running]: Started task etcd (PID 2718) for container etcd (14s ago)"],
                     ["", "[Preparing]: Creating service runner (15s ago)"]]
        else:
            rows += [["STATE", "Preparing"], ["HEALTH", "?"],
                     ["EVENTS", "[Preparing]: Running pre state (17s ago)"],
                     ["", '[Waiting]: Waiting for service "cri" to be "up", time sync (18s ago)']]
        inv.out.append(table(rows))
    return _finish(inv, "listing services", errors)


def cmd_kubeconfig(inv: Invocation, flags: dict[str, Any], pos: list[str]) -> Result:
    world = inv.world
    n = _first_node(inv, "error copying")
    if n is None:
        return _done(inv, 1)
    text = inv.kubeconfig_for(n.cluster) if inv.kubeconfig_for else None
    if text is None or not world.clusters[n.cluster].bootstrapped:
        inv.err.append("error copying: rpc error: code = NotFound desc = kubeconfig is not available: the cluster "
                       "is not bootstrapped (run talosctl bootstrap)\n")
        return _done(inv, 1)
    if pos:
        dest = inv.path(pos[0])
        if pos[0] in (".", "") or dest.is_dir():
            dest = dest / "kubeconfig"
    else:
        kc = inv.env.get("KUBECONFIG", "").split(os.pathsep)[0]
        dest = inv.path(kc) if kc else Path(os.path.expanduser("~/.kube/config"))
    if pos and pos[0] == "-":
        inv.out.append(text)
        return _done(inv)
    new = yaml.safe_load(text)
    if flags["merge"] and dest.exists():
        try:
            cur = yaml.safe_load(dest.read_text()) or {}
        except yaml.YAMLError as e:
            inv.err.append(f"error merging kubeconfig: {dest}: {e}\n")
            return _done(inv, 1)
        for section in ("clusters", "contexts", "users"):
            names = {x["name"] for x in new.get(section) or []}
            cur[section] = [x for x in cur.get(section) or [] if x.get("name") not in names] + list(new.get(section) or [])
        cur["current-context"] = new["current-context"]
        cur.setdefault("apiVersion", "v1")
        cur.setdefault("kind", "Config")
        out = yaml.safe_dump(cur, sort_keys=False)
    else:
        if dest.exists() and not flags["merge"] and not flags["force"]:
            inv.err.append(f"error copying: kubeconfig file already exists, use --force to overwrite: {dest}\n")
            return _done(inv, 1)
        out = text
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(out)
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)
    return _done(inv)


HANDLERS: dict[str, Callable[[Invocation, dict[str, Any], list[str]], Result]] = {
    "version": cmd_version,
    "upgrade": cmd_upgrade,
    "upgrade-k8s": cmd_upgrade_k8s,
    "etcd": cmd_etcd,
    "health": cmd_health,
    "get": cmd_get,
    "apply-config": cmd_apply_config,
    "bootstrap": cmd_bootstrap,
    "service": cmd_service,
    "kubeconfig": cmd_kubeconfig,
    "rollback": cmd_rollback,
    "reboot": cmd_reboot,
    "read": cmd_read,
}


def _goq(items: list[str]) -> str:
    """Go's %q of a []string: ["a" "b"]."""
    return "[" + " ".join(json.dumps(i) for i in items) + "]"
