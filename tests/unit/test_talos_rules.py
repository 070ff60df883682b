"""Talos's own rules as the plan applies them (compatibility table, schematics, Image Factory settings) and
how a failed upgrade is judged: pure functions of data."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from homelab import compat
from homelab.config import TalConfig
from homelab.upgrade import (
    NodeSeen,
    PlanRefused,
    RunningImage,
    UpgradeEnd,
    UpgradeOptions,
    judge_upgrade,
    plan_talos_upgrade,
    upgrade_next_step,
)
from homelab.versions import ImageFactory, factory_schematic_of, image_factory, schematic_id
from tasks.talos import parse_extensions, parse_node_errors

I915 = {"customization": {"systemExtensions": {"officialExtensions": ["siderolabs/i915", "siderolabs/intel-ucode"]}}}
I915_ID = "4b3cd373a192c8469e859b7a0cfbed3ecc3577c4a2d346a37b0aeff9cd17cdb0"
STOCK_ID = "376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba"


def talconfig(version: str = "v1.11.5", schematic: dict | None = None, **extra: object) -> TalConfig:
    nodes = [{"hostname": f"m720q-{i}", "ipAddress": f"10.42.0.10{i}", "controlPlane": True,
              "installDisk": "/dev/nvme0n1", "schematic": schematic or I915} for i in (1, 2, 3)]
    return TalConfig.model_validate({"clusterName": "m720q", "talosVersion": version, "kubernetesVersion": "v1.32.0",
                                     "endpoint": "https://10.42.0.101:6443", "nodes": nodes, **extra})


AT = {"m720q-1": "v1.11.4", "m720q-2": "v1.11.4", "m720q-3": "v1.11.4"}


def test_compat_table_is_talos_v1_11_5s():
    assert compat.upgrade_refusal("v1.9.0", "v1.11.5") is None  # v1.11's installer takes hosts from v1.9.0
    assert "too old to upgrade to Talos 1.11.5" in str(compat.upgrade_refusal("v1.8.4", "v1.11.5"))
    assert "too new to downgrade" in str(compat.upgrade_refusal("v1.13.0", "v1.11.0"))
    assert "not supported" in str(compat.upgrade_refusal("v1.12.0", "v1.13.0"))
    assert compat.kubernetes_refusal("v1.34.9", "v1.11.5") is None
    assert "too new" in str(compat.kubernetes_refusal("v1.35.0", "v1.11.5"))
    assert "too old" in str(compat.kubernetes_refusal("v1.28.3", "v1.11.5"))


def test_plan_refuses_a_target_that_does_not_run_the_clusters_kubernetes_and_a_host_too_old_for_it():
    with pytest.raises(PlanRefused) as e:
        plan_talos_upgrade(talconfig("v1.12.0"), {**AT, "m720q-3": "v1.9.2"}, allow_minor_skip=True,
                           kubernetes={"m720q-1": "v1.29.4", "m720q-2": "v1.29.4", "m720q-3": "v1.29.4"})
    text = str(e.value)
    assert "m720q-3: host version 1.9.2 is too old to upgrade to Talos 1.12.0" in text
    assert "Talos v1.12.0 does not run the cluster's Kubernetes: version of Kubernetes 1.29.4 is too old" in text
    assert "upgrade Kubernetes first" in text


def test_minor_skip_is_this_flows_policy_and_says_how_to_lift_it():
    with pytest.raises(PlanRefused) as e:
        plan_talos_upgrade(talconfig("v1.11.5"), {**AT, "m720q-2": "v1.9.6"})
    assert "not supported by Talos" not in str(e.value) and "allow_minor_skip" in str(e.value)
    plan = plan_talos_upgrade(talconfig("v1.11.5"), {**AT, "m720q-2": "v1.9.6"}, allow_minor_skip=True)
    assert plan.step("m720q-2").action == "upgrade"


def test_a_node_at_the_target_with_another_schematic_is_upgraded_to_the_same_version():
    running = {h: RunningImage(I915_ID, ("i915", "intel-ucode")) for h in AT}
    running["m720q-2"] = RunningImage(STOCK_ID, ())
    plan = plan_talos_upgrade(talconfig(), dict.fromkeys(AT, "v1.11.5"), running=running)
    assert [s.action for s in plan.steps] == ["skip", "upgrade", "skip"]
    step = plan.step("m720q-2")
    assert step.current == step.target == "v1.11.5" and step.schematic == I915_ID
    assert step.reason.startswith("schematic 376567988ad3 -> 4b3cd373a192")
    assert f"installer/{I915_ID}:v1.11.5" in step.argv[step.argv.index("--image") + 1]


def test_an_image_that_drops_a_running_extension_is_refused_unless_allowed():
    running = {h: RunningImage(I915_ID, ("i915", "intel-ucode")) for h in AT}
    fewer = {"customization": {"systemExtensions": {"officialExtensions": ["siderolabs/intel-ucode"]}}}
    with pytest.raises(PlanRefused, match=r"carries no i915, which m720q-1 runs now") as e:
        plan_talos_upgrade(talconfig(schematic=fewer), AT, running=running)
    assert len(e.value.reasons) == 3
    plan = plan_talos_upgrade(talconfig(schematic=fewer), AT, running=running, allow_extension_removal=True)
    assert all(s.action == "upgrade" for s in plan.steps)
    # The stock installer carries no extensions at all.
    with pytest.raises(PlanRefused, match="carries no i915, intel-ucode"):
        plan_talos_upgrade(talconfig(), AT, None, ["m720q-1"], images={"m720q-1": "ghcr.io/siderolabs/installer"},
                           running=running)


def test_options_appear_in_the_planned_argv():
    plan = plan_talos_upgrade(talconfig(), AT, options=UpgradeOptions("powercycle", stage=True, debug=True))
    argv = plan.step("m720q-1").argv
    assert argv[argv.index("--reboot-mode") + 1] == "powercycle" and "--stage" in argv and "--debug" in argv
    with pytest.raises(ValueError, match="reboot mode 'kexec'"):
        UpgradeOptions("kexec")


def test_image_factory_settings_are_talhelpers_and_reach_the_installer_image():
    tal = talconfig(imageFactory={"registryURL": "127.0.0.1:5000", "protocol": "http",
                                  "installerURLTmpl": "{{.RegistryURL}}/{{.Mode}}-installer{{if .Secureboot}}-sb{{end}}"
                                                      "/{{.ID}}:{{.Version}}"})
    assert tal.factory().schematics_url == "http://127.0.0.1:5000/schematics"
    assert tal.installer_for(tal.nodes[0], "v1.11.5") == f"127.0.0.1:5000/metal-installer/{I915_ID}:v1.11.5"
    assert factory_schematic_of(tal.installer_for(tal.nodes[0], "v1.11.5")) == I915_ID
    assert ImageFactory().installer(I915_ID, "v1.11.5") == f"factory.talos.dev/installer/{I915_ID}:v1.11.5"
    assert schematic_id({"customization": {}}) == STOCK_ID
    for bad, words in [({"protocol": "ftp"}, "http or https"), ({"registryURL": "a b/c"}, "registryURL"),
                       ({"schematicEndpoint": "schematics"}, "schematicEndpoint"),
                       ({"installerURLTmpl": "{{ .ID | printf }}"}, "installerURLTmpl"),
                       ({"installerURLTmpl": "{{.RegistryURL}}/x; rm -rf /:{{.Version}}"}, "not an image reference"),
                       ({"registry": "x"}, "unknown field")]:
        with pytest.raises(ValueError, match=words):
            image_factory(bad)


def seen(boot: str = "b1", version: str = "v1.11.4", stage: str = "running", ready: bool | None = True,
         cordoned: bool | None = False, etcd: str | None = "running", reachable: bool = True) -> NodeSeen:
    return NodeSeen(reachable, version, stage, boot, ready, cordoned, etcd)


@pytest.mark.parametrize(("after", "end"), [
    (seen(), UpgradeEnd.REFUSED),
    (seen(stage="rebooting", ready=True, cordoned=True, etcd="stopped"), UpgradeEnd.STUCK),
    (seen(stage="rebooting", ready=None, cordoned=None, etcd="stopped"), UpgradeEnd.STUCK),
    (seen(boot="b2"), UpgradeEnd.FELL_BACK),
    (seen(boot="b2", version="v1.11.5"), UpgradeEnd.FINISHED_LATE),
    (seen(reachable=False), UpgradeEnd.NOT_BACK),
])
def test_a_failed_upgrade_is_judged_by_what_the_node_did(after, end):
    assert judge_upgrade(seen(), after, "v1.11.5") is end


def test_each_ending_has_its_own_next_step_and_rollback_only_where_it_helps():
    stuck = upgrade_next_step(UpgradeEnd.STUCK, "m720q-2", "10.42.0.102", "v1.11.4", "v1.11.5", seen())
    assert "talosctl reboot --nodes 10.42.0.102" in stuck and "rollback" not in stuck
    back = upgrade_next_step(UpgradeEnd.FELL_BACK, "m720q-2", "10.42.0.102", "v1.11.4", "v1.11.5", seen(boot="b2"))
    assert "`talosctl rollback` would boot the image that just failed" in back
    refused = upgrade_next_step(UpgradeEnd.REFUSED, "m720q-2", "10.42.0.102", "v1.11.4", "v1.11.5", seen())
    assert "nothing changed" in refused and "reboot" not in refused and "rollback" not in refused


def test_extensions_and_multi_node_errors_are_read_per_node():
    text = (
        '{"node": "10.42.0.101", "metadata": {"id": "0"}, "spec": {"metadata": {"name": "i915", "version": "1"}}}\n'
        '{"node": "10.42.0.101", "metadata": {"id": "1"}, "spec": {"metadata": {"name": "schematic", '
        f'"version": "{I915_ID}"}}}}}}\n'
        '{"node": "10.42.0.102", "metadata": {"id": "0"}, "spec": {"metadata": {"name": "i915", "version": "1"}}}\n')
    got = parse_extensions(text)
    assert got["10.42.0.101"] == RunningImage(I915_ID, ("i915",))
    assert got["10.42.0.102"] == RunningImage(None, ("i915",)) and "10.42.0.103" not in got
    errs = parse_node_errors("WARNING: 2 errors occurred:\n\t* 10.42.0.102: rpc error: x\n\t* 10.42.0.103: y\n\n")
    assert errs == {"10.42.0.102": "rpc error: x", "10.42.0.103": "y"}


def test_kept_snapshots_are_private_and_only_the_newest_remain(tmp_path: Path):
    from flows.upgrade_steps import keep_snapshot

    folder = tmp_path / "snaps"
    folder.mkdir(mode=0o700)
    for i in range(4):
        p = folder / f"m720q-etcd-2026010{i}T000000Z.db"
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 100 + i, time.time() - 100 + i))
    other = folder / "homelab-etcd-20260101T000000Z.db"
    other.write_bytes(b"x")
    new = folder / "m720q-etcd-20260109T000000Z.db"
    new.write_bytes(b"snapshot")
    removed = keep_snapshot(new, folder, "m720q-etcd-", keep=2)
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["homelab-etcd-20260101T000000Z.db", "m720q-etcd-20260103T000000Z.db", new.name]
    assert len(removed) == 3 and stat.S_IMODE(new.stat().st_mode) == 0o600


def test_in_a_pod_snapshots_must_go_to_a_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from flows import upgrade_steps

    volume = tmp_path / "volume"
    (volume / "snaps").mkdir(parents=True)
    monkeypatch.setattr(upgrade_steps.os.path, "ismount", lambda p: str(p) in ("/", str(volume)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert upgrade_steps.snapshot_dir_problem(tmp_path / "elsewhere") is None  # not in a pod: any directory
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert upgrade_steps.snapshot_dir_problem(volume / "snaps" / "m720q") is None
    problem = upgrade_steps.snapshot_dir_problem(tmp_path / "elsewhere")
    assert problem is not None and "pod's own filesystem" in problem and "HOMELAB_SNAPSHOT_DIR" in problem


def test_the_upgrade_flows_import_neither_typer_nor_the_twin():
    import subprocess
    import sys

    code = ("import sys, flows.talos_upgrade, flows.kubernetes_upgrade, flows.cluster_upgrade; "
            "print(sorted(m for m in sys.modules if m == 'typer' or m == 'twin' or m.startswith('twin.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
