"""What the reconciler does to peers beyond the planned operations: first-handshake kicks
(``wgmanager.core.handshake`` decides who kicks when) and the grace before a replaced peer
is removed."""

from __future__ import annotations

from wgmanager.core.keys import PublicKey
from wgmanager.core.plan import AddPeer, PeerOp, UpdatePeer
from wgmanager.wireguard.backend import WireGuardBackend

HANDSHAKE_KICK = 25  # seconds; any non-zero value makes the device send a keepalive now


def handshake_kicks(keys: list[PublicKey]) -> list[UpdatePeer]:
    """The operations that make a device start a handshake with each of ``keys`` that has
    no session, applied in order (in one request, or after the operations adding them).

    Turning persistent keepalive on sends a keepalive at once in both wireguard-go and the
    kernel (when the setting goes from 0 to non-zero, as each peer's section is applied), and
    a keepalive without a session starts a handshake; it is turned back off right after.
    Devices send at most one initiation per peer every 5 s, so this is cheap to repeat.
    """
    return ([UpdatePeer(k, persistent_keepalive=HANDSHAKE_KICK) for k in keys]
            + [UpdatePeer(k, persistent_keepalive=0) for k in keys])


def start_handshakes(backend: WireGuardBackend, keys: list[PublicKey]) -> None:
    """Makes the device start a handshake with each of ``keys`` (``handshake_kicks``)."""
    if keys:
        backend.apply(handshake_kicks(keys))


# How long a peer whose allowed IPs moved to its replacement (a node's new key) stays on the
# device before it is removed. Removing a peer discards the packets it is still encrypting
# or sending: WireGuard routed them to it a moment before the move. Kept a little while (it
# holds no allowed IPs, so no new packet goes to it) they leave as they should; the node
# that rotates keeps its old key alive far longer than this. Measured: 1 echo in ~36,000
# lost at 2 ms pings without it.
REPLACED_PEER_GRACE = 1.0


def new_peers(ops: list[PeerOp]) -> list[PublicKey]:
    """Peers these operations add, except those with a persistent keepalive of their own
    (the device sends one as soon as it has them). One handshake each: 148 bytes and two
    X25519 operations, so a node's first sync with a thousand peers costs about 150 KB."""
    return [op.peer.public_key for op in ops
            if isinstance(op, AddPeer) and op.peer.persistent_keepalive == 0]
