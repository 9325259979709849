"""A node whose pod CIDR overlaps an older node's fails closed itself, proven by capture.

Audit: the other nodes rejected the bad node, but the bad node sent its own pods' traffic
for the overlapped range out in plaintext through the CNI's route (1,846 packets for an
exact overlap, 1,729 for a /16 supernet). Here node3 (the newest) is given node2's IPv4
pod CIDR, then a /16 over everyone's, and pings node2's pod from its pod and from the host
network: nothing may leave in clear.
The sanity inversion (node3's datapath torn down) shows the same pings on the underlay.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.harness import Cluster, applied_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with applied_cluster("wgv" + secrets.token_hex(3), pods_per_node=1) as c:
        yield c


@pytest.mark.parametrize("claim", ["exact", "supernet"])
def test_the_newer_node_drops_what_it_cannot_own(cluster: Cluster, claim: str) -> None:
    _, node2, node3 = cluster.topo.nodes
    cidr4 = node2.pod_cidr4 if claim == "exact" else "10.244.0.0/16"
    bad = cluster.run_dir / f"mesh-{claim}.json"
    cluster.write_mesh(overrides={node3.name: {"podCIDRs": [cidr4, node3.pod_cidr6]}})
    cluster.mesh_path.rename(bad)
    cluster.apply(node3, bad)
    try:
        with cluster.capture(f"overlap-{claim}") as cap:
            _, received = cluster.ping(node3.pods[0], node2.pods[0].ipv4, count=3,
                                       interval=0.05, wait=1)
            # The node's own host traffic to the contested range is dropped as well: the
            # program steers at the uplink's egress whatever the source.
            host = subprocess.run(["ip", "netns", "exec", node3.netns, "ping", "-n", "-c",
                                   "3", "-i", "0.05", "-W", "1", node2.pods[0].ipv4],
                                  capture_output=True, text=True, check=False).stdout
        assert received == 0
        assert " 0 received" in host, host
        assert cap.plaintext_pod_packets() == 0, cap.lines("net 10.244.0.0/16")[:10]
    finally:
        cluster.write_mesh()
        cluster.apply(node3)
    assert cluster.ping(node3.pods[0], node2.pods[0].ipv4, count=2, interval=0.05)[1] == 2


def test_sanity_the_capture_sees_these_pings_without_the_datapath(cluster: Cluster) -> None:
    _, node2, node3 = cluster.topo.nodes
    cluster.teardown(node3)
    try:
        with cluster.capture("overlap-sanity") as cap:
            cluster.ping(node3.pods[0], node2.pods[0].ipv4, count=3, interval=0.05, wait=1)
        assert cap.plaintext_pod_packets() > 0
    finally:
        cluster.apply(node3)
