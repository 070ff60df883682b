"""`talosctl gen secrets` / `gen config` of the twin: v1.11 files, flags, refusals and patches."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from twin.talos_gen import (
    GenOptions,
    apply_patches,
    dump_go_yaml,
    load_patch,
    machine_config,
    new_secrets_bundle,
    render_config,
    run_gen,
)

ENDPOINT = "https://10.42.0.161:6443"
INSTALLER = "factory.talos.dev/installer/376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba:v1.11.5"


@pytest.fixture(scope="module")
def secrets_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("secrets")
    out, err, code = run_gen(["gen", "secrets", "--output-file", "secrets.yaml"], str(d))
    assert (out, err, code) == ("", "", 0)
    return (d / "secrets.yaml").read_text()


@pytest.fixture
def lab(tmp_path: Path, secrets_text: str) -> Path:
    (tmp_path / "secrets.yaml").write_text(secrets_text)
    return tmp_path


def gen_config(cwd: Path, *extra: str, name: str = "homelab", endpoint: str = ENDPOINT) -> tuple[str, str, int]:
    return run_gen(["gen", "config", name, endpoint, "--kubernetes-version", "1.32.0", "--talos-version", "v1.11",
                    "--install-image", INSTALLER, "--install-disk", "/dev/sda", "--output", "out",
                    "--output-types", "controlplane,worker,talosconfig", "--with-secrets", "secrets.yaml", *extra],
                   str(cwd))


def load(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1
    return dict(docs[0])


def write(path: Path, doc: Any) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return f"@{path.name}"


# --- gen secrets -------------------------------------------------------------------------------


def test_gen_secrets_writes_the_bundle_layout_private_to_the_owner(lab: Path, secrets_text: str) -> None:
    bundle = yaml.safe_load(secrets_text)
    assert list(bundle) == ["cluster", "secrets", "trustdinfo", "certs"]
    assert list(bundle["certs"]) == ["etcd", "k8s", "k8saggregator", "k8sserviceaccount", "os"]
    assert len(base64.urlsafe_b64decode(bundle["cluster"]["id"])) == 32
    token = bundle["secrets"]["bootstraptoken"]
    assert len(token) == 23 and token[6] == "." and token.islower()
    os_ca = x509.load_pem_x509_certificate(base64.b64decode(bundle["certs"]["os"]["crt"]))
    assert os_ca.subject.rfc4514_string() == "O=talos"
    assert os_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert base64.b64decode(bundle["certs"]["os"]["key"]).startswith(b"-----BEGIN ED25519 PRIVATE KEY-----")
    assert base64.b64decode(bundle["certs"]["etcd"]["key"]).startswith(b"-----BEGIN EC PRIVATE KEY-----")
    # go-yaml layout: four-space indentation
    assert "\n    id: " in secrets_text
    out, err, code = run_gen(["gen", "secrets", "-o", "fresh.yaml"], str(lab))
    assert code == 0, err
    assert stat.S_IMODE(os.stat(lab / "fresh.yaml").st_mode) == 0o600
    assert yaml.safe_load((lab / "fresh.yaml").read_text())["cluster"]["id"] != bundle["cluster"]["id"]


def test_gen_secrets_refuses_an_existing_file_unless_forced(lab: Path, secrets_text: str) -> None:
    out, err, code = run_gen(["gen", "secrets", "--output-file", "secrets.yaml"], str(lab))
    assert (out, code) == ("", 1)
    assert err == 'file "secrets.yaml" already exists, use --force to overwrite\n'
    assert (lab / "secrets.yaml").read_text() == secrets_text
    out, err, code = run_gen(["gen", "secrets", "--output-file", "secrets.yaml", "--force"], str(lab))
    assert code == 0, err
    assert (lab / "secrets.yaml").read_text() != secrets_text


def test_gen_secrets_to_stdout_writes_no_file(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "secrets", "-o", "-"], str(tmp_path))
    assert code == 0, err
    assert yaml.safe_load(out)["trustdinfo"]["token"]
    assert list(tmp_path.iterdir()) == []


# --- gen config: the files ---------------------------------------------------------------------


def test_gen_config_writes_the_three_files_the_flow_reads(lab: Path) -> None:
    out, err, code = gen_config(lab)
    assert code == 0, err
    assert out == "generating PKI and tokens\n"
    assert err == "Created out/controlplane.yaml\nCreated out/worker.yaml\nCreated out/talosconfig\n"
    for role in ("controlplane", "worker"):
        doc = load(lab / "out" / f"{role}.yaml")
        assert doc["version"] == "v1alpha1"
        assert doc["machine"]["type"] == role
        assert doc["machine"]["install"] == {"disk": "/dev/sda", "image": INSTALLER, "wipe": False}
        assert doc["machine"]["kubelet"]["image"] == "ghcr.io/siderolabs/kubelet:v1.32.0"
        assert doc["cluster"]["clusterName"] == "homelab"
        assert doc["cluster"]["controlPlane"] == {"endpoint": ENDPOINT}
    cp = load(lab / "out" / "controlplane.yaml")
    assert cp["cluster"]["apiServer"]["image"] == "registry.k8s.io/kube-apiserver:v1.32.0"
    assert cp["cluster"]["apiServer"]["certSANs"] == ["10.42.0.161"]
    cfg = yaml.safe_load((lab / "out" / "talosconfig").read_text())
    assert cfg["context"] == "homelab"
    assert set(cfg["contexts"]["homelab"]) == {"endpoints", "ca", "crt", "key"}
    assert cfg["contexts"]["homelab"]["endpoints"] == []
    assert stat.S_IMODE(os.stat(lab / "out" / "worker.yaml").st_mode) == 0o644


def test_generated_configs_carry_the_bundle_and_workers_get_no_ca_keys(lab: Path, secrets_text: str) -> None:
    bundle = yaml.safe_load(secrets_text)
    assert gen_config(lab)[2] == 0
    cp, worker = load(lab / "out/controlplane.yaml"), load(lab / "out/worker.yaml")
    assert cp["machine"]["ca"] == bundle["certs"]["os"]
    assert cp["machine"]["token"] == worker["machine"]["token"] == bundle["trustdinfo"]["token"]
    assert cp["cluster"]["id"] == worker["cluster"]["id"] == bundle["cluster"]["id"]
    assert cp["cluster"]["token"] == bundle["secrets"]["bootstraptoken"]
    assert cp["cluster"]["etcd"]["ca"] == bundle["certs"]["etcd"]
    assert worker["machine"]["ca"] == {"crt": bundle["certs"]["os"]["crt"], "key": ""}
    assert worker["cluster"]["ca"] == {"crt": bundle["certs"]["k8s"]["crt"], "key": ""}
    for secret_part in ("aggregatorCA", "serviceAccount", "etcd", "secretboxEncryptionSecret"):
        assert secret_part not in worker["cluster"]


def test_talosconfig_admin_certificate_is_signed_by_the_bundles_os_ca(lab: Path, secrets_text: str) -> None:
    assert gen_config(lab)[2] == 0
    ctx = yaml.safe_load((lab / "out/talosconfig").read_text())["contexts"]["homelab"]
    bundle = yaml.safe_load(secrets_text)
    assert ctx["ca"] == bundle["certs"]["os"]["crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(ctx["ca"]))
    crt = x509.load_pem_x509_certificate(base64.b64decode(ctx["crt"]))
    assert crt.subject.rfc4514_string() == "O=os:admin"
    ca.public_key().verify(crt.signature, crt.tbs_certificate_bytes)  # type: ignore[call-arg,union-attr]
    assert base64.b64decode(ctx["key"]).startswith(b"-----BEGIN ED25519 PRIVATE KEY-----")


def test_same_secrets_and_arguments_give_byte_identical_files(lab: Path) -> None:
    assert gen_config(lab)[2] == 0
    first = {p.name: p.read_bytes() for p in (lab / "out").iterdir()}
    assert gen_config(lab, "--force")[2] == 0
    assert {p.name: p.read_bytes() for p in (lab / "out").iterdir()} == first


def test_without_secrets_each_run_is_a_new_cluster_identity(tmp_path: Path) -> None:
    ids = []
    for d in ("a", "b"):
        out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "-o", d], str(tmp_path))
        assert code == 0, err
        ids.append(load(tmp_path / d / "worker.yaml")["cluster"]["id"])
    assert ids[0] != ids[1]


def test_gen_config_refuses_to_overwrite_without_force(lab: Path) -> None:
    assert gen_config(lab)[2] == 0
    before = (lab / "out/controlplane.yaml").read_bytes()
    out, err, code = run_gen(["gen", "config", "other", ENDPOINT, "-o", "out", "--with-secrets", "secrets.yaml"],
                             str(lab))
    assert code == 1
    assert err == 'file "out/controlplane.yaml" already exists, use --force to overwrite\n'
    assert (lab / "out/controlplane.yaml").read_bytes() == before


def test_default_output_is_the_working_directory_with_absolute_paths(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT], str(tmp_path))
    assert code == 0, err
    assert err.splitlines() == [f"Created {tmp_path / n}" for n in ("controlplane.yaml", "worker.yaml", "talosconfig")]


def test_one_output_type_makes_output_a_file_path_or_stdout(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "-t", "worker", "-o", "w.yaml"], str(tmp_path))
    assert code == 0, err
    assert load(tmp_path / "w.yaml")["machine"]["type"] == "worker"
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "-t", "talosconfig", "-o", "-"], str(tmp_path))
    assert code == 0, err
    assert yaml.safe_load(out.removeprefix("generating PKI and tokens\n"))["context"] == "c"
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "-o", "-"], str(tmp_path))
    assert (code, err) == (1, "can't use multiple output types with stdout\n")


def test_global_flags_anywhere_are_ignored(lab: Path) -> None:
    argv = ["--talosconfig", "/nonexistent/talosconfig", "--context", "m720q", "gen", "config", "homelab",
            ENDPOINT, "-o", "out", "--with-secrets", "secrets.yaml", "-n", "10.42.0.161"]
    out, err, code = run_gen(argv, str(lab))
    assert code == 0, err
    assert (lab / "out/talosconfig").is_file()


def test_with_docs_and_examples_only_add_comments(lab: Path) -> None:
    assert gen_config(lab)[2] == 0
    assert gen_config(lab, "--with-docs=false", "--with-examples=false", "-o", "plain")[2] == 0
    documented = (lab / "out/controlplane.yaml").read_text()
    plain = (lab / "plain/controlplane.yaml").read_text()
    assert "# Indicates the schema used to decode the contents." in documented
    assert "# # Uncomment this to enable SANs." in documented
    assert "#" not in plain
    assert yaml.safe_load(documented) == yaml.safe_load(plain)


def test_generated_config_is_what_the_twins_apply_config_reads(lab: Path) -> None:
    from twin.talos import _machine_facts

    assert gen_config(lab)[2] == 0
    facts = _machine_facts((lab / "out/worker.yaml").read_text())
    assert facts == {"type": "worker", "image": INSTALLER, "disk": "/dev/sda", "kubelet": "ghcr.io/siderolabs/kubelet:v1.32.0"}


# --- gen config: patches -----------------------------------------------------------------------


def test_config_patch_files_land_in_both_roles_and_role_patches_in_one(lab: Path) -> None:
    common = write(lab / "cluster.yaml", {"machine": {"features": {"kubePrism": {"enabled": True, "port": 7445}}},
                                          "cluster": {"proxy": {"disabled": True}}})
    cp_only = write(lab / "cp.yaml", {"cluster": {"allowSchedulingOnControlPlanes": True}})
    worker_only = write(lab / "w.yaml", {"machine": {"nodeLabels": {"role": "storage"}}})
    out, err, code = gen_config(lab, "--config-patch", common, "--config-patch-control-plane", cp_only,
                                "--config-patch-worker", worker_only)
    assert code == 0, err
    cp, worker = load(lab / "out/controlplane.yaml"), load(lab / "out/worker.yaml")
    assert cp["cluster"]["proxy"] == {"image": "registry.k8s.io/kube-proxy:v1.32.0", "disabled": True}
    assert worker["cluster"]["proxy"] == {"disabled": True}
    assert cp["cluster"]["allowSchedulingOnControlPlanes"] is True
    assert "allowSchedulingOnControlPlanes" not in worker["cluster"]
    assert worker["machine"]["nodeLabels"] == {"role": "storage"}
    assert cp["machine"]["nodeLabels"] == {"node.kubernetes.io/exclude-from-external-load-balancers": ""}


def test_per_vm_patch_sets_hostname_and_static_network(lab: Path) -> None:
    patch = write(lab / "homelab-cp-1.patch.yaml", {"machine": {"network": {
        "hostname": "homelab-cp-1",
        "interfaces": [{"deviceSelector": {"hardwareAddr": "bc:24:11:00:01:61"}, "addresses": ["10.42.0.161/24"],
                        "routes": [{"network": "0.0.0.0/0", "gateway": "10.42.0.1"}], "dhcp": False}],
        "nameservers": ["10.42.0.1"]}}})
    out, err, code = gen_config(lab, "--config-patch", patch)
    assert code == 0, err
    net = load(lab / "out/controlplane.yaml")["machine"]["network"]
    assert net["hostname"] == "homelab-cp-1"
    assert net["interfaces"][0]["addresses"] == ["10.42.0.161/24"]
    assert net["nameservers"] == ["10.42.0.1"]


def test_inline_patches_are_json_or_yaml_and_json6902_lists(lab: Path) -> None:
    out, err, code = gen_config(lab, "--config-patch", '{"machine": {"install": {"wipe": true}}}',
                                "--config-patch", '[{"op": "add", "path": "/machine/install/extraKernelArgs", '
                                                  '"value": ["console=ttyS0"]}]',
                                "--config-patch", "cluster: {network: {podSubnets: [10.1.0.0/16]}}")
    assert code == 0, err
    doc = load(lab / "out/worker.yaml")
    assert doc["machine"]["install"]["wipe"] is True
    assert doc["machine"]["install"]["extraKernelArgs"] == ["console=ttyS0"]
    assert doc["cluster"]["network"]["podSubnets"] == ["10.1.0.0/16"]  # merge:"replace", not appended


def test_strategic_merge_appends_lists_merges_devices_and_deletes() -> None:
    base = machine_config("worker", GenOptions("c", ENDPOINT, additional_sans=["a.example"]), new_secrets_bundle())
    nic = {"deviceSelector": {"hardwareAddr": "bc:24:11:00:01:71"}, "addresses": ["10.42.0.171/24"]}
    patches = [load_patch(json.dumps({"machine": {"certSANs": ["b.example"], "network": {"interfaces": [nic]}}})),
               load_patch(json.dumps({"machine": {"network": {"interfaces": [
                   {"deviceSelector": {"hardwareAddr": "bc:24:11:00:01:71"}, "mtu": 9000}]}}})),
               load_patch("cluster:\n  discovery:\n    $patch: delete\n")]
    [doc] = apply_patches([base], patches)
    assert doc["machine"]["certSANs"] == ["a.example", "b.example"]
    assert doc["machine"]["network"]["interfaces"] == [{**nic, "mtu": 9000}]
    assert "discovery" not in doc["cluster"]
    assert "discovery" in base["cluster"]  # the input stays as it was


def test_missing_patch_file_fails_before_writing_anything(lab: Path) -> None:
    out, err, code = gen_config(lab, "--config-patch", "@nope.yaml")
    assert code == 1
    assert err == "error parsing config JSON patch: open nope.yaml: no such file or directory\n"
    assert not (lab / "out").exists()


def test_patch_with_unknown_top_level_key_is_refused(lab: Path) -> None:
    out, err, code = gen_config(lab, "--config-patch", "machnie: {network: {hostname: x}}")
    assert code == 1
    assert err.startswith("error parsing config JSON patch: inline patch: unknown keys found during decoding:\n"
                          "machnie:")


def test_failing_json6902_test_op_says_which_path(lab: Path) -> None:
    out, err, code = gen_config(lab, "--config-patch", '[{"op": "test", "path": "/machine/type", "value": "x"}]')
    assert code == 1
    assert "testing value /machine/type failed" in err


# --- refusals and usage --------------------------------------------------------------------------


def test_endpoint_without_scheme_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "c", "10.42.0.161"], str(tmp_path))
    assert code == 1
    assert err == 'no scheme and port specified for the cluster endpoint URL\ntry: "https://10.42.0.161:6443"\n'
    out, err, code = run_gen(["gen", "config", "c", "http://10.42.0.161:6443"], str(tmp_path))
    assert err.startswith("the control plane endpoint URL should have scheme https://")
    assert list(tmp_path.iterdir()) == []


def test_wrong_argument_count_prints_usage(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "only-a-name"], str(tmp_path))
    assert code == 1
    assert err.startswith("accepts 2 arg(s), received 1\n\nUsage:\n  talosctl gen config <cluster name> "
                          "<cluster endpoint> [flags]\n")
    assert "--config-patch stringArray" in err


def test_unknown_flag_and_bad_bool_are_usage_errors(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "--with-sekrets", "s.yaml"], str(tmp_path))
    assert (code, err.splitlines()[0]) == (1, "unknown flag: --with-sekrets")
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "--with-docs=nope"], str(tmp_path))
    assert err.splitlines()[0] == ('invalid argument "nope" for "--with-docs" flag: strconv.ParseBool: parsing '
                                   '"nope": invalid syntax')


def test_missing_secrets_file_and_bad_talos_version_are_reported(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "--with-secrets", "s.yaml"], str(tmp_path))
    assert (code, err) == (1, "failed to load secrets bundle: open s.yaml: no such file or directory\n")
    (tmp_path / "s.yaml").write_text("cluster: {id: x}\n")
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "--with-secrets", "s.yaml"], str(tmp_path))
    assert code == 1 and err.startswith("failed to validate secrets bundle: missing cluster.secret")
    out, err, code = run_gen(["gen", "config", "c", ENDPOINT, "--talos-version", "latest"], str(tmp_path))
    assert (code, err) == (1, 'invalid talos-version: error parsing version "latest"\n')


def test_help_of_gen_config_exits_zero(tmp_path: Path) -> None:
    out, err, code = run_gen(["gen", "config", "--help"], str(tmp_path))
    assert (code, err) == (0, "")
    assert out.startswith("The cluster endpoint is the URL for the Kubernetes API.")
    assert '--install-image string                     the image used to perform an installation (default ' \
           '"ghcr.io/siderolabs/installer:v1.11.5")' in out


def test_older_talos_contract_leaves_out_newer_features() -> None:
    old = machine_config("worker", GenOptions("c", ENDPOINT, contract=(1, 5)), new_secrets_bundle())
    assert "kubePrism" not in old["machine"]["features"] and "hostDNS" not in old["machine"]["features"]
    new = machine_config("worker", GenOptions("c", ENDPOINT), new_secrets_bundle())
    assert new["machine"]["features"]["hostDNS"] == {"enabled": True, "forwardKubeDNSToHost": True}


# --- the YAML writer -----------------------------------------------------------------------------


@given(st.text(), st.text())
def test_any_string_key_and_value_reads_back_unchanged(key: str, value: str) -> None:
    doc = {key: value, "l": [value, {"m": value, "n": [value]}]}
    assert yaml.safe_load(dump_go_yaml(doc)) == doc


def test_rendered_machine_config_reads_back_as_the_generated_document() -> None:
    doc = machine_config("controlplane", GenOptions("c", ENDPOINT), new_secrets_bundle())
    text = render_config([doc])
    assert yaml.safe_load(text) == doc
    assert "\n        podSubnets:\n            - 10.244.0.0/16\n" in text
