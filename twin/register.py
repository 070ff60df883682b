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
    monitoring = None
    if getattr(twin, "monitoring", None) is not None:
        from blocks import Monitoring

        monitoring = Monitoring(prometheus_url=twin.monitoring.prometheus_url,
                                alertmanager_url=twin.monitoring.alertmanager_url, verify_tls=False,
                                # The twin's time runs fast (1 s scrapes and evaluations, 0 s `for:`).
                                alert_gate_seconds=5, silence_settle_seconds=15)
    return Homelab(
        kubernetes=Kubernetes(kubeconfig=SecretStr(twin.kubeconfig_text(None) or "")),
        talos=Talos(talosctl_path=str(twin.bin_dir / "talosctl"), talosconfig=SecretStr(twin.talosconfig_text())),
        ceph=ceph,
        proxmox=proxmox,
        # The twin's repository is a local path; its pushes name it as the tree's GitRepository does
        # (ssh://git@github.com/example/homelab in clusters/*/flux-system/gotk-sync.yaml).
        git=GitSource(url=str(twin.git_dir), branch="main", tree_path="k8s", repositories=["example/homelab"]),
        tree_path=str(twin.git.tree),
        cluster=ceph_clusters[0] if ceph_clusters else sorted(twin.world.clusters)[0],
        ceph_clusters=ceph_clusters,
        sops_age_key=SecretStr(twin.sops_age_key) if getattr(twin, "sops_age_key", None) else None,
        monitoring=monitoring,
        monitoring_clusters=[twin.monitoring_cluster] if monitoring is not None else [],
    )
