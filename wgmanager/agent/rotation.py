"""The agent's side of key rotation: persists the state machine and drives it.

The protocol and its states are in ``wgmanager.core.rotation``; this module does the I/O
around them, in the order that keeps every crash recoverable:

- a new state is written to disk (atomically) before anything that depends on it happens;
- the next key is published only after a reconcile in SWITCH has put the clone-to-both
  steering in place, so no peer can switch before we send through the new device;
- a finished or rolled-back rotation is persisted as IDLE first, then reconciled (nothing
  routes to the retired slot any more), then the retired device and key are removed. In
  IDLE a device or key of the other slot is always a leftover and is removed the same way.

The agent calls ``before_reconcile`` and ``after_reconcile`` around each reconcile and
publishes ``annotations()`` whenever its Node differs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from wgmanager.config import RotationSettings
from wgmanager.core.model import Node, NodeSpec
from wgmanager.core.rotation import (
    Phase,
    Progress,
    RotationState,
    begin,
    others_rotating,
    prepared,
    published,
    schedule_due,
    status_annotation,
    step,
)
from wgmanager.errors import WgmError
from wgmanager.keystore import slot_key
from wgmanager.kube.translate import (
    NEXT_KEY_ANNOTATION,
    NEXT_PORT_ANNOTATION,
    PORT_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    ROTATION_STATUS_ANNOTATION,
)
from wgmanager.reconciler import NodeReconciler
from wgmanager.wireguard.backend import WireGuardBackend

log = logging.getLogger(__name__)

# The protocol's steps between two durable writes, in order: an agent that dies at any of
# them must finish or roll back the rotation after a restart with no traffic lost. Each is
# passed to ``KeyRotator.checkpoint``; the crash tests replace that method with a SIGKILL
# (tests/e2e/crash_agent.py), production never crashes on purpose.
CHECKPOINTS = (
    "prepare-persisted",  # PREPARE on disk; no key or device yet
    "prepare-device",  # second device up with the new key; SWITCH not yet on disk
    "switch-persisted",  # SWITCH on disk; steering not yet cloned, next key not published
    "switch-published",  # next key published: peers are switching
    "finish-persisted",  # IDLE on the new slot on disk; steering still on both devices
    "finish-reconciled",  # steering on the new device only; old device and key still there
    "rollback-persisted",  # ROLLBACK on disk; next key still published
)


SCHEDULE_RETRY = 600.0  # seconds before a refused scheduled rotation is tried again
RETIRE_MAX_WAIT = 5.0  # seconds after a rotation ends: the old device goes, received or not


@dataclass(frozen=True, slots=True)
class Outcome:
    """A rotation that just ended, for the agent's Events and metrics."""

    request: str
    completed: bool
    detail: str  # the new public key, or the rollback reason
    seconds: float
    peers: int


class KeyRotator:
    def __init__(self, reconciler: NodeReconciler, settings: RotationSettings, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.reconciler = reconciler
        self.settings = settings
        self.store = reconciler.keystore
        self.state = self.store.load_rotation()
        self._clock = clock
        self._monotonic = monotonic
        # The rotation (request, phase: SWITCH or ROLLBACK) whose steering a reconcile in
        # this process applied: only then may the next key be published (SWITCH) or
        # withdrawn (ROLLBACK). The request is part of it: a phase alone would still match
        # after the previous rotation in this process, and the next key would go out before
        # the clone-to-both steering (peers switched up to a second early, losing packets).
        self._steered: tuple[str, Phase] | None = None
        self._steered_at = 0.0  # when (monotonic) that steering was applied
        self.progress: Progress | None = None
        # While the retired slot's device still receives: (its rx bytes, since when).
        self._draining: tuple[int, float] | None = None
        # The last request that could not even start (its state could not be written, e.g.
        # a full disk), with the reason: answered as failed and never retried unasked.
        self._refused: tuple[str, str] | None = None
        self._schedule_paused_until = 0.0

    @property
    def active(self) -> bool:
        """A rotation runs, or its old device waits to be retired: poll, don't sleep."""
        return self.state.rotation is not None or self._draining is not None

    @property
    def steered(self) -> tuple[str, Phase] | None:
        """The rotation phase whose steering this process has applied (``annotations``)."""
        return self._steered

    def _steered_now(self) -> bool:
        rot = self.state.rotation
        return rot is not None and self._steered == (rot.request, rot.phase)

    def settles_at(self) -> float | None:
        """When (monotonic) the steering of this phase has been in place for ``settle``,
        while that is still to come: only then does the next key go out (or, in a
        rollback, away). None when nothing waits for it.

        Why: a peer drops what our old device sent it from the moment it switches to our
        next key, and only packets sent after the steering have a copy in the new device
        that it accepts. So every packet our old device took alone, just before the
        steering, must have crossed both nodes' wireguard-go before the peer switches.
        The peer switches some 20-30 ms after the next key goes out; on a loaded node a
        packet can spend longer than that in wireguard-go (the rotation e2e loop lost 1-17
        echoes per failing run at load 4-12 without this wait). The copies sent during
        the wait reach the peer twice: the wait costs ``settle`` of duplicates per peer.
        """
        rot = self.state.rotation
        if rot is None or rot.phase is Phase.PREPARE or not self._steered_now():
            return None
        at = self._steered_at + self.settings.settle
        return at if self._monotonic() < at else None

    # -- around each reconcile --------------------------------------------------------

    def before_reconcile(self, me: NodeSpec | None, remote: Iterable[Node]) -> RotationState:
        """Starts a rotation if one was requested (or is due); returns the state to apply."""
        if self.state.rotation is None:
            request = self._request(me, {n.name: n for n in remote})
            if request:
                try:
                    # A fresh key for every rotation: a leftover file of the slot goes.
                    self.reconciler.retire_slot(1 - self.state.slot)
                    self._save(begin(self.state, request, self._clock()))
                except WgmError as e:
                    self._refuse(request, str(e))
                    return self.state
                self._refused = None
                log.info("key rotation started", extra={"request": request})
                self.checkpoint("prepare-persisted")
        return self.state

    def _refuse(self, request: str, reason: str) -> None:
        """A request that cannot start: say why (status annotation, one line for the CLI)
        and do not try it again by ourselves; a new request, or for the schedule ten
        minutes, is the next attempt."""
        self._refused = (request, reason)
        if request.startswith("schedule-"):
            self._schedule_paused_until = self._clock() + SCHEDULE_RETRY
        log.error("key rotation refused", extra={"request": request, "error": reason})

    def after_reconcile(self, progress: Progress | None) -> Outcome | None:
        """Advances the state machine after a successful reconcile of ``self.state``."""
        self.progress = progress
        rot = self.state.rotation
        if rot is None:
            self._retire_leftovers()
            return None
        now = self._clock()
        if rot.phase is Phase.PREPARE:
            self.checkpoint("prepare-device")
            self._save(prepared(self.state, now))
            self.checkpoint("switch-persisted")
            return None
        if self._steered != (rot.request, rot.phase):
            self._steered = (rot.request, rot.phase)  # this reconcile applied its steering
            self._steered_at = self._monotonic()
        if progress is None:
            return None
        new = step(self.state, progress, now, self.settings.timeout)
        if new == self.state:
            return None
        self._save(new)
        if new.rotation is not None:  # SWITCH -> ROLLBACK
            log.warning("key rotation rolling back", extra={"reason": new.rotation.reason})
            self.checkpoint("rollback-persisted")
            return None
        completed = new.slot != rot.from_slot
        self.checkpoint("finish-persisted")
        outcome = Outcome(rot.request, completed,
                          self.reconciler.key_for(new.slot).public_key.base64()
                          if completed else rot.reason, now - rot.began, progress.peers)
        log.info("key rotation completed" if completed else "key rotation rolled back",
                 extra={"request": rot.request, "seconds": round(outcome.seconds, 2),
                        "peers": progress.peers, "public_key": outcome.detail if completed
                        else None})
        return outcome

    def _retire_leftovers(self) -> None:
        other = 1 - self.state.slot
        backend = self.reconciler.backend_for(other)
        exists = backend.device_exists()
        if not exists and not self.store.exists(slot_key(other)):
            self._draining = None
            return
        if exists and not self._drained(backend):
            return
        self._draining = None
        self.checkpoint("finish-reconciled")
        for what in self.reconciler.retire_slot(other):
            log.info("retired the previous key slot", extra={"done": what})

    def _drained(self, backend: WireGuardBackend) -> bool:
        """Whether the old device has stopped receiving (then it may be deleted).

        A peer that rotates at the same time still sends copies to our old device until it
        notices our confirmation on its next poll; deleting the device under them made the
        node answer with ICMP port unreachable. So the device goes once its received bytes
        have not moved for a poll interval, or RETIRE_MAX_WAIT after the rotation ended.
        """
        rx = sum(p.rx_bytes for p in backend.read().peers.values())
        now = self._clock()
        if now - self.state.last_finished >= RETIRE_MAX_WAIT:
            return True
        if self._draining is None or self._draining[0] != rx:
            self._draining = (rx, now)
            return False
        return now - self._draining[1] >= self.settings.poll_interval

    # -- what the Node should say -----------------------------------------------------

    def annotations(self) -> dict[str, str | None]:
        """Our key/port annotations (and the status `rotate-keys` follows)."""
        wg = self.reconciler.settings.wireguard
        pub = published(self.state)
        values: dict[str, str | None] = {
            PUBLIC_KEY_ANNOTATION: self.reconciler.key_for(pub.slot).public_key.base64(),
            PORT_ANNOTATION: str(wg.port_for(pub.slot)),
            ROTATION_STATUS_ANNOTATION: status_annotation(self._answered(), self.progress),
        }
        rot = self.state.rotation
        if rot is not None and rot.phase is not Phase.PREPARE and (
                not self._steered_now() or self.settles_at() is not None):
            # SWITCH or ROLLBACK whose steering (copies into both devices) this process has
            # not applied yet (it just started, or the phase just began), or applied less
            # than ``settle`` ago: the next key is left as the Node has it. Publishing it
            # could let peers switch before we send through the new device; withdrawing it
            # could send peers back while we still send them only the new device's copy.
            return values
        if pub.next_slot is None:
            values[NEXT_KEY_ANNOTATION] = values[NEXT_PORT_ANNOTATION] = None
        else:
            values[NEXT_KEY_ANNOTATION] = (
                self.reconciler.key_for(pub.next_slot).public_key.base64())
            values[NEXT_PORT_ANNOTATION] = str(wg.port_for(pub.next_slot))
        return values

    def _answered(self) -> RotationState:
        """The state the status annotation reports: a refused request as failed."""
        if self._refused is None or self.state.rotation is not None:
            return self.state
        request, reason = self._refused
        return replace(self.state, last_request=request, last_result=f"failed: {reason}")

    def published(self) -> None:
        """The annotations were written."""
        rot = self.state.rotation
        if (rot is not None and rot.phase is Phase.SWITCH and self._steered_now()
                and self.settles_at() is None):
            self.checkpoint("switch-published")

    # -- internals --------------------------------------------------------------------

    def _request(self, me: NodeSpec | None, remote: dict[str, Node]) -> str:
        asked = (me.rotation_request or "").strip() if me is not None else ""
        refused = self._refused[0] if self._refused else ""
        if asked and asked not in (self.state.last_request, refused):
            return asked
        interval = self.settings.interval
        if interval > 0 and self._clock() >= self._schedule_paused_until:
            created = self.store.mtime(slot_key(self.state.slot))
            now = self._clock()
            if created is not None and schedule_due(self.reconciler.settings.node_name,
                                                    created, interval, now):
                busy = others_rotating(remote)
                if busy:
                    log.debug("scheduled key rotation waits", extra={"rotating": busy[0]})
                    return ""
                return f"schedule-{int(now)}"
        return ""

    def _save(self, state: RotationState) -> None:
        self.store.save_rotation(state)
        self.state = state

    def checkpoint(self, point: str) -> None:
        """The rotation reached ``point`` (one of CHECKPOINTS): a hook for fault injection."""
        log.debug("key rotation checkpoint", extra={"point": point})
