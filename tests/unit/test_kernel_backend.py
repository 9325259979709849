"""Kernel backend: the availability probe, and the pure translation at the netlink edge.

Test messages are real pyroute2 ``wgmsg`` objects, encoded to bytes and decoded again, so
they have exactly the shape pyroute2 hands back for a kernel reply (attribute order as in
drivers/net/wireguard/netlink.c). A kernel with WireGuard is not needed; where the probe finds
one, the "unavailable" tests skip.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import socket
import threading
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    AsyncWireGuard,
    wgmsg,
)

from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.model import Endpoint, IPNetwork, PeerConfig, PeerState
from wgmanager.core.plan import (
    AddPeer,
    PeerOp,
    RemovePeer,
    UpdatePeer,
    apply_peer_ops,
    plan_peers,
)
from wgmanager.errors import BackendUnavailable, DeviceError
from wgmanager.kernel_errors import describe_wireguard_failure
from wgmanager.wireguard.backend import BackendKind, DeviceSettings
from wgmanager.wireguard.kernel import (
    KernelBackend,
    device_state_from_messages,
    kernel_unavailable_reason,
    peer_requests,
)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def nets(*texts: str) -> frozenset[IPNetwork]:
    return frozenset(net(t) for t in texts)


def pub(n: int) -> PublicKey:
    return PrivateKey(bytes([n]) * 32).public_key


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- building messages the way the kernel sends them ------------------------------------------

def allowedip(cidr: str) -> dict[str, Any]:
    n = net(cidr)
    family = socket.AF_INET if n.version == 4 else socket.AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_CIDR_MASK", n.prefixlen],
                      ["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", n.network_address.packed]]}


def peer_nla(key: PublicKey, ips: list[str], *, full: bool = True,
             endpoint: tuple[str, int] | None = None, keepalive: int = 0,
             handshake: tuple[int, int] = (0, 0), rx: int = 0, tx: int = 0) -> dict[str, Any]:
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", b64(key.raw)]]
    if full:  # a continuation chunk carries only the key and the remaining allowed IPs
        attrs += [["WGPEER_A_PRESHARED_KEY", b64(bytes(32))],
                  ["WGPEER_A_LAST_HANDSHAKE_TIME",
                   {"tv_sec": handshake[0], "tv_nsec": handshake[1]}],
                  ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive],
                  ["WGPEER_A_TX_BYTES", tx], ["WGPEER_A_RX_BYTES", rx],
                  ["WGPEER_A_PROTOCOL_VERSION", 1]]
        if endpoint is not None:
            attrs.append(["WGPEER_A_ENDPOINT", {"addr": endpoint[0], "port": endpoint[1]}])
    if ips:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [allowedip(c) for c in ips]])
    return {"attrs": attrs}


def dump_msg(peers: list[dict[str, Any]], *, device: bool = True, private: PrivateKey | None
             = None, with_public: bool = True, port: int = 51820, fwmark: int = 0,
             flags: int = 0) -> Any:
    """One message of a WG_CMD_GET_DEVICE dump, decoded by pyroute2 from its wire bytes."""
    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    attrs: list[list[Any]] = []
    if device:
        attrs += [["WGDEVICE_A_LISTEN_PORT", port], ["WGDEVICE_A_FWMARK", fwmark],
                  ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"]]
        if private is not None:
            attrs.append(["WGDEVICE_A_PRIVATE_KEY", private.export_base64()])
            if with_public:
                attrs.append(["WGDEVICE_A_PUBLIC_KEY", private.public_key.base64()])
    attrs.append(["WGDEVICE_A_PEERS", peers])
    msg["attrs"] = attrs
    msg.encode()
    decoded = wgmsg(bytes(msg.data))
    decoded.decode()
    decoded["header"]["flags"] |= flags
    return decoded


# --- availability ------------------------------------------------------------------------------

def test_unavailable_reason_is_one_line_naming_the_fallback() -> None:
    reason = kernel_unavailable_reason()
    if reason is None:
        pytest.skip("kernel WireGuard is available on this machine")
    assert "\n" not in reason
    assert "wireguard" in reason.lower()
    assert "userspace" in reason


def test_constructing_backend_when_unavailable_raises_with_that_line() -> None:
    reason = kernel_unavailable_reason()
    if reason is None:
        pytest.skip("kernel WireGuard is available on this machine")
    with pytest.raises(BackendUnavailable) as info:
        KernelBackend("wgtest0")
    assert str(info.value) == reason


# --- netlink -> DeviceState --------------------------------------------------------------------

def test_dump_translates_to_typed_device_state() -> None:
    dev_key = PrivateKey.generate()
    msg = dump_msg([
        peer_nla(pub(1), ["10.1.0.0/24", "fd00:1::/64"], endpoint=("192.0.2.1", 51820),
                 keepalive=25, handshake=(1_700_000_000, 500_000_000), rx=10, tx=20),
        peer_nla(pub(2), [], endpoint=("2001:db8::2", 51821)),
        peer_nla(pub(3), ["10.3.0.0/24"]),
    ], private=dev_key, port=51999, fwmark=0x1337)
    state = device_state_from_messages("wg0", [msg])

    assert (state.name, state.public_key, state.listen_port, state.fwmark) == (
        "wg0", dev_key.public_key, 51999, 0x1337)
    assert state.peers[pub(1)] == PeerState(
        pub(1), Endpoint(ipaddress.ip_address("192.0.2.1"), 51820),
        nets("10.1.0.0/24", "fd00:1::/64"), 25, 1_700_000_000.5, 10, 20)
    assert state.peers[pub(2)].endpoint == Endpoint(ipaddress.ip_address("2001:db8::2"), 51821)
    assert state.peers[pub(2)].allowed_ips == frozenset()
    assert state.peers[pub(2)].last_handshake is None  # tv_sec == tv_nsec == 0: never
    assert state.peers[pub(3)].endpoint is None
    assert dev_key.export_base64() not in repr(state)


def test_public_key_derived_when_only_private_key_is_sent() -> None:
    dev_key = PrivateKey.generate()
    state = device_state_from_messages("wg0", [dump_msg([], private=dev_key, with_public=False)])
    assert state.public_key == dev_key.public_key
    assert dev_key.export_base64() not in repr(state)


def test_device_without_identity_or_peers() -> None:
    state = device_state_from_messages("wg0", [dump_msg([])])
    assert state.public_key is None
    assert dict(state.peers) == {}


def test_multi_message_dump_is_merged() -> None:
    # As the kernel splits a large dump: device attributes in the first message only; a peer
    # whose allowed IPs did not fit continues in the next as key + remaining allowed IPs.
    dev_key = PrivateKey.generate()
    first = dump_msg([peer_nla(pub(1), ["10.1.0.0/24"], keepalive=5, rx=7),
                      peer_nla(pub(2), ["10.2.0.0/24"])], private=dev_key, port=4000)
    second = dump_msg([peer_nla(pub(2), ["10.2.1.0/24", "fd00:2::/64"], full=False),
                       peer_nla(pub(3), ["10.3.0.0/24"])], device=False)
    state = device_state_from_messages("wg0", [first, second])
    assert (state.public_key, state.listen_port) == (dev_key.public_key, 4000)
    assert state.peers[pub(1)].persistent_keepalive == 5
    assert state.peers[pub(1)].rx_bytes == 7
    assert state.peers[pub(2)].allowed_ips == nets("10.2.0.0/24", "10.2.1.0/24", "fd00:2::/64")
    assert set(state.peers) == {pub(1), pub(2), pub(3)}


# --- PeerOp -> pyroute2 peer dicts -------------------------------------------------------------

THROWAWAY = PublicKey(bytes(range(32)))


def test_add_peer_replaces_allowed_ips_in_sorted_order() -> None:
    op = AddPeer(PeerConfig(pub(1), Endpoint(ipaddress.ip_address("fd00::9"), 51820),
                            nets("fd00:1::/64", "10.1.0.0/24", "10.0.0.0/24"), 25))
    assert peer_requests(op, THROWAWAY) == [{
        "public_key": pub(1).base64(), "replace_allowed_ips": True,
        "allowed_ips": ["10.0.0.0/24", "10.1.0.0/24", "fd00:1::/64"],
        "persistent_keepalive": 25, "endpoint_addr": "fd00::9", "endpoint_port": 51820}]


def test_update_peer_touches_only_what_changed() -> None:
    op = UpdatePeer(pub(1), endpoint=Endpoint(ipaddress.ip_address("192.0.2.5"), 1),
                    add_allowed_ips=nets("10.9.0.0/24"))
    assert peer_requests(op, THROWAWAY) == [{
        "public_key": pub(1).base64(), "update_only": True, "endpoint_addr": "192.0.2.5",
        "endpoint_port": 1, "allowed_ips": ["10.9.0.0/24"]}]
    assert peer_requests(UpdatePeer(pub(1), persistent_keepalive=0), THROWAWAY) == [
        {"public_key": pub(1).base64(), "update_only": True, "persistent_keepalive": 0}]


def test_withdrawal_goes_through_a_throwaway_peer_never_the_real_one() -> None:
    op = UpdatePeer(pub(1), remove_allowed_ips=nets("10.1.1.0/24", "10.1.2.0/24"))
    assert peer_requests(op, THROWAWAY) == [
        {"public_key": THROWAWAY.base64(), "allowed_ips": ["10.1.1.0/24", "10.1.2.0/24"]},
        {"public_key": THROWAWAY.base64(), "remove": True},
    ]


def test_a_fresh_add_removes_the_peer_then_adds_it() -> None:
    peer = PeerConfig(pub(4), None, nets("10.4.0.0/24"))
    assert peer_requests(AddPeer(peer, fresh=True), THROWAWAY) == [
        {"public_key": pub(4).base64(), "remove": True},
        *peer_requests(AddPeer(peer), THROWAWAY)]


def test_remove_peer() -> None:
    assert peer_requests(RemovePeer(pub(4)), THROWAWAY) == [
        {"public_key": pub(4).base64(), "remove": True}]


def _encode_like_pyroute2(req: dict[str, Any]) -> Any:
    """Runs a peer dict through pyroute2's own WireGuard.set() encoder and decodes the bytes."""
    msg = wgmsg()
    msg["cmd"], msg["version"] = 1, 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    object.__new__(AsyncWireGuard)._wg_set_peer(msg, req)  # no socket needed to encode
    msg.encode()
    decoded = wgmsg(bytes(msg.data))
    decoded.decode()
    (peer,) = decoded.get_attr("WGDEVICE_A_PEERS")
    return peer


def test_peer_dicts_encode_to_the_intended_netlink_flags() -> None:
    ops: list[PeerOp] = [
        AddPeer(PeerConfig(pub(1), Endpoint(ipaddress.ip_address("192.0.2.1"), 9),
                           nets("10.1.0.0/24"), 0)),
        UpdatePeer(pub(1), add_allowed_ips=nets("10.2.0.0/24"),
                   remove_allowed_ips=nets("10.1.0.0/24")),
        RemovePeer(pub(1)),
    ]
    got = [(_encode_like_pyroute2(r).get_attr("WGPEER_A_FLAGS"), r["public_key"])
           for op in ops for r in peer_requests(op, THROWAWAY)]
    assert got == [
        (WGPEER_F_REPLACE_ALLOWEDIPS, pub(1).base64()),
        (WGPEER_F_UPDATE_ONLY, pub(1).base64()),
        (0, THROWAWAY.base64()),
        (WGPEER_F_REMOVE_ME, THROWAWAY.base64()),
        (WGPEER_F_REMOVE_ME, pub(1).base64()),
    ]
    added = _encode_like_pyroute2(peer_requests(ops[0], THROWAWAY)[0])
    assert added.get_attr("WGPEER_A_ENDPOINT")["addr"] == "192.0.2.1"
    assert [a.get("addr") for a in added.get_attr("WGPEER_A_ALLOWEDIPS")] == ["10.1.0.0/24"]


# --- the backend against a fake kernel ---------------------------------------------------------

class FakeKernel:
    """WireGuard.set()/info() as drivers/net/wireguard/netlink.c behaves, for one device."""

    def __init__(self) -> None:
        self.private: PrivateKey | None = None
        self.port = 0
        self.fwmark = 0
        self.peers: dict[str, dict[str, Any]] = {}  # base64 key -> endpoint, keepalive, ips
        self.calls: list[dict[str, Any]] = []
        self.history: list[dict[str, frozenset[str]]] = []
        self.fail: NetlinkError | None = None
        self.interrupted = 0
        self.messages: list[Any] = []  # WG_CMD_SET_DEVICE requests, decoded

    def set(self, ifname: str, listen_port: int | None = None, fwmark: int | None = None,
            private_key: str | None = None, peer: dict[str, Any] | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append({"listen_port": listen_port, "fwmark": fwmark,
                           "private_key": private_key, "peer": peer})
        if listen_port is not None:
            self.port = listen_port
        if fwmark is not None:
            self.fwmark = fwmark
        if private_key is not None:
            self.private = PrivateKey.from_base64(private_key)
        if peer is not None:
            self._set_peer(peer)
        self.history.append({k: frozenset(p["ips"]) for k, p in self.peers.items()})

    def _set_peer(self, req: dict[str, Any]) -> None:
        key = req["public_key"]
        if key not in self.peers:
            if req.get("remove") or req.get("update_only"):
                return
            self.peers[key] = {"endpoint": None, "keepalive": 0, "ips": set()}
        if req.get("remove"):
            del self.peers[key]
            return
        p = self.peers[key]
        if "endpoint_addr" in req:
            p["endpoint"] = (req["endpoint_addr"], req["endpoint_port"])
        if req.get("replace_allowed_ips"):
            p["ips"] = set()
        for cidr in req.get("allowed_ips", []):
            for other in self.peers.values():
                other["ips"].discard(cidr)  # an allowed IP belongs to one peer
            p["ips"].add(cidr)
        if "persistent_keepalive" in req:
            p["keepalive"] = req["persistent_keepalive"]

    prid = 0x1F  # any family id: the fake answers whatever it is given

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> tuple[Any, ...]:
        """One WG_CMD_SET_DEVICE, decoded from its wire bytes as the kernel would see it;
        its peers are applied in order, and the state after the message is one step of
        ``history`` (nothing sees a state between the peers of one message)."""
        if self.fail is not None:
            raise self.fail
        msg.encode()
        wire = wgmsg(bytes(msg.data))
        wire.decode()
        self.messages.append(wire)
        for nla in wire.get_attr("WGDEVICE_A_PEERS") or ():
            flags = nla.get_attr("WGPEER_A_FLAGS") or 0
            req: dict[str, Any] = {"public_key": nla.get_attr("WGPEER_A_PUBLIC_KEY").decode(),
                                   "remove": bool(flags & WGPEER_F_REMOVE_ME),
                                   "update_only": bool(flags & WGPEER_F_UPDATE_ONLY),
                                   "replace_allowed_ips": bool(flags & WGPEER_F_REPLACE_ALLOWEDIPS)}
            ep = nla.get_attr("WGPEER_A_ENDPOINT")
            if ep is not None:
                req.update(endpoint_addr=ep["addr"], endpoint_port=ep["port"])
            keepalive = nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            if keepalive is not None:
                req["persistent_keepalive"] = keepalive
            ips = nla.get_attr("WGPEER_A_ALLOWEDIPS")
            if ips is not None:
                req["allowed_ips"] = [str(net(a["addr"])) for a in ips]
            self.calls.append({"listen_port": None, "fwmark": None, "private_key": None,
                               "peer": req})
            self._set_peer(req)
        self.history.append({k: frozenset(p["ips"]) for k, p in self.peers.items()})
        return ()

    def info(self, ifname: str) -> tuple[Any, ...]:
        flags = 0
        if self.interrupted:
            self.interrupted -= 1
            flags = 0x10
        peers = [peer_nla(PublicKey.from_base64(k), sorted(p["ips"]), endpoint=p["endpoint"],
                          keepalive=p["keepalive"]) for k, p in self.peers.items()]
        return (dump_msg(peers, private=self.private, port=self.port, fwmark=self.fwmark,
                         flags=flags),)

    def close(self) -> None:
        pass


def fake_backend() -> tuple[KernelBackend, FakeKernel]:
    backend = object.__new__(KernelBackend)
    fake = FakeKernel()
    backend.ifname, backend.netns, backend._ipr = "wg0", None, None
    backend._local, backend._sockets = threading.local(), [fake]
    backend._local.wg = fake
    backend._retire_leftover, backend.messages_sent = None, 0
    return backend, fake


def cfg(n: int, *cidrs: str, port: int | None = None) -> PeerConfig:
    endpoint = Endpoint(ipaddress.ip_address(f"192.0.2.{n}"), port) if port else None
    return PeerConfig(pub(n), endpoint, nets(*cidrs), 0)


def test_apply_matches_the_model_and_never_rewrites_remaining_ips() -> None:
    backend, fake = fake_backend()
    assert backend.kind is BackendKind.KERNEL
    start = {pub(1): cfg(1, "10.1.0.0/24", "10.1.1.0/24", "10.1.2.0/24", port=51820),
             pub(2): cfg(2, "10.2.0.0/24", port=51820)}
    backend.apply(plan_peers(start, {}))
    actual = backend.read().peers
    assert {k: s.config() for k, s in actual.items()} == start

    desired = {pub(1): cfg(1, "10.1.0.0/24", port=51821),  # withdraw two, move endpoint
               pub(3): cfg(3, "10.2.0.0/24", "10.1.2.0/24", port=51820)}  # takes over ips
    ops = plan_peers(desired, actual)
    fake.history.clear()
    backend.apply(ops)
    after = backend.read().peers
    model = apply_peer_ops(actual, ops)
    assert {k: s.config() for k, s in after.items()} == {k: s.config() for k, s in model.items()}
    assert {k: s.config() for k, s in after.items()} == desired
    # 10.1.0.0/24 stayed on peer 1 through every intermediate state.
    assert all("10.1.0.0/24" in h.get(pub(1).base64(), ()) for h in fake.history)
    assert not any(c["peer"].get("replace_allowed_ips") for c in fake.calls[-len(fake.history):]
                   if c["peer"]["public_key"] == pub(1).base64())


def test_configure_writes_only_differences_comparing_public_keys() -> None:
    backend, fake = fake_backend()
    key = PrivateKey.generate()
    assert backend.configure(DeviceSettings(key, 51820)) is True
    assert backend.read().public_key == key.public_key
    assert backend.configure(DeviceSettings(PrivateKey(key.export_raw()), 51820)) is False
    assert backend.configure(DeviceSettings(key, 51820, fwmark=7)) is True
    assert fake.calls[-1] == {"listen_port": None, "fwmark": 7, "private_key": None,
                              "peer": None}


def test_read_retries_an_interrupted_dump_then_gives_up() -> None:
    backend, fake = fake_backend()
    fake.interrupted = 2
    assert backend.read().name == "wg0"
    fake.interrupted = 3
    with pytest.raises(DeviceError, match="kept changing"):
        backend.read()


def test_netlink_errors_become_one_line_device_errors_without_keys() -> None:
    backend, fake = fake_backend()
    key = PrivateKey.generate()
    fake.fail = NetlinkError(errno.EPERM)
    with pytest.raises(DeviceError) as info:
        backend.configure(DeviceSettings(key, 51820))
    text = str(info.value)
    assert "wg0" in text and "CAP_NET_ADMIN" in text and "\n" not in text
    assert key.export_base64() not in text
    with pytest.raises(DeviceError, match=f"remove peer {pub(1).short()}"):
        backend.apply([RemovePeer(pub(1))])


def test_describe_failure_names_device_operation_and_fix() -> None:
    text = describe_wireguard_failure("wg0", "set listen port", errno.EADDRINUSE)
    assert text.startswith("WireGuard device wg0: set listen port failed:")
    assert "port" in text.rsplit(";", 1)[1] and "\n" not in text
    assert "dmesg" in describe_wireguard_failure("wg0", "read", errno.EXDEV)
    assert "CAP_NET_ADMIN" in describe_wireguard_failure("wg0", "add peer", errno.EPERM)
