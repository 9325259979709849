"""Kubernetes Events on the agent's own Node, for what an operator must act on.

Like kubelet's node events they live in the `default` namespace with the Node as the
involved object, so `kubectl describe node NAME` shows them. Two rules keep them cheap and
harmless: the same event (reason, subject and message) is sent at most once per
``min_interval`` (a bad annotation seen on every resync is one event, not hundreds, while a
changed message goes out at once: the audit saw a PeerRejected event keep its first reason
for ten minutes), and sending happens on a
worker thread behind a bounded queue, so an unreachable API server never slows the
reconcile loop (events that do not fit are dropped and counted).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from wgmanager.kube.rest import RestClient, events_path, node_path

log = logging.getLogger(__name__)
COMPONENT = "wgmanager-agent"


class EventRecorder:
    def __init__(self, api: RestClient, node_name: str, *, namespace: str = "default",
                 min_interval: float = 600.0, queue_size: int = 100,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.node_name = node_name
        # The agent's own namespace in a cluster: its service account may create Events
        # there and nowhere else (a Node's Events may live in any namespace).
        self.namespace = namespace
        self.min_interval = min_interval
        self.clock = clock
        self.dropped = 0
        self.sent = 0
        self._last: dict[tuple[str, str, str], float] = {}
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self._uid: str | None = None
        threading.Thread(target=self._worker, name="events", daemon=True).start()

    def warning(self, reason: str, message: str, *, subject: str = "") -> bool:
        return self._emit("Warning", reason, message, subject)

    def normal(self, reason: str, message: str, *, subject: str = "") -> bool:
        return self._emit("Normal", reason, message, subject)

    def _emit(self, kind: str, reason: str, message: str, subject: str) -> bool:
        """Queues the event unless rate-limited; returns True if queued."""
        now = self.clock()
        key = (reason, subject, message)
        last = self._last.get(key)
        if last is not None and now - last < self.min_interval:
            return False
        if len(self._last) > 4096:  # forget what the rate limit no longer covers
            self._last = {k: t for k, t in self._last.items() if now - t < self.min_interval}
        self._last[key] = now
        stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {
            "metadata": {"generateName": f"{self.node_name}.", "namespace": self.namespace},
            "involvedObject": {"kind": "Node", "name": self.node_name, "apiVersion": "v1"},
            "type": kind, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": COMPONENT, "reportingInstance": self.node_name,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _worker(self) -> None:
        while True:
            body = self._queue.get()
            try:
                if self._uid is None:
                    node = self.api.json("GET", node_path(self.node_name), timeout=10)
                    self._uid = str(node["metadata"]["uid"])
                body["involvedObject"]["uid"] = self._uid
                self.api.request("POST", events_path(self.namespace), body=body, timeout=10)
                self.sent += 1
            except Exception as e:  # the API may be down; an event is never worth a crash
                self.dropped += 1
                log.info("event not sent", extra={"reason": body["reason"], "error": str(e)})

    def flush(self, timeout: float = 5.0) -> None:
        """Waits until queued events were handed to the API (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
