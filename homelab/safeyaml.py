"""The one YAML loader for every file read from a GitOps tree (which a push can fill with anything).

PyYAML's safe loader (libyaml's C parser where installed) with three checks between composing a
document and constructing it, each mirroring what talhelper's own YAML library, go-yaml v3, does, so a
file this project accepts is one talhelper accepts:

- duplicate mapping keys are refused (go-yaml v3 decode.go `decoder.mapping`: "mapping key %q already
  defined at line %d"); PyYAML alone keeps the last one silently;
- alias expansion is bounded by go-yaml v3's own rule (decode.go `allowedAliasRatio`: once more than
  100 aliases and 1,000 nodes have been decoded, at most 99% of the decoded nodes may come from aliases,
  falling to 10% between 400,000 and 4,000,000 decoded nodes). Anchors shared by a few nodes, as real
  talconfig files do (`&sans`, `&schematic`), stay far below it; a "billion laughs" document is refused
  after a few thousand steps instead of growing to gigabytes in whatever walks it later;
- a file larger than MAX_FILE_BYTES is refused before it is read.

Nesting depth needs no check of ours: libyaml refuses more than 1,000 levels ("exceeded maximum nesting
depth"), and the walk below uses its own stack, not recursion. PyYAML's composer keeps aliases as
references to one node, so composing a bomb is cheap; only expanding it is not, which is what the walk
bounds before anything expands it.

Every refusal is a YamlRefused naming the line and the field path, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# The largest file of a GitOps tree is a vendored CRD bundle: Flux's gotk-components.yaml and Rook's
# crds.yaml are each under 2 MiB. Twice that leaves room and keeps a composed file well under 100 MB.
MAX_FILE_BYTES = 4 << 20

# go-yaml v3 decode.go: alias_ratio_range_low/high and allowedAliasRatio.
_RATIO_LOW = 400_000
_RATIO_HIGH = 4_000_000

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(Exception):
    """Why a YAML text is refused: `field` is the path in the document (or "(yaml)"/"(file)")."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def allowed_alias_ratio(decoded: int) -> float:
    """go-yaml v3's allowedAliasRatio: the share of decoded nodes that may come from aliases."""
    if decoded <= _RATIO_LOW:
        return 0.99
    if decoded >= _RATIO_HIGH:
        return 0.10
    return 0.99 - 0.89 * (decoded - _RATIO_LOW) / (_RATIO_HIGH - _RATIO_LOW)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1 if node.start_mark is not None else 0


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else f"(a {type(node).__name__} key)"


def _child_path(parent: str, key: yaml.Node | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    text = _key_text(key)
    return f"{parent}.{text}" if parent else text


def check_node(root: yaml.Node, prefix: str = "") -> None:
    """Refuse duplicate keys, recursive aliases and excessive alias expansion in a composed document.

    Walks the node graph as a decoder would, in document order: the first visit of a node is its
    anchor's definition, every later arrival at it is an alias, and whatever is reached through an
    alias counts as alias-driven (go-yaml's aliasDepth > 0)."""
    decoded = aliased = 0
    seen: set[int] = set()
    # (node, path, via_alias, leaving): `leaving` pops the node off the current branch (cycle check)
    stack: list[tuple[yaml.Node, str, bool, bool]] = [(root, prefix, False, False)]
    on_branch: set[int] = set()
    while stack:
        node, path, via_alias, leaving = stack.pop()
        ident = id(node)
        if leaving:
            on_branch.discard(ident)
            continue
        if ident in on_branch:
            raise YamlRefused(path or "(document)", f"line {_line(node)}: an alias refers to a node that "
                                                    "contains it (a recursive anchor); YAML files of a tree "
                                                    "must be finite: replace the alias with the value")
        first = ident not in seen
        alias = via_alias or not first
        decoded += 1
        if alias:
            aliased += 1
            if aliased > 100 and decoded > 1000 and aliased / decoded > allowed_alias_ratio(decoded):
                raise YamlRefused(path or "(document)", f"line {_line(node)}: aliases expand the document "
                                                        f"too much ({aliased} of the first {decoded} nodes come "
                                                        "from aliases: a YAML alias bomb?); talhelper's YAML "
                                                        "library refuses it too: write the values out or use "
                                                        "fewer aliases")
        seen.add(ident)
        if isinstance(node, yaml.ScalarNode):
            continue
        on_branch.add(ident)
        stack.append((node, path, alias, True))
        if isinstance(node, yaml.SequenceNode):
            children = [(item, _child_path(path, i)) for i, item in enumerate(node.value)]
        else:
            if first and isinstance(node, yaml.MappingNode):
                _check_duplicates(node, path)
            children = []
            for key, value in node.value:
                children.append((key, path))
                children.append((value, _child_path(path, key)))
        for child, child_path in reversed(children):  # the stack pops them in document order
            stack.append((child, child_path, alias, False))


def _check_duplicates(node: yaml.MappingNode, path: str) -> None:
    first_line: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
            continue  # `<<: *base` may be followed by keys that override the merged ones: that is no duplicate
        # go-yaml compares the key's text (kind and value), so `1` and "1" are one key there too.
        text = str(key.value)
        if text in first_line:
            raise YamlRefused(_child_path(path, key),
                              f"duplicate key (line {_line(key)}, first on line {first_line[text]}): YAML keeps "
                              "only the last one and talhelper refuses the file; remove one of them")
        first_line[text] = _line(key)


def load_all(text: str, *, max_bytes: int = MAX_FILE_BYTES) -> list[Any]:
    """Every document of `text` (empty ones dropped). Raises YamlRefused."""
    size = len(text.encode("utf-8", errors="surrogateescape"))
    if size > max_bytes:
        raise YamlRefused("(file)", too_large(size, max_bytes))
    loader = _Loader(text)
    docs: list[Any] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                check_node(node, f"[{index}]" if index else "")
                data = loader.construct_document(node)
                if data is not None:
                    docs.append(data)
            index += 1
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlRefused(where, f"not valid YAML: {reason}") from None
    except RecursionError:
        raise YamlRefused("(yaml)", "not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return docs


def too_large(size: int, limit: int) -> str:
    return (f"the file is {size} bytes, over the {limit}-byte limit for one YAML file of the tree; "
            "split it, or keep generated bundles out of the tree")


def read_text(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A tree file's text, refused (YamlRefused on "(file)") before reading when it is too large."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise YamlRefused("(file)", "file does not exist") from None
    except OSError as e:
        raise YamlRefused("(file)", f"cannot read the file: {e.strerror or e}") from None
    if size > max_bytes:
        raise YamlRefused("(file)", too_large(size, max_bytes))
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # a file that grew since stat() is still cut at the limit
        if len(data) > max_bytes:
            raise YamlRefused("(file)", too_large(len(data), max_bytes))
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlRefused("(file)", f"cannot read the file: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise YamlRefused("(file)", f"cannot read the file: {e.strerror or e}") from None


def read_all(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> list[Any]:
    """Every document of a file. Raises YamlRefused."""
    return load_all(read_text(path, max_bytes=max_bytes), max_bytes=max_bytes)
