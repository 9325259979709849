"""The underlay plumbing real lab nodes need besides their CNI: routes and NAT per node.

Role: a cluster's network outside the CNI is the provider's (routes between nodes) and
kube-proxy's (the `kubernetes` Service). The lab has neither, so this does their part, in
each node's network namespace only:

    dead_end_route(netns)        a default route that goes nowhere, and says so at once
    sync_routes(topo, cidrs)     every other node's podCIDRs via that node (host-gw style,
                                 plaintext: the traffic wgmanager will take over)
    service_dnat(netns, ...)     10.96.0.1:443 -> the API server, as kube-proxy would
"""

from __future__ import annotations

import ipaddress

from wgmanager.lab import topology
from wgmanager.lab.controlplane import SERVICE_IP
from wgmanager.lab.topology import Topology

DEAD_END = "wgmdead0"  # a veth whose peer stays down (this kernel has no dummy device)
NAT_TABLE = "wgmanager-lab"
DEAD_END_TABLE = "wgmanager-lab-dead-end"


def dead_end_route(netns: str) -> None:
    """A node needs a default route (reverse-path checks on tunnelled packets, hostNetwork
    clients of the Service address), and nothing may leave the lab: so a default route into
    a veth whose peer is down, and whatever takes it is rejected at once. Without the
    immediate error the kubelet's start-up probes of cloud metadata and DNS each wait out a
    timeout (11 s of a node's start here)."""
    topology.ip_batch(netns, [f"link add {DEAD_END} type veth peer name {DEAD_END}p",
                              f"link set {DEAD_END} up",
                              f"route add default dev {DEAD_END}",
                              f"route add ::/0 dev {DEAD_END}"])
    _nft(netns, DEAD_END_TABLE, [
        f"table inet {DEAD_END_TABLE} {{",
        "  chain output { type filter hook output priority filter;",
        f'    oifname "{DEAD_END}" reject; }}',
        "  chain forward { type filter hook forward priority filter;",
        f'    oifname "{DEAD_END}" reject; }}',
        "}",
    ], family="inet")


def sync_routes(topo: Topology, pod_cidrs: dict[str, list[str]]) -> None:
    """Each node reaches every other node's podCIDRs via that node's underlay address
    (its IPv4 or IPv6 one, by the CIDR's family). Replaces: safe to repeat."""
    for node in topo.nodes:
        commands = []
        for other in topo.nodes:
            for cidr in pod_cidrs.get(other.name, []) if other is not node else []:
                via = other.ipv4 if ipaddress.ip_network(cidr).version == 4 else other.ipv6
                commands.append(f"route replace {cidr} via {via}")
        if commands:
            topology.ip_batch(node.netns, commands)


def service_dnat(netns: str, api_host: str, api_port: int) -> None:
    """Pods (and hostNetwork pods) reach the `kubernetes` Service at 10.96.0.1:443 as with
    kube-proxy: DNAT to the API server, masqueraded to the node's address so that the
    answer finds its way back over the underlay. Replaces the node's previous rules.

    The node also routes the Service address towards the API server: a hostNetwork pod's
    connection is routed before its DNAT, and by the default route that goes into the dead
    end (``dead_end_route``), whose reject answered "connection refused"."""
    topology.ip_batch(netns, [f"route replace {SERVICE_IP}/32 via {api_host}"])
    _nft(netns, NAT_TABLE, [
        f"table ip {NAT_TABLE} {{",
        "  chain prerouting { type nat hook prerouting priority dstnat;",
        f"    ip daddr {SERVICE_IP} tcp dport 443 dnat to {api_host}:{api_port}; }}",
        "  chain output { type nat hook output priority -100;",
        f"    ip daddr {SERVICE_IP} tcp dport 443 dnat to {api_host}:{api_port}; }}",
        "  chain postrouting { type nat hook postrouting priority srcnat;",
        f"    ip daddr {api_host} tcp dport {api_port} masquerade; }}",
        "}",
    ], family="ip")


def _nft(netns: str, table: str, lines: list[str], *, family: str) -> None:
    """Replaces ``table`` in one nft transaction. Deleting it first in a separate step left
    the node without NAT hooks for a moment; a packet of an established DNATed connection
    arriving then (an API server's watch event) was not translated back, the node answered
    it with a reset, and the agent's watch hung on a connection the server had closed."""
    script = [f"add table {family} {table}", f"delete table {family} {table}", *lines]
    topology.run(["ip", "netns", "exec", netns, "nft", "-f", "-"],
                 input="\n".join(script) + "\n")
