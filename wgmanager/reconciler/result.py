"""What one reconcile pass did: ``ReconcileResult``, and the kinds of pass.

The agent reports these (metrics by kind, the log) and drives key rotation from
``rotation``; ``wgmanager apply`` prints a summary of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wgmanager.core.mesh import Mesh
from wgmanager.core.model import DeviceState
from wgmanager.core.plan import MapPlan, PeerOp
from wgmanager.core.rotation import Progress

FULL, CHANGES, TIMERS = "full", "changes", "timers"  # ReconcileResult.kind

@dataclass(frozen=True, slots=True)
class ReconcileResult:
    mesh: Mesh
    peer_ops: tuple[PeerOp, ...]
    map_plan: MapPlan
    device: DeviceState
    attached: tuple[str, ...] = field(default=())
    seconds: float = 0.0
    alt_device: DeviceState | None = None  # the second device while rotating the key
    rotation: Progress | None = None  # peers confirmed so far (SWITCH and ROLLBACK)
    # What the pass covered: FULL (everything read and planned), CHANGES (an incremental
    # pass for changed nodes or new pod veths) or TIMERS (an incremental pass with no
    # change: a replaced peer's removal or a first-handshake check fell due).
    kind: str = FULL

    @property
    def full(self) -> bool:
        """Whether every node and the live state were read and planned."""
        return self.kind == FULL
