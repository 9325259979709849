"""Typed values the core computes with and the adapters translate to and from.

Inputs arrive as ``NodeSpec`` (raw strings, as a Kubernetes Node or a mesh file states them)
and are validated by ``wgmanager.core.mesh`` into ``Node`` or ``Rejected``. Outputs are
``PeerConfig`` (what the WireGuard device should hold) and ``Action`` per CIDR (what the eBPF
datapath should do with traffic to it). ``DeviceState`` is the device as read back.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from wgmanager.core.keys import PublicKey

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def network_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    """Orders mixed IPv4/IPv6 networks deterministically (v4 first)."""
    return (net.version, int(net.network_address), net.prefixlen)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node as some source states it, before any validation.

    ``created`` orders claims: when two nodes claim the same key or overlapping pod CIDRs,
    the node that existed first keeps them, so a newly misconfigured node never takes
    traffic away from an established one. Any monotonic number works (Unix seconds).
    """

    name: str
    addresses: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    public_key: str | None = None
    created: float = 0.0
    # The WireGuard port the node listens on (None: the cluster's port). Key rotation moves
    # a node to its second device, which listens on another port.
    port: str | None = None
    # Published while the node rotates its key: peers switch to this key and port at once
    # (wgmanager.core.rotation explains the protocol).
    next_public_key: str | None = None
    next_port: str | None = None
    # Only read for the local node: a pending `wgmanager rotate-keys` request, and the
    # rotation status the agent last published.
    rotation_request: str | None = None
    rotation_status: str | None = None
    # What the node's agent says it supports (the features annotation); None when the
    # source does not say (a mesh file: one version everywhere), which means everything.
    features: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Node:
    """A validated remote or local node."""

    name: str
    addresses: tuple[IPAddress, ...]
    pod_cidrs: tuple[IPNetwork, ...]
    public_key: PublicKey  # the key peers use: the next key while the node rotates
    port: int | None = None  # None: the cluster's listen port
    rotating: bool = False  # the node published a next key (and public_key is that key)
    # While it rotates, the key (and port) it is moving away from: still live on its old
    # device, which a rotating peer's old device keeps using (wgmanager.core.rotation).
    previous_key: PublicKey | None = None
    previous_port: int | None = None
    # Whether the node's agent accepts, from our peer, packets sent from our node address
    # (it puts peers' node addresses into their allowed IPs: NODE_ADDRESSES_FEATURE). An
    # older agent does not; its pod CIDRs are then steered only for our pods' packets, and
    # our host's own traffic to them leaves as it did before (during a rolling upgrade).
    node_sources: bool = True

    @property
    def hosts(self) -> tuple[IPNetwork, ...]:
        """The node's own addresses as /32 and /128 networks: allowed IPs of its peer, so
        that what the node sends from its address through the tunnel (replies netfilter
        reverse-NATed to it, ICMP errors, host traffic to pods) is accepted, and the
        datapath's node entries (pods' traffic to this node's address)."""
        return tuple(ipaddress.ip_network(a) for a in self.addresses)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A node that gets no peer, with the reason an operator can act on.

    ``pod_cidrs`` holds whatever CIDRs parsed, so traffic to them can still fail closed.
    ``pending`` marks the normal start-up case (no key published yet) as opposed to an error.
    """

    name: str
    reason: str
    pod_cidrs: tuple[IPNetwork, ...] = ()
    pending: bool = False


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parses ``1.2.3.4:51820`` or ``[fd00::1]:51820`` (the UAPI and `wg` format)."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"endpoint {text!r} is not HOST:PORT")
        host = host.removeprefix("[").removesuffix("]")
        # wireguard-go may append a zone to link-local IPv6 hosts; we never use those.
        host = host.split("%", 1)[0]
        return cls(ipaddress.ip_address(host), int(port))


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """The configuration wgmanager wants for one peer."""

    public_key: PublicKey
    endpoint: Endpoint | None
    allowed_ips: frozenset[IPNetwork]
    persistent_keepalive: int = 0


@dataclass(frozen=True, slots=True)
class PeerState:
    """One peer as read back from a device: its configuration plus live statistics."""

    public_key: PublicKey
    endpoint: Endpoint | None
    allowed_ips: frozenset[IPNetwork]
    persistent_keepalive: int = 0
    last_handshake: float | None = None  # Unix seconds, None if never
    rx_bytes: int = 0
    tx_bytes: int = 0

    def config(self) -> PeerConfig:
        return PeerConfig(self.public_key, self.endpoint, self.allowed_ips,
                          self.persistent_keepalive)


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A WireGuard device as read back. Holds the public key only, never the private one."""

    name: str
    public_key: PublicKey | None
    listen_port: int
    fwmark: int = 0
    peers: Mapping[PublicKey, PeerState] = field(default_factory=dict)


class Action(enum.IntEnum):
    """What the eBPF program does with a packet whose destination falls in a CIDR.

    The numbers are the map values in bpf/wg_redirect.c; keep them in step.
    """

    LOCAL = 1  # a local pod CIDR: leave alone
    REDIRECT = 2  # a remote pod CIDR whose peer is configured: into the WireGuard device
    DROP = 3  # a cluster CIDR with no ready peer: fail closed
    # While this node rotates its key it runs a second device ("alt"): traffic for a peer
    # that has switched goes there, and traffic for a peer that may not have switched yet
    # goes to both (the peer accepts exactly one copy: the one from the key it uses).
    REDIRECT_ALT = 4
    REDIRECT_BOTH = 5
    # A remote node's own address (ACTION_NODE in the program): the same verdicts, applied
    # only to packets from a local pod; the host's own traffic to node addresses passes.
    NODE_REDIRECT = 0x12
    NODE_DROP = 0x13
    NODE_REDIRECT_ALT = 0x14
    NODE_REDIRECT_BOTH = 0x15

    def for_node(self) -> Action:
        """This verdict as a node-address entry."""
        return Action(self | NODE_FLAG)


NODE_FLAG = 0x10

# Published by agents that accept packets from peers' node addresses (the
# ``wgmanager.io/features`` annotation): see ``Node.node_sources``.
NODE_ADDRESSES_FEATURE = "node-addresses"


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Cluster-wide settings that shape every node's peers and datapath."""

    listen_port: int = 51820
    persistent_keepalive: int = 0
    # CIDRs covering all pod networks; traffic into them that matches no ready peer is dropped.
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    # False (--fail-mode open): traffic to a remote CIDR with no ready peer is left to the
    # CNI (unencrypted) instead of dropped; availability over confidentiality, opt-in.
    fail_closed: bool = True
