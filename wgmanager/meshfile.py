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
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{source}: listenPort must be an integer 1-65535, got {port!r}")
    keepalive = data.get("persistentKeepalive", 0)
    if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
        raise ConfigError(f"{source}: persistentKeepalive must be 0-65535 seconds")
    cluster: list[IPNetwork] = []
    for text in data.get("clusterCIDRs", []):
        try:
            cluster.append(ipaddress.ip_network(str(text), strict=True))
        except ValueError:
            raise ConfigError(f"{source}: clusterCIDRs entry {text!r} is not a network") from None
    nodes: list[NodeSpec] = []
    for i, raw in enumerate(nodes_raw):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{source}: nodes[{i}] must be an object with a string 'name'")
        nodes.append(NodeSpec(
            name=raw["name"],
            addresses=tuple(str(a) for a in raw.get("addresses", [])),
            pod_cidrs=tuple(str(c) for c in raw.get("podCIDRs", [])),
            public_key=raw.get("publicKey") if isinstance(raw.get("publicKey"), str) else None,
            created=float(raw.get("created", i)),
        ))
    return MeshFile(MeshConfig(listen_port=port, persistent_keepalive=keepalive,
                               cluster_cidrs=tuple(cluster)), tuple(nodes))
