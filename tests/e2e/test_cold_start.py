"""A cold start: three agents start together while the lab's own checks already send traffic.

A WireGuard handshake sent before the other side knows the sender's key is dropped
unanswered, and WireGuard retries only after 5 s. Agents learn each other's keys at slightly
different moments, so before every agent started a handshake with each peer it adds (the
side that learns last always succeeds), 3 of 6 cold starts left a pair of nodes dark for
1.8-4.7 s after `lab up` had returned; 0 of 7 since.
"""

from __future__ import annotations

import secrets

from tests.e2e.kubecluster import KubeCluster
from tests.integration.harness import cleanup_prefix
from wgmanager.lab.traffic import continuous_ping


def test_every_pod_pair_answers_at_once_after_a_cold_start() -> None:
    prefix = "wgs" + secrets.token_hex(2)
    kc = KubeCluster(prefix)
    try:
        kc.lab.up(nodes=3, pods_per_node=1)
        pods = [n.pods[0] for n in kc.lab.nodes]
        pairs = [(a, b) for a in pods for b in pods if a != b]
        runs = [continuous_ping(a, b.ipv4, seconds=2.0) for a, b in pairs]
        lost = {f"{a.name}->{b.name}": sent - got
                for (a, b), run in zip(pairs, runs, strict=True)
                for sent, got in [run.result()]}
    finally:
        kc.lab.down()
        cleanup_prefix(prefix)
    assert all(n == 0 for n in lost.values()), lost
