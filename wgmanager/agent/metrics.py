"""Prometheus metrics of the agent: what an operator needs to see that every peer is up.

One registry per agent (no process-global state). Values that live elsewhere, such as
WireGuard byte counters, handshake times and the eBPF counters, are read live at scrape time
by a custom collector, so they are the kernel's and wireguard-go's own numbers, not copies.
Events in the agent itself (reconciles, their errors and durations, event-to-configured
latency, watch health) are ordinary counters and histograms.

The device is read on one long-lived thread of the collector's own: the HTTP server
serves each scrape on a new thread, and pyroute2 opens a netlink socket for every thread
that uses a socket object and never closes it (kernel backend: 50 scrapes left 50 open
sockets, about 5,800 a day at a 15 s interval). One reader thread keeps it at one.

Label cardinality is bounded: per-peer series (one per remote node) only with
``per_peer=True`` (`--metrics-per-peer`), everything else is cluster-size independent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from wgmanager import __version__
from wgmanager.core.mesh import Mesh
from wgmanager.core.model import DeviceState
from wgmanager.core.plan import configured
from wgmanager.datapath.maps import Counter as DpCounter
from wgmanager.datapath.maps import PinnedMaps
from wgmanager.errors import WgmError
from wgmanager.kube.watch import WatchHealth

log = logging.getLogger(__name__)
RECENT_HANDSHAKE = 180.0  # WireGuard rekeys every 120 s on an active session
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DEVICE_READ_TIMEOUT = 10.0  # a scrape reports the device down rather than hang


@dataclass
class LiveSources:
    """Where the collector reads live state; each callable may raise WgmError."""

    device: Callable[[], DeviceState]
    pin_dir: Callable[[], object]  # a Path; typed loosely to keep this module light
    mesh: Callable[[], Mesh | None]
    key_mtime: Callable[[], float | None]
    watch: Callable[[], WatchHealth]
    backend: str
    interface: Callable[[], str]  # changes with each key rotation (two devices alternate)
    rotation_phase: Callable[[], str] = lambda: "idle"


class AgentMetrics:
    def __init__(self, *, per_peer: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.per_peer = per_peer
        r = self.registry
        self.reconciles = Counter("wgmanager_reconciles", "Reconcile passes", registry=r)
        self.reconcile_errors = Counter("wgmanager_reconcile_errors",
                                        "Reconcile passes that failed", registry=r)
        # By kind: a full pass (start, resync, relist, errors) is O(nodes) by design, a
        # pass for changed nodes should cost the same at any cluster size; averaged
        # together, the rare full passes would hide both.
        self.reconcile_duration = Histogram("wgmanager_reconcile_duration_seconds",
                                            "Duration of one reconcile pass, by kind (full, "
                                            "changes: changed nodes only, timers: due peer "
                                            "removals and handshake checks only)", ["kind"],
                                            registry=r, buckets=LATENCY_BUCKETS)
        self.event_latency = Histogram(
            "wgmanager_node_event_to_configured_seconds",
            "From a Node event reaching the agent to the device and datapath reflecting it",
            registry=r, buckets=LATENCY_BUCKETS)
        self.peer_ops = Counter("wgmanager_peer_operations", "WireGuard peer operations "
                                "applied", ["op"], registry=r)
        self.map_ops = Counter("wgmanager_datapath_map_operations",
                               "eBPF CIDR map entries written or deleted", ["op"], registry=r)
        self.key_rotations = Counter("wgmanager_key_rotations", "Key rotations that ended, "
                                     "by result (completed, rolled_back)", ["result"],
                                     registry=r)
        self.peer_key_replacements = Counter(
            "wgmanager_peer_key_replacements", "Another node's WireGuard key replaced outside "
            "the rotation protocol (no key in common with the one before)", registry=r)
        self.own_annotation_overwrites = Counter(
            "wgmanager_own_annotation_overwrites", "This node's wgmanager.io annotations "
            "found overwritten by someone else (and published again)", registry=r)
        self.quarantined_nodes = Gauge(
            "wgmanager_quarantined_nodes", "Nodes given no peer because their key keeps "
            "being replaced outside the rotation protocol", registry=r)
        self.key_rotation_duration = Histogram(
            "wgmanager_key_rotation_duration_seconds",
            "From a key rotation's start to its end (all peers on the new key, or rolled back)",
            registry=r, buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))

    def attach(self, sources: LiveSources) -> None:
        self.registry.register(_LiveCollector(sources, self.per_peer))

    def serve(self, address: str, port: int) -> None:
        start_http_server(port, addr=address, registry=self.registry)


class _LiveCollector(Collector):
    def __init__(self, src: LiveSources, per_peer: bool) -> None:
        self.src = src
        self.per_peer = per_peer
        # One worker, kept alive between scrapes: all device reads happen on that thread.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-device")

    def _read_device(self) -> DeviceState | None:
        try:
            return self._reader.submit(self.src.device).result(DEVICE_READ_TIMEOUT)
        except WgmError as e:
            log.debug("metrics: device unreadable", extra={"error": str(e)})
        except FutureTimeout:
            log.warning("metrics: device read timed out",
                        extra={"timeout_s": DEVICE_READ_TIMEOUT})
        return None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = time.time()
        info = GaugeMetricFamily("wgmanager_info", "Agent build and device",
                                 labels=["version", "backend", "interface"])
        info.add_metric([__version__, self.src.backend, self.src.interface()], 1)
        yield info
        phase = GaugeMetricFamily("wgmanager_key_rotation_phase",
                                  "1 for the key rotation phase the node is in",
                                  labels=["phase"])
        current = self.src.rotation_phase()
        for name in ("idle", "prepare", "switch", "rollback"):
            phase.add_metric([name], 1 if current == name else 0)
        yield phase
        watch = self.src.watch()
        yield GaugeMetricFamily("wgmanager_kube_watch_up", "1 while the Node list/watch runs "
                                "without error", value=1 if watch.healthy else 0)
        yield CounterMetricFamily("wgmanager_kube_lists", "Complete Node lists",
                                  value=watch.lists)
        yield CounterMetricFamily("wgmanager_kube_watch_events", "Node watch events",
                                  value=watch.events)
        yield CounterMetricFamily("wgmanager_kube_watch_failures",
                                  "Node list/watch failures (each followed by a backoff)",
                                  value=watch.failures)
        mtime = self.src.key_mtime()
        if mtime is not None:
            yield GaugeMetricFamily("wgmanager_key_age_seconds",
                                    "Age of the node's private key", value=now - mtime)
        yield from self._device(now)
        yield from self._datapath()

    def _device(self, now: float) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        mesh = self.src.mesh()
        if mesh is not None:
            # The reconciler changes the kept mesh's dicts in place on the main thread
            # (wgmanager.core.meshindex); a scrape iterates its own copies. Each dict()
            # of a dict is one C call, atomic under the GIL.
            mesh = replace(mesh, nodes=dict(mesh.nodes), peers=dict(mesh.peers),
                           rejected=dict(mesh.rejected))
        device = self._read_device()
        device_up = GaugeMetricFamily("wgmanager_device_up", "1 while the WireGuard device "
                                      "answers")
        device_up.add_metric([], 0 if device is None else 1)
        yield device_up
        peers = dict(device.peers) if device else {}
        names = {n.public_key: n.name for n in mesh.nodes.values()} if mesh else {}
        if mesh is not None:
            yield GaugeMetricFamily("wgmanager_peers_expected", "Peers the mesh wants",
                                    value=len(mesh.peers))
            held = sum(configured(p, peers.get(k)) for k, p in mesh.peers.items())
            yield GaugeMetricFamily("wgmanager_peers_configured",
                                    "Expected peers the device holds with their allowed IPs",
                                    value=held)
            rejected = GaugeMetricFamily("wgmanager_nodes_rejected", "Nodes with no peer",
                                         labels=["kind"])
            rej = list(mesh.rejected.values())
            rejected.add_metric(["pending"], sum(r.pending for r in rej))
            rejected.add_metric(["invalid"], sum(not r.pending for r in rej))
            yield rejected
        ages = [now - p.last_handshake for p in peers.values() if p.last_handshake]
        yield GaugeMetricFamily("wgmanager_peers_recent_handshake",
                                f"Peers with a handshake in the last {RECENT_HANDSHAKE:.0f}s",
                                value=sum(a < RECENT_HANDSHAKE for a in ages))
        yield GaugeMetricFamily("wgmanager_peer_handshake_age_max_seconds",
                                "Oldest last handshake among peers that ever had one",
                                value=max(ages) if ages else 0)
        # Gauges, not counters: a sum over the current peers drops when a peer goes away,
        # which a counter would report as a reset.
        rx = GaugeMetricFamily("wgmanager_wireguard_peers_receive_bytes",
                               "Bytes received from the current peers",
                               value=sum(p.rx_bytes for p in peers.values()))
        tx = GaugeMetricFamily("wgmanager_wireguard_peers_transmit_bytes",
                               "Bytes sent to the current peers",
                               value=sum(p.tx_bytes for p in peers.values()))
        yield rx
        yield tx
        if not self.per_peer:
            return
        hs = GaugeMetricFamily("wgmanager_peer_last_handshake_timestamp_seconds",
                               "Last handshake per peer", labels=["peer_node"])
        prx = CounterMetricFamily("wgmanager_peer_receive_bytes", "Bytes from the peer",
                                  labels=["peer_node"])
        ptx = CounterMetricFamily("wgmanager_peer_transmit_bytes", "Bytes to the peer",
                                  labels=["peer_node"])
        for key, p in peers.items():
            name = names.get(key, key.short())
            hs.add_metric([name], p.last_handshake or 0)
            prx.add_metric([name], p.rx_bytes)
            ptx.add_metric([name], p.tx_bytes)
        yield hs
        yield prx
        yield ptx

    def _datapath(self) -> Iterator[CounterMetricFamily]:
        packets = CounterMetricFamily("wgmanager_datapath_packets",
                                      "Packets seen by the eBPF program, by verdict",
                                      labels=["verdict"])
        bytes_ = CounterMetricFamily("wgmanager_datapath_bytes",
                                     "Bytes seen by the eBPF program, by verdict",
                                     labels=["verdict"])
        try:
            with PinnedMaps(self.src.pin_dir()) as maps:  # type: ignore[arg-type]
                counters = maps.read_counters()
        except WgmError:
            return
        for c in DpCounter:
            p, b = counters[c]
            packets.add_metric([c.name.lower()], p)
            bytes_.add_metric([c.name.lower()], b)
        yield packets
        yield bytes_
