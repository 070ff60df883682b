"""Talos and Kubernetes versions as semver, and Image Factory installer images.

The schematic ID is computed offline exactly as Image Factory does: the hex SHA-256 of the
schematic marshalled by Go's yaml v3 (4-space indents, sequence items indented under their key,
extensions sorted, empty fields omitted).
"""

from __future__ import annotations

import hashlib
import json
import re
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


def installer_image(version: str, schematic: dict[str, Any] | None = None, image_url: str | None = None,
                    secureboot: bool = False) -> str:
    """The installer image talhelper would pick: talosImageURL:version, else the factory URL."""
    if image_url:
        return f"{image_url}:{version}"
    if schematic is None:
        return f"{STOCK_INSTALLER}:{version}"
    repo = FACTORY_INSTALLER + ("-secureboot" if secureboot else "")
    return f"{repo}/{schematic_id(schematic)}:{version}"
