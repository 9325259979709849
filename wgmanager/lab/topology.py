"""Simulated nodes and pods as network namespaces, wired like a simple host-gw CNI.

    underlay ns ``{prefix}-ul``: bridge br0 ── veth ── node ns ``{prefix}-n{i}`` (eth0)
    node ns: pod veths ``veth{j}`` ── pod ns ``{prefix}-n{i}p{j}`` (eth0)

Node i has underlay 10.99.0.i/24 (the first octets are a parameter) and fd99::i/64,
pod CIDRs 10.244.i.0/24 and fd00:244:i::/64; pod j is 10.244.i.(10+j) and
fd00:244:i::(10+j), reached by /32 and /128 routes on the node (ptp-CNI style: pods route
via 169.254.1.1 / fe80::1, which the host veth holds). Remote pod CIDRs route via the
remote node's underlay address, in plaintext:
that is the "encryption off" baseline which wgmanager must take over.

Everything is named with ``prefix``, so ``destroy`` removes exactly what ``create`` made,
and the test harness (``remove_stale_runs``) finds what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

UNDERLAY_MTU = 1500


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    netns: str
    node: str
    host_ifname: str
    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class SimNode:
    name: str
    netns: str
    index: int
    ipv4: str
    ipv6: str
    pod_cidr4: str
    pod_cidr6: str
    pods: tuple[Pod, ...] = field(default=())

    def spec(self, public_key: str | None) -> dict[str, object]:
        """The node as a mesh file / Kubernetes Node would describe it."""
        return {"name": self.name, "addresses": [self.ipv4, self.ipv6],
                "podCIDRs": [self.pod_cidr4, self.pod_cidr6], "publicKey": public_key}


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    underlay_netns: str
    bridge: str
    nodes: tuple[SimNode, ...]
    pod_mtu: int
    host_address: str | None = None  # this machine's address on the underlay, if linked

    @property
    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def node(self, name: str) -> SimNode:
        return next(n for n in self.nodes if n.name == name)

    def cross_node_pairs(self) -> list[tuple[Pod, Pod]]:
        return [(a, b) for a in self.pods for b in self.pods if a.node != b.node]


def to_doc(topo: Topology) -> dict[str, Any]:
    """The topology as JSON-able data: what a lab saves so later commands can find it."""
    return {"prefix": topo.prefix, "underlay_netns": topo.underlay_netns,
            "bridge": topo.bridge, "pod_mtu": topo.pod_mtu, "host_address": topo.host_address,
            "nodes": [asdict(n) for n in topo.nodes]}


def from_doc(doc: dict[str, Any]) -> Topology:
    nodes = tuple(SimNode(**{**n, "pods": tuple(Pod(**p) for p in n["pods"])})
                  for n in doc["nodes"])
    return Topology(doc["prefix"], doc["underlay_netns"], doc["bridge"], nodes,
                    doc["pod_mtu"], doc["host_address"])


def run(args: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, input=input,
                         timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def ip_batch(netns: str | None, commands: list[str]) -> None:
    """Runs many `ip` commands in one process (`ip -batch`): fast lab builds."""
    base = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(base, input="\n".join(commands) + "\n")


def sysctl(netns: str, assignments: dict[str, str]) -> None:
    cmd = ["ip", "netns", "exec", netns, "sysctl", "-q", "-w"]
    run(cmd + [f"{k}={v}" for k, v in assignments.items()])


OVERLAYS = ("none", "vxlan", "ipip")
VXLAN_PORT = 8472  # flannel's (the Linux default); IANA's 4789 is what the detector also knows
VXLAN_DEVICE = "flannel.1"
IPIP_DEVICE = "tunl0"  # the ipip module's fallback device, which Calico's IPIP mode uses


def create(prefix: str, *, nodes: int = 3, pods_per_node: int = 2,
           pod_mtu: int = UNDERLAY_MTU - 60, underlay: str = "10.99.0",
           host_link: bool = False, pod_routes: bool = True,
           overlay: str = "none") -> Topology:
    """Builds the namespaces; on any failure removes what it made and re-raises.

    ``underlay`` is the first three octets of the nodes' /24. With ``host_link`` this
    machine joins the underlay as ``{underlay}.254`` through a veth named ``{prefix}h``,
    so services it runs (the lab's API server) are reachable from the nodes and the nodes
    from it; pick an ``underlay`` no other route on this machine covers. Without
    ``pod_routes`` the nodes get no routes to each other's pod CIDRs: for real kubelets,
    whose CIDRs the controller-manager hands out (``kubelets.sync_routes`` routes those).

    ``overlay`` shapes the pod routes the way an overlay CNI does: ``vxlan`` as flannel's
    vxlan backend (a ``flannel.1`` VXLAN device holding the node's pod network address,
    static neighbour and FDB entries per remote node, remote pod CIDRs routed through it,
    both families), ``ipip`` as Calico's IPIP mode (IPv4 pod CIDRs routed ``onlink``
    through ``tunl0``, IPv6 natively: IPIP carries IPv4 only; needs the ipip module, which
    the CI kernel lacks and the kernel lane's VM has). ``none``: host-gw routes.
    """
    if overlay not in OVERLAYS:
        raise ValueError(f"overlay {overlay!r} is not one of {', '.join(OVERLAYS)}")
    ul = f"{prefix}-ul"
    try:
        run(["ip", "netns", "add", ul])
        sysctl(ul, {"net.ipv6.conf.all.disable_ipv6": "0"})
        ip_batch(ul, ["link add br0 type bridge", "link set br0 up",
                      "link set lo up"])
        host_address = None
        if host_link:
            host_address = f"{underlay}.254"
            ip_batch(None, [f"link add {prefix}h type veth peer name {prefix}hb netns {ul}",
                            f"addr add {host_address}/24 dev {prefix}h",
                            f"link set {prefix}h up"])
            ip_batch(ul, [f"link set {prefix}hb master br0", f"link set {prefix}hb up"])
        built: list[SimNode] = []
        for i in range(1, nodes + 1):
            built.append(_create_node(prefix, ul, i, pods_per_node, pod_mtu, underlay))
        for node in built if pod_routes else []:
            ip_batch(node.netns, _pod_routes(node, built, overlay))
            if overlay == "vxlan":  # where each remote VTEP's MAC is: the FDB (`bridge`)
                run(["bridge", "-n", node.netns, "-batch", "-"], input="".join(
                    f"fdb append {_vtep_mac(o)} dev {VXLAN_DEVICE} dst {o.ipv4}\n"
                    for o in built if o is not node))
        return Topology(prefix, ul, "br0", tuple(built), pod_mtu, host_address)
    except BaseException:
        destroy(prefix)
        raise


def _vtep_mac(node: SimNode) -> str:
    return f"02:00:00:00:{node.index >> 8:02x}:{node.index & 0xff:02x}"


def _pod_routes(node: SimNode, nodes: list[SimNode], overlay: str) -> list[str]:
    """``ip -batch`` lines for one node's routes to the other nodes' pod CIDRs."""
    others = [o for o in nodes if o is not node]
    if overlay == "vxlan":
        net4, net6 = node.pod_cidr4.split("/")[0], node.pod_cidr6.split("/")[0]
        out = [f"link add {VXLAN_DEVICE} address {_vtep_mac(node)} type vxlan id 1 "
               f"local {node.ipv4} dev eth0 dstport {VXLAN_PORT} nolearning",
               f"link set {VXLAN_DEVICE} mtu {UNDERLAY_MTU - 50} up",
               f"addr add {net4}/32 dev {VXLAN_DEVICE}",
               f"addr add {net6}/128 dev {VXLAN_DEVICE} nodad"]
        for o in others:
            o4, o6 = o.pod_cidr4.split("/")[0], o.pod_cidr6.split("/")[0]
            out += [f"neigh add {o4} lladdr {_vtep_mac(o)} dev {VXLAN_DEVICE} nud permanent",
                    f"neigh add {o6} lladdr {_vtep_mac(o)} dev {VXLAN_DEVICE} nud permanent",
                    f"route add {o.pod_cidr4} via {o4} dev {VXLAN_DEVICE} onlink",
                    f"route add {o.pod_cidr6} via {o6} dev {VXLAN_DEVICE} onlink"]
        return out
    if overlay == "ipip":
        out = [f"link set {IPIP_DEVICE} mtu {UNDERLAY_MTU - 20} up",
               f"addr add {node.pod_cidr4.split('/')[0]}/32 dev {IPIP_DEVICE}"]
        for o in others:
            out += [f"route add {o.pod_cidr4} via {o.ipv4} dev {IPIP_DEVICE} onlink",
                    f"route add {o.pod_cidr6} via {o.ipv6}"]
        return out
    return [line for o in others for line in (f"route add {o.pod_cidr4} via {o.ipv4}",
                                              f"route add {o.pod_cidr6} via {o.ipv6}")]


def add_node(topo: Topology, index: int) -> Topology:
    """A node joining a running topology (no pods, no pod routes: real kubelets'), on the
    same underlay; the topology with it."""
    if topo.host_address is None:
        raise ValueError("nodes join only a topology linked to this machine")
    underlay = topo.host_address.rsplit(".", 1)[0]
    node = _create_node(topo.prefix, topo.underlay_netns, index, 0, topo.pod_mtu, underlay)
    return Topology(topo.prefix, topo.underlay_netns, topo.bridge, (*topo.nodes, node),
                    topo.pod_mtu, topo.host_address)


def remove_node(topo: Topology, name: str) -> Topology:
    """Kills what runs in the node's namespaces (its own and its pods'), deletes them; the
    topology without it."""
    node = topo.node(name)
    for ns in [p.netns for p in node.pods] + [node.netns]:
        for pid in pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        run(["ip", "netns", "del", ns], check=False)
    return Topology(topo.prefix, topo.underlay_netns, topo.bridge,
                    tuple(n for n in topo.nodes if n.name != name), topo.pod_mtu,
                    topo.host_address)


def _create_node(prefix: str, ul: str, i: int, pods_per_node: int, pod_mtu: int,
                 underlay: str) -> SimNode:
    ns = f"{prefix}-n{i}"
    ipv4, ipv6 = f"{underlay}.{i}", f"fd99::{i}"
    run(["ip", "netns", "add", ns])
    sysctl(ns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                # production nodes run with strict reverse-path filtering; so do ours
                "net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1"})
    ip_batch(None, [f"link add n{i}-{prefix[-6:]} type veth peer name eth0 netns {ns}",
                    f"link set n{i}-{prefix[-6:]} netns {ul}"])
    ip_batch(ul, [f"link set n{i}-{prefix[-6:]} master br0", f"link set n{i}-{prefix[-6:]} up"])
    ip_batch(ns, ["link set lo up", f"link set eth0 mtu {UNDERLAY_MTU}", "link set eth0 up",
                  f"addr add {ipv4}/24 dev eth0", f"addr add {ipv6}/64 dev eth0 nodad"])
    pods: list[Pod] = []
    for j in range(1, pods_per_node + 1):
        pods.append(_create_pod(prefix, ns, i, j, pod_mtu))
    return SimNode(f"node{i}", ns, i, ipv4, ipv6, f"10.244.{i}.0/24", f"fd00:244:{i}::/64",
                   tuple(pods))


def _create_pod(prefix: str, node_ns: str, i: int, j: int, mtu: int,
                host_ifname: str | None = None) -> Pod:
    ns = f"{prefix}-n{i}p{j}"
    host_if = host_ifname or f"veth{j}"
    ipv4, ipv6 = f"10.244.{i}.{10 + j}", f"fd00:244:{i}::{10 + j:x}"
    run(["ip", "netns", "add", ns])
    sysctl(ns, {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"})
    ip_batch(node_ns, [f"link add {host_if} mtu {mtu} type veth peer name eth0 netns {ns}",
                       f"link set {host_if} up", f"addr add 169.254.1.1/32 dev {host_if}",
                       f"addr add fe80::1/64 dev {host_if} nodad",
                       f"route add {ipv4}/32 dev {host_if}",
                       f"route add {ipv6}/128 dev {host_if}"])
    ip_batch(ns, ["link set lo up", f"link set eth0 mtu {mtu}", "link set eth0 up",
                  f"addr add {ipv4}/32 dev eth0", f"addr add {ipv6}/128 dev eth0 nodad",
                  "route add 169.254.1.1 dev eth0 scope link",
                  "route add default via 169.254.1.1 dev eth0",
                  "route add ::/0 via fe80::1 dev eth0"])
    return Pod(f"node{i}-pod{j}", ns, f"node{i}", host_if, ipv4, ipv6)


def free_underlay() -> str | None:
    """A 10.9x.0 /24 that no route on this machine covers (for a host link), or None."""
    routes = run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    for second in range(90, 99):
        if f"10.{second}.0." not in routes:
            return f"10.{second}.0"
    return None


def namespaces(prefix: str) -> list[str]:
    res = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return [n for n in names if n == f"{prefix}-ul" or n.startswith(f"{prefix}-n")]


def pids_in(netns: str) -> list[int]:
    res = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in res.stdout.split()]


def destroy(prefix: str) -> None:
    """Kills every process inside our namespaces, then deletes them. Idempotent."""
    for ns in namespaces(prefix):
        for pid in pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    for ns in namespaces(prefix):
        run(["ip", "netns", "del", ns], check=False)
    run(["ip", "link", "del", f"{prefix}h"], check=False)  # the host link, if any


@contextlib.contextmanager
def topology(prefix: str, **kwargs: Any) -> Iterator[Topology]:
    topo = create(prefix, **kwargs)
    try:
        yield topo
    finally:
        destroy(prefix)
