"""Mesh computation: per-node validation, claims (keys, CIDRs), peers and the datapath map."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmanager.core.keys import KEY_LEN, PublicKey
from wgmanager.core.mesh import LocalNodeError, Mesh, compute_mesh, datapath_map, parse_node
from wgmanager.core.model import (
    Action,
    DeviceState,
    Endpoint,
    IPNetwork,
    MeshConfig,
    Node,
    NodeSpec,
    PeerConfig,
    PeerState,
    Rejected,
    network_sort_key,
)

from .strategies import PROPERTY, Cluster, b64, clusters, garbage_specs, states_from


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def key(n: int) -> PublicKey:
    return PublicKey(bytes([n]) * KEY_LEN)


LOCAL_KEY = key(0xEE)
LOCAL = NodeSpec("local", ("192.168.0.1", "fd10::1"), ("10.244.0.0/24", "fd00:244::/64"),
                 None, created=0.0)
CONFIG = MeshConfig(listen_port=51820, persistent_keepalive=25)


def node(name: str, n: int, *, addresses: tuple[str, ...] | None = None,
         cidrs: tuple[str, ...] | None = None, created: float = 100.0,
         public_key: str | None = None) -> NodeSpec:
    """A valid remote node numbered ``n``: its own key, address and dual-stack pod CIDRs."""
    return NodeSpec(
        name,
        addresses if addresses is not None else (f"192.168.0.{n}", f"fd10::{n:x}"),
        cidrs if cidrs is not None else (f"10.244.{n}.0/24", f"fd00:244:0:{n:x}::/64"),
        public_key if public_key is not None else key(n).base64(),
        created,
    )


def mesh_of(*specs: NodeSpec, local: NodeSpec = LOCAL, config: MeshConfig = CONFIG,
            previous: Mesh | None = None) -> Mesh:
    return compute_mesh(local_name=local.name, local_key=LOCAL_KEY, specs=(local, *specs),
                        config=config, previous=previous)


def device(peers: Mapping[PublicKey, PeerState] | None = None) -> DeviceState:
    return DeviceState("wg0", LOCAL_KEY, 51820, peers=dict(peers or {}))


# ---------------------------------------------------------------------------------------------
# parse_node


class TestParseNodeAccepts:
    def test_dual_stack_node(self) -> None:
        parsed = parse_node(NodeSpec("a", ("192.168.0.2", "fd10::2"),
                                     ("10.244.2.0/24", "fd00:244:0:2::/64"), key(2).base64()))
        assert parsed == Node("a", (ip("192.168.0.2"), ip("fd10::2")),
                              (net("10.244.2.0/24"), net("fd00:244:0:2::/64")), key(2))

    @pytest.mark.parametrize("cidrs", [("10.244.2.0/24",), ("fd00:244:0:2::/64",),
                                       ("fd00:244:0:2::/64", "10.244.2.0/24")])
    def test_single_stack_and_either_order(self, cidrs: tuple[str, ...]) -> None:
        parsed = parse_node(NodeSpec("a", ("192.168.0.2",), cidrs, key(2).base64()))
        assert isinstance(parsed, Node)
        assert parsed.pod_cidrs == tuple(net(c) for c in cidrs)

    def test_whitespace_is_stripped(self) -> None:
        parsed = parse_node(NodeSpec("a", (" 192.168.0.2\n",), (" 10.244.2.0/24 ",),
                                     f" {key(2).base64()}\n"))
        assert parsed == Node("a", (ip("192.168.0.2"),), (net("10.244.2.0/24"),), key(2))

    def test_invalid_addresses_are_skipped_when_a_valid_one_remains(self) -> None:
        parsed = parse_node(NodeSpec("a", ("", "node-a.example", "192.168.0.256", "fd10::2",
                                           "192.168.0.2"), ("10.244.2.0/24",), key(2).base64()))
        assert isinstance(parsed, Node)
        assert parsed.addresses == (ip("fd10::2"), ip("192.168.0.2"))


KEY_B64 = key(2).base64()
ADDR = ("192.168.0.2",)
CIDR = ("10.244.2.0/24",)


@pytest.mark.parametrize(("spec", "reason", "pending", "cidrs"), [
    pytest.param(NodeSpec("", ADDR, CIDR, KEY_B64), "node has no name", False, (),
                 id="no-name"),
    pytest.param(NodeSpec("a", ADDR, ("10.244.2.1/24",), KEY_B64),
                 "pod CIDR '10.244.2.1/24' is not a valid network (host bits set", False, (),
                 id="cidr-host-bits"),
    pytest.param(NodeSpec("a", ADDR, ("fd00::1/64",), KEY_B64),
                 "pod CIDR 'fd00::1/64' is not a valid network", False, (),
                 id="cidr-v6-host-bits"),
    pytest.param(NodeSpec("a", ADDR, ("banana",), KEY_B64),
                 "pod CIDR 'banana' is not a valid network", False, (), id="cidr-garbage"),
    pytest.param(NodeSpec("a", ADDR, ("10.244.2.0/33",), KEY_B64),
                 "is not a valid network", False, (), id="cidr-prefix-too-long"),
    pytest.param(NodeSpec("a", ADDR, ("10.244.2.0/24", "oops"), KEY_B64),
                 "pod CIDR 'oops'", False, ("10.244.2.0/24",),
                 id="second-cidr-garbage-keeps-first"),
    pytest.param(NodeSpec("a", ADDR, (), KEY_B64),
                 "node has no pod CIDRs (spec.podCIDRs is empty)", True, (), id="no-cidrs"),
    pytest.param(NodeSpec("a", ADDR, ("10.244.2.0/24", "10.244.3.0/24"), KEY_B64),
                 "more than one pod CIDR of the same IP family", False,
                 ("10.244.2.0/24", "10.244.3.0/24"), id="two-v4"),
    pytest.param(NodeSpec("a", ADDR, ("fd00:2::/64", "10.244.2.0/24", "fd00:3::/64"), KEY_B64),
                 "more than one pod CIDR of the same IP family", False,
                 ("fd00:2::/64", "10.244.2.0/24", "fd00:3::/64"), id="two-v6"),
    pytest.param(NodeSpec("a", (), CIDR, KEY_B64),
                 "node has no valid InternalIP address", False, CIDR, id="no-address"),
    pytest.param(NodeSpec("a", ("node-a", "300.1.1.1", ""), CIDR, KEY_B64),
                 "node has no valid InternalIP address", False, CIDR, id="only-bad-addresses"),
    pytest.param(NodeSpec("a", ADDR, CIDR, None),
                 "no public key published yet", True, CIDR, id="no-key"),
    pytest.param(NodeSpec("a", ADDR, CIDR, ""),
                 "no public key published yet", True, CIDR, id="empty-key"),
    pytest.param(NodeSpec("a", ADDR, CIDR, " \n"),
                 "no public key published yet", True, CIDR, id="blank-key"),
    pytest.param(NodeSpec("a", ADDR, CIDR, "not*base64"),
                 "public key annotation is invalid: not valid base64", False, CIDR,
                 id="key-not-base64"),
    pytest.param(NodeSpec("a", ADDR, CIDR, b64(b"\x01" * 31)),
                 "public key annotation is invalid: decodes to 31 bytes", False, CIDR,
                 id="key-short"),
    pytest.param(NodeSpec("a", ADDR, CIDR, b64(b"\x01" * 33)),
                 "public key annotation is invalid: decodes to 33 bytes", False, CIDR,
                 id="key-long"),
    pytest.param(NodeSpec("a", ADDR, CIDR, b64(bytes(KEY_LEN))),
                 "public key annotation is invalid: all-zero key", False, CIDR,
                 id="key-all-zero"),
])
def test_parse_node_rejects(spec: NodeSpec, reason: str, pending: bool,
                            cidrs: tuple[str, ...]) -> None:
    parsed = parse_node(spec)
    assert isinstance(parsed, Rejected)
    assert parsed.name == spec.name
    assert reason in parsed.reason
    assert parsed.pending is pending
    # whatever parsed is kept, so traffic to it can still fail closed
    assert parsed.pod_cidrs == tuple(net(c) for c in cidrs)


def test_checks_run_in_order_cidrs_then_addresses_then_key() -> None:
    """A node broken in several ways reports the first problem an operator would fix."""
    assert "pod CIDR" in parse_node(NodeSpec("a", (), ("x",), "y")).reason  # type: ignore[union-attr]
    assert "InternalIP" in parse_node(NodeSpec("a", (), CIDR, "y")).reason  # type: ignore[union-attr]
    assert "public key" in parse_node(NodeSpec("a", ADDR, CIDR, "y")).reason  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# compute_mesh: peers of valid nodes


class TestPeers:
    def test_valid_nodes_become_peers(self) -> None:
        mesh = mesh_of(node("a", 2), node("b", 3))
        assert mesh.rejected == {}
        assert set(mesh.nodes) == {"a", "b"}
        assert mesh.peers == {
            key(2): PeerConfig(key(2), Endpoint(ip("192.168.0.2"), 51820),
                               frozenset({net("10.244.2.0/24"), net("fd00:244:0:2::/64"),
                                          net("192.168.0.2/32"), net("fd10::2/128")}), 25),
            key(3): PeerConfig(key(3), Endpoint(ip("192.168.0.3"), 51820),
                               frozenset({net("10.244.3.0/24"), net("fd00:244:0:3::/64"),
                                          net("192.168.0.3/32"), net("fd10::3/128")}), 25),
        }
        assert mesh.peer_for_node("a") == mesh.peers[key(2)]
        assert mesh.peer_for_node("local") is None
        assert mesh.peer_for_node("nobody") is None

    def test_local_node_is_not_a_peer(self) -> None:
        mesh = mesh_of(node("a", 2))
        assert LOCAL_KEY not in mesh.peers
        assert "local" not in mesh.nodes
        assert mesh.local == Node("local", (ip("192.168.0.1"), ip("fd10::1")),
                                  (net("10.244.0.0/24"), net("fd00:244::/64")), LOCAL_KEY)

    def test_local_published_key_is_ignored(self) -> None:
        """The caller's key is the truth; a stale or missing annotation does not matter."""
        for published in (None, "", "garbage", key(9).base64()):
            local = NodeSpec("local", LOCAL.addresses, LOCAL.pod_cidrs, published)
            assert mesh_of(node("a", 2), local=local).local.public_key == LOCAL_KEY

    @pytest.mark.parametrize(("local_addresses", "node_addresses", "endpoint"), [
        (("192.168.0.1",), ("192.168.0.2",), "192.168.0.2"),
        (("192.168.0.1", "fd10::1"), ("fd10::2", "192.168.0.2", "192.168.0.22"), "192.168.0.2"),
        (("fd10::1", "192.168.0.1"), ("192.168.0.2", "fd10::2", "fd10::22"), "fd10::2"),
        (("fd10::1",), ("fd10::2",), "fd10::2"),
        (("bogus", "fd10::1"), ("192.168.0.2", "fd10::2"), "fd10::2"),  # first *valid* address
    ])
    def test_endpoint_is_first_address_of_local_family(
            self, local_addresses: tuple[str, ...], node_addresses: tuple[str, ...],
            endpoint: str) -> None:
        local = NodeSpec("local", local_addresses, LOCAL.pod_cidrs)
        mesh = mesh_of(node("a", 2, addresses=node_addresses), local=local)
        assert mesh.peers[key(2)].endpoint == Endpoint(ip(endpoint), 51820)

    @pytest.mark.parametrize(("port", "keepalive"), [(51820, 0), (1, 25), (65535, 60)])
    def test_port_and_keepalive_come_from_config(self, port: int, keepalive: int) -> None:
        mesh = mesh_of(node("a", 2), config=MeshConfig(port, keepalive))
        peer = mesh.peers[key(2)]
        assert peer.endpoint is not None and peer.endpoint.port == port
        assert peer.persistent_keepalive == keepalive

    @pytest.mark.parametrize("cidrs", [
        ("10.244.2.0/24",), ("fd00:244:0:2::/64",), ("10.244.2.0/24", "fd00:244:0:2::/64"),
        ("fd00:244:0:2::/64", "10.244.2.0/24"),
    ])
    def test_allowed_ips_are_the_pod_cidrs_and_node_addresses(
            self, cidrs: tuple[str, ...]) -> None:
        """The node's own addresses too: what it sends from them through the tunnel
        (reverse-NATed replies, ICMP errors, host -> pod) must be accepted here."""
        mesh = mesh_of(node("a", 2, cidrs=cidrs))
        hosts = {net("192.168.0.2/32"), net("fd10::2/128")}
        assert mesh.peers[key(2)].allowed_ips == frozenset(net(c) for c in cidrs) | hosts

    def test_a_node_claiming_another_nodes_address_is_rejected(self) -> None:
        """Node addresses are allowed IPs: the newcomer must not take the incumbent's (or
        the local node's) address away from its peer."""
        mesh = mesh_of(node("a", 2), node("b", 3, addresses=("192.168.0.2",)))
        assert set(mesh.nodes) == {"a"}
        assert "InternalIP 192.168.0.2 is already node 'a'" in mesh.rejected["b"].reason
        local = mesh_of(node("c", 4, addresses=("192.168.0.1", "192.168.0.44")))
        assert "is already node 'local'" in local.rejected["c"].reason

    def test_families_never_conflict(self) -> None:
        """An IPv4-mapped IPv6 CIDR is an IPv6 CIDR: it does not overlap the IPv4 one."""
        local = NodeSpec("local", ("192.168.0.1",), ("10.244.0.0/24",))
        mesh = mesh_of(node("a", 2, cidrs=("::ffff:10.244.0.0/120",)), local=local)
        assert set(mesh.nodes) == {"a"}


# ---------------------------------------------------------------------------------------------
# compute_mesh: the local node


class TestLocalNode:
    def test_missing(self) -> None:
        with pytest.raises(LocalNodeError, match=r"node 'me' is not in the node list.*"
                                                 r"--node-name / NODE_NAME") as info:
            compute_mesh(local_name="me", local_key=LOCAL_KEY, specs=[LOCAL, node("a", 2)],
                         config=CONFIG)
        assert isinstance(info.value, ValueError)

    def test_empty_cluster(self) -> None:
        with pytest.raises(LocalNodeError, match="not in the node list"):
            compute_mesh(local_name="local", local_key=LOCAL_KEY, specs=[], config=CONFIG)

    @pytest.mark.parametrize(("spec", "reason"), [
        (NodeSpec("local", ("192.168.0.1",), ()), "no pod CIDRs"),
        (NodeSpec("local", ("192.168.0.1",), ("10.244.0.1/24",)), "not a valid network"),
        (NodeSpec("local", ("192.168.0.1",), ("10.244.0.0/24", "10.244.1.0/24")),
         "more than one pod CIDR"),
        (NodeSpec("local", (), ("10.244.0.0/24",)), "no valid InternalIP"),
        (NodeSpec("local", ("nope",), ("10.244.0.0/24",)), "no valid InternalIP"),
    ])
    def test_invalid(self, spec: NodeSpec, reason: str) -> None:
        with pytest.raises(LocalNodeError, match=f"local node 'local' is unusable: .*{reason}"):
            mesh_of(node("a", 2), local=spec)

    def test_all_zero_local_key(self) -> None:
        with pytest.raises(LocalNodeError, match="all-zero key"):
            compute_mesh(local_name="local", local_key=PublicKey(bytes(KEY_LEN)), specs=[LOCAL],
                         config=CONFIG)

    def test_alone(self) -> None:
        mesh = mesh_of()
        assert mesh.peers == {} and mesh.nodes == {} and mesh.rejected == {}


# ---------------------------------------------------------------------------------------------
# compute_mesh: rejections and competing claims


def only_accepted(mesh: Mesh, *names: str) -> None:
    assert set(mesh.nodes) == set(names)
    assert set(mesh.peers) == {mesh.nodes[n].public_key for n in names}


class TestRejections:
    def test_invalid_nodes_are_listed_with_reasons(self) -> None:
        mesh = mesh_of(node("a", 2), NodeSpec("pending", ("192.168.0.9",), ("10.244.9.0/24",)),
                       NodeSpec("new", ("192.168.0.8",), ()),
                       node("bad", 7, public_key="nope"))
        only_accepted(mesh, "a")
        assert set(mesh.rejected) == {"pending", "new", "bad"}
        assert mesh.rejected["pending"].pending and mesh.rejected["new"].pending
        assert not mesh.rejected["bad"].pending
        assert mesh.rejected["pending"].pod_cidrs == (net("10.244.9.0/24"),)

    @pytest.mark.parametrize("family", [4, 6])
    def test_no_address_of_local_family(self, family: int) -> None:
        local_addr = "192.168.0.1" if family == 4 else "fd10::1"
        other_addr = "fd10::2" if family == 4 else "192.168.0.2"
        local = NodeSpec("local", (local_addr,), LOCAL.pod_cidrs)
        mesh = mesh_of(node("a", 2, addresses=(other_addr,)), node("b", 3), local=local)
        only_accepted(mesh, "b")
        rej = mesh.rejected["a"]
        assert rej.reason == ("no InternalIP of the local node's underlay family "
                              f"(IPv{family})")
        assert rej.pod_cidrs == (net("10.244.2.0/24"), net("fd00:244:0:2::/64"))
        assert not rej.pending

    def test_node_without_usable_address_claims_nothing(self) -> None:
        """An older node that cannot get a peer does not block a younger one's key or CIDR."""
        mesh = mesh_of(node("old", 2, addresses=("fd10::2",), created=1),
                       node("young", 2, created=5))
        only_accepted(mesh, "young")
        assert "underlay family" in mesh.rejected["old"].reason


class TestDuplicateKeys:
    def test_older_node_keeps_the_key(self) -> None:
        young = node("a-young", 3, created=200, public_key=key(2).base64())
        old = node("z-old", 2, created=100)
        for specs in ((young, old), (old, young)):
            mesh = mesh_of(*specs)
            only_accepted(mesh, "z-old")
            assert mesh.rejected["a-young"].reason == (
                "public key is already used by node 'z-old' (cloned key file?)")
            assert mesh.rejected["a-young"].pod_cidrs == (net("10.244.3.0/24"),
                                                          net("fd00:244:0:3::/64"))

    def test_same_age_goes_by_name(self) -> None:
        mesh = mesh_of(node("b", 3, public_key=key(2).base64()), node("a", 2))
        only_accepted(mesh, "a")
        assert "already used by node 'a'" in mesh.rejected["b"].reason

    def test_the_local_key_is_never_a_peer(self) -> None:
        clone = node("clone", 2, created=-1e9, public_key=LOCAL_KEY.base64())
        mesh = mesh_of(clone, node("b", 3))
        only_accepted(mesh, "b")
        assert mesh.rejected["clone"].reason == (
            "public key is already used by node 'local' (cloned key file?)")

    def test_same_key_spelled_differently(self) -> None:
        # leading/trailing whitespace is not a different key
        mesh = mesh_of(node("a", 2, created=1), node("b", 3, public_key=f" {key(2).base64()}\n"))
        only_accepted(mesh, "a")
        assert "already used by node 'a'" in mesh.rejected["b"].reason


class TestCidrOverlap:
    @pytest.mark.parametrize(("cidr", "local_cidr"), [
        ("10.244.0.0/24", "10.244.0.0/24"),  # equal
        ("10.244.0.128/25", "10.244.0.0/24"),  # inside
        ("10.244.0.0/16", "10.244.0.0/24"),  # around
        ("0.0.0.0/0", "10.244.0.0/24"),
        ("fd00:244::/64", "fd00:244::/64"),
        ("fd00::/16", "fd00:244::/64"),
    ])
    def test_overlapping_the_local_node_is_rejected(self, cidr: str, local_cidr: str) -> None:
        mesh = mesh_of(node("a", 2, cidrs=(cidr,), created=-1e9), node("b", 3))
        only_accepted(mesh, "b")
        assert mesh.rejected["a"].reason == (
            f"pod CIDR {net(cidr)} overlaps {net(local_cidr)} of node 'local'")
        assert mesh.rejected["a"].pod_cidrs == (net(cidr),)

    @pytest.mark.parametrize("cidr", ["10.244.2.0/24", "10.244.2.0/25", "10.244.2.0/23"])
    def test_older_node_keeps_the_cidr(self, cidr: str) -> None:
        old = node("z-old", 2, created=100)
        young = node("a-young", 3, cidrs=(cidr,), created=200)
        mesh = mesh_of(young, old)
        only_accepted(mesh, "z-old")
        assert mesh.rejected["a-young"].reason == (
            f"pod CIDR {net(cidr)} overlaps 10.244.2.0/24 of node 'z-old'")

    def test_same_age_goes_by_name(self) -> None:
        mesh = mesh_of(node("b", 3, cidrs=("10.244.2.0/24",)), node("a", 2))
        only_accepted(mesh, "a")
        assert "of node 'a'" in mesh.rejected["b"].reason

    def test_overlap_in_second_family_rejects_the_whole_node(self) -> None:
        mesh = mesh_of(node("a", 2, created=1),
                       node("b", 3, cidrs=("10.244.3.0/24", "fd00:244:0:2::/64"), created=2))
        only_accepted(mesh, "a")
        assert "fd00:244:0:2::/64 overlaps fd00:244:0:2::/64 of node 'a'" in (
            mesh.rejected["b"].reason)

    def test_unchanged_incumbent_keeps_its_cidr_even_if_younger(self) -> None:
        incumbent = node("incumbent", 2, created=500)
        before = mesh_of(incumbent)
        only_accepted(before, "incumbent")
        # an older node (e.g. re-registered with a stale timestamp) now claims the same CIDR
        intruder = node("intruder", 3, cidrs=("10.244.2.0/24",), created=1)
        after = mesh_of(incumbent, intruder, previous=before)
        only_accepted(after, "incumbent")
        assert after.peers == before.peers
        assert "of node 'incumbent'" in after.rejected["intruder"].reason
        # without the previous mesh, age decides
        only_accepted(mesh_of(incumbent, intruder), "intruder")

    def test_unchanged_incumbent_keeps_its_key_even_if_younger(self) -> None:
        incumbent = node("incumbent", 2, created=500)
        before = mesh_of(incumbent)
        intruder = node("intruder", 3, created=1, public_key=key(2).base64())
        after = mesh_of(incumbent, intruder, previous=before)
        only_accepted(after, "incumbent")
        assert "already used by node 'incumbent'" in after.rejected["intruder"].reason

    def test_a_changed_incumbent_loses_its_precedence(self) -> None:
        incumbent = node("incumbent", 2, created=500)
        before = mesh_of(incumbent)
        moved = node("incumbent", 2, created=500, addresses=("192.168.0.99",))
        intruder = node("intruder", 3, cidrs=("10.244.2.0/24",), created=1)
        after = mesh_of(moved, intruder, previous=before)
        only_accepted(after, "intruder")
        assert "of node 'intruder'" in after.rejected["incumbent"].reason

    def test_previously_rejected_node_is_no_incumbent(self) -> None:
        before = mesh_of(node("a", 2, created=1), node("b", 3, cidrs=("10.244.2.0/24",),
                                                       created=2))
        only_accepted(before, "a")
        after = mesh_of(node("a", 2, created=1), node("b", 3, cidrs=("10.244.2.0/24",),
                                                      created=2), previous=before)
        assert after == before


# ---------------------------------------------------------------------------------------------
# compute_mesh: properties over generated clusters


class TestMeshProperties:
    @given(clusters())
    @PROPERTY
    def test_valid_cluster_is_fully_meshed(self, cluster: Cluster) -> None:
        mesh = cluster.mesh()
        assert mesh.rejected == {}
        assert set(mesh.nodes) == {s.name for s in cluster.remote_specs}
        for spec in cluster.remote_specs:
            peer = mesh.peer_for_node(spec.name)
            assert peer is not None
            assert peer.public_key == PublicKey.from_base64(spec.public_key or "")
            node = mesh.nodes[spec.name]
            assert peer.allowed_ips == (frozenset(ipaddress.ip_network(c) for c in spec.pod_cidrs)
                                        | frozenset(node.hosts))
            assert peer.persistent_keepalive == cluster.config.persistent_keepalive
            first = next(a for a in map(ip, spec.addresses) if a.version == cluster.family)
            assert peer.endpoint == Endpoint(first, cluster.config.listen_port)

    @given(st.data())
    @PROPERTY
    def test_spec_order_does_not_matter(self, data: st.DataObject) -> None:
        cluster = data.draw(clusters())
        extra = data.draw(st.lists(garbage_specs(cluster), max_size=3,
                                   unique_by=lambda s: s.name))
        specs = (*cluster.specs, *extra)
        shuffled = data.draw(st.permutations(specs))
        assert cluster.mesh(shuffled) == cluster.mesh(specs)

    @given(st.data())
    @PROPERTY
    def test_previous_mesh_is_a_fixed_point(self, data: st.DataObject) -> None:
        cluster = data.draw(clusters())
        extra = data.draw(st.lists(garbage_specs(cluster), max_size=3,
                                   unique_by=lambda s: s.name))
        specs = (*cluster.specs, *extra)
        first = cluster.mesh(specs)
        again = cluster.mesh(specs, previous=first)
        assert (again.local, again.nodes, again.peers) == (first.local, first.nodes, first.peers)
        # The same nodes are rejected, with the same CIDRs; the reason may name a different
        # one of several true conflicts, as incumbents are now checked first.
        assert {n: (r.pod_cidrs, r.pending) for n, r in again.rejected.items()} == {
            n: (r.pod_cidrs, r.pending) for n, r in first.rejected.items()}

    @given(st.data())
    @PROPERTY
    def test_a_bad_node_never_changes_other_peers(self, data: st.DataObject) -> None:
        """Whatever one new node states, every peer that worked keeps working unchanged."""
        cluster = data.draw(clusters())
        garbage = data.draw(garbage_specs(cluster))
        before = cluster.mesh()
        after = cluster.mesh((*cluster.specs, garbage), previous=before)
        assert after.local == before.local
        for name, accepted in before.nodes.items():
            assert after.nodes[name] == accepted
        for k, peer in before.peers.items():
            assert after.peers[k] == peer
        # the newcomer is accounted for one way or the other, and nobody else is touched
        assert set(after.nodes) | set(after.rejected) == set(before.nodes) | {garbage.name}
        assert set(after.rejected) <= {garbage.name}

    @given(st.data())
    @PROPERTY
    def test_a_younger_bad_node_never_changes_other_peers_without_history(
            self, data: st.DataObject) -> None:
        """Without a previous mesh, age protects established nodes in the same way."""
        cluster = data.draw(clusters())
        garbage = data.draw(garbage_specs(cluster))
        youngest = max(s.created for s in cluster.specs)
        garbage = NodeSpec(garbage.name, garbage.addresses, garbage.pod_cidrs,
                           garbage.public_key,
                           youngest + data.draw(st.floats(1, 1e9, allow_nan=False)))
        before = cluster.mesh()
        after = cluster.mesh((*cluster.specs, garbage))
        for k, peer in before.peers.items():
            assert after.peers[k] == peer
        assert set(after.rejected) <= {garbage.name}

    @given(st.data())
    @PROPERTY
    def test_accepted_claims_never_collide(self, data: st.DataObject) -> None:
        cluster = data.draw(clusters())
        extra = data.draw(st.lists(garbage_specs(cluster), max_size=4,
                                   unique_by=lambda s: s.name))
        mesh = cluster.mesh((*cluster.specs, *extra))
        owners = [mesh.local, *mesh.nodes.values()]
        keys = [n.public_key for n in owners]
        assert len(set(keys)) == len(keys)
        cidrs = [c for n in owners for c in n.pod_cidrs]
        for i, a in enumerate(cidrs):
            for b in cidrs[i + 1:]:
                assert a.version != b.version or not a.overlaps(b)
        for peer in mesh.peers.values():
            assert peer.endpoint is not None
            assert peer.endpoint.host.version == mesh.local.addresses[0].version


# ---------------------------------------------------------------------------------------------
# datapath_map


def held(*peers: tuple[PublicKey, tuple[str, ...]]) -> DeviceState:
    """A device holding peers with the given allowed IPs."""
    return device({
        k: PeerState(k, Endpoint(ip("192.168.0.2"), 51820), frozenset(net(c) for c in cidrs))
        for k, cidrs in peers
    })


class TestDatapathMap:
    def test_local_cidrs_are_local(self) -> None:
        assert datapath_map(mesh_of(), device(), CONFIG) == {
            net("10.244.0.0/24"): Action.LOCAL, net("fd00:244::/64"): Action.LOCAL}

    @pytest.mark.parametrize(("dev", "v4", "v6"), [
        pytest.param(device(), Action.DROP, Action.DROP, id="no-peer"),
        pytest.param(held((key(2), ())), Action.DROP, Action.DROP, id="peer-without-ips"),
        pytest.param(held((key(2), ("10.244.2.0/24",))), Action.REDIRECT, Action.DROP,
                     id="v4-only-configured"),
        pytest.param(held((key(2), ("10.244.2.0/24", "fd00:244:0:2::/64"))),
                     Action.REDIRECT, Action.REDIRECT, id="both-configured"),
        pytest.param(held((key(9), ("10.244.2.0/24", "fd00:244:0:2::/64"))),
                     Action.DROP, Action.DROP, id="cidrs-on-another-key"),
        pytest.param(held((key(2), ("10.244.2.0/25", "fd00:244:0:2::/65"))),
                     Action.DROP, Action.DROP, id="only-part-of-the-cidr"),
        pytest.param(held((key(2), ("10.244.0.0/16",))),
                     Action.DROP, Action.DROP, id="a-wider-cidr-is-not-the-cidr"),
    ])
    def test_remote_redirects_only_when_the_device_holds_the_cidr(
            self, dev: DeviceState, v4: Action, v6: Action) -> None:
        entries = datapath_map(mesh_of(node("a", 2)), dev, CONFIG)
        assert entries[net("10.244.2.0/24")] is v4
        assert entries[net("fd00:244:0:2::/64")] is v6

    def test_rejected_nodes_fail_closed(self) -> None:
        mesh = mesh_of(node("a", 2), node("bad", 3, public_key="nope"),
                       NodeSpec("pending", ("192.168.0.4",), ("10.244.4.0/24",)))
        entries = datapath_map(mesh, held((key(2), ("10.244.2.0/24",))), CONFIG)
        assert entries[net("10.244.3.0/24")] is Action.DROP
        assert entries[net("fd00:244:0:3::/64")] is Action.DROP
        assert entries[net("10.244.4.0/24")] is Action.DROP
        assert entries[net("10.244.2.0/24")] is Action.REDIRECT

    @pytest.mark.parametrize("cidr", [
        "10.244.0.0/24", "10.244.0.128/25", "10.244.0.0/16",  # vs local
        "10.244.2.0/24", "10.244.2.0/26", "10.244.0.0/20",  # vs accepted node a
    ])
    def test_rejected_cidr_overlapping_an_owned_one_gets_no_entry(self, cidr: str) -> None:
        mesh = mesh_of(node("a", 2), node("bad", 3, cidrs=(cidr,), created=1e9))
        assert "bad" in mesh.rejected
        dev = held((key(2), ("10.244.2.0/24",)))
        entries = datapath_map(mesh, dev, CONFIG)
        assert entries == datapath_map(mesh_of(node("a", 2)), dev, CONFIG)

    def test_overlapping_rejected_cidrs_both_drop(self) -> None:
        mesh = mesh_of(node("bad1", 3, cidrs=("10.9.0.0/16",), public_key="x"),
                       node("bad2", 4, cidrs=("10.9.1.0/24",), public_key="y"))
        entries = datapath_map(mesh, device(), CONFIG)
        assert entries[net("10.9.0.0/16")] is Action.DROP
        assert entries[net("10.9.1.0/24")] is Action.DROP

    @pytest.mark.parametrize(("cluster_cidr", "added"), [
        pytest.param("10.244.0.0/16", True, id="around-everything"),
        pytest.param("fd00::/8", True, id="v6-around-everything"),
        pytest.param("10.99.0.0/16", True, id="disjoint"),
        pytest.param("10.244.0.0/24", False, id="equal-to-local"),
        pytest.param("10.244.0.0/25", False, id="inside-local"),
        pytest.param("10.244.2.0/24", False, id="equal-to-remote"),
        pytest.param("10.244.2.64/26", False, id="inside-remote"),
        pytest.param("fd00:244:0:2::/96", False, id="inside-remote-v6"),
    ])
    def test_cluster_cidrs_drop_but_never_shadow_an_owned_cidr(
            self, cluster_cidr: str, added: bool) -> None:
        config = MeshConfig(cluster_cidrs=(net(cluster_cidr),))
        mesh = mesh_of(node("a", 2), config=config)
        dev = held((key(2), ("10.244.2.0/24", "fd00:244:0:2::/64")))
        entries = datapath_map(mesh, dev, config)
        without = datapath_map(mesh, dev, MeshConfig())
        if added:
            assert entries == {**without, net(cluster_cidr): Action.DROP}
        else:
            assert entries == without

    @pytest.mark.parametrize("cluster_cidr", ["10.244.3.0/24", "10.244.3.0/25", "10.244.0.0/16"])
    def test_cluster_cidr_and_rejected_cidrs_coexist(self, cluster_cidr: str) -> None:
        config = MeshConfig(cluster_cidrs=(net(cluster_cidr),))
        mesh = mesh_of(node("bad", 3, cidrs=("10.244.3.0/24",), public_key="x"), config=config)
        entries = datapath_map(mesh, device(), config)
        assert entries[net("10.244.3.0/24")] is Action.DROP
        assert entries[net(cluster_cidr)] is Action.DROP

    def test_entries_are_sorted_v4_first(self) -> None:
        config = MeshConfig(cluster_cidrs=(net("fd00::/8"), net("10.0.0.0/8")))
        mesh = mesh_of(node("b", 3), node("a", 2), config=config)
        entries = datapath_map(mesh, device(), config)
        assert list(entries) == sorted(entries, key=network_sort_key)
        assert [c.version for c in entries] == sorted(c.version for c in entries)

    @given(st.data())
    @PROPERTY
    def test_map_rules(self, data: st.DataObject) -> None:
        cluster = data.draw(clusters())
        extra = data.draw(st.lists(garbage_specs(cluster), max_size=3,
                                   unique_by=lambda s: s.name))
        mesh = cluster.mesh((*cluster.specs, *extra))
        # a device part-way through configuration: some peers, some of their CIDRs
        dev_peers: dict[PublicKey, PeerState] = {}
        for k, peer in states_from(mesh.peers).items():
            if data.draw(st.booleans()):
                subset = data.draw(st.sets(st.sampled_from(sorted(
                    peer.allowed_ips, key=network_sort_key)))) if peer.allowed_ips else set()
                dev_peers[k] = PeerState(k, peer.endpoint, frozenset(subset))
        dev = device(dev_peers)
        entries = datapath_map(mesh, dev, cluster.config)

        owned: dict[IPNetwork, Action] = {c: Action.LOCAL for c in mesh.local.pod_cidrs}
        for n in mesh.nodes.values():
            for c in n.pod_cidrs:
                ready = n.public_key in dev_peers and c in dev_peers[n.public_key].allowed_ips
                owned[c] = Action.REDIRECT if ready else Action.DROP
                if not n.node_sources:  # an older agent's: only our pods' traffic is steered
                    owned[c] = owned[c].for_node()
            for h in n.hosts:  # its own addresses: node entries (steer its pods' traffic)
                ready = n.public_key in dev_peers and h in dev_peers[n.public_key].allowed_ips
                owned[h] = Action.NODE_REDIRECT if ready else Action.NODE_DROP
        for c in mesh.contested:  # local ranges an older node owns: dropped here
            owned[c] = Action.DROP
        for c, action in owned.items():
            assert entries[c] is action

        def inside_owned(c: IPNetwork) -> bool:
            return any(c.version == o.version and c.subnet_of(o)  # type: ignore[arg-type]
                       for o in owned)

        def overlaps_owned(c: IPNetwork) -> bool:
            return any(c.version == o.version and c.overlaps(o)
                       for o in owned)

        rejected = {c for r in mesh.rejected.values() for c in r.pod_cidrs}
        expected = dict(owned)
        # rejected nodes' CIDRs fail closed unless they touch an owned CIDR at all
        expected.update({c: Action.DROP for c in rejected if not overlaps_owned(c)})
        # the cluster-wide CIDRs fail closed unless they would shadow (sit inside) an owned one
        expected.update({c: Action.DROP for c in cluster.config.cluster_cidrs
                         if c not in expected and not inside_owned(c)})
        assert entries == expected
        for c, action in entries.items():
            if c not in owned:
                assert action is Action.DROP
                assert not inside_owned(c)
        assert list(entries) == sorted(entries, key=network_sort_key)


def test_link_local_or_zoned_internal_ips_are_never_endpoints() -> None:
    from wgmanager.core.keys import PrivateKey
    from wgmanager.core.mesh import parse_node
    from wgmanager.core.model import Node, NodeSpec, Rejected

    key = PrivateKey.generate().public_key.base64()
    only_ll = parse_node(NodeSpec("n", ("fe80::1%eth0", "fe80::2"), ("10.1.0.0/24",), key))
    assert isinstance(only_ll, Rejected) and "InternalIP" in only_ll.reason
    mixed = parse_node(NodeSpec("n", ("fe80::1%eth0", "fd00::5"), ("10.1.0.0/24",), key))
    assert isinstance(mixed, Node) and [str(a) for a in mixed.addresses] == ["fd00::5"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(8, 24)), max_size=40),
       st.tuples(st.integers(0, 2**16 - 1), st.integers(8, 24)))
def test_cidr_claims_index_agrees_with_brute_force(
        claims_raw: list[tuple[int, int]], probe_raw: tuple[int, int]) -> None:
    """The index finds an overlap exactly when a pairwise scan would."""
    import ipaddress

    from wgmanager.core.mesh import CidrClaims

    def net(raw: tuple[int, int]) -> ipaddress.IPv4Network:
        addr, plen = raw
        return ipaddress.IPv4Network(((10 << 24) | (addr << 8), plen), strict=False)

    claims = CidrClaims()
    held: list[ipaddress.IPv4Network] = []
    for raw in claims_raw:  # claim only non-overlapping ones, as compute_mesh does
        c = net(raw)
        if not any(c.overlaps(h) for h in held):
            claims.add(c, "x")
            held.append(c)
    probe = net(probe_raw)
    brute = any(probe.overlaps(h) for h in held)
    assert (claims.overlapping(probe) is not None) == brute


def test_a_node_with_a_low_order_key_gets_no_peer_and_the_reason() -> None:
    """The audit's u=1 key: accepted before, "configured 2/2", dark forever, no warning."""
    weak = b64(b"\x01" + bytes(KEY_LEN - 1))
    mesh = mesh_of(node("good", 2), node("weak", 3, public_key=weak))
    assert set(mesh.nodes) == {"good"}
    assert "low-order" in mesh.rejected["weak"].reason
    assert not mesh.rejected["weak"].pending


# -- the local node's own CIDR overlaps an older node's: fail closed here ------------------

NEWER_LOCAL = NodeSpec("local", ("192.168.0.1",), ("10.244.2.0/24",), None, created=500.0)
SUPERNET_LOCAL = NodeSpec("local", ("192.168.0.1",), ("10.244.0.0/16",), None, created=500.0)


@pytest.mark.parametrize(("local", "contested"), [
    (NEWER_LOCAL, "10.244.2.0/24"),  # exact overlap: the whole local CIDR
    (SUPERNET_LOCAL, "10.244.2.0/24"),  # a supernet of the older node's CIDR: that part
])
def test_a_newer_local_node_drops_traffic_to_the_range_an_older_node_owns(
        local: NodeSpec, contested: str) -> None:
    """Audit: 1,846 (exact) and 1,729 (/16) plaintext packets from the bad node itself."""
    mesh = mesh_of(node("b", 2, created=100.0), local=local)
    assert "b" in mesh.rejected  # it still gets no peer here
    assert mesh.contested == (net(contested),)
    entries = datapath_map(mesh, device(), CONFIG)
    assert entries[net(contested)] is Action.DROP


def test_an_older_local_node_keeps_its_range() -> None:
    mesh = mesh_of(node("b", 2, created=900.0), local=NEWER_LOCAL)
    assert mesh.contested == ()
    assert datapath_map(mesh, device(), CONFIG)[net("10.244.2.0/24")] is Action.LOCAL


def test_a_node_that_changes_into_our_range_cannot_take_it() -> None:
    """An accepted node that turns bad has the worse claim, however old it is."""
    before = mesh_of(node("b", 3, created=100.0), local=NEWER_LOCAL)
    assert "b" in before.nodes
    moved = node("b", 3, created=100.0, cidrs=("10.244.2.0/24",))
    after = mesh_of(moved, local=NEWER_LOCAL, previous=before)
    assert "b" in after.rejected and after.contested == ()
