"""The core models accept real users' files and compute what talhelper and Image Factory compute."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from homelab.config import load_talconfig, load_tree
from homelab.problems import ConfigError
from homelab.versions import installer_image, parse_version, schematic_id

REALWORLD = Path(__file__).resolve().parents[3] / "shared" / "realworld" / "talconfig"
K8S = Path(__file__).resolve().parents[2] / "k8s"


def test_stock_schematic_id_matches_image_factory() -> None:
    assert schematic_id({"customization": {}}) == "376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba"


def test_schematic_id_sorts_extensions_like_image_factory() -> None:
    schematic = {"customization": {"systemExtensions": {"officialExtensions": ["siderolabs/intel-ucode", "siderolabs/i915"]}}}
    assert schematic_id(schematic) == "4b3cd373a192c8469e859b7a0cfbed3ecc3577c4a2d346a37b0aeff9cd17cdb0"


def test_installer_image_prefers_talos_image_url() -> None:
    assert installer_image("v1.11.5", {"customization": {}}, "ghcr.io/me/installer") == "ghcr.io/me/installer:v1.11.5"
    assert installer_image("v1.11.5") == "ghcr.io/siderolabs/installer:v1.11.5"


@pytest.mark.parametrize("text", ["latest", "1.11", "v1.x.5", "", None, 11])
def test_parse_version_refuses_non_versions(text: object) -> None:
    with pytest.raises(ValueError):
        parse_version(text)


def test_versions_compare_as_semver() -> None:
    assert parse_version("v1.11.5") > parse_version("v1.9.12")


def test_real_world_samples_are_present_in_ci() -> None:
    """The samples sit beside the checkout (../shared); in CI the tests below must not vanish."""
    if os.environ.get("CI") == "true":
        assert sorted(REALWORLD.glob("*talconfig.yaml")), f"no real-world talconfig samples in {REALWORLD}"


@pytest.mark.skipif(not REALWORLD.is_dir(), reason="real-world samples are beside the checkout")
@pytest.mark.parametrize("name", sorted(p.name for p in REALWORLD.glob("*talconfig.yaml")) if REALWORLD.is_dir() else [])
def test_real_users_talconfig_files_load(tmp_path: Path, name: str) -> None:
    owner = name.split("__talconfig")[0]
    shutil.copy(REALWORLD / name, tmp_path / "talconfig.yaml")
    env = REALWORLD / f"{owner}__talenv.yaml"
    if env.exists():
        shutil.copy(env, tmp_path / "talenv.yaml")
    cfg = load_talconfig(tmp_path / "talconfig.yaml")
    assert cfg.nodes and all(n.ip for n in cfg.nodes)
    assert parse_version(cfg.talos_version)


def test_placeholder_versions_without_talenv_are_reported(tmp_path: Path) -> None:
    (tmp_path / "talconfig.yaml").write_text(
        "clusterName: c\ntalosVersion: ${talosVersion}\nkubernetesVersion: v1.32.0\nendpoint: https://10.0.0.1:6443\n"
        "nodes:\n  - hostname: a\n    ipAddress: 10.0.0.2\n    controlPlane: true\n    installDisk: /dev/sda\n")
    with pytest.raises(ConfigError) as err:
        load_talconfig(tmp_path / "talconfig.yaml", "t.yaml")
    assert [str(p) for p in err.value.problems] == ["t.yaml: talosVersion: '${talosVersion}' is not a version like v1.11.5"]


def test_bundled_tree_models() -> None:
    tree = load_tree(K8S)
    m720q = tree.cluster("m720q")
    assert m720q.talconfig is not None
    assert [n.hostname for n in m720q.talconfig.ordered_nodes()] == ["m720q-1", "m720q-2", "m720q-3"]
    assert [n.ip for n in m720q.talconfig.nodes] == ["10.42.0.101", "10.42.0.102", "10.42.0.103"]
    waves = [[k.name for k in wave] for wave in m720q.flux.order()]
    flat = [n for w in waves for n in w]
    assert flat.index("sources") < flat.index("infrastructure-core") < flat.index("rook-ceph-operator")
    assert flat.index("rook-ceph-operator") < flat.index("rook-ceph-cluster") < flat.index("smokeping")
    homelab = tree.cluster("homelab")
    assert homelab.proxmox is not None and homelab.proxmox.control_planes()
    with pytest.raises(ConfigError):
        tree.cluster("nope")


# --- the one YAML loader of tree files (homelab.safeyaml) ---------------------------------------------------


def laughs(levels: int, fanout: int = 10) -> str:
    """A "billion laughs" document: each level an anchored list of `fanout` aliases of the one below."""
    out = [f"l0: &l0 [{', '.join(['lol'] * fanout)}]"]
    out += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return "\n".join(out) + "\n"


def test_alias_expansion_is_bounded_by_go_yamls_rule() -> None:
    from homelab.safeyaml import YamlRefused, allowed_alias_ratio, load_all

    assert load_all(laughs(2))  # ~100 alias-driven nodes: under go-yaml's floor of 100 aliases + 1,000 nodes
    with pytest.raises(YamlRefused, match="aliases expand the document too much"):
        load_all(laughs(4))  # 11,110 of 11,130 decoded nodes from aliases: over 99%
    assert allowed_alias_ratio(400_000) == 0.99 and allowed_alias_ratio(4_000_000) == 0.10
    assert 0.10 < allowed_alias_ratio(2_200_000) < 0.99


def test_billion_laughs_is_refused_after_a_few_thousand_nodes() -> None:
    import time

    from homelab.safeyaml import YamlRefused, load_all

    started = time.monotonic()
    with pytest.raises(YamlRefused) as refused:
        load_all(laughs(9))
    assert time.monotonic() - started < 1
    assert "of the first" in refused.value.message


def test_merge_keys_may_override_and_are_no_duplicates() -> None:
    from homelab.safeyaml import YamlRefused, load_all

    assert load_all("base: &b {x: 1, y: 2}\nnode:\n  <<: *b\n  x: 3\n") == [{"base": {"x": 1, "y": 2},
                                                                              "node": {"x": 3, "y": 2}}]
    with pytest.raises(YamlRefused, match="duplicate key"):
        load_all("a: 1\n'a': 2\n")  # go-yaml compares the key's text: quoted or not, one key


def test_later_documents_name_their_index() -> None:
    from homelab.safeyaml import YamlRefused, load_all

    with pytest.raises(YamlRefused) as refused:
        load_all("a: 1\n---\nb: {c: 1, c: 2}\n")
    assert refused.value.field == "[1].b.c"


def test_git_push_counts_a_refused_kustomization_as_applying_its_whole_directory() -> None:
    from homelab import git_push as gp

    cov = gp.coverage("apps/x", {"apps/x": laughs(9)}, ["apps/x/kustomization.yaml", "apps/x/a.yaml"])
    assert cov.covers("apps/x/a.yaml") and cov.dirs == {"apps/x"}
