"""The mesh kept up to date node by node, equal to ``compute_mesh`` after every change. Pure.

``compute_mesh`` parses and checks every node: O(N) Python work per event, 0.4 s at 5,000
nodes. ``MeshIndex`` keeps what that work builds (the parsed nodes by spec, the key owners,
the CIDR claims) and, for a set of changed nodes, re-derives only those nodes when that is
provably the same as a full computation against the previous mesh:

- every unchanged accepted node is an incumbent there, so it keeps its claims and is
  checked before the changed ones; rejected nodes stay rejected, for the same reason;
- so a changed node's outcome is its own checks against the local node and the incumbents,
  *unless* its old or new claims (key, pod CIDRs) touch the local node's, another changed
  node's, a rejected node's, or a cluster CIDR the datapath's catch-all depends on.

In those cases (rare: a misconfiguration), and when the local node or the quarantine
changes, ``update`` returns None and the caller computes the mesh in full (``full``).
tests/unit/test_meshindex.py checks the equality on random event sequences (hypothesis).

``update`` changes the kept mesh's dicts in place (copying three dicts of every node per
event was O(N): ~0.4 ms at 5,000 nodes, most of the pure part of a pass). So a ``Mesh``
this index returned is its current state, not a snapshot: a reader on another thread
copies its dicts first (``dict(d)`` is one C call, atomic under the GIL), and a caller
whose pass fails after ``update`` calls ``rollback`` so the next full computation sees
the previous mesh as its incumbents.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from wgmanager.core.keys import PublicKey
from wgmanager.core.mesh import (
    QUARANTINE_REASON,
    CidrClaims,
    Mesh,
    compute_mesh,
    conflict,
    no_endpoint_reason,
    parse_node,
    peer_config,
)
from wgmanager.core.model import (
    IPAddress,
    IPNetwork,
    MeshConfig,
    Node,
    NodeSpec,
    PeerConfig,
    Rejected,
)

_ABSENT: Any = object()  # "no entry" in the undo log (None is a value in no table)


@dataclass(frozen=True, slots=True)
class MeshChange:
    """The new mesh and the nodes whose outcome changed (accepted, rejected or gone), with
    what they were before: what the datapath and the peers must be re-planned for."""

    mesh: Mesh
    names: frozenset[str]
    old_nodes: Mapping[str, Node]  # changed nodes accepted in the previous mesh
    old_rejected: Mapping[str, Rejected]  # changed nodes rejected in the previous mesh


class MeshIndex:
    """``compute_mesh`` for one local node, with its intermediate state kept."""

    def __init__(self, *, local_name: str, config: MeshConfig) -> None:
        self.local_name = local_name
        self.config = config
        self.mesh: Mesh | None = None
        self._parsed: dict[NodeSpec, Node | Rejected] = {}
        self._by_name: dict[str, Node | Rejected] = {}  # the current spec's parse, by name
        self._local_spec: NodeSpec | None = None
        self._local_key: PublicKey | None = None
        self._quarantined: frozenset[str] = frozenset()
        self._key_owner: dict[PublicKey, str] = {}
        self._addr_owner: dict[IPAddress, str] = {}
        self._claims = CidrClaims()
        # A rejected node overlapping the local pod CIDRs makes ``contested`` depend on the
        # previous mesh in ways only the full computation follows: then every pass is full.
        self._local_contended = False
        # The dicts of ``mesh`` (owned by this index) and the entries the last ``update``
        # overwrote, so ``rollback`` can restore them: (dict, key, old value or _ABSENT).
        self._nodes: dict[str, Node] = {}
        self._peers: dict[PublicKey, PeerConfig] = {}
        self._rejected: dict[str, Rejected] = {}
        self._undo: list[tuple[dict[Any, Any], Any, Any]] = []

    def parse(self, spec: NodeSpec) -> Node | Rejected:
        """``parse_node``, cached by spec (frozen and hashable: equal specs parse alike)."""
        hit = self._parsed.get(spec)
        if hit is None:
            hit = self._parsed[spec] = parse_node(spec)
        return hit

    @property
    def claims(self) -> CidrClaims:
        """The pod CIDRs of the local node and every accepted node."""
        return self._claims

    def owner(self, key: PublicKey) -> Node | None:
        """The accepted remote node whose peer key ``key`` is (O(1): the key index)."""
        name = self._key_owner.get(key)
        return None if name is None or self.mesh is None else self.mesh.nodes.get(name)

    def full(self, specs: Mapping[str, NodeSpec], *, local_key: PublicKey,
             quarantined: frozenset[str] = frozenset()) -> Mesh:
        """``compute_mesh`` against the previous mesh; rebuilds the indexes."""
        self._parsed = {s: p for s, p in self._parsed.items() if specs.get(s.name) == s}
        claims = CidrClaims()
        mesh = compute_mesh(local_name=self.local_name, local_key=local_key,
                            specs=specs.values(), config=self.config, previous=self.mesh,
                            quarantined=quarantined, parse=self.parse, claims=claims)
        self._undo = []
        # Our own dicts, which ``update`` changes in place.
        self._nodes, self._peers = dict(mesh.nodes), dict(mesh.peers)
        self._rejected = dict(mesh.rejected)
        mesh = self.mesh = replace(mesh, nodes=self._nodes, peers=self._peers,
                                   rejected=self._rejected)
        self._by_name = {name: self.parse(spec) for name, spec in specs.items()}
        self._local_spec = specs[self.local_name]
        self._local_key, self._quarantined = local_key, quarantined
        self._key_owner = {mesh.local.public_key: mesh.local.name}
        self._key_owner.update({n.public_key: n.name for n in mesh.nodes.values()})
        self._addr_owner = dict.fromkeys(mesh.local.addresses, mesh.local.name)
        for n in mesh.nodes.values():
            self._addr_owner.update(dict.fromkeys(n.addresses, n.name))
        self._local_contended = any(
            c.version == o.version and c.overlaps(o)
            for rej in mesh.rejected.values() for c in rej.pod_cidrs for o in mesh.local.pod_cidrs)
        self._claims = claims
        return mesh

    def update(self, specs: Mapping[str, NodeSpec], changed: Iterable[str], *,
               local_key: PublicKey,
               quarantined: frozenset[str] = frozenset()) -> MeshChange | None:
        """The mesh after ``changed`` nodes changed (their new specs in ``specs``, absent
        when deleted); None when only a full computation gives the right answer."""
        prev = self.mesh
        self._undo = []
        if (prev is None or self._local_contended or self.local_name in changed
                or local_key != self._local_key or quarantined != self._quarantined
                or specs.get(self.local_name) != self._local_spec):
            return None
        new: dict[str, Node | Rejected | None] = {}
        for name in changed:
            spec = specs.get(name)
            parsed = self.parse(spec) if spec is not None else None
            if parsed is None:
                self._by_name.pop(name, None)
            else:
                self._by_name[name] = parsed
            if isinstance(parsed, Node) and prev.nodes.get(name) == parsed:
                continue  # an incumbent unchanged (a field the mesh does not use)
            if spec is not None and name in quarantined:
                parsed = Rejected(name, QUARANTINE_REASON, parsed.pod_cidrs if parsed else ())
            new[name] = parsed
        if new and not self._independent(prev, new):
            return None
        rechecked = self._recheck_rejected(prev, new)
        if rechecked is None:
            return None
        if not new and not rechecked:
            return MeshChange(prev, frozenset(), {}, {})
        old_nodes = {n: prev.nodes[n] for n in new if n in prev.nodes}
        old_rejected = {n: prev.rejected[n] for n in new if n in prev.rejected}
        nodes, peers, rejected = self._nodes, self._peers, self._rejected
        for name, rej in rechecked.items():
            self._set(rejected, name, rej)
        for name, old in old_nodes.items():
            self._withdraw(old)
            self._set(nodes, name, _ABSENT)
            self._set(peers, old.public_key, _ABSENT)
        for name, parsed in new.items():
            self._set(rejected, name, _ABSENT)
            if parsed is None:
                continue
            outcome = self._admit(parsed, prev.local)
            if isinstance(outcome, Rejected):
                self._set(rejected, name, outcome)
            else:
                self._set(nodes, name, parsed)
                self._set(peers, outcome.public_key, outcome)
        return MeshChange(prev, frozenset(new), old_nodes, old_rejected)

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        """``table[key] = value`` (``_ABSENT``: delete), recorded for ``rollback``."""
        self._undo.append((table, key, table.get(key, _ABSENT)))
        if value is _ABSENT:
            table.pop(key, None)
        else:
            table[key] = value

    def rollback(self) -> None:
        """Undoes the mesh changes of the last ``update`` (its pass failed): the next full
        computation must see the mesh before it as its incumbents. The key and CIDR
        indexes are not restored: ``full`` rebuilds them."""
        for table, key, old in reversed(self._undo):
            if old is _ABSENT:
                table.pop(key, None)
            else:
                table[key] = old
        self._undo = []

    def _recheck_rejected(self, prev: Mesh, new: Mapping[str, object],
                          ) -> dict[str, Rejected] | None:
        """The unchanged nodes rejected for a clash, checked again as a full computation
        would (after all incumbents, whose claims may name a different clash now); None
        when one of them would now be accepted. Their claims do not touch the changed
        nodes' (``_independent``), so the order among them does not matter."""
        out: dict[str, Rejected] = {}
        for name, rej in prev.rejected.items():
            parsed = self._by_name.get(name)
            if name in new or not isinstance(parsed, Node) or rej.reason == QUARANTINE_REASON:
                continue
            reason = conflict(parsed, self._key_owner, self._claims, self._addr_owner)
            if reason is None:
                if peer_config(parsed, prev.local, self.config).endpoint is not None:
                    return None
                reason = no_endpoint_reason(prev.local)
            if reason != rej.reason:
                out[name] = Rejected(name, reason, parsed.pod_cidrs)
        return out

    def _admit(self, parsed: Node | Rejected, local: Node) -> PeerConfig | Rejected:
        """One changed node's checks against the local node and the incumbents."""
        if isinstance(parsed, Rejected):
            return parsed
        reason = conflict(parsed, self._key_owner, self._claims, self._addr_owner)
        if reason is not None:
            return Rejected(parsed.name, reason, parsed.pod_cidrs)
        peer = peer_config(parsed, local, self.config)
        if peer.endpoint is None:
            return Rejected(parsed.name, no_endpoint_reason(local), parsed.pod_cidrs)
        self._key_owner[parsed.public_key] = parsed.name
        self._addr_owner.update(dict.fromkeys(parsed.addresses, parsed.name))
        for cidr in parsed.pod_cidrs:
            self._claims.add(cidr, parsed.name)
        return peer

    def _withdraw(self, node: Node) -> None:
        self._key_owner.pop(node.public_key, None)
        for addr in node.addresses:
            if self._addr_owner.get(addr) == node.name:
                del self._addr_owner[addr]
        for cidr in node.pod_cidrs:
            self._claims.remove(cidr)

    def _independent(self, prev: Mesh, new: Mapping[str, Node | Rejected | None]) -> bool:
        """Whether the changed nodes' old and new claims touch no one else's claims."""
        keys: set[PublicKey] = set()
        addrs: set[IPAddress] = set()  # the changed nodes' old and new addresses
        cidrs = CidrClaims()  # the changed nodes' old and new CIDRs, per node
        mine: list[tuple[str, IPNetwork]] = []
        for name, parsed in new.items():
            olds = (prev.nodes[name],) if name in prev.nodes else ()
            own_keys = {n.public_key for n in (*olds, parsed) if isinstance(n, Node)}
            if own_keys & keys:
                return False
            keys |= own_keys
            own_addrs = {a for n in (*olds, parsed) if isinstance(n, Node) for a in n.addresses}
            if own_addrs & addrs or any(self._addr_owner.get(a, name) != name
                                        for a in own_addrs):
                return False  # an address two nodes claim: only a full pass orders them
            addrs |= own_addrs
            own = {c for n in (*olds, parsed, prev.rejected.get(name)) if n is not None
                   for c in n.pod_cidrs}
            for cidr in own:
                mine.append((name, cidr))
        for name, cidr in mine:
            hit = cidrs.overlapping(cidr)
            if hit is not None and (hit[1] != name or hit[0] != cidr):
                return False  # two changed nodes meet (or one node's old and new CIDRs)
            if hit is None:
                cidrs.add(cidr, name)
            if any(c.version == cidr.version and c.overlaps(cidr)
                   for c in prev.local.pod_cidrs):
                return False
            if any(c.version == cidr.version and c.subnet_of(cidr)  # type: ignore[arg-type]
                   for c in self.config.cluster_cidrs):
                return False
        for name, rej in prev.rejected.items():
            if name in new:
                continue
            if any(cidrs.overlapping(c) is not None for c in rej.pod_cidrs):
                return False
            parsed = self._by_name.get(name)
            if isinstance(parsed, Node) and (parsed.public_key in keys
                                             or addrs.intersection(parsed.addresses)):
                return False
        return True
