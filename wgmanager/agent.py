"""`wgmanager agent`: the per-node daemon that keeps the node's encryption in step with the API.

Threads and their jobs:

- the watcher (``kube.watch.NodeWatcher``) lists and watches Nodes and hands events to
  ``on_event``, which only updates the node cache and marks it dirty;
- the health server answers /healthz (the main loop is alive) and /readyz (synced with the
  API and the last reconcile succeeded);
- the main loop reconciles when the cache is dirty (debounced, so a burst of events is one
  pass), every ``resync_interval`` as a safety net, and at once when the WireGuard device
  has vanished (wireguard-go died). It also (re)publishes the node's public key whenever
  the Node's annotation is not ours.

Nothing is pruned before the first complete list: until then the datapath keeps what it had
(after a restart: the previous, still correct state; on a first start: nothing attached).
Shutdown leaves device, filters and maps in place, so encryption continues while the agent
is down and a restart picks up without dropping traffic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from wgmanager.core.mesh import LocalNodeError
from wgmanager.core.model import NodeSpec
from wgmanager.errors import WgmError
from wgmanager.kube.client import Backoff, KubeError, NodesAPI
from wgmanager.kube.watch import Deleted, NodeWatcher, Synced, Upserted, WatchEvent
from wgmanager.node import NodeReconciler

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentTiming:
    debounce: float = 0.1  # seconds to gather a burst of events into one reconcile
    resync_interval: float = 60.0  # full reconcile even without events
    device_check_interval: float = 2.0  # how often to check that the device still exists
    watch_timeout: int = 300  # server-side watch timeout before re-watching


@dataclass(frozen=True, slots=True)
class HealthSettings:
    address: str = "0.0.0.0"  # hostNetwork: kubelet probes the node's address
    port: int = 9876


class Agent:
    def __init__(self, *, reconciler: NodeReconciler, nodes_api: NodesAPI,
                 timing: AgentTiming = AgentTiming(),
                 health: HealthSettings | None = HealthSettings()) -> None:
        self.reconciler = reconciler
        self.nodes_api = nodes_api
        self.timing = timing
        self.health_settings = health
        self.node_name = reconciler.settings.node_name
        self.watcher = NodeWatcher(nodes_api, watch_timeout=timing.watch_timeout)
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeSpec] = {}
        self._synced = False
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.last_reconcile_ok = False
        self.last_error = ""
        self.reconciles = 0
        self._http: ThreadingHTTPServer | None = None

    # -- events -----------------------------------------------------------------------

    def on_event(self, event: WatchEvent) -> None:
        with self._lock:
            if isinstance(event, Synced):
                self._nodes = {n.name: n for n in event.nodes}
                self._synced = True
            elif isinstance(event, Upserted):
                if self._nodes.get(event.node.name) == event.node:
                    return  # a status heartbeat or an unrelated field: nothing for us
                self._nodes[event.node.name] = event.node
            elif isinstance(event, Deleted) and self._nodes.pop(event.name, None) is None:
                return
        self._dirty.set()

    def snapshot(self) -> tuple[bool, list[NodeSpec]]:
        with self._lock:
            return self._synced, list(self._nodes.values())

    # -- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()

    def poke(self) -> None:
        """Reconcile now (SIGHUP): e.g. after someone removed our tc filters by hand."""
        self._dirty.set()

    def run(self) -> None:
        key = self.reconciler.private_key.public_key.base64()
        log.info("agent starting", extra={"node": self.node_name, "public_key": key,
                                          "backend": self.reconciler.backend.kind.value})
        threading.Thread(target=self.watcher.run, args=(self.on_event, self._stop),
                         name="node-watch", daemon=True).start()
        if self.health_settings is not None:
            self._serve_health(self.health_settings)
        backoff = Backoff(initial=0.5, maximum=10.0)
        next_resync = time.monotonic() + self.timing.resync_interval
        next_publish = 0.0
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                fired = self._dirty.wait(self.timing.device_check_interval)
                if self._stop.is_set():
                    break
                if fired:
                    self._stop.wait(self.timing.debounce)
                    self._dirty.clear()
                synced, nodes = self.snapshot()
                if not synced:
                    continue
                now = time.monotonic()
                if now >= next_publish and self._needs_publish(nodes, key):
                    next_publish = now + self._publish(key, backoff)
                due = fired or now >= next_resync or not self._device_ok()
                if not due:
                    continue
                try:
                    self.reconciler.reconcile(nodes)
                    self.last_reconcile_ok, self.last_error = True, ""
                    self.reconciles += 1
                    backoff.reset()
                    next_resync = time.monotonic() + self.timing.resync_interval
                except (WgmError, LocalNodeError) as e:
                    self.last_reconcile_ok, self.last_error = False, str(e)
                    delay = backoff.next_delay()
                    log.error("reconcile failed", extra={"error": str(e),
                                                         "retry_in_s": round(delay, 2)})
                    next_resync = time.monotonic() + delay
        finally:
            if self._http is not None:
                self._http.shutdown()
            self.reconciler.close()
            log.info("agent stopped; device, filters and maps stay in place")

    def _device_ok(self) -> bool:
        try:
            return self.reconciler.backend.device_exists()
        except WgmError:
            return False

    def _needs_publish(self, nodes: list[NodeSpec], key: str) -> bool:
        me = next((n for n in nodes if n.name == self.node_name), None)
        return me is None or me.public_key != key

    def _publish(self, key: str, backoff: Backoff) -> float:
        """Publishes our key; returns seconds until the next attempt is allowed."""
        try:
            self.nodes_api.publish_key(self.node_name, key)
        except KubeError as e:
            delay = backoff.next_delay()
            log.warning("cannot publish public key", extra={"node": self.node_name,
                                                            "error": str(e)})
            return delay
        log.info("public key published", extra={"node": self.node_name, "public_key": key})
        return 1.0  # the watch echoes it back; don't re-send before it had a chance

    # -- health -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        synced, nodes = self.snapshot()
        alive = time.monotonic() - self.heartbeat < max(30.0, 5 * self.timing.debounce + 10)
        return {"alive": alive, "synced": synced, "ready": synced and self.last_reconcile_ok,
                "nodes": len(nodes), "reconciles": self.reconciles,
                "last_error": self.last_error, "watch_failures": self.watcher.health.failures}

    def _serve_health(self, settings: HealthSettings) -> None:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                state = agent.health()
                if self.path == "/healthz":
                    ok = bool(state["alive"])
                elif self.path == "/readyz":
                    ok = bool(state["ready"])
                else:
                    self.send_error(404)
                    return
                body = json.dumps(state).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        try:
            self._http = ThreadingHTTPServer((settings.address, settings.port), Handler)
        except OSError as e:
            raise WgmError(f"cannot serve health checks on {settings.address}:{settings.port}:"
                           f" {e.strerror}; choose another --health-port") from e
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="health", daemon=True).start()
