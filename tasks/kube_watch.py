"""Who is disrupted right now: every Node watched on a thread of its own, beside the Kubernetes tasks.

The upgrade flows keep the most nodes seen not Ready at once (their result's `max_disrupted`); the node a
flow is disrupting counts even while the API server is away (the endpoint node rebooting, no VIP). Each
node's disruption window is kept too: from the first sight of it cordoned or NotReady to the first sight of
it Ready and schedulable again (the outcome table's "disrupted" column).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from homelab.gates import NodeView
from tasks.kube import Kube, ready_and_schedulable


@dataclass
class Window:
    """One node's disruption: wall-clock times for people, monotonic ones for its length."""

    since: datetime
    since_mono: float
    until: datetime | None = None
    until_mono: float | None = None

    def describe(self) -> str:
        start = self.since.strftime("%H:%M:%SZ")
        if self.until is None or self.until_mono is None:
            return f"{start} → not Ready and schedulable again yet"
        return f"{start} → {self.until.strftime('%H:%M:%SZ')} ({self.until_mono - self.since_mono:.1f} s)"


class DisruptionWatch:
    """Watches every Node on a thread of its own and keeps the most nodes seen not Ready at once;
    the node the flow is disrupting right now counts even while the API server is away."""

    def __init__(self, make_kube: Callable[[], Kube]):
        self._make_kube = make_kube
        self._lock = threading.Lock()
        self._not_ready: set[str] = set()
        self._current: str | None = None
        self.max_disrupted = 0
        self.windows: dict[str, list[Window]] = {}
        self._acted: dict[str, tuple[datetime, float]] = {}  # when the flow began disrupting each node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="homelab-disruption-watch", daemon=True)

    def _note(self) -> None:
        with self._lock:
            now = self._not_ready | ({self._current} if self._current else set())
            self.max_disrupted = max(self.max_disrupted, len(now))

    def observe(self, nodes: list[NodeView]) -> None:
        self._set({n.name: _health(n) for n in nodes})

    def well_again(self, node: str) -> None:
        """The flow itself has just seen the node Ready and schedulable: its window closes now, if the
        watch has not closed it already (its event may still be on the way). When the watch saw no
        window at all (the API server it reads ran on that node, and went before the cordon reached it),
        the window runs from the moment the flow began disrupting the node."""
        now, mono = datetime.now(UTC), time.monotonic()
        with self._lock:
            seen = self.windows.setdefault(node, [])
            acted = self._acted.get(node)
            if acted is not None and not any(w.since_mono >= acted[1] or w.until is None for w in seen):
                seen.append(Window(acted[0], acted[1]))
            self._window(node, True, now, mono)

    def _window(self, name: str, well: bool, now: datetime, mono: float) -> None:
        seen = self.windows.setdefault(name, [])
        last = seen[-1] if seen and seen[-1].until is None else None
        if not well and last is None:
            seen.append(Window(now, mono))
        elif well and last is not None:
            last.until, last.until_mono = now, mono

    def window(self, node: str) -> str:
        """The node's disruption window, described; "" when none was seen. Of a node the flow disrupted, the
        first window still open or ending after the flow began (a stale event applied after the flow's
        own sighting may open a later, empty one); of any other node, the last."""
        with self._lock:
            seen = self.windows.get(node) or []
            acted = self._acted.get(node)
            if acted is not None:
                seen = [w for w in seen if w.until_mono is None or w.until_mono >= acted[1]][:1] or seen
            return seen[-1].describe() if seen else ""

    @contextlib.contextmanager
    def disrupting(self, node: str) -> Iterator[None]:
        with self._lock:
            self._current = node
            self._acted[node] = (datetime.now(UTC), time.monotonic())
        self._note()
        try:
            yield
        finally:
            with self._lock:
                self._current = None

    def _run(self) -> None:
        from tasks.kube import node_view

        try:
            kube = self._make_kube()
        except Exception:
            return
        try:
            while not self._stop.is_set():
                try:
                    items, rv = kube.list_objects("", "v1", "nodes", timeout_s=5)
                    state = {o["metadata"]["name"]: _health(node_view(o)) for o in items}
                    self._set(state)
                    for etype, obj in kube.watch_objects("", "v1", "nodes", None, rv, timeout_s=2):
                        if self._stop.is_set():
                            return
                        if etype == "BOOKMARK":
                            continue
                        name = obj["metadata"]["name"]
                        if etype == "DELETED":
                            state.pop(name, None)
                        else:
                            state[name] = _health(node_view(obj))
                        self._set(state)
                except Exception:
                    self._stop.wait(0.1)  # the API server is away (a single control plane rebooting)
        finally:
            with contextlib.suppress(Exception):
                kube.close()

    def _set(self, state: dict[str, tuple[bool, bool]]) -> None:
        """(Ready, Ready and schedulable) per node, as just seen."""
        now, mono = datetime.now(UTC), time.monotonic()
        with self._lock:
            self._not_ready = {n for n, (ready, _) in state.items() if not ready}
            for name, (_, well) in state.items():
                self._window(name, well, now, mono)
        self._note()

    def start(self) -> DisruptionWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _health(node: NodeView) -> tuple[bool, bool]:
    """(Ready, Ready and schedulable): the first counts for max_disrupted, the second ends a window."""
    return node.ready, ready_and_schedulable(node)
