"""From a Homelab block and a cluster name to the clients of that cluster: Kubernetes, Talos, Ceph,
and the GitOps tree.

Secret texts (the kubeconfig, the talosconfig) are written to files only this user can read, for
exactly as long as the clients are open, then deleted: the client libraries and talosctl want paths.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blocks import Homelab
from tasks.ceph import CephCli
from tasks.kube import Kube
from tasks.talos import Talosctl


@dataclass
class Clients:
    """Everything a flow needs to act on one cluster."""

    cluster: str
    kube: Kube
    talos: Talosctl
    ceph: CephCli | None
    tree: Path
    kubeconfig: Path | None = None
    kube_context: str | None = None
    in_cluster: bool = False
    _extra: list[Kube] = field(default_factory=list)

    def new_kube(self) -> Kube:
        """A second Kubernetes client (for a watcher on another thread); closed with the others."""
        kube = Kube.in_cluster() if self.in_cluster else Kube.from_kubeconfig(self.kubeconfig or "", self.kube_context)
        self._extra.append(kube)
        return kube

    def close(self) -> None:
        for k in [self.kube, *self._extra]:
            with contextlib.suppress(Exception):
                k.close()


def _private_file(text: str, prefix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".yaml")  # mkstemp creates it 0600
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)


@contextlib.contextmanager
def connect(homelab: Homelab, cluster: str) -> Iterator[Clients]:
    """The clients of ``cluster``; secret temp files are removed when the block exits."""
    temps: list[Path] = []
    clients: Clients | None = None
    try:
        k8s = homelab.kubernetes
        context = k8s.context if cluster == "" else homelab.kube_context(cluster)
        kubeconfig: Path | None = None
        if k8s.in_cluster:
            kube = Kube.in_cluster()
        else:
            if k8s.kubeconfig is not None:
                kubeconfig = _private_file(k8s.kubeconfig.get_secret_value(), "homelab-kubeconfig-")
                temps.append(kubeconfig)
            elif k8s.kubeconfig_path:
                kubeconfig = Path(k8s.kubeconfig_path).expanduser()
            else:
                kubeconfig = Path(os.environ.get("KUBECONFIG", "~/.kube/config")).expanduser()
            kube = Kube.from_kubeconfig(kubeconfig, context)
        t = homelab.talos
        talosconfig: Path | None = None
        if t.talosconfig is not None:
            talosconfig = _private_file(t.talosconfig.get_secret_value(), "homelab-talosconfig-")
            temps.append(talosconfig)
        elif t.talosconfig_path:
            talosconfig = Path(t.talosconfig_path).expanduser()
        talos = Talosctl(t.talosctl_path, talosconfig, homelab.talos_context(cluster), env=t.env)
        ceph = None
        if homelab.runs_ceph(cluster) and homelab.ceph is not None:
            ceph = CephCli(list(homelab.ceph.command), homelab.ceph.env, timeout_s=homelab.ceph.timeout_seconds)
        clients = Clients(cluster, kube, talos, ceph, homelab.gitops_tree(), kubeconfig, context, k8s.in_cluster)
        yield clients
    finally:
        if clients is not None:
            clients.close()
        for p in temps:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
