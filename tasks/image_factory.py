"""Image Factory, the external system: its schematics API, as talhelper uses it.

`register` POSTs a schematic to `<protocol>://<registryURL><schematicEndpoint>` and expects 201 with the ID
(budimanjojo/talhelper pkg/talos/schematic.go getSchematicID / doHTTPPOSTRequest; siderolabs/image-factory
internal/frontend/http/configuration.go handleSchematicCreate). `known` asks `GET .../<id>`: 200 with the
schematic, 404 `schematic not found` (handleSchematicGet). Registering is idempotent: the ID is the hash of
the schematic. Importable without Prefect.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from homelab.versions import ImageFactory, schematic_yaml

REQUEST_TIMEOUT_S = 10.0


class FactoryError(Exception):
    """The factory refused or did not answer; the message names the URL and what came back."""


def _client(deadline: float) -> httpx.Client:
    left = max(0.5, min(REQUEST_TIMEOUT_S, deadline - time.monotonic()))
    # The URL comes from talconfig.yaml: no proxy from the environment, no redirects to elsewhere.
    return httpx.Client(timeout=left, trust_env=False, follow_redirects=False)


def register(factory: ImageFactory, schematic: dict[str, Any], deadline: float) -> str:
    """The ID the factory gives the schematic (it is registered from then on)."""
    url = factory.schematics_url
    body = schematic_yaml(schematic).encode()
    try:
        with _client(deadline) as client:
            resp = client.post(url, content=body, headers={"Content-Type": "application/yaml"})
    except httpx.HTTPError as e:
        raise FactoryError(f"POST {url}: no answer ({type(e).__name__}: {e})") from None
    if resp.status_code != 201:
        raise FactoryError(f"POST {url}: {resp.status_code} {resp.reason_phrase}: {resp.text.strip()[:300]}")
    try:
        sid = str(json.loads(resp.text)["id"])
    except (ValueError, KeyError, TypeError):
        raise FactoryError(f"POST {url}: 201 without an id in {resp.text[:200]!r}") from None
    return sid


def known(factory: ImageFactory, schematic_id: str, deadline: float) -> bool:
    """Whether the factory has the schematic (and so can build its installer)."""
    url = f"{factory.schematics_url}/{schematic_id}"
    try:
        with _client(deadline) as client:
            resp = client.get(url)
    except httpx.HTTPError as e:
        raise FactoryError(f"GET {url}: no answer ({type(e).__name__}: {e})") from None
    if resp.status_code == 404:
        return False
    if resp.status_code != 200:
        raise FactoryError(f"GET {url}: {resp.status_code} {resp.reason_phrase}: {resp.text.strip()[:300]}")
    return True
