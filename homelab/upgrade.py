"""Plans and gate verdicts of the Talos and Kubernetes upgrades: pure functions of data.

A plan is exactly what an apply would do (the argv of every command included), so a dry run
returns the plan and touches nothing. A gate is a function of what was observed just before;
it answers with a Verdict whose reason names what it saw.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal

import semver

from homelab import compat
from homelab.config import ProxmoxCluster, TalConfig, TalNode
from homelab.gates import EtcdMember, EtcdStatus, NodeView, Verdict
from homelab.versions import (
    STOCK_INSTALLER,
    VersionError,
    factory_schematic_of,
    parse_version,
    schematic_id,
    vtag,
)

__all__ = [
    "K8sPlan", "NodeStep", "PlanRefused", "RunningImage", "TalosPlan", "TALOS_KUBERNETES_SUPPORT", "UpgradeOptions",
    "Verdict", "etcd_gate", "failure_message", "flux_gate", "nodes_gate", "plan_kubernetes_upgrade",
    "plan_talos_upgrade", "reboot_step", "rollback_step", "self_node_gate", "supported_kubernetes",
    "talos_upgrade_argv", "upgrade_k8s_argv",
]

DEFAULT_UPGRADE_TIMEOUT_S = 1800  # talosctl's own default for --timeout is 30m


class PlanRefused(ValueError):
    """The plan cannot be made; every reason at once, so one run shows the operator all of them."""

    def __init__(self, reasons: Iterable[str]):
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


# --- commands ---------------------------------------------------------------------------------


REBOOT_MODES = ("default", "powercycle")


@dataclass(frozen=True)
class UpgradeOptions:
    """The `talosctl upgrade` options a run passes to every node (talos v1.11.5 cmd/talosctl/cmd/talos/upgrade.go;
    home-operations/tuppr api/v1alpha1 PolicySpec offers the same: rebootMode, stage, debug).

    reboot_mode: `default` reboots through kexec, `powercycle` through the firmware (no kexec).
    stage: Talos only records the image and reboots at once, without cordon or drain (StageUpgrade: stop
    pods and services, reboot); the installer runs early in the next boot, which reboots again into the
    new version.
    debug: talosctl follows the node's console and prints it when the upgrade fails (implies --wait).
    """

    reboot_mode: str = "default"
    stage: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        if self.reboot_mode not in REBOOT_MODES:
            raise ValueError(f"reboot mode {self.reboot_mode!r}: talosctl takes {' or '.join(REBOOT_MODES)}")


def talos_upgrade_argv(talosctl: str, ip: str, image: str, timeout_s: int, force: bool = False,
                       options: UpgradeOptions = UpgradeOptions()) -> list[str]:
    """The one upgrade command per node: blocking (--wait) until the node is back with a new boot ID."""
    argv = [talosctl, "upgrade", "--nodes", ip, "--image", image, "--wait", "--timeout", f"{int(timeout_s)}s"]
    if options.reboot_mode != "default":
        argv += ["--reboot-mode", options.reboot_mode]
    if options.stage:
        argv.append("--stage")
    if options.debug:
        argv.append("--debug")
    if force:
        argv.append("--force")
    return argv


def upgrade_k8s_argv(talosctl: str, to: str, dry_run: bool = False, node: str | None = None) -> list[str]:
    argv = [talosctl, "upgrade-k8s"]
    if node:
        argv += ["--nodes", node]
    argv += ["--to", to]
    if dry_run:
        argv.append("--dry-run")
    return argv


def rollback_step(ip: str) -> str:
    # Shown to a person who pastes it: quoted as a shell would read it, whatever the address holds.
    return shlex.join(["talosctl", "rollback", "--nodes", ip])


def reboot_step(ip: str) -> str:
    return shlex.join(["talosctl", "reboot", "--nodes", ip])


# --- Talos plan -------------------------------------------------------------------------------

Action = Literal["upgrade", "skip"]


@dataclass(frozen=True)
class NodeStep:
    hostname: str
    ip: str
    control_plane: bool
    current: str
    target: str
    action: Action
    image: str
    argv: tuple[str, ...]  # empty when skipped
    reason: str = ""  # why the node is upgraded or skipped
    schematic: str | None = None  # the schematic ID of the image (None: not an Image Factory image)

    @property
    def role(self) -> str:
        return "controlplane" if self.control_plane else "worker"


@dataclass(frozen=True)
class TalosPlan:
    cluster: str
    target: str
    timeout_s: int
    steps: tuple[NodeStep, ...]

    @property
    def to_upgrade(self) -> tuple[NodeStep, ...]:
        return tuple(s for s in self.steps if s.action == "upgrade")

    @property
    def control_plane_work(self) -> bool:
        return any(s.control_plane for s in self.to_upgrade)

    def step(self, hostname: str) -> NodeStep:
        return next(s for s in self.steps if s.hostname == hostname)

    def to_rows(self) -> list[dict[str, str]]:
        """One row per node, for a table artifact."""
        return [{"node": s.hostname, "ip": s.ip, "role": s.role, "from": s.current, "to": s.target,
                 "action": s.action, "why": s.reason, "image": s.image,
                 "command": shlex.join(s.argv) if s.argv else "-"}
                for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s in d["steps"]:
            s["argv"] = list(s["argv"])
        d["steps"] = list(d["steps"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class _Member:
    hostname: str
    ip: str
    control_plane: bool
    installer: Callable[[str], str]
    schematic: dict[str, Any] | None = None
    image_url: str | None = None


def _members(cfg: TalConfig | ProxmoxCluster) -> tuple[str, str, list[_Member]]:
    """(cluster name, desired version, nodes in upgrade order) of either source of truth."""
    if isinstance(cfg, TalConfig):
        tal = cfg

        def installer(node: TalNode) -> Callable[[str], str]:
            return lambda version: tal.installer_for(node, version)

        members = [_Member(n.hostname, n.ip, n.control_plane, installer(n), tal.schematic_for(n), tal.image_url_for(n))
                   for n in tal.ordered_nodes()]
        return tal.cluster_name, tal.talos_version, members
    members = [_Member(vm.name, vm.ip, vm.role == "controlplane", cfg.installer, cfg.cluster.schematic,
                       cfg.cluster.talos_image_url) for vm in cfg.ordered_vms()]
    return cfg.cluster.name, cfg.cluster.talos_version, members


@dataclass(frozen=True)
class RunningImage:
    """What a node's `talosctl get extensions` shows: the Image Factory schematic it was installed from (the
    virtual extension `schematic`, whose version is the ID) and the other extensions it runs."""

    schematic: str | None  # None: no `schematic` entry (the stock installer, a custom build)
    extensions: tuple[str, ...] = ()

    def describe(self) -> str:
        exts = ", ".join(self.extensions) or "no extensions"
        return f"schematic {self.schematic[:12] if self.schematic else '(none)'}, {exts}"


def _desired_image(m: _Member, image: str, overridden: bool) -> tuple[str | None, frozenset[str] | None]:
    """(schematic ID, extension names) the image brings; None where it cannot be known from here."""
    if overridden:
        sid = factory_schematic_of(image)
        if sid is not None and m.schematic is not None and m.image_url is None and sid == schematic_id(m.schematic):
            return sid, frozenset(extension_names(m.schematic))
        if sid is None and image.rsplit(":", 1)[0] == STOCK_INSTALLER:
            return "", frozenset()
        return sid, None
    if m.image_url:
        return None, None  # a custom build: its contents are not known here
    if m.schematic is None:
        return "", frozenset()  # the stock installer: no schematic, no extensions
    return schematic_id(m.schematic), frozenset(extension_names(m.schematic))


def extension_names(schematic: dict[str, Any] | None) -> tuple[str, ...]:
    """The names a node reports for a schematic's official extensions (`siderolabs/i915` runs as `i915`)."""
    customization = (schematic or {}).get("customization") or {}
    official = ((customization.get("systemExtensions") or {}).get("officialExtensions")) or []
    return tuple(sorted(str(e).rsplit("/", 1)[-1] for e in official))


def _image_tag(image: str) -> str | None:
    """The tag of an image reference, None when it has none (or is pinned by digest)."""
    if "@" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def _path_problem(hostname: str, current: semver.Version, target: semver.Version,
                  allow_minor_skip: bool, allow_downgrade: bool) -> str | None:
    if target < current and not allow_downgrade:
        return (f"{hostname}: {vtag(target)} is a downgrade from {vtag(current)}; "
                f"pass allow_downgrade to do it on purpose (talosctl rollback boots the previous image)")
    low, high = (current, target) if target >= current else (target, current)
    skipped = high.major != low.major or high.minor - low.minor > 1
    if skipped and not allow_minor_skip:
        if high.major == low.major:
            via = " -> ".join(f"v{low.major}.{m}" for m in range(low.minor, high.minor + 1))
            hint = f"this flow upgrades one minor at a time ({via}), as the Talos upgrade guide advises"
        else:
            hint = "this flow upgrades one minor at a time; go through the last minor of each major"
        # Whether Talos's installer itself accepts the jump is its compatibility table's call (checked too).
        return (f"{hostname}: {vtag(current)} -> {vtag(target)} skips a minor; {hint}, or pass allow_minor_skip "
                f"when the target's installer accepts {vtag(current)}")
    return None


def plan_talos_upgrade(
    talconfig: TalConfig | ProxmoxCluster,
    observed: Mapping[str, str],
    target: str | None = None,
    nodes: Sequence[str] | None = None,
    allow_minor_skip: bool = False,
    allow_downgrade: bool = False,
    images: Mapping[str, str] | None = None,
    talosctl: str = "talosctl",
    timeout_s: int = DEFAULT_UPGRADE_TIMEOUT_S,
    *,
    kubernetes: Mapping[str, str] | None = None,
    running: Mapping[str, RunningImage] | None = None,
    allow_extension_removal: bool = False,
    options: UpgradeOptions = UpgradeOptions(),
) -> TalosPlan:
    """Per node, in upgrade order: the current version (``observed``: hostname -> tag) to the target.

    Refuses (PlanRefused, every reason at once) an unknown node, a node whose version was not
    observed, a skipped minor or a downgrade unless allowed, a host the target's installer would refuse
    (homelab.compat), a target that does not run the cluster's Kubernetes (``kubernetes``: node -> kubelet
    version), an image whose tag is not the target, and an image that would drop an extension a node runs
    (``running``: node -> RunningImage) unless allowed. A node at the target that runs another schematic
    than its image brings is upgraded to the same version with the new image.
    """
    cluster, desired, members = _members(talconfig)
    reasons: list[str] = []
    target_text = target if target is not None else desired
    try:
        target_v = parse_version(target_text)
    except VersionError as e:
        raise PlanRefused([f"target version: {e}"]) from None
    target_tag = vtag(target_v)
    known = [m.hostname for m in members]
    images = dict(images or {})
    running = dict(running or {})
    if nodes:
        unknown = [n for n in dict.fromkeys(nodes) if n not in known]
        if unknown:
            reasons.append(f"unknown node(s) {', '.join(unknown)}; the cluster {cluster} has {', '.join(known)}")
        wanted = set(nodes)
        members = [m for m in members if m.hostname in wanted]
    for host in images:
        if host not in known:
            reasons.append(f"image override for unknown node {host}; the cluster {cluster} has {', '.join(known)}")
    if timeout_s <= 0:
        reasons.append(f"upgrade timeout must be positive, got {timeout_s}s")

    steps: list[NodeStep] = []
    for m in members:
        seen = observed.get(m.hostname)
        if seen is None:
            reasons.append(f"{m.hostname}: no Talos version observed (is the node up and does "
                           f"`talosctl version --nodes {m.ip}` answer?)")
            continue
        try:
            current_v = parse_version(seen)
        except VersionError as e:
            reasons.append(f"{m.hostname}: observed Talos version: {e}")
            continue
        image = images.get(m.hostname) or m.installer(target_tag)
        if m.hostname in images and _image_tag(image) is None:
            image = f"{image}:{target_tag}"
        tag = _image_tag(image)
        if tag is not None and tag != target_tag:
            reasons.append(f"{m.hostname}: image {image} is tagged {tag} but the target is {target_tag}")
        want_sid, want_exts = _desired_image(m, image, m.hostname in images)
        now = running.get(m.hostname)
        reason = f"{vtag(current_v)} -> {target_tag}"
        if current_v == target_v:
            if now is None or want_sid is None or (now.schematic or "") == want_sid:
                why = "at the target" + ("" if now is None or want_sid is None else ", same schematic")
                steps.append(NodeStep(m.hostname, m.ip, m.control_plane, vtag(current_v), target_tag, "skip", image,
                                      (), why, want_sid or None))
                continue
            # Extensions added or removed in talconfig: the same version from an installer of the new schematic.
            reason = f"schematic {(now.schematic or 'none')[:12]} -> {want_sid[:12] or 'none'} at {target_tag}"
        else:
            problem = _path_problem(m.hostname, current_v, target_v, allow_minor_skip, allow_downgrade)
            if problem:
                reasons.append(problem)
                continue
            refusal = compat.upgrade_refusal(vtag(current_v), target_tag)
            if refusal:
                reasons.append(f"{m.hostname}: {refusal}")
                continue
        if now is not None and want_exts is not None and not allow_extension_removal:
            dropped = sorted(set(now.extensions) - want_exts - {"schematic"})
            if dropped:
                reasons.append(f"{m.hostname}: the installer image {image} carries no {', '.join(dropped)}, which "
                               f"{m.hostname} runs now, so the upgrade would remove "
                               f"{'it' if len(dropped) == 1 else 'them'}; add {'it' if len(dropped) == 1 else 'them'} "
                               f"to the node's schematic in talconfig.yaml, or pass allow_extension_removal to "
                               f"remove {'it' if len(dropped) == 1 else 'them'} on purpose")
                continue
        argv = tuple(talos_upgrade_argv(talosctl, m.ip, image, timeout_s, options=options))
        steps.append(NodeStep(m.hostname, m.ip, m.control_plane, vtag(current_v), target_tag, "upgrade", image, argv,
                              reason, want_sid or None))
    if kubernetes and any(s.action == "upgrade" for s in steps):
        by_version: dict[str, list[str]] = {}
        for n, v in sorted(kubernetes.items()):
            by_version.setdefault(v, []).append(n)
        for v, names in sorted(by_version.items()):
            try:
                refusal = compat.kubernetes_refusal(v, target_tag)
            except VersionError as e:
                reasons.append(f"{', '.join(names)}: kubelet version: {e}")
                continue
            if refusal:
                rng = compat.kubernetes_range(target_tag)
                runs = f" (it runs v{rng[0][0]}.{rng[0][1]}–v{rng[1][0]}.{rng[1][1]})" if rng else ""
                reasons.append(f"Talos {target_tag} does not run the cluster's Kubernetes: {refusal}{runs}, on "
                               f"{', '.join(names)}; upgrade Kubernetes first (kubernetes-upgrade), or pick a "
                               f"Talos that runs it")
    if reasons:
        raise PlanRefused(reasons)
    return TalosPlan(cluster, target_tag, int(timeout_s), tuple(steps))


# --- a failed or timed-out `talosctl upgrade` --------------------------------------------------


@dataclass(frozen=True)
class NodeSeen:
    """A node as seen through its Talos API (version, `get machinestatus` stage, boot ID, etcd) and, when the
    Kubernetes API answers, its Node (Ready, cordon)."""

    reachable: bool
    version: str | None = None
    stage: str | None = None
    boot_id: str | None = None
    ready: bool | None = None  # None: the Kubernetes API did not answer
    cordoned: bool | None = None
    etcd: str | None = None  # "running" | "stopped"; None for a worker or when not asked
    error: str = ""

    def describe(self) -> str:
        if not self.reachable:
            return f"its Talos API does not answer ({self.error or 'no reply'})"
        parts = [f"Talos {self.version or '?'}", f"stage {self.stage or '?'}", f"boot {(self.boot_id or '?')[:8]}"]
        if self.ready is None:
            parts.append("Node not readable (the Kubernetes API does not answer)")
        else:
            parts.append(("Ready" if self.ready else "NotReady") + (", cordoned" if self.cordoned else ""))
        if self.etcd:
            parts.append(f"etcd {self.etcd}")
        return ", ".join(parts)


class UpgradeEnd(StrEnum):
    """How a `talosctl upgrade` that failed or timed out really ended, judged from the node itself (talosctl's
    exit code alone cannot tell: siderolabs/talos #1768, #7423, #11830)."""

    REFUSED = "refused before anything changed"
    STUCK = "stuck mid-sequence"
    FELL_BACK = "booted the new image and fell back to the old one"
    FINISHED_LATE = "finished late at the target"
    NOT_BACK = "not back"


def judge_upgrade(before: NodeSeen, after: NodeSeen, target: str) -> UpgradeEnd:
    """Talos v1.11's upgrade sequence (internal/app/machined/pkg/runtime/v1alpha1/v1alpha1_sequencer.go Upgrade)
    cordons and drains, stops pods and the ephemeral services (etcd, kubelet), unmounts EPHEMERAL, runs the
    installer, then kexecs or reboots. The API refuses before any of it (image validation, the etcd checks:
    v1alpha1_server.go Upgrade); an installer failure is only logged and leaves the node up in that state, its
    machine stage "rebooting" (controllers/runtime/machine_status.go); a new image that does not boot makes the
    boot loader fall back, so the node returns with a new boot ID at the old version."""
    if not after.reachable:
        return UpgradeEnd.NOT_BACK
    rebooted = bool(before.boot_id and after.boot_id and before.boot_id != after.boot_id)
    if rebooted:
        return UpgradeEnd.FINISHED_LATE if after.version == target else UpgradeEnd.FELL_BACK
    if after.stage in (None, "running") and not after.cordoned and after.etcd != "stopped" and after.ready is not False:
        return UpgradeEnd.REFUSED
    return UpgradeEnd.STUCK


def upgrade_next_step(end: UpgradeEnd, node: str, ip: str, before: str, target: str, after: NodeSeen) -> str:
    """What the operator should do for each ending, as right for real Talos."""
    if end is UpgradeEnd.REFUSED:
        return (f"nothing changed on {node}; fix what talosctl reported (the installer image must exist in its "
                f"registry, every etcd member must be healthy) and run again")
    if end is UpgradeEnd.STUCK:
        return (f"Talos stopped the upgrade after it had cordoned {node} and stopped its pods, etcd and kubelet, and "
                f"nothing reboots it by itself: read the installer's error in `talosctl -n {ip} dmesg`, then "
                f"`{reboot_step(ip)}` boots the version it ran before ({before}); run again once it is Ready")
    if end is UpgradeEnd.FELL_BACK:
        return (f"{node} booted {target} and came back at {after.version or before}: its boot loader fell back to "
                f"the previous entry by itself, so `talosctl rollback` would boot the image that just failed; find "
                f"why {target} did not boot (`talosctl -n {ip} dmesg`, the console), fix it and run again")
    if end is UpgradeEnd.NOT_BACK:
        return (f"watch {node}'s console (`talosctl -n {ip} dmesg -f` once it answers): it may still be installing, "
                f"so do not reboot or roll it back yet; run again once it is back")
    return "none: the node finished the upgrade"


# --- Kubernetes plan --------------------------------------------------------------------------

# Kubernetes minors each Talos minor supports, inclusive: Talos's own table (homelab.compat, from
# pkg/machinery/compatibility), which the support matrix pages of each release show too.
TALOS_KUBERNETES_SUPPORT: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]] = {
    minor: (row.k8s_min[:2], row.k8s_max[:2]) for minor, row in compat.TALOS_COMPAT.items()
}


def supported_kubernetes(talos_version: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
    v = parse_version(talos_version)
    return TALOS_KUBERNETES_SUPPORT.get((v.major, v.minor))


@dataclass(frozen=True)
class K8sPlan:
    talos_version: str
    target: str
    current: dict[str, str]  # node -> kubelet version
    action: Action
    argv: tuple[str, ...]
    dry_run_argv: tuple[str, ...]

    @property
    def behind(self) -> list[str]:
        t = parse_version(self.target)
        return sorted(n for n, v in self.current.items() if parse_version(v) != t)

    def to_rows(self) -> list[dict[str, str]]:
        return [{"node": n, "from": v, "to": self.target,
                 "action": "skip" if parse_version(v) == parse_version(self.target) else "upgrade"}
                for n, v in sorted(self.current.items())]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"], d["dry_run_argv"] = list(self.argv), list(self.dry_run_argv)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def plan_kubernetes_upgrade(
    talos_version: str,
    current_kubelets: Mapping[str, str],
    target: str,
    talosctl: str = "talosctl",
    node: str | None = None,
) -> K8sPlan:
    """``talosctl upgrade-k8s --to target``: refused for a skipped minor, a downgrade, or a target
    the cluster's Talos version does not support. ``node`` is the control plane talosctl talks to."""
    reasons: list[str] = []
    try:
        target_v = parse_version(target)
    except VersionError as e:
        raise PlanRefused([f"target Kubernetes version: {e}"]) from None
    try:
        talos_v = parse_version(talos_version)
    except VersionError as e:
        raise PlanRefused([f"Talos version: {e}"]) from None
    if not current_kubelets:
        raise PlanRefused(["no kubelet versions observed; is the Kubernetes API reachable?"])
    current: dict[str, semver.Version] = {}
    for n, v in current_kubelets.items():
        try:
            current[n] = parse_version(v)
        except VersionError as e:
            reasons.append(f"{n}: kubelet version: {e}")
    if current:
        lowest, highest = min(current.values()), max(current.values())
        if target_v < highest:
            at = sorted(n for n, v in current.items() if v == highest)
            reasons.append(f"v{target_v} is a downgrade from v{highest} ({', '.join(at)}); "
                           f"Kubernetes does not support downgrades")
        elif target_v.major != lowest.major or target_v.minor - lowest.minor > 1:
            via = f"v{lowest.major}.{lowest.minor + 1}"
            at = sorted(n for n, v in current.items() if v == lowest)
            reasons.append(f"v{lowest} -> v{target_v} skips a Kubernetes minor ({', '.join(at)} at v{lowest}); "
                           f"upgrade to {via} first, one minor at a time")
    rng = TALOS_KUBERNETES_SUPPORT.get((talos_v.major, talos_v.minor))
    if rng is None:
        known = ", ".join(f"v{a}.{b}" for a, b in sorted(TALOS_KUBERNETES_SUPPORT))
        reasons.append(f"Talos v{talos_v.major}.{talos_v.minor} is not in the support table (known: {known})")
    else:
        (lo_maj, lo_min), (hi_maj, hi_min) = rng
        if not (lo_maj, lo_min) <= (target_v.major, target_v.minor) <= (hi_maj, hi_min):
            reasons.append(f"Talos v{talos_v.major}.{talos_v.minor} supports Kubernetes v{lo_maj}.{lo_min}"
                           f"–v{hi_maj}.{hi_min}, not v{target_v}; upgrade Talos first")
    if reasons:
        raise PlanRefused(reasons)
    to = str(target_v)
    action: Action = "skip" if all(v == target_v for v in current.values()) else "upgrade"
    return K8sPlan(vtag(talos_v), vtag(target_v), dict(current_kubelets), action,
                   tuple(upgrade_k8s_argv(talosctl, to, False, node)),
                   tuple(upgrade_k8s_argv(talosctl, to, True, node)))


# --- gates ------------------------------------------------------------------------------------


def nodes_gate(nodes: Sequence[NodeView], expected: Iterable[str] | None = None) -> Verdict:
    """Every node Ready and schedulable (and, when given, every expected node present)."""
    problems: list[str] = []
    names = {n.name for n in nodes}
    for name in expected or ():
        if name not in names:
            problems.append(f"{name} has no Node object")
    for n in nodes:
        if not n.ready:
            problems.append(f"{n.name} is NotReady{f' ({n.ready_reason})' if n.ready_reason else ''}")
        if n.unschedulable:
            problems.append(f"{n.name} is cordoned (kubectl uncordon {n.name} if nothing else holds it)")
    if not nodes and not problems:
        problems.append("no Node objects at all")
    if problems:
        return Verdict(False, "nodes not ready: " + "; ".join(problems))
    return Verdict(True, f"all {len(nodes)} nodes Ready and schedulable")


def etcd_gate(members: Sequence[EtcdMember], status_rows: Sequence[EtcdStatus], control_planes: int) -> Verdict:
    """Every member healthy: as many members as control planes, none a learner, every member answers
    ``etcd status`` with empty ERRORS."""
    problems: list[str] = []
    if len(members) != control_planes:
        names = ", ".join(m.hostname for m in members) or "none"
        problems.append(f"{len(members)} etcd members ({names}) but {control_planes} control planes")
    for m in members:
        if m.learner:
            problems.append(f"member {m.hostname} ({m.id}) is still a learner")
    answered = {r.member for r in status_rows}
    for m in members:
        if m.id not in answered:
            problems.append(f"member {m.hostname} ({m.id}) did not answer etcd status")
    for r in status_rows:
        if r.errors.strip():
            problems.append(f"member {r.member}{f' on {r.node}' if r.node else ''} reports: {r.errors.strip()}")
    leaders = {r.leader for r in status_rows if r.leader}
    if len(leaders) > 1:
        problems.append(f"members disagree on the leader ({', '.join(sorted(leaders))})")
    if problems:
        return Verdict(False, "etcd not healthy: " + "; ".join(problems))
    return Verdict(True, f"etcd healthy: {len(members)} members, no errors")


REQUESTED_AT = "reconcile.fluxcd.io/requestedAt"


def is_rook_ceph(obj: Mapping[str, Any]) -> bool:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    return ("rook-ceph" in str(meta.get("name", "")) or meta.get("namespace") == "rook-ceph"
            or spec.get("targetNamespace") == "rook-ceph" or "rook-ceph" in str(spec.get("path", "")))


def _reconciling(obj: Mapping[str, Any]) -> str | None:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    requested = (meta.get("annotations") or {}).get(REQUESTED_AT)
    if requested and status.get("lastHandledReconcileAt") != requested:
        return f"reconcile requested at {requested} not handled yet"
    for c in status.get("conditions") or []:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return f"Reconciling: {c.get('message') or c.get('reason') or 'in progress'}"
    gen, seen = meta.get("generation"), status.get("observedGeneration")
    if gen is not None and seen is not None and seen != gen:
        return f"generation {gen} not observed yet (observedGeneration {seen})"
    return None


def flux_gate(kustomizations: Sequence[Mapping[str, Any]],
              concerns: Callable[[Mapping[str, Any]], bool] = is_rook_ceph) -> Verdict:
    """No Kustomization of rook-ceph reconciling right now: a change to Ceph mid-upgrade is two
    disruptions at once."""
    busy = []
    for k in kustomizations:
        if not concerns(k):
            continue
        why = _reconciling(k)
        if why:
            meta = k.get("metadata") or {}
            busy.append(f"{meta.get('namespace', 'flux-system')}/{meta.get('name')}: {why}")
    if busy:
        return Verdict(False, "Flux is reconciling rook-ceph: " + "; ".join(busy)
                       + "; wait for it to finish (flux get ks) and run again")
    return Verdict(True, "no rook-ceph Kustomization reconciling")


def self_node_gate(node_name_env: str | None, target_node: str) -> Verdict:
    """The flow must not reboot the machine it runs on: it would kill its own run mid-upgrade."""
    if node_name_env and node_name_env == target_node:
        return Verdict(False, f"this run executes on {target_node} (NODE_NAME); upgrading it would reboot "
                              f"the run itself mid-upgrade; run the flow from a worker on another node")
    return Verdict(True, f"the run does not execute on {target_node}")


def failure_message(node: str, gate: str, last_seen: str, next_step: str) -> str:
    """The one shape every failed step reports in: which node, which gate, what was seen, what to do."""
    return f"{node}: {gate} failed. Last seen: {last_seen}. Next step: {next_step}"
