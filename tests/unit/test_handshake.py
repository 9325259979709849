"""Who starts the first handshake of a pair: exactly one side at once, the other as a fallback."""

from __future__ import annotations

from hypothesis import given

from wgmanager.core.handshake import FOLLOWER_WAIT, handshakes_to_start, leads
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
