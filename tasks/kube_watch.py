"""Who is disrupted right now: every Node watched on a thread of its own, beside the Kubernetes tasks.

The upgrade flows keep the most nodes seen not Ready at once (their result's `max_disrupted`); the node a
flow is disrupting counts even while the API server is away (the endpoint node rebooting, no VIP).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from homelab.gates import NodeView
from tasks.kube import Kube


class DisruptionWatch:
    """Watches every Node on a thread of its own and keeps the most nodes seen not Ready at once;
    the node the flow is disrupting right now counts even while the API server is away."""

    def __init__(self, make_kube: Callable[[], Kube]):
        self._make_kube = make_kube
        self._lock = threading.Lock()
        self._not_ready: set[str] = set()
        self._current: str | None = None
        self.max_disrupted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="homelab-disruption-watch", daemon=True)

    def _note(self) -> None:
        with self._lock:
            now = self._not_ready | ({self._current} if self._current else set())
            self.max_disrupted = max(self.max_disrupted, len(now))

    def observe(self, nodes: list[NodeView]) -> None:
        with self._lock:
            self._not_ready = {n.name for n in nodes if not n.ready}
        self._note()

    @contextlib.contextmanager
    def disrupting(self, node: str) -> Iterator[None]:
        with self._lock:
            self._current = node
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
                    state = {o["metadata"]["name"]: node_view(o).ready for o in items}
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
                            state[name] = node_view(obj).ready
                        self._set(state)
                except Exception:
                    self._stop.wait(0.1)  # the API server is away (a single control plane rebooting)
        finally:
            with contextlib.suppress(Exception):
                kube.close()

    def _set(self, state: dict[str, bool]) -> None:
        with self._lock:
            self._not_ready = {n for n, ready in state.items() if not ready}
        self._note()

    def start(self) -> DisruptionWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
