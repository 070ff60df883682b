"""The blocks are the UI form of a homelab: every field explains itself, every secret is hidden."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

import blocks


@pytest.mark.parametrize("block", blocks.ALL_BLOCKS, ids=lambda b: b.__name__)
def test_every_block_field_has_a_description(block: type) -> None:
    missing = [name for name, f in block.model_fields.items() if not f.description]
    assert missing == []
    assert block.get_description()


def test_secret_fields_are_secret_strings() -> None:
    assert blocks.Talos.model_fields["talosconfig"].annotation == SecretStr | None
    assert blocks.Proxmox.model_fields["token_value"].annotation is SecretStr
    assert blocks.Webhook.model_fields["secret"].annotation is SecretStr
    assert blocks.Kubernetes.model_fields["kubeconfig"].annotation == SecretStr | None


def test_secret_values_never_show_in_repr() -> None:
    p = blocks.Proxmox(host="pve.lan", token_name="homelab", token_value=SecretStr("s3cr3t-value"))
    assert "s3cr3t-value" not in repr(p) and "s3cr3t-value" not in str(p.model_dump())


def test_homelab_defaults_per_cluster() -> None:
    h = blocks.Homelab(kubernetes=blocks.Kubernetes(), talos=blocks.Talos(), git=blocks.GitSource(url="/srv/homelab"),
                       ceph=blocks.Ceph(), kube_contexts={"homelab": "ctx"})
    assert h.kube_context("m720q") == "admin@m720q" and h.kube_context("homelab") == "ctx"
    assert h.talos_context("homelab") == "homelab"
    assert str(h.gitops_tree()) == "/srv/homelab/k8s"
    assert h.runs_ceph("m720q") and not h.runs_ceph("homelab")
