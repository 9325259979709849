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
compute the same order). The other side checks a moment later and starts one only if there is
still no session, which happens when the leader's handshake reached it before it knew the
leader's key. Two initiations can then cross only if the follower's check falls within a
round trip of the leader's own start.
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
                        sessions: Mapping[PublicKey, float | None],
                        now: float) -> tuple[list[PublicKey], dict[PublicKey, float]]:
    """The peers to start a handshake with now, and the follower checks still to come.

    ``added`` are the peers just added; ``pending`` maps a peer we follow to the time of its
    check; ``sessions`` maps each peer whose check is due and that the device still holds to
    its last handshake time as read now (None: never; ``WireGuardBackend.handshakes``). A
    check that falls due starts a handshake only if the peer is still there and still has
    none.
    """
    start = [k for k in added if leads(own, k)]
    waiting = dict(pending)
    waiting.update({k: now + FOLLOWER_WAIT for k in added if not leads(own, k)})
    for key, due in list(waiting.items()):
        if due > now:
            continue
        del waiting[key]
        if key in sessions and sessions[key] is None:
            start.append(key)
    return start, waiting
