"""The agent's rotation driver (wgmanager.agent.rotation) over a real key store and a stand-in
reconciler: when the next key may be published, across consecutive rotations."""

from __future__ import annotations

from pathlib import Path

from wgmanager.agent.rotation import KeyRotator
from wgmanager.config import NodeSettings, RotationSettings
from wgmanager.core.keys import PrivateKey
from wgmanager.core.model import NodeSpec
from wgmanager.core.rotation import Progress
from wgmanager.keystore import KeyStore, slot_key
from wgmanager.kube.translate import NEXT_KEY_ANNOTATION


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


def rotate_once(rot: KeyRotator, request: str) -> None:
    """One rotation, reconcile by reconcile, checking when the next key goes out."""
    rot.before_reconcile(me(request), [])
    assert rot.after_reconcile(None) is None  # PREPARE -> SWITCH persisted
    # SWITCH is on disk, but no reconcile has applied its clone-to-both steering yet: the
    # next key must not be published (peers would switch before we send to the new device).
    assert NEXT_KEY_ANNOTATION not in rot.annotations()
    assert rot.after_reconcile(WAITING) is None  # the steering reconcile
    assert rot.annotations()[NEXT_KEY_ANNOTATION] is not None
    outcome = rot.after_reconcile(DONE)
    assert outcome is not None and outcome.completed
    assert rot.annotations()[NEXT_KEY_ANNOTATION] is None


def test_the_next_key_waits_for_the_steering_in_every_rotation_of_a_process(
        tmp_path: Path) -> None:
    """A second rotation in the same agent process published its next key before the
    steering reconcile (the steered phase was remembered without its request): peers
    switched up to a second early and the rotating node lost their replies."""
    rot = KeyRotator(FakeReconciler(tmp_path), RotationSettings(timeout=60))  # type: ignore[arg-type]
    rotate_once(rot, "r1")
    rotate_once(rot, "r2")
    rotate_once(rot, "r3")
