"""Key rotation without losing a packet: the protocol's state machine, as pure decisions.

A WireGuard peer is its public key, so a node cannot swap its key in place: each peer would
drop its traffic from the moment the key changes until it has learnt the new one. Instead the
rotating node (A) runs two devices side by side, each with its own key and port ("slots" 0
and 1), and moves its peers over one at a time:

  IDLE ──request──▶ PREPARE ──▶ SWITCH ──all peers confirmed──▶ IDLE (new slot)
                                   │ timeout
                                   ▼
                                ROLLBACK ──all peers back (or timeout)──▶ IDLE (old slot)

PREPARE  A writes the new key (slot t), brings up device t on port t with the same peers as
         the current device. Nothing is published yet; traffic is unchanged.
SWITCH   A publishes the next key and port (annotations). Every peer B switches its peer for
         A to the new key in one step (adding the new peer takes A's CIDRs from the old one),
         then starts a handshake with it at once. From then on B encrypts to, and accepts
         from, A's new device only. A does not know when B switches, so it sends each packet
         for B through both devices (eBPF clone): B accepts exactly one copy, the one from the
         key it currently holds. (The steering comes first, and the next key goes out only
         once it has been in place for a moment: ``KeyRotator.settles_at``.) A handshake
         from B on device t after the switch began is B's confirmation; from then on A
         sends to B through device t only.
IDLE     Every peer has confirmed: slot t is the node's slot. A steers everything into
         device t, publishes the new key as its key (peers already use it: no change for
         them), deletes the old device and destroys the old private key.
ROLLBACK Peers did not all confirm within the timeout (a node's agent is down, a firewall
         blocks the second port). A withdraws the next key; peers that had switched move back
         (confirmed by a handshake on the old device, or never switched at all); then A
         returns to IDLE on the old slot, deleting device t and its key. The node is exactly
         as before.

In IDLE a device or key of the other slot is a leftover (the rotation that made it ended,
or was cut short by a crash before it was published) and is removed.

Every state is persisted before the actions that depend on it, and every action is
idempotent, so an agent killed at any point resumes where it was: wireguard-go keeps both
devices (and their handshake times, which carry the confirmations) while the agent is down.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from wgmanager.core.keys import PublicKey
from wgmanager.core.mesh import Route
from wgmanager.core.model import DeviceState, Node

SLOTS = (0, 1)


class Phase(enum.StrEnum):
    PREPARE = "prepare"
    SWITCH = "switch"
    ROLLBACK = "rollback"


class StateError(ValueError):
    """The persisted rotation state cannot be read back."""


@dataclass(frozen=True, slots=True)
class Rotation:
    request: str  # the request id (from `wgmanager rotate-keys`, or "schedule-<time>")
    from_slot: int
    to_slot: int
    phase: Phase
    started: float  # Unix time the phase began: handshakes after it count as confirmations
    began: float  # Unix time the rotation began (for its total duration)
    reason: str = ""  # why a rollback happened


@dataclass(frozen=True, slots=True)
class RotationState:
    """What the node persists (state dir, rotation.json) across agent restarts."""

    slot: int = 0  # the slot whose key is the node's published key
    rotation: Rotation | None = None
    last_request: str = ""  # the last request that was carried out (or rolled back)
    last_result: str = ""  # "completed" or "rolled back: <reason>"
    last_finished: float = 0.0

    @property
    def phase(self) -> str:
        return self.rotation.phase.value if self.rotation else "idle"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RotationState:
        try:
            raw = json.loads(text)
            rot = raw.get("rotation")
            rotation = None if rot is None else Rotation(
                request=str(rot["request"]), from_slot=_slot(rot["from_slot"]),
                to_slot=_slot(rot["to_slot"]), phase=Phase(rot["phase"]),
                started=float(rot["started"]), began=float(rot.get("began", rot["started"])),
                reason=str(rot.get("reason", "")))
            if rotation is not None and rotation.from_slot == rotation.to_slot:
                raise ValueError("from_slot equals to_slot")
            return cls(slot=_slot(raw.get("slot", 0)), rotation=rotation,
                       last_request=str(raw.get("last_request", "")),
                       last_result=str(raw.get("last_result", "")),
                       last_finished=float(raw.get("last_finished", 0.0)))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise StateError(f"rotation state is unreadable ({type(e).__name__}: {e})") from None


def _slot(value: Any) -> int:
    if value not in SLOTS or isinstance(value, bool):
        raise ValueError(f"slot {value!r} is not 0 or 1")
    return int(value)


# -- transitions --------------------------------------------------------------------------

def begin(state: RotationState, request: str, now: float) -> RotationState:
    """IDLE -> PREPARE for a new request; anything else is left as it is."""
    if state.rotation is not None or not request or request == state.last_request:
        return state
    to = 1 - state.slot
    return replace(state, rotation=Rotation(request, state.slot, to, Phase.PREPARE, now, now))


def prepared(state: RotationState, now: float) -> RotationState:
    """PREPARE -> SWITCH: device t is ready; the next key may now be published."""
    rot = _require(state, Phase.PREPARE)
    return replace(state, rotation=replace(rot, phase=Phase.SWITCH, started=now))


def finish(state: RotationState, now: float) -> RotationState:
    """SWITCH -> IDLE on the new slot: every peer uses the new key."""
    rot = _require(state, Phase.SWITCH)
    return RotationState(slot=rot.to_slot, rotation=None, last_request=rot.request,
                         last_result="completed", last_finished=now)


def roll_back(state: RotationState, now: float, reason: str) -> RotationState:
    """PREPARE or SWITCH -> ROLLBACK."""
    rot = state.rotation
    if rot is None or rot.phase is Phase.ROLLBACK:
        raise ValueError(f"cannot roll back from {state.phase}")
    return replace(state, rotation=replace(rot, phase=Phase.ROLLBACK, started=now,
                                           reason=reason))


def rolled_back(state: RotationState, now: float) -> RotationState:
    """ROLLBACK -> IDLE on the old slot."""
    rot = _require(state, Phase.ROLLBACK)
    return RotationState(slot=rot.from_slot, rotation=None, last_request=rot.request,
                         last_result=f"rolled back: {rot.reason}", last_finished=now)


def _require(state: RotationState, phase: Phase) -> Rotation:
    if state.rotation is None or state.rotation.phase is not phase:
        raise ValueError(f"expected phase {phase.value}, state is {state.phase}")
    return state.rotation


# -- what each state means for devices, annotations and the datapath -----------------------

@dataclass(frozen=True, slots=True)
class Layout:
    """Which slots need a device, and which slot the datapath's "current" device is."""

    current: int
    alt: int | None  # the second live device, if any

    @property
    def slots(self) -> tuple[int, ...]:
        return (self.current,) if self.alt is None else (self.current, self.alt)


def layout(state: RotationState) -> Layout:
    rot = state.rotation
    if rot is None:
        return Layout(state.slot, None)
    return Layout(rot.from_slot, rot.to_slot)


@dataclass(frozen=True, slots=True)
class Published:
    """The key and port annotations the node's own Node object should carry."""

    slot: int
    next_slot: int | None


def published(state: RotationState) -> Published:
    rot = state.rotation
    if rot is not None and rot.phase is Phase.SWITCH:
        return Published(rot.from_slot, rot.to_slot)
    return Published(state.slot, None)


def confirmed(state: RotationState, remote: Iterable[Node], current: DeviceState,
              alt: DeviceState | None) -> frozenset[str]:
    """Remote nodes that have moved to the side the phase is moving them to.

    SWITCH: a handshake on the new device since the phase began (a peer can only complete
    one once it holds the new key, which it only learns by switching). ROLLBACK: a handshake
    on the old device since the rollback began, or no handshake on the new device at all (it
    never switched, so it never left).
    """
    rot = state.rotation
    if rot is None or rot.phase not in (Phase.SWITCH, Phase.ROLLBACK) or alt is None:
        return frozenset()
    out: set[str] = set()
    for node in remote:
        on_alt = _handshake(alt, node)
        if rot.phase is Phase.SWITCH:
            if on_alt is not None and on_alt >= rot.started:
                out.add(node.name)
        else:
            on_cur = _handshake(current, node)
            if on_alt is None or (on_cur is not None and on_cur >= rot.started):
                out.add(node.name)
    return frozenset(out)


def stale_sessions(state: RotationState, remote: Iterable[Node], current: DeviceState,
                   alt: DeviceState | None) -> tuple[PublicKey, ...]:
    """Peers whose session on the old device died when they switched to the new key.

    A peer that switched dropped its old entry for us, sessions included. When a ROLLBACK
    sends it back, it starts afresh, but our old device still holds the session from before
    the switch and would encrypt with it: until the peer's new handshake reaches us, every
    copy we send it is lost (the new device's copy too, as the peer has just dropped that
    key). A device with no session queues the packets and starts a handshake instead. So in
    ROLLBACK such a peer is reset on the old device before the next key is withdrawn: its
    handshake there is older than the one on the new device. After the reset (no handshake)
    or once the peer is back (a newer one), it is not stale any more.
    """
    rot = state.rotation
    if rot is None or rot.phase is not Phase.ROLLBACK or alt is None:
        return ()
    out: list[PublicKey] = []
    for node in remote:
        on_cur, on_alt = _handshake(current, node), _handshake(alt, node)
        if on_cur is not None and on_alt is not None and on_cur < on_alt:
            out.append(node.public_key)
    return tuple(out)


def _handshake(device: DeviceState, node: Node) -> float | None:
    peer = device.peers.get(node.public_key)
    return peer.last_handshake if peer is not None else None


def routes(state: RotationState, remote: Iterable[Node],
           confirmed_nodes: frozenset[str]) -> dict[str, Route]:
    """Per remote node, which device(s) carry its traffic (see the module docstring)."""
    rot = state.rotation
    if rot is None or rot.phase is Phase.PREPARE:
        return {}
    moved = Route.ALT if rot.phase is Phase.SWITCH else Route.CURRENT
    return {n.name: (moved if n.name in confirmed_nodes else Route.BOTH) for n in remote}


@dataclass(frozen=True, slots=True)
class Progress:
    peers: int
    confirmed: int
    waiting: tuple[str, ...]  # node names, sorted


def progress(remote: Iterable[Node], confirmed_nodes: frozenset[str]) -> Progress:
    names = sorted(n.name for n in remote)
    waiting = tuple(n for n in names if n not in confirmed_nodes)
    return Progress(len(names), len(names) - len(waiting), waiting)


def step(state: RotationState, prog: Progress, now: float, timeout: float) -> RotationState:
    """The transition a SWITCH or ROLLBACK takes now, if any.

    SWITCH ends once every peer confirmed (IDLE on the new slot), or rolls back once the
    timeout passed. ROLLBACK ends once every peer is back, or after the timeout: peers that
    still hold the new key then are ones whose agent is down, and they follow the published
    key when it returns.
    """
    rot = state.rotation
    if rot is None:
        return state
    late = now - rot.started > timeout
    if rot.phase is Phase.SWITCH:
        if not prog.waiting:
            return finish(state, now)
        if late:
            names = ", ".join(prog.waiting[:5]) + (" ..." if len(prog.waiting) > 5 else "")
            return roll_back(state, now, f"{len(prog.waiting)} peer(s) did not switch to "
                             f"the new key within {timeout:.0f}s ({names})")
    elif rot.phase is Phase.ROLLBACK and (not prog.waiting or late):
        return rolled_back(state, now)
    elif rot.phase is Phase.PREPARE and late:
        return roll_back(state, now, f"the second device was not ready within {timeout:.0f}s")
    return state


# -- the status annotation the CLI follows ------------------------------------------------

def status_annotation(state: RotationState, prog: Progress | None) -> str:
    """A small JSON document for `wgmanager rotate-keys` to follow (never secret)."""
    rot = state.rotation
    doc: dict[str, Any] = {"phase": state.phase}
    if rot is not None:
        doc["request"] = rot.request
        if prog is not None and rot.phase in (Phase.SWITCH, Phase.ROLLBACK):
            doc.update(peers=prog.peers, confirmed=prog.confirmed)
        if rot.reason:
            doc["reason"] = rot.reason
    else:
        doc["request"] = state.last_request
        doc["result"] = state.last_result
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class RotationStatus:
    """The status annotation, parsed (the CLI's view of one node)."""

    phase: str
    request: str
    result: str = ""
    peers: int = 0
    confirmed: int = 0
    reason: str = ""

    @classmethod
    def parse(cls, text: str | None) -> RotationStatus | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            return cls(phase=str(raw["phase"]), request=str(raw.get("request", "")),
                       result=str(raw.get("result", "")), peers=int(raw.get("peers", 0)),
                       confirmed=int(raw.get("confirmed", 0)),
                       reason=str(raw.get("reason", "")))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


# -- schedule ---------------------------------------------------------------------------

SPREAD = 0.2  # scheduled rotations spread over the last 20% of the interval


def schedule_due(node_name: str, key_created: float, interval: float, now: float) -> bool:
    """Whether a scheduled rotation is due for this node.

    Each node gets a fixed offset in [0, SPREAD * interval) from a hash of its name, so the
    keys of a cluster created in one go (same age everywhere) do not all rotate at once.
    """
    if interval <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(node_name.encode()).digest()[:8], "big") / 2.0**64
    return now >= key_created + interval * (1.0 - SPREAD * h)


def others_rotating(remote: Mapping[str, Node]) -> tuple[str, ...]:
    """Remote nodes that are mid-rotation (a scheduled rotation waits for them)."""
    return tuple(sorted(n for n, node in remote.items() if node.rotating))
