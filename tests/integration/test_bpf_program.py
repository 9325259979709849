"""The real eBPF program, loaded by bcc, judged packet by packet with BPF_PROG_TEST_RUN.

Each test loads the program onto freshly pinned maps of its own, fills the CIDR map the way
the reconciler would, and checks the verdict: TC_ACT_OK (pass), TC_ACT_SHOT (drop) or
TC_ACT_REDIRECT (into the WireGuard device), plus the counters the program keeps.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgmanager.core.model import Action
from wgmanager.core.plan import plan_map
from wgmanager.datapath import libbpf
from wgmanager.datapath.bpf import Hook, Program
from wgmanager.datapath.maps import Counter, DeviceConfig, PinnedMaps
from wgmanager.datapath.packets import IPPROTO_TCP, IPPROTO_UDP, arp_frame, frame

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
WG_PORT = 51820

ENTRIES = {
    "10.244.0.0/16": Action.DROP,  # cluster catch-all
    "10.244.1.0/24": Action.LOCAL,
    "10.244.2.0/24": Action.REDIRECT,
    "10.244.3.0/24": Action.DROP,  # peer not ready
    "fd00:244::/32": Action.DROP,
    "fd00:244:1::/64": Action.LOCAL,
    "fd00:244:2::/64": Action.REDIRECT,
    "10.99.0.2/32": Action.NODE_REDIRECT,  # node2's own address, its peer ready
    "10.99.0.3/32": Action.NODE_DROP,  # node3's, peer not ready
    "fd99::2/128": Action.NODE_REDIRECT,
}


class Loaded:
    def __init__(self, pin_dir: Path) -> None:
        self.program = Program(pin_dir=pin_dir, max_cidrs=1024)
        self.maps = PinnedMaps(pin_dir)

    def fill(self, entries: dict[str, Action]) -> None:
        desired = {ipaddress.ip_network(k): v for k, v in entries.items()}
        self.maps.apply(plan_map(desired, self.maps.read_cidrs()))

    def verdict(self, hook: Hook, packet: bytes) -> int:
        return libbpf.prog_test_run(self.program.fds[hook], packet, 1)[0]

    def packets(self, counter: Counter) -> int:
        return self.maps.read_counters()[counter][0]


@pytest.fixture
def prog() -> Iterator[Loaded]:
    pin_dir = Path("/sys/fs/bpf/wgmanager-tests") / f"prog-{secrets.token_hex(3)}"
    loaded = Loaded(pin_dir)
    try:
        loaded.maps.write_config(DeviceConfig(wg_ifindex=1, wg_port=WG_PORT, wg_mtu=1420))
        loaded.fill(ENTRIES)
        yield loaded
    finally:
        loaded.maps.close()
        loaded.program.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            pin_dir.parent.rmdir()


@pytest.mark.parametrize(("dst", "expected"), [
    ("10.244.2.7", TC_ACT_REDIRECT),  # remote, peer ready
    ("10.244.3.7", TC_ACT_SHOT),  # remote, peer not ready: fail closed
    ("10.244.9.7", TC_ACT_SHOT),  # inside the cluster CIDR, no node: fail closed
    ("10.244.1.99", TC_ACT_OK),  # same node
    ("192.0.2.1", TC_ACT_OK),  # outside the cluster: not ours
    ("fd00:244:2::b", TC_ACT_REDIRECT),
    ("fd00:244:7::b", TC_ACT_SHOT),
    ("fd00:244:1::c", TC_ACT_OK),
    ("2001:db8::1", TC_ACT_OK),
    ("10.99.0.2", TC_ACT_REDIRECT),  # a remote node's address (the source is a pod)
    ("10.99.0.3", TC_ACT_SHOT),
    ("fd99::2", TC_ACT_REDIRECT),
])
def test_from_pod_verdicts(prog: Loaded, dst: str, expected: int) -> None:
    src = "fd00:244:1::b" if ":" in dst else "10.244.1.11"
    assert prog.verdict(Hook.FROM_POD, frame(src, dst)) == expected


def test_from_pod_steers_every_protocol_not_just_udp(prog: Loaded) -> None:
    for proto in (IPPROTO_TCP, IPPROTO_UDP, 1):
        pkt = frame("10.244.1.11", "10.244.2.7", proto=proto)
        assert prog.verdict(Hook.FROM_POD, pkt) == TC_ACT_REDIRECT


def test_non_ip_frames_pass(prog: Loaded) -> None:
    assert prog.verdict(Hook.FROM_POD, arp_frame()) == TC_ACT_OK
    assert prog.verdict(Hook.TO_UNDERLAY, arp_frame()) == TC_ACT_OK


@pytest.mark.parametrize(("src", "dst", "expected"), [
    ("10.244.1.11", "10.244.2.7", TC_ACT_REDIRECT),  # a local pod to a remote pod
    ("10.244.1.11", "10.244.3.7", TC_ACT_SHOT),  # peer not ready: fail closed
    ("10.99.0.1", "10.244.2.7", TC_ACT_REDIRECT),  # host -> remote pod (issue 14)
    ("10.99.0.1", "10.244.3.7", TC_ACT_SHOT),
    ("10.99.0.1", "10.244.9.7", TC_ACT_SHOT),  # the cluster catch-all, whoever sends
    ("10.244.2.7", "10.244.2.8", TC_ACT_REDIRECT),  # forwarded, any source (a NAT reply)
    ("10.244.1.11", "10.244.1.12", TC_ACT_OK),  # local
    ("10.244.1.11", "10.99.0.2", TC_ACT_REDIRECT),  # pod -> remote node (hostPort, NodePort)
    ("10.244.1.11", "10.99.0.3", TC_ACT_SHOT),  # ... whose peer is not ready
    ("10.99.0.1", "10.99.0.2", TC_ACT_OK),  # host -> node: WireGuard's own UDP, kubelet
    ("10.99.0.1", "10.99.0.3", TC_ACT_OK),
    ("10.244.2.7", "10.99.0.2", TC_ACT_OK),  # node entries are for local pods' packets
    ("10.244.1.11", "10.99.0.9", TC_ACT_OK),  # not a node of the mesh
    ("fd00:244:1::b", "fd00:244:2::b", TC_ACT_REDIRECT),
    ("fd99::1", "fd00:244:2::b", TC_ACT_REDIRECT),
    ("fd00:244:1::b", "fd99::2", TC_ACT_REDIRECT),
    ("fd99::1", "fd99::2", TC_ACT_OK),
])
def test_to_underlay_verdicts(prog: Loaded, src: str, dst: str, expected: int) -> None:
    assert prog.verdict(Hook.TO_UNDERLAY, frame(src, dst)) == expected


def test_to_underlay_never_steers_our_own_wireguard_packets(prog: Loaded) -> None:
    """Our encrypted packets go from the node's address to a peer node's address: a node
    entry, which steers only a local pod's packets. No port exemption is involved."""
    for src, dst in (("10.99.0.1", "10.99.0.2"), ("fd99::1", "fd99::2")):
        own = frame(src, dst, sport=WG_PORT, dport=WG_PORT)
        assert prog.verdict(Hook.TO_UNDERLAY, own) == TC_ACT_OK


def test_pod_udp_from_the_wireguard_port_is_still_steered(prog: Loaded) -> None:
    """No port exemption: a pod using port 51820 itself must not escape in plaintext."""
    pod = frame("10.244.1.11", "10.244.2.7", sport=WG_PORT, dport=WG_PORT)
    assert prog.verdict(Hook.TO_UNDERLAY, pod) == TC_ACT_REDIRECT
    assert prog.verdict(Hook.FROM_POD, pod) == TC_ACT_REDIRECT


def test_ipv4_fragments_and_options_are_judged_by_address_alone(prog: Loaded) -> None:
    pkt = bytearray(frame("10.244.1.11", "10.244.3.7"))
    pkt[14 + 6:14 + 8] = (0x2000 | 100).to_bytes(2, "big")  # MF set, offset 800: a fragment
    assert prog.verdict(Hook.FROM_POD, bytes(pkt)) == TC_ACT_SHOT  # not-ready peer: dropped
    assert prog.verdict(Hook.TO_UNDERLAY, bytes(pkt)) == TC_ACT_SHOT


def test_redirect_without_a_device_drops(prog: Loaded) -> None:
    prog.maps.write_config(DeviceConfig(wg_ifindex=0, wg_port=WG_PORT, wg_mtu=1420))
    before = prog.packets(Counter.DROPPED_NO_DEVICE)
    assert prog.verdict(Hook.FROM_POD, frame("10.244.1.11", "10.244.2.7")) == TC_ACT_SHOT
    assert prog.packets(Counter.DROPPED_NO_DEVICE) == before + 1


def test_counters_count_each_verdict(prog: Loaded) -> None:
    cases = [(frame("10.244.1.11", "10.244.2.7"), Counter.REDIRECTED),
             (frame("10.244.1.11", "10.244.3.7"), Counter.DROPPED_NOT_READY),
             (frame("10.244.1.11", "10.244.1.12"), Counter.PASSED)]
    for pkt, counter in cases:
        before = prog.maps.read_counters()[counter]
        prog.verdict(Hook.FROM_POD, pkt)
        after = prog.maps.read_counters()[counter]
        assert after == (before[0] + 1, before[1] + len(pkt))


def test_oversize_packets_are_counted(prog: Loaded) -> None:
    before = prog.packets(Counter.OVERSIZE)
    big = frame("10.244.1.11", "10.244.2.7", payload=b"x" * 1450)
    assert prog.verdict(Hook.FROM_POD, big) == TC_ACT_REDIRECT
    assert prog.packets(Counter.OVERSIZE) == before + 1


def test_reloading_keeps_the_pinned_maps_and_their_entries(prog: Loaded) -> None:
    again = Program(pin_dir=prog.program.pin_dir, max_cidrs=1024)
    try:
        with PinnedMaps(prog.program.pin_dir) as maps:
            assert maps.read_cidrs() == {ipaddress.ip_network(k): v for k, v in ENTRIES.items()}
        pkt = frame("10.244.1.11", "10.244.2.7")
        assert libbpf.prog_test_run(again.fds[Hook.FROM_POD], pkt, 1)[0] == TC_ACT_REDIRECT
    finally:
        again.close()


def test_a_map_update_takes_effect_on_the_next_packet(prog: Loaded) -> None:
    pkt = frame("10.244.1.11", "10.244.3.7")
    assert prog.verdict(Hook.FROM_POD, pkt) == TC_ACT_SHOT
    prog.fill({**ENTRIES, "10.244.3.0/24": Action.REDIRECT})
    assert prog.verdict(Hook.FROM_POD, pkt) == TC_ACT_REDIRECT


def test_rotation_actions_redirect_to_the_device_they_name(prog: Loaded) -> None:
    """ALT and BOTH (a key rotation) redirect; ALT falls back to the current device when the
    second one is gone (the end of a rotation), and drops only when there is no device."""
    pkt = frame("10.244.1.11", "10.244.2.7")
    for action in (Action.REDIRECT_ALT, Action.REDIRECT_BOTH):
        prog.fill({**ENTRIES, "10.244.2.0/24": action})
        # An ifindex that does not exist for the clone: nothing is transmitted by the test.
        prog.maps.write_config(DeviceConfig(999_999, WG_PORT, 1420, alt_ifindex=1))
        before = prog.packets(Counter.REDIRECTED)
        assert prog.verdict(Hook.FROM_POD, pkt) == TC_ACT_REDIRECT
        assert prog.packets(Counter.REDIRECTED) == before + 1
        prog.maps.write_config(DeviceConfig(1, WG_PORT, 1420, alt_ifindex=0))
        assert prog.verdict(Hook.FROM_POD, pkt) == TC_ACT_REDIRECT
        assert prog.verdict(Hook.TO_UNDERLAY, pkt) == TC_ACT_REDIRECT
        prog.maps.write_config(DeviceConfig(0, WG_PORT, 1420, alt_ifindex=0))
        assert prog.verdict(Hook.FROM_POD, pkt) == TC_ACT_SHOT


def test_device_config_round_trips_the_second_device(prog: Loaded) -> None:
    cfg = DeviceConfig(7, WG_PORT, 1420, alt_ifindex=9)
    prog.maps.write_config(cfg)
    assert prog.maps.read_config() == cfg
