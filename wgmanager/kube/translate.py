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
    key = annotations.get(PUBLIC_KEY_ANNOTATION)
    return NodeSpec(
        name=str(meta.get("name") or ""),
        addresses=addresses,
        pod_cidrs=tuple(str(c) for c in cidrs),
        public_key=key if isinstance(key, str) else None,
        created=_timestamp(meta.get("creationTimestamp")),
    )


def _timestamp(value: Any) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def key_patch(public_key: str) -> dict[str, Any]:
    """A patch body touching only wgmanager's annotation, nothing else on the Node.

    The client sends a dict body as a strategic merge patch; for annotations (a plain map)
    that merges exactly like a JSON merge patch."""
    return {"metadata": {"annotations": {PUBLIC_KEY_ANNOTATION: public_key}}}
