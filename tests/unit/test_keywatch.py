"""Keys replaced outside the rotation protocol: noticed, counted, and a flapping node
quarantined (wgmanager.core.keywatch)."""

from __future__ import annotations

from wgmanager.core.keys import KEY_LEN, PublicKey
from wgmanager.core.keywatch import FLAP_LIMIT, FLAP_WINDOW, KeyWatch, observe, quarantined
from wgmanager.core.mesh import QUARANTINE_REASON, compute_mesh
from wgmanager.core.model import MeshConfig, NodeSpec


def key(n: int) -> str:
    return PublicKey(bytes([n]) * KEY_LEN).base64()


def spec(name: str, k: int, nxt: int | None = None) -> NodeSpec:
    return NodeSpec(name, ("10.0.0.2",), ("10.244.2.0/24",), key(k),
                    next_public_key=key(nxt) if nxt else None)


LOCAL = NodeSpec("me", ("10.0.0.1",), ("10.244.1.0/24",))


def run(steps: list[list[NodeSpec]], start: float = 0.0,
        step: float = 1.0) -> tuple[KeyWatch, list[tuple[str, ...]]]:
    watch, seen = KeyWatch(), []
    for i, specs in enumerate(steps):
        watch, jumped = observe(watch, [LOCAL, *specs], local="me", now=start + i * step)
        seen.append(jumped)
    return watch, seen


def test_the_rotation_protocol_is_never_a_jump() -> None:
    # publish next (7), switch (7 is the key), then another rotation that rolls back
    _, seen = run([[spec("b", 2)], [spec("b", 2, 7)], [spec("b", 7)], [spec("b", 7, 9)],
                   [spec("b", 7)]])
    assert all(j == () for j in seen)


def test_a_key_written_over_another_is_a_jump_each_time() -> None:
    _, seen = run([[spec("b", 2)], [spec("b", 66)], [spec("b", 2)]])
    assert seen == [(), ("b",), ("b",)]


def test_a_forged_next_key_alone_is_not_a_jump_but_its_removal_overwrite_is() -> None:
    """A forged next key keeps the node's key (the protocol's shape); the victim's agent
    sees it on its own Node and writes its own value back (agent side)."""
    _, seen = run([[spec("b", 2)], [spec("b", 2, 66)], [spec("b", 2)]])
    assert seen == [(), (), ()]


def test_a_flapping_node_is_quarantined_then_released() -> None:
    steps = [[spec("b", 2 if i % 2 == 0 else 66)] for i in range(FLAP_LIMIT + 1)]
    watch, _ = run(steps)
    assert quarantined(watch, now=FLAP_LIMIT) == {"b"}
    later = FLAP_LIMIT + FLAP_WINDOW
    watch, _ = observe(watch, [LOCAL, spec("b", 2)], local="me", now=later)
    assert quarantined(watch, now=later) == frozenset()


def test_a_deleted_node_starts_afresh_and_the_local_node_is_never_watched() -> None:
    watch, _ = run([[spec("b", 2)], []])
    watch, jumped = observe(watch, [LOCAL, spec("b", 66)], local="me", now=5)
    assert jumped == ()
    own = NodeSpec("me", ("10.0.0.1",), ("10.244.1.0/24",), key(3))
    watch, _ = observe(watch, [own], local="me", now=6)
    watch, jumped = observe(watch, [NodeSpec("me", ("10.0.0.1",), ("10.244.1.0/24",), key(4))],
                            local="me", now=7)
    assert jumped == ()


def test_a_quarantined_node_gets_no_peer_and_its_cidrs_fail_closed() -> None:
    mesh = compute_mesh(local_name="me", local_key=PublicKey(bytes([1]) * KEY_LEN),
                        specs=[LOCAL, spec("b", 2)], config=MeshConfig(),
                        quarantined=frozenset({"b"}))
    assert "b" not in mesh.nodes
    assert mesh.rejected["b"].reason == QUARANTINE_REASON
    assert [str(c) for c in mesh.rejected["b"].pod_cidrs] == ["10.244.2.0/24"]
