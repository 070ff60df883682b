"""`homelab validate`: the bundled tree is valid, and each broken variant names file and field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from homelab.validate import validate

K8S = Path(__file__).resolve().parents[2] / "k8s"
TALCONFIG = "clusters/m720q/talos/talconfig.yaml"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the bundled tree inside a repository-shaped folder (spec.path is ./k8s/...)."""
    root = tmp_path / "repo" / "k8s"
    shutil.copytree(K8S, root)
    return root


def edit_yaml(path: Path, fn: Callable[[list], None]) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    fn(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def lines(root: Path) -> list[str]:
    return [str(p) for p in validate(root, "k8s")]


def test_bundled_tree_is_valid() -> None:
    assert [str(p) for p in validate(K8S, "k8s")] == []


def test_cli_exits_zero_on_bundled_tree() -> None:
    out = subprocess.run([sys.executable, "-m", "homelab", "validate", str(K8S)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_exits_two_on_missing_path(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "homelab", "validate", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "no such directory" in out.stderr


def test_cli_exits_one_with_problem_lines(tree: Path) -> None:
    edit_yaml(tree / TALCONFIG, lambda d: d[0]["nodes"][1].pop("ipAddress"))
    out = subprocess.run([sys.executable, "-m", "homelab", "validate", str(tree)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{tree}/{TALCONFIG}: nodes[1].ipAddress: required field is missing" in out.stdout.splitlines()
    assert "Traceback" not in out.stdout + out.stderr


def test_node_without_ip_names_file_and_field(tree: Path) -> None:
    edit_yaml(tree / TALCONFIG, lambda d: d[0]["nodes"][1].pop("ipAddress"))
    assert f"k8s/{TALCONFIG}: nodes[1].ipAddress: required field is missing" in lines(tree)


def test_node_with_bad_ip_names_file_and_field(tree: Path) -> None:
    edit_yaml(tree / TALCONFIG, lambda d: d[0]["nodes"][2].update(ipAddress="10.42.0.300"))
    assert any(line.startswith(f"k8s/{TALCONFIG}: nodes[2].ipAddress: ") and "not an IP address" in line
               for line in lines(tree))


def test_duplicate_hostname_is_reported(tree: Path) -> None:
    edit_yaml(tree / TALCONFIG, lambda d: d[0]["nodes"][2].update(hostname="m720q-1"))
    assert any(line.startswith(f"k8s/{TALCONFIG}: nodes[2].hostname: duplicate hostname 'm720q-1'")
               for line in lines(tree))


def test_talos_version_that_is_not_a_version(tree: Path) -> None:
    edit_yaml(tree / TALCONFIG, lambda d: d[0].update(talosVersion="latest"))
    assert any(line.startswith(f"k8s/{TALCONFIG}: talosVersion: ") and "not a version" in line for line in lines(tree))


def test_unknown_field_in_talconfig_is_reported(tree: Path) -> None:
    edit_yaml(tree / TALCONFIG, lambda d: d[0]["nodes"][0].update(ipAdress="10.42.0.9"))
    assert any(line.startswith(f"k8s/{TALCONFIG}: nodes[0].ipAdress: unknown field") for line in lines(tree))


def test_missing_patch_file_is_reported(tree: Path) -> None:
    patches = sorted((tree / "clusters/m720q/talos").rglob("patches/*.yaml"))
    assert patches, "the bundled talconfig references patch files"
    patches[0].unlink()
    assert any("patch file" in line and "does not exist" in line for line in lines(tree))


def _ks_file(tree: Path, name: str) -> Path:
    return tree / "clusters/m720q/flux-kustomizations" / f"{name}.yaml"


def test_depends_on_unknown_kustomization(tree: Path) -> None:
    edit_yaml(_ks_file(tree, "smokeping"), lambda d: d[0]["spec"].update(dependsOn=[{"name": "nope"}]))
    assert any(line.startswith("k8s/clusters/m720q/flux-kustomizations/smokeping.yaml: spec.dependsOn[0].name: ")
               and "'nope'" in line for line in lines(tree))


def test_dependency_cycle(tree: Path) -> None:
    edit_yaml(_ks_file(tree, "sources"), lambda d: d[0]["spec"].update(dependsOn=[{"name": "smokeping"}]))
    found = [line for line in lines(tree) if "dependency cycle" in line]
    assert any(line.startswith("k8s/clusters/m720q/flux-kustomizations/sources.yaml: spec.dependsOn:") for line in found)
    assert "infrastructure-core" in found[0] and "api-proxy" not in found[0]


def test_plaintext_secret_outside_sops_file(tree: Path) -> None:
    secret = tree / "infrastructure/core/overlays/m720q/leaked-secret.yaml"
    secret.write_text("apiVersion: v1\nkind: Secret\nmetadata:\n  name: leaked\nstringData:\n  password: hunter2\n")
    assert any(line.startswith("k8s/infrastructure/core/overlays/m720q/leaked-secret.yaml: kind: Secret leaked")
               for line in lines(tree))


def test_sops_file_with_plaintext_value(tree: Path) -> None:
    sops_file = next(p for p in sorted(tree.rglob("*.sops.yaml")) if "kind: Secret" in p.read_text())

    def leak(docs: list) -> None:
        section = "stringData" if "stringData" in docs[0] else "data"
        key = next(iter(docs[0][section]))
        docs[0][section][key] = "plaintext"

    edit_yaml(sops_file, leak)
    assert any(str(sops_file.relative_to(tree.parent)) in line and "plaintext value" in line for line in lines(tree))


def _tailscale_ingress_files(tree: Path, cluster: str) -> list[Path]:
    return [p for p in sorted(tree.rglob("*.yaml"))
            if f"overlays/{cluster}/" in str(p) and "kind: Ingress" in p.read_text() and "tailscale.com/tags" in p.read_text()]


def test_ingress_without_cluster_tag(tree: Path) -> None:
    path = _tailscale_ingress_files(tree, "m720q")[0]

    def drop(docs: list) -> None:
        for d in docs:
            if d.get("kind") == "Ingress":
                d["metadata"]["annotations"]["tailscale.com/tags"] = "tag:k8s"

    edit_yaml(path, drop)
    assert any(str(path.relative_to(tree.parent)) in line and "lacks tag:k8s-m720q" in line for line in lines(tree))


def test_cluster_specific_tag_in_base(tree: Path) -> None:
    path = next(p for p in sorted((tree / "infrastructure/core/base").rglob("*.yaml"))
                if "tailscale.com/tags" in p.read_text())
    text = path.read_text().replace('"tag:k8s"', '"tag:k8s,tag:k8s-m720q"')
    path.write_text(text)
    assert any(str(path.relative_to(tree.parent)) in line and "cluster-specific tag:k8s-m720q" in line
               for line in lines(tree))


def test_node_name_in_base(tree: Path) -> None:
    path = next(p for p in sorted((tree / "infrastructure/core/base").rglob("helmrelease.yaml")))
    edit_yaml(path, lambda d: d[0]["spec"].setdefault("values", {}).update(nodeSelector={"kubernetes.io/hostname": "m720q-2"}))
    assert any(str(path.relative_to(tree.parent)) in line and "node name m720q-2 in base/" in line for line in lines(tree))


def test_broken_cluster_yaml_field(tree: Path) -> None:
    path = tree / "clusters/homelab/cluster.yaml"
    edit_yaml(path, lambda d: d[0]["vms"][0].update(memory="lots"))
    assert any(line.startswith("k8s/clusters/homelab/cluster.yaml: vms[0].memory: ") for line in lines(tree))


@pytest.mark.parametrize("content,expected", [
    ("", "the file is empty"),
    ("nodes: [\n", "not valid YAML"),
    ("- a\n- b\n", "expected a YAML mapping"),
    ("clusterName: 3\ntalosVersion: v1.11.5\n", "required field is missing"),
])
def test_bad_talconfig_file_gives_problem_lines(tree: Path, content: str, expected: str) -> None:
    (tree / TALCONFIG).write_text(content)
    assert any(line.startswith(f"k8s/{TALCONFIG}: ") and expected in line for line in lines(tree))


def test_missing_talconfig_and_cluster_yaml(tree: Path) -> None:
    (tree / TALCONFIG).unlink()
    assert any(line.startswith("k8s/clusters/m720q: ") for line in lines(tree))
