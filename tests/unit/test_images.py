"""Every image the tree and prefect.yaml run is a stock image at a pinned release; nothing refers to an
image of this project (nothing builds one); talosctl comes in checked against its release checksum.

PINS below is the whole list, with where each pin comes from: a new image, or a moved tag, fails here
until it is added with its source. Digests: none of these images' digests could be cited from a source
here, so they are pinned by exact release tag (the tag of one release build, never a moving line such as
`latest`, `3-python3.11` or `17-alpine`); talosctl, which the Jobs download, is pinned by its sha256."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
PREFECT_YAML = ROOT / "prefect.yaml"
TEMPLATE = ROOT / "deploy/kubernetes/base-job-template.yaml"
REQUIREMENTS = ROOT / "deploy/requirements-flows.txt"
WEBHOOK = K8S / "apps/base/prefect/webhook.yaml"

# repository -> (the one tag allowed, where it comes from)
PINS: dict[str, tuple[str, str]] = {
    "prefecthq/prefect": ("3.9.1-python3.11", "the Prefect release pyproject.toml and prefect.yaml pin; the server, "
                                              "the webhook receiver and the flow-run Jobs"),
    "prefecthq/prefect-k": ("3.9.1-python3.11-kubernetes", "the same release with prefect-kubernetes: the worker"),
    "postgres": ("17.6-alpine3.22", "PostgreSQL 17 (the on-disk format of the server's database)"),
    "redis": ("7.4.6-alpine", "the lease store"),
    "rancher/local-path-provisioner": ("v0.0.32", "the chart of the same tag (k8s/infrastructure/local-path)"),
    "busybox": ("1.37.0", "local-path-provisioner's helper"),
    "lscr.io/linuxserver/smokeping": ("2.8.2", "the homelab's own app, as its tree pins it"),
    "rook/ceph": ("v1.18.7", "the Rook release of k8s/infrastructure/rook-ceph; the flows' Ceph tools pod "
                             "(k8s/apps/base/prefect-worker/ceph-tools.yaml) runs its toolbox script"),
}
# talosctl-linux-amd64 per Talos release, as Sidero's release checksums list it. v1.11.5:
# siderolabs/homebrew-tap Formula/talosctl.rb at 3dd95f243c44784d395202570e4e29f8f9bc0f1d, the same value
# in cashapp/hermit-packages talosctl.hcl at f0517fd7532fc6adfd910cfba3ef2b4c59f662db.
TALOSCTL_SHA256 = {"v1.11.5": "9fc76cb0ee711dc16a03c777f2d71338b9692707de49ec916944c3e335963f67"}


def _key(image: str) -> tuple[str, str]:
    """(repository as PINS names it, tag); a digest is kept with the tag."""
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if name.startswith("docker.io/"):
        name = name.removeprefix("docker.io/").removeprefix("library/")
    if name == "prefecthq/prefect" and tag.endswith("-kubernetes"):
        name = "prefecthq/prefect-k"
    return name, tag


def _containers(obj: Any) -> Iterator[dict[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _containers(value)


# The repository a chart uses when the values name only a tag: (release, key of the image map) -> repository.
CHART_DEFAULT_REPOSITORY = {
    ("prefect-server", "image"): "prefecthq/prefect",  # charts/prefect-server/values.yaml global.prefect.image
    ("prefect-worker", "image"): "prefecthq/prefect",  # charts/prefect-worker/values.yaml worker.image
    ("local-path-provisioner", "image"): "rancher/local-path-provisioner",  # deploy/chart/.../values.yaml
}


def _helm_images(release: str, values: dict[str, Any]) -> Iterator[str]:
    """The images a HelmRelease's values choose: every map under a key ending in `image`/`Image` with a
    `tag` or `prefectTag`. A tag without a repository takes the chart's, which must be listed above."""
    stack: list[Any] = [values]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key.lower().endswith("image") and isinstance(value, dict) and {"tag", "prefectTag"} & set(value):
                    repo = value.get("repository") or CHART_DEFAULT_REPOSITORY.get((release, key), "(unknown repository)")
                    yield f"{repo}:{value.get('prefectTag') or value.get('tag')}"
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def image_references() -> list[tuple[str, str]]:
    """(where, image) for every image the tree, prefect.yaml and the pool's job template name."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            where = str(path.relative_to(ROOT))
            found += [(where, str(c["image"])) for c in _containers(doc) if "image" in c]
            if doc.get("kind") == "HelmRelease":
                values = (doc.get("spec") or {}).get("values") or {}
                found += [(where, i) for i in _helm_images(doc["metadata"]["name"], values)]
    config = yaml.safe_load(PREFECT_YAML.read_text())
    for name, pool in (config.get("definitions", {}).get("work_pools") or {}).items():
        if "image" in (pool.get("job_variables") or {}):
            found.append((f"prefect.yaml work_pools.{name}", pool["job_variables"]["image"]))
    for d in config["deployments"]:
        image = ((d.get("work_pool") or {}).get("job_variables") or {}).get("image")
        if image:
            found.append((f"prefect.yaml deployment {d['name']}", image))
    template = yaml.safe_load(TEMPLATE.read_text())
    found.append((str(TEMPLATE.relative_to(ROOT)), template["variables"]["properties"]["image"]["default"]))
    return found


def test_the_scan_reaches_every_kind_of_image_reference() -> None:
    wheres = {w for w, _ in image_references()}
    assert {"k8s/apps/base/prefect/webhook.yaml", "k8s/apps/base/prefect/postgresql.yaml",
            "k8s/apps/base/prefect/redis.yaml", "k8s/apps/base/prefect/helmrelease-server.yaml",
            "k8s/apps/base/prefect-worker/helmrelease-worker.yaml", "prefect.yaml work_pools.kubernetes",
            "deploy/kubernetes/base-job-template.yaml"} <= wheres
    images = {i for _, i in image_references()}
    assert {"prefecthq/prefect:3.9.1-python3.11", "prefecthq/prefect:3.9.1-python3.11-kubernetes"} <= images


def test_nothing_refers_to_an_image_of_this_project() -> None:
    # No image of homelab-flows is built anywhere: the code comes from git at a pinned commit.
    assert [(w, i) for w, i in image_references() if "homelab-flows" in i or "homelab_flows" in i] == []


def test_every_image_is_a_pinned_release_from_the_list() -> None:
    wrong = []
    for where, image in image_references():
        name, tag = _key(image)
        if name not in PINS:
            wrong.append(f"{where}: {image}: not in PINS (add it with where its pin comes from)")
        elif tag.split("@")[0] != PINS[name][0]:
            wrong.append(f"{where}: {image}: PINS says {name}:{PINS[name][0]}")
    assert wrong == []


@pytest.mark.parametrize("tag", ["latest", "", "3-latest", "3-python3.11", "17-alpine", "7-alpine", "2"])
def test_a_moving_tag_is_never_a_pin(tag: str) -> None:
    assert not _is_release_tag(tag)


def _is_release_tag(tag: str) -> bool:
    """A tag of one release: at least major.minor, and major.minor.patch where the project has patches."""
    return bool(re.match(r"^v?\d+\.\d+(\.\d+)?(-[a-z0-9.]+)*$", tag)) and "latest" not in tag


def test_every_pin_is_a_release_tag() -> None:
    # postgres names its releases major.minor (17.6); every other pin here has a patch number.
    for name, (tag, _) in PINS.items():
        assert _is_release_tag(tag), name
        if name != "postgres":
            assert re.match(r"^v?\d+\.\d+\.\d+", tag), f"{name}:{tag} is a release line, not a release"


def test_prefect_images_run_the_release_the_flows_pin() -> None:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert PINS["prefecthq/prefect"][0].startswith(f"{config['prefect-version']}-")
    assert PINS["prefecthq/prefect-k"][0] == f"{PINS['prefecthq/prefect'][0]}-kubernetes"


# --- talosctl in the flow-run Jobs ----------------------------------------------------------------


def _template() -> dict[str, Any]:
    return yaml.safe_load(TEMPLATE.read_text())


def test_talosctl_is_the_clusters_talos_release_with_its_cited_checksum() -> None:
    props = _template()["variables"]["properties"]
    version = props["talosctl_version"]["default"]
    talconfig = yaml.safe_load((K8S / "clusters/m720q/talos/talconfig.yaml").read_text())
    cluster = yaml.safe_load((K8S / "clusters/homelab/cluster.yaml").read_text())
    versions = {talconfig["talosVersion"], str(cluster["cluster"]["talosVersion"])}
    assert versions == {version}, "talosctl must be the Talos release the clusters run (talosctl's own rule)"
    assert props["talosctl_sha256"]["default"] == TALOSCTL_SHA256[version]


def _init_script() -> tuple[list[str], dict[str, str]]:
    spec = _template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    [init] = spec["initContainers"]
    return init["command"], {e["name"]: e["value"] for e in init["env"]}


class _Files(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def release_server() -> Iterator[tuple[str, bytes]]:
    body = b"\x7fELF talosctl stand-in"
    handler = type("H", (_Files,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/talosctl-linux-amd64", body
    finally:
        server.shutdown()


def _run_init(url: str, sha: str, dest: Path) -> subprocess.CompletedProcess[str]:
    command, env = _init_script()
    assert command[:2] == ["python", "-c"]
    env = {**os.environ, "TALOSCTL_URL": url, "TALOSCTL_SHA256": sha, "TALOSCTL_DEST": str(dest)}
    return subprocess.run([sys.executable, "-c", command[2]], env=env, capture_output=True, text=True, timeout=60)


def test_the_init_container_installs_talosctl_only_with_the_right_checksum(
        release_server: tuple[str, bytes], tmp_path: Path) -> None:
    url, body = release_server
    dest = tmp_path / "talosctl"
    bad = _run_init(url, "0" * 64, dest)
    assert bad.returncode != 0 and "not installed" in bad.stderr
    assert not dest.exists() and not list(tmp_path.iterdir())
    good = _run_init(url, hashlib.sha256(body).hexdigest(), dest)
    assert good.returncode == 0, good.stderr
    assert dest.read_bytes() == body and os.access(dest, os.X_OK)


def test_the_init_container_fetches_the_url_of_the_pinned_release() -> None:
    _, env = _init_script()
    assert env["TALOSCTL_URL"] == ("https://github.com/siderolabs/talos/releases/download/"
                                   "{{ talosctl_version }}/talosctl-linux-amd64")
    assert env["TALOSCTL_SHA256"] == "{{ talosctl_sha256 }}"


# --- the code: git at a pinned commit, dependencies pinned ---------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: list[str]) -> dict[str, str]:
    """The installed distributions `names` need, with their dependencies (extras left out): name -> version."""
    installed = {_norm(d.metadata["Name"]): d for d in distributions()}
    seen: dict[str, str] = {}
    stack = list(names)
    while stack:
        name = _norm(stack.pop())
        if name in seen or name not in installed:
            continue
        dist = installed[name]
        seen[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return seen


def test_requirements_pin_exactly_what_the_flows_need_beyond_the_image() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = [Requirement(r).name for r in pyproject["project"]["dependencies"]]
    assert "prefect" in runtime
    in_image = _closure(["prefect"])
    need = {k: v for k, v in _closure([n for n in runtime if n != "prefect"]).items() if k not in in_image}
    pinned = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{line}: not pinned with =="
            pinned[_norm(name)] = version
    assert pinned == need, "deploy/requirements-flows.txt differs from what the tests run with"


def test_kubernetes_pool_deployments_clone_the_deployed_commit_and_install_the_pins() -> None:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    defs = config["definitions"]
    template = _template()["variables"]["properties"]
    pool = defs["work_pools"]["kubernetes"]["job_variables"]
    assert pool["image"] == template["image"]["default"]
    assert pool["service_account_name"] == template["service_account_name"]["default"]
    assert pool["namespace"] == template["namespace"]["default"]
    [check, commit] = defs["build_steps"]["pin_commit"]
    assert check["prefect.deployments.steps.run_shell_script"]["script"] == "git diff --quiet HEAD"
    step = commit["prefect.deployments.steps.run_shell_script"]
    assert step["script"] == "git rev-parse HEAD"
    steps = {next(iter(s)): next(iter(s.values())) for s in defs["pull_steps"]["clone"]}
    clone = steps["prefect.deployments.steps.git_clone"]
    assert clone["commit_sha"] == "{{ " + step["id"] + ".stdout }}"
    pip = steps["prefect.deployments.steps.pip_install_requirements"]
    assert (ROOT / pip["requirements_file"]) == REQUIREMENTS
    assert pip["directory"] == "{{ " + clone["id"] + ".directory }}"
    # The clone lands on the Job's writable volume.
    [first, *_] = defs["pull_steps"]["clone"]
    mounts = {m["mountPath"] for c in _containers(_template()["job_configuration"]) for m in c.get("volumeMounts", [])}
    assert first["prefect.deployments.steps.set_working_directory"]["directory"] in mounts


def _webhook_init() -> tuple[list[str], dict[str, str]]:
    deploy = yaml.safe_load_all(WEBHOOK.read_text())
    [d] = [x for x in deploy if x and x["kind"] == "Deployment"]
    [init] = d["spec"]["template"]["spec"]["initContainers"]
    return init["command"], {e["name"]: e["value"] for e in init["env"]}


def _webhook_env() -> dict[str, str]:
    [d] = [x for x in yaml.safe_load_all(WEBHOOK.read_text()) if x and x["kind"] == "Deployment"]
    [c] = [c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "webhook"]
    return {e["name"]: e.get("value", "") for e in c["env"]}


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}).stdout.strip()


def test_webhook_runs_the_code_of_exactly_its_pinned_commit(tmp_path: Path) -> None:
    command, env = _webhook_init()
    assert re.fullmatch(r"[0-9a-f]{40}", env["HOMELAB_FLOWS_COMMIT"])
    origin = tmp_path / "origin"
    origin.mkdir()
    _git("init", "--quiet", cwd=origin)
    (origin / "marker").write_text("first")
    # A requirement pip can install with no index and no build: a local wheel, so the install step runs.
    (origin / "deploy").mkdir()
    wheel = tmp_path / "standin-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("standin/__init__.py", "")
        z.writestr("standin-1.dist-info/METADATA", "Metadata-Version: 2.1\nName: standin\nVersion: 1\n")
        z.writestr("standin-1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n")
        z.writestr("standin-1.dist-info/RECORD", "")
    (origin / "deploy/requirements-flows.txt").write_text(f"{wheel}\n")
    _git("add", "marker", "deploy", cwd=origin)
    _git("commit", "--quiet", "-m", "first", cwd=origin)
    first = _git("rev-parse", "HEAD", cwd=origin)
    (origin / "marker").write_text("second")
    _git("commit", "--quiet", "-am", "second", cwd=origin)
    # A forge serves any commit by id; a local repository only when told to.
    _git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=origin)

    def run(commit: str, dest: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", command[2]], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOMELAB_FLOWS_REPOSITORY": str(origin), "PIP_NO_INDEX": "1",
                                   "HOMELAB_FLOWS_COMMIT": commit, "HOMELAB_FLOWS_DIR": str(dest / "repo"),
                                   "HOMELAB_FLOWS_PACKAGES": str(dest / "packages")})

    done = run(first, tmp_path / "a")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a/repo/marker").read_text() == "first", "not the pinned commit: the branch head"
    assert (tmp_path / "a/packages/standin/__init__.py").is_file(), "the pinned packages were not installed"
    assert env["HOMELAB_FLOWS_PACKAGES"] in _webhook_env()["PYTHONPATH"].split(":")
    assert env["HOMELAB_FLOWS_DIR"] in _webhook_env()["PYTHONPATH"].split(":")
    refused = run("main", tmp_path / "b")
    assert refused.returncode != 0 and "not a full commit id" in refused.stderr
