"""Peer requests packed into WG_CMD_SET_DEVICE messages that fit netlink's limits. Pure.

Why: every netlink attribute carries a 16-bit length, so a nest holds at most 65,535
bytes. One device message nests all its peers in WGDEVICE_A_PEERS, and a peer nests its
allowed IPs: one peer with more than 2,338 IPv4 (1,636 IPv6) allowed IPs cannot be
encoded at all (pyroute2 raised ``struct.error`` for it), and sending each peer in its own
message costs a round trip per peer (a first sync with thousands of peers, handshake
kicks). So requests are packed, in order, into as few messages as fit, and a peer whose
allowed IPs do not fit in one message continues in the next (as `wg setconf` does): the
first part carries its flags, endpoint and keepalive, the rest only add allowed IPs.

The kernel applies the peers of one message in order under the device's lock, so what
one message carries is atomic: a fresh reset (remove, then add the same key) leaves no
moment in which no peer owns the allowed IPs, unless the peer is so large that it spans
messages.

Sizes are computed from the wire format (include/uapi/linux/wireguard.h): every attribute
is a 4-byte header plus its payload padded to 4 bytes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

PeerRequest = dict[str, Any]  # public_key, remove, update_only, replace_allowed_ips,
#                               endpoint_addr/_port, persistent_keepalive, allowed_ips

NLA_MAX = 0xFFFF  # an attribute's length field is 16 bits, header included
PEERS_BUDGET = NLA_MAX - 4  # the peer entries of one message: WGDEVICE_A_PEERS's payload

WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4


def _nla(payload: int) -> int:
    return 4 + (payload + 3) // 4 * 4


def allowed_ip_size(cidr: str) -> int:
    """Bytes one allowed IP takes: family, address and mask in their own nest."""
    addr = 4 if ":" not in cidr else 16
    return _nla(_nla(2) + _nla(addr) + _nla(1))


def peer_size(req: PeerRequest) -> int:
    """Bytes ``req`` takes as one entry of WGDEVICE_A_PEERS."""
    size = _nla(32) + _nla(4)  # public key, flags
    if "endpoint_addr" in req:
        size += _nla(28 if ":" in req["endpoint_addr"] else 16)  # sockaddr_in6 / _in
    if "persistent_keepalive" in req:
        size += _nla(2)
    if "allowed_ips" in req:
        size += 4 + sum(allowed_ip_size(c) for c in req["allowed_ips"])
    return 4 + size


def split_peer(req: PeerRequest, budget: int = PEERS_BUDGET) -> list[PeerRequest]:
    """``req`` as parts that each fit ``budget``; one part when it fits already.

    The first part is ``req`` with as many allowed IPs as fit; each later part only adds
    allowed IPs to the peer the first part created or changed (update only, no replace).
    """
    if peer_size(req) <= budget:
        return [req]
    ips: list[str] = list(req.get("allowed_ips", ()))
    parts: list[PeerRequest] = []
    head: PeerRequest = {**req, "allowed_ips": []}
    while True:
        room = budget - peer_size(head)
        taken: list[str] = []
        while ips and allowed_ip_size(ips[0]) <= room:
            room -= allowed_ip_size(ips[0])
            taken.append(ips.pop(0))
        if not taken:
            raise ValueError(f"a peer request of {peer_size(head)} bytes leaves no room for"
                             f" an allowed IP in a {budget}-byte message")
        parts.append({**head, "allowed_ips": taken})
        if not ips:
            return parts
        head = {"public_key": req["public_key"], "update_only": True, "allowed_ips": []}


def pack(requests: Iterable[tuple[PeerRequest, T]], budget: int = PEERS_BUDGET
         ) -> Iterator[list[tuple[PeerRequest, T]]]:
    """The requests, in order, grouped into messages of at most ``budget`` bytes of peers.

    Each request comes with a tag (the operation it carries out) that stays with its parts.
    """
    batch: list[tuple[PeerRequest, T]] = []
    used = 0
    for req, tag in requests:
        for part in split_peer(req, budget):
            size = peer_size(part)
            if batch and used + size > budget:
                yield batch
                batch, used = [], 0
            batch.append((part, tag))
            used += size
    if batch:
        yield batch


def peer_nla(req: PeerRequest) -> dict[str, Any]:
    """One WGDEVICE_A_PEERS entry in pyroute2's attribute form (``wgmsg`` encodes it)."""
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", req["public_key"]]]
    flags = 0
    if req.get("remove"):
        flags |= WGPEER_F_REMOVE_ME
    if req.get("update_only"):
        flags |= WGPEER_F_UPDATE_ONLY
    if req.get("replace_allowed_ips"):
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS
    attrs.append(["WGPEER_A_FLAGS", flags])
    if "endpoint_addr" in req:
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": req["endpoint_addr"],
                                            "port": req["endpoint_port"]}])
    if "persistent_keepalive" in req:
        attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", req["persistent_keepalive"]])
    if "allowed_ips" in req:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip_nla(c) for c in req["allowed_ips"]]])
    return {"attrs": attrs}


def _allowed_ip_nla(cidr: str) -> dict[str, Any]:
    net = ipaddress.ip_network(cidr)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]}
