"""A static mesh described in a JSON file: nodes and cluster settings without Kubernetes.

Used by `wgmanager apply` (bare-metal meshes, the integration tests). The shape mirrors what
the Kubernetes adapter reads from Node objects::

    {"listenPort": 51820, "persistentKeepalive": 0, "clusterCIDRs": ["10.244.0.0/16"],
     "nodes": [{"name": "n1", "addresses": ["10.99.0.1"], "podCIDRs": ["10.244.1.0/24"],
                "publicKey": "base64..."}]}

Node entries are passed on unvalidated (the core rejects bad ones one by one); the file's own
structure is checked here, and a malformed file is one clear ConfigError.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wgmanager.core.model import IPNetwork, MeshConfig, NodeSpec
from wgmanager.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MeshFile:
    config: MeshConfig
    nodes: tuple[NodeSpec, ...]


def load(path: Path) -> MeshFile:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"mesh file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"mesh file {path} cannot be read: "
                          f"{e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"mesh file {path} is not UTF-8 text; fix the file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"mesh file {path} is not valid JSON: {e.msg} at line {e.lineno}; "
                          "fix the file") from None
    return parse(data, source=str(path))


def parse(data: Any, *, source: str = "mesh") -> MeshFile:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be an object with a 'nodes' list")
    nodes_raw = data.get("nodes")
    if not isinstance(nodes_raw, list):
        raise ConfigError(f"{source}: 'nodes' must be a list of node objects")
    port = data.get("listenPort", 51820)
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ConfigError(f"{source}: listenPort must be an integer 1-65535, got {port!r}")
    keepalive = data.get("persistentKeepalive", 0)
    if not _is_int(keepalive) or not 0 <= keepalive <= 65535:
        raise ConfigError(f"{source}: persistentKeepalive must be 0-65535 seconds")
    cluster: list[IPNetwork] = []
    for text in _list(data.get("clusterCIDRs"), "clusterCIDRs", source):
        try:
            cluster.append(ipaddress.ip_network(str(text), strict=True))
        except ValueError:
            raise ConfigError(f"{source}: clusterCIDRs entry {text!r} is not a network") from None
    nodes: list[NodeSpec] = []
    for i, raw in enumerate(nodes_raw):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{source}: nodes[{i}] must be an object with a string 'name'")
        where = f"nodes[{i}]"
        created = raw.get("created", i)
        if not isinstance(created, int | float) or isinstance(created, bool) \
                or not math.isfinite(created):
            raise ConfigError(f"{source}: {where}.created must be a number, got {created!r}")
        nodes.append(NodeSpec(
            name=raw["name"],
            addresses=tuple(str(a) for a in _list(raw.get("addresses"), f"{where}.addresses",
                                                  source)),
            pod_cidrs=tuple(str(c) for c in _list(raw.get("podCIDRs"), f"{where}.podCIDRs",
                                                  source)),
            public_key=raw.get("publicKey") if isinstance(raw.get("publicKey"), str) else None,
            created=float(created),
            # Absent: every node runs this version. A list: what that node's agent supports.
            features=(None if raw.get("features") is None else tuple(
                str(f) for f in _list(raw["features"], f"{where}.features", source))),
        ))
    return MeshFile(MeshConfig(listen_port=port, persistent_keepalive=keepalive,
                               cluster_cidrs=tuple(cluster)), tuple(nodes))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list(value: Any, what: str, source: str) -> list[Any]:
    """An optional JSON list; absent or null is empty, anything else is a ConfigError."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {what} must be a list, got {type(value).__name__}")
    return value
