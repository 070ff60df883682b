"""The talos-upgrade flow's Ceph gates on the simulated homelab shaped like its CephCluster (3 mons, 2 mgrs),
against a real Prefect server: mon quorum, `mon ok-to-stop`, EAGAIN after a mgr failover, CRUSH names of
dotted hostnames, a node without OSDs, and the noout an interrupted run leaves behind."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homelab import ceph_gate

pytestmark = pytest.mark.usefixtures("prefect_api_url")

REPO = Path(__file__).resolve().parents[2]
FAST = {"node_ready": 3, "etcd": 3, "osds_up": 3, "ceph_clean": 3, "lock": 60, "hook": 10, "upgrade": 30}
KNOBS = {"reboot_seconds": 0.4, "recovery_seconds": 0.2}
M720Q = ["m720q-1", "m720q-2", "m720q-3"]


def upgrade(t: Any, tmp_path: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from flows.talos_upgrade import Deadlines, state_result, talos_upgrade
    from twin.register import homelab_block

    name = f"twin-{uuid.uuid4().hex[:8]}"
    homelab_block(t).save(name, overwrite=True)
    kw.setdefault("require_approval", False)
    kw.setdefault("deadlines", Deadlines(**FAST))
    state = talos_upgrade(homelab=name, snapshot_dir=str(tmp_path / "snapshots"), return_state=True, **kw)
    return state, state_result(state)


def ceph(t: Any, *argv: str) -> tuple[str, str, int]:
    return t.ceph.run(list(argv))


def noout_record(t: Any) -> ceph_gate.NooutOwner | None:
    out, _, code = ceph(t, "config-key", "get", ceph_gate.NOOUT_OWNER_KEY)
    return ceph_gate.parse_noout_owner(out) if code == 0 else None


def noout_set(t: Any) -> bool:
    return "noout" in json.loads(ceph(t, "osd", "dump", "-f", "json")[0])["flags"].split(",")


def asked_ok_to_stop(t: Any) -> list[tuple[tuple[str, ...], int]]:
    return [(argv[2:], code) for argv, code in t.ceph.log if argv[:2] == ("osd", "ok-to-stop")]


def wait(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.02)


def test_mon_down_with_mon_down_muted_refuses_the_node(twin, tmp_path):
    t = twin(**KNOBS)
    t.ceph.mon_down_detect_s = 0.2
    t.ceph.daemon_down("mon.c")
    wait(lambda: "MON_DOWN" in t.ceph.checks(), 2, "MON_DOWN raised")
    assert ceph(t, "health", "mute", "MON_DOWN")[2] == 0
    assert t.ceph.health() == "HEALTH_OK"  # what a health-only gate would see
    # m720q-3 is mon.c's own node: `mon ok-to-stop c` says yes there, the quorum itself says no.
    state, res = upgrade(t, tmp_path, nodes=["m720q-3"])
    assert state.is_failed(), res
    assert "only 2 of 3 mons in quorum (a,b)" in res["error"]
    assert t.record.intervals("m720q") == [] and res["noout"] == "untouched" and not noout_set(t)


def test_mon_ok_to_stop_no_refuses_the_node(twin, tmp_path):
    t = twin(**KNOBS)
    # Two mons left, both in quorum, HEALTH_OK: only `mon ok-to-stop` sees that one more is too many.
    assert ceph(t, "mon", "rm", "c")[2] == 0
    assert t.ceph.health() == "HEALTH_OK"
    state, res = upgrade(t, tmp_path)
    assert state.is_failed(), res
    assert res["error"].startswith("m720q-1: ceph ok-to-stop failed. Last seen: Ceph says stopping mon(s) a would "
                                   "lose the mon quorum: not enough monitors would be available (b) after stopping "
                                   "mons [a]"), res["error"]
    assert t.record.intervals("m720q") == [] and res["noout"] == "untouched"


def test_eagain_after_a_mgr_failover_is_asked_again_and_the_run_completes(twin, tmp_path):
    t = twin(**KNOBS)
    t.ceph.stats_seconds = 1.0  # the new mgr's wait for the OSDs' first reports

    def failover_before_the_second_node() -> None:
        if t.world.wait_for(lambda: t.world.node("m720q-1").talos_version == "v1.11.5", 30):
            t.ceph.fail_mgr_on("osd", "ok-to-stop")

    th = threading.Thread(target=failover_before_the_second_node, daemon=True)
    th.start()
    state, res = upgrade(t, tmp_path)
    th.join(5)
    assert state.is_completed(), res["error"]
    assert [n["action"] for n in res["nodes"]] == ["upgraded"] * 3
    codes = [code for argv, code in asked_ok_to_stop(t) if argv[:1] == ("1",)]
    assert codes[0] == 11 and codes[-1] == 0, codes  # EAGAIN, asked again, then the answer
    assert t.record.max_concurrent("m720q") == 1 and res["noout"] == "unset"


@pytest.fixture
def four_node_tree(tmp_path: Path) -> Path:
    """The k8s tree with m720q-3 named by a dotted hostname and a fourth node, a worker, m720q-4."""
    tree = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", tree)
    tal = tree / "clusters" / "m720q" / "talos" / "talconfig.yaml"
    text = tal.read_text().replace("  - hostname: m720q-3\n", "  - hostname: m720q-3.lan\n")
    worker = """
  - hostname: m720q-4
    ipAddress: 10.42.0.104
    controlPlane: false
    installDisk: /dev/nvme0n1
"""
    text = text.replace("\n# Applied to every node.", worker + "\n# Applied to every node.")
    tal.write_text(text)
    return tree


@pytest.fixture
def four_node_twin(four_node_tree: Path, tmp_path: Path) -> Iterator[Any]:
    from twin import Knobs, Twin

    t = Twin(four_node_tree, tmp_path / "twin", knobs=Knobs(reboot_seconds=0.3, recovery_seconds=0.2,
                                                            flux_delay_seconds=0.05))
    try:
        yield t.start()
    finally:
        t.stop()
    assert not t.stop_leftovers, t.stop_leftovers


def test_dotted_hostname_and_node_without_osds_are_upgraded(four_node_twin, tmp_path):
    t = four_node_twin
    # m720q-4 holds no OSD: its OSD taken out as Rook's docs take one out (stop, purge, drop the host).
    t.ceph.daemon_down("osd.3")
    assert ceph(t, "osd", "purge", "3", "--yes-i-really-mean-it")[2] == 0
    assert ceph(t, "osd", "crush", "rm", "m720q-4")[2] == 0
    wait(t.ceph.clean, 5, "the PGs backfilled onto the other hosts")
    assert ceph(t, "osd", "ls-tree", "m720q-3.lan") == ("", 'Error ENOENT: "m720q-3.lan" does not exist\n', 2)

    state, res = upgrade(t, tmp_path)
    assert state.is_completed(), res["error"]
    assert {n["name"]: n["action"] for n in res["nodes"]} == {
        "m720q-1": "upgraded", "m720q-2": "upgraded", "m720q-3.lan": "upgraded", "m720q-4": "upgraded"}
    asked = [argv[:1] for argv, _ in asked_ok_to_stop(t)]
    assert asked == [("0",), ("1",), ("2",)]  # m720q-3.lan's OSD by its CRUSH name; none for m720q-4
    assert t.record.max_concurrent("m720q") == 1 and res["noout"] == "unset" and not noout_set(t)


def test_rerun_after_an_interrupted_run_continues_past_its_own_noout(twin, tmp_path):
    t = twin(reboot_seconds=1.5, recovery_seconds=0.2)
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    fired = threading.Event()

    def interrupt_while_m720q_2_reboots() -> None:
        # Ctrl-C, as an operator stops `homelab upgrade talos`, while the second node is down.
        if t.world.wait_for(lambda: t.world.node("m720q-2").phase != "running" and noout_set(t), 60):
            fired.set()
            signal.pthread_kill(main, signal.SIGINT)

    # Ctrl-C raises KeyboardInterrupt in a terminal; a handler an earlier test left in this process must not
    # turn it into something else.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    th = threading.Thread(target=interrupt_while_m720q_2_reboots, daemon=True)
    th.start()
    try:
        state, res = upgrade(t, tmp_path)
    except KeyboardInterrupt:  # an interrupt may also end the call itself
        pass
    else:
        assert fired.is_set(), "m720q-2 was never seen rebooting with noout set"
        assert not state.is_completed() and res["noout"] == "left-set", res
    finally:
        signal.signal(signal.SIGINT, previous)
    th.join(5)
    owner = noout_record(t)
    assert noout_set(t) and owner is not None and owner.flow == "talos-upgrade" and owner.cluster == "m720q"
    assert owner.node == "m720q-2"
    wait(lambda: t.world.node("m720q-2").ready, 10, "m720q-2 back from its reboot")

    state, res = upgrade(t, tmp_path)
    assert state.is_completed(), res["error"]
    assert {n["name"]: n["action"] for n in res["nodes"]} == {
        "m720q-1": "skipped", "m720q-2": "skipped", "m720q-3": "upgraded"}
    assert res["noout"] == "unset" and not noout_set(t) and noout_record(t) is None


def test_noout_set_outside_the_flow_refuses_with_that_explanation(twin, tmp_path):
    t = twin(**KNOBS)
    assert ceph(t, "osd", "set", "noout")[2] == 0
    state, res = upgrade(t, tmp_path)
    assert state.is_failed()
    assert "noout is set, but not by talos-upgrade on m720q: nobody recorded setting it" in res["error"]
    assert t.record.intervals("m720q") == [] and noout_set(t)
    # An earlier run's record for another cluster does not make it ours either.
    other = ceph_gate.NooutOwner("talos-upgrade", "some-run", "homelab", "hl-cp-1")
    ceph(t, "config-key", "set", ceph_gate.NOOUT_OWNER_KEY, other.to_json())
    state, res = upgrade(t, tmp_path)
    assert state.is_failed() and "it was set by talos-upgrade run some-run on cluster homelab" in res["error"]
    assert t.record.intervals("m720q") == [] and noout_set(t)
