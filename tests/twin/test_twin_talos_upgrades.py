"""The twin's Talos where an upgrade goes wrong or is unusual, as Talos v1.11 does it (docs/twin.md cites the
sources): a fall-back boot, a late finish, --stage, multi-node replies, upgrade-k8s's own checks, the Image
Factory, the API of an endpoint without a VIP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from twin import talos

M1, M2, M3 = "10.42.0.101", "10.42.0.102", "10.42.0.103"
IMAGE = "ghcr.io/siderolabs/installer:v1.11.5"


def tctl(t: Any, *argv: str) -> tuple[str, str, int]:
    return talos.run(t.world, list(argv), {"TALOSCONFIG": str(t.talosconfig)}, t.workdir,
                     kubeconfig_for=t.kubeconfig_text)


def test_falls_back_fault_returns_with_a_new_boot_at_the_old_version_and_talosctl_sees_success(twin):
    t = twin(faults=["upgrade-falls-back=m720q-2"], reboot_seconds=0.2)
    n = t.world.node("m720q-2")
    boot = n.boot_id
    out, err, code = tctl(t, "upgrade", "-n", M2, "--image", IMAGE)
    # The tracker's conditions (machine ready, boot ID changed) hold: talosctl cannot tell.
    assert code == 0, err
    assert n.boot_id != boot and n.talos_version == "v1.11.4"
    # The other boot entry is the image that failed: what `talosctl rollback` would boot.
    assert n.previous_version == "v1.11.5"
    assert not n.unschedulable and not n.talos_cordoned


def test_slow_upgrade_outlives_a_short_timeout_and_finishes_later(twin):
    t = twin(faults=["upgrade-slow=m720q-3"], reboot_seconds=0.2)
    n = t.world.node("m720q-3")
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", IMAGE, "--timeout", "300ms")
    assert code == 1 and "context deadline exceeded" in err
    assert t.world.wait_for(lambda: n.talos_version == "v1.11.5" and n.phase == "running", 5)


def test_stage_reboots_at_once_without_a_drain_and_boots_the_new_version_after_a_second_boot(twin):
    t = twin(reboot_seconds=0.2)
    n = t.world.node("m720q-3")
    boot = n.boot_id
    phases: list[str] = []
    t.world.subscribe(lambda: phases.append(n.phase))
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", IMAGE, "--stage")
    assert code == 0, err
    assert n.talos_version == "v1.11.5" and n.boot_id != boot and n.phase == "running"
    assert "rebooting" in phases and not n.unschedulable


def test_debug_prints_the_console_of_a_failed_node(twin):
    t = twin(faults=["upgrade-fails=m720q-3"], reboot_seconds=0.2)
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", IMAGE, "--debug", "--wait=false")
    assert code == 1  # --debug implies --wait
    assert f'console logs for nodes ["{M3}"]:' in err and "upgrade sequence: failed" in err


def test_an_unknown_reboot_mode_is_talosctls_own_error(twin):
    t = twin()
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", IMAGE, "--reboot-mode", "kexec")
    assert code == 1 and err == "invalid reboot mode: kexec\n"


def test_an_installer_that_refuses_the_host_fails_mid_sequence(twin):
    t = twin(reboot_seconds=0.2)
    n = t.world.node("m720q-3")
    t.world.update(n, talos_version="v1.8.4")
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", "ghcr.io/siderolabs/installer:v1.11.5",
                          "--debug")
    assert code == 1 and 'task "upgrade" failed: exit code 1' in err
    assert "host version 1.8.4 is too old to upgrade to Talos 1.11.5" in err
    assert n.talos_version == "v1.8.4" and n.unschedulable and not n.etcd_running


def test_a_factory_image_of_an_unregistered_schematic_is_refused_before_anything_changes(twin):
    t = twin()
    n = t.world.node("m720q-3")
    image = f"{t.image_factory.registry}/installer/{'ab' * 32}:v1.11.5"
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", image)
    assert code == 1 and f'error validating installer image "{image}"' in err and "not found" in err
    assert n.phase == "running" and not n.unschedulable and n.talos_version == "v1.11.4"


def test_the_image_factory_registers_a_schematic_and_the_upgrade_brings_its_extensions(twin):
    t = twin(reboot_seconds=0.2)
    base = f"http://{t.image_factory.registry}/schematics"
    body = (b"customization:\n  systemExtensions:\n    officialExtensions:\n"
            b"      - siderolabs/i915\n      - siderolabs/iscsi-tools\n")
    with urllib.request.urlopen(urllib.request.Request(base, data=body, method="POST")) as resp:
        assert resp.status == 201
        sid = json.loads(resp.read())["id"]
    with urllib.request.urlopen(f"{base}/{sid}") as resp:
        assert b"siderolabs/iscsi-tools" in resp.read()
    try:
        urllib.request.urlopen(f"{base}/{'cd' * 32}")
        raise AssertionError("an unknown schematic was found")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    try:
        urllib.request.urlopen(urllib.request.Request(base, data=b"custom: {}\n", method="POST"))
        raise AssertionError("a body that is no schematic was taken")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and b"field custom not found" in e.read()
    out, err, code = tctl(t, "upgrade", "-n", M3, "--image", f"{t.image_factory.registry}/installer/{sid}:v1.11.4")
    assert code == 0, err
    out, err, code = tctl(t, "get", "extensions", "-n", M3, "-o", "json")
    names = {o["spec"]["metadata"]["name"]: o["spec"]["metadata"]["version"]
             for o in talos_json_stream(out)}
    assert names["schematic"] == sid and {"i915", "iscsi-tools"} <= set(names)


def talos_json_stream(text: str) -> list[dict[str, Any]]:
    from tasks.talos import iter_json_stream

    return list(iter_json_stream(text))


def test_a_multi_node_reply_prints_who_answered_warns_about_the_rest_and_exits_0(twin):
    t = twin()
    t.world.update(t.world.node("m720q-3"), phase="off")
    out, err, code = tctl(t, "-n", f"{M1},{M2},{M3}", "version", "--json")
    assert code == 0
    assert [json.loads(x)["metadata"]["hostname"] for x in out.splitlines()] == [M1, M2]
    assert err.startswith("WARNING: 1 error occurred:\n\t* 10.42.0.103: ")
    out, err, code = tctl(t, "-n", f"{M1},{M2},{M3}", "etcd", "status")
    assert code == 0 and len(out.splitlines()) == 3 and "WARNING: 1 error occurred" in err
    # Every node failing is a failure.
    out, err, code = tctl(t, "-n", M3, "version", "--json")
    assert code == 1 and out == ""


def test_upgrade_k8s_detects_from_the_control_plane_pods_and_refuses_what_talosctl_refuses(twin):
    t = twin(reboot_seconds=0.2)
    for n in t.world.clusters["m720q"].nodes.values():  # the kubelets ahead of the control plane's pods
        t.world.update(n, kubelet_version="v1.33.1")
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--to", "1.33.1", "--dry-run")
    assert code == 0, err
    assert "automatically detected the lowest Kubernetes version 1.32.0" in out
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--to", "1.34.1", "--dry-run")
    assert code == 1 and err == 'unsupported upgrade path 1.32->1.34 (from "1.32.0" to "1.34.1")\n'
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--from", "1.34.0", "--to", "1.35.0", "--dry-run")
    assert code == 1 and "unsupported upgrade path 1.34->1.35" in err
    t.world.update(t.world.node("m720q-2"), talos_version="v1.8.4")
    out, err, code = tctl(t, "-n", M1, "upgrade-k8s", "--to", "1.33.0", "--dry-run")
    assert code == 1
    assert err == ('compatibility check failed on node "10.42.0.102": version of Kubernetes 1.33.0 is too new to '
                   'be used with Talos 1.8.4\n')


def _availability_during(t: Any, *argv: str) -> tuple[int, set[bool]]:
    """Run talosctl and sample the m720q API server's availability every 20 ms meanwhile."""
    import threading

    server, seen, done = t.kube["m720q"], set(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.add(server.available)
            done.wait(0.02)

    th = threading.Thread(target=sample)
    th.start()
    try:
        _, _, code = tctl(t, *argv)
    finally:
        done.set()
        th.join()
    return code, seen


def test_the_api_answers_only_while_the_endpoint_node_serves_it(twin):
    t = twin(reboot_seconds=0.5)
    # Another control plane rebooting: the endpoint m720q-1 still serves.
    code, seen = _availability_during(t, "upgrade", "-n", M2, "--image", IMAGE)
    assert code == 0 and seen == {True}
    # No VIP: while m720q-1 reboots nothing answers at https://10.42.0.101:6443.
    code, seen = _availability_during(t, "upgrade", "-n", M1, "--image", IMAGE)
    assert code == 0 and False in seen
    assert t.world.wait_for(lambda: t.kube["m720q"].available, 2)
