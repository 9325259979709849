"""The agent's copy of the cluster's Nodes, fed by the watcher's events.

The watcher's thread writes it and the main loop reads a snapshot of it; ``apply`` says
whether an event changed anything we use, so status heartbeats (a Node object changes every
few seconds without touching anything wgmanager reads) trigger no reconcile.
"""

from __future__ import annotations

import threading

from wgmanager.core.model import NodeSpec
from wgmanager.kube.watch import Deleted, Synced, Upserted, WatchEvent


class NodeCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeSpec] = {}
        self._synced = False

    def apply(self, event: WatchEvent) -> bool:
        """Records the event; False when it changed nothing (a duplicate or a heartbeat)."""
        with self._lock:
            if isinstance(event, Synced):
                self._nodes = {n.name: n for n in event.nodes}
                self._synced = True
            elif isinstance(event, Upserted):
                if self._nodes.get(event.node.name) == event.node:
                    return False  # a status heartbeat or an unrelated field
                self._nodes[event.node.name] = event.node
            elif isinstance(event, Deleted) and self._nodes.pop(event.name, None) is None:
                return False
            return True

    def snapshot(self) -> tuple[bool, list[NodeSpec]]:
        """(whether the first complete list arrived, the nodes)."""
        with self._lock:
            return self._synced, list(self._nodes.values())
