"""Whatever is done to the bundled files (hostile YAML and argument values included), validate answers
with problem lines, never a traceback, a hang or a blow-up."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homelab.problems import Problem
from homelab.validate import validate

K8S = Path(__file__).resolve().parents[2] / "k8s"
FILES = sorted(str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml"))
KEY_FILES = [f for f in FILES if f.endswith(("talconfig.yaml", "cluster.yaml")) or "flux-kustomizations" in f]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.text(max_size=12),
                    st.sampled_from(["v1.11.5", "10.42.0.101", "tag:k8s", "@./nope.yaml", "ENC[x]", "/dev/nvme0n1",
                                     "fe80::1%$(reboot);id", "--talosconfig=..", "@../../../../../etc/passwd",
                                     "https://$(reboot):6443", "v1.11.5-$(id)", "-n"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _set(node: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = node
    for p in path[:-1]:
        parent = parent[p]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return node


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str]:
    rel = draw(st.sampled_from(KEY_FILES if draw(st.booleans()) else FILES))
    text = (K8S / rel).read_text()
    kind = draw(st.sampled_from(["value", "delete", "truncate", "garbage", "bomb", "duplicate", "alias"]))
    if kind == "truncate":
        return rel, text[: draw(st.integers(0, len(text)))]
    if kind == "garbage":
        return rel, draw(st.text(max_size=200))
    if kind == "bomb":  # a "billion laughs" document, as its own document or nested under a new key
        levels = draw(st.integers(3, 9))
        bomb = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
            f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, levels + 1))
        return rel, text + ("\n---\n" + bomb if draw(st.booleans()) else "\nzz:\n" + bomb.replace("\nl", "\n  l")
                                                                               .replace("l0:", "  l0:", 1))
    if kind == "duplicate":  # a line repeated: a duplicate key wherever it is a mapping entry
        rows = text.splitlines(keepends=True)
        i = draw(st.integers(0, max(len(rows) - 1, 0)))
        return rel, "".join(rows[: i + 1] + rows[i:])
    if kind == "alias":  # an anchor on a value and aliases of it elsewhere
        return rel, text.replace(": ", ": &x ", 1) + "\nzz1: *x\nzz2: [*x, *x]\n"
    docs = list(yaml.safe_load_all(text))
    i = draw(st.integers(0, len(docs) - 1))
    path = draw(st.sampled_from(_paths(docs[i])))
    docs[i] = _set(docs[i], path, draw(values), delete=kind == "delete")
    return rel, yaml.safe_dump_all(docs, sort_keys=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_any_mutation_yields_only_problem_lines(mutation: tuple[str, str]) -> None:
    rel, content = mutation
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo" / "k8s"
        shutil.copytree(K8S, root)
        (root / rel).write_text(content)
        started = time.monotonic()
        problems = validate(root, "k8s")
        seconds = time.monotonic() - started
    assert all(isinstance(p, Problem) and p.file.startswith("k8s") for p in problems)
    assert seconds < 20, f"validate took {seconds:.1f}s on a mutated {rel}"
