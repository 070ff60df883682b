"""`homelab validate` on someone else's tree: it warns (exit 0, lines starting `warning:`) about every file
that still carries the example's tailnet name or SOPS age recipient once the tree's repository is not the
example's, and says nothing about the example itself."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from homelab.cli import app
from homelab.ownership import (
    EXAMPLE_AGE_RECIPIENT,
    EXAMPLE_TAILNET,
    normalized_repository,
    ownership_warnings,
    repositories,
)

K8S = Path(__file__).resolve().parents[2] / "k8s"
THEIR_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _their_tree(tmp_path: Path, repository: str = "ssh://git@github.com/alice/lab") -> Path:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    for sync in root.glob("clusters/*/flux-system/gotk-sync.yaml"):
        sync.write_text(sync.read_text().replace("ssh://git@github.com/example/homelab", repository))
    return root


def _run(root: Path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["validate", str(root)])
    return result.exit_code, result.output.splitlines()


def test_the_example_tree_gets_no_warning() -> None:
    assert {normalized_repository(u) for u in repositories(K8S)} == {"github.com/example/homelab"}
    assert ownership_warnings(K8S) == []


def test_a_tree_of_another_repository_is_warned_about_every_file_with_the_examples_values(tmp_path: Path) -> None:
    root = _their_tree(tmp_path)
    code, lines = _run(root)
    assert code == 0, "warnings never fail validation"
    warnings = [line for line in lines if line.startswith("warning:")]
    files = {re.match(r"warning: ([^:]+):", w).group(1) for w in warnings}  # type: ignore[union-attr]
    shown = str(root)
    assert f"{shown}/.sops.yaml" in files
    assert f"{shown}/apps/overlays/homelab/prefect/helmrelease-server-patch.yaml" in files   # PREFECT_UI_URL
    assert f"{shown}/apps/overlays/m720q/prefect/server-egress.yaml" in files              # tailnet-fqdn
    assert f"{shown}/apps/overlays/homelab/prefect/prefect-basic-auth.sops.yaml" in files  # recipient
    # Exactly the files that carry one of the two values, each named once per value.
    carrying = {f"{shown}/{p.relative_to(root)}" for p in root.rglob("*") if p.is_file()
                and (EXAMPLE_TAILNET in p.read_text() or EXAMPLE_AGE_RECIPIENT in p.read_text())}
    assert files == carrying
    assert f"{shown}: valid" in lines


def test_the_warnings_name_the_lines_of_the_tailnet_name(tmp_path: Path) -> None:
    root = _their_tree(tmp_path)
    patch = root / "apps/overlays/homelab/prefect/helmrelease-server-patch.yaml"
    numbers = [str(i) for i, line in enumerate(patch.read_text().splitlines(), 1) if EXAMPLE_TAILNET in line]
    [w] = [w for w in ownership_warnings(root) if str(patch) in w]
    assert f"line {', '.join(numbers)}:" in w


def test_a_tree_with_every_value_replaced_gets_no_warning(tmp_path: Path) -> None:
    root = _their_tree(tmp_path)
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_text()
            path.write_text(text.replace(EXAMPLE_TAILNET, "tail1234.ts.net").replace(EXAMPLE_AGE_RECIPIENT,
                                                                                     THEIR_RECIPIENT))
    assert ownership_warnings(root) == []


@pytest.mark.parametrize("url", ["ssh://git@github.com/example/homelab", "https://github.com/example/homelab.git",
                                 "git@github.com:example/homelab.git", "ssh://git@github.com:22/example/homelab/",
                                 "HTTPS://GitHub.com/Example/Homelab"])
def test_every_spelling_of_the_example_repository_is_the_example(url: str) -> None:
    assert normalized_repository(url) == "github.com/example/homelab"


def test_a_fork_is_not_the_example() -> None:
    assert normalized_repository("ssh://git@github.com/example/homelab-fork") != "github.com/example/homelab"
