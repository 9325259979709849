"""The product as users install it: `helm install` of deploy/helm/wgmanager on a cluster of
real kubelets, judged by what the underlay carries and not by what the agent says.

Three real nodes (containerd + kubelet each, in network and mount namespaces of their own;
``kubelets.RealCluster``) with the agent image imported into every containerd. One busybox
pod per node. In order:

- before the chart: the pods reach each other (every pair, IPv4 and IPv6) and the capture
  on the underlay bridge sees their plaintext packets: the detector works;
- `helm install --set encryption.enabled=true` with the local image, the cluster's pod CIDRs
  and the node identity at the path every lab node keeps its kubelet's kubeconfig
  (/var/lib/kubelet/kubeconfig, certificates under /var/lib/kubelet/pki): every agent pod
  turns Ready, and so does every wireguard-go pod (a DaemonSet of its own, so that its
  tunnels outlive the agent's pod), each node publishes a key of
  its own (each node has its own /var/lib/wgmanager) and its WireGuard device holds a peer
  for every other node, read with `wg show` inside the node;
- the same pings pass with 0 plaintext pod packets and >0 WireGuard packets on the wire;
- uninstall as docs/install.md says (upgrade with encryption off and the teardown
  DaemonSet, wait for it, `helm uninstall`): the pods still reach each other, and that
  traffic is plaintext again, by design: the chart is gone and with it the encryption (the
  CNI's own routes carry it). (A bare `helm uninstall` would leave the filters steering
  into a WireGuard device that is gone: docs/install.md, Uninstall.)
- stopping the cluster leaves nothing behind.

The tests run in file order and share the cluster.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.harness import RUN_ROOT
from tests.integration.kube_pods import await_true, core, pod_exec
from wgmanager.errors import EnvironmentProblem
from wgmanager.kube.translate import PUBLIC_KEY_ANNOTATION
from wgmanager.lab import cgroups, chart, kubelets, topology
from wgmanager.lab.capture import Capture, capture
from wgmanager.lab.daemons import alive
from wgmanager.lab.kubelets import RealCluster

NODES = ("node1", "node2", "node3")
INTERFACE = "wgm0"  # the chart's default encryption.wireguard.interface
WG_PORTS = (51820, 51821)  # its listenPort and rotationListenPort
AGENT_SELECTOR = "app.kubernetes.io/component=agent"
WIREGUARD_GO_SELECTOR = "app.kubernetes.io/component=wireguard-go"
ENCRYPTION_SELECTOR = "app.kubernetes.io/component in (agent,wireguard-go)"
TIMINGS: dict[str, float] = {}
STARTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def kube() -> Iterator[RealCluster]:
    STARTED["module"] = time.monotonic()
    prefix = "wgh" + secrets.token_hex(2)
    cluster = RealCluster(prefix, RUN_ROOT / prefix, nodes=len(NODES),
                          image_names=("pause", "busybox", "wgmanager"), ready_timeout=240)
    try:
        try:
            cluster.start(progress=lambda m: print(f"  {m}", flush=True))
        except EnvironmentProblem as e:
            pytest.fail(str(e), pytrace=False)
        print("bring-up seconds: " + json.dumps({k: round(v, 1)
                                                  for k, v in cluster.timings.items()}))
        TIMINGS["bring-up"] = cluster.timings["total"]
        yield cluster
    finally:
        cluster.stop()
        print("timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


@pytest.fixture(scope="module")
def release(kube: RealCluster) -> chart.Release:
    assert kube.cp is not None
    return chart.Release(kube.cp.admin_kubeconfig)


@pytest.fixture(scope="module")
def pods(kube: RealCluster) -> dict[str, list[str]]:
    """One busybox pod per node, running: node -> its pod's addresses (IPv4, IPv6)."""
    api = core(kube)
    await_true(lambda: api.list_namespaced_service_account("default").items, 120,
               "the default ServiceAccount (pods need it)")
    busybox = kubelets.images(["busybox"])[0].ref
    for node in NODES:
        api.create_namespaced_pod("default", {
            "metadata": {"name": f"bb-{node}"},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "main", "image": busybox,
                                     "command": ["sleep", "3600"]}]}})
    addresses = {}
    for node in NODES:
        def running(node: str = node) -> Any:
            pod = api.read_namespaced_pod(f"bb-{node}", "default")
            return pod if pod.status.phase == "Running" and pod.status.pod_ips else None
        pod = await_true(running, 120, f"pod bb-{node} to run on {node}")
        addresses[node] = [i.ip for i in pod.status.pod_ips]
        assert [ipaddress.ip_address(a).version for a in addresses[node]] == [4, 6]
    return addresses


# Each destination: one echo; a miss is retried twice (a first packet may wait for a
# handshake, a loaded machine may be slow). Prints "ok ADDR" or "fail ADDR".
PING_ALL = ('for a in "$@"; do ok=fail; for i in 1 2 3; do '
            'if ping -c 1 -W 3 "$a" >/dev/null 2>&1; then ok=ok; break; fi; done; '
            'echo "$ok $a"; done')


def unreachable_pairs(kube: RealCluster, pods: dict[str, list[str]]) -> list[str]:
    """Every pod pings every other node's pod at each of its addresses; what failed."""
    api = core(kube)
    failures = []
    for src in NODES:
        targets = [a for dst in NODES if dst != src for a in pods[dst]]
        _, out = pod_exec(api, f"bb-{src}", ["sh", "-c", PING_ALL, "ping-all", *targets],
                          timeout=120)
        results = {address: verdict for verdict, address in
                   (line.split(maxsplit=1) for line in out.splitlines()
                    if line.startswith(("ok ", "fail ")))}
        failures += [f"bb-{src} -> {a}: {results.get(a, 'no result: ' + out[-300:])}"
                     for a in targets if results.get(a) != "ok"]
    return failures


@contextlib.contextmanager
def underlay_capture(kube: RealCluster, name: str) -> Iterator[Capture]:
    assert kube.topo is not None and kube.cp is not None
    with capture(kube.topo.underlay_netns, kube.topo.bridge, kube.root / f"{name}.pcap",
                 wg_ports=WG_PORTS, pod_nets=kube.cp.cluster_cidrs) as cap:
        yield cap


def node_run(kube: RealCluster, node: str, argv: list[str]) -> str:
    """``argv`` in the node's network and mount namespaces (its /run/wireguard)."""
    res = subprocess.run([*kube.node(node).enter(), *argv], capture_output=True, text=True,
                         timeout=60, check=False)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} on {node}: {res.stderr.strip()}")
    return res.stdout


def published_keys(kube: RealCluster) -> dict[str, str]:
    return {n.metadata.name: (n.metadata.annotations or {}).get(PUBLIC_KEY_ANNOTATION, "")
            for n in core(kube).list_node().items}


def test_without_the_chart_pod_traffic_is_plaintext_on_the_underlay(
        kube: RealCluster, pods: dict[str, list[str]]) -> None:
    """The sanity inversion: the detector sees pod packets when nothing encrypts them."""
    with underlay_capture(kube, "before") as cap:
        assert unreachable_pairs(kube, pods) == []
    assert cap.plaintext_pod_packets() > 0
    assert cap.wireguard_packets() == 0


def test_helm_install_turns_every_agent_pod_ready(kube: RealCluster, release: chart.Release,
                                                  pods: dict[str, list[str]]) -> None:
    assert kube.cp is not None
    image = kubelets.images(["wgmanager"])[0].ref
    values = chart.lab_values(image, kube.cp.cluster_cidrs)
    began = time.monotonic()
    release.install(values)
    chart.wait_daemonsets_ready(kube.api, release, nodes=len(NODES), timeout=300)
    TIMINGS["install to all Ready"] = time.monotonic() - began
    print(f"helm install to every agent pod Ready: {TIMINGS['install to all Ready']:.1f} s")

    agents = core(kube).list_namespaced_pod(release.namespace,
                                            label_selector=AGENT_SELECTOR).items
    assert sorted(p.spec.node_name for p in agents) == list(NODES)
    for pod in agents:
        assert chart.pod_ready(pod)
        assert [c.name for c in pod.status.container_statuses] == ["agent"]
    # wireguard-go in pods of its own, one per node, beside the agents'
    tunnels = core(kube).list_namespaced_pod(release.namespace,
                                             label_selector=WIREGUARD_GO_SELECTOR).items
    assert sorted(p.spec.node_name for p in tunnels) == list(NODES)
    assert all(map(chart.pod_ready, tunnels))
    # Each node's agent published a key of its own: the key dir is the node's, not shared.
    keys = await_true(lambda: (k := published_keys(kube)) and all(k.values()) and k, 60,
                      "every node's public key annotation")
    assert len(set(keys.values())) == len(NODES), keys


def test_every_nodes_wireguard_device_has_a_peer_for_every_other_node(
        kube: RealCluster) -> None:
    keys = published_keys(kube)

    def meshed() -> bool:
        return all(set(node_run(kube, node, ["wg", "show", INTERFACE, "peers"]).split())
                   == {k for n, k in keys.items() if n != node} for node in NODES)
    await_true(meshed, 60, "a peer for every other node on every node")
    for node in NODES:
        own = node_run(kube, node, ["wg", "show", INTERFACE, "public-key"]).strip()
        assert own == keys[node]


def test_with_the_chart_pods_reach_each_other_and_nothing_leaves_in_plaintext(
        kube: RealCluster, pods: dict[str, list[str]]) -> None:
    with underlay_capture(kube, "encrypted") as cap:
        assert unreachable_pairs(kube, pods) == []
    assert cap.plaintext_pod_packets() == 0, cap.lines(
        " or ".join(f"net {n}" for n in cap.pod_nets))[:20]
    assert cap.wireguard_packets() > 0


def test_after_teardown_and_uninstall_pods_still_reach_each_other_in_plaintext(
        kube: RealCluster, release: chart.Release, pods: dict[str, list[str]]) -> None:
    began = time.monotonic()
    release.upgrade({"encryption": {"enabled": False}, "teardown": {"enabled": True}})
    TIMINGS["upgrade to teardown Ready"] = chart.wait_daemonset_ready(
        kube.api, f"{release.name}-teardown", release.namespace, nodes=len(NODES),
        timeout=240)
    # No agent may still run (it would put its datapath back) when the pings below judge.
    TIMINGS["then agent and wireguard-go pods gone"] = chart.wait_daemonset_gone(
        kube.api, ENCRYPTION_SELECTOR, release.namespace, timeout=120)
    release.uninstall()
    TIMINGS["teardown + uninstall"] = time.monotonic() - began
    # The teardown pods are not waited for: their idle container (`sleep infinity`, PID 1,
    # which ignores SIGTERM) lingers for its 30 s grace period, and they touch nothing more.

    for node in NODES:  # the teardown removed each node's WireGuard device
        links = node_run(kube, node, ["ip", "-o", "link", "show"])
        assert f" {INTERFACE}:" not in links and f" {INTERFACE}r:" not in links, links
    with underlay_capture(kube, "uninstalled") as cap:
        assert unreachable_pairs(kube, pods) == []
    assert cap.plaintext_pod_packets() > 0  # by design: no chart, no encryption
    assert cap.wireguard_packets() == 0


def test_stop_leaves_nothing_behind(kube: RealCluster) -> None:
    assert kube.topo is not None
    netns = [n.netns for n in kube.topo.nodes]
    pids = {p for ns in netns for p in topology.pids_in(ns)}
    pids |= {p for kn in kube.nodes for p in cgroups.pids(kn.cgroup)}
    assert kubelets.leftovers(kube.root, kube.prefix)  # the detector sees a live cluster

    began = time.monotonic()
    kube.stop()
    TIMINGS["stop"] = time.monotonic() - began
    TIMINGS["module total"] = time.monotonic() - STARTED["module"]

    assert kubelets.leftovers(kube.root, kube.prefix) == []
    assert [p for p in pids if alive(p)] == []
    assert not set(netns) & set(topology.namespaces(kube.prefix))
