"""Serve every deployment of prefect.yaml from one process, no work pool: schedules and triggers included.

The definitions are read from prefect.yaml itself, so what `prefect deploy --all` registers and what
this process serves cannot drift apart.

    python -m deployments.serve [--only git-push --only flux-reconcile] [--homelab NAME]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


class ServeConfigError(Exception):
    """prefect.yaml names something this process cannot serve; the message says which entry and why."""


def load_definitions(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ServeConfigError(f"{path}: cannot read the deployments: {e}") from None
    entries = (doc or {}).get("deployments") or []
    if not isinstance(entries, list):
        raise ServeConfigError(f"{path}: deployments: expected a list, got {type(entries).__name__}")
    return [e for e in entries if isinstance(e, dict)]


def load_flow(entrypoint: str, root: Path = PREFECT_YAML.parent) -> Any:
    """`flows/x.py:fn` → the flow object (imported as module flows.x)."""
    file, sep, attr = entrypoint.partition(":")
    if not sep or not file.endswith(".py"):
        raise ServeConfigError(f"entrypoint {entrypoint!r}: expected path/to/module.py:flow_function")
    module = ".".join(Path(file).with_suffix("").parts)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ServeConfigError(f"entrypoint {entrypoint!r}: cannot load {module}.{attr}: {e}") from None


def _schedules(entry: dict[str, Any]) -> list[Any] | None:
    """The entry's `schedules:` as Prefect schedules, with the same fields `prefect deploy` reads."""
    from prefect.schedules import Cron, Interval, RRule

    out = []
    for s in entry.get("schedules") or []:
        if not isinstance(s, dict):
            raise ServeConfigError(f"deployment {entry.get('name')}: schedule {s!r} is not a mapping")
        common = {"timezone": s.get("timezone"), "active": s.get("active", True),
                  "parameters": s.get("parameters") or None, "slug": s.get("slug")}
        if "cron" in s:
            out.append(Cron(s["cron"], day_or=s.get("day_or", True), **common))
        elif "interval" in s:
            out.append(Interval(s["interval"], anchor_date=s.get("anchor_date"), **common))
        elif "rrule" in s:
            out.append(RRule(s["rrule"], **common))
        else:
            raise ServeConfigError(f"deployment {entry.get('name')}: schedule {s!r} has no cron, interval or rrule")
    return out or None


def _concurrency(entry: dict[str, Any]) -> Any:
    """`concurrency_limit:` as `prefect deploy` reads it: a number, or {limit, collision_strategy}."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from pydantic import ValidationError

    value = entry.get("concurrency_limit")
    if value is None or isinstance(value, int):
        return value
    try:
        return ConcurrencyLimitConfig.model_validate(value)
    except ValidationError as e:
        raise ServeConfigError(f"deployment {entry.get('name')}: concurrency_limit {value!r}: expected a number "
                               f"or {{limit, collision_strategy: ENQUEUE|CANCEL_NEW}}: {e}") from None


def _triggers(entry: dict[str, Any]) -> list[Any]:
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from pydantic import TypeAdapter, ValidationError

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    out = []
    for i, t in enumerate(entry.get("triggers") or []):
        try:
            out.append(adapter.validate_python(t))
        except ValidationError as e:
            raise ServeConfigError(f"deployment {entry.get('name')}: triggers[{i}]: {e}") from None
    return out


def to_deployments(entries: Iterable[dict[str, Any]], only: Iterable[str] = (), homelab: str | None = None
                   ) -> list[Any]:
    """RunnerDeployments of the entries (all, or those named in ``only``); ``homelab`` sets the Homelab
    block parameter of every flow that takes one."""
    wanted = set(only)
    entries = list(entries)
    unknown = wanted - {e.get("name") for e in entries}
    if unknown:
        raise ServeConfigError(f"no deployment named {', '.join(sorted(unknown))} in prefect.yaml "
                               f"(defined: {', '.join(str(e.get('name')) for e in entries)})")
    out = []
    for e in entries:
        name = e.get("name")
        if wanted and name not in wanted:
            continue
        if not isinstance(name, str) or not isinstance(e.get("entrypoint"), str):
            raise ServeConfigError(f"deployment {name!r}: needs a name and an entrypoint")
        flow = load_flow(e["entrypoint"])
        parameters = dict(e.get("parameters") or {})
        if homelab and "homelab" in inspect.signature(flow.fn).parameters:
            parameters["homelab"] = homelab
        out.append(flow.to_deployment(
            name=name, description=e.get("description"), parameters=parameters, triggers=_triggers(e),
            schedules=_schedules(e), tags=e.get("tags"), concurrency_limit=_concurrency(e),
            enforce_parameter_schema=e.get("enforce_parameter_schema", True)))
    return out


def serve(only: Iterable[str] = (), homelab: str | None = None, limit: int | None = None) -> None:
    """Serve the deployments until interrupted."""
    from prefect import serve as prefect_serve

    deployments = to_deployments(load_definitions(), only, homelab)
    prefect_serve(*deployments, limit=limit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="Serve only this deployment (repeatable).")
    parser.add_argument("--homelab", help="The Homelab block every served flow acts on (default: its parameter).")
    parser.add_argument("--limit", type=int, help="At most this many runs at once.")
    args = parser.parse_args(argv)
    serve(args.only, args.homelab, args.limit)


if __name__ == "__main__":
    main()
