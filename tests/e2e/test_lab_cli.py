"""`wgmanager lab --agents processes` (the fast mode: one agent process per node namespace,
no kubelets) as a user runs it: up, status, exec, check, down, each as a process."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.labcli import LabCLI
from tests.integration.harness import LAB_PIN_ROOT, cleanup_prefix
from wgmanager.lab import topology


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCLI]:
    prefix = "wgc" + secrets.token_hex(2)
    cli = LabCLI(prefix)
    try:
        res = cli("up", "--nodes", "3", "--pods-per-node", "1", "--agents", "processes")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "converged" in res.stdout
        cli.adopt()  # this process takes it down
        yield cli
    finally:
        cli("down")
        cleanup_prefix(prefix)


def test_up_again_is_harmless(lab: LabCLI) -> None:
    res = lab("up", "--nodes", "3", "--pods-per-node", "1", "--agents", "processes")
    assert res.returncode == 0 and "already up" in res.stdout
    other = lab("up", "--nodes", "5", "--pods-per-node", "1", "--agents", "processes")
    assert other.returncode == 1
    assert other.stderr.count("\n") == 1 and "lab down" in other.stderr


def test_status_json_describes_the_lab(lab: LabCLI) -> None:
    res = lab("status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert Path(doc["kubeconfig"]).is_file()
    assert doc["underlay"]["netns"] in topology.namespaces(lab.prefix)
    assert doc["underlay"]["interface"] == "br0"
    assert len(doc["nodes"]) == 3
    for node in doc["nodes"]:
        assert node["agent"]["running"] and node["agent"]["ready"]
        assert node["netns"] in topology.namespaces(lab.prefix)
        assert node["pods"] and all(p["netns"] and p["ipv4"] for p in node["pods"])
        st = node["status"]
        assert st["ok"] and st["backend"] == "userspace"
        assert st["expected"]["peers_expected"] == 2 and st["expected"]["missing"] == []
        assert len(st["peers"]) == 2 and {p["node"] for p in st["peers"]} == {
            n["name"] for n in doc["nodes"] if n["name"] != node["name"]}


def test_exec_runs_inside_pods_and_nodes(lab: LabCLI) -> None:
    doc = json.loads(lab("status", "--json").stdout)
    target = doc["nodes"][1]["pods"][0]["ipv4"]
    res = lab("exec", "node1-pod1", "--", "ping", "-c", "1", "-W", "2", target)
    assert res.returncode == 0, res.stdout + res.stderr
    res = lab("exec", "node2", "--", "ip", "-br", "addr", "show", "eth0")
    assert doc["nodes"][1]["ipv4"] in res.stdout
    bad = lab("exec", "no-such-pod", "--", "true")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_check_passes_and_proves_its_detector(lab: LabCLI) -> None:
    res = lab("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout
    assert "encryption on: 0 plaintext pod packets" in res.stdout
    assert "after re-attaching: 0 plaintext pod packets" in res.stdout


def test_down_removes_everything_and_is_repeatable(lab: LabCLI) -> None:
    status = json.loads(lab("status", "--json").stdout)
    pids = [n["agent"]["pid"] for n in status["nodes"]]
    res = lab("down")
    assert res.returncode == 0, res.stderr
    assert topology.namespaces(lab.prefix) == []
    assert not lab.root.exists()
    assert not (LAB_PIN_ROOT / lab.prefix).exists()
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    again = lab("down")
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    gone = lab("status")
    assert gone.returncode == 1 and "lab up" in gone.stderr


def test_check_proves_a_vxlan_overlay_lab_encrypted() -> None:
    """`lab up --overlay vxlan`: pods reach other nodes through flannel-style VXLAN devices;
    `lab check` passes, and its sanity inversion (the detector opens VXLAN) still sees
    plaintext with the programs detached."""
    cli = LabCLI("wgc" + secrets.token_hex(2))
    try:
        res = cli("up", "--nodes", "2", "--pods-per-node", "1", "--agents", "processes",
                  "--overlay", "vxlan")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "pod routes: vxlan" in res.stdout
        res = cli("check")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "encryption on: 0 plaintext pod packets" in res.stdout
        assert "after re-attaching: 0 plaintext pod packets" in res.stdout
    finally:
        cli("down")
        cleanup_prefix(cli.prefix)


def test_overlay_needs_agent_processes() -> None:
    cli = LabCLI("wgc" + secrets.token_hex(2))
    res = cli("up", "--agents", "daemonset", "--overlay", "vxlan")
    assert res.returncode != 0 and res.stderr.count("\n") == 1
    assert "--agents processes" in res.stderr
    assert topology.namespaces(cli.prefix) == []
