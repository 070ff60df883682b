"""Reading talosctl v1.11 output (real samples) and running talosctl as an argv with a deadline."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from homelab.gates import talos_version_of_os_image
from tasks.talos import (
    TalosCommandError,
    Talosctl,
    TalosOutputError,
    TalosTimeout,
    TalosUnavailable,
    config_diff_changed,
    parse_etcd_members,
    parse_etcd_status,
    parse_machinestatus,
    parse_table,
    parse_version_output,
)

REAL = Path(__file__).resolve().parents[3] / "shared" / "realworld" / "talos"
# The samples sit beside the checkout (../shared); CI has them, so there a missing sample fails.
needs_real = pytest.mark.skipif(not REAL.is_dir() and os.environ.get("CI") != "true",
                                reason="realworld samples not present")


# --- version ----------------------------------------------------------------------------------


def proto_line(host: str | None, tag: str) -> str:
    msg = {"version": {"tag": tag, "sha": "abc", "built": "", "goVersion": "go1.24", "os": "linux", "arch": "amd64"},
           "platform": {"name": "metal", "mode": "metal"}, "features": {"rbac": True}}
    if host:
        msg = {"metadata": {"hostname": host}, **msg}
    return json.dumps(msg, separators=(",", ":"))


def test_version_json_maps_each_node_to_its_server_tag():
    text = proto_line("10.42.0.101", "v1.11.5") + "\n" + proto_line("10.42.0.102", "v1.11.4") + "\n"
    assert parse_version_output(text, ["10.42.0.101", "10.42.0.102"]) == {"10.42.0.101": "v1.11.5",
                                                                          "10.42.0.102": "v1.11.4"}


def test_version_json_without_metadata_belongs_to_the_only_node_asked():
    assert parse_version_output(proto_line(None, "v1.11.5"), ["10.42.0.101"]) == {"10.42.0.101": "v1.11.5"}
    with pytest.raises(TalosOutputError, match="without a node name"):
        parse_version_output(proto_line(None, "v1.11.5"), ["a", "b"])


@needs_real
def test_version_text_form_ignores_the_client_section():
    text = (REAL / "siderolabs__talos__docs-v1.11-version.txt").read_text()
    assert parse_version_output(text, ["172.20.0.2"]) == {"172.20.0.2": "<talos version>"}


def test_version_text_form_with_real_tags():
    text = ("Client:\n    Tag:         v1.11.6\n    SHA:         x\nServer:\n    NODE:        10.42.0.101\n"
            "    Tag:         v1.11.5\n    SHA:         y\nServer:\n    NODE:        10.42.0.102\n    Tag:         v1.11.4\n")
    assert parse_version_output(text) == {"10.42.0.101": "v1.11.5", "10.42.0.102": "v1.11.4"}


def test_version_reader_refuses_a_line_that_is_not_json():
    with pytest.raises(TalosOutputError, match="not JSON"):
        parse_version_output('{"metadata": ', ["a"])


# --- tables -----------------------------------------------------------------------------------


@needs_real
def test_etcd_status_with_node_column_and_empty_errors():
    rows = parse_etcd_status((REAL / "siderolabs__talos__docs-v1.11-etcd-status-3nodes.txt").read_text())
    assert [r.node for r in rows] == ["172.20.0.3", "172.20.0.2", "172.20.0.4"]
    first = rows[0]
    assert first.member == "ecebb05b59a776f1" and first.db_size == "21 MB" and first.in_use == "6.0 MB (29.08%)"
    assert first.leader == "ecebb05b59a776f1" and first.raft_index == 53391 and first.raft_term == 4
    assert first.raft_applied_index == 53391 and first.learner is False
    assert all(r.errors == "" for r in rows) and first.protocol is None


@needs_real
def test_etcd_status_with_protocol_and_storage_columns():
    rows = parse_etcd_status((REAL / "siderolabs__talos__docs-v1.11-etcd-status-protocol-storage.txt").read_text())
    assert len(rows) == 3
    assert rows[0].protocol == "3.6.4" and rows[0].storage == "3.6.0" and rows[0].errors == ""
    assert {r.leader for r in rows} == {"a49c021e76e707db"}


def test_etcd_status_without_node_column_and_with_errors():
    text = ("MEMBER             DB SIZE   IN USE            LEADER             RAFT INDEX   RAFT TERM   "
            "RAFT APPLIED INDEX   LEARNER   ERRORS\n"
            "a49c021e76e707db   17 MB     4.5 MB (26.10%)   ecebb05b59a776f1   53391        4           "
            "53391                false     etcdserver: mvcc: database space exceeded, alarm:NOSPACE\n")
    (row,) = parse_etcd_status(text)
    assert row.node is None and row.member == "a49c021e76e707db"
    assert row.errors == "etcdserver: mvcc: database space exceeded, alarm:NOSPACE"


def test_etcd_members_with_and_without_node_column():
    with_node = ("NODE          ID                 HOSTNAME   PEER URLS                  CLIENT URLS                LEARNER\n"
                 "10.42.0.101   2e6b0ee5e4a0cd3c   m720q-1    https://10.42.0.101:2380   https://10.42.0.101:2379   false\n"
                 "10.42.0.101   9f0c4a2c1bb1f71a   m720q-2    https://10.42.0.102:2380   https://10.42.0.102:2379   true\n")
    members = parse_etcd_members(with_node)
    assert [(m.node, m.id, m.hostname, m.learner) for m in members] == [
        ("10.42.0.101", "2e6b0ee5e4a0cd3c", "m720q-1", False), ("10.42.0.101", "9f0c4a2c1bb1f71a", "m720q-2", True)]
    assert members[0].peer_urls == ("https://10.42.0.101:2380",)
    without = ("ID                 HOSTNAME   PEER URLS                                          CLIENT URLS                LEARNER\n"
               "2e6b0ee5e4a0cd3c   m720q-1    https://10.42.0.101:2380,https://[fd00::1]:2380   https://10.42.0.101:2379   false\n")
    (m,) = parse_etcd_members(without)
    assert m.node is None and m.peer_urls == ("https://10.42.0.101:2380", "https://[fd00::1]:2380")


@needs_real
def test_table_reader_reads_other_real_tables():
    rows = parse_table((REAL / "siderolabs__talos__docs-v1.11-get-members-with-node-column.txt").read_text())
    assert rows[1]["MACHINE TYPE"] == "worker" and rows[1]["OS"] == "Talos (v1.2.3)"
    assert rows[1]["ADDRESSES"] == '["10.5.0.3"]'


def test_table_reader_falls_back_to_wide_gaps_when_rows_are_not_aligned():
    rows = parse_table("NODE   MEMBER   ERRORS\n10.0.0.1  abc  \n")
    assert rows == [{"NODE": "10.0.0.1", "MEMBER": "abc", "ERRORS": ""}]


def test_etcd_status_reader_refuses_another_table():
    with pytest.raises(TalosOutputError, match="no MEMBER column"):
        parse_etcd_status("NODE   ID\n1.2.3.4   x\n")


# --- resources --------------------------------------------------------------------------------


def test_machinestatus_reads_a_stream_of_indented_objects():
    objs = [{"node": "10.42.0.101", "metadata": {"namespace": "runtime", "type": "MachineStatuses.runtime.talos.dev",
                                                 "id": "machine", "version": 5},
             "spec": {"stage": "running", "status": {"ready": True, "unmetConditions": []}}},
            {"node": "10.42.0.102", "metadata": {"id": "machine"},
             "spec": {"stage": "booting", "status": {"ready": False, "unmetConditions": [
                 {"name": "nodeReady", "reason": "node not ready"}]}}}]
    text = "".join(json.dumps(o, indent=4) + "\n" for o in objs)
    first, second = parse_machinestatus(text)
    assert (first.node, first.stage, first.ready) == ("10.42.0.101", "running", True)
    assert second.unmet_conditions == ("nodeReady: node not ready",) and not second.ready
    assert "stage booting, not ready" in second.describe()


def test_machinestatus_reader_refuses_truncated_stream():
    with pytest.raises(TalosOutputError, match="not a JSON object stream"):
        parse_machinestatus('{"node": "x", "spec": {')


def test_apply_config_dry_run_output():
    assert config_diff_changed("Dry run summary:\nConfig diff:\n\n--- a\n+++ b\n") is True
    assert config_diff_changed("Dry run summary:\nNo changes.\n") is False
    with pytest.raises(TalosOutputError):
        config_diff_changed("something else")


@pytest.mark.parametrize(("image", "version"), [
    ("Talos (v1.11.5)", "v1.11.5"), ("Talos (v1.12.0-alpha.1)", "v1.12.0-alpha.1"), ("Ubuntu 24.04", None), ("", None)])
def test_os_image_reports_talos_version(image, version):
    assert talos_version_of_os_image(image) == version


# --- running talosctl -------------------------------------------------------------------------

FAKE = """#!{python}
import json, os, sys, time
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
sys.stdout.write(os.environ.get("FAKE_OUT", ""))
sys.stderr.write(os.environ.get("FAKE_ERR", ""))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


@pytest.fixture
def fake(tmp_path):
    exe = tmp_path / "talosctl"
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "argv.log"

    def make(out: str = "", err: str = "", rc: int = 0, sleep: float = 0) -> Talosctl:
        env = {"FAKE_LOG": str(log), "FAKE_OUT": out, "FAKE_ERR": err, "FAKE_RC": str(rc), "FAKE_SLEEP": str(sleep)}
        return Talosctl(str(exe), tmp_path / "talosconfig", "m720q", env)

    def calls() -> list[list[str]]:
        return [json.loads(ln) for ln in log.read_text().splitlines()]

    make.calls = calls  # type: ignore[attr-defined]
    return make


def test_upgrade_runs_planned_argv_with_global_flags(fake, tmp_path):
    t = fake()
    t.upgrade("10.42.0.102", "factory.talos.dev/installer/x:v1.11.5", 600)
    assert fake.calls() == [["--talosconfig", str(tmp_path / "talosconfig"), "--context", "m720q", "upgrade",
                             "--nodes", "10.42.0.102", "--image", "factory.talos.dev/installer/x:v1.11.5",
                             "--wait", "--timeout", "600s"]]


def test_upgrade_timeout_is_cut_to_the_deadline(fake):
    fake().upgrade("10.42.0.102", "img:v1", 1800, deadline=time.monotonic() + 120)
    timeout = fake.calls()[0][-1]
    assert timeout in ("119s", "120s")


def test_version_parses_server_tags(fake):
    t = fake(out=proto_line("10.42.0.101", "v1.11.5") + "\n")
    assert t.version(["10.42.0.101"]) == {"10.42.0.101": "v1.11.5"}
    assert fake.calls()[0][-4:] == ["version", "--nodes", "10.42.0.101", "--json"]


def test_version_of_one_node_is_keyed_by_its_address_even_when_reply_names_hostname(fake):
    t = fake(out=proto_line("m720q-1", "v1.11.4") + "\n")
    assert t.version(["10.42.0.101"]) == {"10.42.0.101": "v1.11.4"}


def test_connection_refused_while_rebooting_is_retryable_and_shows_last_stderr_line(fake):
    err = ("error getting version: 1 error occurred:\n\t* 10.42.0.102: rpc error: code = Unavailable desc = "
           "connection error: desc = \"transport: Error while dialing: dial tcp 10.42.0.102:50000: connect: "
           "connection refused\"\n\n")
    with pytest.raises(TalosUnavailable) as e:
        fake(err=err, rc=1).version(["10.42.0.102"])
    assert e.value.retryable and "connection refused" in str(e.value) and e.value.returncode == 1
    assert "talosconfig" not in str(e.value)


def test_refusal_is_not_retryable(fake):
    with pytest.raises(TalosCommandError) as e:
        fake(err="error: rpc error: code = FailedPrecondition desc = etcd member is unhealthy\n", rc=1).upgrade(
            "10.42.0.101", "img:v1", 60)
    assert not e.value.retryable and "etcd member is unhealthy" in str(e.value)


def test_subprocess_is_killed_at_the_deadline(fake):
    start = time.monotonic()
    with pytest.raises(TalosTimeout) as e:
        fake(sleep=5).etcd_status(["10.42.0.101"], deadline=time.monotonic() + 0.3)
    assert time.monotonic() - start < 3 and e.value.retryable


def test_no_call_when_the_deadline_has_passed(fake, tmp_path):
    with pytest.raises(TalosTimeout, match="deadline has passed"):
        fake().bootstrap("10.42.0.101", deadline=time.monotonic() - 1)
    assert not (tmp_path / "argv.log").exists()


def test_missing_executable_is_a_command_error(tmp_path):
    with pytest.raises(TalosCommandError, match="not found"):
        Talosctl(str(tmp_path / "nope")).bootstrap("10.42.0.101")


def test_etcd_snapshot_fails_when_no_file_appears(fake, tmp_path):
    with pytest.raises(TalosCommandError, match="missing or empty"):
        fake().etcd_snapshot(tmp_path / "snap" / "etcd.db", "10.42.0.101")
    assert fake.calls()[0][-4:] == ["snapshot", str(tmp_path / "snap" / "etcd.db"), "--nodes", "10.42.0.101"]


def test_apply_config_dry_run_reports_no_change(fake, tmp_path):
    res = fake(out="Dry run summary:\nNo changes.\n").apply_config("10.42.0.161", tmp_path / "cp.yaml",
                                                                    insecure=True, dry_run=True)
    assert res.changed is False
    assert fake.calls()[0][4:] == ["apply-config", "--nodes", "10.42.0.161", "--file", str(tmp_path / "cp.yaml"),
                                   "--insecure", "--dry-run"]


def test_health_names_control_planes_workers_and_wait(fake):
    fake().health(["10.42.0.101", "10.42.0.102"], ["10.42.0.111"], wait_timeout_s=90)
    assert fake.calls()[0][4:] == ["health", "--nodes", "10.42.0.101", "--control-plane-nodes",
                                   "10.42.0.101,10.42.0.102", "--worker-nodes", "10.42.0.111", "--wait-timeout", "90s"]


def test_environment_of_the_block_reaches_talosctl_only(fake):
    t = fake()
    assert "FAKE_LOG" not in os.environ
    t.bootstrap("10.42.0.101")
    assert fake.calls()[0][-3:] == ["bootstrap", "--nodes", "10.42.0.101"]
