"""From node descriptions to the local node's desired peers and datapath map. Pure.

Validation is per node: a node with a bad key, address or CIDR becomes a ``Rejected`` with a
reason and never changes another node's outcome. Claims that two nodes can make at once (a
public key, an overlapping pod CIDR) go to the incumbent: a node accepted in the previous mesh
and unchanged since keeps its claims; otherwise the older node (``created``), then the name,
wins. So a node that turns bad cannot take traffic away from nodes that were working.
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from wgmanager.core.keys import InvalidKey, PublicKey
from wgmanager.core.model import (
    NODE_ADDRESSES_FEATURE,
    Action,
    DeviceState,
    Endpoint,
    IPAddress,
    IPNetwork,
    MeshConfig,
    Node,
    NodeSpec,
    PeerConfig,
    Rejected,
    network_sort_key,
)

QUARANTINE_REASON = ("its WireGuard key was replaced outside the rotation protocol again and "
                     "again (two writers, or a stolen node credential): no peer until it is "
                     "stable; check who writes its wgmanager.io annotations")


class LocalNodeError(ValueError):
    """The local node itself cannot be used (missing, or its own data is invalid)."""


@dataclass(frozen=True, slots=True)
class Mesh:
    """The local node's view of the cluster: who gets a peer, and who does not and why."""

    local: Node
    nodes: Mapping[str, Node]  # accepted remote nodes by name
    peers: Mapping[PublicKey, PeerConfig]  # desired WireGuard peers by key
    rejected: Mapping[str, Rejected] = field(default_factory=dict)
    # Ranges of the local node's pod CIDRs that an older node claims too: the local node is
    # the misconfigured one, so traffic to them is dropped here rather than sent anywhere.
    contested: tuple[IPNetwork, ...] = ()

    def peer_for_node(self, name: str) -> PeerConfig | None:
        node = self.nodes.get(name)
        return self.peers.get(node.public_key) if node else None


def parse_node(spec: NodeSpec) -> Node | Rejected:
    """Validates one node on its own (no cross-node checks)."""
    if not spec.name:
        return Rejected(name="", reason="node has no name")
    cidrs: list[IPNetwork] = []
    for text in spec.pod_cidrs:
        try:
            cidrs.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError:
            return Rejected(spec.name, f"pod CIDR {text!r} is not a valid network "
                            "(host bits set or malformed)", tuple(cidrs))
    if not cidrs:
        return Rejected(spec.name, "node has no pod CIDRs (spec.podCIDRs is empty)", pending=True)
    if len({c.version for c in cidrs}) != len(cidrs):
        return Rejected(spec.name, "more than one pod CIDR of the same IP family", tuple(cidrs))
    addresses: list[IPAddress] = []
    for text in spec.addresses:
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            continue  # other addresses may still be usable; none at all is rejected below
        if addr.version == 6 and (addr.scope_id or addr.is_link_local):
            continue  # a zoned/link-local address is no endpoint another node can reach
        addresses.append(addr)
    if not addresses:
        return Rejected(spec.name, "node has no valid InternalIP address", tuple(cidrs))
    if spec.public_key is None or not spec.public_key.strip():
        return Rejected(spec.name, "no public key published yet", tuple(cidrs), pending=True)
    try:
        key = PublicKey.from_base64(spec.public_key)
    except InvalidKey as e:
        return Rejected(spec.name, f"public key annotation is invalid: {e}", tuple(cidrs))
    try:
        port = _port(spec.port)
    except ValueError:
        return Rejected(spec.name, f"endpoint port annotation {spec.port!r} is not a port "
                        "number (1-65535)", tuple(cidrs))
    sources = spec.features is None or NODE_ADDRESSES_FEATURE in spec.features
    nxt = _next_key(spec)
    if nxt is not None:
        # The node rotates: it already listens with the next key on the next port and keeps
        # the current key alive until its peers (us) have switched, so switching at once is
        # always safe. A malformed next key is ignored: the current one keeps working and
        # the rotating node rolls back when we never confirm.
        return Node(spec.name, tuple(addresses), tuple(cidrs), nxt[0], nxt[1], rotating=True,
                    previous_key=key, previous_port=port, node_sources=sources)
    return Node(spec.name, tuple(addresses), tuple(cidrs), key, port, node_sources=sources)


def _port(text: str | None) -> int | None:
    """None when absent (the cluster's port applies); ValueError when not a port number."""
    if text is None or not text.strip():
        return None
    t = text.strip()
    if not t.isdigit() or not 0 < int(t) < 65536:
        raise ValueError(t)
    return int(t)


def _next_key(spec: NodeSpec) -> tuple[PublicKey, int | None] | None:
    if spec.next_public_key is None or not spec.next_public_key.strip():
        return None
    try:
        return PublicKey.from_base64(spec.next_public_key), _port(spec.next_port)
    except (InvalidKey, ValueError):
        return None


def compute_mesh(
    *,
    local_name: str,
    local_key: PublicKey,
    specs: Iterable[NodeSpec],
    config: MeshConfig,
    previous: Mesh | None = None,
    quarantined: frozenset[str] = frozenset(),
    parse: Callable[[NodeSpec], Node | Rejected] = parse_node,
    claims: CidrClaims | None = None,
) -> Mesh:
    """The desired mesh for ``local_name``. ``previous`` lets incumbents keep their claims;
    ``quarantined`` nodes get no peer (see wgmanager.core.keywatch). ``parse`` may be a
    cache of ``parse_node`` (``wgmanager.core.meshindex``): its result is a pure function of
    the spec. ``claims``, an empty ``CidrClaims``, is filled with the pod CIDRs of the
    local and the accepted nodes (the index ``MeshIndex`` keeps between passes)."""
    by_name: dict[str, NodeSpec] = {}
    for spec in specs:
        by_name[spec.name] = spec
    local_spec = by_name.pop(local_name, None)
    if local_spec is None:
        raise LocalNodeError(f"node {local_name!r} is not in the node list; "
                             "check the node name (--node-name / NODE_NAME)")
    local = parse_node(NodeSpec(local_spec.name, local_spec.addresses, local_spec.pod_cidrs,
                                local_key.base64(), local_spec.created))
    if isinstance(local, Rejected):
        raise LocalNodeError(f"local node {local_name!r} is unusable: {local.reason}")

    rejected: dict[str, Rejected] = {}
    candidates: list[tuple[Node, NodeSpec]] = []
    for spec in by_name.values():
        parsed = parse(spec)
        if spec.name in quarantined:
            rejected[spec.name] = Rejected(spec.name, QUARANTINE_REASON, parsed.pod_cidrs)
        elif isinstance(parsed, Rejected):
            rejected[spec.name] = parsed
        else:
            candidates.append((parsed, spec))

    def priority(item: tuple[Node, NodeSpec]) -> tuple[bool, float, str]:
        node, spec = item
        incumbent = previous is not None and previous.nodes.get(node.name) == node
        return (not incumbent, spec.created, node.name)

    key_owner: dict[PublicKey, str] = {local.public_key: local.name}
    addr_owner: dict[IPAddress, str] = dict.fromkeys(local.addresses, local.name)
    claims = claims if claims is not None else CidrClaims()
    for c in local.pod_cidrs:
        claims.add(c, local.name)
    accepted: dict[str, Node] = {}
    for node, _spec in sorted(candidates, key=priority):
        reason = conflict(node, key_owner, claims, addr_owner)
        if reason is not None:
            rejected[node.name] = Rejected(node.name, reason, node.pod_cidrs)
            continue
        if _endpoint(node, local, config.listen_port) is None:
            rejected[node.name] = Rejected(node.name, no_endpoint_reason(local), node.pod_cidrs)
            continue
        key_owner[node.public_key] = node.name
        addr_owner.update(dict.fromkeys(node.addresses, node.name))
        for c in node.pod_cidrs:
            claims.add(c, node.name)
        accepted[node.name] = node

    older: list[tuple[IPNetwork, ...]] = []  # pod CIDRs of nodes whose claim beats ours
    for node, spec in candidates:
        before = previous.nodes.get(node.name) if previous is not None else None
        if before == node or (before is None and _older(spec, local_spec)):
            older.append(node.pod_cidrs)  # an incumbent, or a node older than us
    older += [rej.pod_cidrs for name, rej in rejected.items()
              if name in by_name and _older(by_name[name], local_spec)
              and not (previous is not None and name in previous.nodes)]
    contested = _contested(local, older)
    peers = {n.public_key: peer_config(n, local, config) for n in accepted.values()}
    return Mesh(local=local, nodes=accepted, peers=peers, rejected=rejected,
                contested=contested)


def peer_config(node: Node, local: Node, config: MeshConfig) -> PeerConfig:
    """The peer an accepted remote node gets on the local device."""
    return PeerConfig(public_key=node.public_key,
                      endpoint=_endpoint(node, local, config.listen_port),
                      allowed_ips=frozenset(node.pod_cidrs) | frozenset(node.hosts),
                      persistent_keepalive=config.persistent_keepalive)


def no_endpoint_reason(local: Node) -> str:
    family = "IPv6" if local.addresses[0].version == 6 else "IPv4"
    return f"no InternalIP of the local node's underlay family ({family})"


def _older(spec: NodeSpec, local: NodeSpec) -> bool:
    return (spec.created, spec.name) < (local.created, local.name)


def _contested(local: Node, older: Iterable[tuple[IPNetwork, ...]]) -> tuple[IPNetwork, ...]:
    """The parts of the local pod CIDRs that the CIDRs of nodes with the better claim overlap.

    The better claim is an incumbent's (accepted in the previous mesh and unchanged: then
    the local node's CIDR is what changed), else the older node's; a node that was accepted
    and then changed into our range has the worse claim and cannot take our traffic away.
    The local node always keeps its own claims in the mesh (so the other node gets no peer
    here), but with the worse claim it is the misconfigured one: without this its pods' traffic to
    the overlapped range was LOCAL for the datapath and left in plaintext by the CNI's route
    (the audit counted 1,846 packets for an exact overlap). For each overlap the smaller
    network is the contested range: the remote CIDR inside a local supernet, or the whole
    local CIDR inside (or equal to) the remote one.
    """
    out: set[IPNetwork] = set()
    for cidrs in older:
        for theirs in cidrs:
            for ours in local.pod_cidrs:
                if theirs.version == ours.version and theirs.overlaps(ours):
                    out.add(theirs if theirs.prefixlen >= ours.prefixlen else ours)
    return tuple(sorted(out, key=network_sort_key))


class CidrClaims:
    """Which node claimed which CIDR, with overlap checks in O(prefix length + log n).

    Claimed CIDRs never overlap one another (that is what claiming checks), so a new CIDR
    overlaps a claim exactly when a claim is one of its supernets (found by masking, one
    dict lookup per prefix length) or a claim starts inside its range (one bisect). A plain
    scan made the mesh quadratic: 2 s per reconcile at 1,000 nodes.
    """

    def __init__(self) -> None:
        self._owner: dict[tuple[int, int, int], tuple[IPNetwork, str]] = {}
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._by_start: dict[tuple[int, int], tuple[IPNetwork, str]] = {}
        # How many claims of each (family, prefix length): a supernet lookup tries only the
        # lengths in use (two or three in a cluster) instead of every length up to /0.
        self._plens: dict[tuple[int, int], int] = {}

    def add(self, cidr: IPNetwork, owner: str) -> None:
        version, plen = cidr.version, cidr.prefixlen
        start = int(cidr.network_address)
        self._owner[(version, plen, start)] = (cidr, owner)
        bisect.insort(self._starts[version], start)
        self._by_start[(version, start)] = (cidr, owner)
        self._plens[(version, plen)] = self._plens.get((version, plen), 0) + 1

    def remove(self, cidr: IPNetwork) -> None:
        """Withdraws a claim (a node that changed or left); unknown CIDRs are ignored."""
        version, plen = cidr.version, cidr.prefixlen
        start = int(cidr.network_address)
        if self._owner.pop((version, plen, start), None) is None:
            return
        starts = self._starts[version]
        del starts[bisect.bisect_left(starts, start)]
        del self._by_start[(version, start)]
        left = self._plens[(version, plen)] - 1
        if left:
            self._plens[(version, plen)] = left
        else:
            del self._plens[(version, plen)]

    def overlapping(self, cidr: IPNetwork) -> tuple[IPNetwork, str] | None:
        version, bits, own = cidr.version, cidr.max_prefixlen, cidr.prefixlen
        start = int(cidr.network_address)
        for v, plen in sorted(self._plens, reverse=True):  # claims containing cidr (or equal)
            if v != version or plen > own:
                continue
            mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
            hit = self._owner.get((version, plen, start & mask))
            if hit is not None:
                return hit
        starts = self._starts[cidr.version]  # claims inside cidr
        i = bisect.bisect_left(starts, start)
        if i < len(starts) and starts[i] <= int(cidr.broadcast_address):
            return self._by_start[(cidr.version, starts[i])]
        return None


def entry_action(node: Node, cidr: IPNetwork, action: Action) -> Action:
    """The map entry for one of ``node``'s ranges. A node's own address steers only our
    pods' traffic (Action.NODE_*). So do its pod CIDRs when its agent does not accept our
    node address as a source (``Node.node_sources``: an older agent, mid-upgrade): our
    host's packets to them would be dropped there, so they leave as before the upgrade."""
    if cidr in node.pod_cidrs and node.node_sources:
        return action
    return action.for_node()


def conflict(node: Node, key_owner: Mapping[PublicKey, str], claims: CidrClaims,
             addr_owner: Mapping[IPAddress, str]) -> str | None:
    """Why ``node`` cannot have a peer next to the nodes already accepted, or None.

    Node addresses are allowed IPs (``Node.hosts``), and WireGuard gives an allowed IP to
    one peer: a node claiming another's InternalIP would take that node's address from
    its peer (pods' traffic to it would be encrypted to the newcomer's key), so the
    incumbent keeps it, as with keys and pod CIDRs."""
    owner = key_owner.get(node.public_key)
    if owner is not None:
        return f"public key is already used by node {owner!r} (cloned key file?)"
    for addr in node.addresses:
        holder = addr_owner.get(addr)
        if holder is not None:
            return f"InternalIP {addr} is already node {holder!r}'s"
    for cidr in node.pod_cidrs:
        hit = claims.overlapping(cidr)
        if hit is not None:
            other, other_owner = hit
            return f"pod CIDR {cidr} overlaps {other} of node {other_owner!r}"
    return None


def _endpoint(node: Node, local: Node, port: int, *, previous: bool = False) -> Endpoint | None:
    family = local.addresses[0].version
    node_port = node.previous_port if previous else node.port
    for addr in node.addresses:
        if addr.version == family:
            return Endpoint(addr, node_port or port)
    return None


def held_key(device: DeviceState, node: Node) -> PublicKey | None:
    """Which of ``node``'s live keys ``device`` holds a peer for (its newest first)."""
    if node.public_key in device.peers:
        return node.public_key
    if node.previous_key is not None and node.previous_key in device.peers:
        return node.previous_key
    return None


def old_device_peers(mesh: Mesh, device: DeviceState,
                     config: MeshConfig) -> dict[PublicKey, PeerConfig]:
    """The peers of the local node's old device while the local node rotates its key.

    The old device keeps, for every remote node, the key it already holds while that key is
    still live (the node's published key, or the key it is rotating away from), and takes the
    node's newest key otherwise (a node that joined, finished or rolled back a rotation).
    So when two nodes rotate at once, their old devices keep talking to each other untouched
    while their new devices meet: there is always a working path, never a pair switching
    both ends at the same moment (which lost up to 0.2 s of packets between them). See
    wgmanager.core.rotation.
    """
    peers = dict(mesh.peers)
    for node in mesh.nodes.values():
        if node.previous_key is None or held_key(device, node) != node.previous_key:
            continue
        newest = peers.pop(node.public_key, None)
        if newest is None:
            continue
        peers[node.previous_key] = PeerConfig(
            public_key=node.previous_key,
            endpoint=_endpoint(node, mesh.local, config.listen_port, previous=True),
            allowed_ips=newest.allowed_ips,
            persistent_keepalive=newest.persistent_keepalive)
    return peers


class Route(enum.Enum):
    """Which of the local node's devices carry traffic to one remote node.

    CURRENT is the normal case. While the local node rotates its key it also runs the
    alternate device (new key); see wgmanager.core.rotation for when each applies.
    """

    CURRENT = "current"
    ALT = "alt"
    BOTH = "both"


def datapath_map(mesh: Mesh, device: DeviceState, config: MeshConfig, *,
                 alt: DeviceState | None = None,
                 routes: Mapping[str, Route] | None = None,
                 any_key: bool = False) -> dict[IPNetwork, Action]:
    """What the eBPF program should do per destination CIDR, given the device(s) as they are.

    A remote CIDR is redirected only into a device that really holds a peer with that node's
    key and that CIDR; until then (and for rejected nodes and the cluster-wide CIDRs) it is
    DROP, so traffic fails closed rather than leaving in plaintext (with
    ``config.fail_closed`` off such CIDRs get no entry and take the CNI's path instead).

    ``any_key`` counts a CIDR as ready when any peer of the device holds it. Traffic there is
    encrypted, only perhaps to the key the node is replacing, which is the right state to
    keep while the new peer is being added (used before peers change, so a key change does
    not blackhole the node for the moment between the two steps).
    """
    routes = routes or {}
    held = _held(device) if any_key else None
    alt_held = _held(alt) if any_key and alt is not None else None
    entries: dict[IPNetwork, Action] = {c: Action.LOCAL for c in mesh.local.pod_cidrs}
    for node in mesh.nodes.values():
        route = routes.get(node.name, Route.CURRENT)
        for cidr in (*node.pod_cidrs, *node.hosts):
            cur = route is not Route.ALT and _ready(device, node, cidr, held)
            alt_ok = (route is not Route.CURRENT and alt is not None
                      and _ready(alt, node, cidr, alt_held))
            if cur and alt_ok:
                action = Action.REDIRECT_BOTH
            elif cur:
                action = Action.REDIRECT
            elif alt_ok:
                action = Action.REDIRECT_ALT
            elif config.fail_closed:
                action = Action.DROP
            else:
                continue
            entries[cidr] = entry_action(node, cidr, action)
    for cidr in mesh.contested:  # fail closed even with fail_closed off: a leak, not a gap
        entries[cidr] = Action.DROP
    if not config.fail_closed:
        return dict(sorted(entries.items(), key=lambda kv: network_sort_key(kv[0])))
    owned = list(entries)
    # A catch-all must never shadow a more specific local or remote entry it sits inside
    # (``entries`` holds just the owned CIDRs here; catch-alls and rejected CIDRs are DROP).
    entries.update({cidr: Action.DROP for cidr in config.cluster_cidrs
                    if cidr not in entries and not _inside_any(cidr, entries)})
    if any(rej.pod_cidrs for rej in mesh.rejected.values()):
        claims = CidrClaims()  # owned CIDRs never overlap each other: index them
        for cidr in owned:
            claims.add(cidr, "")
        for rej in mesh.rejected.values():
            for cidr in rej.pod_cidrs:
                if claims.overlapping(cidr) is None:
                    entries.setdefault(cidr, Action.DROP)
    return dict(sorted(entries.items(), key=lambda kv: network_sort_key(kv[0])))


def _held(device: DeviceState) -> frozenset[IPNetwork]:
    out: set[IPNetwork] = set()
    for peer in device.peers.values():
        out |= peer.allowed_ips
    return frozenset(out)


def _ready(device: DeviceState, node: Node, cidr: IPNetwork,
           held: frozenset[IPNetwork] | None) -> bool:
    if held is not None:
        return cidr in held
    key = held_key(device, node)
    actual = device.peers.get(key) if key is not None else None
    return actual is not None and cidr in actual.allowed_ips


def _inside_any(inner: IPNetwork, owned: Collection[IPNetwork]) -> bool:
    """Whether ``inner`` lies inside (or equals) one of ``owned``: one lookup per supernet
    of ``inner`` rather than a comparison with every owned CIDR (10,000 at 5,000 nodes)."""
    return any(inner.supernet(new_prefix=plen) in owned
               for plen in range(inner.prefixlen, -1, -1))
