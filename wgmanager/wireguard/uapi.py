"""The cross-platform WireGuard UAPI text protocol: encode requests, parse replies. Pure.

wireguard-go (and every userspace WireGuard) speaks it on a unix socket: ``set=1`` or ``get=1``,
``key=value`` lines, a blank line ends the request; the reply ends with ``errno=N`` and a blank
line. Keys are hex here, not base64. Within a peer ``replace_allowed_ips=true`` must precede its
``allowed_ip`` lines. See https://www.wireguard.com/xplatform/.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.model import DeviceState, Endpoint, IPNetwork, PeerState, network_sort_key
from wgmanager.core.plan import AddPeer, PeerOp, RemovePeer

T = TypeVar("T")


class ProtocolError(ValueError):
    """A reply that does not follow the protocol."""


def get_request() -> bytes:
    return b"get=1\n\n"


def set_request(lines: Iterable[str]) -> bytes:
    body = "".join(f"{line}\n" for line in lines)
    return f"set=1\n{body}\n".encode()


def device_lines(*, private_key: PrivateKey | None = None, listen_port: int | None = None,
                 fwmark: int | None = None) -> list[str]:
    lines: list[str] = []
    if private_key is not None:
        lines.append(f"private_key={private_key.export_hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    return lines


def op_lines(op: PeerOp, throwaway: PublicKey | None = None) -> list[str]:
    """The ``set`` lines for one peer operation.

    Withdrawing allowed IPs hands them to ``throwaway`` (a key no real peer has), which is
    then removed: the real peer's remaining allowed IPs are never rewritten, so its traffic
    keeps flowing while one of its CIDRs goes away.
    """
    if isinstance(op, AddPeer):
        p = op.peer
        key = f"public_key={p.public_key.hex()}"
        lines = [key, "remove=true"] if op.fresh else []
        # Two sections for the one peer: the first creates it, and wireguard-go starts a
        # peer only when its section ends (the next public_key line), while each allowed_ip
        # line moves that CIDR to it at once. In one section, a packet for a CIDR taken from
        # the peer it replaces (a node's next key) and read from the TUN before the section
        # ended met a peer not yet running and was dropped without a word (issue 16's
        # residual loss, 1-3 echoes at a peer's switch under load). Started first, the new
        # peer queues those packets and handshakes.
        lines.append(key)
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        lines += [key, "replace_allowed_ips=true"]
        lines += [f"allowed_ip={n}" for n in _sorted(p.allowed_ips)]
        return lines
    if isinstance(op, RemovePeer):
        return [f"public_key={op.public_key.hex()}", "remove=true"]
    lines = [f"public_key={op.public_key.hex()}", "update_only=true"]
    if op.endpoint is not None:
        lines.append(f"endpoint={op.endpoint}")
    if op.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
    lines += [f"allowed_ip={n}" for n in _sorted(op.add_allowed_ips)]
    if op.remove_allowed_ips:
        tmp = throwaway if throwaway is not None else PublicKey(os.urandom(32))
        lines.append(f"public_key={tmp.hex()}")
        lines += [f"allowed_ip={n}" for n in _sorted(op.remove_allowed_ips)]
        lines += [f"public_key={tmp.hex()}", "remove=true"]
    return lines


def parse_errno(reply: str) -> int:
    """The errno a reply ends with; the protocol guarantees one per request."""
    for line in reversed(reply.splitlines()):
        if line.startswith("errno="):
            try:
                return int(line[len("errno="):])
            except ValueError:
                break
    raise ProtocolError("reply has no errno line")


class ValueCache:
    """Parsed keys, networks and endpoints by their text, kept between ``get`` replies.

    A dump of 5,000 peers is 5,000 keys, 10,000 allowed IPs and 5,000 endpoints that are
    the same strings reply after reply; building their objects was most of a parse (~0.16 s
    at 5,000 peers). One cache per backend; it is bounded (cleared when full).
    """

    LIMIT = 200_000

    def __init__(self) -> None:
        self._keys: dict[str, PublicKey] = {}
        self._nets: dict[str, IPNetwork] = {}
        self._endpoints: dict[str, Endpoint] = {}

    def key(self, text: str) -> PublicKey:
        return _cached(self._keys, text, PublicKey.from_hex, self.LIMIT)

    def net(self, text: str) -> IPNetwork:
        return _cached(self._nets, text, _network, self.LIMIT)

    def endpoint(self, text: str) -> Endpoint:
        return _cached(self._endpoints, text, Endpoint.parse, self.LIMIT)


def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)


def _cached(table: dict[str, T], text: str, make: Callable[[str], T], limit: int) -> T:
    hit = table.get(text)
    if hit is None:
        if len(table) >= limit:
            table.clear()
        hit = table[text] = make(text)
    return hit


def parse_get(ifname: str, reply: str, cache: ValueCache | None = None) -> DeviceState:
    """Parses a ``get`` reply. The private key is reduced to its public key at once."""
    values = cache if cache is not None else ValueCache()
    public: PublicKey | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[PublicKey, PeerState] = {}
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            st = _peer_state(cur, values)
            peers[st.public_key] = st

    for line in reply.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ProtocolError("malformed line in get reply (no '=')")
        if key == "errno":
            if value != "0":
                raise ProtocolError(f"get failed with errno {value}")
            continue
        if key == "public_key":
            flush()
            cur = {"public_key": values.key(value), "allowed_ips": []}
            continue
        if cur is None:
            if key == "private_key":
                public = PrivateKey.from_hex(value).public_key if value.strip("0") else None
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "fwmark":
                fwmark = int(value)
            continue
        if key == "allowed_ip":
            allowed = cur["allowed_ips"]
            assert isinstance(allowed, list)
            allowed.append(values.net(value))
        else:
            cur[key] = value
    flush()
    return DeviceState(name=ifname, public_key=public, listen_port=listen_port, fwmark=fwmark,
                       peers=peers)


def _peer_state(raw: dict[str, object], values: ValueCache) -> PeerState:
    endpoint = raw.get("endpoint")
    sec = int(str(raw.get("last_handshake_time_sec", "0")))
    nsec = int(str(raw.get("last_handshake_time_nsec", "0")))
    allowed = raw["allowed_ips"]
    assert isinstance(allowed, list)
    key = raw["public_key"]
    assert isinstance(key, PublicKey)
    return PeerState(
        public_key=key,
        endpoint=values.endpoint(str(endpoint)) if endpoint else None,
        allowed_ips=frozenset(allowed),
        persistent_keepalive=int(str(raw.get("persistent_keepalive_interval", "0"))),
        last_handshake=(sec + nsec / 1e9) if sec or nsec else None,
        rx_bytes=int(str(raw.get("rx_bytes", "0"))),
        tx_bytes=int(str(raw.get("tx_bytes", "0"))),
    )


def _sorted(nets: Iterable[IPNetwork]) -> Sequence[IPNetwork]:
    return sorted(nets, key=network_sort_key)
