"""Diff desired against actual into the minimal, safely ordered operations. Pure.

WireGuard gives an allowed IP to exactly one peer: adding it to peer B takes it from peer A.
The plan leans on that. Additions and updates come first, so an allowed IP that moves between
peers (a node's key changed, a CIDR was reassigned) moves in one step with no gap; only then
are peers removed and allowed IPs wanted by no peer at all withdrawn. Withdrawing one allowed
IP never rewrites the peer's other ones (backends do it by handing the IP to a throwaway peer
that is then removed), so the rest of that peer's traffic is never interrupted.

Datapath map changes follow the same rule: upserts before deletes, so a destination is never
left matching nothing (which would let it out unencrypted) while its entry is replaced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from wgmanager.core.keys import PublicKey
from wgmanager.core.model import (
    Action,
    Endpoint,
    IPNetwork,
    PeerConfig,
    PeerState,
    network_sort_key,
)


@dataclass(frozen=True, slots=True)
class AddPeer:
    """Adds ``peer``, or rewrites it if the device has it. With ``fresh`` an existing peer is
    removed first, which drops its sessions: the device then queues traffic for it and starts
    a handshake, instead of encrypting with a session the other side has forgotten (see
    ``wgmanager.core.rotation.stale_sessions``). Both backends do it in one request (one UAPI
    request; one WG_CMD_SET_DEVICE): the IPs have no peer only between the removal and the
    re-add within it, and what is sent to that peer then would meet the forgotten session
    anyway. A new peer that takes IPs from another (a node's next key) runs before it holds
    any: ``wgmanager.wireguard.uapi.op_lines``."""

    peer: PeerConfig
    fresh: bool = False

    @property
    def public_key(self) -> PublicKey:
        return self.peer.public_key


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    """Changes to one existing peer; ``None`` and empty sets mean "leave as is"."""

    public_key: PublicKey
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    add_allowed_ips: frozenset[IPNetwork] = frozenset()
    remove_allowed_ips: frozenset[IPNetwork] = frozenset()


@dataclass(frozen=True, slots=True)
class RemovePeer:
    public_key: PublicKey


PeerOp = AddPeer | UpdatePeer | RemovePeer


def adopt_roamed_endpoints(desired: Mapping[PublicKey, PeerConfig],
                           actual: Mapping[PublicKey, PeerState],
                           written: Mapping[PublicKey, Endpoint]) -> dict[PublicKey, PeerState]:
    """``actual`` with roamed endpoints treated as the desired ones.

    WireGuard moves a peer's endpoint to wherever its authenticated packets come from (a
    second NIC, SNAT on the underlay). When we already wrote the endpoint we still want,
    the difference is roaming, not drift: rewriting it on every resync would fight it.
    """
    out = dict(actual)
    for key, want in desired.items():
        have = actual.get(key)
        if (have is not None and want.endpoint is not None and have.endpoint != want.endpoint
                and written.get(key) == want.endpoint):
            out[key] = replace(have, endpoint=want.endpoint)
    return out


def configured(want: PeerConfig, have: PeerState | None) -> bool:
    """Whether a device peer carries what routing needs: the peer exists with exactly the
    wanted allowed IPs. (Endpoints roam and keepalive is tuning; neither changes where
    traffic goes.)"""
    return have is not None and have.allowed_ips == want.allowed_ips


def plan_peers(desired: Mapping[PublicKey, PeerConfig],
               actual: Mapping[PublicKey, PeerState]) -> list[PeerOp]:
    """Operations that turn ``actual`` into ``desired``; empty when they already agree."""
    wanted_anywhere: set[IPNetwork] = set()
    for peer in desired.values():
        wanted_anywhere |= peer.allowed_ips

    adds: list[PeerOp] = []
    updates: list[PeerOp] = []
    removes: list[PeerOp] = []
    for key in sorted(desired):
        want = desired[key]
        have = actual.get(key)
        if have is None:
            adds.append(AddPeer(want))
            continue
        endpoint = want.endpoint if want.endpoint != have.endpoint else None
        keepalive = (want.persistent_keepalive
                     if want.persistent_keepalive != have.persistent_keepalive else None)
        add_ips = want.allowed_ips - have.allowed_ips
        # IPs another desired peer wants are taken over by that peer's op: never withdraw them
        # here, or the withdrawal (run later) would take them back from their new owner.
        remove_ips = have.allowed_ips - want.allowed_ips - wanted_anywhere
        if endpoint is None and keepalive is None and not add_ips and not remove_ips:
            continue
        updates.append(UpdatePeer(key, endpoint, keepalive, frozenset(add_ips),
                                  frozenset(remove_ips)))
    for key in sorted(actual):
        if key not in desired:
            removes.append(RemovePeer(key))
    return adds + updates + removes


def given_ips(ops: Iterable[PeerOp]) -> frozenset[IPNetwork]:
    """The allowed IPs these operations give to a peer (taking them from any other)."""
    out: set[IPNetwork] = set()
    for op in ops:
        if isinstance(op, AddPeer):
            out |= op.peer.allowed_ips
        elif isinstance(op, UpdatePeer):
            out |= op.add_allowed_ips
    return frozenset(out)


def defer_replaced_removals(ops: list[PeerOp], have: Mapping[PublicKey, PeerState],
                            retiring: dict[PublicKey, float], now: float,
                            grace: float) -> list[PeerOp]:
    """``ops`` with the removal of just-replaced peers held back until their grace ends.

    A peer is just replaced when the device holds allowed IPs for it that these operations
    give to another peer. Its removal is recorded in ``retiring`` (key -> earliest removal)
    and planned again by a later reconcile; ``retiring`` forgets keys no longer removed.
    """
    taken = given_ips(ops)
    out: list[PeerOp] = []
    removing: set[PublicKey] = set()
    for op in ops:
        if isinstance(op, RemovePeer):
            removing.add(op.public_key)
            held = have[op.public_key].allowed_ips if op.public_key in have else frozenset()
            if held & taken:
                retiring.setdefault(op.public_key, now + grace)
            if retiring.get(op.public_key, now) > now:
                continue
            retiring.pop(op.public_key, None)
        out.append(op)
    for key in set(retiring) - removing:
        del retiring[key]  # wanted again, or gone by other means
    return out


@dataclass(frozen=True, slots=True)
class MapPlan:
    upserts: Mapping[IPNetwork, Action]
    deletes: tuple[IPNetwork, ...]

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)


def plan_map(desired: Mapping[IPNetwork, Action], actual: Mapping[IPNetwork, Action]) -> MapPlan:
    upserts = {c: a for c, a in desired.items() if actual.get(c) != a}
    deletes = tuple(sorted((c for c in actual if c not in desired), key=network_sort_key))
    return MapPlan(dict(sorted(upserts.items(), key=lambda kv: network_sort_key(kv[0]))), deletes)


REDIRECTS = frozenset({Action.REDIRECT, Action.REDIRECT_ALT, Action.REDIRECT_BOTH,
                       Action.NODE_REDIRECT, Action.NODE_REDIRECT_ALT,
                       Action.NODE_REDIRECT_BOTH})


def plan_fail_closed(desired: Mapping[IPNetwork, Action],
                     actual: Mapping[IPNetwork, Action]) -> MapPlan:
    """The closing half of ``plan_map``, for before devices and peers change.

    New CIDRs get their entry and entries that must stop redirecting are downgraded, but a
    redirect is never re-targeted to another device here: that waits for the full plan,
    after the device config and the peers it relies on are in place (re-targeting first
    would send traffic into a device that is not ready for it).
    """
    full = plan_map(desired, actual)
    upserts = {c: a for c, a in full.upserts.items()
               if not (a in REDIRECTS and actual.get(c) in REDIRECTS)}
    return MapPlan(upserts, full.deletes)


def apply_peer_ops(actual: Mapping[PublicKey, PeerState],
                   ops: list[PeerOp]) -> dict[PublicKey, PeerState]:
    """What a WireGuard device holds after ``ops``: the semantics every backend implements.

    An allowed IP belongs to one peer at a time, so giving it to a peer takes it from any
    other. Backends are tested against this model and the planner's tests use it.
    """
    peers = dict(actual)

    def take(ips: frozenset[IPNetwork], owner: PublicKey) -> None:
        for key, st in list(peers.items()):
            if key != owner and st.allowed_ips & ips:
                peers[key] = _replace(st, allowed_ips=st.allowed_ips - ips)

    for op in ops:
        if isinstance(op, AddPeer):
            p = op.peer
            take(p.allowed_ips, p.public_key)
            peers[p.public_key] = PeerState(p.public_key, p.endpoint, p.allowed_ips,
                                            p.persistent_keepalive)
        elif isinstance(op, UpdatePeer):
            st = peers.get(op.public_key)
            if st is None:
                raise KeyError(f"update of unknown peer {op.public_key.short()}")
            take(op.add_allowed_ips, op.public_key)
            peers[op.public_key] = _replace(
                st,
                endpoint=op.endpoint if op.endpoint is not None else st.endpoint,
                persistent_keepalive=(op.persistent_keepalive
                                      if op.persistent_keepalive is not None
                                      else st.persistent_keepalive),
                allowed_ips=(st.allowed_ips | op.add_allowed_ips) - op.remove_allowed_ips,
            )
        else:
            peers.pop(op.public_key, None)
    return peers


def _replace(st: PeerState, **changes: object) -> PeerState:
    return replace(st, **changes)  # type: ignore[arg-type]
