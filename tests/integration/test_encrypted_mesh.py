"""Three simulated nodes, two pods each, real wireguard-go and the real eBPF program."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import FAMILIES, Cluster
from wgmanager.datapath.maps import Counter, PinnedMaps
from wgmanager.lab.traffic import continuous_ping


def test_every_cross_node_pod_pair_reaches_each_other_over_icmp(cluster: Cluster) -> None:
    assert cluster.unreachable_pairs() == []


def test_every_cross_node_pod_pair_talks_tcp(cluster: Cluster) -> None:
    assert cluster.tcp_failures() == []


def _all_pairs_traffic(cluster: Cluster) -> None:
    for a, b in cluster.topo.cross_node_pairs():
        cluster.ping(a, b.ipv4, count=2, interval=0.05)
        cluster.ping(a, b.ipv6, count=2, interval=0.05)


def test_underlay_carries_only_wireguard_and_detector_sees_plaintext_without_it(
        cluster: Cluster) -> None:
    cluster.assert_only_wireguard("encrypted", lambda: _all_pairs_traffic(cluster))

    # Sanity inversion: encryption off (programs detached, device gone, the CNI's plain
    # routes in charge). The same traffic and the same detector must now see pod packets.
    for node in cluster.topo.nodes:
        cluster.teardown(node)
    try:
        with cluster.capture("plaintext") as plain:
            _all_pairs_traffic(cluster)
        assert plain.plaintext_pod_packets() > 0
        assert plain.wireguard_packets() == 0
    finally:
        cluster.apply_all()
    with cluster.capture("re-encrypted") as again:
        _all_pairs_traffic(cluster)
    assert again.plaintext_pod_packets() == 0


def test_counters_show_redirected_traffic(cluster: Cluster) -> None:
    node1 = cluster.topo.nodes[0]
    pod = node1.pods[0]
    target = cluster.topo.nodes[1].pods[0]
    with PinnedMaps(cluster.pin_root / node1.name) as maps:
        before = maps.read_counters()[Counter.REDIRECTED][0]
        assert cluster.ping(pod, target.ipv4, count=5, interval=0.05)[1] == 5
        after = maps.read_counters()[Counter.REDIRECTED][0]
    assert after - before >= 5


@pytest.mark.parametrize("how", ["key withdrawn", "node deleted"])
def test_removed_peer_traffic_is_dropped_not_leaked(cluster: Cluster, how: str) -> None:
    node1, node2, node3 = cluster.topo.nodes
    src, gone, kept = node1.pods[0], node3.pods[0], node2.pods[0]
    if how == "key withdrawn":
        cluster.write_mesh(keyless={node3.name})
    else:
        cluster.write_mesh(omit={node3.name})
    try:
        summary = cluster.apply(node1)
        assert summary["peers"] == 1
        with PinnedMaps(cluster.pin_root / node1.name) as maps:
            dropped_before = maps.read_counters()[Counter.DROPPED_NOT_READY][0]
            with cluster.capture(f"removed-{how.replace(' ', '-')}") as cap:
                assert cluster.ping(src, gone.ipv4, count=3, interval=0.05, wait=1)[1] == 0
                assert cluster.ping(src, gone.ipv6, count=3, interval=0.05, wait=1)[1] == 0
                assert cluster.reaches(src, kept.ipv4)
            dropped = maps.read_counters()[Counter.DROPPED_NOT_READY][0] - dropped_before
        assert cap.plaintext_pod_packets() == 0
        assert dropped >= 6
    finally:
        cluster.write_mesh()
        cluster.apply(node1)
    assert cluster.reaches(src, gone.ipv4)


def test_reloading_the_datapath_under_a_10ms_ping_loses_nothing(cluster: Cluster) -> None:
    node1, node2, _ = cluster.topo.nodes
    src, dst = node1.pods[0], node2.pods[0]
    assert cluster.reaches(src, dst.ipv4)
    run = continuous_ping(src, dst.ipv4, 6.0)
    reloads = 0
    while run.thread.is_alive() and reloads < 3:
        # A fresh process: recompiles the program and swaps it in on the pinned maps.
        cluster.apply(node1)
        cluster.apply(node2)
        reloads += 1
    sent, received = run.result()
    assert reloads >= 2
    assert sent > 0 and received == sent, run.output


def test_withdrawing_one_allowed_ip_keeps_the_peers_other_traffic_flowing(
        cluster: Cluster) -> None:
    node1, node2, _ = cluster.topo.nodes
    src, dst = node1.pods[0], node2.pods[0]
    assert cluster.reaches(src, dst.ipv4)
    run = continuous_ping(src, dst.ipv4, 3.0)
    try:
        # node2 now announces only its IPv4 pod CIDR: node1's peer loses the IPv6 one.
        cluster.write_mesh(overrides={node2.name: {"podCIDRs": [node2.pod_cidr4]}})
        summary = cluster.apply(node1)
        assert summary["peer_ops"] == 1
        sent, received = run.result()
        assert received == sent, run.output
        assert not cluster.reaches(src, dst.ipv6)  # withdrawn: dropped, never leaked
    finally:
        run.thread.join()
        cluster.write_mesh()
        cluster.apply(node1)
    assert cluster.reaches(src, dst.ipv6)


def test_1500_byte_payloads_arrive_without_underlay_fragmentation(cluster: Cluster) -> None:
    node1, node2, _ = cluster.topo.nodes
    src, dst = node1.pods[0], node2.pods[1]
    with cluster.capture("mtu") as cap:
        with cluster.tcp_server(dst, 7001, count=2):
            for fam in FAMILIES:
                res = cluster.tcp_send(src, getattr(dst, fam), 7001, nbytes=1500)
                assert res["ok"], res
        # ICMP with a 1500-byte payload: the pod fragments it to its own MTU before the
        # tunnel; every encrypted packet must still fit the underlay in one piece.
        for fam in FAMILIES:
            sent, received = cluster.ping(src, getattr(dst, fam), count=3, interval=0.05,
                                          size=1500)
            assert received == 3, (sent, received)  # every echo answered
    assert cap.wireguard_packets() > 0
    assert cap.fragments() == 0
    assert cap.plaintext_pod_packets() == 0


def test_apply_again_changes_nothing(cluster: Cluster) -> None:
    node = cluster.topo.nodes[0]
    summary = cluster.apply(node)
    assert summary["peer_ops"] == 0
    assert summary["map_changes"] == 0


def test_wireguard_go_outlives_the_process_that_started_it(cluster: Cluster) -> None:
    node = cluster.topo.nodes[0]
    pidfile = Path(cluster.run_dir / node.name / "wg" / "wgm0.pid")
    pid = int(pidfile.read_text())
    assert Path(f"/proc/{pid}").exists()  # every `apply` above was a process that exited
