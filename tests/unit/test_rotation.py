"""Key rotation's pure core: states, transitions, confirmations, steering, schedule."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.mesh import (
    Route,
    compute_mesh,
    datapath_map,
    held_key,
    old_device_peers,
    parse_node,
)
from wgmanager.core.model import (
    Action,
    DeviceState,
    IPNetwork,
    MeshConfig,
    Node,
    NodeSpec,
    PeerState,
)
from wgmanager.core.plan import plan_fail_closed
from wgmanager.core.rotation import (
    Phase,
    Rotation,
    RotationState,
    RotationStatus,
    StateError,
    begin,
    confirmed,
    finish,
    layout,
    others_rotating,
    prepared,
    progress,
    published,
    roll_back,
    routes,
    schedule_due,
    stale_sessions,
    status_annotation,
    step,
)
from wgmanager.keystore import KeyStore, slot_key


def key(i: int) -> PublicKey:
    return PrivateKey.from_hex(f"{i:02x}" * 32).public_key


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def node(name: str, i: int, *, k: int | None = None) -> Node:
    return Node(name, (ipaddress.ip_address(f"192.168.0.{i}"),), (net(f"10.244.{i}.0/24"),),
                key(k if k is not None else i))


def device(peers: dict[Node, float | None]) -> DeviceState:
    return DeviceState("wgm0", key(99), 51820, peers={
        n.public_key: PeerState(n.public_key, None, frozenset(n.pod_cidrs),
                                last_handshake=hs) for n, hs in peers.items()})


REMOTE = [node("b", 2), node("c", 3)]


def switching(started: float = 100.0) -> RotationState:
    return prepared(begin(RotationState(), "req-1", 50.0), started)


# -- transitions ------------------------------------------------------------------------

def test_a_request_starts_a_rotation_to_the_other_slot_once() -> None:
    idle = RotationState(slot=1)
    s = begin(idle, "r1", 10.0)
    assert s.rotation == Rotation("r1", 1, 0, Phase.PREPARE, 10.0, 10.0)
    assert begin(s, "r2", 11.0) == s  # one at a time
    done = RotationState(slot=0, last_request="r1")
    assert begin(done, "r1", 12.0) == done  # a request is carried out once
    assert begin(idle, "", 12.0) == idle


def test_the_whole_forward_path() -> None:
    s = switching(100.0)
    assert layout(s).slots == (0, 1)
    assert published(s).next_slot == 1
    s2 = step(s, progress(REMOTE, frozenset({"b", "c"})), 101.0, timeout=30)
    assert s2 == RotationState(slot=1, last_request="req-1", last_result="completed",
                               last_finished=101.0)
    assert layout(s2).slots == (1,)
    assert published(s2).next_slot is None


def test_a_switch_waits_then_rolls_back_after_the_timeout() -> None:
    s = switching(100.0)
    half = progress(REMOTE, frozenset({"b"}))
    assert step(s, half, 120.0, timeout=30) == s
    rb = step(s, half, 131.0, timeout=30)
    assert rb.rotation is not None and rb.rotation.phase is Phase.ROLLBACK
    assert "1 peer(s) did not switch" in rb.rotation.reason and "c" in rb.rotation.reason
    assert rb.rotation.started == 131.0
    assert published(rb).next_slot is None  # the next key is withdrawn
    assert layout(rb).slots == (0, 1)  # both devices stay until peers are back
    back = step(rb, progress(REMOTE, frozenset({"b", "c"})), 132.0, timeout=30)
    assert back.slot == 0 and back.rotation is None
    assert back.last_result.startswith("rolled back: 1 peer(s)")


def test_a_rollback_ends_at_its_own_timeout_even_if_a_peer_never_answers() -> None:
    rb = roll_back(switching(100.0), 200.0, "x")
    stuck = progress(REMOTE, frozenset({"b"}))
    assert step(rb, stuck, 229.0, timeout=30).rotation is not None
    assert step(rb, stuck, 231.0, timeout=30).rotation is None


def test_a_prepare_that_never_finishes_rolls_back() -> None:
    s = begin(RotationState(), "r", 0.0)
    assert step(s, progress([], frozenset()), 10.0, timeout=30) == s
    assert step(s, progress([], frozenset()), 31.0, timeout=30).phase == "rollback"


def test_illegal_transitions_raise() -> None:
    with pytest.raises(ValueError):
        prepared(RotationState(), 1.0)
    with pytest.raises(ValueError):
        finish(RotationState(), 1.0)
    with pytest.raises(ValueError):
        roll_back(RotationState(), 1.0, "x")


# -- confirmations and steering ---------------------------------------------------------

def test_switch_confirmation_is_a_handshake_on_the_new_device_since_the_switch() -> None:
    b, c = REMOTE
    s = switching(100.0)
    cur = device({b: 150.0, c: 150.0})
    alt = device({b: 101.0, c: 99.0})  # c's handshake predates the switch
    assert confirmed(s, REMOTE, cur, alt) == {"b"}
    assert routes(s, REMOTE, frozenset({"b"})) == {"b": Route.ALT, "c": Route.BOTH}


def test_rollback_confirmation_is_a_new_handshake_on_the_old_device_or_never_switched() -> None:
    b, c, d = node("b", 2), node("c", 3), node("d", 4)
    rb = roll_back(switching(100.0), 200.0, "x")
    cur = device({b: 201.0, c: 150.0, d: 150.0})
    alt = device({b: 120.0, c: 120.0, d: None})  # d never switched
    assert confirmed(rb, [b, c, d], cur, alt) == {"b", "d"}
    assert routes(rb, [b, c, d], frozenset({"b", "d"})) == {
        "b": Route.CURRENT, "c": Route.BOTH, "d": Route.CURRENT}


def test_rollback_resets_old_sessions_of_peers_that_had_switched_once() -> None:
    b, c, d, e = node("b", 2), node("c", 3), node("d", 4), node("e", 5)
    rb = roll_back(switching(100.0), 200.0, "x")
    # b switched (old session older than its new one); c is back already (newer on the old
    # device); d never switched; e was reset already (no handshake on the old device).
    cur = device({b: 90.0, c: 201.0, d: 90.0, e: None})
    alt = device({b: 120.0, c: 120.0, d: None, e: 120.0})
    assert stale_sessions(rb, [b, c, d, e], cur, alt) == (b.public_key,)
    # Only a rollback sends peers back to the old device.
    assert stale_sessions(switching(100.0), [b], cur, alt) == ()
    assert stale_sessions(RotationState(), [b], cur, None) == ()


@given(st.lists(st.tuples(st.one_of(st.none(), st.floats(0, 1e6)),
                          st.one_of(st.none(), st.floats(0, 1e6))), max_size=6))
def test_a_reset_peer_is_never_stale_again(handshakes: list[tuple[float | None, float | None]],
                                           ) -> None:
    remote = [node(f"n{i}", i + 2) for i in range(len(handshakes))]
    rb = roll_back(switching(100.0), 200.0, "x")
    cur = device({n: hs[0] for n, hs in zip(remote, handshakes, strict=True)})
    alt = device({n: hs[1] for n, hs in zip(remote, handshakes, strict=True)})
    stale = set(stale_sessions(rb, remote, cur, alt))
    after = device({n: None if n.public_key in stale else hs[0]
                    for n, hs in zip(remote, handshakes, strict=True)})
    assert stale_sessions(rb, remote, after, alt) == ()


def test_no_steering_outside_switch_and_rollback() -> None:
    assert routes(RotationState(), REMOTE, frozenset()) == {}
    assert routes(begin(RotationState(), "r", 0), REMOTE, frozenset()) == {}
    assert confirmed(RotationState(), REMOTE, device({}), None) == frozenset()


def _mesh_and_devices() -> tuple[object, DeviceState, DeviceState]:
    specs = [NodeSpec("a", ("192.168.0.1",), ("10.244.1.0/24",)),
             NodeSpec("b", ("192.168.0.2",), ("10.244.2.0/24",), key(2).base64()),
             NodeSpec("c", ("192.168.0.3",), ("10.244.3.0/24",), key(3).base64())]
    mesh = compute_mesh(local_name="a", local_key=key(1), specs=specs, config=MeshConfig())
    b, c = mesh.nodes["b"], mesh.nodes["c"]
    return mesh, device({b: None, c: None}), device({b: None, c: None})


def test_datapath_map_encodes_each_route() -> None:
    mesh, cur, alt = _mesh_and_devices()
    cfg = MeshConfig()
    m = datapath_map(mesh, cur, cfg, alt=alt,  # type: ignore[arg-type]
                     routes={"b": Route.BOTH, "c": Route.ALT})
    assert m[net("10.244.2.0/24")] is Action.REDIRECT_BOTH
    assert m[net("10.244.3.0/24")] is Action.REDIRECT_ALT
    m = datapath_map(mesh, cur, cfg, alt=device({}),  # type: ignore[arg-type]
                     routes={"b": Route.BOTH, "c": Route.ALT})
    # The new device lacks the peers: BOTH falls back to the current one, ALT fails closed.
    assert m[net("10.244.2.0/24")] is Action.REDIRECT
    assert m[net("10.244.3.0/24")] is Action.DROP


def test_any_key_keeps_a_cidr_redirected_while_its_peer_key_changes() -> None:
    mesh, _, _ = _mesh_and_devices()
    old_b = node("b", 2, k=42)  # the device still holds b's CIDR under b's old key
    before = device({old_b: None})
    strict = datapath_map(mesh, before, MeshConfig())  # type: ignore[arg-type]
    loose = datapath_map(mesh, before, MeshConfig(), any_key=True)  # type: ignore[arg-type]
    assert strict[net("10.244.2.0/24")] is Action.DROP
    assert loose[net("10.244.2.0/24")] is Action.REDIRECT


def test_fail_open_leaves_not_ready_cidrs_to_the_cni() -> None:
    mesh, cur, _ = _mesh_and_devices()
    cfg = MeshConfig(cluster_cidrs=(net("10.244.0.0/16"),), fail_closed=False)
    m = datapath_map(mesh, device({}), cfg)  # type: ignore[arg-type]
    assert m == {net("10.244.1.0/24"): Action.LOCAL}
    m = datapath_map(mesh, cur, cfg)  # type: ignore[arg-type]
    assert m[net("10.244.2.0/24")] is Action.REDIRECT
    assert net("10.244.0.0/16") not in m


REDIRECTING = st.sampled_from([Action.REDIRECT, Action.REDIRECT_ALT, Action.REDIRECT_BOTH])
ANY_ACTION = st.sampled_from(list(Action))
CIDRS = st.sampled_from([net(f"10.244.{i}.0/24") for i in range(6)])


@given(st.dictionaries(CIDRS, ANY_ACTION), st.dictionaries(CIDRS, ANY_ACTION))
def test_fail_closed_plan_never_retargets_a_redirect(desired: dict[IPNetwork, Action],
                                                     actual: dict[IPNetwork, Action]) -> None:
    plan = plan_fail_closed(desired, actual)
    for cidr, action in plan.upserts.items():
        assert desired[cidr] is action
        redirect_kinds = {Action.REDIRECT, Action.REDIRECT_ALT, Action.REDIRECT_BOTH}
        assert not (action in redirect_kinds and actual.get(cidr) in redirect_kinds)
    # Everything that closes is in it: new entries, drops, and removals.
    for cidr, action in desired.items():
        if cidr not in actual or (action is Action.DROP and actual[cidr] is not Action.DROP):
            assert plan.upserts.get(cidr) is action
    assert set(plan.deletes) == set(actual) - set(desired)


# -- peers reading a rotating node ------------------------------------------------------

def test_a_published_next_key_and_port_is_what_peers_use() -> None:
    spec = NodeSpec("b", ("192.168.0.2",), ("10.244.2.0/24",), key(2).base64(), port="51820",
                    next_public_key=key(7).base64(), next_port="51821")
    parsed = parse_node(spec)
    assert isinstance(parsed, Node)
    assert (parsed.public_key, parsed.port, parsed.rotating) == (key(7), 51821, True)


def test_a_malformed_next_key_is_ignored_and_the_current_key_kept() -> None:
    for bad in [{"next_public_key": "nope"}, {"next_public_key": key(7).base64(),
                                             "next_port": "99999"}]:
        spec = replace(NodeSpec("b", ("192.168.0.2",), ("10.244.2.0/24",), key(2).base64()),
                       **bad)  # type: ignore[arg-type]
        parsed = parse_node(spec)
        assert isinstance(parsed, Node)
        assert (parsed.public_key, parsed.rotating) == (key(2), False)


@pytest.mark.parametrize("port", ["0", "65536", "x", "-1"])
def test_a_bad_port_annotation_rejects_the_node(port: str) -> None:
    spec = NodeSpec("b", ("192.168.0.2",), ("10.244.2.0/24",), key(2).base64(), port=port)
    assert not isinstance(parse_node(spec), Node)


def test_peers_follow_the_rotating_node_to_its_new_key_and_port() -> None:
    specs = [NodeSpec("a", ("192.168.0.1",), ("10.244.1.0/24",)),
             NodeSpec("b", ("192.168.0.2",), ("10.244.2.0/24",), key(2).base64(),
                      next_public_key=key(7).base64(), next_port="51821")]
    mesh = compute_mesh(local_name="a", local_key=key(1), specs=specs, config=MeshConfig())
    peer = mesh.peers[key(7)]
    assert peer.endpoint is not None and peer.endpoint.port == 51821
    assert key(2) not in mesh.peers
    assert others_rotating(mesh.nodes) == ("b",)


# -- two nodes rotating at once: the old device keeps the key it holds ------------------

def _rotating_b(*, next_key: bool = True) -> list[NodeSpec]:
    return [NodeSpec("a", ("192.168.0.1",), ("10.244.1.0/24",)),
            NodeSpec("b", ("192.168.0.2",), ("10.244.2.0/24",), key(2).base64(), port="51820",
                     next_public_key=key(7).base64() if next_key else None,
                     next_port="51821" if next_key else None)]


def _holding(*keys: PublicKey) -> DeviceState:
    return DeviceState("wgm0", key(1), 51820, peers={
        k: PeerState(k, None, frozenset({net("10.244.2.0/24")})) for k in keys})


def test_a_rotating_nodes_old_device_keeps_the_previous_key_it_holds() -> None:
    # b rotates (published key 2 -> next key 7) while we rotate too: our old device holds 2,
    # which b still accepts on its old device, so that pair stays untouched.
    mesh = compute_mesh(local_name="a", local_key=key(1), specs=_rotating_b(),
                        config=MeshConfig())
    b = mesh.nodes["b"]
    assert (b.previous_key, b.previous_port) == (key(2), 51820)
    peers = old_device_peers(mesh, _holding(key(2)), MeshConfig())
    assert set(peers) == {key(2)}
    assert peers[key(2)].endpoint is not None and peers[key(2)].endpoint.port == 51820
    assert peers[key(2)].allowed_ips == mesh.peers[key(7)].allowed_ips
    assert held_key(_holding(key(2)), b) == key(2)


@pytest.mark.parametrize(("holds", "want"), [
    ((key(7),), key(7)),  # already switched (while we were idle): never switch back
    ((), key(7)),  # a node we hold nothing for yet: its newest key
    ((key(9),), key(7)),  # a key b no longer publishes (it finished or rolled back)
])
def test_the_old_device_otherwise_takes_the_newest_key(holds: tuple[PublicKey, ...],
                                                        want: PublicKey) -> None:
    mesh = compute_mesh(local_name="a", local_key=key(1), specs=_rotating_b(),
                        config=MeshConfig())
    assert set(old_device_peers(mesh, _holding(*holds), MeshConfig())) == {want}


def test_after_the_peer_finished_the_old_device_moves_to_its_only_key() -> None:
    mesh = compute_mesh(local_name="a", local_key=key(1), specs=_rotating_b(next_key=False),
                        config=MeshConfig())
    assert mesh.nodes["b"].previous_key is None
    assert set(old_device_peers(mesh, _holding(key(7)), MeshConfig())) == {key(2)}


def test_a_previous_key_the_device_holds_counts_as_ready_in_the_datapath() -> None:
    mesh = compute_mesh(local_name="a", local_key=key(1), specs=_rotating_b(),
                        config=MeshConfig())
    entries = datapath_map(mesh, _holding(key(2)), MeshConfig())
    assert entries[net("10.244.2.0/24")] is Action.REDIRECT
    assert datapath_map(mesh, _holding(), MeshConfig())[net("10.244.2.0/24")] is Action.DROP


# -- persistence, status, schedule ------------------------------------------------------

STATES = st.builds(
    RotationState, slot=st.sampled_from([0, 1]),
    rotation=st.none() | st.builds(
        lambda f, ph, t, r: Rotation("req", f, 1 - f, ph, t, t - 1, r),
        st.sampled_from([0, 1]), st.sampled_from(list(Phase)),
        st.floats(0, 2e9), st.text(max_size=20)),
    last_request=st.text(max_size=20), last_result=st.text(max_size=20),
    last_finished=st.floats(0, 2e9))


@given(STATES)
def test_state_round_trips_through_json(state: RotationState) -> None:
    assert RotationState.from_json(state.to_json()) == state


@pytest.mark.parametrize("text", ["", "[]", "{\"slot\": 2}", "{\"slot\": true}",
                                  json.dumps({"rotation": {"request": "r", "from_slot": 0,
                                                           "to_slot": 0, "phase": "switch",
                                                           "started": 1}}),
                                  json.dumps({"rotation": {"phase": "bogus"}})])
def test_corrupt_state_is_an_error(text: str) -> None:
    with pytest.raises(StateError):
        RotationState.from_json(text)


def test_status_annotation_round_trips_and_never_holds_keys() -> None:
    s = switching()
    text = status_annotation(s, progress(REMOTE, frozenset({"b"})))
    status = RotationStatus.parse(text)
    assert status == RotationStatus("switch", "req-1", "", 2, 1, "")
    done = status_annotation(finish(s, 5.0), None)
    assert RotationStatus.parse(done) == RotationStatus("idle", "req-1", "completed")
    assert RotationStatus.parse("not json") is None
    assert RotationStatus.parse(None) is None


def test_schedule_spreads_nodes_over_the_last_fifth_of_the_interval() -> None:
    interval = 1000.0
    due_at = []
    for i in range(200):
        name = f"node-{i}"
        assert not schedule_due(name, 0.0, interval, 799.0)
        assert schedule_due(name, 0.0, interval, 1000.0)
        due_at.append(next(t for t in range(800, 1001) if schedule_due(name, 0.0, interval, t)))
    assert max(due_at) - min(due_at) > 150  # spread, not all at once
    assert not schedule_due("x", 0.0, 0.0, 1e12)  # off


def test_keystore_keeps_the_state_and_destroys_retired_keys(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "s")
    assert store.load_rotation() == RotationState()
    store.load_or_create(slot_key(1))
    assert store.load_rotation().slot == 1  # only slot 1 has a key: it is the one in use
    s = switching()
    store.save_rotation(s)
    assert store.load_rotation() == s
    assert store.destroy(slot_key(1)) is True
    assert not store.exists(slot_key(1))
    assert store.destroy(slot_key(1)) is False
    store.write_state("rotation.json", "{garbage")
    assert store.load_rotation() == RotationState(slot=0)

