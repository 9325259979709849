"""Node objects as the API server sends them, translated at the edge into NodeSpecs."""

from __future__ import annotations

from typing import Any

import pytest

from wgmanager.kube.translate import PUBLIC_KEY_ANNOTATION, annotations_patch, node_spec

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
