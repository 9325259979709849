"""Kubernetes Node objects (as JSON dicts) to ``NodeSpec``: the edge where API data enters.

Pure and total: any dict gives a NodeSpec; judging the values is the core's job
(``wgmanager.core.mesh.parse_node``), which rejects a bad node with a reason. We work on
plain JSON dicts rather than the client's generated models: for thousands of nodes the
models' deserialisation costs more than everything else the agent does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from wgmanager.core.model import NodeSpec

ANNOTATION_PREFIX = "wgmanager.io/"
PUBLIC_KEY_ANNOTATION = ANNOTATION_PREFIX + "public-key"
PORT_ANNOTATION = ANNOTATION_PREFIX + "endpoint-port"
NEXT_KEY_ANNOTATION = ANNOTATION_PREFIX + "next-public-key"
NEXT_PORT_ANNOTATION = ANNOTATION_PREFIX + "next-endpoint-port"
# Set by `wgmanager rotate-keys` (a fresh request id); the agent answers in the status one.
ROTATE_REQUEST_ANNOTATION = ANNOTATION_PREFIX + "rotate-key-request"
ROTATION_STATUS_ANNOTATION = ANNOTATION_PREFIX + "key-rotation"
# What the node's agent supports, comma-separated (core.model.NODE_ADDRESSES_FEATURE). A
# Node without it is an older agent's: it supports none of them.
FEATURES_ANNOTATION = ANNOTATION_PREFIX + "features"


def node_spec(obj: dict[str, Any]) -> NodeSpec:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    addresses = tuple(
        str(a.get("address", ""))
        for a in status.get("addresses") or []
        if isinstance(a, dict) and a.get("type") == "InternalIP"
    )
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    return NodeSpec(
        name=str(meta.get("name") or ""),
        addresses=addresses,
        pod_cidrs=tuple(str(c) for c in cidrs),
        public_key=_text(annotations, PUBLIC_KEY_ANNOTATION),
        created=_timestamp(meta.get("creationTimestamp")),
        port=_text(annotations, PORT_ANNOTATION),
        next_public_key=_text(annotations, NEXT_KEY_ANNOTATION),
        next_port=_text(annotations, NEXT_PORT_ANNOTATION),
        rotation_request=_text(annotations, ROTATE_REQUEST_ANNOTATION),
        rotation_status=_text(annotations, ROTATION_STATUS_ANNOTATION),
        features=tuple(f.strip() for f in (_text(annotations, FEATURES_ANNOTATION) or "")
                       .split(",") if f.strip()),
    )


def _text(annotations: dict[str, Any], name: str) -> str | None:
    value = annotations.get(name)
    return value if isinstance(value, str) else None


def _timestamp(value: Any) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def annotations_patch(values: dict[str, str | None]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) setting (or, for None, removing) only the given
    annotations: other annotations and fields are left as they are."""
    return {"metadata": {"annotations": dict(values)}}
