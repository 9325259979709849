"""Issue 16: a node with the old wireguard-go (no TUN offloads) still works in the mesh.

Three simulated nodes built and applied like test_encrypted_mesh's, except that nodes 1 and
2 run Debian 12's 0.0.20220316 build, which `make setup` keeps in /var/cache/wgmanager
(no offloads, in no package), first on their PATH; node 3 runs the bookworm-backports
build from the system PATH (offloads). So every kind of pair is covered: old to old, old to
new and new to old. Which binary each device really runs is checked against /proc/PID/exe
and `ip -d link` (vnet_hdr) as well as `wgmanager status --json`, so the test cannot pass
on the new binary by accident.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.harness import (
    FAMILIES,
    OLD_WIREGUARD_GO,
    OLD_WIREGUARD_GO_MISSING,
    Cluster,
    applied_cluster,
)
from wgmanager.lab.topology import SimNode


def runs_old(node: SimNode) -> bool:
    return node.index in (1, 2)


@pytest.fixture(scope="module")
def mixed() -> Iterator[Cluster]:
    """3 nodes x 2 pods: nodes 1 and 2 on the old wireguard-go, node 3 on the new one."""
    if not OLD_WIREGUARD_GO.exists():
        pytest.skip(OLD_WIREGUARD_GO_MISSING)
    old = {n: OLD_WIREGUARD_GO for n in (1, 2)}
    with applied_cluster("wgo" + secrets.token_hex(3), wireguard_go=old) as c:
        yield c


def device_pid(cluster: Cluster, node: SimNode) -> int:
    return int((cluster.run_dir / node.name / "wg" / "wgm0.pid").read_text())


def status(cluster: Cluster, node: SimNode) -> dict[str, Any]:
    res = cluster.wgm(node, "status", "--json", *cluster.node_args(node))
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def vnet_hdr(node: SimNode) -> bool:
    """Independent of the code under test: what `ip -d link` prints for the node's TUN."""
    out = subprocess.run(["ip", "-n", node.netns, "-d", "link", "show", "wgm0"],
                         capture_output=True, text=True, check=True).stdout
    assert "tun type tun" in out, out
    assert ("vnet_hdr on" in out) != ("vnet_hdr off" in out), out
    return "vnet_hdr on" in out


def test_old_nodes_run_the_old_binary_without_offloads_and_the_new_node_the_new(
        mixed: Cluster) -> None:
    new = shutil.which("wireguard-go")
    assert new is not None
    new_binary = os.path.realpath(new)
    assert new_binary != str(OLD_WIREGUARD_GO)
    for node in mixed.topo.nodes:
        pid = device_pid(mixed, node)
        exe = os.readlink(f"/proc/{pid}/exe")
        impl = status(mixed, node)["implementation"]
        assert impl["kind"] == "userspace" and impl["pid"] == pid, (node.name, impl)
        assert impl["replaced"] is False, (node.name, impl)
        if runs_old(node):
            assert exe == str(OLD_WIREGUARD_GO), node.name
            assert impl["binary"] == str(OLD_WIREGUARD_GO), (node.name, impl)
            assert impl["version"] == "v0.0.20220316", (node.name, impl)
            assert impl["offloads"] is False, (node.name, impl)
            assert vnet_hdr(node) is False, node.name
        else:
            assert exe == new_binary, node.name
            assert impl["binary"] == new_binary, (node.name, impl)
            assert impl["version"].startswith("0.0.20231211"), (node.name, impl)
            assert impl["offloads"] is True, (node.name, impl)
            assert vnet_hdr(node) is True, node.name


def test_every_cross_node_pod_pair_reaches_each_other_over_icmp(mixed: Cluster) -> None:
    assert mixed.unreachable_pairs() == []


def test_every_cross_node_pod_pair_talks_tcp(mixed: Cluster) -> None:
    assert mixed.tcp_failures() == []


def test_underlay_carries_only_wireguard_unfragmented(mixed: Cluster) -> None:
    with mixed.capture("old-binary") as cap:
        for a, b in mixed.topo.cross_node_pairs():
            for fam in FAMILIES:
                # 1500-byte payloads: without offloads every packet must still fit the
                # underlay in one piece once encrypted. One echo per ping: with several,
                # ping gives up on the last reply after only twice the largest RTT seen
                # (a few ms here), so a busy machine counts late replies as lost.
                for size in (56, 1500):
                    sent, received = mixed.ping(a, getattr(b, fam), count=1, size=size)
                    assert received == sent == 1, f"{a.name} -> {b.name} ({fam}, {size} B)"
    assert cap.wireguard_packets() > 0
    assert cap.plaintext_pod_packets() == 0
    assert cap.unexpected_packets() == 0
    assert cap.fragments() == 0


def test_apply_again_changes_nothing_and_keeps_every_device(mixed: Cluster) -> None:
    # A fresh `apply` reads each device back over UAPI (the old binary's answers included)
    # and finds nothing to do; no wireguard-go is restarted, so none could have been swapped
    # for the binary on the system PATH along the way.
    new = shutil.which("wireguard-go")
    assert new is not None
    for node in mixed.topo.nodes:
        pid = device_pid(mixed, node)
        summary = mixed.apply(node)
        assert (summary["peer_ops"], summary["map_changes"]) == (0, 0), (node.name, summary)
        assert device_pid(mixed, node) == pid, node.name
        expected = str(OLD_WIREGUARD_GO) if runs_old(node) else os.path.realpath(new)
        assert os.readlink(f"/proc/{pid}/exe") == expected, node.name
