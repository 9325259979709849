"""The agent's rotation driver (wgmanager.agent.rotation) over a real key store and a stand-in
reconciler: when the next key may be published, across consecutive rotations."""

from __future__ import annotations

from pathlib import Path

from wgmanager.agent.rotation import KeyRotator
from wgmanager.config import NodeSettings, RotationSettings
from wgmanager.core.keys import PrivateKey
from wgmanager.core.model import NodeSpec
from wgmanager.core.rotation import Progress, RotationState, RotationStatus
from wgmanager.errors import KeyStoreError
from wgmanager.keystore import KeyStore, slot_key
from wgmanager.kube.translate import NEXT_KEY_ANNOTATION, ROTATION_STATUS_ANNOTATION


class _Device:
    def device_exists(self) -> bool:
        return False


class FakeReconciler:
    """What KeyRotator uses of NodeReconciler: keys per slot (real files), no devices."""

    def __init__(self, state_dir: Path) -> None:
        self.settings = NodeSettings(node_name="n1", state_dir=state_dir)
        self.keystore = KeyStore(state_dir)

    def key_for(self, slot: int) -> PrivateKey:
        return self.keystore.load_or_create(slot_key(slot)).key

    def backend_for(self, slot: int) -> _Device:
        return _Device()

    def retire_slot(self, slot: int) -> list[str]:
        self.keystore.destroy(slot_key(slot))
        return []


def me(request: str) -> NodeSpec:
    return NodeSpec("n1", ("10.0.0.1",), ("10.244.1.0/24",), rotation_request=request)


WAITING = Progress(peers=1, confirmed=0, waiting=("n2",))
DONE = Progress(peers=1, confirmed=1, waiting=())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTLE = 0.1


def rotate_once(rot: KeyRotator, request: str, clock: Clock) -> None:
    """One rotation, reconcile by reconcile, checking when the next key goes out."""
    rot.before_reconcile(me(request), [])
    assert rot.after_reconcile(None) is None  # PREPARE -> SWITCH persisted
    # SWITCH is on disk, but no reconcile has applied its clone-to-both steering yet: the
    # next key must not be published (peers would switch before we send to the new device).
    assert NEXT_KEY_ANNOTATION not in rot.annotations()
    assert rot.settles_at() is None
    assert rot.after_reconcile(WAITING) is None  # the steering reconcile
    # ... and not until the steering has been in place for `settle`: packets the old
    # device took alone just before must reach the peers before they switch.
    steered = clock.now
    assert rot.settles_at() == steered + SETTLE
    assert NEXT_KEY_ANNOTATION not in rot.annotations()
    assert rot.after_reconcile(WAITING) is None  # a later pass does not restart the wait
    clock.now = steered + SETTLE / 2
    assert NEXT_KEY_ANNOTATION not in rot.annotations()
    clock.now = steered + SETTLE
    assert rot.settles_at() is None
    assert rot.annotations()[NEXT_KEY_ANNOTATION] is not None
    outcome = rot.after_reconcile(DONE)
    assert outcome is not None and outcome.completed
    assert rot.annotations()[NEXT_KEY_ANNOTATION] is None


def test_the_next_key_waits_for_the_steering_in_every_rotation_of_a_process(
        tmp_path: Path) -> None:
    """A second rotation in the same agent process published its next key before the
    steering reconcile (the steered phase was remembered without its request): peers
    switched up to a second early and the rotating node lost their replies."""
    clock = Clock()
    rot = KeyRotator(FakeReconciler(tmp_path), RotationSettings(timeout=60, settle=SETTLE),  # type: ignore[arg-type]
                     monotonic=clock)
    rotate_once(rot, "r1", clock)
    rotate_once(rot, "r2", clock)
    rotate_once(rot, "r3", clock)


class FullDisk(KeyStore):
    """A key store whose state writes fail the way a full disk makes them fail."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.full = True

    def save_rotation(self, state: RotationState) -> None:
        if self.full:
            raise KeyStoreError(f"could not write {self.state_dir}/rotation.json: No space left "
                                "on device; free space on the node")
        super().save_rotation(state)


def test_a_request_that_cannot_start_fails_with_the_reason_and_never_resumes_unasked(
        tmp_path: Path) -> None:
    """Audit: with a full disk the CLI said "did not pick up the request", and the
    rotation later ran by itself once space was back."""
    fake = FakeReconciler(tmp_path)
    fake.keystore = FullDisk(tmp_path)
    rot = KeyRotator(fake, RotationSettings(timeout=60))  # type: ignore[arg-type]
    rot.before_reconcile(me("r1"), [])
    assert not rot.active
    status = RotationStatus.parse(rot.annotations()[ROTATION_STATUS_ANNOTATION])
    assert status is not None and status.request == "r1" and status.phase == "idle"
    assert status.result.startswith("failed: ") and "No space left on device" in status.result
    assert "\n" not in status.result
    fake.keystore.full = False  # space is back: the same request must not start by itself
    rot.before_reconcile(me("r1"), [])
    assert not rot.active
    rot.before_reconcile(me("r2"), [])  # a new request does
    assert rot.active and rot.state.rotation is not None
    assert rot.state.rotation.request == "r2"
