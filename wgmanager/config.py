"""Settings for one node, as frozen dataclasses built once by the CLI and passed down.

Nothing reads flags or the environment below the CLI; every default lives here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wgmanager.core.model import IPNetwork
from wgmanager.wireguard.backend import BackendMode

DEFAULT_IFNAME = "wgm0"
DEFAULT_LISTEN_PORT = 51820
DEFAULT_STATE_DIR = Path("/var/lib/wgmanager")
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/wgmanager")
DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
DEFAULT_POD_INTERFACES = "veth*"

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


@dataclass(frozen=True, slots=True)
class DatapathSettings:
    pin_dir: Path = DEFAULT_PIN_DIR
    max_cidrs: int = 65536
    uplink: str | None = None  # None: the device that holds the node's InternalIP
    pod_interfaces: str = DEFAULT_POD_INTERFACES  # glob of host-side pod veth names
    cluster_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeSettings:
    node_name: str
    state_dir: Path = DEFAULT_STATE_DIR
    wireguard: WireGuardSettings = field(default_factory=WireGuardSettings)
    datapath: DatapathSettings = field(default_factory=DatapathSettings)


def wireguard_mtu(uplink_mtu: int, underlay_version: int) -> int:
    """The largest inner packet that leaves as one unfragmented outer packet.

    Pods must use this MTU (or less): the eBPF redirect skips the kernel's MTU check, so a
    larger pod packet would be encrypted whole and then fragmented on the underlay.
    """
    return uplink_mtu - (OVERHEAD_IPV6 if underlay_version == 6 else OVERHEAD_IPV4)
