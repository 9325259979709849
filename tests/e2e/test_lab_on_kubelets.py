"""`make lab` as the README runs it: `wgmanager lab up` builds 3 real kubelets and installs
the Helm chart; then what operators do to a running release, under a 10 ms ping.

Each lab command runs as its own process, as a user runs it (up, again up, status, check,
exec, down). The tests in between drive the cluster through the API and helm, and judge by
ping (every echo answered) and by an underlay capture (no pod packet in plaintext), never by
the agent's own word:

- `kubectl delete pod` of one node's agent: the new agent pod comes up and not one echo
  between pods is lost, because wireguard-go (a DaemonSet of its own) keeps the tunnels
  and the new agent takes over the pinned maps and the device as they are;
- `helm upgrade` that changes a value: every agent pod is replaced, one node at a time,
  with pings crossing every node pair: none lost;
- `lab down` leaves nothing: processes, mounts, cgroups, namespaces, files.

The tests run in file order and share the lab.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import RUN_ROOT
from wgmanager.lab import chart, kubelets, traffic
from wgmanager.lab.kubelab import AGENT_SELECTOR, KubeLab
from wgmanager.lab.lab import await_condition

# Bringing up 3 kubelets is one module fixture (about a minute; far more on a loaded
# machine), and the upgrade test pings for 2 minutes: more than the suite's default.
pytestmark = pytest.mark.timeout(900)

NODES = 3
# Each ping outlasts what it watches (measured: a new agent Ready 17-24 s after the delete,
# every agent rolled 68-73 s after the upgrade), with a margin for a loaded machine.
DELETE_PING_SECONDS = 45
UPGRADE_PING_SECONDS = 120


class LabCLI:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.root = RUN_ROOT / prefix

    def __call__(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wgmanager", "lab", "--root",
                               str(self.root), "--prefix", self.prefix, *argv],
                              capture_output=True, text=True, check=False, timeout=timeout,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cli() -> Iterator[LabCLI]:
    lab = LabCLI("wgk" + secrets.token_hex(2))
    try:
        began = time.monotonic()
        res = lab("up", "--nodes", str(NODES), "--pods-per-node", "1")
        print(res.stdout)
        assert res.returncode == 0, res.stdout + res.stderr
        print(f"lab up: {time.monotonic() - began:.1f} s")
        # This process owns the lab from now on (it takes it down), so that a concurrent
        # session's sweep of crashed runs (harness.remove_stale_runs) leaves it alone:
        # the `lab up` process that wrote the owner file has exited.
        (lab.root / "owner.pid").write_text(f"{os.getpid()}\n")
        yield lab
    finally:
        lab("down")
        kubelets.cleanup(lab.root, lab.prefix)


@pytest.fixture(scope="module")
def lab(cli: LabCLI) -> KubeLab:
    return KubeLab.load(cli.root)


def test_up_ends_with_every_agent_ready_and_the_mesh_complete(cli: LabCLI) -> None:
    res = cli("status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["agents"] == "daemonset" and len(doc["nodes"]) == NODES
    for node in doc["nodes"]:
        assert node["ready"], node
        assert node["agent"]["running"] and node["agent"]["ready"], node
        assert node["wireguard"]["peers"] == node["wireguard"]["peers_expected"] == NODES - 1
        assert len(node["pods"]) == 1
    text = cli("status")
    assert "AGENT POD" in text.stdout and text.returncode == 0


def test_up_again_is_harmless(cli: LabCLI) -> None:
    res = cli("up", "--nodes", str(NODES), "--pods-per-node", "1")
    assert res.returncode == 0 and "already up" in res.stdout, res.stdout + res.stderr
    other = cli("up", "--nodes", str(NODES), "--pods-per-node", "1", "--agents", "processes")
    assert other.returncode == 1
    assert other.stderr.count("\n") == 1 and "lab down" in other.stderr


def test_check_proves_every_pair_encrypted_with_the_sanity_inversion(cli: LabCLI) -> None:
    res = cli("check")
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout
    assert f"pairs: {NODES * (NODES - 1) * 2}/{NODES * (NODES - 1) * 2} passed" in res.stdout


def test_exec_reaches_pods_and_nodes_and_never_shows_the_private_key(
        cli: LabCLI, lab: KubeLab) -> None:
    src, dst = lab.pods[0], lab.pods[1]
    res = cli("exec", src.name, "--", "ping", "-c", "2", "-W", "3", dst.ipv4)
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("exec", "node1", "--", "wg", "show", "all")
    assert res.returncode == 0 and "peer:" in res.stdout, res.stdout + res.stderr
    assert "(hidden)" in res.stdout  # wg hides it; nothing of ours prints it either
    # A path relative to the caller's directory works inside the node too (README).
    wgmanager = os.path.relpath(Path(sys.executable).parent / "wgmanager")
    status = cli("exec", "node1", "--", wgmanager, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["peers"], status.stdout


def pings_between_every_node_pair(lab: KubeLab, seconds: float) -> dict[str, traffic.PingRun]:
    """One 10 ms ping per ordered pair of pods on different nodes, each through both nodes'
    datapaths and WireGuard devices."""
    pods = lab.pods
    return {f"{a.name}->{b.name}": traffic.continuous_ping(a, b.ipv4, seconds, interval=0.01)
            for a in pods for b in pods if a.node != b.node}


def assert_none_lost(runs: dict[str, traffic.PingRun]) -> None:
    for name, run in runs.items():
        sent, received = run.result()
        assert sent > 0 and received == sent, f"{name}: {sent - received} of {sent} lost; " \
                                              f"{run.losses()}"


def test_deleting_an_agent_pod_loses_no_packet(lab: KubeLab) -> None:
    old = lab.agent_pods()["node2"]
    with lab.capture("delete-agent") as cap:
        runs = pings_between_every_node_pair(lab, seconds=DELETE_PING_SECONDS)
        time.sleep(1)
        began = time.monotonic()
        lab.core.delete_namespaced_pod(old.metadata.name, lab.release.namespace)

        def replaced() -> bool:
            pod = lab.agent_pods().get("node2")
            return bool(pod and pod.metadata.uid != old.metadata.uid and chart.pod_ready(pod))
        await_condition(replaced, 120, "a new Ready agent pod on node2", 0.5)
        took = time.monotonic() - began
        print(f"agent pod deleted -> new agent pod Ready: {took:.1f} s")
        assert_none_lost(runs)
    # The ping covered the whole replacement, or "none lost" proves nothing.
    assert took < DELETE_PING_SECONDS - 2, f"the new agent took {took:.0f} s: longer than " \
                                           "the ping ran"
    assert cap.plaintext_pod_packets() == 0
    assert cap.wireguard_packets() > 0


def test_helm_upgrade_rolls_every_agent_and_loses_no_packet(lab: KubeLab) -> None:
    before = {n: p.metadata.uid for n, p in lab.agent_pods().items()}
    with lab.capture("upgrade") as cap:
        runs = pings_between_every_node_pair(lab, seconds=UPGRADE_PING_SECONDS)
        time.sleep(1)
        began = time.monotonic()
        lab.release.upgrade({"agent": {"logLevel": "debug"}})
        chart.wait_daemonsets_ready(lab.api, lab.release, nodes=NODES,
                                    timeout=UPGRADE_PING_SECONDS - 5)
        took = time.monotonic() - began
        print(f"helm upgrade -> every agent pod replaced and Ready: {took:.1f} s")
        assert_none_lost(runs)
    after = {n: p.metadata.uid for n, p in lab.agent_pods().items()}
    assert all(after[n] != before[n] for n in before), "not every agent pod was replaced"
    assert took < UPGRADE_PING_SECONDS - 2, f"the rollout took {took:.0f} s: longer than " \
                                            "the ping ran"
    assert cap.plaintext_pod_packets() == 0
    pods = lab.core.list_namespaced_pod(lab.release.namespace,
                                        label_selector=AGENT_SELECTOR).items
    args = pods[0].spec.containers[0].args
    assert "--log-level=debug" in args


def test_down_leaves_nothing_behind(cli: LabCLI, lab: KubeLab) -> None:
    assert kubelets.leftovers(cli.root, cli.prefix)  # the detector sees a live lab
    res = cli("down")
    assert res.returncode == 0, res.stderr
    assert kubelets.leftovers(cli.root, cli.prefix) == []
    assert not Path(f"/run/netns/{cli.prefix}-ul").exists()
