"""One node's encryption, end to end: key, WireGuard device, peers and eBPF datapath.

``NodeReconciler`` turns a list of node descriptions into the live state, in an order that
never lets pod traffic out in plaintext:

1. the program's pinned maps get fail-closed entries (every remote CIDR is DROP until its
   peer exists) before any program is attached;
2. the device, its key and its link settings are ensured, and the map learns its ifindex
   (two devices while the node rotates its key: see wgmanager.core.rotation);
3. the programs are attached (or atomically replaced, after a restart);
4. peers are changed incrementally, the device is read back, and only CIDRs whose peer the
   device really holds become REDIRECT.

Step 1 only closes: it adds entries and downgrades ones that must stop redirecting, but
never re-targets a working redirect (a key change on a peer, the end of a rotation), which
waits for step 4, once the device and peer it needs are in place.

Every step reads live state and writes only differences, so a repeat run (an agent restart)
changes nothing and drops nothing. The Kubernetes agent and `wgmanager apply` both use it.

Modules: ``node`` (``NodeReconciler``: the full and incremental passes), ``result`` (what a
pass did), ``peers`` (first-handshake kicks, the replaced-peer grace), ``device`` (device
set-up around the backend, reads, `wgmanager teardown`).
"""

from wgmanager.reconciler.device import teardown
from wgmanager.reconciler.node import NodeReconciler
from wgmanager.reconciler.peers import (
    HANDSHAKE_KICK,
    REPLACED_PEER_GRACE,
    handshake_kicks,
    new_peers,
    start_handshakes,
)
from wgmanager.reconciler.result import CHANGES, FULL, TIMERS, ReconcileResult

__all__ = ["CHANGES", "FULL", "HANDSHAKE_KICK", "REPLACED_PEER_GRACE", "TIMERS",
           "NodeReconciler", "ReconcileResult", "handshake_kicks", "new_peers",
           "start_handshakes", "teardown"]
