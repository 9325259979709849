"""The lab's nodes can be real Kubernetes nodes: containerd + kubelet in each node namespace.

What wgmanager will build on, each proven here against the real binaries: Nodes register
and turn Ready with podCIDRs from the controller-manager; the scheduler places a pod on each
node; pods get IPv4 and IPv6 addresses from the CNI and reach each other across nodes over
the underlay routes; pods reach the API at the `kubernetes` Service address; a kubelet's
own credentials may annotate its own Node but not another's (Node authorizer +
NodeRestriction: the identity the agent will publish its key with). Then: stopping leaves
nothing behind, and neither does the harness's stale-run cleanup after a killed owner.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.integration.harness import RUN_ROOT, remove_stale_runs
from tests.integration.kube_pods import await_true, core, pod_exec
from wgmanager.errors import EnvironmentProblem
from wgmanager.lab import cgroups, kubelets, topology
from wgmanager.lab.daemons import alive
from wgmanager.lab.kubelets import RealCluster

REPO = Path(__file__).resolve().parents[2]
MERGE = "application/merge-patch+json"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def new_prefix() -> str:
    return "wgk" + secrets.token_hex(2)


@pytest.fixture(scope="module")
def kube() -> Iterator[RealCluster]:
    prefix = new_prefix()
    cluster = RealCluster(prefix, RUN_ROOT / prefix, nodes=2)
    try:
        try:
            cluster.start(progress=lambda m: print(f"  {m}", flush=True))
        except EnvironmentProblem as e:
            pytest.fail(str(e), pytrace=False)
        print("bring-up seconds: " + json.dumps({k: round(v, 1)
                                                  for k, v in cluster.timings.items()}))
        yield cluster
    finally:
        cluster.stop()


def busybox_ref() -> str:
    return kubelets.images(["busybox"])[0].ref


def run_pod(api: Any, name: str, node: str) -> Any:
    """A busybox pod that sleeps, placed by the scheduler on ``node``; returns it Running."""
    api.create_namespaced_pod("default", {
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                 "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "main", "image": busybox_ref(),
                                 "command": ["sleep", "3600"]}]}})

    def running() -> Any:
        pod = api.read_namespaced_pod(name, "default")
        return pod if pod.status.phase == "Running" and pod.status.pod_ips else None
    return await_true(running, 60, f"pod {name} to run on {node}")


def test_nodes_register_and_turn_ready_with_dual_stack_pod_cidrs(kube: RealCluster) -> None:
    nodes = {n.metadata.name: n for n in core(kube).list_node().items}
    assert set(nodes) == {"node1", "node2"}
    assert kube.topo is not None
    for sim in kube.topo.nodes:
        node = nodes[sim.name]
        internal = [a.address for a in node.status.addresses if a.type == "InternalIP"]
        assert internal == [sim.ipv4]
        assert [ipaddress.ip_network(c).version for c in node.spec.pod_cidrs] == [4, 6]
        assert node.status.node_info.container_runtime_version == "containerd://1.6.20"
    cidrs = [c for n in nodes.values() for c in n.spec.pod_cidrs]
    assert len(set(cidrs)) == 4  # the controller-manager gave each node its own pair
    print(f"bring-up {kube.timings['total']:.1f} s; kubelets started to Nodes Ready "
          f"{kube.timings['kubelets']:.1f} s")


def test_pods_on_different_nodes_reach_each_other_and_the_api(kube: RealCluster) -> None:
    api = core(kube)
    await_true(lambda: api.list_namespaced_service_account("default").items, 60,
               "the default ServiceAccount (pods need it)")
    pods = {node: run_pod(api, f"bb-{node}", node) for node in ("node1", "node2")}
    ips = {node: [i.ip for i in pod.status.pod_ips] for node, pod in pods.items()}
    for node, addresses in ips.items():
        assert len(addresses) == 2, addresses  # one IPv4, one IPv6
        cidrs = api.read_node(node).spec.pod_cidrs
        assert all(any(_within(a, c) for c in cidrs) for a in addresses), (addresses, cidrs)

    failures = []
    for src, dst in (("node1", "node2"), ("node2", "node1")):
        for address in ips[dst]:
            code, out = pod_exec(api, f"bb-{src}", ["ping", "-c", "2", "-W", "2", address])
            if code != 0:
                failures.append(f"bb-{src} -> bb-{dst} {address}: {out.strip()[-200:]}")
    assert failures == []

    # As with kube-proxy: the Service address the kubelet tells pods about reaches the API;
    # and pods carry a service-account token (the controller-manager's token controller).
    code, out = pod_exec(api, "bb-node1", ["sh", "-c", "nc -w 3 $KUBERNETES_SERVICE_HOST "
                                                     "$KUBERNETES_SERVICE_PORT </dev/null"])
    assert code == 0, out
    code, out = pod_exec(api, "bb-node2", ["cat", f"{TOKEN_DIR}/namespace", f"{TOKEN_DIR}/token"])
    assert code == 0 and out.startswith("default") and len(out) > 100, out


def test_a_kubelet_may_annotate_its_own_node_but_not_another(kube: RealCluster) -> None:
    node1 = client.CoreV1Api(config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kube.node("node1").kubeconfig)))
    with pytest.raises(ApiException) as denied:
        node1.patch_node("node2", {"metadata": {"annotations": {"wgmanager.io/test": "x"}}},
                         _content_type=MERGE)
    assert denied.value.status == 403
    assert "not allowed to modify node" in denied.value.body  # NodeRestriction says why

    node1.patch_node("node1", {"metadata": {"annotations": {"wgmanager.io/test": "mine"}}},
                     _content_type=MERGE)
    annotations = core(kube).read_node("node1").metadata.annotations
    assert annotations["wgmanager.io/test"] == "mine"
    assert "wgmanager.io/test" not in (core(kube).read_node("node2").metadata.annotations
                                       or {})


def test_stop_leaves_nothing_behind(kube: RealCluster) -> None:
    assert kube.topo is not None
    netns = [n.netns for n in kube.topo.nodes]
    # Per node: holder, containerd, kubelet and a shim in its namespace; pause and sleep
    # in the pod's cgroup.
    node_pids = {p for ns in netns for p in topology.pids_in(ns)}
    pod_pids = {p for kn in kube.nodes for p in cgroups.pids(kn.cgroup)}
    assert len(node_pids) >= 2 * 4 and len(pod_pids) >= 2 * 2, (node_pids, pod_pids)
    pids = node_pids | pod_pids
    assert kubelets.leftovers(kube.root, kube.prefix)  # the detector sees a live cluster

    started = time.monotonic()
    kube.stop()
    print(f"stopped in {time.monotonic() - started:.1f} s")

    assert kubelets.leftovers(kube.root, kube.prefix) == []
    assert [p for p in pids if alive(p)] == []
    assert not set(netns) & set(topology.namespaces(kube.prefix))


CRASHED_OWNER = """
import sys, time
from pathlib import Path
from kubernetes import client
from wgmanager.lab.kubelets import RealCluster, images
prefix, root = sys.argv[1], Path(sys.argv[2])
cluster = RealCluster(prefix, root, nodes=1)
cluster.start()
api = client.CoreV1Api(cluster.api)
while not api.list_namespaced_service_account("default").items:
    time.sleep(0.2)
api.create_namespaced_pod("default", {"metadata": {"name": "bb"}, "spec": {
    "containers": [{"name": "main", "image": images(["busybox"])[0].ref,
                    "command": ["sleep", "3600"]}]}})
while api.read_namespaced_pod("bb", "default").status.phase != "Running":
    time.sleep(0.2)
print("up", flush=True)
time.sleep(600)
"""


def test_a_killed_owners_cluster_is_removed_by_the_stale_run_cleanup() -> None:
    """The owner dies without stop(): the harness's remove_stale_runs (what every test
    session starts with) removes its nodes, pods, cgroups, control plane and namespaces."""
    prefix = new_prefix()
    root = RUN_ROOT / prefix
    owner = subprocess.Popen([sys.executable, "-c", CRASHED_OWNER, prefix, str(root)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        up = owner.stdout.readline().strip() == "up" if owner.stdout else False
    finally:
        owner.kill()  # the crash: no stop(), no cleanup
        _, err = owner.communicate()
    assert up, f"the owner did not bring its cluster up: {err[-2000:]}"
    assert kubelets.leftovers(root, prefix)  # its processes outlive it

    removed = remove_stale_runs()

    assert prefix in removed
    assert kubelets.leftovers(root, prefix) == []


def _within(address: str, cidr: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(cidr)
