"""The uplink choice on a real kernel: the device holding the node's address, never ours.

Our WireGuard devices carry the node's IPv4 address as a /32 (for the reverse-path check).
The audit removed the address from the real uplink and the agent attached the guard to the
WireGuard device instead (MTU 1380 for a minute); now it refuses with one line.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from wgmanager.datapath import links
from wgmanager.errors import ConfigError

ADDRESS = ipaddress.ip_address("10.77.0.1")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with a veth 'uplink' and a TUN named like our device, both holding ADDRESS."""
    name = "wgu" + secrets.token_hex(3)
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        sh("ip", "-n", name, "addr", "add", f"{ADDRESS}/24", "dev", "eth0")
        sh("ip", "-n", name, "tuntap", "add", "dev", "wgm0", "mode", "tun")
        sh("ip", "-n", name, "addr", "add", f"{ADDRESS}/32", "dev", "wgm0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name)


def test_the_uplink_is_the_real_device_and_never_our_wireguard_device(netns: str) -> None:
    ours = frozenset({"wgm0", "wgm0r"})
    ipr = IPRoute(netns=netns)
    try:
        assert links.uplink_for(ipr, ADDRESS, exclude=ours).ifname == "eth0"
        sh("ip", "-n", netns, "addr", "del", f"{ADDRESS}/24", "dev", "eth0")
        with pytest.raises(ConfigError, match="WireGuard devices do not count"):
            links.uplink_for(ipr, ADDRESS, exclude=ours)
        # Without the exclusion it would have picked the tunnel: what the audit saw.
        assert links.uplink_for(ipr, ADDRESS).ifname == "wgm0"
    finally:
        ipr.close()
