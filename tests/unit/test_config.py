"""Settings defaults and the WireGuard MTU derived from the underlay."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wgmanager import config
from wgmanager.config import BackendMode


@pytest.mark.parametrize(("uplink", "family", "mtu"), [
    (1500, 4, 1440),
    (1500, 6, 1420),
    (9001, 4, 8941),
    (9001, 6, 8921),
    (1450, 4, 1390),  # a VXLAN underlay
    (1280, 6, 1200),
])
def test_wireguard_mtu(uplink: int, family: int, mtu: int) -> None:
    assert config.wireguard_mtu(uplink, family) == mtu


def test_overheads() -> None:
    assert config.OVERHEAD_IPV4 == 60
    assert config.OVERHEAD_IPV6 == 80


def test_defaults() -> None:
    s = config.NodeSettings(node_name="n1")
    assert s.state_dir == Path("/var/lib/wgmanager")
    assert s.wireguard == config.WireGuardSettings()
    assert s.wireguard.ifname == "wgm0"
    assert s.wireguard.listen_port == 51820
    assert s.wireguard.mtu is None
    assert s.wireguard.backend is BackendMode.AUTO
    assert s.wireguard.spawn_userspace is True
    assert s.datapath.pin_dir == Path("/sys/fs/bpf/wgmanager")
    assert s.datapath.pod_interfaces == ""  # from_pod is opt-in
    assert s.datapath.uplink is None


def test_settings_are_frozen() -> None:
    s = config.NodeSettings(node_name="n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.node_name = "n2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.wireguard.mtu = 1  # type: ignore[misc]

