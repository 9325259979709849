"""`wgmanager agent`: the per-node daemon that keeps the node's encryption in step with the API.

Threads and their jobs:

- the watcher (``kube.watch.NodeWatcher``) lists and watches Nodes and hands events to
  ``on_event``, which only updates the node cache and marks it dirty;
- the health server answers /healthz (the main loop is alive) and /readyz (synced with the
  API and the last reconcile succeeded);
- the main loop reconciles when the cache is dirty (see below), every ``resync_interval``
  as a safety net, and at once when the WireGuard device has vanished (wireguard-go
  died). It also (re)publishes the node's public key whenever
  the Node's annotation is not ours, and drives key rotation (``wgmanager.agent.rotation``):
  a request annotation from `wgmanager rotate-keys` or the schedule starts one, and while
  it runs the loop reconciles every poll interval to see peers confirm.

Events are coalesced only when they come in bursts (``coalesce_delay``): an event on a
quiet cluster is reconciled at once, and while events keep coming, passes start at most
one ``debounce`` after the previous pass that took events ended, so each takes all that
arrived meanwhile (passes for timers and resyncs open no window: the event after a peer's
delayed removal is no burst).
A fixed wait after every first event would add the whole debounce to every change (100 of
a key change's ~150 ms at 5,000 nodes), where it buys nothing unless more events follow.

Nothing is pruned before the first complete list: until then the datapath keeps what it had
(after a restart: the previous, still correct state; on a first start: nothing attached).
Shutdown leaves device, filters and maps in place, so encryption continues while the agent
is down and a restart picks up without dropping traffic.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from wgmanager.agent import memory
from wgmanager.agent.cache import NodeCache
from wgmanager.agent.health import HealthSettings, serve_health
from wgmanager.agent.metrics import AgentMetrics, LiveSources
from wgmanager.agent.rotation import KeyRotator, Outcome
from wgmanager.core.keywatch import KeyWatch, observe_changed, quarantined
from wgmanager.core.keywatch import observe as observe_keys
from wgmanager.core.mesh import LocalNodeError
from wgmanager.core.model import NODE_ADDRESSES_FEATURE, NodeSpec
from wgmanager.datapath import links
from wgmanager.datapath.linkwatch import watch_new_links
from wgmanager.errors import WgmError
from wgmanager.keystore import slot_key
from wgmanager.kube.client import Backoff, NodesAPI
from wgmanager.kube.events import EventRecorder
from wgmanager.kube.translate import (
    FEATURES_ANNOTATION,
    NEXT_KEY_ANNOTATION,
    NEXT_PORT_ANNOTATION,
    PORT_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    ROTATION_STATUS_ANNOTATION,
    node_spec,
)
from wgmanager.kube.watch import NodeWatcher, WatchEvent
from wgmanager.reconciler import NodeReconciler, ReconcileResult

log = logging.getLogger(__name__)


# The features annotation this agent publishes (core.model.NODE_ADDRESSES_FEATURE).
FEATURES = NODE_ADDRESSES_FEATURE
LIVENESS_TIMEOUT = 120.0  # seconds without a main-loop tick before /healthz fails
ROTATION_DUTY = 0.25  # share of a core the rotation's polling passes may take


@dataclass(frozen=True, slots=True)
class AgentTiming:
    # Seconds between the end of a pass and the start of the next one while events keep
    # arriving (a burst becomes few passes); the first event after a quiet spell waits 0.
    debounce: float = 0.1
    resync_interval: float = 60.0  # a full reconcile at least this often, events or not
    device_check_interval: float = 2.0  # how often to check that the device still exists
    watch_timeout: int = 300  # server-side watch timeout before re-watching


def coalesce_delay(now: float, last_pass_end: float, debounce: float) -> float:
    """How long to wait for more events before a pass (a leading-edge debounce).

    None after a quiet spell: the pass starts at once. Right after a pass (a burst is on)
    the next one waits until ``debounce`` after it ended, taking every event of that window
    together: the passes of a steady stream are at most one per ``debounce`` plus a pass.
    """
    return max(0.0, last_pass_end + debounce - now)


class Agent:
    def __init__(self, *, reconciler: NodeReconciler, nodes_api: NodesAPI,
                 timing: AgentTiming = AgentTiming(),
                 health: HealthSettings | None = HealthSettings(),
                 metrics: AgentMetrics | None = None,
                 events: EventRecorder | None = None) -> None:
        memory.limit_arenas()  # before any of the agent's threads starts
        self.reconciler = reconciler
        self.nodes_api = nodes_api
        self.timing = timing
        self.health_settings = health
        self.node_name = reconciler.settings.node_name
        self.watcher = NodeWatcher(nodes_api, watch_timeout=timing.watch_timeout)
        self._lock = threading.Lock()  # guards _pending_since
        self.cache = NodeCache()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.last_reconcile_ok = False
        self.last_error = ""
        self.reconciles = 0
        self._http: ThreadingHTTPServer | None = None
        self._pending_since: float | None = None  # first event not yet reconciled
        self._new_links: set[str] = set()  # pod veths that appeared (guarded by _lock)
        self._force_full = True  # SIGHUP: the next pass reads and rewrites everything
        self._last_pass_s = 0.0  # how long the last reconcile took
        # When the last pass that took node events ended (passes for timers or resyncs
        # do not count: an event after one of them is no burst).
        self._last_pass_end = float("-inf")
        self._watch_thread: threading.Thread | None = None
        self.metrics = metrics
        self.events = events
        self._reported: dict[str, str] = {}  # rejected node -> reason already reported
        self.keywatch = KeyWatch()
        self._said_quarantined: frozenset[str] | None = None  # None: not written yet
        self._written: dict[str, list[str | None]] = {}  # annotation -> values we wrote
        self._looked = False  # whether we have compared our Node with what we want before
        self.rotator = KeyRotator(reconciler, reconciler.settings.rotation)
        reconciler.rotation = self.rotator.state
        if metrics is not None:
            settings = reconciler.settings
            rotator = self.rotator
            metrics.attach(LiveSources(
                device=lambda: reconciler.backend.read(),
                pin_dir=lambda: settings.datapath.pin_dir,
                mesh=lambda: reconciler.mesh,
                key_mtime=lambda: reconciler.keystore.mtime(slot_key(rotator.state.slot)),
                watch=lambda: self.watcher.health,
                backend=reconciler.backend.kind.value,
                interface=lambda: reconciler.backend.ifname,
                rotation_phase=lambda: rotator.state.phase))

    # -- events -----------------------------------------------------------------------

    def on_event(self, event: WatchEvent) -> None:
        if not self.cache.apply(event):
            return
        with self._lock:
            if self._pending_since is None:
                self._pending_since = time.monotonic()
        self._dirty.set()

    def snapshot(self) -> tuple[bool, list[NodeSpec]]:
        return self.cache.snapshot()

    # -- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()

    def poke(self) -> None:
        """Reconcile in full now (SIGHUP): e.g. after someone removed our tc filters."""
        self._force_full = True
        self._dirty.set()

    def link_appeared(self, name: str) -> None:
        """A pod veth appeared: attach to it in the next pass, which stays incremental."""
        with self._lock:
            self._new_links.add(name)
        self._dirty.set()

    def run(self) -> None:
        key = self.reconciler.private_key.public_key.base64()
        log.info("agent starting", extra={"node": self.node_name, "public_key": key,
                                          "backend": self.reconciler.backend.kind.value,
                                          "key_rotation": self.rotator.state.phase})
        self._watch_thread = threading.Thread(target=self.watcher.run,
                                              args=(self.on_event, self._stop),
                                              name="node-watch", daemon=True)
        self._watch_thread.start()
        threading.Thread(target=watch_new_links,
                         args=(self.reconciler.settings.datapath.pod_interfaces,
                               self.link_appeared, self._stop),
                         name="link-watch", daemon=True).start()
        if self.health_settings is not None:
            self._http = serve_health(self.health_settings, self.health)
        if not self.reconciler.datapath_exists():
            self._bootstrap()
        backoff = Backoff(initial=0.5, maximum=10.0)
        publish_backoff = Backoff(initial=0.5, maximum=10.0)
        next_resync = time.monotonic() + self.timing.resync_interval
        next_publish = 0.0
        # Our rotation's steering was just applied: the next pass goes at once, not after
        # the debounce, and the next key once the steering has settled (``settles_at``:
        # every wait beyond that is a window in which the new device stages copies its
        # peers will receive twice).
        urgent = False
        poll = self.reconciler.settings.rotation.poll_interval
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                rotating = self.rotator.active
                # While rotating, every poll is a full pass (the devices' handshakes say
                # which peers confirmed): at most ROTATION_DUTY of a core on it, however
                # long a pass takes at this cluster size.
                wait = (max(poll, self._last_pass_s / ROTATION_DUTY) if rotating
                        else self.timing.device_check_interval)
                deadline = self.reconciler.next_deadline()  # a replaced peer to remove
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                settles = self.rotator.settles_at()  # then the next key goes out
                if settles is not None:
                    wait = max(0.0, min(wait, settles - time.monotonic()))
                fired = self._dirty.wait(wait)
                if self._stop.is_set():
                    break
                if fired:
                    if not (urgent or self.cache.key_moved()):
                        self._stop.wait(coalesce_delay(time.monotonic(), self._last_pass_end,
                                                       self.timing.debounce))
                    self._dirty.clear()
                urgent = False
                synced, me = self.cache.get(self.node_name)
                if not synced:
                    continue
                now = time.monotonic()
                if settles is not None and now >= settles:
                    next_publish = 0.0  # not after the status's half second
                if now >= next_publish:
                    changes = self._annotation_changes(me)
                    if changes:
                        next_publish = now + self._publish(changes, publish_backoff)
                # A resync, a recreated device or SIGHUP: everything is read again.
                full = (self._force_full or now >= next_resync or not self._device_ok())
                due = (fired or rotating or full
                       or (deadline is not None and now >= deadline))
                if not due:
                    continue
                with self._lock:
                    pending, self._pending_since = self._pending_since, None
                    new_links, self._new_links = self._new_links, set()
                nodes, changed = self.cache.take()
                self._force_full = False
                try:
                    remote = self.reconciler.mesh.nodes.values() if self.reconciler.mesh else ()
                    state = self.rotator.before_reconcile(me, remote)
                    held = self._watch_keys(nodes, changed)
                    result = self.reconciler.reconcile(
                        nodes, state, held, changed=None if full else changed,
                        new_links=new_links)
                    self.last_reconcile_ok, self.last_error = True, ""
                    self._last_pass_s = result.seconds
                    if pending is not None:
                        self._last_pass_end = time.monotonic()
                    self.reconciles += 1
                    backoff.reset()
                    if result.full:  # incremental passes do not count as a resync
                        next_resync = time.monotonic() + self.timing.resync_interval
                        # The mesh, indexes and models of thousands of nodes live until
                        # the next full pass: keep the cyclic GC from rescanning them on
                        # every collection (~0.1 s per full collection at 10,000 nodes,
                        # a pause in the middle of some event's pass).
                        gc.freeze()
                        memory.trim()
                    self._record(result, pending)
                    self._report_rejections(result)
                    before = (self.rotator.state, self.rotator.steered)
                    outcome = self.rotator.after_reconcile(result.rotation)
                    if (self.rotator.state, self.rotator.steered) != before:
                        self._dirty.set()  # apply the new state (and publish it) right away
                        next_publish = 0.0
                        # The copies now go into both devices: the next key goes out at
                        # once, with no debounce (the other steps keep theirs).
                        urgent = self.rotator.steered != before[1]
                    if outcome is not None:
                        self._report_rotation(outcome)
                except Exception as e:
                    if not isinstance(e, (WgmError, LocalNodeError)):
                        log.exception("unexpected error in reconcile (a bug: please report)")
                        e = WgmError(f"{type(e).__name__}: {e}")
                    with self._lock:  # the events are still unreconciled
                        if pending is not None and self._pending_since is None:
                            self._pending_since = pending
                        self._new_links |= new_links
                    self._force_full = True  # the changes taken for this pass are not done
                    if self.metrics is not None:
                        self.metrics.reconcile_errors.inc()
                    self.last_reconcile_ok, self.last_error = False, str(e)
                    if pending is not None:
                        self._last_pass_end = time.monotonic()
                    if self.events is not None:
                        self.events.warning("ReconcileFailed", str(e), subject=type(e).__name__)
                    delay = backoff.next_delay()
                    log.error("reconcile failed", extra={"error": str(e),
                                                         "retry_in_s": round(delay, 2)})
                    next_resync = time.monotonic() + delay
        finally:
            if self._http is not None:
                self._http.shutdown()
            self.reconciler.close()
            log.info("agent stopped; device, filters and maps stay in place")

    def _report_rotation(self, outcome: Outcome) -> None:
        result = "completed" if outcome.completed else "rolled_back"
        if self.metrics is not None:
            self.metrics.key_rotations.labels(result).inc()
            self.metrics.key_rotation_duration.observe(outcome.seconds)
        if self.events is None:
            return
        if outcome.completed:
            self.events.normal("KeyRotated", f"WireGuard key rotated in {outcome.seconds:.1f}s:"
                               f" {outcome.peers} peer(s) use the new public key "
                               f"{outcome.detail}; the old private key is destroyed",
                               subject=outcome.request)
        else:
            self.events.warning("KeyRotationRolledBack", f"WireGuard key rotation rolled back "
                                f"after {outcome.seconds:.1f}s: {outcome.detail}",
                                subject=outcome.request)

    def _record(self, result: ReconcileResult, pending: float | None) -> None:
        m = self.metrics
        if m is None:
            return
        m.reconciles.inc()
        m.reconcile_duration.labels(result.kind).observe(result.seconds)
        if pending is not None:
            m.event_latency.observe(time.monotonic() - pending)
        for op in result.peer_ops:
            m.peer_ops.labels(type(op).__name__.removesuffix("Peer").lower()).inc()
        m.map_ops.labels("upsert").inc(len(result.map_plan.upserts))
        m.map_ops.labels("delete").inc(len(result.map_plan.deletes))

    def _bootstrap(self) -> None:
        """First start on this node: close the datapath before any peer is known.

        Our own Node gives our pod CIDRs; a mesh of just this node makes them LOCAL and the
        cluster CIDRs DROP, with the programs attached. Pod traffic to other nodes is then
        dropped, never sent in plaintext, until the full node list fills in the peers. (On a
        restart the pinned maps still hold the last good state, so nothing is needed.)
        """
        backoff = Backoff(initial=0.5, maximum=10.0)
        while not self._stop.is_set() and not self.snapshot()[0]:
            try:
                me = node_spec(self.nodes_api.get(self.node_name))
                self.reconciler.reconcile([me])
            except Exception as e:
                delay = backoff.next_delay()
                log.warning("cannot close the datapath yet", extra={
                    "error": str(e), "retry_in_s": round(delay, 2)})
                self._stop.wait(delay)
                continue
            log.info("datapath closed: pod traffic to other nodes drops until peers are known")
            return

    def _report_rejections(self, result: ReconcileResult) -> None:
        """One Warning per node and reason (rate-limited further by the recorder)."""
        current = {r.name: r.reason for r in result.mesh.rejected.values() if not r.pending}
        if self.events is not None:
            for name, reason in current.items():
                if self._reported.get(name) != reason:
                    self.events.warning("PeerRejected", f"node {name} gets no WireGuard peer: "
                                        f"{reason}", subject=name)
        self._reported = current

    def _device_ok(self) -> bool:
        """Cheap, every device check interval: the link exists (a dead wireguard-go takes its
        TUN link with it within milliseconds). A full device dump would cost O(peers)."""
        try:
            with links.iproute() as ipr:
                return all(links.get_link(ipr, name) is not None
                           for name in self.reconciler.interfaces())
        except Exception:  # any failure to look means "reconcile"
            return False

    def _watch_keys(self, nodes: dict[str, NodeSpec],
                    changed: set[str] | None) -> frozenset[str]:
        """Warns about other nodes' keys replaced outside the rotation protocol; returns the
        nodes quarantined for it (wgmanager.core.keywatch). Looks at the ``changed`` nodes
        only when given (the others' keys are as observed before)."""
        now = time.monotonic()
        if changed is None:
            self.keywatch, jumped = observe_keys(self.keywatch, nodes.values(),
                                                 local=self.node_name, now=now)
        else:
            self.keywatch, jumped = observe_changed(
                self.keywatch, {name: nodes.get(name) for name in changed},
                local=self.node_name, now=now)
        for name in jumped:
            log.warning("a node's WireGuard key was replaced outside the rotation protocol",
                        extra={"node": name})
            if self.events is not None:
                self.events.warning(
                    "PeerKeyReplaced", f"node {name}'s WireGuard key was replaced outside the "
                    "rotation protocol (a second writer, or a stolen node credential?)",
                    subject=name)
            if self.metrics is not None:
                self.metrics.peer_key_replacements.inc()
        held = quarantined(self.keywatch, now)
        if self.metrics is not None:
            self.metrics.quarantined_nodes.set(len(held))
        if held != self._said_quarantined:
            try:  # for `wgmanager status`; the quarantine itself does not depend on it
                self.reconciler.keystore.save_quarantined(held)
                self._said_quarantined = held
            except WgmError as e:
                log.warning("cannot record the quarantined nodes for status",
                            extra={"error": str(e)})
        return held

    def _annotation_changes(self, me: NodeSpec | None) -> dict[str, str | None]:
        """The annotations of ours that our Node does not carry yet (all of them if the
        Node is not in the list)."""
        # What this agent supports goes out with its first key, so that no peer ever sees
        # this node with a key but without it.
        want = {**self.rotator.annotations(), FEATURES_ANNOTATION: FEATURES}
        if me is None:
            return want
        have = {PUBLIC_KEY_ANNOTATION: me.public_key, PORT_ANNOTATION: me.port,
                NEXT_KEY_ANNOTATION: me.next_public_key, NEXT_PORT_ANNOTATION: me.next_port,
                ROTATION_STATUS_ANNOTATION: me.rotation_status,
                FEATURES_ANNOTATION: ",".join(me.features) if me.features else None}
        for k, v in want.items():
            if have.get(k) == v:
                self._remember(k, v)  # ours (also what a previous agent process wrote)
        changes = {k: v for k, v in want.items() if have.get(k) != v}
        # Our key annotations holding a value we never wrote nor found as ours: someone else
        # wrote them (the watch echo of our own write shows a value we did write). Not on
        # the first look at our Node: a previous agent process may have left other values.
        forged = [k for k in (PUBLIC_KEY_ANNOTATION, NEXT_KEY_ANNOTATION)
                  if self._looked and k in changes and have.get(k) is not None
                  and have.get(k) not in self._written.get(k, ())]
        self._looked = True
        if forged:
            log.warning("our key annotations were overwritten by someone else; publishing "
                        "ours again", extra={"node": self.node_name,
                                             "annotations": ", ".join(forged)})
            if self.events is not None:
                self.events.warning(
                    "KeyAnnotationOverwritten", f"{', '.join(forged)} on this node was "
                    "overwritten by someone else (a stolen credential?); wgmanager wrote its "
                    "own value again", subject=",".join(forged))
            if self.metrics is not None:
                self.metrics.own_annotation_overwrites.inc()
        return changes

    def _remember(self, name: str, value: str | None) -> None:
        """The last few values of one of our annotations that are ours."""
        values = self._written.get(name, [])
        if value not in values:
            self._written[name] = [*values[-3:], value]

    def _publish(self, changes: dict[str, str | None], backoff: Backoff) -> float:
        """Writes our annotations; returns seconds until the next attempt is allowed."""
        try:
            self.nodes_api.patch_annotations(self.node_name, changes)
        except Exception as e:
            delay = backoff.next_delay()
            log.warning("cannot publish annotations", extra={"node": self.node_name,
                                                             "error": str(e)})
            return delay
        backoff.reset()
        for k, v in changes.items():
            self._remember(k, v)
        self.rotator.published()
        key = changes.get(PUBLIC_KEY_ANNOTATION)
        if key:
            log.info("public key published", extra={"node": self.node_name, "public_key": key})
            if self.events is not None:
                self.events.normal("PublicKeyPublished", f"WireGuard public key {key} "
                                   "published", subject=key)
        if NEXT_KEY_ANNOTATION in changes:
            log.info("next public key " + ("published" if changes[NEXT_KEY_ANNOTATION]
                                           else "withdrawn"),
                     extra={"node": self.node_name, "public_key": changes[NEXT_KEY_ANNOTATION]})
        # The watch echoes it back; don't re-send before it had a chance. A rotation's
        # status changes often: at most one write of it every half second.
        return 0.5

    # -- health -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        synced, nodes = self.snapshot()
        # Generous: a first reconcile of thousands of peers takes seconds, and a liveness
        # failure restarts the agent mid-sync (which would then never finish).
        alive = time.monotonic() - self.heartbeat < LIVENESS_TIMEOUT
        watching = self._watch_thread is not None and self._watch_thread.is_alive()
        return {"alive": alive and watching, "synced": synced,
                "ready": synced and self.last_reconcile_ok and watching,
                "nodes": len(nodes), "reconciles": self.reconciles,
                "last_error": self.last_error, "watch_failures": self.watcher.health.failures}
