"""The values of the prefect-server and prefect-worker HelmReleases, checked against the real charts.

The charts' values.schema.json catches a wrong type and, where the schema closes an object
(`additionalProperties: false`, e.g. `worker` and `server`), an unknown key. The server schema lets
unknown keys through at its top level and in several sub-objects, so every key we set must also be one
the chart's values.yaml defines: a key the chart does not read is a setting silently ignored (the worker
would get 401 from the server if basicAuth sat where the chart does not look). The copies of the charts'
files are in tests/unit/data/prefect-helm/ (SOURCES.md says which release and commit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CHARTS = Path(__file__).resolve().parent / "data" / "prefect-helm"
# The chart release both HelmReleases pin; the files in CHARTS are from its tag.
CHART_VERSION = "2026.8.18172642"

RELEASES = {
    "prefect-server": (K8S / "apps/base/prefect/helmrelease-server.yaml",
                       [K8S / "apps/overlays/homelab/prefect/helmrelease-server-patch.yaml"]),
    "prefect-worker": (K8S / "apps/base/prefect-worker/helmrelease-worker.yaml", []),
}


def merged(base: Any, patch: Any) -> Any:
    """A patch of a HelmRelease as kustomize applies it to a custom resource: maps merge, lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in patch.items()}}
    return patch


def release(chart: str) -> dict[str, Any]:
    """The HelmRelease of `chart` as Flux applies it: the base with every overlay patch."""
    base_path, patches = RELEASES[chart]
    doc = yaml.safe_load(base_path.read_text())
    for p in patches:
        doc = merged(doc, yaml.safe_load(p.read_text()))
    return doc


def chart_values(chart: str) -> dict[str, Any]:
    return yaml.safe_load((CHARTS / f"{chart}.values.yaml").read_text())


def chart_schema(chart: str) -> dict[str, Any]:
    return json.loads((CHARTS / f"{chart}.values.schema.json").read_text())


def validator(chart: str) -> jsonschema.protocols.Validator:
    """The charts name no draft (`$schema: http://json-schema.org/schema#`), which means the latest one:
    2020-12. The keywords they use (type, properties, additionalProperties, enum) read the same in every
    draft since 4."""
    schema = chart_schema(chart)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def unknown_keys(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Every key path in `ours` that the chart's values.yaml does not define. Below a map the chart
    leaves empty (`resources: {}`, `podAnnotations: {}`), below a null default and inside lists the
    chart takes whatever is given, so nothing there is unknown."""
    if not isinstance(ours, dict) or not isinstance(theirs, dict) or not theirs:
        return []
    found = []
    for key, value in ours.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in theirs:
            found.append(where)
        else:
            found += unknown_keys(value, theirs[key], where)
    return found


def effective(chart: str) -> dict[str, Any]:
    """What helm renders with: the chart's defaults overlaid with our values (maps merge, lists replace)."""
    return merged(chart_values(chart), release(chart)["spec"]["values"])


def env_of(values: dict[str, Any], *path: str) -> dict[str, Any]:
    node: Any = values
    for p in path:
        node = node[p]
    return {e["name"]: e for e in node}


@pytest.mark.parametrize("chart", sorted(RELEASES))
def test_release_pins_the_chart_version_the_copies_come_from(chart: str) -> None:
    spec = release(chart)["spec"]["chart"]["spec"]
    assert spec["chart"] == chart
    assert spec["version"] == CHART_VERSION, "a version range lets Flux move the chart (and Prefect) unseen"
    assert f"| `{CHART_VERSION}` |" in (CHARTS / "SOURCES.md").read_text()


@pytest.mark.parametrize("chart", sorted(RELEASES))
def test_values_validate_against_the_charts_schema(chart: str) -> None:
    validator(chart).validate(release(chart)["spec"]["values"])


@pytest.mark.parametrize("chart", sorted(RELEASES))
def test_every_key_we_set_is_one_the_chart_defines(chart: str) -> None:
    assert unknown_keys(release(chart)["spec"]["values"], chart_values(chart)) == []


def test_the_checks_reject_the_keys_the_charts_ignore() -> None:
    # The keys of the old values: the worker's basicAuth beside selfHostedServerApiConfig (prefect-helm
    # #456 moved it inside) and the server's image under server.image (the chart reads global.prefect.image).
    worker = {"worker": {"apiConfig": "selfHostedServer", "basicAuth": {"enabled": True}}}
    with pytest.raises(jsonschema.ValidationError, match="basicAuth"):
        validator("prefect-worker").validate(worker)
    assert unknown_keys(worker, chart_values("prefect-worker")) == ["worker.basicAuth"]
    server = {"server": {"image": {"prefectTag": "3.9.1-python3.11"}}, "leaseStorage": "redis"}
    assert unknown_keys(server, chart_values("prefect-server")) == ["server.image", "leaseStorage"]
    # A free-form map of the chart takes any key; a list is the user's.
    assert unknown_keys({"server": {"podAnnotations": {"a": "b"}, "env": [{"name": "X"}]}},
                        chart_values("prefect-server")) == []


def test_server_image_auth_database_and_lease_storage_land_where_the_chart_reads_them() -> None:
    values = effective("prefect-server")
    # image: rendered as global.prefect.image.repository:prefectTag
    image = values["global"]["prefect"]["image"]
    assert f"{image['repository']}:{image['prefectTag']}" == "prefecthq/prefect:3.9.1-python3.11"
    # auth: PREFECT_SERVER_API_AUTH_STRING from the secret's `auth-string` key
    assert values["server"]["basicAuth"]["enabled"] is True
    assert values["server"]["basicAuth"]["existingSecret"] == "prefect-basic-auth"
    # database: our PostgreSQL through the secret's whole URL; neither bundled database nor bundled redis
    assert values["postgresql"]["enabled"] is False and values["sqlite"]["enabled"] is False
    assert values["redis"]["enabled"] is False
    db = values["externalDatabase"]
    assert (db["existingSecret"], db["connectionStringSecretKey"]) == ("prefect-postgresql", "connection-string")
    assert values["secret"]["create"] is False
    # lease storage: in redis, through the server's own env (the chart has no key for it)
    env = env_of(values, "server", "env")
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"]["value"] == "prefect_redis.lease_storage"
    assert env["EXTRA_PIP_PACKAGES"]["value"] == "prefect-redis==0.3.0"
    # the repossessor runs inside the server pod, so the server's env is the one that counts
    assert values["backgroundServices"]["runAsSeparateDeployment"] is False


def test_worker_image_auth_pool_and_api_land_where_the_chart_reads_them() -> None:
    values = effective("prefect-worker")
    worker = values["worker"]
    assert f"{worker['image']['repository']}:{worker['image']['prefectTag']}" == \
        "prefecthq/prefect:3.9.1-python3.11-kubernetes"
    assert worker["apiConfig"] == "selfHostedServer"
    auth = worker["selfHostedServerApiConfig"]["basicAuth"]
    assert auth["enabled"] is True and auth["existingSecret"] == "prefect-basic-auth"
    assert worker["config"]["type"] == "kubernetes"
    assert worker["config"]["workPool"] == "homelab-kubernetes"
    assert worker["config"]["installPolicy"] == "never"
    server_tag = effective("prefect-server")["global"]["prefect"]["image"]["prefectTag"]
    assert worker["image"]["prefectTag"] == f"{server_tag}-kubernetes", "worker and server run one Prefect"


def test_the_prefect_version_of_the_images_is_the_one_the_flows_pin() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    tag = effective("prefect-server")["global"]["prefect"]["image"]["prefectTag"]
    version = tag.split("-")[0]
    assert f"prefect-version: {version}" in (ROOT / "prefect.yaml").read_text()
    from importlib.metadata import version as installed

    assert installed("prefect") == version, "the tests run another Prefect than the server's image"
    assert '"prefect>=3.9,<3.10"' in pyproject
