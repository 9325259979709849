"""The agent on a real API server: 4 simulated nodes, one agent process each.

Nodes 1-3 start with the cluster; node 4's namespace exists from the start, but its Node
object and agent arrive in the join test.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from pyroute2 import IPRoute

from tests.e2e.kubecluster import GET_ONLY_USER, KubeCluster, await_condition
from tests.integration.harness import cleanup_prefix
from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.datapath.bpf import Hook, attachments
from wgmanager.lab import topology
from wgmanager.lab.traffic import continuous_ping

LATENCIES: list[float] = []  # annotation appears -> peer configured on every other node


@pytest.fixture(scope="module")
def kc() -> Iterator[KubeCluster]:
    """4 node namespaces; nodes 1-3 registered with agents (the lab's own `up`)."""
    prefix = "wge" + secrets.token_hex(2)
    cluster = KubeCluster(prefix)
    try:
        cluster.lab.up(nodes=4, pods_per_node=1, start_agents=3)
        yield cluster
    finally:
        cluster.lab.down()
        cleanup_prefix(prefix)
    if LATENCIES:
        print(f"\nannotation -> peer configured on all other nodes: "
              f"median {statistics.median(LATENCIES):.3f}s, worst {max(LATENCIES):.3f}s "
              f"over {len(LATENCIES)} joins")


def members(kc: KubeCluster) -> list[topology.SimNode]:
    return kc.members()


def test_keys_are_published_as_annotations(kc: KubeCluster) -> None:
    for node in members(kc):
        value = kc.annotation(node.name)
        assert value is not None
        PublicKey.from_base64(value)  # valid
        assert kc.readyz(node) is not None and kc.readyz(node)["ready"]  # type: ignore[index]


def test_mesh_is_encrypted_between_every_pod_pair(kc: KubeCluster) -> None:
    pods = [n.pods[0] for n in members(kc)]
    with kc.capture("e2e-mesh") as cap:
        failures = [f"{a.name}->{b.name}/{fam}" for a in pods for b in pods if a != b
                    for fam in ("ipv4", "ipv6") if not kc.reaches(a, getattr(b, fam))]
    assert failures == [], kc.diagnose()
    assert cap.plaintext_pod_packets() == 0
    assert cap.unexpected_packets() == 0
    assert cap.wireguard_packets() > 0


def _join(kc: KubeCluster, node: topology.SimNode) -> float:
    """Registers node, starts its agent; returns annotation -> peers-everywhere latency."""
    kc.register_node(node)
    kc.start_agent(node)
    await_condition(lambda: kc.annotation(node.name) is not None, 60, f"{node.name}'s key",
                    interval=0.01)
    appeared = time.monotonic()
    key = PublicKey.from_base64(kc.annotation(node.name) or "")
    others = [n for n in members(kc) if n.name != node.name]
    await_condition(lambda: all(key in kc.peer_keys(n) for n in others), 30,
                    f"{node.name}'s peer on every node", interval=0.01)
    return time.monotonic() - appeared


def test_a_fourth_node_joins_then_is_deleted(kc: KubeCluster) -> None:
    node4 = kc.topo.nodes[3]
    LATENCIES.append(_join(kc, node4))
    await_condition(lambda: kc.converged(members(kc)), 60, "4-node convergence")
    node1 = kc.topo.nodes[0]
    assert kc.reaches(node1.pods[0], node4.pods[0].ipv4)
    assert kc.reaches(node4.pods[0], node1.pods[0].ipv6)

    key4 = PublicKey.from_base64(kc.annotation(node4.name) or "")
    kc.kill_agent(node4, signal.SIGTERM)
    kc.delete_node(node4.name)
    others = members(kc)
    await_condition(lambda: all(key4 not in kc.peer_keys(n) for n in others), 30,
                    "node4's peer to disappear everywhere")
    with kc.capture("e2e-deleted") as cap:
        assert kc.ping(node1.pods[0], node4.pods[0].ipv4, count=3, interval=0.05, wait=1)[1] == 0
    assert cap.plaintext_pod_packets() == 0  # dropped by the cluster CIDR, not leaked


def test_joins_are_fast_and_repeatable(kc: KubeCluster) -> None:
    """More samples of the join latency: ghost nodes (valid key, no agent) come and go."""
    node1 = kc.topo.nodes[0]
    for i in range(5):
        name = f"ghost{i}"
        key = PrivateKey.generate().public_key
        kc.register(name, [f"10.250.0.{i + 1}"], [f"10.244.{100 + i}.0/24"])
        start = time.monotonic()
        kc.core.patch_node(name, {"metadata": {"annotations": {
            "wgmanager.io/public-key": key.base64()}}})
        await_condition(lambda k=key: all(k in kc.peer_keys(n) for n in members(kc)), 30,
                        f"{name}'s peer everywhere", interval=0.01)
        LATENCIES.append(time.monotonic() - start)
        kc.delete_node(name)
        await_condition(lambda k=key: all(k not in kc.peer_keys(n) for n in members(kc)), 30,
                        f"{name}'s peer gone")
    assert kc.reaches(node1.pods[0], kc.topo.nodes[1].pods[0].ipv4)


BAD_ANNOTATIONS = {
    "not-base64": "this is not base64!",
    "wrong-length": "AAAA",
    "empty": "",
}


def test_bad_annotations_are_skipped_and_leave_other_peers_untouched(kc: KubeCluster) -> None:
    nodes = members(kc)
    before = {n.name: {k: st.config() for k, st in kc.device(n).read().peers.items()}
              for n in nodes}
    bad = dict(BAD_ANNOTATIONS)
    bad["stolen-key"] = kc.annotation(nodes[1].name) or ""  # another node's key
    for i, (label, value) in enumerate(bad.items()):
        kc.register(f"bad-{label}", [f"10.251.0.{i + 1}"], [f"10.244.{200 + i}.0/24"],
                    annotations={"wgmanager.io/public-key": value})
    try:
        def warned() -> bool:
            logs = kc.agent_log(nodes[0])
            return all(f"bad-{label}" in logs for label in bad if label != "empty")
        await_condition(warned, 30, "warnings naming every bad node", interval=0.2)
        log0 = kc.agent_log(nodes[0])
        assert "not valid base64" in log0
        assert "already used by node" in log0
        time.sleep(1.0)  # give any (wrong) reaction time to happen before comparing
        after = {n.name: {k: st.config() for k, st in kc.device(n).read().peers.items()}
                 for n in nodes}
        assert after == before
        assert kc.reaches(nodes[0].pods[0], nodes[1].pods[0].ipv4)
    finally:
        for label in bad:
            kc.delete_node(f"bad-{label}")


def test_agent_sigkill_and_restart_under_a_10ms_ping_loses_nothing(kc: KubeCluster) -> None:
    node1, node2 = kc.topo.nodes[0], kc.topo.nodes[1]
    src, dst = node1.pods[0], node2.pods[0]
    assert kc.reaches(src, dst.ipv4)
    run = continuous_ping(src, dst.ipv4, 8.0)
    time.sleep(1.0)
    kc.kill_agent(node1, signal.SIGKILL)
    time.sleep(1.0)
    kc.start_agent(node1)
    await_condition(lambda: (kc.readyz(node1) or {}).get("ready"), 60, "node1's agent ready",
                    interval=0.2)
    sent, received = run.result()
    assert sent > 500 and received == sent, run.output
    log = kc.agent_log(node1)
    assert log.count("agent starting") >= 2


def test_api_server_down_for_30s_leaves_traffic_alone_and_agents_resume(
        kc: KubeCluster) -> None:
    nodes = members(kc)
    src, dst = nodes[0].pods[0], nodes[2].pods[0]
    run = continuous_ping(src, dst.ipv6, 34.0)
    time.sleep(1.0)
    kc.cp.stop_apiserver()
    time.sleep(30.0)
    kc.cp.start_apiserver()
    sent, received = run.result()
    assert received == sent, run.output
    # Watches resume: a node added after the restart reaches every agent.
    key = PrivateKey.generate().public_key
    kc.register("after-restart", ["10.252.0.1"], ["10.244.250.0/24"],
                annotations={"wgmanager.io/public-key": key.base64()})
    try:
        await_condition(lambda: all(key in kc.peer_keys(n) for n in nodes), 90,
                        "the post-restart node's peer on every node", interval=0.2)
    finally:
        kc.delete_node("after-restart")
    for node in nodes:
        assert (kc.readyz(node) or {}).get("ready"), json.dumps(kc.readyz(node))




def test_each_kind_of_node_change_touches_only_that_nodes_peer(kc: KubeCluster) -> None:
    """Address and key changes through the API; the other peers stay exactly as they were.

    (spec.podCIDRs is immutable in Kubernetes once set; a CIDR change is a delete and a
    re-create, which the join/delete tests cover.)
    """
    nodes = members(kc)
    key = PrivateKey.generate().public_key
    kc.register("shifty", ["10.253.0.1"], ["10.244.240.0/24"],
                annotations={"wgmanager.io/public-key": key.base64()})

    def others() -> dict[str, dict[PublicKey, Any]]:
        return {n.name: {k: st for k, st in kc.device(n).read().peers.items() if k != key
                         and k != new_key} for n in nodes}

    new_key = PrivateKey.generate().public_key
    try:
        await_condition(lambda: all(key in kc.peer_keys(n) for n in nodes), 30, "shifty's peer")
        before = others()

        kc.core.patch_node_status("shifty", {"status": {"addresses": [
            {"type": "InternalIP", "address": "10.253.0.2"}]}})

        def moved() -> bool:
            return all(str(kc.device(n).read().peers[key].endpoint) == "10.253.0.2:51820"
                       for n in nodes)
        await_condition(moved, 30, "shifty's endpoint to follow its address")

        kc.core.patch_node("shifty", {"metadata": {"annotations": {
            "wgmanager.io/public-key": new_key.base64()}}})
        await_condition(lambda: all(new_key in kc.peer_keys(n) and key not in kc.peer_keys(n)
                                    for n in nodes), 30, "shifty's peer to follow its new key")
        after = others()
        # Untouched means not removed and re-added: same configuration, and counters that
        # never went backwards (a re-created peer starts from zero). Handshake times and
        # counters may legitimately move meanwhile (rekeys, passive keepalives).
        assert {n: {k: st.config() for k, st in peers.items()} for n, peers in after.items()} \
            == {n: {k: st.config() for k, st in peers.items()} for n, peers in before.items()}
        for n, peers in before.items():
            for k, st in peers.items():
                assert after[n][k].rx_bytes >= st.rx_bytes and after[n][k].tx_bytes >= st.tx_bytes
    finally:
        kc.delete_node("shifty")


def test_pods_on_any_veth_are_encrypted_at_the_uplink(kc: KubeCluster) -> None:
    """Steering is at the uplink's egress: a pod's veth name does not matter."""
    node1, node2 = kc.topo.nodes[0], kc.topo.nodes[1]
    odd = topology._create_pod(kc.topo.prefix, node1.netns, node1.index, 8, kc.topo.pod_mtu,
                               host_ifname="cni8")
    target = node2.pods[0]
    with kc.capture("e2e-guard") as cap:
        assert kc.reaches(odd, target.ipv4)
        assert kc.reaches(odd, target.ipv6)
    assert cap.plaintext_pod_packets() == 0
    assert cap.wireguard_packets() > 0


def test_a_new_vxlan_device_gets_the_program_at_once(kc: KubeCluster) -> None:
    """An overlay CNI may create its VXLAN device after the agent started: the agent sees
    it on netlink and attaches to its egress without waiting for a resync (60 s)."""
    node1 = kc.topo.nodes[0]
    ns = ["ip", "-n", node1.netns]
    subprocess.run([*ns, "link", "add", "vxlate", "type", "vxlan", "id", "42", "dstport",
                    "4789", "local", node1.ipv4, "dev", "eth0"], check=True)
    try:
        subprocess.run([*ns, "link", "set", "vxlate", "up"], check=True)

        def attached() -> bool:
            out = subprocess.run(["ip", "netns", "exec", node1.netns, "tc", "filter", "show",
                                  "dev", "vxlate", "egress"],
                                 capture_output=True, text=True, check=False).stdout
            return "to_underlay" in out
        waited = await_condition(attached, 10, "the new VXLAN device's filter", interval=0.05)
        assert waited < 10  # the resync interval is 60 s: only the link watch explains this
    finally:
        subprocess.run([*ns, "link", "del", "vxlate"], check=False)


def test_losing_the_device_or_the_whole_agent_never_leaks(kc: KubeCluster) -> None:
    node1, node2 = kc.topo.nodes[0], kc.topo.nodes[1]
    src, dst = node1.pods[0], node2.pods[0]
    pidfile = kc.lab.node_dir(node1) / "wg" / "wgm0.pid"
    with kc.capture("e2e-device-loss") as cap:
        # wireguard-go dies under a live agent: packets drop (fail closed) until the agent
        # notices (device check every 2 s), restarts it and re-adds the peers.
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        await_condition(lambda: kc.reaches(src, dst.ipv4), 60, "traffic after device loss",
                        interval=0.5)
        # Agent and device die together; a new agent starts from the pinned maps alone.
        kc.kill_agent(node1, signal.SIGKILL)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert kc.ping(src, dst.ipv4, count=3, interval=0.05, wait=1)[1] == 0
        kc.start_agent(node1)
        await_condition(lambda: kc.reaches(src, dst.ipv4), 60, "traffic after agent restart",
                        interval=0.5)
    assert cap.plaintext_pod_packets() == 0, kc.diagnose()


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(kc: KubeCluster, node: topology.SimNode) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    res = subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, "-c",
                          "import urllib.request;print(urllib.request.urlopen("
                          "'http://127.0.0.1:9877/metrics',timeout=5).read().decode())"],
                         capture_output=True, text=True, check=True)
    out: Samples = {}
    for fam in text_string_to_metric_families(res.stdout):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_metrics_scraped_from_a_running_agent(kc: KubeCluster) -> None:
    node1, node2 = kc.topo.nodes[0], kc.topo.nodes[1]
    assert kc.reaches(node1.pods[0], node2.pods[0].ipv4)
    m = _scrape(kc, node1)

    def one(name: str, **labels: str) -> float:
        return next(v for lbl, v in m[name] if all(lbl.get(k) == x for k, x in labels.items()))

    others = len(members(kc)) - 1
    assert one("wgmanager_peers_expected") == others
    assert one("wgmanager_peers_configured") == others
    assert one("wgmanager_device_up") == 1
    assert one("wgmanager_kube_watch_up") == 1
    assert one("wgmanager_reconciles_total") >= 1
    assert one("wgmanager_datapath_packets_total", verdict="redirected") > 0
    assert one("wgmanager_wireguard_peers_transmit_bytes") > 0
    assert one("wgmanager_key_age_seconds") > 0
    assert one("wgmanager_node_event_to_configured_seconds_count") >= 1
    assert one("wgmanager_info", backend="userspace", interface="wgm0") == 1
    # bounded cardinality: no per-peer series unless --metrics-per-peer
    assert not any(name.startswith("wgmanager_peer_receive") for name in m)


def test_running_agents_never_map_bcc_or_llvm(kc: KubeCluster) -> None:
    """The agent attaches the program but compiled it in a child: its own address space
    holds no bcc, LLVM or clang (they cost ~60 MiB of RSS for the agent's whole life)."""
    for node in members(kc):
        pid = kc.lab.agent_pid(node)
        assert pid is not None, f"{node.name}'s agent is not running"
        mapped = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                  if len(line.split()) >= 6}
        assert not [m for m in mapped if any(lib in m for lib in ("libbcc", "LLVM", "clang"))]
        with IPRoute(netns=node.netns) as ipr:
            hooks = {a.hook for pod in node.pods for a in attachments(ipr, pod.host_ifname)}
            uplink = {a.hook for a in attachments(ipr, "eth0")}
        assert hooks == set()  # the pre-netfilter fast path is opt-in
        assert uplink == {Hook.TO_UNDERLAY}


def test_rejected_peers_become_kubernetes_events(kc: KubeCluster) -> None:
    node1 = members(kc)[0]
    kc.register("evented", ["10.254.0.1"], ["10.244.230.0/24"],
                annotations={"wgmanager.io/public-key": "not a key"})
    try:
        def found() -> bool:
            events = kc.core.list_namespaced_event(
                "default", field_selector=f"involvedObject.name={node1.name}").items
            return any(e.reason == "PeerRejected" and "evented" in e.message for e in events)
        await_condition(found, 30, "a PeerRejected event on node1", interval=0.5)
    finally:
        kc.delete_node("evented")


def test_a_first_start_fails_closed_before_the_node_list_arrives(kc: KubeCluster) -> None:
    """An agent that may GET its Node but not LIST Nodes never syncs: it must still close
    the datapath (its pods' traffic to other nodes drops, no plaintext) from its own Node."""
    node4, node1 = kc.topo.nodes[3], kc.topo.nodes[0]
    src, dst = node4.pods[0], node1.pods[0]
    rbac = k8s.RbacAuthorizationV1Api(kc.lab.api)
    rbac.create_cluster_role({"metadata": {"name": "get-only"}, "rules": [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]})
    rbac.create_cluster_role_binding({
        "metadata": {"name": "get-only"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "get-only"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                      "name": GET_ONLY_USER}]})
    # A fresh node: earlier tests left node4's datapath in place (as a stopped agent does).
    subprocess.run(["nsenter", f"--net=/run/netns/{node4.netns}", sys.executable, "-m",
                    "wgmanager", "teardown", *kc.lab.node_args(node4)], check=True,
                   capture_output=True)
    kc.register_node(node4)
    try:
        # Sanity: without node4's agent its requests cross in plaintext (the CNI's routes)
        # and the capture sees them; node1 already fails closed, so no reply comes back.
        with kc.capture("e2e-before-agent") as before:
            kc.ping(src, dst.ipv4, count=2, interval=0.05, wait=1)
        assert before.plaintext_pod_packets() >= 2
        kc.lab.start_agent(node4, kubeconfig=kc.lab.user_kubeconfig(GET_ONLY_USER))

        def closed() -> bool:
            out = subprocess.run(["ip", "netns", "exec", node4.netns, "tc", "filter", "show",
                                  "dev", "eth0", "egress"],
                                 capture_output=True, text=True, check=False).stdout
            return "to_underlay" in out
        await_condition(closed, 60, "node4's datapath to close", interval=0.2)
        with kc.capture("e2e-closed") as cap:
            assert kc.ping(src, dst.ipv4, count=3, interval=0.05, wait=1)[1] == 0
            assert kc.ping(src, dst.ipv6, count=3, interval=0.05, wait=1)[1] == 0
        assert cap.plaintext_pod_packets() == 0
        assert not (kc.readyz(node4) or {}).get("ready")  # never synced: not ready
    finally:
        kc.kill_agent(node4, signal.SIGKILL)
        kc.delete_node(node4.name)
