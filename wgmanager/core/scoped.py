"""The per-event halves of the datapath map and the device model: work for the nodes that
changed, not for the cluster. Pure.

``datapath_map`` and ``apply_peer_ops`` are the references; these give the same answers
restricted to a scope (tests/unit/test_meshindex.py, tests/unit/test_scoped.py):

- ``scoped_entries``: the map entries of the CIDRs of some nodes, valid when
  ``MeshIndex.update`` accepted the change (their CIDRs touch no other entry);
- ``DeviceModel``: what a device holds after the operations it acknowledged, with an index
  of which peer holds each allowed IP, so that advancing it costs O(operations) where
  ``apply_peer_ops`` scans every peer per operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from wgmanager.core.keys import PublicKey
from wgmanager.core.mesh import CidrClaims, Mesh, entry_action, held_key
from wgmanager.core.meshindex import MeshChange
from wgmanager.core.model import (
    Action,
    DeviceState,
    IPNetwork,
    MeshConfig,
    Node,
    PeerState,
    Rejected,
)
from wgmanager.core.plan import AddPeer, PeerOp, UpdatePeer


class DeviceModel:
    """A device's peers as our acknowledged operations left them (read in full only on a
    resync, after an error or when the device was recreated)."""

    def __init__(self, state: DeviceState) -> None:
        self.header = replace(state, peers={})
        self.peers: dict[PublicKey, PeerState] = dict(state.peers)
        self.owner: dict[IPNetwork, PublicKey] = {
            ip: key for key, peer in self.peers.items() for ip in peer.allowed_ips}

    @property
    def state(self) -> DeviceState:
        """The model as a DeviceState (shares the peer dict: read it, do not keep it)."""
        return replace(self.header, peers=self.peers)

    def apply(self, ops: Iterable[PeerOp]) -> None:
        """Advances the model as ``apply_peer_ops`` does."""
        for op in ops:
            if isinstance(op, AddPeer):
                p = op.peer
                old = self.peers.get(p.public_key)
                if old is not None:
                    self._release(p.public_key, old.allowed_ips - p.allowed_ips)
                self._take(p.allowed_ips, p.public_key)
                self.peers[p.public_key] = PeerState(p.public_key, p.endpoint, p.allowed_ips,
                                                     p.persistent_keepalive)
            elif isinstance(op, UpdatePeer):
                st = self.peers.get(op.public_key)
                if st is None:
                    raise KeyError(f"update of unknown peer {op.public_key.short()}")
                self._take(op.add_allowed_ips, op.public_key)
                self._release(op.public_key, op.remove_allowed_ips)
                self.peers[op.public_key] = replace(
                    st,
                    endpoint=op.endpoint if op.endpoint is not None else st.endpoint,
                    persistent_keepalive=(op.persistent_keepalive
                                          if op.persistent_keepalive is not None
                                          else st.persistent_keepalive),
                    allowed_ips=(st.allowed_ips | op.add_allowed_ips) - op.remove_allowed_ips)
            else:
                st = self.peers.pop(op.public_key, None)
                if st is not None:
                    self._release(op.public_key, st.allowed_ips)

    def _take(self, ips: frozenset[IPNetwork], owner: PublicKey) -> None:
        for ip in ips:
            prev = self.owner.get(ip)
            if prev is not None and prev != owner:
                st = self.peers[prev]
                self.peers[prev] = replace(st, allowed_ips=st.allowed_ips - {ip})
            self.owner[ip] = owner

    def _release(self, key: PublicKey, ips: Iterable[IPNetwork]) -> None:
        for ip in ips:
            if self.owner.get(ip) == key:
                del self.owner[ip]

    def holders(self, cidrs: Iterable[IPNetwork]) -> set[PublicKey]:
        """The peers holding any of ``cidrs``."""
        return {k for k in (self.owner.get(c) for c in cidrs) if k is not None}


def change_scope(change: MeshChange, model: DeviceModel,
                 claims: CidrClaims) -> tuple[set[IPNetwork], set[PublicKey]]:
    """What a change touches: every pod CIDR of the changed nodes' old and new versions
    (the map entries to re-plan) but those an unchanged node holds (a changed node that
    wants an incumbent's CIDR is rejected; the incumbent's entry stays), and every key they
    used or use, plus the device's holders of those CIDRs (the peers to re-plan)."""
    mesh = change.mesh
    versions: list[Node | Rejected | None] = [*change.old_nodes.values(),
                                              *change.old_rejected.values()]
    for name in change.names:
        versions += [mesh.nodes.get(name), mesh.rejected.get(name)]
    cidrs = {c for n in versions if n is not None for c in n.pod_cidrs}
    hosts = {h for n in versions if isinstance(n, Node) for h in n.hosts}
    for cidr in list(cidrs):
        hit = claims.overlapping(cidr)
        if hit is not None and hit[0] == cidr and hit[1] not in change.names:
            cidrs.discard(cidr)
    keys = {k for n in versions if isinstance(n, Node)
            for k in (n.public_key, n.previous_key) if k is not None}
    cidrs |= hosts  # the nodes' own addresses: their entries and allowed IPs move too
    return cidrs, keys | model.holders(cidrs)


def scoped_entries(mesh: Mesh, names: Iterable[str], device: DeviceModel, config: MeshConfig,
                   *, claims: CidrClaims, any_key: bool = False) -> dict[IPNetwork, Action]:
    """``datapath_map`` restricted to the CIDRs of ``names`` (not rotating: one device)."""
    entries: dict[IPNetwork, Action] = {}
    for name in names:
        node = mesh.nodes.get(name)
        if node is not None:
            key = None if any_key else held_key(device.state, node)
            for cidr in (*node.pod_cidrs, *node.hosts):
                holder = device.owner.get(cidr)
                ready = holder is not None and (any_key or holder == key)
                if ready:
                    action = Action.REDIRECT
                elif config.fail_closed:
                    action = Action.DROP
                else:
                    continue
                entries[cidr] = entry_action(node, cidr, action)
        rej = mesh.rejected.get(name)
        if rej is not None and config.fail_closed:
            for cidr in rej.pod_cidrs:
                if claims.overlapping(cidr) is None:
                    entries.setdefault(cidr, Action.DROP)
    return entries


def restrict(mapping: Mapping[IPNetwork, Action],
             cidrs: Iterable[IPNetwork]) -> dict[IPNetwork, Action]:
    return {c: mapping[c] for c in cidrs if c in mapping}
