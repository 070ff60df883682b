"""A `Homelab` block that points at a running twin (the caller saves it)."""

from __future__ import annotations

from typing import Any


def homelab_block(twin: Any) -> Any:
    from pydantic import SecretStr

    from blocks import Ceph, GitSource, Homelab, Kubernetes, Proxmox, Talos

    ceph = Ceph(command=list(twin.ceph.command), env=dict(twin.ceph.env()), timeout_seconds=30) if twin.ceph else None
    proxmox = None
    if twin.proxmox is not None:
        proxmox = Proxmox(host=twin.proxmox.host, port=twin.proxmox.port, user=twin.proxmox.user,
                          token_name=twin.proxmox.token_name, token_value=SecretStr(twin.proxmox.token_value),
                          verify_ssl=False)
    ceph_clusters = [name for name, c in twin.world.clusters.items() if c.ceph]
    return Homelab(
        kubernetes=Kubernetes(kubeconfig=SecretStr(twin.kubeconfig_text(None) or "")),
        talos=Talos(talosctl_path=str(twin.bin_dir / "talosctl"), talosconfig=SecretStr(twin.talosconfig_text())),
        ceph=ceph,
        proxmox=proxmox,
        git=GitSource(url=str(twin.git_dir), branch="main", tree_path="k8s"),
        tree_path=str(twin.git.tree),
        cluster=ceph_clusters[0] if ceph_clusters else sorted(twin.world.clusters)[0],
        ceph_clusters=ceph_clusters,
    )
