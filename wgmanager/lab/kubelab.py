"""`wgmanager lab up` as users install wgmanager: the Helm chart on real kubelets.

A ``KubeLab`` is a ``kubelets.RealCluster`` (per node a network and mount namespace with
its own containerd and kubelet, authenticated as system:node:NAME; etcd, kube-apiserver
with Node,RBAC and NodeRestriction, controller-manager and scheduler) plus:

- busybox pods on every node, created through the API and wired by the CNI like any pod;
  each pod's network namespace is also given a name (``ip netns attach``), so the proof
  runs this machine's ping and TCP probe inside it (``proof``, ``traffic``);
- `helm install` of deploy/helm/wgmanager with ``encryption.enabled=true``, the agent image
  imported into every node and the kubelets' own identities (``chart.lab_values``), and a
  wait until every agent pod is Ready and every node holds a peer for every other node.

Its state (``kubelab.json`` under ``root``) lets later commands (status, check, exec, down)
find everything again; ``down`` removes it all from names alone (``kubelets.cleanup``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from wgmanager.errors import ConfigError
from wgmanager.kube.translate import PUBLIC_KEY_ANNOTATION
from wgmanager.lab import cgroups, chart, kubelets, nodenet, proof, topology
from wgmanager.lab.capture import Capture, capture
from wgmanager.lab.controlplane import ClusterTrust
from wgmanager.lab.kubelets import KubeNode, RealCluster
from wgmanager.lab.lab import LabError, await_condition
from wgmanager.lab.topology import Pod, SimNode, Topology

STATE_FILE = "kubelab.json"
STARTUP_TAINT_KEY = "wgmanager.io/agent-not-ready"
STARTUP_TAINT = f"{STARTUP_TAINT_KEY}=true:NoSchedule"  # as kubelets register it
API_PORT = 6443
IMAGES = ("pause", "busybox", "wgmanager")
WG_PORTS = (51820, 51821)  # the chart's listenPort and rotationListenPort
AGENT_SELECTOR = "app.kubernetes.io/component=agent"
POD_NAMESPACE = "default"
# Longer than any lab lives (busybox's sleep has no "infinity").
POD_COMMAND = ["sleep", "2147483647"]
Progress = Callable[[str], None]


class KubeLab:
    def __init__(self, root: Path, *, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.topo: Topology | None = None
        self.nodes: list[KubeNode] = []
        self.cluster_cidrs: tuple[str, ...] = ()
        self.sandbox_image = ""
        self._api: k8s.ApiClient | None = None

    # -- layout -----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "controlplane" / "admin.kubeconfig"

    @property
    def topology(self) -> Topology:
        if self.topo is None:
            raise LabError("no lab is running here; start one with `wgmanager lab up`")
        return self.topo

    @property
    def pods(self) -> list[Pod]:
        return self.topology.pods

    @property
    def release(self) -> chart.Release:
        return chart.Release(self.admin_kubeconfig)

    @property
    def api(self) -> k8s.ApiClient:
        if self._api is None:
            self._api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=str(self.admin_kubeconfig))
        return self._api

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.api)

    def node(self, name: str) -> KubeNode:
        for kn in self.nodes:
            if kn.node.name == name:
                return kn
        raise ConfigError(f"no node named {name!r} in the lab; one of: "
                          f"{', '.join(kn.node.name for kn in self.nodes)}")

    # -- up ---------------------------------------------------------------------------------

    def up(self, *, nodes: int = 3, pods_per_node: int = 2,
           progress: Progress = lambda _: None, timeout: float = 300.0) -> None:
        """Builds the cluster, its pods and the chart; on failure removes everything."""
        if nodes < 2 or nodes > 10:
            raise ConfigError("--nodes must be between 2 and 10 for a lab of real kubelets "
                              "(each node runs a containerd and a kubelet)")
        if pods_per_node < 1 or pods_per_node > 20:
            raise ConfigError("--pods-per-node must be between 1 and 20")
        if self.state_file.exists() or topology.namespaces(self.prefix):
            raise LabError(f"a lab already exists under {self.root} (prefix {self.prefix}); "
                           "see `wgmanager lab status`, or remove it with `wgmanager lab down`")
        cluster = RealCluster(self.prefix, self.root, nodes=nodes, image_names=IMAGES,
                              ready_timeout=timeout, register_taints=(STARTUP_TAINT,))
        try:
            cluster.start(progress)
            assert cluster.topo is not None and cluster.cp is not None
            self.topo, self.nodes = cluster.topo, cluster.nodes
            self.cluster_cidrs = cluster.cp.cluster_cidrs
            self.sandbox_image = kubelets.images(["pause"])[0].ref
            self._save()
            # Nodes register with the startup taint: no pod of ours runs before its node's
            # agent does (what users get with startupTaint.enabled).
            progress("helm install wgmanager --set encryption.enabled=true (the local image)")
            image = kubelets.images(["wgmanager"])[0].ref
            self.release.install(chart.lab_values(image, self.cluster_cidrs,
                                                  startup_taint=True), timeout=timeout)
            waited = chart.wait_daemonsets_ready(self.api, self.release, nodes=nodes,
                                                 timeout=timeout)
            progress(f"every wgmanager pod Ready {waited:.1f}s after the install")
            await_condition(lambda: not self.tainted_nodes(), timeout,
                            f"the startup taint ({STARTUP_TAINT_KEY}) to leave every node", 0.5)
            progress(f"pods: {pods_per_node} busybox pod(s) per node")
            self._start_pods(pods_per_node, timeout)
            self._save()
            progress("waiting for every node to hold a peer for every other node")
            waited = await_condition(self.converged, timeout, "the mesh to converge", 0.5)
            progress(f"converged in {waited:.1f}s")
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise

    def _start_pods(self, per_node: int, timeout: float,
                    only: Sequence[str] | None = None) -> None:
        """``per_node`` busybox pods on every node (or those named in ``only``)."""
        core = self.core
        await_condition(lambda: core.list_namespaced_service_account(POD_NAMESPACE).items,
                        timeout, "the default ServiceAccount (pods need it)", 0.5)
        busybox = kubelets.images(["busybox"])[0].ref
        names = {sim.name: [f"{sim.name}-pod{j}" for j in range(1, per_node + 1)]
                 for sim in self.topology.nodes if only is None or sim.name in only}
        for node, pods in names.items():
            for name in pods:
                core.create_namespaced_pod(POD_NAMESPACE, {
                    "metadata": {"name": name, "labels": {"app": "wgmanager-lab"}},
                    "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                             "terminationGracePeriodSeconds": 0,
                             "containers": [{"name": "main", "image": busybox,
                                             "command": POD_COMMAND}]}})
        nodes = []
        for sim in self.topology.nodes:
            attached = tuple(self._attach_pod(sim, j, name, timeout)
                             for j, name in enumerate(names.get(sim.name, []), start=1))
            nodes.append(SimNode(**{**_fields(sim), "pods": sim.pods + attached}))
        self.topo = Topology(**{**_fields(self.topology), "nodes": tuple(nodes)})

    def _attach_pod(self, sim: SimNode, index: int, name: str, timeout: float) -> Pod:
        """Waits for the pod to run, names its network namespace, finds its host veth."""
        def running() -> Any:
            pod = self.core.read_namespaced_pod(name, POD_NAMESPACE)
            return pod if pod.status.phase == "Running" and pod.status.pod_ips else None
        await_condition(running, timeout, f"pod {name} to run on {sim.name}", 0.5)
        pod = running()
        kn = self.node(sim.name)
        pids = cgroups.pids_of_pod(kn.cgroup, pod.metadata.uid)
        if not pids:
            raise LabError(f"pod {name} runs but none of its processes is under "
                           f"{kn.cgroup}'s cgroups")
        netns = f"{sim.netns}p{index}"
        topology.run(["ip", "netns", "attach", netns, str(min(pids))])
        link = json.loads(topology.run(["ip", "-n", netns, "-j", "link", "show", "eth0"])
                          .stdout)[0]
        host = json.loads(topology.run(["ip", "-n", sim.netns, "-j", "link", "show"]).stdout)
        host_ifname = next(li["ifname"] for li in host if li["ifindex"] == link["link_index"])
        ips = [i.ip for i in pod.status.pod_ips]
        ipv4 = next(a for a in ips if ":" not in a)
        ipv6 = next((a for a in ips if ":" in a), "")
        return Pod(name, netns, sim.name, host_ifname, ipv4, ipv6)

    # -- nodes joining and leaving --------------------------------------------------------

    def tainted_nodes(self) -> list[str]:
        """Nodes still carrying the startup taint (their agent is not Ready yet)."""
        return [n.metadata.name for n in self.core.list_node().items
                if any(t.key == STARTUP_TAINT_KEY for t in n.spec.taints or [])]

    def add_node(self, *, pods: int = 1, timeout: float = 300.0,
                 startup_taint: bool = True, agent_image: bool = True) -> SimNode:
        """A new node joins as in a real cluster: its namespace on the underlay, containerd,
        a kubelet that registers its Node (with the startup taint unless told otherwise);
        routes to and from it; then its pods. The DaemonSets place their pods on it by
        themselves (the caller waits for them). Without ``agent_image`` the node lacks the
        wgmanager image, so its agent cannot start (tests: a node whose agent is late)."""
        topo = self.topology
        self.topo = topology.add_node(topo, self._next_index())
        sim = self.topology.nodes[-1]
        self._save()  # `down` finds it even if the rest fails
        nodenet.dead_end_route(sim.netns)
        trust = ClusterTrust.of(self.root / "controlplane",
                                f"https://{topo.host_address}:{API_PORT}")
        wanted = kubelets.images(["pause", *(n for n in IMAGES if n != "pause"
                                              and (agent_image or n != "wgmanager"))])
        joined = kubelets.start_nodes([sim], self.root, trust, prefix=self.prefix,
                                      pod_mtu=topo.pod_mtu, images=wanted, timings={},
                                      register_taints=(STARTUP_TAINT,) if startup_taint
                                      else ())
        self.nodes.append(joined[0])
        kubelets.wait_ready(self.api, joined, timeout, self.root)
        kubelets.sync_routes(self.api, self.topology, API_PORT)
        return self.add_pods(sim.name, pods, timeout) if pods else sim

    def add_pods(self, node: str, count: int, timeout: float = 300.0) -> SimNode:
        """``count`` busybox pods on a node that has none yet; returns once they run."""
        self._start_pods(count, timeout, only=[node])
        self._save()
        return self.topology.node(node)

    def _next_index(self) -> int:
        return max(n.index for n in self.topology.nodes) + 1

    def next_node_name(self) -> str:
        """The name the next ``add_node`` gives its node (pods can wait for it)."""
        return f"node{self._next_index()}"

    def remove_node(self, name: str) -> None:
        """A node leaves: its kubelet, containerd and pods stop and its Node is deleted (as
        `kubectl delete node` after draining a machine that is gone)."""
        kn = self.node(name)
        kn.stop()
        with contextlib.suppress(k8s.ApiException):
            self.core.delete_node(name)
        # Its pods' objects too, at once (the pod garbage collector would, in a while): a
        # node joining later under the same name starts clean.
        for pod in self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={name}").items:
            with contextlib.suppress(k8s.ApiException):
                self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                                grace_period_seconds=0)
        self.nodes.remove(kn)
        self.topo = topology.remove_node(self.topology, name)
        shutil.rmtree(kn.dir, ignore_errors=True)
        self._save()

    # -- what the nodes hold ----------------------------------------------------------------

    def node_run(self, node: str, argv: Sequence[str]) -> str:
        """``argv`` in the node's network and mount namespaces (its /run/wireguard)."""
        res = subprocess.run([*self.node(node).enter(), *argv], capture_output=True,
                             text=True, timeout=60, check=False)
        if res.returncode != 0:
            raise LabError(f"{' '.join(argv)} on {node}: {res.stderr.strip()}")
        return res.stdout

    def published_keys(self) -> dict[str, str]:
        return {n.metadata.name: (n.metadata.annotations or {}).get(PUBLIC_KEY_ANNOTATION, "")
                for n in self.core.list_node().items}

    def wireguard(self, node: str) -> dict[str, Any]:
        """The node's WireGuard device with the most peers (key rotation briefly runs two):
        its name, peers and handshakes. Never the private key (no `wg show dump`)."""
        best: dict[str, Any] = {"interface": None, "peers": [], "handshakes": {}}
        with contextlib.suppress(LabError):
            for ifname in self.node_run(node, ["wg", "show", "interfaces"]).split():
                peers = self.node_run(node, ["wg", "show", ifname, "peers"]).split()
                if len(peers) >= len(best["peers"]):
                    shakes = dict(line.split() for line in self.node_run(
                        node, ["wg", "show", ifname, "latest-handshakes"]).splitlines()
                        if line.strip())
                    best = {"interface": ifname, "peers": peers,
                            "handshakes": {k: int(v) for k, v in shakes.items() if v != "0"}}
        return best

    def converged(self) -> bool:
        keys = self.published_keys()
        if not all(keys.values()):
            return False
        return all(set(self.wireguard(kn.node.name)["peers"])
                   == {k for n, k in keys.items() if n != kn.node.name} for kn in self.nodes)

    def agent_pods(self) -> dict[str, Any]:
        """Node name -> its agent pod."""
        pods = self.core.list_namespaced_pod(self.release.namespace,
                                             label_selector=AGENT_SELECTOR).items
        return {p.spec.node_name: p for p in pods if p.spec.node_name}

    def agent_pids(self, kn: KubeNode) -> list[int]:
        """The node's agent processes (in its pods' cgroups), found by their command line."""
        found = []
        for pid in cgroups.pids(kn.cgroup):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"agent" in argv and any(a.endswith(b"wgmanager") for a in argv):
                    found.append(pid)
        return found

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        topo = self.topology
        api_nodes = {n.metadata.name: n for n in self.core.list_node().items}
        agents = self.agent_pods()
        keys = self.published_keys()
        nodes = []
        for sim in topo.nodes:
            api_node = api_nodes.get(sim.name)
            pod = agents.get(sim.name)
            wg = self.wireguard(sim.name)
            nodes.append({
                "name": sim.name, "netns": sim.netns, "ipv4": sim.ipv4, "ipv6": sim.ipv6,
                "ready": api_node is not None and kubelets.node_ready(api_node),
                "pod_cidrs": list(api_node.spec.pod_cidrs or []) if api_node else [],
                "agent": {"pod": pod.metadata.name if pod else None,
                          "running": bool(pod and pod.status.phase == "Running"),
                          "ready": bool(pod and chart.pod_ready(pod)),
                          "restarts": sum(c.restart_count for c in
                                          (pod.status.container_statuses or []))
                          if pod else 0},
                "wireguard": {"interface": wg["interface"], "peers": len(wg["peers"]),
                              "peers_expected": sum(1 for n in keys if n != sim.name),
                              "handshakes": len(wg["handshakes"])},
                "pods": [{"name": p.name, "netns": p.netns, "ipv4": p.ipv4, "ipv6": p.ipv6}
                         for p in sim.pods],
            })
        return {"schema": 1, "agents": "daemonset", "prefix": self.prefix,
                "root": str(self.root), "kubeconfig": str(self.admin_kubeconfig),
                "apiserver": f"https://{topo.host_address}:{API_PORT}",
                "underlay": {"netns": topo.underlay_netns, "interface": topo.bridge,
                             "host_address": topo.host_address},
                "cluster_cidrs": list(self.cluster_cidrs), "nodes": nodes}

    # -- check (proof.Provable) -------------------------------------------------------------

    def check(self, progress: Progress = lambda _: None,
              tcp_port: int = 7070) -> proof.CheckReport:
        return proof.check(self, progress, tcp_port)

    def capture(self, name: str) -> contextlib.AbstractContextManager[Capture]:
        topo = self.topology
        return capture(topo.underlay_netns, topo.bridge, self.root / f"{name}.pcap",
                       wg_ports=WG_PORTS, pod_nets=self.cluster_cidrs)

    def detach_datapaths(self) -> None:
        for sim in self.topology.nodes:
            _tc(sim.netns, ["filter", "del", "dev", "eth0", "egress", "pref", "10"])
            for pod in sim.pods:
                _tc(sim.netns, ["filter", "del", "dev", pod.host_ifname, "ingress", "pref",
                                "10"])

    def reattach_datapaths(self) -> None:
        for kn in self.nodes:
            for pid in self.agent_pids(kn):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
        await_condition(self._all_attached, 60, "every agent to re-attach its datapath", 0.2)

    def _all_attached(self) -> bool:
        for sim in self.topology.nodes:
            # Steering is at the uplink's egress (pod veths carry nothing by default).
            if "to_underlay" not in _tc(sim.netns, ["filter", "show", "dev", "eth0",
                                                    "egress"]):
                return False
        return True

    # -- exec -------------------------------------------------------------------------------

    def exec(self, name: str, argv: list[str]) -> int:
        """A command in a node (its network and mount namespaces, so `wg show` and
        `wgmanager status` find what the agent pod made) or in a pod's network namespace."""
        if not argv:
            raise ConfigError("nothing to run: wgmanager lab exec NAME -- COMMAND [ARGS...]")
        for sim in self.topology.nodes:
            if sim.name == name:
                env = {**os.environ, "NODE_NAME": name,
                       "KUBECONFIG": str(self.admin_kubeconfig)}
                enter = self.node(name).enter()  # ends with "--"
                # Entering a mount namespace starts in its "/": keep the caller's directory
                # (`lab exec node1 -- .venv/bin/wgmanager status`).
                return subprocess.call([*enter[:-1], f"--wd={Path.cwd()}", "--", *argv],
                                       env=env)
            for pod in sim.pods:
                if pod.name == name:
                    return subprocess.call(["ip", "netns", "exec", pod.netns, *argv])
        names = [n.name for n in self.topology.nodes] + [p.name for p in self.pods]
        raise ConfigError(f"no node or pod named {name!r} in the lab; one of: "
                          f"{', '.join(names)}")

    # -- state ------------------------------------------------------------------------------

    def _save(self) -> None:
        doc = {"prefix": self.prefix, "topology": topology.to_doc(self.topology),
               "cluster_cidrs": list(self.cluster_cidrs), "sandbox_image": self.sandbox_image}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, root: Path) -> KubeLab:
        try:
            doc = json.loads((root / STATE_FILE).read_text())
        except FileNotFoundError:
            raise LabError(f"no lab under {root}; start one with `wgmanager lab up`") from None
        except json.JSONDecodeError as e:
            raise LabError(f"{root / STATE_FILE} is corrupt ({e.msg}); remove the lab with "
                           "`wgmanager lab down`") from None
        lab = cls(root, prefix=doc["prefix"])
        lab.topo = topology.from_doc(doc["topology"])
        lab.cluster_cidrs = tuple(doc["cluster_cidrs"])
        lab.sandbox_image = doc["sandbox_image"]
        lab.nodes = [KubeNode(sim, root / "nodes" / sim.name, prefix=lab.prefix,
                              pod_mtu=lab.topo.pod_mtu, sandbox_image=lab.sandbox_image)
                     for sim in lab.topo.nodes]
        return lab

    def broken(self) -> list[str]:
        """What of a loaded lab no longer runs (empty when it is healthy)."""
        problems = []
        for kn in self.nodes:
            try:
                kn.check_running()
                if kn.holder_pid() is None:
                    problems.append(f"{kn.node.name}'s namespace holder is gone")
            except kubelets.KubeletError as e:
                problems.append(str(e).splitlines()[0])
        return problems

    # -- down -------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Removes everything: pods, nodes, control plane, namespaces, cgroups, files."""
        for kn in self.nodes:
            with contextlib.suppress(Exception):
                kn.stop()
        done = kubelets.cleanup(self.root, self.prefix)
        self.topo, self.nodes = None, []
        return done


def _fields(obj: Any) -> dict[str, Any]:
    return {f: getattr(obj, f) for f in obj.__slots__}


def _tc(netns: str, args: list[str]) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True,
                          text=True, check=False).stdout
