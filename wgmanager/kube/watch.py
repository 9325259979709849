"""List-then-watch of Node objects, kept deliberately small (the kopf shape).

    list (paginated) -> Synced(all nodes, resourceVersion)
    watch from that resourceVersion (bookmarks on) -> Upserted / Deleted per event
    watch ends (server timeout)  -> watch again from the last resourceVersion seen
    410 Gone                     -> list again
    any other failure            -> back off (exponential, jittered), then list again

Events go to a ``sink`` callable; the watcher holds no cache of its own. Health (last
successful contact, relists, failures) is exposed for readiness and metrics.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from wgmanager.core.model import NodeSpec
from wgmanager.kube.client import Backoff, Forbidden, Gone, KubeError, NodesAPI
from wgmanager.kube.translate import node_spec

log = logging.getLogger(__name__)
MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner is followed by a backoff


@dataclass(frozen=True, slots=True)
class Synced:
    """A complete, consistent snapshot: the only event that may prune peers."""

    nodes: tuple[NodeSpec, ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class Upserted:
    node: NodeSpec


@dataclass(frozen=True, slots=True)
class Deleted:
    name: str


WatchEvent = Synced | Upserted | Deleted


@dataclass
class WatchHealth:
    last_contact: float = 0.0  # monotonic time of the last byte from the server
    lists: int = 0
    watch_restarts: int = 0
    failures: int = 0
    last_error: str = ""
    synced: bool = False
    healthy: bool = False  # listed or watching without error since the last failure
    events: int = field(default=0)


class NodeWatcher:
    def __init__(self, api: NodesAPI, *, page_size: int = 500, watch_timeout: int = 300,
                 backoff: Backoff | None = None) -> None:
        self.api = api
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.health = WatchHealth()

    def run(self, sink: Callable[[WatchEvent], None], stop: threading.Event) -> None:
        """Runs until ``stop``; no exception ends it (the agent's cache must never freeze)."""
        while not stop.is_set():
            try:
                rv = self._list(sink)
                while not stop.is_set():
                    started = time.monotonic()
                    rv = self._watch(rv, sink, stop)
                    self.health.watch_restarts += 1
                    if time.monotonic() - started < MIN_WATCH_SECONDS:
                        # A server or proxy closing watches at once must not make us spin.
                        stop.wait(self.backoff.next_delay())
            except Gone:
                log.info("watch expired, relisting nodes")
                stop.wait(self.backoff.next_delay())
            except Exception as e:
                self.health.healthy = False
                self.health.failures += 1
                self.health.last_error = str(e)
                delay = self.backoff.next_delay()
                level = logging.ERROR if isinstance(e, Forbidden) else logging.WARNING
                log.log(level, "node watch failed", extra={
                    "error": str(e) if isinstance(e, KubeError) else f"{type(e).__name__}: {e}",
                    "retry_in_s": round(delay, 2)})
                stop.wait(delay)

    def _list(self, sink: Callable[[WatchEvent], None]) -> str:
        nodes: list[NodeSpec] = []
        cont: str | None = None
        while True:
            page = self.api.list_page(limit=self.page_size, cont=cont)
            self._touch()
            nodes.extend(node_spec(item) for item in page.get("items") or [])
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or None
            if not cont:
                rv = str(meta.get("resourceVersion", ""))
                break
        self.health.lists += 1
        self.health.synced = True
        self.health.healthy = True
        self.backoff.reset()
        sink(Synced(tuple(nodes), rv))
        log.info("nodes listed", extra={"nodes": len(nodes), "resource_version": rv})
        return rv

    def _watch(self, rv: str, sink: Callable[[WatchEvent], None], stop: threading.Event) -> str:
        resp = self.api.watch(resource_version=rv, timeout_seconds=self.watch_timeout)
        try:
            for event in events(resp):
                if stop.is_set():
                    break
                self._touch()
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone("watch: resourceVersion expired (410)")
                    raise KubeError(f"watch error: {obj.get('message', obj)}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if kind == "BOOKMARK":
                    continue
                self.health.events += 1
                if kind == "DELETED":
                    sink(Deleted(str((obj.get("metadata") or {}).get("name", ""))))
                elif kind in ("ADDED", "MODIFIED"):
                    sink(Upserted(node_spec(obj)))
        except (OSError, ValueError) as e:
            raise KubeError(f"watch stream broke: {type(e).__name__}: {e}") from e
        except Exception as e:  # urllib3's protocol errors have no common base we import
            if isinstance(e, KubeError):
                raise
            raise KubeError(f"watch stream broke: {type(e).__name__}: {e}") from e
        finally:
            resp.close()
            resp.release_conn()
        return rv

    def _touch(self) -> None:
        self.health.last_contact = time.monotonic()


def events(resp: Any) -> Iterator[dict[str, Any]]:
    """JSON objects from a line-delimited watch stream."""
    buf = b""
    for chunk in resp.stream(65536, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buf.strip():
        yield json.loads(buf)
