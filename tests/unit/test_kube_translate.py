"""Node objects as the API server sends them, translated at the edge into NodeSpecs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from wgmanager.core.mesh import entry_action, parse_node
from wgmanager.core.model import Action, Node
from wgmanager.kube.translate import (
    FEATURES_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    annotations_patch,
    node_spec,
)

KEY = "FYGsCoJpjl9EmdUAT2a88iZxf1+wzs0Ke5bnrLtE2W0="


def node(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "n1", "creationTimestamp": "2026-11-22T01:02:03Z",
                     "annotations": {PUBLIC_KEY_ANNOTATION: KEY, "other.io/x": "y"}},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
        "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                 {"type": "InternalIP", "address": "10.0.0.1"},
                                 {"type": "ExternalIP", "address": "203.0.113.9"},
                                 {"type": "InternalIP", "address": "fd99::1"}]},
    }
    obj.update(overrides)
    return obj


def test_full_node() -> None:
    spec = node_spec(node())
    assert spec.name == "n1"
    assert spec.addresses == ("10.0.0.1", "fd99::1")  # InternalIP only, in order
    assert spec.pod_cidrs == ("10.244.1.0/24", "fd00:1::/64")
    assert spec.public_key == KEY
    assert spec.created == 1795309323.0


def test_single_stack_node_with_only_the_legacy_pod_cidr_field() -> None:
    spec = node_spec(node(spec={"podCIDR": "10.244.7.0/24"}))
    assert spec.pod_cidrs == ("10.244.7.0/24",)


@pytest.mark.parametrize("obj", [
    {},
    {"metadata": None, "spec": None, "status": None},
    {"metadata": {"name": "x", "annotations": None}, "status": {"addresses": None}},
    {"metadata": {"name": "x", "annotations": {PUBLIC_KEY_ANNOTATION: 42}}},
    {"metadata": {"name": "x", "creationTimestamp": "yesterday"},
     "status": {"addresses": ["not-a-dict", {"type": "InternalIP"}]}},
])
def test_malformed_objects_never_raise(obj: dict[str, Any]) -> None:
    spec = node_spec(obj)  # the core judges the values; translation is total
    assert spec.public_key is None or isinstance(spec.public_key, str)


def test_key_patch_touches_only_our_annotation() -> None:
    assert annotations_patch({PUBLIC_KEY_ANNOTATION: KEY}) == {
        "metadata": {"annotations": {PUBLIC_KEY_ANNOTATION: KEY}}}


def test_features_decide_whether_our_host_traffic_is_steered_to_the_nodes_pods() -> None:
    """A Node without the features annotation is an older agent's, which drops packets from
    our node address: its pod CIDRs are steered for our pods only (NODE entries), so our
    host's traffic to them leaves as it did before the upgrade, until it says it accepts."""
    older = node_spec(node())
    assert older.features == ()
    newer = node_spec(node(metadata={
        "name": "n1", "annotations": {PUBLIC_KEY_ANNOTATION: KEY,
                                      FEATURES_ANNOTATION: "future, node-addresses"}}))
    assert newer.features == ("future", "node-addresses")
    old_node, new_node = parse_node(older), parse_node(newer)
    assert isinstance(old_node, Node) and isinstance(new_node, Node)
    assert not old_node.node_sources and new_node.node_sources
    pods = old_node.pod_cidrs[0]
    assert entry_action(old_node, pods, Action.REDIRECT) is Action.NODE_REDIRECT
    assert entry_action(new_node, pods, Action.REDIRECT) is Action.REDIRECT
    assert entry_action(new_node, new_node.hosts[0], Action.DROP) is Action.NODE_DROP
    # A mesh file says nothing: one version everywhere.
    assert parse_node(replace(older, features=None)).node_sources  # type: ignore[union-attr]
