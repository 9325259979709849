"""Who starts the first handshake of a pair: exactly one side at once, the other as a fallback."""

from __future__ import annotations

from hypothesis import given

from wgmanager.core.handshake import (
    FOLLOWER_WAIT,
    KNOWN_FOR,
    handshakes_to_start,
    leads,
    rotation_roles,
)
from wgmanager.core.keys import PublicKey

from .strategies import PROPERTY, public_keys


@PROPERTY
@given(public_keys, public_keys)
def test_exactly_one_side_of_a_pair_leads(a: PublicKey, b: PublicKey) -> None:
    if a != b:
        assert leads(a, b) != leads(b, a)


@PROPERTY
@given(public_keys, public_keys)
def test_both_sides_adding_at_once_start_one_handshake(a: PublicKey, b: PublicKey) -> None:
    """The crossing that cost 5 s: when both add each other together, only one initiates."""
    if a == b:
        return
    start_a, wait_a = handshakes_to_start(a, [b], {}, now=10.0)
    start_b, wait_b = handshakes_to_start(b, [a], {}, now=10.0)
    assert len(start_a) + len(start_b) == 1
    follower_wait = wait_a or wait_b
    assert list(follower_wait.values()) == [10.0 + FOLLOWER_WAIT]


@PROPERTY
@given(public_keys, public_keys)
def test_the_follower_kicks_once_its_check_falls_due(own: PublicKey, peer: PublicKey) -> None:
    """The device then starts a handshake only if the leader's did not arrive."""
    if own == peer or leads(own, peer):
        return
    start, pending = handshakes_to_start(own, [peer], {}, now=0.0)
    assert start == [] and peer in pending
    # Not due yet: nothing happens, the check stays.
    start, pending = handshakes_to_start(own, [], pending, now=0.1)
    assert start == [] and peer in pending
    start, pending = handshakes_to_start(own, [], pending, now=FOLLOWER_WAIT)
    assert start == [peer]
    assert pending == {}


def test_leaders_start_at_once_and_keep_no_check() -> None:
    own, peer = sorted((PublicKey(bytes([9] * 32)), PublicKey(bytes([3] * 32))),
                       key=lambda k: k.raw)  # own leads peer
    assert handshakes_to_start(own, [peer], {}, now=0.0) == ([peer], {})


def _pair() -> tuple[PublicKey, PublicKey]:
    """(leader, follower) of a pair."""
    a, b = PublicKey(bytes([3] * 32)), PublicKey(bytes([9] * 32))
    return (a, b) if leads(a, b) else (b, a)


@PROPERTY
@given(public_keys, public_keys)
def test_a_peer_learning_a_next_key_starts_at_once_and_the_rotating_node_never_does(
        peer: PublicKey, rotating_next: PublicKey) -> None:
    """Key rotation: the rotating node's new device was rejected before the peer knew its
    key and will not retry for 5 s, so the peer starts at once whatever the key order, and
    the new device never starts one itself: exactly one initiation, none waiting."""
    if peer == rotating_next:
        return
    at_once, never = rotation_roles([rotating_next], {rotating_next: True}, new_device=False)
    start_peer, wait_peer = handshakes_to_start(peer, [rotating_next], {}, 1.0,
                                                at_once=at_once, never=never)
    at_once, never = rotation_roles([peer], {peer: False}, new_device=True,
                                    own_next_key_age=0.0)
    start_new, wait_new = handshakes_to_start(rotating_next, [peer], {}, 1.0,
                                              at_once=at_once, never=never)
    assert (start_peer, wait_peer) == ([rotating_next], {})
    assert (start_new, wait_new) == ([], {})


def test_two_new_devices_keep_the_leader_rule_until_our_key_has_been_out_a_while() -> None:
    leader, follower = _pair()
    # Both published just now: the order decides, the follower checks later.
    for own, other in ((leader, follower), (follower, leader)):
        at_once, never = rotation_roles([other], {other: True}, new_device=True,
                                        own_next_key_age=KNOWN_FOR / 2)
        assert never == frozenset()
        start, wait = handshakes_to_start(own, [other], {}, 0.0, at_once=at_once, never=never)
        assert (start == [other]) == (own == leader)
        assert (other in wait) == (own == follower)
    # Ours has been out for a while: the other side knew it and its attempt was rejected.
    at_once, never = rotation_roles([leader], {leader: True}, new_device=True,
                                    own_next_key_age=KNOWN_FOR)
    assert handshakes_to_start(follower, [leader], {}, 0.0, at_once=at_once,
                               never=never) == ([leader], {})


def test_keys_of_no_accepted_node_and_settled_peers_keep_the_leader_rule() -> None:
    leader, _ = _pair()
    assert rotation_roles([leader], {}, new_device=False) == (frozenset(), frozenset())
    assert rotation_roles([leader], {leader: False}, new_device=False) == (frozenset(),
                                                                           frozenset())
