"""What still belongs to the example homelab in a tree that is someone else's.

The bundled tree names one tailnet (`ktz.ts.net`, in Tailscale names and the UI's URL) and one SOPS age
recipient. A new owner replaces them (docs/new-owner.md lists every value); until then Flux cannot decrypt
their secrets and the UI's links point at another tailnet. `homelab validate` warns about each file that
still carries one, once the tree's repository (the flux-system GitRepository) is no longer the example's:
in the example itself they are right.
"""

from __future__ import annotations

import re
from pathlib import Path

from homelab.config import as_dict, read_yaml_documents
from homelab.problems import ConfigError

# The example's values; docs/new-owner.md says where each is used.
EXAMPLE_REPOSITORY = "github.com/example/homelab"
EXAMPLE_TAILNET = "ktz.ts.net"
EXAMPLE_AGE_RECIPIENT = "age1pzkc4h34qcz4g5sppzzvs8kl5vv2hlh945gv7gwghmgma8vtu53qsr5ckh"


def normalized_repository(url: str) -> str:
    """`ssh://git@github.com/o/r`, `git@github.com:o/r.git`, `https://github.com/o/r.git` -> `github.com/o/r`."""
    url = url.strip().rstrip("/")
    url = re.sub(r"^[a-z+]+://", "", url, flags=re.IGNORECASE)
    url = re.sub(r"^[^@/]+@", "", url)
    url = re.sub(r"^([^/:]+):(?!\d)", r"\1/", url)  # scp-like host:path, not host:port
    url = re.sub(r":\d+/", "/", url)
    return url.removesuffix(".git").lower()


def repositories(root: Path) -> list[str]:
    """The URLs of the flux-system GitRepository of every cluster in the tree."""
    urls = []
    for path in sorted(root.glob("clusters/*/flux-system/*.y*ml")):
        try:
            docs = read_yaml_documents(path, str(path))
        except ConfigError:
            continue  # reported by validate itself
        for doc in docs:
            d = as_dict(doc)
            meta, spec = as_dict(d.get("metadata")), as_dict(d.get("spec"))
            if d.get("kind") == "GitRepository" and meta.get("name") == "flux-system" and spec.get("url"):
                urls.append(str(spec["url"]))
    return urls


def ownership_warnings(root: Path, shown_root: str | None = None) -> list[str]:
    """`warning: file: what` for each file of a tree that is not the example's but still carries the
    example's tailnet name or age recipient; [] for the example itself (or a tree naming no repository)."""
    shown_root = shown_root if shown_root is not None else str(root)
    urls = repositories(root)
    if not urls or all(normalized_repository(u) == EXAMPLE_REPOSITORY for u in urls):
        return []
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        shown = f"{shown_root}/{path.relative_to(root)}"
        if EXAMPLE_TAILNET in text:
            lines = [str(i) for i, line in enumerate(text.splitlines(), 1) if EXAMPLE_TAILNET in line]
            found.append(f"warning: {shown}: line {', '.join(lines)}: the example's tailnet name {EXAMPLE_TAILNET}; "
                         f"put your tailnet's name there (docs/new-owner.md)")
        if EXAMPLE_AGE_RECIPIENT in text:
            what = ("encrypted to the example's age recipient only: Flux cannot decrypt it; re-create it with "
                    "your values and `sops -e`" if path.name != ".sops.yaml" else
                    "encrypts to the example's age recipient; put your public age key there")
            found.append(f"warning: {shown}: {what} (docs/new-owner.md)")
    return found
