"""A simulated cluster on a real API server, with one real `wgmanager agent` per node.

Builds on the integration harness (namespaces, pods, captures, probes) and adds:
a real etcd + kube-apiserver (TLS, token auth, RBAC) reachable from the nodes over the
underlay through a host link; Node objects registered the way a kubelet and the
node-IPAM controller would (InternalIPs in status, podCIDRs in spec); a least-privilege
token for the agents, bound to the ClusterRole documented in docs/install.md; and one agent
process per node inside its network namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from kubernetes import client as k8s

from tests.integration.harness import CLUSTER_CIDRS, Cluster
from wgmanager.core.keys import PublicKey
from wgmanager.lab.controlplane import ControlPlane
from wgmanager.lab.topology import SimNode, Topology
from wgmanager.wireguard.userspace import UserspaceBackend

AGENT_USER = "wgmanager-agent"
# The least RBAC the agent needs: read and watch all Nodes, patch its own annotation.
AGENT_RULES = [{"apiGroups": [""], "resources": ["nodes"],
                "verbs": ["get", "list", "watch", "patch"]}]


def await_condition(cond: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """Polls until ``cond()`` is truthy; returns the seconds it took. Raises on timeout."""
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class KubeCluster(Cluster):
    def __init__(self, topo: Topology) -> None:
        super().__init__(topo)
        assert topo.host_address, "the API server needs the host link"
        self.cp = ControlPlane(self.run_dir / "controlplane", bind_address=topo.host_address,
                               secure_port=6443)
        self.agent_token = self.cp.add_token(AGENT_USER)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_kubeconfig = self.run_dir / "agent.kubeconfig"

    # -- control plane --------------------------------------------------------------------

    def start_control_plane(self) -> None:
        self.cp.start()
        self.cp.write_kubeconfig(self.agent_kubeconfig, self.agent_token)
        self.api = self.cp.api_client()
        self.core = k8s.CoreV1Api(self.api)
        rbac = k8s.RbacAuthorizationV1Api(self.api)
        rbac.create_cluster_role({"metadata": {"name": "wgmanager-agent"},
                                  "rules": AGENT_RULES})
        rbac.create_cluster_role_binding({
            "metadata": {"name": "wgmanager-agent"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "wgmanager-agent"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": AGENT_USER}]})

    def register_node(self, node: SimNode, *, annotations: dict[str, str] | None = None) -> None:
        """As kubelet (status.addresses) and the node-IPAM controller (spec.podCIDRs) would."""
        self.register(node.name, [node.ipv4, node.ipv6], [node.pod_cidr4, node.pod_cidr6],
                      annotations=annotations)

    def register(self, name: str, addresses: list[str], pod_cidrs: list[str], *,
                 annotations: dict[str, str] | None = None) -> None:
        self.core.create_node({"metadata": {"name": name, "annotations": annotations or {}},
                               "spec": {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}})
        self.core.patch_node_status(name, {"status": {"addresses": [
            {"type": "InternalIP", "address": a} for a in addresses]}})

    def delete_node(self, name: str) -> None:
        self.core.delete_node(name)

    def annotation(self, name: str) -> str | None:
        try:
            node = self.core.read_node(name)
        except k8s.ApiException:
            return None
        return (node.metadata.annotations or {}).get("wgmanager.io/public-key")

    # -- agents -----------------------------------------------------------------------------

    def start_agent(self, node: SimNode) -> None:
        log = open(self.run_dir / f"{node.name}-agent.log", "ab")  # noqa: SIM115
        argv = ["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-m", "wgmanager",
                "agent", "--node-name", node.name, "--kubeconfig", str(self.agent_kubeconfig),
                "--cluster-cidrs", ",".join(CLUSTER_CIDRS), *self.node_args(node)]
        self.agents[node.name] = subprocess.Popen(argv, stdout=log, stderr=log,
                                                  start_new_session=True)
        log.close()

    def kill_agent(self, node: SimNode, sig: int = signal.SIGKILL) -> None:
        proc = self.agents.pop(node.name)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)

    def agent_log(self, node: SimNode) -> str:
        path = self.run_dir / f"{node.name}-agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def readyz(self, node: SimNode) -> dict[str, Any] | None:
        res = subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, "-c",
                              "import urllib.request,sys\n"
                              "try:\n"
                              " r=urllib.request.urlopen('http://127.0.0.1:9876/readyz',"
                              "timeout=2); print(r.read().decode())\n"
                              "except Exception as e: sys.exit(1)"],
                             capture_output=True, text=True, check=False)
        return json.loads(res.stdout) if res.returncode == 0 and res.stdout else None

    # -- the device as each node holds it -----------------------------------------------

    def device(self, node: SimNode) -> UserspaceBackend:
        return UserspaceBackend("wgm0", socket_dir=self.run_dir / node.name / "wg", spawn=False)

    def peer_keys(self, node: SimNode) -> set[PublicKey]:
        dev = self.device(node)
        with contextlib.suppress(Exception):
            if dev.device_exists():
                return set(dev.read().peers)
        return set()

    def expected_keys(self, node: SimNode, members: list[SimNode]) -> set[PublicKey]:
        keys = set()
        for other in members:
            if other.name != node.name:
                value = self.annotation(other.name)
                if value:
                    keys.add(PublicKey.from_base64(value))
        return keys

    def converged(self, members: list[SimNode]) -> bool:
        if any(self.annotation(n.name) is None for n in members):
            return False
        return all(self.peer_keys(n) == self.expected_keys(n, members) for n in members)

    def diagnose(self) -> str:
        """Each node's datapath, device and neighbours: attached to assertion messages."""
        from wgmanager.datapath.maps import PinnedMaps

        out = []
        for node in self.topo.nodes:
            if node.name not in self.agents:
                continue
            with contextlib.suppress(Exception), PinnedMaps(self.pin_root / node.name) as m:
                out.append(f"{node.name} map={m.read_cidrs()} counters={m.read_counters()}")
            with contextlib.suppress(Exception):
                out.append(f"{node.name} peers={self.device(node).read().peers}")
            res = subprocess.run(["ip", "netns", "exec", node.netns, "ip", "-6", "neigh"],
                                 capture_output=True, text=True, check=False)
            out.append(f"{node.name} neigh6={res.stdout.strip()!r}")
            out.append(f"{node.name} log tail={self.agent_log(node)[-600:]!r}")
        return "\n".join(out)

    def cleanup(self) -> None:
        for name in list(self.agents):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.agents.pop(name).pid, signal.SIGKILL)
        self.cp.stop()
        super().cleanup()


def free_underlay() -> str:
    """A 10.x.0 /24 no route on this machine covers, for the host link."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=False).stdout
    for second in range(90, 99):
        if f"10.{second}.0." not in routes:
            return f"10.{second}.0"
    raise RuntimeError("no free 10.9x.0.0/24 for the e2e underlay")


