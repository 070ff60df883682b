"""Block types: one per external system (endpoint + credentials) and `Homelab`, the bundle a flow takes.

Register them with `prefect block register -m blocks` (or `homelab setup`). Secrets are SecretStr:
Prefect stores them encrypted and shows them as ********; flows read them only to hand them to the
client that needs them, never into a log, artifact, parameter or exception.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC
from pathlib import Path
from typing import Any, Self, cast

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import ConfigDict, Field, SecretStr, field_validator

from homelab.monitoring import (
    DEFAULT_ALLOWED,
    DEFAULT_CEPH_SILENCED,
    DEFAULT_NODE_LABELS,
    HealthQuery,
    parse_matcher_sets,
)

DEFAULT_CEPH_TOOLS = ["kubectl", "-n", "rook-ceph", "exec", "deploy/rook-ceph-tools", "--", "ceph"]


class _Block(Block, ABC):
    """A block of this project: its fields typed with our own blocks load without Prefect's collection scan."""

    @classmethod
    def get_block_class_from_key(cls: type[Self], key: str) -> type[Self]:
        # Prefect imports every installed collection (prefect.collections entry points: prefect-kubernetes
        # and prefect-redis, ~1.2 s) before it looks a slug up (prefect/blocks/core.py
        # get_block_class_from_key), once per process: each flow run's process paid it to load the
        # Homelab block. A nested block's document names its own slug, which is this class.
        if key == cls.get_block_type_slug():
            return cls
        return super().get_block_class_from_key(key)


class Kubernetes(_Block):
    """Access to one or more Kubernetes API servers through a kubeconfig, or from inside a pod."""

    _block_type_name = "Homelab Kubernetes"
    _block_type_slug = "homelab-kubernetes"
    _description = "A kubeconfig (text or path) and its contexts, or in-cluster access."

    kubeconfig: SecretStr | None = Field(
        default=None, description="The kubeconfig's YAML text. Stored encrypted. Leave empty to use kubeconfig_path.")
    kubeconfig_path: str | None = Field(
        default=None, description="Path of a kubeconfig file on the worker, used when kubeconfig is empty.")
    context: str | None = Field(
        default=None, description="The context to use when the flow names no cluster-specific one.")
    in_cluster: bool = Field(
        default=False, description="Use the pod's ServiceAccount instead of a kubeconfig (when deployed in the cluster).")

    def kubeconfig_file(self) -> Path | None:
        """A file holding the kubeconfig, readable only by this user (the client libraries want a path)."""
        if self.kubeconfig is not None:
            fd, name = tempfile.mkstemp(prefix="homelab-kubeconfig-", suffix=".yaml")
            with os.fdopen(fd, "w") as f:
                f.write(self.kubeconfig.get_secret_value())
            return Path(name)
        return Path(self.kubeconfig_path).expanduser() if self.kubeconfig_path else None


class Talos(_Block):
    """The Talos API through talosctl."""

    _block_type_name = "Homelab Talos"
    _block_type_slug = "homelab-talos"
    _description = "The talosctl executable and the talosconfig that authenticates it."

    talosctl_path: str = Field(default="talosctl", description="The talosctl executable (a name on PATH or a full path).")
    talosconfig: SecretStr | None = Field(
        default=None, description="The talosconfig's YAML text (client certificate and key). Stored encrypted.")
    talosconfig_path: str | None = Field(
        default=None, description="Path of a talosconfig on the worker, used when talosconfig is empty.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for talosctl.")


class Ceph(_Block):
    """The Ceph CLI: local, or inside Rook's toolbox."""

    _block_type_name = "Homelab Ceph"
    _block_type_slug = "homelab-ceph"
    _description = "How to run the ceph command: a local `ceph`, or `kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph`."

    command: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CEPH_TOOLS),
        description="The argv prefix that runs ceph, e.g. [\"ceph\"] or "
                    "[\"kubectl\", \"-n\", \"rook-ceph\", \"exec\", \"deploy/rook-ceph-tools\", \"--\", \"ceph\"].")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables (e.g. CEPH_CONF).")
    timeout_seconds: float = Field(default=30, description="Deadline of one ceph call; the CLI hangs without a monitor.")


class Proxmox(_Block):
    """A Proxmox VE API endpoint and an API token."""

    _block_type_name = "Homelab Proxmox"
    _block_type_slug = "homelab-proxmox"
    _description = "Proxmox VE API host and an API token with only the privileges the provision flow uses."

    host: str = Field(description="API host name or address (no scheme), e.g. pve.lan.")
    port: int = Field(default=8006, description="API port.")
    user: str = Field(default="root@pam", description="The token's user, e.g. homelab@pve.")
    token_name: str = Field(description="The API token's ID (the part after '!').")
    token_value: SecretStr = Field(description="The API token's secret. Stored encrypted.")
    verify_ssl: bool = Field(default=True, description="Verify the API's TLS certificate.")


class GitSource(_Block):
    """The git repository that holds the GitOps tree."""

    _block_type_name = "Homelab Git"
    _block_type_slug = "homelab-git"
    _description = "The repository holding k8s/ and the branch Flux follows."

    url: str = Field(description="A local path or clone URL of the repository holding k8s/.")
    branch: str = Field(default="main", description="The branch Flux follows; pushes to others are ignored.")
    tree_path: str = Field(default="k8s", description="The GitOps tree's folder inside the repository.")
    repositories: list[str] = Field(
        default_factory=list,
        description="The repositories whose pushes act on this homelab: full names as GitHub, Gitea and Forgejo "
                    "send them (owner/name) or clone URLs. Empty: the one `url` names when it is a clone URL. A "
                    "push of any other repository is ignored by the webhook receiver and refused by git-push.")

    @field_validator("repositories")
    @classmethod
    def _repository_entries(cls, value: list[str]) -> list[str]:
        from homelab.git_push import allowed_repositories

        allowed_repositories(value)  # RepositoryRefused is a ValueError: pydantic names the field
        return value

    def allowed_repositories(self) -> frozenset[str]:
        """The full names (lowercase) of `repositories`, or of `url` when that list is empty."""
        from homelab.git_push import allowed_repositories

        if self.repositories:
            return allowed_repositories(self.repositories)
        if "://" in self.url and not self.url.startswith("file://") or "@" in self.url.split("/")[0]:
            try:
                return allowed_repositories([self.url])
            except ValueError:  # a URL that names no owner/name: nothing is allowed until the list is set
                return frozenset()
        return frozenset()


class Webhook(_Block):
    """The shared secret of the git webhook."""

    _block_type_name = "Homelab Webhook"
    _block_type_slug = "homelab-webhook"
    _description = "The HMAC secret that git push webhooks are signed with."

    secret: SecretStr = Field(description="The webhook's shared secret. Stored encrypted.")


class Monitoring(_Block):
    """Prometheus and Alertmanager of one cluster (kube-prometheus-stack), and the gates the upgrades take from them."""

    _block_type_name = "Homelab Monitoring"
    _block_type_slug = "homelab-monitoring"
    _description = ("Prometheus and Alertmanager URLs and credentials; the alerts that may fire during an upgrade, "
                    "the labels a node's silence matches, and the health queries every node must pass.")

    prometheus_url: str = Field(description="Prometheus base URL, e.g. http://prometheus-operated.monitoring:9090.")
    alertmanager_url: str = Field(description="Alertmanager base URL, e.g. http://alertmanager-operated.monitoring:9093.")
    bearer_token: SecretStr | None = Field(
        default=None, description="Bearer token sent to both (e.g. behind an OAuth proxy). Stored encrypted.")
    basic_auth_user: str | None = Field(default=None, description="Basic auth user name, when they sit behind one.")
    basic_auth_password: SecretStr | None = Field(default=None, description="Basic auth password. Stored encrypted.")
    verify_tls: bool = Field(default=True, description="Verify the TLS certificates of https URLs.")
    timeout_seconds: float = Field(default=10, gt=0, description="Deadline of one request.")
    allowed_alerts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED),
        description='Alerts that may fire while an upgrade goes on, one matcher set each, e.g. '
                    'alertname=~"Watchdog|InfoInhibitor" or {alertname="CPUThrottlingHigh", namespace="media"}.')
    node_labels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NODE_LABELS),
        description="Labels by which alerts name a node; a node's silence matches its name or address in each.")
    ceph_silenced_alerts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CEPH_SILENCED),
        description="Ceph alerts silenced while a node of a Ceph cluster is down (the noout warning).")
    health_queries: list[HealthQuery] = Field(
        default_factory=list, description="PromQL gates after every node, each with a name and a deadline.")
    alert_gate_seconds: float = Field(
        default=900, gt=0, description="How long the alert gate waits for firing alerts to resolve before a node.")
    silence_settle_seconds: float = Field(
        default=180, ge=0,
        description="Once a node has passed its gates, how long its silences stay on while the alerts they hold "
                    "resolve (Prometheus sees the node well again a scrape and an evaluation late); then they are "
                    "expired whatever still fires.")
    stale_silence_seconds: float = Field(
        default=86400, gt=0, description="The drift check lists silences of these flows in force for longer than this.")

    @field_validator("allowed_alerts")
    @classmethod
    def _matcher_sets(cls, value: list[str]) -> list[str]:
        parse_matcher_sets(value)  # MatcherError is a ValueError: pydantic names the field
        return value


class Homelab(_Block):
    """Everything a flow needs to reach one homelab."""

    _block_type_name = "Homelab"
    _block_type_slug = "homelab"
    # A refused field must not echo what was entered: hook_env holds credentials.
    model_config = ConfigDict(hide_input_in_errors=True)
    _description = "The named bundle a flow takes: Kubernetes, Talos, Ceph, Proxmox and git access, plus the GitOps tree."

    kubernetes: Kubernetes = Field(description="Kubernetes access; its kubeconfig holds a context per cluster.")
    talos: Talos = Field(description="talosctl and the talosconfig; one context per cluster.")
    ceph: Ceph | None = Field(default=None, description="The Ceph CLI of the cluster running Rook Ceph.")
    proxmox: Proxmox | None = Field(default=None, description="The Proxmox API that hosts the VM cluster.")
    git: GitSource = Field(description="The repository holding the GitOps tree.")
    webhook: Webhook | None = Field(default=None, description="The webhook secret, for the receiver.")
    # One Monitoring block, not a dict of them: Prefect hides the secrets of a nested block only when it is
    # a field of its own (in a dict they would show in clear in the UI).
    monitoring: Monitoring | None = Field(
        default=None, description="Prometheus and Alertmanager of the clusters in monitoring_clusters; without it "
                                  "the upgrades skip the monitoring gates and their plan says so.")
    monitoring_clusters: list[str] = Field(
        default_factory=lambda: ["m720q"], description="Clusters that the Monitoring block watches.")
    sops_age_key: SecretStr | None = Field(
        default=None, description="The age identity (AGE-SECRET-KEY-1...) that decrypts the tree's *.sops.yaml, "
                                  "e.g. clusters/<cluster>/talos/talsecret.sops.yaml. Stored encrypted.")
    tree_path: str | None = Field(
        default=None, description="A local checkout of the GitOps tree (k8s/); default: the git block's path + tree_path.")
    cluster: str = Field(default="m720q", description="The cluster a flow acts on when it names none.")
    ceph_clusters: list[str] = Field(default_factory=lambda: ["m720q"], description="Clusters that run Rook Ceph.")
    kube_contexts: dict[str, str] = Field(
        default_factory=dict, description="Kubeconfig context per cluster; default admin@<cluster>.")
    talos_contexts: dict[str, str] = Field(
        default_factory=dict, description="talosconfig context per cluster; default the cluster's name.")
    pre_node_hook: str | None = Field(
        default=None, description="Shell command (bash -c) run before a node is disrupted; HOMELAB_NODE and "
                                  "HOMELAB_NODE_IP are set. Its whole process group is killed at the hook deadline.")
    post_node_hook: str | None = Field(
        default=None, description="Shell command (bash -c) run after a node is back; HOMELAB_NODE and "
                                  "HOMELAB_NODE_IP are set. Its whole process group is killed at the hook deadline.")
    hook_env: SecretDict = Field(
        default_factory=lambda: SecretDict({}),
        description="Extra environment variables for the node hooks, name -> value (e.g. a token a hook needs). "
                    "Stored encrypted and shown as ********. A hook sees only these, PATH, HOME, HOMELAB_NODE and "
                    "HOMELAB_NODE_IP: never the worker's environment.")

    @field_validator("hook_env")
    @classmethod
    def _hook_env_names_and_text(cls, value: SecretDict) -> SecretDict:
        # Checked when the block is saved or loaded, so a bad entry stops the run before any node is touched.
        for name, text in value.get_secret_value().items():
            if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
                raise ValueError(f"hook_env: {name!r} is not an environment variable name")
            if name in ("HOMELAB_NODE", "HOMELAB_NODE_IP"):
                raise ValueError(f"hook_env: {name} is set per node by the flow; remove it")
            if not isinstance(text, str):
                raise ValueError(f"hook_env: the value of {name} must be text")
        return value

    def kube_context(self, cluster: str) -> str:
        return self.kube_contexts.get(cluster, f"admin@{cluster}")

    def talos_context(self, cluster: str) -> str:
        return self.talos_contexts.get(cluster, cluster)

    def gitops_tree(self) -> Path:
        if self.tree_path:
            return Path(self.tree_path).expanduser()
        return Path(self.git.url).expanduser() / self.git.tree_path

    def runs_ceph(self, cluster: str) -> bool:
        return self.ceph is not None and cluster in self.ceph_clusters

    def monitoring_for(self, cluster: str) -> Monitoring | None:
        """The Monitoring block that watches ``cluster``, or None (its gates are then skipped)."""
        return self.monitoring if self.monitoring is not None and cluster in self.monitoring_clusters else None

    def hook_env_values(self) -> dict[str, str]:
        """hook_env in clear, for the hook's environment only."""
        return dict(self.hook_env.get_secret_value())


def load_homelab(name: str) -> Homelab:
    """The saved Homelab block `name` (Block.load is typed for both sync and async callers)."""
    return cast(Homelab, Homelab.load(name))


ALL_BLOCKS: list[type[Block]] = [Kubernetes, Talos, Ceph, Proxmox, GitSource, Webhook, Monitoring, Homelab]


def describe() -> dict[str, Any]:
    return {b.get_block_type_slug(): b.get_description() for b in ALL_BLOCKS}
