"""Builds Ethernet frames for BPF_PROG_TEST_RUN: the tests and the cost benchmark feed the
real program exactly the frames a pod veth or the uplink would carry."""

from __future__ import annotations

import ipaddress
import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17
IPPROTO_TCP = 6


def frame(src: str, dst: str, *, proto: int = IPPROTO_UDP, sport: int = 40000,
          dport: int = 8080, payload: bytes = b"x" * 32) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError("source and destination must be the same IP family")
    l4 = _l4(proto, sport, dport, payload)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                         s.packed, d.packed)
        ethertype = ETH_P_IP
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, s.packed, d.packed)
        ethertype = ETH_P_IPV6
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype)
    return eth + ip + l4


def _l4(proto: int, sport: int, dport: int, payload: bytes) -> bytes:
    if proto == IPPROTO_UDP:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if proto == IPPROTO_TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload
    return payload


def arp_frame() -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0806) + bytes(28)
