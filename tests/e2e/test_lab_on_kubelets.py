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
- a node joining (a new kubelet, registered with the startup taint): the DaemonSets start
  on it, every node peers with it, and a pod that pings from its first moment never puts a
  plaintext packet on the wire (no pod runs there before the agent is Ready and the
  controller lifts the taint); the sanity check, a pod running on a node whose agent has
  not started, shows the detector sees the leak the taint prevents; deleted, a node stops
  being a peer everywhere;
- `lab down` leaves nothing: processes, mounts, cgroups, namespaces, files.

The tests run in file order and share the lab.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.labcli import LabCLI
from wgmanager.core.keys import PrivateKey
from wgmanager.kube.translate import PUBLIC_KEY_ANNOTATION
from wgmanager.lab import chart, kubelets, nodenet, traffic
from wgmanager.lab.capture import Capture
from wgmanager.lab.kubelab import AGENT_SELECTOR, API_PORT, KubeLab
from wgmanager.lab.lab import LabError, await_condition

# Bringing up 3 kubelets is one module fixture (about a minute; far more on a loaded
# machine), and the upgrade test pings for 2 minutes: more than the suite's default.
pytestmark = pytest.mark.timeout(900)

NODES = 3
# Each ping outlasts what it watches (measured: a new agent Ready 17-24 s after the delete,
# once 47.7 s in a fresh-clone run of the whole suite; every agent rolled 68-73 s after the
# upgrade), with a margin for a loaded machine.
DELETE_PING_SECONDS = 90
UPGRADE_PING_SECONDS = 120


@pytest.fixture(scope="module")
def cli() -> Iterator[LabCLI]:
    lab = LabCLI("wgk" + secrets.token_hex(2))
    try:
        began = time.monotonic()
        res = lab("up", "--nodes", str(NODES), "--pods-per-node", "1")
        print(res.stdout)
        assert res.returncode == 0, res.stdout + res.stderr
        print(f"lab up: {time.monotonic() - began:.1f} s")
        lab.adopt()  # this process takes it down
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


def watch_failures(lab: KubeLab, node: str) -> float:
    """The node's agent's count of failed Node list/watches (its Prometheus metrics)."""
    addr = lab.topology.node(node).ipv4
    text = lab.node_run(node, ["curl", "-sf", "--max-time", "5", f"http://{addr}:9877/metrics"])
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("wgmanager_kube_watch_failures_total "))


def test_an_agent_whose_api_connection_died_silently_catches_up(lab: KubeLab) -> None:
    """The server's end of an agent's watch vanishes and no word of it reaches the node: an
    API server or a load balancer failing over, or the Service NAT replaced in two steps
    (the lab's own route sync did that once, and node1 missed a joining node for minutes).
    Reproduced exactly: node1's Service NAT is gone while a Node changes, so the server's
    event reaches node1 untranslated, node1 answers it with a reset, and its watch is left
    waiting on a connection the server has closed. TCP keepalive finds it (the first probe,
    after 15 s of silence, is answered with a reset); the agent lists again and a Node
    registered meanwhile becomes node1's peer."""
    node = lab.nodes[0].node
    failures = watch_failures(lab, node.name)
    subprocess.run(["ip", "netns", "exec", node.netns, "nft", "delete", "table", "ip",
                    nodenet.NAT_TABLE], check=True)
    try:
        lab.core.patch_node(lab.nodes[1].node.name,
                            {"metadata": {"labels": {"wgmanager.io/test-cut": "1"}}})
        time.sleep(2)
    finally:
        nodenet.service_dnat(node.netns, lab.topology.host_address, API_PORT)
    # A node that exists only as an object: a key, an address and podCIDRs the node IPAM
    # will not hand out (the last /24 and /64 of the cluster's ranges).
    fake = "wgm-test-cut"
    key = PrivateKey.generate().public_key.base64()
    v4, v6 = (list(ipaddress.ip_network(c).subnets(new_prefix=bits))[-1]
              for c, bits in zip(lab.cluster_cidrs, (24, 64), strict=True))
    lab.core.create_node({"metadata": {"name": fake,
                                       "annotations": {PUBLIC_KEY_ANNOTATION: key}},
                          "spec": {"podCIDR": str(v4), "podCIDRs": [str(v4), str(v6)]}})
    try:
        lab.core.patch_node_status(fake, {"status": {"addresses": [
            {"type": "InternalIP", "address": str(ipaddress.ip_address(node.ipv4) + 200)}]}})
        began = time.monotonic()
        await_condition(lambda: key in lab.wireguard(node.name)["peers"], 120,
                        f"{node.name}'s agent to peer with a Node registered after its watch died",
                        0.5)
        print(f"{node.name} caught up {time.monotonic() - began:.1f} s after the new Node")
        assert watch_failures(lab, node.name) > failures  # the dead watch was found, not luck
    finally:
        lab.core.delete_node(fake)
        lab.core.patch_node(lab.nodes[1].node.name,
                            {"metadata": {"labels": {"wgmanager.io/test-cut": None}}})
    await_converged(lab, f"{fake} to leave every node")


def await_converged(lab: KubeLab, what: str, timeout: float = 90) -> None:
    """Every node peers with every other; on timeout, what each node holds and publishes."""
    try:
        await_condition(lab.converged, timeout, what, 0.5)
    except LabError:
        keys = lab.published_keys()
        held = {kn.node.name: lab.wireguard(kn.node.name)["peers"] for kn in lab.nodes}
        agents = {n: (p.metadata.name, chart.pod_ready(p)) for n, p in lab.agent_pods().items()}
        raise AssertionError(f"timed out waiting for {what}: published keys {keys}; "
                             f"peers held {held}; agent pods {agents}") from None


# A pod that talks from its first moment: an echo every 50 ms to a pod on another node,
# answered or not (waiting for each answer sent one a second while the peer was missing).
CHATTY = "while :; do ping -q -i 0.05 {dst} >/dev/null 2>&1; sleep 0.05; done"


def create_chatty_pod(lab: KubeLab, node: str) -> str:
    """A pod bound for ``node`` (which may not exist yet) that pings a pod on another node
    from its first moment; its name."""
    name = f"{node}-chatty"
    lab.core.create_namespaced_pod("default", {
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                 "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "main", "image": kubelets.images(["busybox"])[0].ref,
                                 "command": ["sh", "-c", CHATTY.format(dst=lab.pods[0].ipv4)]}]}})
    return name


def running(lab: KubeLab, pod: str) -> bool:
    return bool(lab.core.read_namespaced_pod(pod, "default").status.phase == "Running")


def plaintext_from(lab: KubeLab, node: str, cap: Capture) -> int:
    cidrs = lab.core.read_node(node).spec.pod_cidrs
    return cap.count(" or ".join(f"net {c}" for c in cidrs))


def test_a_pod_running_before_its_nodes_agent_sends_plaintext(lab: KubeLab) -> None:
    """The sanity check of the next test: a node joins without the startup taint and without
    the agent image (so its agent cannot start, deterministically); a pod that pings from its
    first moment puts plaintext on the wire, and the detector sees it. This is the gap the
    taint closes."""
    name = lab.next_node_name()
    pod = create_chatty_pod(lab, name)
    with lab.capture("join-untainted") as cap:
        lab.add_node(pods=0, startup_taint=False, agent_image=False)
        await_condition(lambda: running(lab, pod), 120, f"{pod} to run", 0.5)
        time.sleep(3)
    plaintext = plaintext_from(lab, name, cap)
    print(f"a pod on {name} before its agent: {plaintext} plaintext packets")
    lab.remove_node(name)
    await_converged(lab, f"{name} to leave every node")
    assert plaintext > 0


def test_a_joining_node_gets_peers_everywhere_and_its_pods_are_encrypted_from_the_first_packet(
        lab: KubeLab) -> None:
    """A pod bound for a node that does not exist yet, pinging from its first moment: the
    node registers with the startup taint, so the pod runs only once the node's agent is
    Ready (and the controller lifts the taint): not one plaintext packet."""
    began = time.monotonic()
    name = lab.next_node_name()
    pod = create_chatty_pod(lab, name)
    with lab.capture("join-tainted") as cap:
        lab.add_node(pods=0, startup_taint=True)
        chart.wait_daemonsets_ready(lab.api, lab.release, nodes=len(lab.nodes), timeout=180)
        await_converged(lab, f"every node to peer with {name}")
        await_condition(lambda: running(lab, pod), 120, f"{pod} to run", 0.5)
        time.sleep(3)  # more echoes, now through the tunnel
    print(f"{name}: kubelet started -> its agent Ready, peered everywhere, taint removed, "
          f"its pod running: {time.monotonic() - began:.1f} s")
    assert plaintext_from(lab, name, cap) == 0
    assert cap.wireguard_packets() > 0
    assert name not in lab.tainted_nodes()
    keys = lab.published_keys()
    for kn in lab.nodes:
        assert set(lab.wireguard(kn.node.name)["peers"]) == {
            k for n, k in keys.items() if n != kn.node.name}
    new_pod = lab.add_pods(name, 1).pods[0]
    others = [p for p in lab.pods if p.node != name]
    with lab.capture("join") as cap:
        for other in others:
            for fam in ("ipv4", "ipv6"):
                assert traffic.reaches(new_pod, getattr(other, fam)), (other.name, fam)
                assert traffic.reaches(other, getattr(new_pod, fam)), (other.name, fam)
    assert cap.plaintext_pod_packets() == 0
    assert cap.wireguard_packets() > 0


def test_a_deleted_node_stops_being_a_peer_everywhere(lab: KubeLab) -> None:
    name = lab.nodes[-1].node.name
    gone = lab.published_keys()[name]
    lab.remove_node(name)
    await_converged(lab, f"{name}'s peer to leave every node")
    for kn in lab.nodes:
        assert gone not in lab.wireguard(kn.node.name)["peers"]
    assert len(lab.nodes) == NODES


def test_down_leaves_nothing_behind(cli: LabCLI, lab: KubeLab) -> None:
    assert kubelets.leftovers(cli.root, cli.prefix)  # the detector sees a live lab
    res = cli("down")
    assert res.returncode == 0, res.stderr
    assert kubelets.leftovers(cli.root, cli.prefix) == []
    assert not Path(f"/run/netns/{cli.prefix}-ul").exists()
