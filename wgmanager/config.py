"""Settings for one node, as frozen dataclasses built once by the CLI and passed down.

Nothing reads flags or the environment below the CLI; every default lives here, once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from wgmanager.core.model import IPNetwork


class BackendMode(enum.StrEnum):
    """Which WireGuard implementation to use (auto: the kernel's when it has WireGuard)."""

    AUTO = "auto"
    KERNEL = "kernel"
    USERSPACE = "userspace"


DEFAULT_IFNAME = "wgm0"
MAX_IFNAME = 14  # IFNAMSIZ - 1 is 15; key rotation's second device appends one letter
DEFAULT_LISTEN_PORT = 51820
DEFAULT_STATE_DIR = Path("/var/lib/wgmanager")
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/wgmanager")
DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
# No pod veth gets the pre-netfilter fast path by default: steering happens at the egress
# of the devices packets leave by, after the node's netfilter rules (docs/architecture.md).
DEFAULT_POD_INTERFACES = ""

# WireGuard overhead per packet on the underlay: outer IP + UDP (8) + WireGuard (32).
OVERHEAD_IPV4 = 20 + 8 + 32
OVERHEAD_IPV6 = 40 + 8 + 32


@dataclass(frozen=True, slots=True)
class WireGuardSettings:
    ifname: str = DEFAULT_IFNAME
    listen_port: int = DEFAULT_LISTEN_PORT
    mtu: int | None = None  # None: uplink MTU minus the overhead of the underlay family
    persistent_keepalive: int = 0
    fwmark: int = 0
    backend: BackendMode = BackendMode.AUTO
    socket_dir: Path = DEFAULT_SOCKET_DIR
    spawn_userspace: bool = True  # False when a wireguard-go sidecar owns the process
    # Key rotation runs a second device (slot 1) beside the first (slot 0) on this port;
    # None: listen_port + 1. Both ports must be open between nodes.
    rotation_port: int | None = None

    def ifname_for(self, slot: int) -> str:
        """Slot 0 is the configured interface; slot 1 (key rotation) appends "r"."""
        return self.ifname if slot == 0 else f"{self.ifname}r"

    def port_for(self, slot: int) -> int:
        if slot == 0:
            return self.listen_port
        return self.rotation_port if self.rotation_port is not None else self.listen_port + 1


@dataclass(frozen=True, slots=True)
class DatapathSettings:
    pin_dir: Path = DEFAULT_PIN_DIR
    max_cidrs: int = 65536
    uplink: str | None = None  # None: the device that holds the node's InternalIP
    pod_interfaces: str = DEFAULT_POD_INTERFACES  # glob of pod veths for from_pod (opt-in)
    cluster_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class RotationSettings:
    interval: float = 0.0  # seconds between scheduled rotations per node; 0 = never
    timeout: float = 300.0  # peers must switch within this, else the rotation rolls back
    poll_interval: float = 0.25  # how often a rotating node looks for peer handshakes
    # How long the copies go into both devices before the next key is published (or
    # withdrawn, in a rollback): a packet sent through one device just before must be
    # through both nodes' wireguard-go before the peer switches (wgmanager.agent.rotation).
    settle: float = 0.1


@dataclass(frozen=True, slots=True)
class NodeSettings:
    node_name: str
    state_dir: Path = DEFAULT_STATE_DIR
    wireguard: WireGuardSettings = field(default_factory=WireGuardSettings)
    datapath: DatapathSettings = field(default_factory=DatapathSettings)
    rotation: RotationSettings = field(default_factory=RotationSettings)


def wireguard_mtu(uplink_mtu: int, underlay_version: int) -> int:
    """The largest inner packet that leaves as one unfragmented outer packet.

    Pods must use this MTU (or less): the eBPF redirect skips the kernel's MTU check, so a
    larger pod packet would be encrypted whole and then fragmented on the underlay.
    """
    return uplink_mtu - (OVERHEAD_IPV6 if underlay_version == 6 else OVERHEAD_IPV4)
