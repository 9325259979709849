"""The agent's copy of the cluster's Nodes, fed by the watcher's events.

The watcher's thread writes it and the main loop reads a snapshot of it; ``apply`` says
whether an event changed anything we use, so status heartbeats (a Node object changes every
few seconds without touching anything wgmanager reads) trigger no reconcile. It also keeps
the names of the nodes that changed since the main loop last took them (``take``): the
reconciler's incremental pass plans for those only; a relist makes the next pass full.
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
        self._changed: set[str] = set()
        self._relisted = False
        # A node published or withdrew a next key since the last take: it waits for us.
        self._key_moved = False

    def apply(self, event: WatchEvent) -> bool:
        """Records the event; False when it changed nothing (a duplicate or a heartbeat)."""
        with self._lock:
            if isinstance(event, Synced):
                self._nodes = {n.name: n for n in event.nodes}
                self._synced = self._relisted = True
            elif isinstance(event, Upserted):
                old = self._nodes.get(event.node.name)
                if old == event.node:
                    return False  # a status heartbeat or an unrelated field
                if old is not None and (old.next_public_key, old.next_port) != (
                        event.node.next_public_key, event.node.next_port):
                    self._key_moved = True
                self._nodes[event.node.name] = event.node
                self._changed.add(event.node.name)
            elif isinstance(event, Deleted):
                if self._nodes.pop(event.name, None) is None:
                    return False
                self._changed.add(event.name)
            return True

    def take(self) -> tuple[dict[str, NodeSpec], set[str] | None]:
        """The nodes by name and, taken atomically with them, the names changed since the
        last take; None instead of names after a relist (every node may have changed).

        By name because the reconciler and the key watch look nodes up by name: a copy of
        the dict is one C-level copy, where re-indexing a list costs a Python loop over
        every node on every event."""
        with self._lock:
            changed = None if self._relisted else self._changed
            self._changed, self._relisted, self._key_moved = set(), False, False
            return dict(self._nodes), changed

    def key_moved(self) -> bool:
        """Whether a node published or withdrew a next key since the last take.

        Such a node is mid-rotation and its new device holds back our traffic until we
        switch (``wgmanager.core.rotation``): the pass for it goes without the debounce,
        as every millisecond of it is a packet its peers will receive twice."""
        with self._lock:
            return self._key_moved

    def get(self, name: str) -> tuple[bool, NodeSpec | None]:
        """(whether the first complete list arrived, one node): the main loop's look at
        its own Node on every wake-up, without copying the others."""
        with self._lock:
            return self._synced, self._nodes.get(name)

    def snapshot(self) -> tuple[bool, list[NodeSpec]]:
        """(whether the first complete list arrived, the nodes)."""
        with self._lock:
            return self._synced, list(self._nodes.values())
