"""The kernel WireGuard backend: a `wireguard` link configured over generic netlink (pyroute2).

Why: the in-kernel implementation is the fastest datapath and needs no process to supervise.
When the kernel lacks it (module not built, not loadable, or no CAP_NET_ADMIN),
``kernel_unavailable_reason`` says so in one line and the caller can use wireguard-go instead.

pyroute2 messages are translated here, by pure functions the unit tests exercise without a
kernel, into ``DeviceState``/``PeerState``; nothing raw leaves this module. The device's private
key arrives in every dump: only its public key is kept. Withdrawing allowed IPs from a peer
hands them to a throwaway peer that is then removed (see ``wgmanager.core.plan``), so the
peer's other allowed IPs are never rewritten and its traffic never pauses.
"""

from __future__ import annotations

import base64
import errno
import gzip
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, WG_GENL_VERSION, wgmsg

from wgmanager.core.keys import KEY_LEN, PrivateKey, PublicKey
from wgmanager.core.model import DeviceState, Endpoint, IPNetwork, PeerState, network_sort_key
from wgmanager.core.plan import AddPeer, PeerOp, RemovePeer, UpdatePeer
from wgmanager.errors import BackendUnavailable, DeviceError
from wgmanager.kernel_errors import describe_wireguard_failure
from wgmanager.wireguard.backend import BackendKind, DeviceSettings
from wgmanager.wireguard.kernel_messages import PeerRequest, pack, peer_nla

_NLM_F_DUMP_INTR = 0x10  # the device changed while it was being dumped
_READ_ATTEMPTS = 3
# Not a valid interface name (too long, contains '/'): the permission probe reads no device.
_PROBE_IFNAME = "wgmanager/probe/"
_FALLBACK = "the userspace backend (wireguard-go) works without it"


def _ns_kwargs(netns: str | None) -> dict[str, Any]:
    # flags=0: never create the namespace as a side effect (pyroute2 defaults to O_CREAT).
    return {} if netns is None else {"netns": netns, "flags": 0}


def _missing_family_reason() -> str:
    kernel = f"the kernel ({os.uname().release})"
    try:  # CONFIG_WIREGUARD=y, =m, or absent / "is not set"; unknown without /proc/config.gz
        with gzip.open("/proc/config.gz", "rt") as f:
            config = next((ln.strip().partition("=")[2] for ln in f
                           if ln.startswith("CONFIG_WIREGUARD=")), "n")
    except OSError:
        config = "?"
    if config == "n":
        why = f"{kernel} was built without WireGuard (CONFIG_WIREGUARD is not set)"
    elif config == "m":
        why = (f"{kernel} has WireGuard as a module that is not loaded and could not be"
               " loaded (try `modprobe wireguard` on the host)")
    else:
        why = (f"{kernel} has no 'wireguard' generic netlink family"
               " (module not built or not loadable)")
    return f"kernel WireGuard unavailable: {why}; {_FALLBACK}"


def _permission_reason() -> str:
    return (f"kernel WireGuard unavailable: configuring it needs CAP_NET_ADMIN, which this"
            f" process (uid {os.geteuid()}) lacks; run as root or grant CAP_NET_ADMIN"
            " (the userspace backend needs it too)")


def _open_wireguard(netns: str | None) -> Any:
    """A bound `wireguard` genl socket this process may use, or BackendUnavailable saying why."""
    where = f"network namespace {netns!r}" if netns else "the current network namespace"
    try:
        wg = WireGuard(**_ns_kwargs(netns))
    except NetlinkError as e:
        if e.code == errno.ENOENT:
            raise BackendUnavailable(_missing_family_reason()) from None
        if e.code in (errno.EPERM, errno.EACCES):
            raise BackendUnavailable(_permission_reason()) from None
        raise BackendUnavailable(f"kernel WireGuard unavailable: looking up its netlink family"
                                 f" failed: {os.strerror(e.code)}; {_FALLBACK}") from None
    except FileNotFoundError:
        raise BackendUnavailable(f"kernel WireGuard unavailable: {where} does not exist;"
                                 " create it first (ip netns add)") from None
    except OSError as e:
        raise BackendUnavailable(f"kernel WireGuard unavailable: cannot open a netlink socket"
                                 f" in {where}: {e.strerror or e}; run as root") from None
    try:
        # Both commands need CAP_NET_ADMIN, checked before the (invalid) name is looked at:
        # EPERM means no permission; any other answer means permission is fine.
        wg.info(_PROBE_IFNAME)
    except NetlinkError as e:
        if e.code in (errno.EPERM, errno.EACCES):
            wg.close()
            raise BackendUnavailable(_permission_reason()) from None
    return wg


def kernel_unavailable_reason(netns: str | None = None) -> str | None:
    """None when kernel WireGuard can be used here, else one line saying why not."""
    try:
        wg = _open_wireguard(netns)
    except BackendUnavailable as e:
        return str(e)
    wg.close()
    return None


@contextmanager
def _netlink_op(ifname: str, operation: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as e:
        raise DeviceError(describe_wireguard_failure(ifname, operation, e.code)) from e
    except OSError as e:
        raise DeviceError(describe_wireguard_failure(ifname, operation,
                                                   e.errno or errno.EIO)) from e


# --- netlink messages -> typed values (pure) --------------------------------------------------

def _key_bytes(value: Any) -> bytes:
    return base64.b64decode(value)  # pyroute2 decodes keys to base64 bytes


def _allowed_ip(nla: Any) -> IPNetwork:
    # The address length (4 or 16 bytes) says the family; pyroute2 decodes it as "0a:00:00:00".
    raw = bytes.fromhex(nla.get_attr("WGALLOWEDIP_A_IPADDR").replace(":", ""))
    mask = int(nla.get_attr("WGALLOWEDIP_A_CIDR_MASK"))
    return ipaddress.ip_network((ipaddress.ip_address(raw), mask), strict=False)


def _peer_chunk(nla: Any) -> PeerState:
    ep = nla.get_attr("WGPEER_A_ENDPOINT")
    hs = nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    handshake = None
    if hs is not None and (hs["tv_sec"] or hs["tv_nsec"]):
        handshake = hs["tv_sec"] + hs["tv_nsec"] / 1e9
    return PeerState(
        public_key=PublicKey(_key_bytes(nla.get_attr("WGPEER_A_PUBLIC_KEY"))),
        endpoint=None if ep is None else Endpoint(ipaddress.ip_address(ep["addr"]),
                                                  int(ep["port"])),
        allowed_ips=frozenset(_allowed_ip(a) for a in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ()),
        persistent_keepalive=int(nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
        last_handshake=handshake,
        rx_bytes=int(nla.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx_bytes=int(nla.get_attr("WGPEER_A_TX_BYTES") or 0),
    )


def device_state_from_messages(ifname: str, messages: Iterable[Any]) -> DeviceState:
    """Merges the messages of one WG_CMD_GET_DEVICE dump into a DeviceState.

    Device attributes come in the first message only; a peer with many allowed IPs continues
    in the next message as its public key plus the remaining allowed IPs.
    """
    public_key: PublicKey | None = None
    listen_port = fwmark = 0
    peers: dict[PublicKey, PeerState] = {}
    for msg in messages:
        pub = msg.get_attr("WGDEVICE_A_PUBLIC_KEY")
        if pub is not None:
            public_key = PublicKey(_key_bytes(pub))
        elif public_key is None and msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None:
            public_key = PrivateKey(_key_bytes(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))).public_key
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT", listen_port)
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK", fwmark)
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            chunk = _peer_chunk(nla)
            seen = peers.get(chunk.public_key)
            peers[chunk.public_key] = chunk if seen is None else replace(
                seen, allowed_ips=seen.allowed_ips | chunk.allowed_ips)
    return DeviceState(ifname, public_key, int(listen_port), int(fwmark), peers)


# --- typed operations -> netlink peer requests (pure) -----------------------------------------

def _ips(nets: Iterable[IPNetwork]) -> list[str]:
    return [str(n) for n in sorted(nets, key=network_sort_key)]


def peer_requests(op: PeerOp, throwaway: PublicKey) -> list[PeerRequest]:
    """The pyroute2 `peer` dicts that carry out ``op``, in order.

    ``throwaway`` is a fresh random key, used only to withdraw allowed IPs: a peer created
    owning them takes them off their current owner, and removing it drops them.
    """
    if isinstance(op, RemovePeer):
        return [{"public_key": op.public_key.base64(), "remove": True}]
    if isinstance(op, AddPeer):
        p = op.peer
        add: PeerRequest = {"public_key": p.public_key.base64(), "replace_allowed_ips": True,
                            "allowed_ips": _ips(p.allowed_ips),
                            "persistent_keepalive": p.persistent_keepalive}
        if p.endpoint is not None:
            add.update(endpoint_addr=str(p.endpoint.host), endpoint_port=p.endpoint.port)
        if op.fresh:
            return [{"public_key": p.public_key.base64(), "remove": True}, add]
        return [add]
    reqs: list[PeerRequest] = []
    upd: PeerRequest = {"public_key": op.public_key.base64(), "update_only": True}
    if op.endpoint is not None:
        upd.update(endpoint_addr=str(op.endpoint.host), endpoint_port=op.endpoint.port)
    if op.persistent_keepalive is not None:
        upd["persistent_keepalive"] = op.persistent_keepalive
    if op.add_allowed_ips:
        upd["allowed_ips"] = _ips(op.add_allowed_ips)
    if len(upd) > 2:
        reqs.append(upd)
    if op.remove_allowed_ips:
        reqs.append({"public_key": throwaway.base64(),
                     "allowed_ips": _ips(op.remove_allowed_ips)})
        reqs.append({"public_key": throwaway.base64(), "remove": True})
    return reqs


def _describe_op(op: PeerOp) -> str:
    verb = {AddPeer: "add", UpdatePeer: "update", RemovePeer: "remove"}[type(op)]
    if isinstance(op, AddPeer) and op.fresh:
        verb = "reset"
    return f"{verb} peer {op.public_key.short()}"


def describe_ops(ops: Sequence[PeerOp]) -> str:
    """What one message does, for its error: the operation, or the first of several."""
    if len(ops) == 1:
        return _describe_op(ops[0])
    return f"{len(ops)} peer operations from {_describe_op(ops[0])} on"


def set_device_message(ifname: str, peers: Sequence[PeerRequest]) -> Any:
    """One WG_CMD_SET_DEVICE request carrying ``peers`` (pyroute2's set() sends one)."""
    msg = wgmsg()
    msg["cmd"], msg["version"] = WG_CMD_SET_DEVICE, WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    msg["attrs"].append(["WGDEVICE_A_PEERS", [peer_nla(p) for p in peers]])
    return msg


class KernelBackend:
    """A kernel `wireguard` link named ``ifname``, optionally inside network namespace ``netns``."""

    kind = BackendKind.KERNEL

    def __init__(self, ifname: str, *, netns: str | None = None,
                 retire_leftover: Callable[[], bool] | None = None) -> None:
        """``retire_leftover`` stops a wireguard-go device of ours with this name (a node
        that ran the userspace backend before its kernel had WireGuard) and withdraws its
        sidecar request; it returns whether there was one. Called once, before the first
        ``ensure_device`` looks at the link."""
        self.ifname = ifname
        self.netns = netns
        # pyroute2's sockets belong to the thread that made them: used from another thread
        # they open a socket per thread that is never closed, and fail every other call
        # there (ECONNRESET). So each thread that uses this backend (the agent's loop, the
        # metrics reader) gets its own, made in that thread.
        self._local = threading.local()
        self._sockets: list[Any] = []
        self._local.wg = _open_wireguard(netns)  # raises BackendUnavailable
        self._sockets.append(self._local.wg)
        self._ipr: Any = None
        self._retire_leftover = retire_leftover
        self.messages_sent = 0  # WG_CMD_SET_DEVICE requests for peers (status, tests)

    @property
    def _wg(self) -> Any:
        """This thread's `wireguard` genl socket."""
        wg = getattr(self._local, "wg", None)
        if wg is None:
            wg = self._local.wg = _open_wireguard(self.netns)
            self._sockets.append(wg)
        return wg

    def close(self) -> None:
        for sock in (*self._sockets, self._ipr):
            if sock is not None:
                sock.close()
        self._sockets, self._ipr = [], None
        self._local = threading.local()

    def _iproute(self) -> Any:
        if self._ipr is None:
            with _netlink_op(self.ifname, "open rtnetlink socket"):
                self._ipr = IPRoute(**_ns_kwargs(self.netns))
        return self._ipr

    def _link(self) -> tuple[int, str] | None:
        """(index, kind) of the link named ``ifname``, None if there is none."""
        with _netlink_op(self.ifname, "look up link"):
            try:
                (link,) = self._iproute().link("get", ifname=self.ifname)
            except NetlinkError as e:
                if e.code == errno.ENODEV:
                    return None
                raise
        return int(link["index"]), str(link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or "")

    def _foreign(self, kind: str) -> DeviceError:
        return DeviceError(f"WireGuard device {self.ifname}: a {kind or 'non-WireGuard'} link of"
                           " that name exists; remove it (`ip link del"
                           f" {self.ifname}`) or use the userspace backend")

    def device_exists(self) -> bool:
        link = self._link()
        return link is not None and link[1] == "wireguard"

    def ensure_device(self) -> bool:
        retire, self._retire_leftover = self._retire_leftover, None
        ours = retire() if retire is not None else False
        link = self._link()
        if link is not None and link[1] != "wireguard" and ours:
            # wireguard-go is gone; a TUN it left (persistent) is ours to remove too.
            with _netlink_op(self.ifname, f"remove the leftover {link[1]} link"):
                self._iproute().link("del", index=link[0])
            link = None
        if link is not None:
            if link[1] != "wireguard":
                raise self._foreign(link[1])
            return False
        with _netlink_op(self.ifname, "create (ip link add type wireguard)"):
            self._iproute().link("add", ifname=self.ifname, kind="wireguard")
        return True

    def delete_device(self) -> None:
        link = self._link()
        if link is None:
            return
        if link[1] != "wireguard":
            raise self._foreign(link[1])
        with _netlink_op(self.ifname, "delete"):
            try:
                self._iproute().link("del", index=link[0])
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise

    def read(self) -> DeviceState:
        with _netlink_op(self.ifname, "read"):
            for _ in range(_READ_ATTEMPTS):
                msgs = self._wg.info(self.ifname)
                if not any(m["header"]["flags"] & _NLM_F_DUMP_INTR for m in msgs):
                    return device_state_from_messages(self.ifname, msgs)
        raise DeviceError(f"WireGuard device {self.ifname}: read failed: the device kept"
                          " changing while being read (another tool writing to it?); retry")

    def configure(self, settings: DeviceSettings) -> bool:
        have = self.read()
        changes: dict[str, Any] = {}
        if have.public_key != settings.private_key.public_key:
            changes["private_key"] = settings.private_key.export_base64()
        if have.listen_port != settings.listen_port:
            changes["listen_port"] = settings.listen_port
        if have.fwmark != settings.fwmark:
            changes["fwmark"] = settings.fwmark
        if not changes:
            return False
        what = ", ".join(sorted(k.replace("_", " ") for k in changes))
        with _netlink_op(self.ifname, f"set {what}"):
            self._wg.set(self.ifname, **changes)
        return True

    def apply(self, ops: Sequence[PeerOp]) -> None:
        """Sends ``ops`` in as few messages as fit (``kernel_messages``), in order."""
        requests = [(req, op) for op in ops
                    for req in peer_requests(op, PublicKey(os.urandom(KEY_LEN)))]
        for batch in pack(requests):
            in_batch = list(dict.fromkeys(op for _, op in batch))
            with _netlink_op(self.ifname, describe_ops(in_batch)):
                msg = set_device_message(self.ifname, [req for req, _ in batch])
                self._wg.nlm_request(msg, msg_type=self._wg.prid,
                                     msg_flags=NLM_F_REQUEST | NLM_F_ACK)
                self.messages_sent += 1
