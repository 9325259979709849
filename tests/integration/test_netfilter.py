"""Steering after netfilter: the cluster's own rules apply to encrypted traffic (issue 18),
and everything bound for a remote pod, or from a pod to a remote node, is encrypted (14.3).

The program steers at the uplink's egress, after FORWARD, POSTROUTING and kube-proxy-style
NAT. Each test installs the iptables rules a NetworkPolicy engine, kube-proxy or the CNI's
portmap plugin would, runs traffic under an underlay capture, and requires the traffic to
behave as the rules say and 0 plaintext pod packets. The last test is the sanity inversion:
the same kinds of traffic with wgmanager torn down are seen in plaintext by the same
detector. ``test_the_opt_in_fast_path_bypasses_forward`` shows in the same run what the old
veth-ingress steering did to a FORWARD rule (issue 18's finding), so the test can tell.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.harness import Cluster, applied_cluster
from wgmanager.lab.topology import Pod, SimNode

SERVICE_IP = "10.96.0.10"  # a ClusterIP outside the pod and node networks
HOSTPORT, NODEPORT, TARGET_PORT = 8080, 30080, 7000


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with applied_cluster("w18" + secrets.token_hex(2), pods_per_node=1) as c:
        c.await_sessions()
        yield c


def iptables(node: SimNode, *args: str, v6: bool = False) -> str:
    tool = "ip6tables" if v6 else "iptables"
    res = subprocess.run(["ip", "netns", "exec", node.netns, tool, "-w", *args],
                         capture_output=True, text=True, check=False, timeout=30)
    if res.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} in {node.netns}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def rule(node: SimNode, table: str, chain: str, *spec: str, v6: bool = False) -> Iterator[None]:
    """One iptables rule for the body's duration; removed afterwards, whatever happens."""
    iptables(node, "-t", table, "-I", chain, *spec, v6=v6)
    try:
        yield
    finally:
        iptables(node, "-t", table, "-D", chain, *spec, v6=v6)


def packets_matched(node: SimNode, chain: str, source: str, *, v6: bool = False) -> int:
    """The packet counter of the DROP rule for ``source`` in ``chain`` (filter table)."""
    out = iptables(node, "-L", chain, "-v", "-x", "-n", v6=v6)
    for line in out.splitlines():
        fields = line.split()
        if "DROP" in fields and any(f.split("/")[0] == source for f in fields):
            return int(fields[0])
    raise AssertionError(f"no DROP rule for {source} in {chain}: {out}")


def ping_output(netns: str, dst: str, *extra: str) -> str:
    res = subprocess.run(["ip", "netns", "exec", netns, "ping", "-n", "-c", "2", "-i", "0.2",
                          "-W", "2", "-w", "4", *extra, dst],
                         capture_output=True, text=True, check=False, timeout=30)
    return res.stdout + res.stderr


def tcp_ok(cluster: Cluster, client: Pod, server: Pod, host: str, port: int) -> None:
    with cluster.tcp_server(server, TARGET_PORT, count=1):
        res = cluster.tcp_send(client, host, port, nbytes=64 * 1024)
    assert res["ok"], res


# -- issue 18: the sending node's netfilter rules apply --------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_an_egress_forward_drop_on_the_sender_is_honored(cluster: Cluster, family: str) -> None:
    """The shape of an iptables NetworkPolicy engine's egress rule (Calico's felix in
    iptables mode, kube-router): FORWARD -s <pod> -d <remote pod CIDR> -j DROP."""
    node1, node2, node3 = cluster.topo.nodes
    pod, v6 = node1.pods[0], family == "ipv6"
    cidr = node2.pod_cidr6 if v6 else node2.pod_cidr4
    src = getattr(pod, family)
    with rule(node1, "filter", "FORWARD", "-s", src, "-d", cidr, "-j", "DROP", v6=v6):
        with cluster.capture(f"forward-drop-{family}") as cap:
            _, received = cluster.ping(pod, getattr(node2.pods[0], family), count=3,
                                       interval=0.05, wait=1)
            # The rule is specific: the same pod still reaches a pod on another node.
            assert cluster.reaches(pod, getattr(node3.pods[0], family))
        assert received == 0
        assert packets_matched(node1, "FORWARD", src, v6=v6) >= 3
    assert cap.plaintext_pod_packets() == 0, cap.lines("net 10.244.0.0/16")[:10]
    assert cap.wireguard_packets() > 0
    assert cluster.reaches(pod, getattr(node2.pods[0], family))  # rule gone: reachable again


def test_clusterip_dnat_to_a_remote_pod_is_encrypted(cluster: Cluster) -> None:
    """kube-proxy's iptables mode on the sending node: a Service address DNATed to a pod on
    another node; the packet leaves with the pod as destination, through the tunnel."""
    node1, node2, _ = cluster.topo.nodes
    client, server = node1.pods[0], node2.pods[0]
    spec = ("-d", SERVICE_IP, "-p", "tcp", "--dport", "80", "-j", "DNAT",
            "--to-destination", f"{server.ipv4}:{TARGET_PORT}")
    with rule(node1, "nat", "PREROUTING", *spec):
        cluster.assert_only_wireguard(
            "clusterip", lambda: tcp_ok(cluster, client, server, SERVICE_IP, 80))


def test_a_hostport_on_another_node_answers_through_the_tunnel(cluster: Cluster) -> None:
    """The CNI portmap plugin's DNAT on node2: node2's address:8080 -> its pod. The reply is
    reverse-NATed to come from node2's address, so node1 must accept that source from
    node2's peer (node addresses are allowed IPs) and the request from a pod to a node
    address must be steered too (node entries)."""
    node1, node2, _ = cluster.topo.nodes
    client, server = node1.pods[0], node2.pods[0]
    spec = ("-d", node2.ipv4, "-p", "tcp", "--dport", str(HOSTPORT), "-j", "DNAT",
            "--to-destination", f"{server.ipv4}:{TARGET_PORT}")
    with rule(node2, "nat", "PREROUTING", *spec):
        cluster.assert_only_wireguard(
            "hostport", lambda: tcp_ok(cluster, client, server, node2.ipv4, HOSTPORT))


def test_a_nodeport_to_a_pod_on_a_third_node_answers_through_the_tunnel(
        cluster: Cluster) -> None:
    """kube-proxy on node2: NodePort DNAT to a pod on node3 and masquerade (the packet to
    node3 comes from node2's address), then both reverse translations on the way back."""
    node1, node2, node3 = cluster.topo.nodes
    client, server = node1.pods[0], node3.pods[0]
    dnat = ("-d", node2.ipv4, "-p", "tcp", "--dport", str(NODEPORT), "-j", "DNAT",
            "--to-destination", f"{server.ipv4}:{TARGET_PORT}")
    masq = ("-d", server.ipv4, "-m", "conntrack", "--ctstate", "DNAT", "-j", "MASQUERADE")
    with rule(node2, "nat", "PREROUTING", *dnat), rule(node2, "nat", "POSTROUTING", *masq):
        cluster.assert_only_wireguard(
            "nodeport", lambda: tcp_ok(cluster, client, server, node2.ipv4, NODEPORT))


def test_the_opt_in_fast_path_bypasses_forward(cluster: Cluster) -> None:
    """What issue 18 found, kept as a documented opt-in (--pod-interfaces): steering at the
    pod veth's ingress skips the sender's FORWARD chain. Proves the DROP test above can
    tell the two designs apart; the default is restored afterwards."""
    node1, node2, _ = cluster.topo.nodes
    pod = node1.pods[0]
    cluster.wgm(node1, "apply", "--mesh", str(cluster.mesh_path), "--node-name", node1.name,
                "--pod-interfaces", "veth*", *cluster.node_args(node1))
    try:
        with rule(node1, "filter", "FORWARD", "-s", pod.ipv4, "-d", node2.pod_cidr4,
                  "-j", "DROP"):
            _, received = cluster.ping(pod, node2.pods[0].ipv4, count=3, interval=0.05)
            assert received == 3
            assert packets_matched(node1, "FORWARD", pod.ipv4) == 0
    finally:
        cluster.apply(node1)  # the default again: the filter on the veth is removed
    res = subprocess.run(["ip", "netns", "exec", node1.netns, "tc", "filter", "show", "dev",
                          pod.host_ifname, "ingress"], capture_output=True, text=True,
                         check=False)
    assert "from_pod" not in res.stdout


# -- issue 14.3: host -> remote pod, pod -> remote node, ICMP errors -------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_host_reaches_remote_pods_through_the_tunnel(cluster: Cluster, family: str) -> None:
    node1, node2, _ = cluster.topo.nodes
    dst = getattr(node2.pods[0], family)

    def traffic() -> None:
        out = ping_output(node1.netns, dst)
        assert " 0% packet loss" in out, out

    cluster.assert_only_wireguard(f"host-to-pod-{family}", traffic)


def test_an_older_agents_pods_get_the_hosts_traffic_as_before_and_pods_stay_encrypted(
        cluster: Cluster) -> None:
    """Mid-upgrade: node2's Node does not say it accepts packets from our node address (an
    older agent, whose peer for us lacks our addresses and would drop them). node1 then
    leaves its host's traffic to node2's pods as before the upgrade (in clear, the old
    behaviour, rather than dropped: NodePort traffic masqueraded through an upgraded node
    would stop for the length of a rollout) while pod-to-pod traffic stays encrypted; once
    node2 says it accepts, the host's traffic goes through the tunnel again."""
    node1, node2, _ = cluster.topo.nodes
    dst = node2.pods[0].ipv4
    cluster.write_mesh(overrides={node2.name: {"features": []}})
    try:
        cluster.apply(node1)
        with cluster.capture("older-peer-host") as cap:
            out = ping_output(node1.netns, dst)
            assert " 0% packet loss" in out, out
        assert cap.count(f"src host {node1.ipv4} and dst host {dst}") > 0
        cluster.assert_only_wireguard("older-peer-pods", lambda: None if cluster.ping(
            node1.pods[0], dst, count=3, interval=0.05)[1] == 3 else pytest.fail("pod ping"))
    finally:
        cluster.write_mesh()
        cluster.apply(node1)

    def traffic() -> None:
        out = ping_output(node1.netns, dst)
        assert " 0% packet loss" in out, out

    cluster.assert_only_wireguard("newer-peer-host", traffic)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pods_reach_remote_node_addresses_through_the_tunnel(cluster: Cluster,
                                                              family: str) -> None:
    node1, node2, _ = cluster.topo.nodes
    dst = getattr(node2, family)

    def traffic() -> None:
        assert cluster.ping(node1.pods[0], dst, count=3, interval=0.05)[1] == 3

    cluster.assert_only_wireguard(f"pod-to-node-{family}", traffic)


_ERRORS = {
    # (family, kind): (ping arguments, destination on node2, what ping prints)
    ("ipv4", "ttl"): (("-t", "2"), "pod", "Time to live exceeded"),
    ("ipv6", "ttl"): (("-t", "2"), "pod", "Time exceeded: Hop limit"),
    ("ipv4", "unreachable"): ((), "free", "Unreachable"),
    ("ipv6", "unreachable"): ((), "free", "unreachable"),
}


@pytest.mark.parametrize(("family", "kind"), list(_ERRORS))
def test_icmp_errors_about_pod_traffic_come_back_through_the_tunnel(
        cluster: Cluster, family: str, kind: str) -> None:
    """node2 generates the error (a TTL that runs out on its last hop, an address in its pod
    CIDR with no pod): from node2's address to the pod, quoting the pod's packet. Before,
    it left in plaintext (528 bytes of pod data per IPv4 error, issue 14)."""
    node1, node2, _ = cluster.topo.nodes
    args, where, expect = _ERRORS[(family, kind)]
    pod = node2.pods[0]
    # An address in node2's pod CIDR that no pod holds: node2 has no route for it.
    free = f"10.244.{node2.index}.99" if family == "ipv4" else f"fd00:244:{node2.index}::99"
    dst = getattr(pod, family) if where == "pod" else free
    seen: list[str] = []

    def traffic() -> None:
        seen.append(ping_output(node1.pods[0].netns, dst, *args))

    cluster.assert_only_wireguard(f"icmp-{kind}-{family}", traffic)
    assert expect in seen[0], seen[0]
    assert f"From {getattr(node2, family)}" in seen[0], seen[0]


# -- the sanity inversion ----------------------------------------------------------------------


def test_sanity_the_detector_sees_all_of_it_without_wgmanager(cluster: Cluster) -> None:
    node1, node2, node3 = cluster.topo.nodes
    client = node1.pods[0]
    for node in cluster.topo.nodes:
        cluster.teardown(node)
    try:
        for name, traffic in {
            "host-to-pod": lambda: ping_output(node1.netns, node2.pods[0].ipv4),
            "pod-to-node": lambda: cluster.ping(client, node2.ipv6, count=2, interval=0.05),
            "icmp-ttl": lambda: ping_output(client.netns, node2.pods[0].ipv4, "-t", "2"),
            "pod-to-pod-tcp": lambda: tcp_ok(cluster, client, node3.pods[0], node3.pods[0].ipv4,
                                       TARGET_PORT),
        }.items():
            with cluster.capture(f"sanity-{name}") as cap:
                traffic()
            assert cap.plaintext_pod_packets() > 0, name
            assert cap.wireguard_packets() == 0, name
    finally:
        cluster.apply_all()
    cluster.await_sessions()
