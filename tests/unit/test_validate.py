"""`homelab validate`: the bundled tree is valid, and each broken variant names file and field."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
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


# --- hostile files: what a push can put into the tree -----------------------------------------------------

BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def run_validate(tree: Path, timeout: float = 60) -> tuple[int, str, str, float]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "homelab", "validate", str(tree)], capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout, out.stderr, time.monotonic() - started


def test_billion_laughs_talconfig_is_refused_fast_with_a_line(tree: Path) -> None:
    (tree / TALCONFIG).write_text((tree / TALCONFIG).read_text() + "\n" + BILLION_LAUGHS.replace("a:", "zz:", 1))
    code, stdout, stderr, seconds = run_validate(tree)
    assert code == 1 and "Traceback" not in stdout + stderr
    [line] = [x for x in stdout.splitlines() if "alias" in x]
    assert line.startswith(f"{tree}/{TALCONFIG}: ") and "aliases expand the document too much" in line
    assert seconds < 30  # a whole validate run; the bomb itself is refused after a few thousand nodes


def test_billion_laughs_in_a_base_manifest_is_refused_fast(tree: Path) -> None:
    path = tree / "apps/base/smokeping/configmap.yaml"
    path.write_text(path.read_text() + "\n---\n" + BILLION_LAUGHS)
    started = time.monotonic()
    found = [x for x in lines(tree) if "apps/base/smokeping/configmap.yaml" in x]
    assert any("aliases expand the document too much" in x and x.startswith("k8s/apps/base/smokeping/configmap.yaml: [1]")
               for x in found), found
    assert time.monotonic() - started < 30


def test_talconfig_anchors_and_aliases_of_real_files_still_load(tree: Path) -> None:
    text = (tree / TALCONFIG).read_text().replace("additionalApiServerCertSans:", "additionalApiServerCertSans: &sans", 1)
    (tree / TALCONFIG).write_text(text + "additionalMachineCertSans: *sans\n")
    assert lines(tree) == []


def test_duplicate_key_is_refused_like_talhelper_does(tree: Path) -> None:
    text = (tree / TALCONFIG).read_text()
    (tree / TALCONFIG).write_text(text.replace("talosVersion: v1.11.5\n", "talosVersion: v1.11.5\ntalosVersion: v1.12.0\n"))
    code, stdout, _, _ = run_validate(tree)
    assert code == 1
    assert f"{tree}/{TALCONFIG}: talosVersion: duplicate key (line 6, first on line 5)" in stdout


def test_duplicate_key_in_a_nested_mapping_names_its_path(tree: Path) -> None:
    text = (tree / TALCONFIG).read_text()
    (tree / TALCONFIG).write_text(text.replace("    controlPlane: true\n", "    controlPlane: true\n    controlPlane: false\n", 1))
    assert any(x.startswith(f"k8s/{TALCONFIG}: nodes[0].controlPlane: duplicate key") for x in lines(tree))


def test_oversized_file_is_refused_unread(tree: Path) -> None:
    from homelab import safeyaml

    path = tree / "apps/base/smokeping/huge.yaml"
    with path.open("w") as f:
        f.write("a: ")
        f.write("x" * (safeyaml.MAX_FILE_BYTES + 1))
    started = time.monotonic()
    found = [x for x in lines(tree) if "huge.yaml" in x]
    assert found == [f"k8s/apps/base/smokeping/huge.yaml: (file): the file is {safeyaml.MAX_FILE_BYTES + 4} bytes, "
                     f"over the {safeyaml.MAX_FILE_BYTES}-byte limit for one YAML file of the tree; split it, or keep "
                     "generated bundles out of the tree"]
    assert time.monotonic() - started < 30


def test_recursive_alias_is_refused(tree: Path) -> None:
    path = tree / "apps/base/smokeping/loop.yaml"
    path.write_text("a: &x\n  - *x\n")
    assert any(x.startswith("k8s/apps/base/smokeping/loop.yaml: a[0]: ") and "recursive anchor" in x for x in lines(tree))


# --- values that reach argv are refused where they enter ----------------------------------------------------

ARGUMENT_CASES = [
    ("ipAddress with a scope id", lambda d: d[0]["nodes"][0].update(ipAddress="fe80::1%$(reboot);id|x`y`"),
     "nodes[0].ipAddress", "scope id"),
    ("cluster named like an option", lambda d: d[0].update(clusterName="--talosconfig=.."),
     "clusterName", "not a valid cluster name"),
    ("hostname with a shell word", lambda d: d[0]["nodes"][1].update(hostname="m720q-2;reboot"),
     "nodes[1].hostname", "not a valid hostname"),
    ("hostname like an option", lambda d: d[0]["nodes"][1].update(hostname="-n"),
     "nodes[1].hostname", "not a valid hostname"),
    ("endpoint with a command", lambda d: d[0].update(endpoint="https://$(reboot):6443"),
     "endpoint", "not an API endpoint"),
    ("version with a suffix", lambda d: d[0].update(talosVersion="v1.11.5-$(id)"), "talosVersion", "not a version"),
    ("installer URL with a space", lambda d: d[0]["nodes"][0].update(talosImageURL="ghcr.io/x --insecure"),
     "nodes[0].talosImageURL", "not an image repository"),
    # From clusters/m720q/talos/, ../../../ is the tree's root: one more level leaves it.
    ("patch climbing out of the tree", lambda d: d[0]["nodes"][0].update(patches=["@../../../../../../../etc/passwd"]),
     "nodes[0].patches[0]", "outside the tree"),
    ("patch by absolute path", lambda d: d[0].update(patches=["@/etc/passwd"]), "patches[0]", "outside the tree"),
]


@pytest.mark.parametrize(("mutate", "field", "message"), [c[1:] for c in ARGUMENT_CASES],
                         ids=[c[0] for c in ARGUMENT_CASES])
def test_argument_values_are_refused_at_validation(tree: Path, mutate: Callable[[list], None], field: str,
                                                   message: str) -> None:
    edit_yaml(tree / TALCONFIG, mutate)
    found = [x for x in lines(tree) if x.startswith(f"k8s/{TALCONFIG}: {field}: ")]
    assert any(message in x for x in found), lines(tree)


def test_cluster_yaml_argument_values_are_refused(tree: Path) -> None:
    path = tree / "clusters/homelab/cluster.yaml"

    def poison(docs: list) -> None:
        docs[0]["cluster"]["name"] = "--talosconfig=.."
        docs[0]["vms"][0]["ip"] = "fe80::1%eth0"
        docs[0]["proxmox"]["endpoint"] = "https://pve.lan:8006/;rm"

    edit_yaml(path, poison)
    found = [x for x in lines(tree) if x.startswith("k8s/clusters/homelab/cluster.yaml: ")]
    assert any(x.startswith("k8s/clusters/homelab/cluster.yaml: cluster.name: ") and "cluster name" in x for x in found)
    assert any(x.startswith("k8s/clusters/homelab/cluster.yaml: vms[0].ip: ") and "scope id" in x for x in found)
    assert any(x.startswith("k8s/clusters/homelab/cluster.yaml: proxmox.endpoint: ") for x in found)


def test_patch_through_a_symlink_out_of_the_tree_is_refused(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text("machine: {}\n")
    link = tree / "clusters/m720q/talos/patches/evil.yaml"
    link.symlink_to(outside)
    edit_yaml(tree / TALCONFIG, lambda d: d[0]["nodes"][0].update(patches=["@./patches/evil.yaml"]))
    assert any(x.startswith(f"k8s/{TALCONFIG}: nodes[0].patches[0]: patch file ./patches/evil.yaml is outside the tree")
               for x in lines(tree))


def test_commands_shown_to_people_are_shell_quoted() -> None:
    import shlex

    from homelab.upgrade import NodeStep, TalosPlan, rollback_step

    hostile = "fe80::1%$(reboot);id|x`y`"
    assert shlex.split(rollback_step(hostile)) == ["talosctl", "rollback", "--nodes", hostile]
    argv = ("talosctl", "upgrade", "--nodes", hostile, "--image", "a b")
    plan = TalosPlan("m720q", "v2", 600, (NodeStep("n", hostile, True, "v1", "v2", "upgrade", "img", argv),))
    [row] = plan.to_rows()
    assert shlex.split(row["command"]) == list(argv)
