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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from wgmanager.core.keys import PublicKey

# How long the follower of a pair waits for the leader's handshake before starting its own:
# long enough for the leader to have added the peer in the common case (both sides react to
# the same watch events), short against WireGuard's 5 s retry.
FOLLOWER_WAIT = 0.5


def leads(own: PublicKey, peer: PublicKey) -> bool:
    """Whether this side starts the handshake with ``peer`` as soon as it adds it."""
    return own.raw < peer.raw


def handshakes_to_start(own: PublicKey, added: Iterable[PublicKey],
                        pending: Mapping[PublicKey, float],
                        now: float) -> tuple[list[PublicKey], dict[PublicKey, float]]:
    """The peers to kick now, and the follower checks still to come.

    ``added`` are the peers just added; ``pending`` maps a peer we follow to the time of its
    check. New peers we lead are kicked at once; a follower check that falls due is a kick
    too (the device starts a handshake only if it has no session; a peer removed meanwhile
    is skipped by the device, as kicks only update existing peers).
    """
    start = [k for k in added if leads(own, k)]
    waiting = dict(pending)
    waiting.update({k: now + FOLLOWER_WAIT for k in added if not leads(own, k)})
    for key, due in list(waiting.items()):
        if due <= now:
            del waiting[key]
            start.append(key)
    return start, waiting
