"""Models of the GitOps tree: talhelper's talconfig.yaml, the Proxmox cluster.yaml, the Flux graph.

Every loader reads one file and raises ConfigError with one Problem per defect, never a traceback.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from homelab import safeyaml
from homelab.problems import ConfigError, Problem, from_validation_error
from homelab.versions import ImageFactory, VersionError, image_factory, installer_image, parse_version

# --- YAML -------------------------------------------------------------------------------------


def read_yaml_documents(path: Path, shown: str) -> list[Any]:
    """Every document of a YAML file (empty documents dropped); ConfigError when unreadable, too large,
    with a duplicate key or too much alias expansion (homelab.safeyaml, the loader of every tree file)."""
    try:
        return safeyaml.read_all(path)
    except safeyaml.YamlRefused as e:
        raise ConfigError([Problem(shown, e.field, e.message)]) from None


def read_yaml_mapping(path: Path, shown: str) -> dict[str, Any]:
    docs = read_yaml_documents(path, shown)
    if not docs:
        raise ConfigError([Problem(shown, "(document)", "the file is empty; expected a YAML mapping")])
    if len(docs) > 1:
        raise ConfigError([Problem(shown, "(document)", f"expected one YAML document, found {len(docs)}")])
    if not isinstance(docs[0], dict):
        raise ConfigError([Problem(shown, "(document)", f"expected a YAML mapping, found {type(docs[0]).__name__}")])
    return docs[0]


def _version_field(v: object) -> str:
    try:
        parse_version(v)
    except VersionError as e:
        raise ValueError(str(e)) from None
    # semver allows only [0-9A-Za-z.-] after the numbers, so the stripped text is safe in argv and
    # in a command shown to a person.
    return str(v).strip()


def _ip(v: str) -> str:
    """A plain IPv4 or IPv6 address. Python accepts IPv6 scope ids (`fe80::1%eth0`) whose text after
    `%` is anything at all; an address here reaches talosctl's argv and the commands shown to people,
    so a scope id is refused."""
    text = v.strip()
    if "%" in text:
        raise ValueError(f"{v!r} has a scope id (after '%'): give the address without it")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None
    return text


# RFC 1123 labels: what Kubernetes accepts as a node name part and Talos as a hostname. They cannot
# start with '-', so none can be read as an option when it reaches an argv.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def dns_label(v: str, what: str) -> str:
    if not _DNS_LABEL.fullmatch(v):
        raise ValueError(f"{v!r} is not a valid {what}: a DNS label of at most 63 lowercase letters, digits "
                         "and '-', starting and ending with a letter or digit")
    return v


def dns_name(v: str, what: str) -> str:
    """One or more DNS labels joined by '.', as Kubernetes node names and Talos hostnames may be."""
    if len(v) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in v.split(".")):
        raise ValueError(f"{v!r} is not a valid {what}: DNS labels (lowercase letters, digits and '-', each "
                         "starting and ending with a letter or digit) joined by '.'")
    return v


_ENDPOINT = re.compile(r"https://(?P<host>\[[^\]]*\]|[^/\[\]:]+)(?::(?P<port>\d{1,5}))?/?")


def api_endpoint(v: str, example: str) -> str:
    """`https://host[:port]` whose host is a DNS name or an IP address (no scope id): it reaches
    talosctl's argv as a positional argument and the commands shown to people."""
    m = _ENDPOINT.fullmatch(v)
    host = m.group("host") if m else ""
    try:
        if host.startswith("["):
            _ip(host[1:-1])
            if ":" not in host:
                raise ValueError
        elif re.fullmatch(r"[0-9.]+", host):
            _ip(host)
        else:
            dns_name(host.lower(), "host")
        if m and m.group("port") and not 0 < int(m.group("port")) < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"{v!r} is not an API endpoint like {example}") from None
    return v


# An image repository as OCI references write it (registry[:port]/path), without tag or digest: the
# tag is the Talos version. Nothing else may reach `--image` in argv.
_IMAGE_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+")


def image_repository(v: str | None) -> str | None:
    if v is not None and not _IMAGE_REPO.fullmatch(v):
        raise ValueError(f"{v!r} is not an image repository like factory.talos.dev/installer/<schematic> "
                         "(no tag: the Talos version is appended)")
    return v


# --- talconfig.yaml (talhelper's schema) ------------------------------------------------------


class _Loose(BaseModel):
    """talhelper has many fields this project never reads; they are accepted, not checked."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TalNode(_Loose):
    hostname: str = Field(min_length=1)
    ip_address: str = Field(alias="ipAddress")
    control_plane: bool = Field(False, alias="controlPlane")
    install_disk: str | None = Field(None, alias="installDisk")
    install_disk_selector: dict[str, Any] | None = Field(None, alias="installDiskSelector")
    schematic: dict[str, Any] | None = None
    talos_image_url: str | None = Field(None, alias="talosImageURL")
    machine_spec: dict[str, Any] | None = Field(None, alias="machineSpec")
    # Known talhelper node fields, kept as given.
    domain: Any = None
    nameservers: Any = None
    network_interfaces: Any = Field(None, alias="networkInterfaces")
    patches: Any = None
    config_patches: Any = Field(None, alias="configPatches")
    inline_patch: Any = Field(None, alias="inlinePatch")
    node_labels: Any = Field(None, alias="nodeLabels")
    node_annotations: Any = Field(None, alias="nodeAnnotations")
    node_taints: Any = Field(None, alias="nodeTaints")
    kernel_modules: Any = Field(None, alias="kernelModules")
    cert_sans: Any = Field(None, alias="certSANs")
    volumes: Any = None
    user_volumes: Any = Field(None, alias="userVolumes")
    extension_services: Any = Field(None, alias="extensionServices")
    disks: Any = None
    ignore_host_dns: Any = Field(None, alias="ignoreHostDNS")
    ingress_firewall: Any = Field(None, alias="ingressFirewall")
    machine_disks: Any = Field(None, alias="machineDisks")
    machine_files: Any = Field(None, alias="machineFiles")
    override_machine_config: Any = Field(None, alias="overrideMachineConfig")
    no_schematic_validate: Any = Field(None, alias="noSchematicValidate")
    disable_search_domain: Any = Field(None, alias="disableSearchDomain")
    time_servers: Any = Field(None, alias="timeServers")
    kernel_args: Any = Field(None, alias="kernelArgs")
    sysctls: Any = None
    sysfs: Any = None
    encryption: Any = Field(None, alias="nodeEncryption")
    disk_encryption: Any = Field(None, alias="diskEncryption")
    ignore: Any = None

    @field_validator("ip_address")
    @classmethod
    def _ips(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",")]
        if not parts or not parts[0]:
            raise ValueError("node needs an IP address (ipAddress: 10.42.0.101)")
        for p in parts:
            _ip(p)
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        return dns_name(v, "hostname")

    _image = field_validator("talos_image_url")(lambda cls, v: image_repository(v))

    @model_validator(mode="after")
    def _disk(self) -> TalNode:
        if self.install_disk is None and self.install_disk_selector is None:
            raise ValueError("node needs installDisk or installDiskSelector")
        return self

    @property
    def ips(self) -> list[str]:
        return [p.strip() for p in self.ip_address.split(",")]

    @property
    def ip(self) -> str:
        return self.ips[0]

    @property
    def secureboot(self) -> bool:
        return bool((self.machine_spec or {}).get("secureboot"))


class _RoleSection(_Loose):
    schematic: dict[str, Any] | None = None
    talos_image_url: str | None = Field(None, alias="talosImageURL")
    patches: Any = None
    config_patches: Any = Field(None, alias="configPatches")
    inline_patch: Any = Field(None, alias="inlinePatch")
    node_labels: Any = Field(None, alias="nodeLabels")
    node_annotations: Any = Field(None, alias="nodeAnnotations")
    node_taints: Any = Field(None, alias="nodeTaints")
    extension_services: Any = Field(None, alias="extensionServices")
    machine_spec: Any = Field(None, alias="machineSpec")
    kernel_modules: Any = Field(None, alias="kernelModules")
    volumes: Any = None
    user_volumes: Any = Field(None, alias="userVolumes")
    network_interfaces: Any = Field(None, alias="networkInterfaces")
    nameservers: Any = None
    cert_sans: Any = Field(None, alias="certSANs")
    ingress_firewall: Any = Field(None, alias="ingressFirewall")
    machine_files: Any = Field(None, alias="machineFiles")

    _image = field_validator("talos_image_url")(lambda cls, v: image_repository(v))


class TalConfig(_Loose):
    cluster_name: str = Field(alias="clusterName", min_length=1)
    talos_version: str = Field(alias="talosVersion")
    kubernetes_version: str = Field(alias="kubernetesVersion")
    endpoint: str
    nodes: list[TalNode] = Field(min_length=1)
    control_plane: _RoleSection | None = Field(None, alias="controlPlane")
    worker: _RoleSection | None = None
    domain: Any = None
    allow_scheduling_on_masters: Any = Field(None, alias="allowSchedulingOnMasters")
    allow_scheduling_on_control_planes: Any = Field(None, alias="allowSchedulingOnControlPlanes")
    additional_api_server_cert_sans: Any = Field(None, alias="additionalApiServerCertSans")
    additional_machine_cert_sans: Any = Field(None, alias="additionalMachineCertSans")
    cluster_pod_nets: Any = Field(None, alias="clusterPodNets")
    cluster_svc_nets: Any = Field(None, alias="clusterSvcNets")
    cni_config: Any = Field(None, alias="cniConfig")
    patches: Any = None
    image_factory: Any = Field(None, alias="imageFactory")
    cluster_inline_manifests: Any = Field(None, alias="clusterInlineManifests")

    _talos_v = field_validator("talos_version")(lambda cls, v: _version_field(v))
    _kube_v = field_validator("kubernetes_version")(lambda cls, v: _version_field(v))
    _name = field_validator("cluster_name")(lambda cls, v: dns_label(v, "cluster name"))

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return api_endpoint(v, "https://10.42.0.101:6443")

    @field_validator("image_factory")
    @classmethod
    def _factory(cls, v: Any) -> Any:
        # Its registry reaches talosctl's argv (the installer image) and its endpoint an HTTP request.
        image_factory(v)
        return v

    def node(self, hostname: str) -> TalNode | None:
        return next((n for n in self.nodes if n.hostname == hostname), None)

    def ordered_nodes(self) -> list[TalNode]:
        """Control planes first, then workers, each in file order: the order of a rolling upgrade."""
        return [n for n in self.nodes if n.control_plane] + [n for n in self.nodes if not n.control_plane]

    def schematic_for(self, node: TalNode) -> dict[str, Any] | None:
        """The node's Image Factory schematic: its own, else its role section's (talhelper's precedence)."""
        section = self.control_plane if node.control_plane else self.worker
        return node.schematic if node.schematic is not None else (section.schematic if section else None)

    def image_url_for(self, node: TalNode) -> str | None:
        section = self.control_plane if node.control_plane else self.worker
        return node.talos_image_url or (section.talos_image_url if section else None)

    def installer_for(self, node: TalNode, version: str) -> str:
        return installer_image(version, self.schematic_for(node), self.image_url_for(node), node.secureboot,
                               self.factory())

    def factory(self) -> ImageFactory:
        """talhelper's `imageFactory` settings with its defaults for what is not set."""
        return image_factory(self.image_factory)


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            if m.group(1) in env:
                return str(env[m.group(1)])
            missing.add(m.group(1))
            return m.group(0)
        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env, missing) for v in value]
    return value


def load_talconfig(path: Path, shown: str | None = None) -> TalConfig:
    shown = shown or str(path)
    data = read_yaml_mapping(path, shown)
    env_file = path.with_name("talenv.yaml")
    env: dict[str, str] = {}
    if env_file.exists():
        env_data = read_yaml_mapping(env_file, str(Path(shown).with_name("talenv.yaml")))
        env = {str(k): str(v) for k, v in env_data.items()}
    # talhelper fills ${var} from talenv.yaml and the environment at genconfig time; a placeholder
    # left here is only a problem where this project needs the value (the versions say so).
    data = _substitute(data, env, set())
    problems: list[Problem] = []
    try:
        cfg = TalConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems + from_validation_error(shown, e)) from None
    seen_host: dict[str, int] = {}
    seen_ip: dict[str, int] = {}
    for i, n in enumerate(cfg.nodes):
        if n.hostname in seen_host:
            problems.append(Problem(shown, f"nodes[{i}].hostname",
                                    f"duplicate hostname {n.hostname!r} (also nodes[{seen_host[n.hostname]}])"))
        seen_host.setdefault(n.hostname, i)
        for ip in n.ips:
            if ip in seen_ip:
                problems.append(Problem(shown, f"nodes[{i}].ipAddress",
                                        f"duplicate IP address {ip} (also nodes[{seen_ip[ip]}])"))
            seen_ip.setdefault(ip, i)
    if not any(n.control_plane for n in cfg.nodes):
        problems.append(Problem(shown, "nodes", "no node has controlPlane: true; a cluster needs one"))
    if problems:
        raise ConfigError(problems)
    return cfg


# --- cluster.yaml (the Proxmox cluster's single source of truth) -------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ClusterSection(_Strict):
    name: str = Field(min_length=1)
    endpoint: str
    talos_version: str = Field(alias="talosVersion")
    kubernetes_version: str = Field(alias="kubernetesVersion")
    schematic: dict[str, Any] | None = None
    talos_image_url: str | None = Field(None, alias="talosImageURL")
    # talhelper's `imageFactory` settings, the same mapping as in talconfig.yaml (registryURL, protocol, ...).
    image_factory: Any = Field(None, alias="imageFactory")

    _talos_v = field_validator("talos_version")(lambda cls, v: _version_field(v))
    _kube_v = field_validator("kubernetes_version")(lambda cls, v: _version_field(v))
    _name = field_validator("name")(lambda cls, v: dns_label(v, "cluster name"))
    _image = field_validator("talos_image_url")(lambda cls, v: image_repository(v))

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return api_endpoint(v, "https://10.42.0.161:6443")

    @field_validator("image_factory")
    @classmethod
    def _factory(cls, v: Any) -> Any:
        image_factory(v)  # its registry reaches talosctl's argv, its endpoint an HTTP request
        return v


class Template(_Strict):
    vmid: int = Field(gt=99, lt=1_000_000_000)
    name: str


class ProxmoxSection(_Strict):
    endpoint: str
    node: str = Field(min_length=1)
    storage: str = Field(min_length=1)
    bridge: str = "vmbr0"
    template: Template
    # Where a VM's Talos maintenance API is found before its static address exists: "agent" reads the
    # DHCP address through the QEMU guest agent; "static" trusts that the VM already answers at its `ip`
    # (DHCP reservations, or ip= kernel arguments baked into the image).
    maintenance_address: Literal["agent", "static"] = Field("agent", alias="maintenanceAddress")
    # Talos needs x86-64-v2; kvm64 (PVE 7's default) lacks it. "host" works too, but stops live migration.
    cpu: str = Field("x86-64-v2-AES", min_length=1)
    # File storage for the Image Factory ISO when the template has to be made.
    iso_storage: str = Field("local", alias="isoStorage", min_length=1)
    # Size of the template's (empty) boot disk when the flow makes the template.
    template_disk: int = Field(8, alias="templateDisk", ge=1, description="GiB")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return api_endpoint(v, "https://pve.lan:8006")


class NetworkSection(_Strict):
    gateway: str
    prefix: int = Field(ge=1, le=32)
    nameservers: list[str] = Field(default_factory=list)

    _gw = field_validator("gateway")(lambda cls, v: _ip(v))


class VM(_Strict):
    name: str = Field(min_length=1)
    vmid: int = Field(gt=99, lt=1_000_000_000)
    role: Literal["controlplane", "worker"]
    cores: int = Field(ge=1, le=512)
    memory: int = Field(ge=512, description="MiB")
    disk: int = Field(ge=1, description="GiB")
    ip: str
    mac: str
    tags: list[str] = Field(default_factory=list)
    # The PVE node to run on; unset: the provision flow places it (control planes spread over nodes).
    node: str | None = Field(None, min_length=1)

    _ipv = field_validator("ip")(lambda cls, v: _ip(v))

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", v):
            raise ValueError(f"{v!r} is not a MAC address like BC:24:11:00:01:61")
        return v.upper()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v, "VM name")


class ProxmoxCluster(_Strict):
    cluster: ClusterSection
    proxmox: ProxmoxSection
    network: NetworkSection
    vms: list[VM] = Field(min_length=1)

    def control_planes(self) -> list[VM]:
        return [v for v in self.vms if v.role == "controlplane"]

    def ordered_vms(self) -> list[VM]:
        return self.control_planes() + [v for v in self.vms if v.role == "worker"]

    def installer(self, version: str) -> str:
        return installer_image(version, self.cluster.schematic, self.cluster.talos_image_url, factory=self.factory())

    def factory(self) -> ImageFactory:
        return image_factory(self.cluster.image_factory)


def load_cluster_yaml(path: Path, shown: str | None = None) -> ProxmoxCluster:
    shown = shown or str(path)
    data = read_yaml_mapping(path, shown)
    try:
        cfg = ProxmoxCluster.model_validate(data)
    except ValidationError as e:
        raise ConfigError(from_validation_error(shown, e)) from None
    problems = []
    for attr in ("name", "vmid", "ip", "mac"):
        seen: dict[Any, int] = {}
        for i, vm in enumerate(cfg.vms):
            value = getattr(vm, attr)
            if value in seen:
                problems.append(Problem(shown, f"vms[{i}].{attr}", f"duplicate {attr} {value!r} (also vms[{seen[value]}])"))
            seen.setdefault(value, i)
    if not cfg.control_planes():
        problems.append(Problem(shown, "vms", "no VM has role: controlplane; a cluster needs one"))
    if any(vm.vmid == cfg.proxmox.template.vmid for vm in cfg.vms):
        problems.append(Problem(shown, "proxmox.template.vmid", "the template's vmid is also a VM's vmid"))
    if problems:
        raise ConfigError(problems)
    return cfg


# --- Flux objects -----------------------------------------------------------------------------

KUSTOMIZATION_API = "kustomize.toolkit.fluxcd.io"
SOURCE_API = "source.toolkit.fluxcd.io"
HELM_API = "helm.toolkit.fluxcd.io"


@dataclass(frozen=True)
class FluxKustomization:
    name: str
    namespace: str
    path: str
    source_kind: str
    source_name: str
    source_namespace: str
    depends_on: tuple[tuple[str, str], ...]  # (namespace, name)
    interval: str
    suspend: bool
    file: str
    index: int  # document index in the file, for problem lines

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class FluxSource:
    kind: str
    name: str
    namespace: str
    url: str
    branch: str | None
    file: str


@dataclass
class FluxTree:
    cluster: str
    kustomizations: dict[tuple[str, str], FluxKustomization] = field(default_factory=dict)
    sources: dict[tuple[str, str], FluxSource] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def by_name(self, name: str) -> FluxKustomization | None:
        return next((k for k in self.kustomizations.values() if k.name == name), None)

    def dependents(self, keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """keys plus every Kustomization that depends on them, transitively."""
        out = set(keys)
        changed = True
        while changed:
            changed = False
            for k in self.kustomizations.values():
                if k.key not in out and any(d in out for d in k.depends_on):
                    out.add(k.key)
                    changed = True
        return out

    def order(self, keys: set[tuple[str, str]] | None = None) -> list[list[FluxKustomization]]:
        """Waves in dependsOn order (dependencies in the selection only); cycles raise ConfigError."""
        keys = set(self.kustomizations) if keys is None else keys
        remaining = {k: {d for d in self.kustomizations[k].depends_on if d in keys} for k in keys}
        waves = []
        while remaining:
            ready = sorted(k for k, deps in remaining.items() if not deps)
            if not ready:
                raise ConfigError([Problem(self.kustomizations[k].file, "spec.dependsOn", "dependency cycle")
                                   for k in remaining])
            waves.append([self.kustomizations[k] for k in ready])
            for k in ready:
                del remaining[k]
            for deps in remaining.values():
                deps.difference_update(ready)
        return waves


def iter_yaml_files(directory: Path) -> Iterator[Path]:
    if directory.is_dir():
        for p in sorted(directory.rglob("*")):
            if p.suffix in (".yaml", ".yml") and p.is_file():
                yield p


def as_dict(value: Any) -> dict[str, Any]:
    """A YAML mapping, or an empty one where the file has something else."""
    return value if isinstance(value, dict) else {}


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def parse_flux_documents(docs: list[Any], shown: str, tree: FluxTree) -> None:
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            continue
        api = str(doc.get("apiVersion", ""))
        kind = doc.get("kind")
        meta = as_dict(doc.get("metadata"))
        name = meta.get("name")
        namespace = meta.get("namespace") or "flux-system"
        spec = as_dict(doc.get("spec"))
        where = f"[{i}]" if len(docs) > 1 else ""
        if kind == "Kustomization" and api.startswith(KUSTOMIZATION_API):
            if not isinstance(name, str) or not name:
                tree.problems.append(Problem(shown, f"{where}metadata.name".lstrip("."), "Kustomization has no name"))
                continue
            path = spec.get("path")
            if not isinstance(path, str) or not path:
                tree.problems.append(Problem(shown, f"{where}spec.path", f"Kustomization {name} has no spec.path"))
                path = ""
            ref = as_dict(spec.get("sourceRef"))
            if not ref.get("name"):
                tree.problems.append(Problem(shown, f"{where}spec.sourceRef", f"Kustomization {name} has no sourceRef"))
            deps = []
            raw_deps = spec.get("dependsOn") or []
            if not isinstance(raw_deps, list):
                tree.problems.append(Problem(shown, f"{where}spec.dependsOn", "must be a list of {name, namespace}"))
                raw_deps = []
            for j, d in enumerate(raw_deps):
                if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                    tree.problems.append(Problem(shown, f"{where}spec.dependsOn[{j}].name", "dependency has no name"))
                    continue
                deps.append((str(d.get("namespace") or namespace), d["name"]))
            k = FluxKustomization(
                name=name, namespace=str(namespace), path=path,
                source_kind=str(ref.get("kind") or "GitRepository"), source_name=str(ref.get("name") or ""),
                source_namespace=str(ref.get("namespace") or namespace), depends_on=tuple(deps),
                interval=str(spec.get("interval") or ""), suspend=bool(spec.get("suspend", False)),
                file=shown, index=i,
            )
            if k.key in tree.kustomizations:
                tree.problems.append(Problem(shown, f"{where}metadata.name",
                                             f"Kustomization {name} is also defined in {tree.kustomizations[k.key].file}"))
            tree.kustomizations[k.key] = k
        elif kind in ("GitRepository", "OCIRepository") and api.startswith(SOURCE_API) and isinstance(name, str):
            ref = as_dict(spec.get("ref"))
            tree.sources[(str(namespace), name)] = FluxSource(
                kind=kind, name=name, namespace=str(namespace), url=str(spec.get("url") or ""),
                branch=ref.get("branch"), file=shown)


def check_graph(tree: FluxTree) -> None:
    """Unknown dependencies and cycles, as problems on the Kustomization that names them."""
    for k in tree.kustomizations.values():
        for j, dep in enumerate(k.depends_on):
            if dep not in tree.kustomizations:
                where = f"[{k.index}]" if k.index else ""
                tree.problems.append(Problem(k.file, f"{where}spec.dependsOn[{j}].name",
                                             f"Kustomization {k.name} depends on {dep[1]!r} (namespace {dep[0]}), "
                                             f"which is not defined in clusters/{tree.cluster}/"))
    # Cycle detection: depth-first search with colours; report each Kustomization on a cycle once.
    state: dict[tuple[str, str], int] = {}
    on_cycle: set[tuple[str, str]] = set()

    def visit(key: tuple[str, str], stack: list[tuple[str, str]]) -> None:
        state[key] = 1
        stack.append(key)
        for dep in tree.kustomizations[key].depends_on:
            if dep not in tree.kustomizations:
                continue
            if state.get(dep) == 1:
                on_cycle.update(stack[stack.index(dep):])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[key] = 2

    for key in sorted(tree.kustomizations):
        if key not in state:
            visit(key, [])
    for key in sorted(on_cycle):
        k = tree.kustomizations[key]
        chain = " -> ".join(sorted(n for _, n in on_cycle))
        tree.problems.append(Problem(k.file, "spec.dependsOn", f"dependency cycle among {chain}"))


def load_flux_tree(root: Path, cluster: str, shown_root: str | None = None) -> FluxTree:
    """Flux objects under clusters/<cluster>/ (flux-system and flux-kustomizations)."""
    shown_root = shown_root if shown_root is not None else str(root)
    tree = FluxTree(cluster=cluster)
    base = root / "clusters" / cluster
    for path in iter_yaml_files(base):
        if path.name.endswith(".sops.yaml") or "talos" in path.relative_to(base).parts:
            continue
        if path.name in ("cluster.yaml", "talconfig.yaml", "talenv.yaml"):
            continue
        shown = str(Path(shown_root) / path.relative_to(root))
        try:
            docs = read_yaml_documents(path, shown)
        except ConfigError as e:
            tree.problems.extend(e.problems)
            continue
        parse_flux_documents(docs, shown, tree)
    check_graph(tree)
    return tree


# --- the whole tree ---------------------------------------------------------------------------


@dataclass
class Cluster:
    name: str
    talconfig: TalConfig | None
    proxmox: ProxmoxCluster | None
    flux: FluxTree

    @property
    def talos_version(self) -> str:
        if self.talconfig:
            return self.talconfig.talos_version
        assert self.proxmox is not None
        return self.proxmox.cluster.talos_version

    @property
    def kubernetes_version(self) -> str:
        if self.talconfig:
            return self.talconfig.kubernetes_version
        assert self.proxmox is not None
        return self.proxmox.cluster.kubernetes_version


@dataclass
class Tree:
    root: Path
    shown_root: str
    clusters: dict[str, Cluster]
    problems: list[Problem]

    def cluster(self, name: str) -> Cluster:
        if name not in self.clusters:
            known = ", ".join(sorted(self.clusters)) or "none"
            raise ConfigError([Problem(f"{self.shown_root}/clusters", name,
                                       f"no cluster named {name!r} (clusters in the tree: {known})")])
        return self.clusters[name]


def talconfig_path(root: Path, cluster: str) -> Path:
    return root / "clusters" / cluster / "talos" / "talconfig.yaml"


def cluster_yaml_path(root: Path, cluster: str) -> Path:
    return root / "clusters" / cluster / "cluster.yaml"


def load_tree(root: Path, shown_root: str | None = None) -> Tree:
    """Every cluster under clusters/: its talconfig.yaml or cluster.yaml, and its Flux graph."""
    shown_root = shown_root if shown_root is not None else str(root)
    problems: list[Problem] = []
    clusters: dict[str, Cluster] = {}
    cdir = root / "clusters"
    if not cdir.is_dir():
        problems.append(Problem(f"{shown_root}/clusters", "(directory)", "missing; expected clusters/<name>/ per cluster"))
        return Tree(root, shown_root, clusters, problems)
    for cpath in sorted(p for p in cdir.iterdir() if p.is_dir()):
        name = cpath.name
        tal = prox = None
        tpath, ypath = talconfig_path(root, name), cluster_yaml_path(root, name)
        if tpath.exists():
            try:
                tal = load_talconfig(tpath, f"{shown_root}/{tpath.relative_to(root)}")
            except ConfigError as e:
                problems.extend(e.problems)
        if ypath.exists():
            try:
                prox = load_cluster_yaml(ypath, f"{shown_root}/{ypath.relative_to(root)}")
            except ConfigError as e:
                problems.extend(e.problems)
        if not tpath.exists() and not ypath.exists():
            problems.append(Problem(f"{shown_root}/clusters/{name}", "(directory)",
                                    "neither talos/talconfig.yaml nor cluster.yaml; one of them describes the cluster"))
        flux = load_flux_tree(root, name, shown_root)
        problems.extend(flux.problems)
        shown_t = f"{shown_root}/{tpath.relative_to(root)}"
        if tal and tal.cluster_name != name:
            problems.append(Problem(shown_t, "clusterName", f"is {tal.cluster_name!r} but the directory is clusters/{name}/"))
        if prox and prox.cluster.name != name:
            problems.append(Problem(f"{shown_root}/{ypath.relative_to(root)}", "cluster.name",
                                    f"is {prox.cluster.name!r} but the directory is clusters/{name}/"))
        if tal is not None or prox is not None:
            clusters[name] = Cluster(name, tal, prox, flux)
    return Tree(root, shown_root, clusters, problems)
