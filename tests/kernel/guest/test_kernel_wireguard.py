"""The kernel backend against real kernel WireGuard (Debian's 6.1 module, in the VM).

What the unit tests check against a model of the kernel, checked against the kernel:
device lifecycle, the plan's peer operations, a tunnel configured only by the backend,
peers far past one netlink attribute's 64 KiB, the fresh reset as one atomic message, and
peer operations batched into few messages.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
from collections.abc import Iterator

import pytest

from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.model import Endpoint, IPNetwork, PeerConfig
from wgmanager.core.plan import AddPeer, UpdatePeer, apply_peer_ops, plan_peers
from wgmanager.reconciler import start_handshakes
from wgmanager.wireguard.backend import DeviceSettings
from wgmanager.wireguard.kernel import KernelBackend
from wgmanager.wireguard.kernel_messages import PEERS_BUDGET, peer_size


def nets(*texts: str) -> frozenset[IPNetwork]:
    return frozenset(ipaddress.ip_network(t) for t in texts)


def v4(n: int, base: int = 0x0A000000) -> frozenset[IPNetwork]:
    return frozenset(ipaddress.ip_network((base + (i << 8), 24)) for i in range(n))


def v6(n: int) -> frozenset[IPNetwork]:
    return frozenset(ipaddress.ip_network((0xFD00 << 112 | i << 64, 64)) for i in range(n))


def key() -> PublicKey:
    return PrivateKey.generate().public_key


def peer(k: PublicKey, ips: frozenset[IPNetwork], port: int = 51820,
         keepalive: int = 0) -> PeerConfig:
    return PeerConfig(k, Endpoint(ipaddress.ip_address("192.0.2.1"), port), ips, keepalive)


def configs(b: KernelBackend) -> dict[PublicKey, PeerConfig]:
    return {k: s.config() for k, s in b.read().peers.items()}


def ready(b: KernelBackend, port: int = 51820) -> KernelBackend:
    b.ensure_device()
    b.configure(DeviceSettings(PrivateKey.generate(), port))
    return b


def test_device_lifecycle_is_idempotent(backend: KernelBackend) -> None:
    assert not backend.device_exists()
    assert backend.ensure_device() is True
    assert backend.ensure_device() is False
    secret = PrivateKey.generate()
    assert backend.configure(DeviceSettings(secret, 51999, fwmark=0x42)) is True
    assert backend.configure(DeviceSettings(secret, 51999, fwmark=0x42)) is False
    state = backend.read()
    assert (state.public_key, state.listen_port, state.fwmark) == (
        secret.public_key, 51999, 0x42)
    assert secret.export_base64() not in repr(state)
    backend.delete_device()
    assert not backend.device_exists()
    backend.delete_device()  # idempotent


def test_peers_follow_the_plan_and_the_model(backend: KernelBackend) -> None:
    ready(backend)
    a, b, c = key(), key(), key()
    start = {a: peer(a, nets("10.1.0.0/24", "10.1.1.0/24", "10.1.2.0/24", "fd00:1::/64")),
             b: peer(b, nets("10.2.0.0/24"), keepalive=25)}
    backend.apply(plan_peers(start, {}))
    assert configs(backend) == start
    actual = backend.read().peers
    # Withdraw two of a's, move its endpoint; c takes over b's CIDR and one of a's; b goes.
    desired = {a: peer(a, nets("10.1.0.0/24", "fd00:1::/64"), port=51821),
               c: peer(c, nets("10.2.0.0/24", "10.1.2.0/24"))}
    ops = plan_peers(desired, actual)
    backend.apply(ops)
    assert configs(backend) == desired
    assert configs(backend) == {k: s.config() for k, s in apply_peer_ops(actual, ops).items()}
    assert backend.apply([]) is None and configs(backend) == desired


@pytest.fixture
def two_nodes() -> Iterator[tuple[KernelBackend, KernelBackend, str, str]]:
    """Two namespaces joined by a veth (192.168.77.1-2), each with its own wgk0."""
    names = [f"wgkt{i}" for i in (1, 2)]
    for n in names:
        subprocess.run(["ip", "netns", "add", n], check=True)
    backends: list[KernelBackend] = []
    try:
        subprocess.run(["ip", "link", "add", "wgkv1", "netns", names[0], "type", "veth",
                        "peer", "wgkv2", "netns", names[1]], check=True)
        for i, n in enumerate(names, 1):
            for cmd in (["addr", "add", f"192.168.77.{i}/24", "dev", f"wgkv{i}"],
                        ["link", "set", f"wgkv{i}", "up"], ["link", "set", "lo", "up"]):
                subprocess.run(["ip", "-n", n, *cmd], check=True)
            backends.append(KernelBackend("wgk0", netns=n))
        yield backends[0], backends[1], names[0], names[1]
    finally:
        for b in backends:
            b.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], check=False)


def test_a_tunnel_configured_only_by_the_backend_carries_traffic(
        two_nodes: tuple[KernelBackend, KernelBackend, str, str]) -> None:
    b1, b2, ns1, ns2 = two_nodes
    k1, k2 = PrivateKey.generate(), PrivateKey.generate()
    for b, k, ns, addr in ((b1, k1, ns1, "10.99.1.1"), (b2, k2, ns2, "10.99.2.1")):
        b.ensure_device()
        b.configure(DeviceSettings(k, 51820))
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "wgk0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "wgk0", "up"], check=True)
    b1.apply([AddPeer(PeerConfig(k2.public_key, Endpoint(ipaddress.ip_address("192.168.77.2"),
                                                         51820), nets("10.99.2.0/24"), 0))])
    b2.apply([AddPeer(PeerConfig(k1.public_key, Endpoint(ipaddress.ip_address("192.168.77.1"),
                                                         51820), nets("10.99.1.0/24"), 0))])
    for ns, dst in ((ns1, "10.99.2.0/24"), (ns2, "10.99.1.0/24")):
        subprocess.run(["ip", "-n", ns, "route", "add", dst, "dev", "wgk0"], check=True)
    res = subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c", "3", "-i", "0.2", "-W", "5",
                          "-I", "10.99.1.1", "10.99.2.1"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    seen = b1.read().peers[k2.public_key]
    assert seen.last_handshake is not None and seen.rx_bytes > 0 and seen.tx_bytes > 0


def test_a_peer_with_thousands_of_allowed_ips(backend: KernelBackend) -> None:
    # Before: one AddPeer past 2,338 IPv4 allowed IPs raised struct.error from pyroute2's
    # encoder (a 16-bit attribute length), outside the backend's error handling.
    ready(backend)
    k = key()
    ips = v4(5000) | v6(2000)
    backend.apply([AddPeer(peer(k, ips, keepalive=25))])
    assert configs(backend) == {k: peer(k, ips, keepalive=25)}  # read back: a multi-part dump
    keep = frozenset(sorted(ips, key=str)[:1000])
    backend.apply([UpdatePeer(k, add_allowed_ips=v4(3000, base=0x0B000000),
                              remove_allowed_ips=ips - keep)])
    assert configs(backend)[k].allowed_ips == keep | v4(3000, base=0x0B000000)


def test_a_fresh_reset_is_one_atomic_message(backend: KernelBackend, netns: str) -> None:
    # Before: remove and add went as two messages; between them no peer held the CIDRs,
    # and a reader could see the peer missing. Now one message: never.
    ready(backend)
    k = key()
    ips = v4(200)
    backend.apply([AddPeer(peer(k, ips))])
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        reader = KernelBackend("wgk0", netns=netns)
        try:
            while not stop.is_set():
                got = reader.read().peers.get(k)
                seen.append(len(got.allowed_ips) if got is not None else -1)
        finally:
            reader.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        before = backend.messages_sent
        for _ in range(60):
            backend.apply([AddPeer(peer(k, ips), fresh=True)])
        assert backend.messages_sent - before == 60
    finally:
        stop.set()
        watcher.join()
    assert seen and set(seen) == {len(ips)}
    assert configs(backend) == {k: peer(k, ips)}


def test_peer_operations_are_batched_into_few_messages(backend: KernelBackend) -> None:
    ready(backend)
    keys = [key() for _ in range(600)]
    ops = [AddPeer(peer(k, v4(2, base=0x0A000000 + (i << 16)))) for i, k in enumerate(keys)]
    before = backend.messages_sent
    backend.apply(ops)
    per_op = peer_size({"public_key": "x" * 44, "replace_allowed_ips": True,
                        "allowed_ips": ["10.0.0.0/24"] * 2, "persistent_keepalive": 0,
                        "endpoint_addr": "192.0.2.1", "endpoint_port": 1})
    assert backend.messages_sent - before == -(-len(ops) * per_op // PEERS_BUDGET)
    assert configs(backend) == {op.public_key: op.peer for op in ops}
    # Handshake kicks: keepalive on, then off, for every key: two messages, not 1,200.
    before = backend.messages_sent
    start_handshakes(backend, keys)
    assert backend.messages_sent - before == 2
    assert all(s.persistent_keepalive == 0 for s in backend.read().peers.values())
