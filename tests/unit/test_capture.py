"""The leak detector opens encapsulations: a pod packet inside VXLAN, Geneve, IPIP,
IPv6-in-IPv4 or GRE between node addresses is plaintext (issue 18).

The CI kernel builds VXLAN only (tests/integration/test_overlay.py captures real VXLAN;
the kernel lane real IPIP), so the other encapsulations are proven here on frames built
byte by byte as the RFCs lay them out, written to a pcap the way tcpdump writes one.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from wgmanager.datapath.packets import ETH_P_IP, ETH_P_IPV6, frame
from wgmanager.lab.capture import Capture, decapsulate, read_pcap

NODE1, NODE2 = "10.99.0.1", "10.99.0.2"
POD4 = ("10.244.1.11", "10.244.2.11")
POD6 = ("fd00:244:1::b", "fd00:244:2::b")
MAC = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"


def outer_ip(proto: int, payload: bytes) -> bytes:
    """An Ethernet frame with an IPv4 header from node1 to node2 around ``payload``."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                      bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2]))
    return MAC + struct.pack("!H", ETH_P_IP) + hdr + payload


def udp(dport: int, body: bytes) -> bytes:
    return struct.pack("!HHHH", 40000, dport, 8 + len(body), 0) + body


def inner(v6: bool = False) -> bytes:
    """A pod's whole Ethernet frame (UDP between two pods)."""
    return frame(*(POD6 if v6 else POD4))


def encapsulations(v6: bool) -> dict[str, bytes]:
    eth = inner(v6)
    ip = eth[14:]
    ethertype = ETH_P_IPV6 if v6 else ETH_P_IP
    vxlan = struct.pack("!BxxxI", 0x08, 1 << 8) + eth
    geneve_opts = b"\x01\x02\x03\x04" * 2  # 8 bytes of options: opt len field = 2
    geneve = struct.pack("!BBHI", 2, 0, 0x6558, 1 << 8) + geneve_opts + eth
    geneve_l3 = struct.pack("!BBHI", 0, 0, ethertype, 1 << 8) + ip
    gre_keyed = struct.pack("!HHI", 0x2000, ethertype, 7) + ip
    return {
        "vxlan-4789": outer_ip(17, udp(4789, vxlan)),
        "vxlan-flannel-8472": outer_ip(17, udp(8472, vxlan)),
        "geneve-ethernet": outer_ip(17, udp(6081, geneve)),
        "geneve-ip": outer_ip(17, udp(6081, geneve_l3)),
        "ip-in-ip" if not v6 else "ipv6-in-ipv4": outer_ip(41 if v6 else 4, ip),
        "gre-with-key": outer_ip(47, gre_keyed),
        "nested-ipip-in-vxlan": outer_ip(17, udp(4789, struct.pack("!BxxxI", 0x08, 1 << 8)
                                                  + MAC + struct.pack("!H", ETH_P_IP)
                                                  + outer_ip(4 if not v6 else 41, ip)[14:])),
    }


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4-pods", "ipv6-pods"])
def test_every_encapsulation_is_opened(v6: bool) -> None:
    want = tuple(POD6 if v6 else POD4)
    for name, f in encapsulations(v6).items():
        got = decapsulate(f)
        assert got is not None, name
        assert tuple(str(a) for a in got) == want, name


def test_plain_and_node_to_node_frames_are_not_encapsulated() -> None:
    assert decapsulate(inner()) is None  # a pod packet in clear: the BPF filter's job
    assert decapsulate(frame(NODE1, NODE2, dport=51820)) is None  # WireGuard
    assert decapsulate(outer_ip(17, udp(4789, b"\x08\x00"))) is None  # truncated VXLAN
    assert decapsulate(b"\x00" * 10) is None


def write_pcap(path: Path, frames: list[bytes]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for i, f in enumerate(frames):
        out.append(struct.pack("<IIII", 1700000000 + i, 0, len(f), len(f)) + f)
    path.write_bytes(b"".join(out))


def test_the_capture_counts_encapsulated_pod_packets_as_plaintext(tmp_path: Path) -> None:
    frames = [*encapsulations(False).values(), *encapsulations(True).values(),
              frame(NODE1, NODE2, dport=51820)]
    pcap = tmp_path / "encapsulated.pcap"
    write_pcap(pcap, frames)
    assert len(read_pcap(pcap)) == len(frames)
    cap = Capture(pcap)
    assert cap.encapsulated_pod_packets() == len(frames) - 1
    # The outer headers hold node addresses only: an address filter alone counts 0.
    assert cap.count("net 10.244.0.0/16 or net fd00:244::/32") == 0
    assert cap.plaintext_pod_packets() == len(frames) - 1


def test_inner_addresses_outside_the_pod_networks_are_not_counted(tmp_path: Path) -> None:
    ip = frame("192.0.2.1", "192.0.2.2")[14:]
    pcap = tmp_path / "other.pcap"
    write_pcap(pcap, [outer_ip(4, ip)])
    assert Capture(pcap).encapsulated_pod_packets() == 0
