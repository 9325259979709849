"""Who starts the first handshake with a newly added peer, and when.

A node that adds a peer starts a handshake at once instead of waiting for the first packet:
if the other side did not know our key yet, a handshake started by traffic is dropped and
WireGuard tries again only after 5 s (pods saw up to 4.7 s of loss right after `lab up`).
But when both sides add each other at the same moment (every node of a cluster starting, two
nodes rotating at once) and both start a handshake, the two initiations cross: each side
answers the other's, which overwrites its own handshake in progress, so each rejects the
answer to its own and neither holds a session it can send with. Both then wait 5 s, and the
retries can cross again. Measured with two wireguard-go devices kicked together: 9 of 20
pairs had no session 0.5 s later, and 1 in 12 was still broken 7 s later.

So only one side of each pair starts at once: the one with the smaller public key (both sides
compute the same order). The other side makes its check a moment later, which starts a
handshake only if there is still no session: that happens when the leader's handshake
reached it before it knew the leader's key. Two initiations can then cross only if the
follower's check falls within a round trip of the leader's own start.

The check is the device's own: a kick (``wgmanager.reconciler.handshake_kicks``) makes a
device send a keepalive, which goes out on a confirmed session and starts a handshake where
there is none (wireguard-go and the kernel both send staged packets with the current
keypair, or initiate without one). Reading the handshake times ourselves would cost a dump
of every peer per check (neither UAPI nor netlink reads one peer): at 5,000 peers ~20-40 ms
of wireguard-go's time per key change, holding its configuration lock, O(N) work for an
O(1) event. The kick costs one 32-byte keepalive where the session is already up.

A key rotation is the one case where the order is known beforehand, so nobody waits. The
rotating node's new device meets each peer with a key that peer has never seen: its first
handshake is rejected, and WireGuard will not start another for 5 s. So the peer that learns
a next key starts the handshake at once, whatever the order of the keys, and the rotating
node's new device starts exactly one towards each peer that is not rotating itself: right
after it got its peers, well before the next key goes out, so the peers reject it; WireGuard
then starts no other for 5 s, not even for the first packet steered into the device. (Started
just before the next key went out, it sometimes reached a loaded peer after the peer had
learnt the key, crossed the peer's own, and left the pair without a session for 5 s: 2 of
20 e2e runs.) No initiations can cross. Measured before this rule
(`bench/rotation.py`, 5 nodes): the follower half of the peers waited out ``FOLLOWER_WAIT``,
so their traffic to and from the rotating node sat 0.5 s in wireguard-go's staged queue
(ping round trips of 500 ms, a 0.52 s TCP stall, bursts of late duplicates) and overflowed
it when the traffic was heavy (the queue holds 128 packets per peer and drops the oldest).
Two rotating nodes' new devices (``--max-concurrent 2``) learn each other's next key at
unrelated moments, possibly together. The one that learns the other's key well after it
published its own (``KNOWN_FOR``) starts at once: by then the other had learnt ours, and its
own attempt (if it led) was rejected, as we did not know its key yet. Two nodes that
published within ``KNOWN_FOR`` of each other keep the leader rule. (Measured with the leader
rule alone: the follower half of such pairs waited 0.5 s, bursts of 31-46 duplicates.)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from wgmanager.core.keys import PublicKey

# How long the follower of a pair waits for the leader's handshake before starting its own:
# long enough for the leader to have added the peer in the common case (both sides react to
# the same watch events), short against WireGuard's 5 s retry.
FOLLOWER_WAIT = 0.5
# How long our own next key must have been out before we take it that a rotating peer whose
# next key we learn now has learnt ours (its agent's watch and pass: tens of milliseconds).
KNOWN_FOR = 0.3


def leads(own: PublicKey, peer: PublicKey) -> bool:
    """Whether this side starts the handshake with ``peer`` as soon as it adds it."""
    return own.raw < peer.raw


def handshakes_to_start(own: PublicKey, added: Iterable[PublicKey],
                        pending: Mapping[PublicKey, float], now: float, *,
                        at_once: Collection[PublicKey] = (),
                        never: Collection[PublicKey] = (),
                        ) -> tuple[list[PublicKey], dict[PublicKey, float]]:
    """The peers to kick now, and the follower checks still to come.

    ``added`` are the peers just added; ``pending`` maps a peer we follow to the time of its
    check. New peers we lead are kicked at once; a follower check that falls due is a kick
    too (the device starts a handshake only if it has no session; a peer removed meanwhile
    is skipped by the device, as kicks only update existing peers). During key rotations
    (module docstring, ``rotation_roles``): added keys in ``at_once`` are kicked at once
    whatever the order, and keys in ``never`` are neither kicked nor checked.
    """
    start = [k for k in added if k not in never and (k in at_once or leads(own, k))]
    waiting = dict(pending)
    waiting.update({k: now + FOLLOWER_WAIT for k in added
                    if k not in never and k not in at_once and not leads(own, k)})
    for key, due in list(waiting.items()):
        if due <= now:
            del waiting[key]
            start.append(key)
    return start, waiting


def rotation_roles(added: Iterable[PublicKey], rotating_peer: Mapping[PublicKey, bool], *,
                   new_device: bool, own_next_key_age: float | None = None,
                   ) -> tuple[frozenset[PublicKey], frozenset[PublicKey]]:
    """Which of the ``added`` keys a device kicks at once, and which it never kicks.

    ``rotating_peer`` says, per added key that belongs to an accepted node, whether that
    node is rotating (then the key is its next key). ``new_device``: the device is our own
    new device during our rotation, whose next key has been out ``own_next_key_age``
    seconds (None: not yet). A device of a node that is not rotating (or our old one)
    learning a rotating peer's next key starts at once; our new device waits for every
    peer that is not rotating; two new devices: at once if ours has been out ``KNOWN_FOR``,
    else the leader rule.
    """
    at_once: set[PublicKey] = set()
    never: set[PublicKey] = set()
    for key in added:
        peer_rotates = rotating_peer.get(key)
        if peer_rotates is None:
            continue
        if new_device and not peer_rotates:
            never.add(key)
        elif peer_rotates and (not new_device or (own_next_key_age is not None
                                                   and own_next_key_age >= KNOWN_FOR)):
            at_once.add(key)
    return frozenset(at_once), frozenset(never)
