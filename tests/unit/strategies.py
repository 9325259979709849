"""Shared hypothesis strategies and builders for the pure core's tests.

Two kinds of data are generated:

* peer sets for the planner: keys and allowed IPs come mostly from small fixed pools so that
  actual and desired sets share keys and networks (moves, nesting, families) far more often
  than independent random values would;
* clusters for the mesh: a local node plus remote nodes that are all valid and all accepted
  (unique keys, disjoint pod CIDRs, an address of the underlay family each), so a test can
  change one thing and check that nothing else moves.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from wgmanager.core.keys import KEY_LEN, PrivateKey, PublicKey
from wgmanager.core.mesh import Mesh, compute_mesh
from wgmanager.core.model import (
    Endpoint,
    IPNetwork,
    MeshConfig,
    NodeSpec,
    PeerConfig,
    PeerState,
)

# Enough examples to find ordering and ownership corner cases, fast enough for 2 cores.
# WGM_PROPERTY_EXAMPLES=5000 makes a one-off deep run.
PROPERTY = settings(max_examples=int(os.environ.get("WGM_PROPERTY_EXAMPLES", "200")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# keys


def _nonzero(raw: bytes) -> bool:
    return raw != bytes(KEY_LEN)


raw_keys = st.binary(min_size=KEY_LEN, max_size=KEY_LEN).filter(_nonzero)
public_keys = raw_keys.map(PublicKey)
private_keys = raw_keys.map(PrivateKey)

# Fixed keys shared between generated actual and desired peer sets.
KEY_POOL: tuple[PublicKey, ...] = tuple(PublicKey(bytes([i]) * KEY_LEN) for i in range(1, 7))
pooled_keys = st.one_of(st.sampled_from(KEY_POOL), public_keys)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_key() -> PublicKey:
    return PrivateKey.generate().public_key


# ---------------------------------------------------------------------------------------------
# networks and endpoints

NET_POOL: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/16", "10.0.0.128/25", "10.0.0.1/32",
    "192.168.0.0/24", "0.0.0.0/0",
    "fd00::/64", "fd00:0:0:1::/64", "fd00::/48", "fd00::1/128", "::/0",
))


@st.composite
def random_networks(draw: st.DrawFn) -> IPNetwork:
    if draw(st.booleans()):
        addr = draw(st.integers(0, 2**32 - 1))
        prefix = draw(st.integers(0, 32))
        return ipaddress.IPv4Network((addr, prefix), strict=False)
    addr = draw(st.integers(0, 2**128 - 1))
    prefix = draw(st.integers(0, 128))
    return ipaddress.IPv6Network((addr, prefix), strict=False)


networks = st.one_of(st.sampled_from(NET_POOL), random_networks())

ENDPOINT_POOL: tuple[Endpoint, ...] = (
    Endpoint(ipaddress.ip_address("192.168.1.1"), 51820),
    Endpoint(ipaddress.ip_address("192.168.1.1"), 51821),
    Endpoint(ipaddress.ip_address("192.168.1.2"), 51820),
    Endpoint(ipaddress.ip_address("fd10::1"), 51820),
)
endpoints = st.sampled_from(ENDPOINT_POOL)
keepalives = st.sampled_from((0, 0, 25, 60))


@st.composite
def _allowed_ip_partition(draw: st.DrawFn,
                          keys: list[PublicKey]) -> dict[PublicKey, set[IPNetwork]]:
    """Each drawn network goes to at most one key: WireGuard gives an IP to one peer only."""
    owned: dict[PublicKey, set[IPNetwork]] = {k: set() for k in keys}
    if not keys:
        return owned
    for net in draw(st.lists(networks, unique=True, max_size=10)):
        owner = draw(st.integers(-1, len(keys) - 1))
        if owner >= 0:
            owned[keys[owner]].add(net)
    return owned


@st.composite
def desired_peers(draw: st.DrawFn) -> dict[PublicKey, PeerConfig]:
    """A desired peer set. Endpoints are always set, as compute_mesh always sets them (and
    WireGuard has no way to clear an endpoint; see test_plan for that case)."""
    keys = draw(st.lists(pooled_keys, unique=True, max_size=6))
    ips = draw(_allowed_ip_partition(keys))
    return {
        k: PeerConfig(k, draw(endpoints), frozenset(ips[k]), draw(keepalives)) for k in keys
    }


@st.composite
def actual_peers(draw: st.DrawFn) -> dict[PublicKey, PeerState]:
    """A device's peers as read back: any endpoint (or none), live statistics."""
    keys = draw(st.lists(pooled_keys, unique=True, max_size=6))
    ips = draw(_allowed_ip_partition(keys))
    return {
        k: PeerState(
            k,
            draw(st.one_of(st.none(), endpoints)),
            frozenset(ips[k]),
            draw(keepalives),
            last_handshake=draw(st.one_of(st.none(), st.floats(0, 2e9))),
            rx_bytes=draw(st.integers(0, 2**40)),
            tx_bytes=draw(st.integers(0, 2**40)),
        )
        for k in keys
    }


def states_from(peers: Mapping[PublicKey, PeerConfig]) -> dict[PublicKey, PeerState]:
    """The device state that holds exactly ``peers`` (as after a successful apply)."""
    return {
        k: PeerState(p.public_key, p.endpoint, p.allowed_ips, p.persistent_keepalive)
        for k, p in peers.items()
    }


def configs(peers: Mapping[PublicKey, PeerState]) -> dict[PublicKey, PeerConfig]:
    return {k: p.config() for k, p in peers.items()}


# ---------------------------------------------------------------------------------------------
# clusters


def v4_cidr(slot: int) -> str:
    return f"10.244.{slot}.0/24"


def v6_cidr(slot: int) -> str:
    return f"fd00:244:{slot:x}::/64"


def v4_addr(slot: int) -> str:
    return f"172.16.{slot}.10"


def v6_addr(slot: int) -> str:
    return f"fd10::{slot:x}:10"


@dataclass(frozen=True)
class Cluster:
    """A cluster in which every node is valid and accepted by ``local_name``."""

    local_name: str
    local_key: PublicKey
    specs: tuple[NodeSpec, ...]
    config: MeshConfig
    family: int  # the underlay family: that of the local node's first address
    used_slots: frozenset[int] = field(default_factory=frozenset)

    @property
    def remote_specs(self) -> tuple[NodeSpec, ...]:
        return tuple(s for s in self.specs if s.name != self.local_name)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.specs)

    def mesh(self, specs: Iterable[NodeSpec] | None = None, *,
             previous: Mesh | None = None) -> Mesh:
        return compute_mesh(
            local_name=self.local_name,
            local_key=self.local_key,
            specs=self.specs if specs is None else specs,
            config=self.config,
            previous=previous,
        )

    def addr(self, slot: int) -> str:
        return v4_addr(slot) if self.family == 4 else v6_addr(slot)

    def other_addr(self, slot: int) -> str:
        return v6_addr(slot) if self.family == 4 else v4_addr(slot)


@st.composite
def node_addresses(draw: st.DrawFn, slot: int, family: int, *, local: bool) -> tuple[str, ...]:
    """Always one address of the underlay family; maybe one of the other, in either order."""
    mine = v4_addr(slot) if family == 4 else v6_addr(slot)
    other = v6_addr(slot) if family == 4 else v4_addr(slot)
    shape = draw(st.sampled_from(("one", "dual", "other-first")))
    if shape == "one":
        return (mine,)
    if shape == "dual" or local:  # the local node's first address sets the underlay family
        return (mine, other)
    return (other, mine)


@st.composite
def pod_cidrs(draw: st.DrawFn, slot: int) -> tuple[str, ...]:
    stack = draw(st.sampled_from(("v4", "v6", "dual", "dual-v6-first")))
    return {
        "v4": (v4_cidr(slot),),
        "v6": (v6_cidr(slot),),
        "dual": (v4_cidr(slot), v6_cidr(slot)),
        "dual-v6-first": (v6_cidr(slot), v4_cidr(slot)),
    }[stack]


@st.composite
def clusters(draw: st.DrawFn, *, min_remote: int = 0, max_remote: int = 7) -> Cluster:
    n_remote = draw(st.integers(min_remote, max_remote))
    family = draw(st.sampled_from((4, 6)))
    slots = draw(st.lists(st.integers(0, 255), unique=True,
                          min_size=n_remote + 1, max_size=n_remote + 1))
    keys = draw(st.lists(raw_keys, unique=True, min_size=n_remote + 1, max_size=n_remote + 1))
    specs: list[NodeSpec] = []
    for i, (slot, raw) in enumerate(zip(slots, keys, strict=True)):
        local = i == 0
        specs.append(NodeSpec(
            name=f"node-{i}",
            addresses=draw(node_addresses(slot, family, local=local)),
            pod_cidrs=draw(pod_cidrs(slot)),
            # The local node's published key is ignored (the caller passes its own).
            public_key=None if local and draw(st.booleans()) else b64(raw),
            created=float(draw(st.integers(0, 1000))),
            # Unsaid (a mesh file), an older agent (none), this version, or an unknown one.
            features=draw(st.sampled_from((None, (), ("node-addresses",),
                                           ("node-addresses", "future"), ("future",)))),
        ))
    # Cluster-wide CIDRs: usually around every pod CIDR, sometimes equal to or inside one
    # (which the datapath must not let shadow that node's own entry).
    some_slot = draw(st.sampled_from(slots))
    cluster_cidr_choices = [
        "10.244.0.0/16", "fd00:244::/32", "10.0.0.0/8", "192.168.99.0/24",
        v4_cidr(some_slot), v6_cidr(some_slot),
        f"10.244.{some_slot}.64/26", f"fd00:244:{some_slot:x}:0:8000::/65",
    ]
    config = MeshConfig(
        listen_port=draw(st.integers(1, 65535)),
        persistent_keepalive=draw(keepalives),
        cluster_cidrs=tuple(ipaddress.ip_network(c) for c in draw(
            st.lists(st.sampled_from(cluster_cidr_choices), unique=True, max_size=3))),
    )
    shuffled = tuple(draw(st.permutations(specs)))
    return Cluster(
        local_name="node-0",
        local_key=PublicKey(keys[0]),
        specs=shuffled,
        config=config,
        family=family,
        used_slots=frozenset(slots),
    )


def fresh_slot(cluster: Cluster) -> st.SearchStrategy[int]:
    return st.integers(0, 255).filter(lambda s: s not in cluster.used_slots)


# ---------------------------------------------------------------------------------------------
# garbage: anything a broken or hostile node might publish


_junk_text = st.text(max_size=20)
T = TypeVar("T")


def _weighted(draw: st.DrawFn, *options: tuple[int, st.SearchStrategy[T]]) -> T:
    """Draw from one of ``options``, picked with the given integer weights."""
    pick = draw(st.integers(0, sum(w for w, _ in options) - 1))
    for weight, strategy in options:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError("unreachable")


def _related(net: IPNetwork) -> st.SearchStrategy[str]:
    """Supernets and subnets of a real CIDR: overlaps that are not equalities."""
    options = [str(net.supernet(new_prefix=max(net.prefixlen - d, 0))) for d in (1, 8)]
    options += [str(next(net.subnets(prefixlen_diff=d))) for d in (1, 4)]
    return st.sampled_from(options)


@st.composite
def garbage_specs(draw: st.DrawFn, cluster: Cluster) -> NodeSpec:
    """One arbitrary NodeSpec under a name no cluster node uses: valid or not, conflicting
    or not, older or younger than everyone. Each field is independently fine (a fresh, valid
    value), clashing with the cluster (an existing or overlapping value) or malformed, so all
    outcomes, acceptance included, come up often."""
    existing_cidrs = [c for s in cluster.specs for c in s.pod_cidrs]
    existing_addrs = [a for s in cluster.specs for a in s.addresses]
    existing_keys = [s.public_key for s in cluster.specs if s.public_key] + [
        cluster.local_key.base64()]
    existing_nets = [ipaddress.ip_network(c) for c in existing_cidrs]
    slot = draw(fresh_slot(cluster))

    name = _weighted(
        draw,
        (8, st.just("newcomer")),
        (4, st.text(min_size=1, max_size=8).filter(lambda n: n not in cluster.names)),
        (1, st.just("")),
    )
    one_cidr = st.one_of(
        st.sampled_from(existing_cidrs),
        st.sampled_from(existing_nets).flatmap(_related),
        networks.map(str),
        st.sampled_from(("10.244.1.1/24", "fd00::1/64", "10.0.0.0/33", "banana", "", " ",
                         "10.244.300.0/24", "::/0", "0.0.0.0/0")),
        _junk_text,
    )
    cidrs = _weighted(
        draw,
        (6, pod_cidrs(slot)),
        (6, st.lists(one_cidr, min_size=1, max_size=3).map(tuple)),
        (2, st.tuples(st.sampled_from((v4_cidr(slot), v6_cidr(slot))), one_cidr)),
        (1, st.just(())),
    )
    one_address = st.one_of(
        st.sampled_from(existing_addrs),
        st.ip_addresses().map(str),
        st.sampled_from(("", "not-an-ip", "172.16.0.256", "fe80::1%eth0")),
        _junk_text,
    )
    addresses = _weighted(
        draw,
        (6, st.just((cluster.addr(slot),))),
        (2, st.just((cluster.other_addr(slot),))),
        (2, st.just((cluster.other_addr(slot), cluster.addr(slot)))),
        (5, st.lists(one_address, max_size=3).map(tuple)),
    )
    key: str | None = _weighted(
        draw,
        (6, public_keys.map(PublicKey.base64)),
        (3, st.sampled_from(existing_keys)),
        (2, st.just(cluster.local_key.base64())),
        (1, st.just(None)),
        (1, st.sampled_from(("", "   ", b64(bytes(KEY_LEN)), "A" * 43, "A" * 44 + "="))),
        (1, st.binary(max_size=40).map(b64)),
        (1, _junk_text),
    )
    return NodeSpec(
        name=name,
        addresses=addresses,
        pod_cidrs=cidrs,
        public_key=key,
        created=draw(st.floats(allow_nan=False)),
    )
