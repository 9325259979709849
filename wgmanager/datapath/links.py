"""Links, addresses and sysctls of the node, through pyroute2 and /proc/sys.

Reads live state first and writes only what differs (an agent restart writes nothing), and
returns plain values, never netlink messages. Always acts on the network namespace the
calling process is in: the agent runs in the node's namespace.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wgmanager.core.model import IPAddress
from wgmanager.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Link:
    ifname: str
    index: int
    kind: str
    mtu: int
    up: bool


@contextlib.contextmanager
def iproute() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def get_link(ipr: IPRoute, ifname: str) -> Link | None:
    try:
        msgs = ipr.get_links(ifname=ifname)
    except NetlinkError as e:
        if e.code == 19:  # ENODEV
            return None
        raise
    return _link(msgs[0]) if msgs else None


def list_links(ipr: IPRoute) -> list[Link]:
    return [_link(m) for m in ipr.get_links()]


def _link(msg: object) -> Link:
    m = msg  # pyroute2 ifinfmsg
    info = m.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    return Link(
        ifname=m.get_attr("IFLA_IFNAME"),  # type: ignore[attr-defined]
        index=m["index"],  # type: ignore[index]
        kind=kind,
        mtu=m.get_attr("IFLA_MTU"),  # type: ignore[attr-defined]
        up=bool(m["flags"] & 1),  # type: ignore[index]
    )


# Overlay CNIs' tunnel devices (flannel's flannel.1, Calico's vxlan.calico): L2 tunnels,
# so their tc egress sees the inner Ethernet frame, pod addresses and all, before it is
# encapsulated. The steering program goes there as well as on the uplink, whose egress
# sees only the outer header (node to node).
TUNNEL_KINDS = frozenset({"vxlan", "geneve"})
# Tunnels with no link-layer header (Calico's IPIP tunl0, sit, ip6tnl, L3 GRE): the same
# program, parsing from the IP header (``to_tunnel_l3``).
L3_TUNNEL_KINDS = frozenset({"ipip", "sit", "ip6tnl", "gre", "ip6gre"})


def pod_interfaces(ipr: IPRoute, pattern: str) -> list[str]:
    """Host-side pod veths: veth links whose name matches the CNI's naming glob (an empty
    glob matches none)."""
    return sorted(ln.ifname for ln in list_links(ipr)
                  if ln.kind == "veth" and pattern and fnmatch.fnmatchcase(ln.ifname, pattern))


def other_veths(ipr: IPRoute, pattern: str) -> list[str]:
    """Veths the glob does not match: where a from_pod filter is a leftover (an older
    agent attached it to every veth, or the glob changed) and must go."""
    return sorted(ln.ifname for ln in list_links(ipr)
                  if ln.kind == "veth" and not (pattern and fnmatch.fnmatchcase(ln.ifname,
                                                                                pattern)))


def tunnel_interfaces(ipr: IPRoute) -> list[Link]:
    """The node's tunnel devices (an overlay CNI's), L2 and L3."""
    return sorted((ln for ln in list_links(ipr)
                   if ln.kind in TUNNEL_KINDS or ln.kind in L3_TUNNEL_KINDS),
                  key=lambda ln: ln.ifname)


def ensure_up(ipr: IPRoute, ifname: str, *, mtu: int) -> Link:
    link = get_link(ipr, ifname)
    if link is None:
        raise DeviceError(f"network device {ifname!r} vanished while being configured")
    changes: dict[str, object] = {}
    if link.mtu != mtu:
        changes["mtu"] = mtu
    if not link.up:
        changes["state"] = "up"
    if changes:
        try:
            ipr.link("set", index=link.index, **changes)
        except NetlinkError as e:
            raise DeviceError(f"cannot set {ifname} {changes}: {e.args[1]}") from e
        log.info("link configured", extra={"ifname": ifname, **changes})
        link = get_link(ipr, ifname) or link
    return link


def uplink_for(ipr: IPRoute, address: IPAddress, *,
               exclude: frozenset[str] = frozenset()) -> Link:
    """The device holding the node's own underlay address, never one in ``exclude``.

    Our WireGuard devices carry the node's address too (as a /32, for the reverse-path
    check): when the address vanished from the real uplink, the first WireGuard device
    was chosen, and the guard went onto the tunnel with an MTU 60 bytes short.
    """
    for msg in ipr.get_addr(family=4 if address.version == 4 else 10):
        if msg.get_attr("IFA_ADDRESS") == str(address):
            found = ipr.get_links(msg["index"])
            if found and _link(found[0]).ifname not in exclude:
                return _link(found[0])
    raise ConfigError(f"no local device holds the node address {address} (WireGuard "
                      "devices do not count); pass --uplink or fix the node's InternalIP")


def ensure_address(ipr: IPRoute, ifname: str, address: IPAddress) -> bool:
    """Adds ``address`` as a host address (/32 or /128) without a prefix route."""
    link = get_link(ipr, ifname)
    if link is None:
        raise DeviceError(f"network device {ifname!r} does not exist")
    family = 4 if address.version == 4 else 10
    for msg in ipr.get_addr(family=family, index=link.index):
        if msg.get_attr("IFA_ADDRESS") == str(address):
            return False
    try:
        ipr.addr("add", index=link.index, address=str(address),
                 prefixlen=32 if address.version == 4 else 128)
    except NetlinkError as e:
        if e.code != 17:
            raise DeviceError(f"cannot add {address} to {ifname}: {e.args[1]}") from e
        return False
    return True


def ensure_sysctl(name: str, value: str) -> bool:
    """Sets a per-namespace sysctl if it differs; returns True if written.

    ``name`` is slash-separated (net/ipv4/conf/eth0.100/rp_filter): interface names may
    hold dots, so the dotted form is ambiguous.
    """
    path = Path("/proc/sys") / name
    try:
        if path.read_text().strip() == value:
            return False
        path.write_text(value)
    except OSError as e:
        raise DeviceError(f"cannot set sysctl {name}={value}: {e.strerror}; the agent needs "
                          "write access to /proc/sys/net (hostNetwork, CAP_NET_ADMIN)") from e
    log.info("sysctl set", extra={"sysctl": name, "value": value})
    return True
