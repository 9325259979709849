"""Planning: minimal, safely ordered peer operations and datapath map changes."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmanager.core.keys import KEY_LEN, PublicKey
from wgmanager.core.mesh import datapath_map
from wgmanager.core.model import (
    Action,
    DeviceState,
    Endpoint,
    IPNetwork,
    NodeSpec,
    PeerConfig,
    PeerState,
    network_sort_key,
)
from wgmanager.core.plan import (
    AddPeer,
    MapPlan,
    PeerOp,
    RemovePeer,
    UpdatePeer,
    apply_peer_ops,
    defer_replaced_removals,
    plan_map,
    plan_peers,
)

from .strategies import (
    PROPERTY,
    Cluster,
    actual_peers,
    b64,
    clusters,
    configs,
    desired_peers,
    fresh_slot,
    garbage_specs,
    networks,
    pod_cidrs,
    raw_keys,
    states_from,
)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def key(n: int) -> PublicKey:
    return PublicKey(bytes([n]) * KEY_LEN)


EP1 = Endpoint(ipaddress.ip_address("192.168.0.1"), 51820)
EP2 = Endpoint(ipaddress.ip_address("192.168.0.2"), 51820)


def cfg(k: PublicKey, *cidrs: str, endpoint: Endpoint | None = EP1,
        keepalive: int = 0) -> PeerConfig:
    return PeerConfig(k, endpoint, frozenset(net(c) for c in cidrs), keepalive)


def state(k: PublicKey, *cidrs: str, endpoint: Endpoint | None = EP1, keepalive: int = 0,
          **stats: object) -> PeerState:
    return PeerState(k, endpoint, frozenset(net(c) for c in cidrs), keepalive,
                     **stats)  # type: ignore[arg-type]


def by_key(*peers: PeerConfig) -> dict[PublicKey, PeerConfig]:
    return {p.public_key: p for p in peers}


def states(*peers: PeerState) -> dict[PublicKey, PeerState]:
    return {p.public_key: p for p in peers}


def op_key(op: PeerOp) -> PublicKey:
    return op.public_key


def owner_of(peers: Mapping[PublicKey, PeerState], ip: IPNetwork) -> PublicKey | None:
    owners = [k for k, p in peers.items() if ip in p.allowed_ips]
    assert len(owners) <= 1, f"{ip} held by {len(owners)} peers"
    return owners[0] if owners else None


# ---------------------------------------------------------------------------------------------
# plan_peers: concrete cases


class TestPlanPeers:
    def test_nothing_to_do(self) -> None:
        assert plan_peers({}, {}) == []
        desired = by_key(cfg(key(1), "10.0.1.0/24"), cfg(key(2), "10.0.2.0/24", keepalive=25))
        assert plan_peers(desired, states_from(desired)) == []

    def test_live_statistics_are_not_configuration(self) -> None:
        desired = by_key(cfg(key(1), "10.0.1.0/24"))
        actual = states(state(key(1), "10.0.1.0/24", last_handshake=1.7e9, rx_bytes=10,
                              tx_bytes=20))
        assert plan_peers(desired, actual) == []

    def test_new_peer_is_added(self) -> None:
        peer = cfg(key(1), "10.0.1.0/24", "fd00:1::/64", keepalive=25)
        assert plan_peers(by_key(peer), {}) == [AddPeer(peer)]
        assert AddPeer(peer).public_key == key(1)

    def test_unwanted_peer_is_removed(self) -> None:
        assert plan_peers({}, states(state(key(1), "10.0.1.0/24"))) == [RemovePeer(key(1))]

    @pytest.mark.parametrize(("have", "want", "expected"), [
        pytest.param(state(key(1), "10.0.1.0/24", endpoint=EP1),
                     cfg(key(1), "10.0.1.0/24", endpoint=EP2),
                     UpdatePeer(key(1), endpoint=EP2), id="endpoint"),
        pytest.param(state(key(1), "10.0.1.0/24", endpoint=None),
                     cfg(key(1), "10.0.1.0/24", endpoint=EP2),
                     UpdatePeer(key(1), endpoint=EP2), id="endpoint-first-set"),
        pytest.param(state(key(1), "10.0.1.0/24", keepalive=0),
                     cfg(key(1), "10.0.1.0/24", keepalive=25),
                     UpdatePeer(key(1), persistent_keepalive=25), id="keepalive-on"),
        pytest.param(state(key(1), "10.0.1.0/24", keepalive=25),
                     cfg(key(1), "10.0.1.0/24", keepalive=0),
                     UpdatePeer(key(1), persistent_keepalive=0), id="keepalive-off"),
        pytest.param(state(key(1), "10.0.1.0/24"),
                     cfg(key(1), "10.0.1.0/24", "fd00:1::/64"),
                     UpdatePeer(key(1), add_allowed_ips=frozenset({net("fd00:1::/64")})),
                     id="add-ip"),
        pytest.param(state(key(1), "10.0.1.0/24", "fd00:1::/64"),
                     cfg(key(1), "10.0.1.0/24"),
                     UpdatePeer(key(1), remove_allowed_ips=frozenset({net("fd00:1::/64")})),
                     id="remove-ip"),
        pytest.param(state(key(1), "10.0.1.0/24"),
                     cfg(key(1), "10.0.9.0/24"),
                     UpdatePeer(key(1), add_allowed_ips=frozenset({net("10.0.9.0/24")}),
                                remove_allowed_ips=frozenset({net("10.0.1.0/24")})),
                     id="replace-ip"),
        pytest.param(state(key(1), "10.0.1.0/24", endpoint=EP1, keepalive=0),
                     cfg(key(1), "10.0.2.0/24", endpoint=EP2, keepalive=25),
                     UpdatePeer(key(1), EP2, 25, frozenset({net("10.0.2.0/24")}),
                                frozenset({net("10.0.1.0/24")})),
                     id="everything"),
    ])
    def test_changed_peer_is_updated_in_place(self, have: PeerState, want: PeerConfig,
                                              expected: UpdatePeer) -> None:
        ops = plan_peers(by_key(want), states(have))
        assert ops == [expected]
        assert apply_peer_ops(states(have), ops)[key(1)].config() == want

    def test_key_change_moves_the_cidr_without_a_gap(self) -> None:
        """A node's key changed: the new peer takes the CIDR, then the old peer goes."""
        actual = states(state(key(1), "10.0.1.0/24", "fd00:1::/64"))
        new = cfg(key(2), "10.0.1.0/24", "fd00:1::/64")
        ops = plan_peers(by_key(new), actual)
        assert ops == [AddPeer(new), RemovePeer(key(1))]
        after_add = apply_peer_ops(actual, ops[:1])
        assert after_add[key(2)].allowed_ips == new.allowed_ips
        assert after_add[key(1)].allowed_ips == frozenset()  # WireGuard moved them over
        after = apply_peer_ops(actual, ops)
        assert configs(after) == by_key(new)

    def test_cidr_moving_between_existing_peers_is_not_withdrawn(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24", "10.0.3.0/24"), state(key(2), "10.0.2.0/24"))
        desired = by_key(cfg(key(1), "10.0.1.0/24"), cfg(key(2), "10.0.2.0/24", "10.0.3.0/24"))
        ops = plan_peers(desired, actual)
        # peer 1 gives the CIDR up only by peer 2 taking it: no op withdraws it
        assert ops == [UpdatePeer(key(2), add_allowed_ips=frozenset({net("10.0.3.0/24")}))]
        assert configs(apply_peer_ops(actual, ops)) == desired

    def test_cidr_moving_while_its_old_peer_changes_too(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24", "10.0.3.0/24"), state(key(2), "10.0.2.0/24"))
        desired = by_key(cfg(key(1), "10.0.1.0/24", "10.0.4.0/24", endpoint=EP2),
                         cfg(key(2), "10.0.2.0/24", "10.0.3.0/24"))
        ops = plan_peers(desired, actual)
        assert ops == [
            UpdatePeer(key(1), endpoint=EP2, add_allowed_ips=frozenset({net("10.0.4.0/24")})),
            UpdatePeer(key(2), add_allowed_ips=frozenset({net("10.0.3.0/24")})),
        ]
        assert configs(apply_peer_ops(actual, ops)) == desired

    def test_order_is_adds_updates_removes_each_by_key(self) -> None:
        actual = states(state(key(5), "10.0.5.0/24"), state(key(4), "10.0.4.0/24"),
                        state(key(3), "10.0.3.0/24"), state(key(2), "10.0.2.0/24"))
        desired = by_key(cfg(key(9), "10.0.9.0/24"), cfg(key(8), "10.0.5.0/24"),
                         cfg(key(3), "10.0.3.0/24", endpoint=EP2),
                         cfg(key(2), "10.0.2.0/24", keepalive=5))
        ops = plan_peers(desired, actual)
        assert ops == [
            AddPeer(desired[key(8)]), AddPeer(desired[key(9)]),
            UpdatePeer(key(2), persistent_keepalive=5), UpdatePeer(key(3), endpoint=EP2),
            RemovePeer(key(4)), RemovePeer(key(5)),
        ]

    def test_desired_endpoint_none_leaves_the_endpoint(self) -> None:
        """WireGuard cannot clear a peer's endpoint, and compute_mesh never asks for none:
        a desired endpoint of None means "no opinion", both for planning and applying."""
        actual = states(state(key(1), "10.0.1.0/24", endpoint=EP1))
        assert plan_peers(by_key(cfg(key(1), "10.0.1.0/24", endpoint=None)), actual) == []
        added = apply_peer_ops({}, [AddPeer(cfg(key(1), endpoint=None))])
        assert added[key(1)].endpoint is None


class TestApplyPeerOps:
    def test_add_takes_allowed_ips_from_other_peers(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24", "10.0.9.0/24"))
        after = apply_peer_ops(actual, [AddPeer(cfg(key(2), "10.0.9.0/24"))])
        assert after[key(1)].allowed_ips == {net("10.0.1.0/24")}
        assert after[key(2)].allowed_ips == {net("10.0.9.0/24")}

    def test_update_takes_allowed_ips_and_keeps_statistics(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24", "10.0.9.0/24"),
                        state(key(2), "10.0.2.0/24", last_handshake=5.0, rx_bytes=7))
        after = apply_peer_ops(actual, [UpdatePeer(
            key(2), add_allowed_ips=frozenset({net("10.0.9.0/24")}),
            remove_allowed_ips=frozenset({net("10.0.2.0/24")}))])
        assert after[key(1)].allowed_ips == {net("10.0.1.0/24")}
        assert after[key(2)] == state(key(2), "10.0.9.0/24", last_handshake=5.0, rx_bytes=7)

    def test_update_none_fields_leave_values(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24", endpoint=EP2, keepalive=25))
        assert apply_peer_ops(actual, [UpdatePeer(key(1))]) == actual

    def test_update_of_unknown_peer_fails(self) -> None:
        with pytest.raises(KeyError, match="update of unknown peer"):
            apply_peer_ops({}, [UpdatePeer(key(1), endpoint=EP1)])

    def test_remove_of_absent_peer_is_a_no_op(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24"))
        assert apply_peer_ops(actual, [RemovePeer(key(2))]) == actual

    def test_input_is_not_mutated(self) -> None:
        actual = states(state(key(1), "10.0.1.0/24"))
        snapshot = dict(actual)
        apply_peer_ops(actual, [AddPeer(cfg(key(2), "10.0.1.0/24")), RemovePeer(key(1))])
        assert actual == snapshot


# ---------------------------------------------------------------------------------------------
# plan_peers: properties over arbitrary peer sets


class TestPlanPeersProperties:
    @given(desired_peers(), actual_peers())
    @PROPERTY
    def test_applying_the_plan_gives_desired(self, desired: dict[PublicKey, PeerConfig],
                                             actual: dict[PublicKey, PeerState]) -> None:
        after = apply_peer_ops(actual, plan_peers(desired, actual))
        assert configs(after) == desired
        assert plan_peers(desired, after) == []

    @given(desired_peers())
    @PROPERTY
    def test_in_sync_means_no_ops(self, desired: dict[PublicKey, PeerConfig]) -> None:
        assert plan_peers(desired, states_from(desired)) == []
        assert plan_peers(desired, apply_peer_ops({}, plan_peers(desired, {}))) == []

    @given(desired_peers(), actual_peers())
    @PROPERTY
    def test_removes_come_last(self, desired: dict[PublicKey, PeerConfig],
                               actual: dict[PublicKey, PeerState]) -> None:
        ops = plan_peers(desired, actual)
        kinds = [type(op) for op in ops]
        first_remove = kinds.index(RemovePeer) if RemovePeer in kinds else len(kinds)
        assert all(k is RemovePeer for k in kinds[first_remove:])
        assert all(k in (AddPeer, UpdatePeer) for k in kinds[:first_remove])

    @given(desired_peers(), actual_peers())
    @PROPERTY
    def test_ops_are_minimal(self, desired: dict[PublicKey, PeerConfig],
                             actual: dict[PublicKey, PeerState]) -> None:
        ops = plan_peers(desired, actual)
        keys = [op_key(op) for op in ops]
        assert len(keys) == len(set(keys)), "one op per peer"
        for op in ops:
            if isinstance(op, AddPeer):
                assert op.public_key not in actual
                assert op.peer == desired[op.public_key]
            elif isinstance(op, RemovePeer):
                assert op.public_key in actual and op.public_key not in desired
            else:
                want, have = desired[op.public_key], actual[op.public_key]
                assert want != have.config()
                assert op.endpoint == (want.endpoint if want.endpoint != have.endpoint
                                       else None)
                assert op.persistent_keepalive == (
                    want.persistent_keepalive
                    if want.persistent_keepalive != have.persistent_keepalive else None)
                assert op.add_allowed_ips == want.allowed_ips - have.allowed_ips
                assert op.remove_allowed_ips <= have.allowed_ips - want.allowed_ips
                assert (op.endpoint, op.persistent_keepalive, op.add_allowed_ips,
                        op.remove_allowed_ips) != (None, None, frozenset(), frozenset())
        # every peer already as desired is left alone
        for k, have in actual.items():
            if desired.get(k) == have.config():
                assert k not in keys

    @given(desired_peers(), actual_peers())
    @PROPERTY
    def test_a_wanted_allowed_ip_is_never_withdrawn(
            self, desired: dict[PublicKey, PeerConfig],
            actual: dict[PublicKey, PeerState]) -> None:
        """An allowed IP that is on the device and wanted is held, after every single op,
        by its current peer or its desired one: it moves, it never goes missing."""
        wanted = {ip: k for k, p in desired.items() for ip in p.allowed_ips}
        ops = plan_peers(desired, actual)
        for op in ops:
            if isinstance(op, UpdatePeer):
                assert not op.remove_allowed_ips & wanted.keys()
        before = {ip: owner_of(actual, ip) for ip in wanted}
        for i in range(len(ops) + 1):
            now = apply_peer_ops(actual, ops[:i])
            for ip, new_owner in wanted.items():
                old_owner = before[ip]
                if old_owner is not None:
                    assert owner_of(now, ip) in (old_owner, new_owner)

    @given(desired_peers(), actual_peers())
    @PROPERTY
    def test_apply_keeps_allowed_ips_unique(self, desired: dict[PublicKey, PeerConfig],
                                            actual: dict[PublicKey, PeerState]) -> None:
        ops = plan_peers(desired, actual)
        for i in range(len(ops) + 1):
            now = apply_peer_ops(actual, ops[:i])
            ips = [ip for p in now.values() for ip in p.allowed_ips]
            assert len(ips) == len(set(ips))


# ---------------------------------------------------------------------------------------------
# locality: one node changes, only its peer is touched


def device_for(peers: Mapping[PublicKey, PeerConfig]) -> dict[PublicKey, PeerState]:
    return states_from(peers)


def replace_spec(specs: tuple[NodeSpec, ...], name: str,
                 new: NodeSpec | None) -> tuple[NodeSpec, ...]:
    out = tuple(s for s in specs if s.name != name)
    return out if new is None else (*out, new)


def with_fields(spec: NodeSpec, **changes: object) -> NodeSpec:
    return replace(spec, **changes)  # type: ignore[arg-type]


@st.composite
def fresh_key(draw: st.DrawFn, cluster: Cluster) -> PublicKey:
    used = {s.public_key for s in cluster.specs} | {cluster.local_key.base64()}
    return PublicKey(draw(raw_keys.filter(lambda r: b64(r) not in used)))


CHANGES = ("key", "address", "cidr", "delete", "add")


class TestLocality:
    @given(st.data(), st.sampled_from(CHANGES))
    @PROPERTY
    def test_one_valid_change_touches_one_peer(self, data: st.DataObject, change: str) -> None:
        cluster = data.draw(clusters(min_remote=0 if change == "add" else 1))
        before = cluster.mesh()
        actual = device_for(before.peers)
        victim = data.draw(st.sampled_from(cluster.remote_specs)) if change != "add" else None
        old_key = PublicKey.from_base64(victim.public_key or "") if victim else None
        new_key: PublicKey | None

        if change == "add":
            slot = data.draw(fresh_slot(cluster))
            new_key = data.draw(fresh_key(cluster))
            specs = (*cluster.specs, NodeSpec(
                "node-new", (cluster.addr(slot),), data.draw(pod_cidrs(slot)), new_key.base64(),
                data.draw(st.floats(-1e9, 1e9))))
        else:
            assert victim is not None
            new_key = old_key
            if change == "delete":
                new_spec = None
            elif change == "key":
                new_key = data.draw(fresh_key(cluster))
                new_spec = with_fields(victim, public_key=new_key.base64())
            elif change == "address":
                new_spec = with_fields(
                    victim, addresses=(cluster.addr(data.draw(fresh_slot(cluster))),))
            else:
                new_spec = with_fields(
                    victim, pod_cidrs=data.draw(pod_cidrs(data.draw(fresh_slot(cluster)))))
            specs = replace_spec(cluster.specs, victim.name, new_spec)

        after = cluster.mesh(specs)
        assert after.rejected == {}
        ops = plan_peers(after.peers, actual)
        assert {op_key(op) for op in ops} <= {old_key, new_key}
        expected_kinds = {
            "key": [AddPeer, RemovePeer], "address": [UpdatePeer], "cidr": [UpdatePeer],
            "delete": [RemovePeer], "add": [AddPeer],
        }
        assert [type(op) for op in ops] == expected_kinds[change]
        assert configs(apply_peer_ops(actual, ops)) == after.peers

    @given(st.data())
    @PROPERTY
    def test_any_change_to_one_node_touches_only_its_peer(self, data: st.DataObject) -> None:
        """Even a conflicting or broken change (with the previous mesh, as the agent runs)
        leaves every other peer alone: the ops name only the node's old or new key."""
        cluster = data.draw(clusters(min_remote=1))
        before = cluster.mesh()
        victim = data.draw(st.sampled_from(cluster.remote_specs))
        garbage = data.draw(garbage_specs(cluster))
        changed = NodeSpec(victim.name, garbage.addresses, garbage.pod_cidrs,
                           garbage.public_key,
                           data.draw(st.sampled_from((victim.created, garbage.created))))
        after = cluster.mesh(replace_spec(cluster.specs, victim.name, changed),
                             previous=before)
        old_key = before.nodes[victim.name].public_key
        for name, n in before.nodes.items():
            if name != victim.name:
                assert after.nodes[name] == n
                assert after.peers[n.public_key] == before.peers[n.public_key]
        new_keys = set(after.peers) - set(before.peers)
        assert len(new_keys) <= 1
        ops = plan_peers(after.peers, device_for(before.peers))
        assert {op_key(op) for op in ops} <= {old_key} | new_keys

    @given(st.data())
    @PROPERTY
    def test_after_applying_every_accepted_cidr_redirects(self, data: st.DataObject) -> None:
        cluster = data.draw(clusters())
        extra = data.draw(st.lists(garbage_specs(cluster), max_size=2,
                                   unique_by=lambda s: s.name))
        start = data.draw(actual_peers())
        mesh = cluster.mesh((*cluster.specs, *extra))
        peers = apply_peer_ops(start, plan_peers(mesh.peers, start))
        dev = DeviceState("wg0", cluster.local_key, cluster.config.listen_port, peers=peers)
        entries = datapath_map(mesh, dev, cluster.config)
        for n in mesh.nodes.values():
            for c in n.pod_cidrs:
                # An older agent's pod CIDRs steer our pods' packets only (Node.node_sources).
                assert entries[c] is (Action.REDIRECT if n.node_sources
                                      else Action.NODE_REDIRECT)


# ---------------------------------------------------------------------------------------------
# plan_map


def apply_map(actual: Mapping[IPNetwork, Action], plan: MapPlan) -> dict[IPNetwork, Action]:
    """Upserts first, then deletes: the order the datapath adapter carries a plan out in."""
    entries = dict(actual)
    entries.update(plan.upserts)
    for c in plan.deletes:
        del entries[c]
    return entries


map_states = st.dictionaries(networks, st.sampled_from(Action), max_size=12)


class TestPlanMap:
    def test_empty_plan_is_falsy(self) -> None:
        assert not plan_map({}, {})
        same = {net("10.0.0.0/24"): Action.LOCAL}
        assert not plan_map(same, dict(same))
        assert plan_map(same, dict(same)) == MapPlan({}, ())
        assert plan_map(same, {})
        assert plan_map({}, same)

    def test_changes(self) -> None:
        actual = {net("10.0.1.0/24"): Action.DROP, net("10.0.2.0/24"): Action.REDIRECT,
                  net("fd00::/64"): Action.LOCAL, net("10.0.9.0/24"): Action.DROP,
                  net("10.0.0.0/16"): Action.DROP}
        desired = {net("fd00:1::/64"): Action.DROP, net("10.0.1.0/24"): Action.REDIRECT,
                   net("10.0.2.0/24"): Action.REDIRECT, net("fd00::/64"): Action.LOCAL}
        plan = plan_map(desired, actual)
        assert plan.upserts == {net("10.0.1.0/24"): Action.REDIRECT,
                                net("fd00:1::/64"): Action.DROP}
        assert list(plan.upserts) == [net("10.0.1.0/24"), net("fd00:1::/64")]
        assert plan.deletes == (net("10.0.0.0/16"), net("10.0.9.0/24"))
        assert apply_map(actual, plan) == desired

    def test_action_change_is_an_upsert_not_a_delete(self) -> None:
        """Replacing an entry in place: the destination never matches nothing."""
        c = net("10.0.1.0/24")
        plan = plan_map({c: Action.DROP}, {c: Action.REDIRECT})
        assert plan == MapPlan({c: Action.DROP}, ())

    @given(map_states, map_states)
    @PROPERTY
    def test_applying_gives_desired(self, desired: dict[IPNetwork, Action],
                                    actual: dict[IPNetwork, Action]) -> None:
        plan = plan_map(desired, actual)
        after = apply_map(actual, plan)
        assert after == desired
        assert not plan_map(desired, after)
        assert bool(plan) == (desired != actual)

    @given(map_states, map_states)
    @PROPERTY
    def test_plan_is_minimal_and_never_unmaps_a_wanted_entry(
            self, desired: dict[IPNetwork, Action], actual: dict[IPNetwork, Action]) -> None:
        plan = plan_map(desired, actual)
        assert set(plan.deletes) == actual.keys() - desired.keys()
        assert not set(plan.deletes) & set(plan.upserts)
        assert plan.upserts == {c: a for c, a in desired.items() if actual.get(c) != a}
        # between the upserts and the deletes every wanted destination is mapped as wanted
        midway = {**actual, **plan.upserts}
        assert all(midway[c] is a for c, a in desired.items())
        assert list(plan.upserts) == sorted(plan.upserts, key=network_sort_key)
        assert list(plan.deletes) == sorted(plan.deletes, key=network_sort_key)


def test_a_roamed_endpoint_is_not_rewritten_on_every_resync() -> None:
    import ipaddress

    from wgmanager.core.keys import PrivateKey
    from wgmanager.core.model import Endpoint, PeerConfig, PeerState
    from wgmanager.core.plan import adopt_roamed_endpoints, configured, plan_peers

    key = PrivateKey.generate().public_key
    nets = frozenset({ipaddress.ip_network("10.1.0.0/24")})
    want = Endpoint(ipaddress.ip_address("10.0.0.1"), 51820)
    roamed = Endpoint(ipaddress.ip_address("10.0.1.1"), 51820)  # the node's second NIC
    desired = {key: PeerConfig(key, want, nets)}
    actual = {key: PeerState(key, roamed, nets)}
    # Never written by us (e.g. after a restart): write it once.
    assert plan_peers(desired, adopt_roamed_endpoints(desired, actual, {})) != []
    # Written, then roamed: leave it alone.
    assert plan_peers(desired, adopt_roamed_endpoints(desired, actual, {key: want})) == []
    # The desired endpoint itself changed since we wrote it: write the new one.
    moved = {key: PeerConfig(key, Endpoint(ipaddress.ip_address("10.0.0.9"), 51820), nets)}
    assert plan_peers(moved, adopt_roamed_endpoints(moved, actual, {key: want})) != []
    assert configured(desired[key], actual[key])
    assert not configured(desired[key], PeerState(key, want, frozenset()))


# -- a replaced peer stays a moment (defer_replaced_removals) -----------------------------

def _peer(n: int, *cidrs: str) -> PeerConfig:
    return PeerConfig(key(n), None, frozenset(ipaddress.ip_network(c) for c in cidrs))


def _held(n: int, *cidrs: str) -> PeerState:
    return PeerState(key(n), None, frozenset(ipaddress.ip_network(c) for c in cidrs))


def test_a_peer_replaced_by_a_new_key_is_removed_only_after_its_grace() -> None:
    """WireGuard discards what a removed peer is still encrypting or sending; packets
    routed to it a moment before its allowed IPs moved would be lost (1 in ~36,000
    echoes at 2 ms pings)."""
    have = {key(2): _held(2, "10.244.2.0/24")}
    ops = plan_peers({key(7): _peer(7, "10.244.2.0/24")}, have)
    retiring: dict[PublicKey, float] = {}
    first = defer_replaced_removals(ops, have, retiring, now=100.0, grace=1.0)
    assert first == [op for op in ops if not isinstance(op, RemovePeer)]
    assert retiring == {key(2): 101.0}
    after = apply_peer_ops(have, first)  # key 2 now holds nothing; key 7 holds the CIDR
    again = plan_peers({key(7): _peer(7, "10.244.2.0/24")}, after)
    assert defer_replaced_removals(again, after, retiring, now=100.5, grace=1.0) == []
    assert defer_replaced_removals(again, after, retiring, now=101.0, grace=1.0) == [
        RemovePeer(key(2))]
    assert retiring == {}


def test_a_peer_that_simply_leaves_is_removed_at_once() -> None:
    have = {key(2): _held(2, "10.244.2.0/24"), key(3): _held(3, "10.244.3.0/24")}
    ops = plan_peers({key(3): _peer(3, "10.244.3.0/24")}, have)
    retiring: dict[PublicKey, float] = {}
    assert defer_replaced_removals(ops, have, retiring, now=5.0, grace=1.0) == ops
    assert retiring == {}


def test_a_retiring_peer_wanted_again_is_forgotten() -> None:
    have = {key(2): _held(2)}
    retiring = {key(2): 50.0}
    ops = plan_peers({key(2): _peer(2, "10.244.2.0/24")}, have)
    defer_replaced_removals(ops, have, retiring, now=10.0, grace=1.0)
    assert retiring == {}
