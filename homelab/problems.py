"""Problems found in the GitOps tree, reported one line each: ``file: field: message``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class ConfigError(Exception):
    """A configuration file is invalid; carries every problem found at once."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = sorted(set(problems))
        super().__init__("\n".join(str(p) for p in self.problems))


def field_path(loc: Iterable[int | str]) -> str:
    """``("nodes", 1, "ipAddress")`` -> ``nodes[1].ipAddress``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def from_validation_error(file: str, err: ValidationError, prefix: Iterable[int | str] = ()) -> list[Problem]:
    problems = []
    for e in err.errors():
        # pydantic puts the union member or validator name into loc; keep only field names and indexes.
        loc = [p for p in e["loc"] if isinstance(p, int) or not str(p).startswith(("function-", "str", "int", "bool"))]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling, or remove it)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        problems.append(Problem(file, field_path([*prefix, *loc]), msg))
    return problems
