"""Overlay CNIs: pods reach other nodes through a VXLAN device, as with flannel's vxlan
backend (issue 18). The program on that device's egress sees the inner packet and steers
it into WireGuard, so nothing crosses the underlay VXLAN-encapsulated in clear.

The detector opens encapsulations (``Capture.encapsulated_pod_packets``): the sanity
inversion shows the same traffic with wgmanager torn down as VXLAN packets whose outer
header holds only node addresses, which an address filter alone would count as 0. IPIP
(Calico's mode) needs the ipip module, which this kernel lacks: it runs in the kernel lane
(tests/kernel/guest/test_kernel_overlay.py).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.harness import FAMILIES, Cluster, applied_cluster
from wgmanager.lab.topology import VXLAN_DEVICE


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with applied_cluster("w18" + secrets.token_hex(2), pods_per_node=1,
                         overlay="vxlan") as c:
        c.await_sessions()
        yield c


def _all_pairs(cluster: Cluster) -> None:
    for a, b in cluster.topo.cross_node_pairs():
        for fam in FAMILIES:
            assert cluster.ping(a, getattr(b, fam), count=2, interval=0.05)[1] == 2, \
                f"{a.name} -> {b.name} ({fam})"


def test_pod_routes_go_through_the_vxlan_device(cluster: Cluster) -> None:
    node1, node2, _ = cluster.topo.nodes
    for dst in (node2.pods[0].ipv4, node2.pods[0].ipv6):
        out = subprocess.run(["ip", "-n", node1.netns, "route", "get", dst],
                             capture_output=True, text=True, check=True).stdout
        assert f"dev {VXLAN_DEVICE}" in out, out


def test_the_program_is_on_every_vxlan_device(cluster: Cluster) -> None:
    for node in cluster.topo.nodes:
        out = subprocess.run(["ip", "netns", "exec", node.netns, "tc", "filter", "show",
                              "dev", VXLAN_DEVICE, "egress"],
                             capture_output=True, text=True, check=True).stdout
        assert "to_underlay" in out, (node.name, out)


def test_every_pod_pair_is_encrypted_through_the_overlay(cluster: Cluster) -> None:
    cluster.assert_only_wireguard("overlay-vxlan", lambda: _all_pairs(cluster))
    assert cluster.tcp_failures() == []


def test_an_egress_forward_drop_is_honored_through_the_overlay(cluster: Cluster) -> None:
    node1, node2, _ = cluster.topo.nodes
    pod = node1.pods[0]
    spec = ["FORWARD", "-s", pod.ipv4, "-d", node2.pod_cidr4, "-j", "DROP"]
    ipt = ["ip", "netns", "exec", node1.netns, "iptables", "-w"]
    subprocess.run([*ipt, "-I", *spec], check=True)
    try:
        with cluster.capture("overlay-forward-drop") as cap:
            assert cluster.ping(pod, node2.pods[0].ipv4, count=3, interval=0.05,
                                wait=1)[1] == 0
    finally:
        subprocess.run([*ipt, "-D", *spec], check=True)
    assert cap.plaintext_pod_packets() == 0
    assert cluster.reaches(pod, node2.pods[0].ipv4)


def test_sanity_the_detector_sees_inside_vxlan_without_wgmanager(cluster: Cluster) -> None:
    for node in cluster.topo.nodes:
        cluster.teardown(node)
    try:
        with cluster.capture("overlay-plaintext") as cap:
            _all_pairs(cluster)  # the overlay alone carries them, in clear
        assert cap.encapsulated_pod_packets() > 0
        assert cap.count("udp port 8472") > 0
        assert cap.count("net 10.244.0.0/16 or net fd00:244::/32") == 0  # outer: nodes only
        assert cap.plaintext_pod_packets() == cap.encapsulated_pod_packets()
    finally:
        cluster.apply_all()
    cluster.await_sessions()
    cluster.assert_only_wireguard("overlay-re-encrypted", lambda: _all_pairs(cluster))
