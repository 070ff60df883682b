"""Talos and Kubernetes versions as semver, and Image Factory installer images.

The schematic ID is computed offline exactly as Image Factory does: the hex SHA-256 of the
schematic marshalled by Go's yaml v3 (4-space indents, sequence items indented under their key,
extensions sorted, empty fields omitted).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import semver

STOCK_INSTALLER = "ghcr.io/siderolabs/installer"
FACTORY_INSTALLER = "factory.talos.dev/installer"

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:[-+].*)?$")


class VersionError(ValueError):
    pass


def parse_version(text: object) -> semver.Version:
    """``v1.11.5`` or ``1.11.5`` -> Version(1, 11, 5); anything else raises VersionError."""
    if not isinstance(text, str) or not _VERSION_RE.match(text.strip()):
        raise VersionError(f"{text!r} is not a version like v1.11.5")
    try:
        return semver.Version.parse(text.strip().removeprefix("v"))
    except ValueError as e:
        raise VersionError(f"{text!r} is not a version like v1.11.5 ({e})") from e


def vtag(v: semver.Version) -> str:
    return f"v{v}"


def is_version(text: object) -> bool:
    try:
        parse_version(text)
    except VersionError:
        return False
    return True


# --- schematic ID (Go yaml v3 marshalling of image-factory's Schematic struct) -----------------

# Field order of image-factory's pkg/schematic structs; Go marshals struct fields in declaration order.
_FIELD_ORDER = {
    "schematic": ["overlay", "customization"],
    "customization": ["extraKernelArgs", "meta", "systemExtensions", "secureboot", "bootloader"],
    "overlay": ["image", "name", "options"],
    "systemExtensions": ["officialExtensions"],
    "secureboot": ["includeWellKnownCertificates"],
    "meta": ["key", "value"],
}
_ALWAYS = {("schematic", "customization")}  # Customization has no omitempty: `customization: {}`

_PLAIN_RE = re.compile(r"^[A-Za-z0-9_./=-][A-Za-z0-9_./=:,+ -]*$")
_RESERVED = {"", "~", "null", "true", "false", "yes", "no", "on", "off", "y", "n"}


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    s = str(v)
    needs_quote = (
        s.lower() in _RESERVED
        or not _PLAIN_RE.match(s)
        or s != s.strip()
        or s.startswith("- ")
        or ": " in s
        or " #" in s
        or re.fullmatch(r"[-+]?(\d[\d_]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?", s) is not None
    )
    return json.dumps(s) if needs_quote else s


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == [] or v == "" or v is False


def _emit(kind: str, value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    order = _FIELD_ORDER.get(kind)
    keys = order + sorted(k for k in value if k not in order) if order else sorted(value)
    for key in keys:
        if key not in value:
            continue
        v = value[key]
        if kind == "systemExtensions" and key == "officialExtensions" and isinstance(v, list):
            v = sorted(v)
        if _empty(v) and (kind, key) not in _ALWAYS:
            continue
        if isinstance(v, dict):
            if not v:
                lines.append(f"{pad}{key}: {{}}")
            else:
                lines.append(f"{pad}{key}:")
                _emit(key, v, indent + 4, lines)
        elif isinstance(v, list):
            lines.append(f"{pad}{key}:")
            for item in v:
                if isinstance(item, dict):
                    sub: list[str] = []
                    _emit(key, item, 0, sub)
                    lines.append(f"{pad}    - {sub[0]}")
                    lines.extend(f"{pad}      {s}" for s in sub[1:])
                else:
                    lines.append(f"{pad}    - {_scalar(item)}")
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")


def schematic_yaml(schematic: dict[str, Any] | None) -> str:
    body = dict(schematic or {})
    body.setdefault("customization", {})
    lines: list[str] = []
    _emit("schematic", body, 0, lines)
    return "\n".join(lines) + "\n"


def schematic_id(schematic: dict[str, Any] | None) -> str:
    return hashlib.sha256(schematic_yaml(schematic).encode()).hexdigest()


# --- Image Factory settings (talhelper's `imageFactory`) ------------------------------------------

# talhelper pkg/config/defaults.go GetImageFactory. Its installer template became
# `{{.RegistryURL}}/{{.Mode}}-installer...` in May 2025 (commit 6b09d815, "the installer image url change" of
# Image Factory for Talos v1.10); the factory serves both paths, and the homelab's nodes were installed from
# `installer/`, so that stays the default here: set installerURLTmpl to what your talhelper generates.
DEFAULT_INSTALLER_TMPL = "{{.RegistryURL}}/installer{{if .Secureboot}}-secureboot{{end}}/{{.ID}}:{{.Version}}"

_REGISTRY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?")
_ENDPOINT_RE = re.compile(r"/[A-Za-z0-9._~/-]*")
_TMPL_TOKEN = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_TMPL_FIELDS = ("RegistryURL", "ID", "Version", "Mode", "Secureboot")
# A factory installer reference: <registry>/[<mode>-]installer[-secureboot]/<schematic ID>:<version>
_FACTORY_REF_RE = re.compile(r"^(?P<registry>[^/]+)/(?:[a-z0-9]+-)?installer(?:-secureboot)?/(?P<id>[0-9a-f]{64}):[^/:]+$")


@dataclass(frozen=True)
class ImageFactory:
    """Where the installer images and the schematics API are: talhelper's `imageFactory` block."""

    registry_url: str = "factory.talos.dev"
    schematic_endpoint: str = "/schematics"
    protocol: str = "https"
    installer_url_tmpl: str = DEFAULT_INSTALLER_TMPL

    @property
    def schematics_url(self) -> str:
        """talhelper pkg/talos/schematic.go getSchematicID: Protocol + "://" + RegistryURL + SchematicEndpoint."""
        return f"{self.protocol}://{self.registry_url}{self.schematic_endpoint}"

    def installer(self, schematic_id_: str, version: str, secureboot: bool = False, mode: str = "metal") -> str:
        return render_template(self.installer_url_tmpl, {"RegistryURL": self.registry_url, "ID": schematic_id_,
                                                         "Version": version, "Mode": mode, "Secureboot": secureboot})


def render_template(tmpl: str, data: dict[str, Any]) -> str:
    """The subset of Go's text/template that talhelper's installer templates use: `{{.Field}}` and
    `{{if .Field}}...{{else}}...{{end}}` (not nested). Anything else is refused: a template this cannot
    evaluate must not quietly yield another image than talhelper's."""
    out: list[str] = []
    pos = 0
    stack: list[tuple[bool, bool]] = []  # (condition, in the else part)

    def emitting() -> bool:
        return all(cond != in_else for cond, in_else in stack)

    for m in _TMPL_TOKEN.finditer(tmpl):
        if emitting():
            out.append(tmpl[pos:m.start()])
        pos = m.end()
        expr = m.group(1)
        if expr.startswith("if ") and expr[3:].strip().startswith("."):
            name = expr[3:].strip()[1:]
            if name not in data or stack:
                raise ValueError(f"installerURLTmpl: unsupported condition {{{{{expr}}}}}")
            stack.append((bool(data[name]), False))
        elif expr == "else" and stack and not stack[-1][1]:
            stack[-1] = (stack[-1][0], True)
        elif expr == "end" and stack:
            stack.pop()
        elif expr.startswith(".") and expr[1:] in data:
            if emitting():
                out.append(str(data[expr[1:]]))
        else:
            raise ValueError(f"installerURLTmpl: {{{{{expr}}}}} is not one of "
                             f"{', '.join('{{.' + f + '}}' for f in _TMPL_FIELDS)} or {{{{if .X}}}}/{{{{else}}}}/{{{{end}}}}")
    if stack:
        raise ValueError("installerURLTmpl: an {{if}} without its {{end}}")
    out.append(tmpl[pos:])
    return "".join(out)


def image_factory(raw: Any) -> ImageFactory:
    """talhelper's `imageFactory` mapping (None: all defaults), checked: the registry reaches talosctl's argv
    as part of the installer image and, with the protocol and endpoint, the URL the schematic is POSTed to."""
    if raw is None:
        return ImageFactory()
    if not isinstance(raw, dict):
        raise ValueError("imageFactory must be a mapping (registryURL, schematicEndpoint, protocol, installerURLTmpl)")
    known = {"registryURL", "schematicEndpoint", "protocol", "installerURLTmpl", "ISOURLTmpl"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"imageFactory: unknown field(s) {', '.join(map(str, unknown))}; talhelper knows "
                         f"{', '.join(sorted(known))}")
    d = ImageFactory()
    f = ImageFactory(registry_url=str(raw.get("registryURL") or d.registry_url),
                     schematic_endpoint=str(raw.get("schematicEndpoint") or d.schematic_endpoint),
                     protocol=str(raw.get("protocol") or d.protocol),
                     installer_url_tmpl=str(raw.get("installerURLTmpl") or d.installer_url_tmpl))
    if not _REGISTRY_RE.fullmatch(f.registry_url):
        raise ValueError(f"imageFactory.registryURL {f.registry_url!r} is not a registry host[:port] like factory.talos.dev")
    if f.protocol not in ("http", "https"):
        raise ValueError(f"imageFactory.protocol is {f.protocol!r}; talhelper takes http or https")
    if not _ENDPOINT_RE.fullmatch(f.schematic_endpoint):
        raise ValueError(f"imageFactory.schematicEndpoint {f.schematic_endpoint!r} is not a path like /schematics")
    sample = f.installer("0" * 64, "v1.11.5", secureboot=True)  # raises on a template this cannot evaluate
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:-]*", sample) or ":v1.11.5" not in sample:
        raise ValueError(f"imageFactory.installerURLTmpl yields {sample!r}, not an image reference ending in "
                         f":<version>")
    return f


def factory_schematic_of(image: str) -> str | None:
    """The schematic ID in an Image Factory installer reference, None for any other image."""
    m = _FACTORY_REF_RE.match(image)
    return m.group("id") if m else None


def installer_image(version: str, schematic: dict[str, Any] | None = None, image_url: str | None = None,
                    secureboot: bool = False, factory: ImageFactory | None = None) -> str:
    """The installer image talhelper would pick: talosImageURL:version, else the factory URL."""
    if image_url:
        return f"{image_url}:{version}"
    if schematic is None:
        return f"{STOCK_INSTALLER}:{version}"
    return (factory or ImageFactory()).installer(schematic_id(schematic), version, secureboot)
