"""The agent's node cache: which watch events count as changes."""

from __future__ import annotations

from wgmanager.agent.cache import NodeCache
from wgmanager.core.model import NodeSpec
from wgmanager.kube.watch import Deleted, Synced, Upserted

A = NodeSpec("a", ("10.0.0.1",), ("10.244.1.0/24",), "key-a")
B = NodeSpec("b", ("10.0.0.2",), ("10.244.2.0/24",), "key-b")


def test_nothing_is_synced_before_the_first_complete_list() -> None:
    cache = NodeCache()
    assert cache.apply(Upserted(A))
    assert cache.snapshot() == (False, [A])
    assert cache.apply(Synced((A, B), "7"))
    assert cache.snapshot() == (True, [A, B])


def test_heartbeats_and_unknown_deletions_change_nothing() -> None:
    cache = NodeCache()
    cache.apply(Synced((A,), "1"))
    assert not cache.apply(Upserted(A))  # the same spec again: a status heartbeat
    assert not cache.apply(Deleted("nobody"))
    assert cache.apply(Upserted(NodeSpec("a", ("10.0.0.9",), ("10.244.1.0/24",), "key-a")))
    assert cache.apply(Deleted("a"))
    assert cache.snapshot() == (True, [])


def test_take_gives_the_nodes_by_name_and_the_changed_names_once() -> None:
    cache = NodeCache()
    cache.apply(Synced((A,), "1"))
    assert cache.take() == ({"a": A}, None)  # after a (re)list: a full pass
    cache.apply(Upserted(B))
    nodes, changed = cache.take()
    assert nodes == {"a": A, "b": B} and changed == {"b"}
    cache.apply(Deleted("a"))
    assert cache.take() == ({"b": B}, {"a"})
    assert cache.take() == ({"b": B}, set())


def test_get_looks_at_one_node_without_copying_the_others() -> None:
    cache = NodeCache()
    assert cache.get("a") == (False, None)
    cache.apply(Synced((A, B), "1"))
    assert cache.get("b") == (True, B)
    assert cache.get("c") == (True, None)


def test_a_next_key_published_or_withdrawn_is_a_key_move_until_the_next_take() -> None:
    """The agent skips its debounce for those: the rotating node's new device holds our
    traffic back until we switch (and sends it twice then)."""
    from dataclasses import replace
    cache = NodeCache()
    cache.apply(Synced((A, B), "1"))
    cache.take()
    cache.apply(Upserted(replace(A, addresses=("10.0.0.7",))))
    assert not cache.key_moved()  # any other change waits for the debounce as before
    cache.apply(Upserted(replace(A, next_public_key="next-a", next_port="51821")))
    assert cache.key_moved()
    cache.take()
    assert not cache.key_moved()
    cache.apply(Upserted(replace(A, next_public_key=None, next_port=None)))  # rolled back
    assert cache.key_moved()
    cache.take()
    cache.apply(Upserted(NodeSpec("c", ("10.0.0.3",), (), "key-c", next_public_key="n")))
    assert not cache.key_moved()  # a node we never saw: an ordinary join
