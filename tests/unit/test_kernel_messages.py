"""Packing peer requests into netlink messages: sizes as encoded, limits, order, atomicity.

Every message here is encoded to bytes by pyroute2's own ``wgmsg`` (what the kernel
receives) and decoded again; the kernel itself applies them in tests/kernel/guest.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest

from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.model import Endpoint, PeerConfig
from wgmanager.core.plan import AddPeer, RemovePeer
from wgmanager.wireguard.kernel import peer_requests, set_device_message
from wgmanager.wireguard.kernel_messages import (
    NLA_MAX,
    PEERS_BUDGET,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    PeerRequest,
    pack,
    peer_size,
    split_peer,
)


def pub(n: int) -> PublicKey:
    return PrivateKey(n.to_bytes(2, "big") * 16).public_key


def v4(n: int) -> list[str]:
    return [str(ipaddress.ip_network((0x0A000000 + (i << 8), 24))) for i in range(n)]


def v6(n: int) -> list[str]:
    return [str(ipaddress.ip_network((0xFD00 << 112 | i << 64, 64))) for i in range(n)]


def encoded(peers: list[PeerRequest]) -> tuple[int, list[Any]]:
    """(length of the WGDEVICE_A_PEERS attribute on the wire, its decoded peers)."""
    from pyroute2.netlink.generic.wireguard import wgmsg
    msg = set_device_message("wg0", peers)
    msg.encode()
    data = bytes(msg.data)
    decoded = wgmsg(data)
    decoded.decode()
    offset = 20  # netlink header 16 + genl header 4
    while offset < len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if kind & 0x3FFF == 8:  # WGDEVICE_A_PEERS
            return length, list(decoded.get_attr("WGDEVICE_A_PEERS"))
        offset += (length + 3) // 4 * 4
    raise AssertionError("no WGDEVICE_A_PEERS in the message")


REQUESTS: list[PeerRequest] = [
    {"public_key": pub(1).base64(), "remove": True},
    {"public_key": pub(2).base64(), "update_only": True, "persistent_keepalive": 0},
    {"public_key": pub(3).base64(), "replace_allowed_ips": True, "allowed_ips": v4(3),
     "persistent_keepalive": 25, "endpoint_addr": "192.0.2.1", "endpoint_port": 51820},
    {"public_key": pub(4).base64(), "allowed_ips": v6(2) + v4(1),
     "endpoint_addr": "2001:db8::1", "endpoint_port": 1},
]


@pytest.mark.parametrize("req", REQUESTS, ids=["remove", "keepalive", "v4", "v6"])
def test_computed_size_is_the_encoded_size(req: PeerRequest) -> None:
    length, _ = encoded([req])
    assert length == 4 + peer_size(req)


def test_pyroute2_alone_cannot_encode_a_peer_past_the_limit() -> None:
    # The bug: one AddPeer with 2,339 IPv4 allowed IPs did not fit a 16-bit attribute length.
    big = {"public_key": pub(1).base64(), "allowed_ips": v4(2339)}
    with pytest.raises(struct.error):
        encoded([big])
    assert len(split_peer(big)) == 2
    assert len(split_peer({**big, "allowed_ips": v4(2338)})) == 1


@pytest.mark.parametrize("ips", [v4(5000), v6(4000), v4(3000) + v6(3000)],
                         ids=["5000 v4", "4000 v6", "mixed"])
def test_a_huge_peer_is_split_into_parts_that_encode(ips: list[str]) -> None:
    req = {"public_key": pub(1).base64(), "replace_allowed_ips": True, "allowed_ips": ips,
           "persistent_keepalive": 25, "endpoint_addr": "192.0.2.1", "endpoint_port": 9}
    messages = list(pack([(req, "op")]))
    assert len(messages) > 1
    got: list[str] = []
    for i, batch in enumerate(messages):
        length, (peer,) = encoded([r for r, _ in batch])
        assert length <= NLA_MAX
        flags = peer.get_attr("WGPEER_A_FLAGS")
        # The first part replaces and carries the settings; later ones only add IPs.
        assert flags == (WGPEER_F_REPLACE_ALLOWEDIPS if i == 0 else WGPEER_F_UPDATE_ONLY)
        assert (peer.get_attr("WGPEER_A_ENDPOINT") is not None) == (i == 0)
        got += [a["addr"] for a in peer.get_attr("WGPEER_A_ALLOWEDIPS")]
    assert got == [str(ipaddress.ip_network(c)) for c in ips]


def test_many_peers_share_messages_in_order() -> None:
    ops = [AddPeer(PeerConfig(pub(n), Endpoint(ipaddress.ip_address("192.0.2.1"), 51820),
                              frozenset(ipaddress.ip_network(c) for c in v4(2)), 0))
           for n in range(1, 1001)]
    requests = [(r, op) for op in ops for r in peer_requests(op, pub(0))]
    messages = list(pack(requests))
    per_peer = peer_size(requests[0][0])
    assert len(messages) == -(-len(ops) * per_peer // PEERS_BUDGET)  # as few as fit
    assert [op for batch in messages for _, op in batch] == ops
    for batch in messages:
        assert encoded([r for r, _ in batch])[0] <= NLA_MAX


def test_a_fresh_reset_is_one_message_removing_then_adding() -> None:
    peer = PeerConfig(pub(7), None, frozenset(ipaddress.ip_network(c) for c in v4(100)), 0)
    op = AddPeer(peer, fresh=True)
    (batch,) = pack((r, op) for r in peer_requests(op, pub(0)))
    _, peers = encoded([r for r, _ in batch])
    assert [(p.get_attr("WGPEER_A_PUBLIC_KEY").decode(), p.get_attr("WGPEER_A_FLAGS"))
            for p in peers] == [(pub(7).base64(), WGPEER_F_REMOVE_ME),
                                (pub(7).base64(), WGPEER_F_REPLACE_ALLOWEDIPS)]


def test_removals_pack_with_additions() -> None:
    ops = [RemovePeer(pub(1)), AddPeer(PeerConfig(pub(2), None, frozenset(), 0))]
    assert len(list(pack((r, op) for op in ops for r in peer_requests(op, pub(0))))) == 1
