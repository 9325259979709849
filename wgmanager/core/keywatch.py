"""Noticing what per-node identity cannot prevent yet: keys that change outside the protocol.

A node's live keys are its published key and, while it rotates, its next key. The rotation
protocol always changes them with an overlap (a next key is added, then the old key goes),
so a change with no key in common is someone writing another key over the node's: a second
writer, a stolen credential, or a node that lost its key file. Every agent sees it, warns
and counts it, and a node whose keys jump like that ``FLAP_LIMIT`` times within
``FLAP_WINDOW`` seconds is quarantined: it gets no peer (traffic to it is dropped) until
fewer than ``FLAP_LIMIT`` of its jumps fall within the last ``FLAP_WINDOW``. A fight over
a node's key then costs that node its traffic, but never lets the other writer hold the
key most of the time and read the node's pods' packets. Pure: the caller passes the nodes
and the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from wgmanager.core.keys import InvalidKey, PublicKey
from wgmanager.core.model import NodeSpec

FLAP_LIMIT = 3
FLAP_WINDOW = 600.0


@dataclass(frozen=True, slots=True)
class KeyWatch:
    keys: Mapping[str, frozenset[PublicKey]] = field(default_factory=dict)
    jumps: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # times, in window


def live_keys(spec: NodeSpec) -> frozenset[PublicKey]:
    """The valid keys a node publishes (its key and, while rotating, its next key)."""
    out = set()
    for text in (spec.public_key, spec.next_public_key):
        if text and text.strip():
            try:
                out.add(PublicKey.from_base64(text))
            except InvalidKey:
                continue  # validated (and reported) by the mesh
    return frozenset(out)


def observe(watch: KeyWatch, specs: Iterable[NodeSpec], *, local: str,
            now: float) -> tuple[KeyWatch, tuple[str, ...]]:
    """The new state, and the nodes whose keys jumped (changed with none in common) now."""
    current = {spec.name: spec for spec in specs}
    gone: dict[str, NodeSpec | None] = {n: None for n in watch.keys if n not in current}
    return observe_changed(watch, {**current, **gone}, local=local, now=now)


def observe_changed(watch: KeyWatch, changed: Mapping[str, NodeSpec | None], *, local: str,
                    now: float) -> tuple[KeyWatch, tuple[str, ...]]:
    """``observe`` for some nodes only (None: deleted); the others are as observed before.
    The agent's event passes use it: work per changed node, not per node."""
    keys = dict(watch.keys)
    jumps = {n: tuple(t for t in ts if now - t < FLAP_WINDOW) for n, ts in watch.jumps.items()}
    jumped = []
    for name, spec in changed.items():
        if name == local:
            continue
        if spec is None:  # a deleted node: a new one of that name starts afresh
            keys.pop(name, None)
            jumps.pop(name, None)
            continue
        new = live_keys(spec)
        old = keys.get(name)
        if new:
            if old and not (old & new):
                jumped.append(name)
                jumps[name] = (*jumps.get(name, ()), now)
            keys[name] = new
    return KeyWatch(keys, {n: ts for n, ts in jumps.items() if ts}), tuple(sorted(jumped))


def quarantined(watch: KeyWatch, now: float) -> frozenset[str]:
    """Nodes whose keys jumped FLAP_LIMIT times within the last FLAP_WINDOW seconds."""
    return frozenset(n for n, ts in watch.jumps.items()
                     if sum(1 for t in ts if now - t < FLAP_WINDOW) >= FLAP_LIMIT)
