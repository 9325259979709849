"""Underlay captures: the detector behind every "zero plaintext" claim.

tcpdump runs on the underlay bridge inside the lab's underlay namespace and writes a pcap;
counts are taken afterwards with BPF filters. ``--immediate-mode`` matters: without it
packets can sit in the capture ring when tcpdump is stopped and go uncounted, and a
detector that under-counts would make "zero plaintext" meaningless.

An overlay CNI's pod packet crosses the underlay inside a node-to-node header (VXLAN,
Geneve, IPIP, IPv6-in-IPv4, GRE), where a BPF filter on addresses sees only the nodes: in
clear all the same. So the pcap is also read here, frame by frame, and every encapsulation
is opened (``encapsulated_pod_packets``); ``plaintext_pod_packets`` counts both.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_POD_NETS = ("10.244.0.0/16", "fd00:244::/32")


@dataclass
class Capture:
    pcap: Path
    # WireGuard's ports: the listen port and the one a key rotation's second device uses.
    wg_ports: tuple[int, ...] = (51820, 51821)
    pod_nets: tuple[str, ...] = DEFAULT_POD_NETS

    @property
    def _wireguard(self) -> str:
        return " or ".join(f"udp port {p}" for p in self.wg_ports)

    def count(self, bpf_filter: str) -> int:
        return len(self.lines(bpf_filter))

    def lines(self, bpf_filter: str) -> list[str]:
        """tcpdump's one-line summaries of the matching packets (for failure messages)."""
        res = subprocess.run(["tcpdump", "-nn", "-r", str(self.pcap), bpf_filter],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"tcpdump -r failed: {res.stderr.strip()}")
        return [ln for ln in res.stdout.splitlines() if ln.strip()]

    def plaintext_pod_packets(self) -> int:
        """Pod packets in clear: with pod addresses in the outer header, or inside any
        encapsulation the detector knows."""
        outer = self.count(" or ".join(f"net {n}" for n in self.pod_nets))
        return outer + self.encapsulated_pod_packets()

    def encapsulated_pod_packets(self) -> int:
        """Frames between node addresses that carry a pod packet inside VXLAN (UDP 4789 and
        flannel's 8472), Geneve (6081), IPIP, IPv6-in-IPv4 (41) or GRE (47)."""
        nets = [ipaddress.ip_network(n) for n in self.pod_nets]
        count = 0
        for frame in read_pcap(self.pcap):
            inner = decapsulate(frame)
            if inner is not None and any(a in n for a in inner for n in nets
                                         if a.version == n.version):
                count += 1
        return count

    def wireguard_packets(self) -> int:
        return self.count(self._wireguard)

    def unexpected_packets(self) -> int:
        """Anything but WireGuard UDP and link-local housekeeping (ARP, ND, multicast).

        Traffic to and from the lab's API server (TCP 6443 on the host link) is expected
        control-plane traffic, not pod traffic, and is excluded too.
        """
        return len(self.unexpected())

    def unexpected(self) -> list[str]:
        """The packets ``unexpected_packets`` counts."""
        return self.lines(f"(ip or ip6) and not ({self._wireguard}) "
                          "and not (tcp port 6443) "
                          "and not (ip6 and dst net ff00::/8) "
                          "and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)")

    def fragments(self) -> int:
        return self.count("(ip and (ip[6:2] & 0x3fff) != 0) or (ip6 and ip6[6] == 44)")


VXLAN_PORTS = (4789, 8472)
GENEVE_PORT = 6081
_ETH_IPV4, _ETH_IPV6, _ETH_BRIDGED = 0x0800, 0x86DD, 0x6558
Addresses = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (tcpdump -w; either byte order); Ethernet only."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
             b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if order is None:
        raise RuntimeError(f"{path} is not a pcap file tcpdump wrote (magic {magic.hex()})")
    linktype = struct.unpack(order + "I", data[20:24])[0]
    if linktype != 1:
        raise RuntimeError(f"{path}: link type {linktype}, expected Ethernet (1)")
    frames, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(order + "I", data[off + 8:off + 12])[0]
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames


def decapsulate(frame: bytes) -> Addresses | None:
    """The inner packet's (source, destination) if ``frame`` is an encapsulated IP packet,
    opening nested encapsulations; None for anything else."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    return _inner(ethertype, frame[14:], depth=0)


def _inner(ethertype: int, pkt: bytes, depth: int) -> Addresses | None:
    """Follows one IP packet: its payload if that is an encapsulation, else None at the
    outermost level (not encapsulated) or the addresses at an inner one."""
    if depth > 4:
        return None
    addrs: Addresses
    if ethertype == _ETH_IPV4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        proto, addrs = pkt[9], (ipaddress.IPv4Address(pkt[12:16]),
                                ipaddress.IPv4Address(pkt[16:20]))
        payload = pkt[ihl:]
    elif ethertype == _ETH_IPV6 and len(pkt) >= 40:
        proto, addrs = pkt[6], (ipaddress.IPv6Address(pkt[8:24]),
                                ipaddress.IPv6Address(pkt[24:40]))
        payload = pkt[40:]
    else:
        return None
    found = _payload(proto, payload, depth)
    if found is not None:
        return found
    return addrs if depth > 0 else None


def _payload(proto: int, payload: bytes, depth: int) -> Addresses | None:
    if proto == 4:  # IPIP
        return _inner(_ETH_IPV4, payload, depth + 1)
    if proto == 41:  # IPv6 in IP (sit, 6in4)
        return _inner(_ETH_IPV6, payload, depth + 1)
    if proto == 47 and len(payload) >= 4:  # GRE: flags, protocol, optional words
        flags, gproto = struct.unpack("!HH", payload[:4])
        off = 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
        return _ethertype(gproto, payload[off:], depth)
    if proto == 17 and len(payload) >= 8:
        sport, dport = struct.unpack("!HH", payload[:4])
        body = payload[8:]
        if (dport in VXLAN_PORTS or sport in VXLAN_PORTS) and len(body) >= 8:
            return _ethertype(_ETH_BRIDGED, body[8:], depth)
        if (dport == GENEVE_PORT or sport == GENEVE_PORT) and len(body) >= 8:
            opt_len = (body[0] & 0x3F) * 4
            gproto = struct.unpack("!H", body[2:4])[0]
            return _ethertype(gproto, body[8 + opt_len:], depth)
    return None


def _ethertype(ethertype: int, body: bytes, depth: int) -> Addresses | None:
    if ethertype == _ETH_BRIDGED:  # a whole Ethernet frame inside
        if len(body) < 14:
            return None
        return _inner(struct.unpack("!H", body[12:14])[0], body[14:], depth + 1)
    return _inner(ethertype, body, depth + 1)


@contextlib.contextmanager
def capture(netns: str, ifname: str, pcap: Path, *, wg_ports: tuple[int, ...] = (51820, 51821),
            pod_nets: tuple[str, ...] = DEFAULT_POD_NETS) -> Iterator[Capture]:
    """tcpdump on ``ifname`` in ``netns``, listening before the body runs."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", ifname, "-nn",
                             "-U", "--immediate-mode", "-w", str(pcap)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"tcpdump did not start: {line.strip()}")
    try:
        yield Capture(pcap, wg_ports, pod_nets)
    finally:
        time.sleep(0.2)  # in-flight packets are on the wire within microseconds; margin
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
