"""What the gates look at, as plain data, and what they answer.

The modules that talk to Kubernetes and Talos build these views; the gate functions in
homelab.upgrade judge them. Keeping the views here lets the core stay free of any client library.
Verdict is the one answer type of every gate (defined in homelab.ceph_gate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from homelab.ceph_gate import Verdict

__all__ = ["EtcdMember", "EtcdStatus", "NodeView", "Verdict", "talos_version_of_os_image"]

_OS_IMAGE_RE = re.compile(r"^Talos \((v\d+\.\d+\.\d+[^)]*)\)$")


def talos_version_of_os_image(os_image: str | None) -> str | None:
    """``Talos (v1.11.5)`` -> ``v1.11.5``; None for anything else (another OS, or not reported yet)."""
    if not os_image:
        return None
    m = _OS_IMAGE_RE.match(os_image.strip())
    return m.group(1) if m else None


@dataclass(frozen=True)
class NodeView:
    """A Kubernetes Node as the upgrade sees it."""

    name: str
    ready: bool
    unschedulable: bool
    os_image: str
    talos_version: str | None
    kubelet_version: str
    resource_version: str
    ready_reason: str = ""
    boot_id: str = ""  # status.nodeInfo.bootID: the kernel's boot ID, as the kubelet last posted it
    talos_cordoned: bool = False  # annotation talos.dev/cordoned: the cordon is Talos's own (an upgrade's)

    def describe(self) -> str:
        parts = ["Ready" if self.ready else f"NotReady{f' ({self.ready_reason})' if self.ready_reason else ''}"]
        if self.unschedulable:
            parts.append("cordoned")
        parts.append(self.os_image or "osImage not reported")
        parts.append(f"kubelet {self.kubelet_version or '?'}")
        return ", ".join(parts)


@dataclass(frozen=True)
class EtcdMember:
    """One row of ``talosctl etcd members``."""

    id: str
    hostname: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool
    node: str | None = None


@dataclass(frozen=True)
class EtcdStatus:
    """One row of ``talosctl etcd status`` (PROTOCOL and STORAGE only from newer talosctl)."""

    node: str | None
    member: str
    db_size: str
    in_use: str
    leader: str
    raft_index: int | None
    raft_term: int | None
    raft_applied_index: int | None
    learner: bool
    errors: str
    protocol: str | None = None
    storage: str | None = None
