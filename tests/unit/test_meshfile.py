"""The static mesh file: its structure is checked here, node contents are left to the core."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from wgmanager.commands import meshfile
from wgmanager.core.model import MeshConfig, NodeSpec
from wgmanager.errors import ConfigError

KEY = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="

VALID: dict[str, Any] = {
    "listenPort": 51821,
    "persistentKeepalive": 25,
    "clusterCIDRs": ["10.244.0.0/16", "fd00:244::/32"],
    "nodes": [
        {"name": "n1", "addresses": ["10.99.0.1"], "podCIDRs": ["10.244.1.0/24"],
         "publicKey": KEY, "created": 100},
        {"name": "n2", "addresses": ["10.99.0.2", "fd10::2"],
         "podCIDRs": ["10.244.2.0/24", "fd00:244:2::/64"]},
    ],
}


def with_(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def error(data: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        meshfile.parse(data)
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg


def test_valid_file() -> None:
    mf = meshfile.parse(VALID)
    assert mf.config == MeshConfig(
        listen_port=51821, persistent_keepalive=25,
        cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),
                       ipaddress.ip_network("fd00:244::/32")))
    assert mf.nodes == (
        NodeSpec("n1", ("10.99.0.1",), ("10.244.1.0/24",), KEY, 100.0),
        NodeSpec("n2", ("10.99.0.2", "fd10::2"), ("10.244.2.0/24", "fd00:244:2::/64"), None,
                 1.0),
    )


def test_defaults() -> None:
    mf = meshfile.parse({"nodes": [{"name": "only"}]})
    assert mf.config == MeshConfig(listen_port=51820, persistent_keepalive=0, cluster_cidrs=())
    assert mf.nodes == (NodeSpec("only", (), (), None, 0.0),)


def test_empty_node_list() -> None:
    assert meshfile.parse({"nodes": []}).nodes == ()


def test_created_defaults_to_file_order() -> None:
    mf = meshfile.parse({"nodes": [{"name": "a"}, {"name": "b"}, {"name": "c", "created": 0.5}]})
    assert [n.created for n in mf.nodes] == [0.0, 1.0, 0.5]


def test_null_lists_are_empty() -> None:
    mf = meshfile.parse({"clusterCIDRs": None,
                         "nodes": [{"name": "a", "addresses": None, "podCIDRs": None}]})
    assert mf.config.cluster_cidrs == ()
    assert mf.nodes[0].addresses == () and mf.nodes[0].pod_cidrs == ()


@pytest.mark.parametrize("data", [[], "nodes", 3, None, [{"nodes": []}]])
def test_top_level_not_an_object(data: Any) -> None:
    assert "top level" in error(data)


@pytest.mark.parametrize("data", [{}, {"nodes": None}, {"nodes": {"name": "a"}},
                                  {"nodes": "n1"}, {"Nodes": []}])
def test_nodes_missing_or_not_a_list(data: Any) -> None:
    assert "'nodes'" in error(data)


@pytest.mark.parametrize("node", [{}, {"name": 1}, {"name": None}, "n1", ["n1"], None,
                                  {"addresses": ["10.0.0.1"]}])
def test_node_without_string_name(node: Any) -> None:
    msg = error({"nodes": [{"name": "ok"}, node]})
    assert "nodes[1]" in msg and "'name'" in msg


@pytest.mark.parametrize("port", [0, 70000, 65536, -1, "x", "51820", 1.5, None, True, [1]])
def test_bad_listen_port(port: Any) -> None:
    msg = error(with_(listenPort=port))
    assert "listenPort" in msg


@pytest.mark.parametrize("port", [1, 65535])
def test_listen_port_bounds(port: int) -> None:
    assert meshfile.parse(with_(listenPort=port)).config.listen_port == port


@pytest.mark.parametrize("ka", [-1, 65536, "25", 2.5, None, True])
def test_bad_persistent_keepalive(ka: Any) -> None:
    assert "persistentKeepalive" in error(with_(persistentKeepalive=ka))


@pytest.mark.parametrize("entry", ["banana", "10.244.0.1/16", "10.0.0.0/33", "", None, 7,
                                   "fd00::1/32", "10.244.0.0/16\nmore"])
def test_bad_cluster_cidr_entry(entry: Any) -> None:
    msg = error(with_(clusterCIDRs=["10.0.0.0/8", entry]))
    assert "clusterCIDRs" in msg


@pytest.mark.parametrize("value", ["10.244.0.0/16", 5, {"a": 1}, True])
def test_cluster_cidrs_not_a_list(value: Any) -> None:
    assert "clusterCIDRs" in error(with_(clusterCIDRs=value))


@pytest.mark.parametrize(("field", "value"), [
    ("addresses", "10.99.0.1"), ("addresses", 5), ("addresses", {"ip": "x"}),
    ("podCIDRs", "10.244.1.0/24"), ("podCIDRs", 7),
])
def test_node_lists_of_the_wrong_type(field: str, value: Any) -> None:
    msg = error({"nodes": [{"name": "n1", field: value}]})
    assert f"nodes[0].{field}" in msg


@pytest.mark.parametrize("created", ["yesterday", None, True, [1], float("nan"), float("inf")])
def test_bad_created(created: Any) -> None:
    assert "nodes[0].created" in error({"nodes": [{"name": "n1", "created": created}]})


def test_node_level_garbage_is_passed_through() -> None:
    """Bad keys, addresses and CIDRs are the core's to reject, one node at a time."""
    mf = meshfile.parse({"nodes": [
        {"name": "bad", "addresses": ["not-an-ip", 5], "podCIDRs": ["banana", "10.0.0.0/33"],
         "publicKey": "not base64"},
        {"name": "", "publicKey": 12345},
        {"name": "ok", "publicKey": KEY},
    ]})
    bad, empty, ok = mf.nodes
    assert bad == NodeSpec("bad", ("not-an-ip", "5"), ("banana", "10.0.0.0/33"), "not base64",
                           0.0)
    assert empty.name == "" and empty.public_key is None
    assert ok.public_key == KEY


def test_source_names_the_file_in_messages() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/mesh\.json: "):
        meshfile.parse({"nodes": 1}, source="/etc/mesh.json")


# ---------------------------------------------------------------------------------------------
# load


def test_load_valid(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(VALID))
    assert meshfile.load(path) == meshfile.parse(VALID)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as exc:
        meshfile.load(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("text", ["", "{", "{'nodes': []}", "nodes: []", '{"nodes": [}'])
def test_load_invalid_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mesh.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        meshfile.load(path)
    msg = str(exc.value)
    assert str(path) in msg and "JSON" in msg and "\n" not in msg


def test_load_structural_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    path.write_text('{"nodes": [], "listenPort": 0}')
    with pytest.raises(ConfigError, match="listenPort") as exc:
        meshfile.load(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_load_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        meshfile.load(tmp_path)
    assert str(tmp_path) in str(exc.value) and "\n" not in str(exc.value)


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    path.write_bytes(b'\xff\xfe{"nodes": []}')
    with pytest.raises(ConfigError) as exc:
        meshfile.load(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_features_unsaid_means_every_feature_and_a_list_is_what_the_node_supports() -> None:
    nodes = meshfile.parse({"nodes": [{"name": "a"}, {"name": "b", "features": []},
                                      {"name": "c", "features": ["node-addresses"]}]}).nodes
    assert [n.features for n in nodes] == [None, (), ("node-addresses",)]
    message = error({"nodes": [{"name": "a", "features": "node-addresses"}]})
    assert "nodes[0].features must be a list" in message and "\n" not in message
