"""`wgmanager lab`: a multi-node encrypted cluster on one machine, and its proof.

A lab is a directory (``root``) plus a name prefix. ``up`` builds, in order: the network
namespaces (``topology``), a real etcd + kube-apiserver reachable from the nodes over the
underlay (``controlplane``), Node objects registered as kubelet and the node-IPAM controller
would, and one real `wgmanager agent` process per node inside its namespace. Everything it
creates is named by the prefix or recorded under ``root`` (lab.json, pid files, logs), so
``down`` removes exactly that, also after a crash of `lab up` itself.

``check`` proves the lab the way `cilium connectivity test` does: every pair of pods on
different nodes over ICMP and TCP, an underlay capture that must hold zero pod packets,
and a sanity inversion (datapath detached: the same capture must see them) so that the
detector is known to work; then encryption is restored and checked again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from wgmanager.config import WireGuardSettings
from wgmanager.core.keys import PublicKey
from wgmanager.core.rotation import layout
from wgmanager.errors import ConfigError, WgmError
from wgmanager.keystore import KeyStore
from wgmanager.lab import controlplane, proof, topology
from wgmanager.lab.capture import Capture, capture
from wgmanager.lab.proof import CheckReport
from wgmanager.lab.topology import Pod, SimNode, Topology
from wgmanager.wireguard.userspace import UserspaceBackend

DEFAULT_ROOT = Path("/run/wgmanager-lab")
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/wgmanager-lab")
DEFAULT_PREFIX = "wgl"
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:244::/32")
AGENT_USER = "wgmanager-agent"
# The agents' shared identity reads Nodes and records Events; each agent writes its own
# Node's annotations with that node's identity (node_kubeconfig), as the Helm chart does.
AGENT_RULES = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
               {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
LISTEN_PORT = 51820
HEALTH_PORT = 9876
Progress = Callable[[str], None]


class LabError(WgmError):
    pass


class Lab:
    def __init__(self, root: Path = DEFAULT_ROOT, *, prefix: str = DEFAULT_PREFIX,
                 pin_root: Path = DEFAULT_PIN_ROOT, extra_users: tuple[str, ...] = ()) -> None:
        """``extra_users`` get a token and a kubeconfig (``user_kubeconfig``) but no RBAC:
        tests grant them what they need."""
        self.extra_users = extra_users
        self.root = root
        self.prefix = prefix
        self.pin_root = pin_root / prefix
        self.topo: Topology | None = None
        self.cp: controlplane.ControlPlane | None = None
        self._api: k8s.ApiClient | None = None
        self.agent_args: tuple[str, ...] = ()
        self.agent_global_args: tuple[str, ...] = ()  # before the subcommand, e.g. logging

    # -- layout ---------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def cp_dir(self) -> Path:
        return self.root / "controlplane"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.cp_dir / "admin.kubeconfig"

    @property
    def agent_kubeconfig(self) -> Path:
        return self.root / "agent.kubeconfig"

    def user_kubeconfig(self, user: str) -> Path:
        return self.root / f"{user}.kubeconfig"

    def node_kubeconfig(self, node: SimNode) -> Path:
        """The node's own identity (a kubelet's: system:node:NAME in system:nodes), which the
        API server's Node authorizer and NodeRestriction confine to that node's Node."""
        return self.node_dir(node) / "node.kubeconfig"

    def node_dir(self, node: SimNode) -> Path:
        return self.root / node.name

    def node_args(self, node: SimNode) -> list[str]:
        return ["--state-dir", str(self.node_dir(node) / "state"),
                "--socket-dir", str(self.node_dir(node) / "wg"),
                "--pin-dir", str(self.pin_root / node.name)]

    @property
    def nodes(self) -> tuple[SimNode, ...]:
        return self.topology.nodes

    @property
    def topology(self) -> Topology:
        if self.topo is None:
            raise LabError("no lab is running here; start one with `wgmanager lab up`")
        return self.topo

    # -- up -------------------------------------------------------------------------------

    def up(self, *, nodes: int = 3, pods_per_node: int = 2, start_agents: int | None = None,
           progress: Progress = lambda _: None, timeout: float = 120.0,
           agent_args: Sequence[str] = (), overlay: str = "none") -> None:
        """Builds the lab; on failure removes everything it made and re-raises.

        ``agent_args`` are extra agent flags for every agent this object starts; ``overlay``
        routes pods as an overlay CNI would (``wgmanager.lab.topology.create``)."""
        self.agent_args = tuple(agent_args)
        if nodes < 2 or nodes > 50:
            raise ConfigError("--nodes must be between 2 and 50")
        if pods_per_node < 1 or pods_per_node > 20:
            raise ConfigError("--pods-per-node must be between 1 and 20")
        if self.state_file.exists() or topology.namespaces(self.prefix):
            raise LabError(f"a lab already exists under {self.root} (prefix {self.prefix}); "
                           "see `wgmanager lab status`, or remove it with `wgmanager lab down`")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "owner.pid").write_text(f"{os.getpid()}\n")
        try:
            progress(f"network: {nodes} nodes x {pods_per_node} pods, underlay bridge")
            self.topo = topology.create(self.prefix, nodes=nodes, pods_per_node=pods_per_node,
                                        underlay=free_underlay(), host_link=True,
                                        overlay=overlay)
            self._save()
            progress(f"control plane: etcd + kube-apiserver on {self.topo.host_address}:6443")
            self._start_control_plane()
            self._save()
            # With start_agents < nodes, the other namespaces wait to join later (tests).
            members = list(self.nodes[:start_agents]) if start_agents else list(self.nodes)
            progress("nodes: registering Node objects (InternalIPs, podCIDRs)")
            for node in members:
                self.register_node(node)
            progress(f"agents: starting {len(members)} wgmanager agents")
            for node in members:
                self.start_agent(node)
            progress("waiting for every node to hold a peer for every other node")
            waited = await_condition(lambda: self.converged(members), timeout,
                                     "the mesh to converge")
            progress(f"converged in {waited:.1f}s")
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise

    def _start_control_plane(self) -> None:
        assert self.topo is not None and self.topo.host_address is not None
        self.cp = controlplane.ControlPlane(self.cp_dir, bind_address=self.topo.host_address,
                                            secure_port=6443)
        token = self.cp.add_token(AGENT_USER)
        extra = {user: self.cp.add_token(user) for user in self.extra_users}
        self.cp.start()
        self.cp.write_kubeconfig(self.agent_kubeconfig, token)
        for node in self.nodes:  # all, also those that join later (tests)
            self.node_dir(node).mkdir(parents=True, exist_ok=True)
            self.cp.write_client_kubeconfig(self.node_kubeconfig(node),
                                            f"system:node:{node.name}", ["system:nodes"])
        for user, user_token in extra.items():
            self.cp.write_kubeconfig(self.user_kubeconfig(user), user_token)
        rbac: Any = k8s.RbacAuthorizationV1Api(self.api)
        rbac.create_cluster_role({"metadata": {"name": "wgmanager-agent"},
                                  "rules": AGENT_RULES})
        rbac.create_cluster_role_binding({
            "metadata": {"name": "wgmanager-agent"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "wgmanager-agent"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": AGENT_USER}]})

    @property
    def api(self) -> k8s.ApiClient:
        if self._api is None:
            if self.cp is not None:
                self._api = self.cp.api_client()
            else:
                from kubernetes import config as k8s_config

                self._api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
                    config_file=str(self.admin_kubeconfig))
        return self._api

    @property
    def core(self) -> Any:
        """CoreV1Api, typed Any: we pass plain dicts, which the client serialises as they are."""
        return k8s.CoreV1Api(self.api)

    def register_node(self, node: SimNode) -> None:
        """As kubelet (status.addresses) and the node-IPAM controller (spec.podCIDRs) would."""
        self.register(node.name, [node.ipv4, node.ipv6], [node.pod_cidr4, node.pod_cidr6])

    def register(self, name: str, addresses: list[str], pod_cidrs: list[str], *,
                 annotations: dict[str, str] | None = None) -> None:
        self.core.create_node({"metadata": {"name": name, "annotations": annotations or {}},
                               "spec": {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}})
        self.core.patch_node_status(name, {"status": {"addresses": [
            {"type": "InternalIP", "address": a} for a in addresses]}})

    # -- agents ---------------------------------------------------------------------------

    def agent_pid_file(self, node: SimNode) -> Path:
        return self.node_dir(node) / "agent.pid"

    def agent_log_file(self, node: SimNode) -> Path:
        return self.node_dir(node) / "agent.log"

    def start_agent(self, node: SimNode, *, kubeconfig: Path | None = None,
                    extra_args: Sequence[str] = (),
                    program: Sequence[str] = ("-m", "wgmanager"),
                    node_identity: bool = True) -> int:
        """Starts the node's agent; ``program`` is what Python runs (tests use a wrapper
        that injects faults, run from the repository root). Without ``node_identity`` the
        agent writes with its shared identity (which the lab's RBAC does not allow)."""
        self.node_dir(node).mkdir(parents=True, exist_ok=True)
        config = kubeconfig or self.agent_kubeconfig
        if node_identity:
            extra_args = ("--node-kubeconfig", str(self.node_kubeconfig(node)), *extra_args)
        argv = ["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, *program,
                *self.agent_global_args, "agent", "--node-name", node.name,
                "--kubeconfig", str(config), "--cluster-cidrs", ",".join(CLUSTER_CIDRS),
                "--listen-port", str(LISTEN_PORT),
                "--health-port", str(HEALTH_PORT), *self.node_args(node), *self.agent_args,
                *extra_args]
        with open(self.agent_log_file(node), "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        self.agent_pid_file(node).write_text(f"{proc.pid}\n")
        return proc.pid

    def agent_pid(self, node: SimNode) -> int | None:
        """The node's agent, if running (checked by its command line, never a reused pid)."""
        try:
            pid = int(self.agent_pid_file(node).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        if b"agent" in cmdline and node.name.encode() in cmdline and state != "Z":
            return pid
        return None

    def stop_agent(self, node: SimNode, sig: int = signal.SIGTERM) -> None:
        pid = self.agent_pid(node)
        if pid is None:
            return
        os.kill(pid, sig)
        await_condition(lambda: self.agent_pid(node) is None, 30, f"{node.name}'s agent to exit")

    def signal_agents(self, sig: int) -> None:
        for node in self.nodes:
            pid = self.agent_pid(node)
            if pid is not None:
                os.kill(pid, sig)

    def health(self, node: SimNode) -> dict[str, Any] | None:
        code = ("import urllib.request,urllib.error,sys\n"
                f"try: r=urllib.request.urlopen('http://127.0.0.1:{HEALTH_PORT}/readyz',"
                "timeout=2)\n"
                "except urllib.error.HTTPError as e: r=e\n"
                "except Exception: sys.exit(1)\n"
                "print(r.read().decode())")
        res = subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, "-c", code],
                             capture_output=True, text=True, check=False, timeout=30)
        if res.returncode != 0 or not res.stdout.strip():
            return None
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    # -- what the nodes hold --------------------------------------------------------------

    def device(self, node: SimNode) -> UserspaceBackend:
        """The node's current device (which of the two depends on its key rotations)."""
        slot = layout(KeyStore(self.node_dir(node) / "state").load_rotation()).current
        return UserspaceBackend(WireGuardSettings().ifname_for(slot),
                                socket_dir=self.node_dir(node) / "wg", spawn=False)

    def peer_keys(self, node: SimNode) -> set[PublicKey]:
        dev = self.device(node)
        with contextlib.suppress(WgmError, OSError):
            if dev.device_exists():
                return set(dev.read().peers)
        return set()

    def annotation(self, name: str) -> str | None:
        try:
            node = self.core.read_node(name)
        except k8s.ApiException:
            return None
        return (node.metadata.annotations or {}).get("wgmanager.io/public-key")

    def converged(self, members: list[SimNode]) -> bool:
        keys = {n.name: self.annotation(n.name) for n in members}
        if any(v is None for v in keys.values()):
            return False
        for node in members:
            want = {PublicKey.from_base64(v) for k, v in keys.items() if k != node.name and v}
            if self.peer_keys(node) != want:
                return False
        return True

    def node_status(self, node: SimNode) -> dict[str, Any] | None:
        """`wgmanager status --json` run inside the node, compared with the lab's API."""
        res = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", sys.executable,
                              "-m", "wgmanager", "--log-level", "error", "status", "--json",
                              "--node-name", node.name, "--kubeconfig",
                              str(self.agent_kubeconfig), "--listen-port", str(LISTEN_PORT),
                              *self.node_args(node)],
                             capture_output=True, text=True, check=False, timeout=60)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        topo = self.topology
        nodes = []
        for node in topo.nodes:
            pid = self.agent_pid(node)
            health = self.health(node) if pid else None
            nodes.append({
                "name": node.name, "netns": node.netns, "ipv4": node.ipv4, "ipv6": node.ipv6,
                "pod_cidrs": [node.pod_cidr4, node.pod_cidr6],
                "agent": {"pid": pid, "running": pid is not None,
                          "ready": bool(health and health.get("ready")),
                          "log": str(self.agent_log_file(node))},
                "pods": [{"name": p.name, "netns": p.netns, "ipv4": p.ipv4, "ipv6": p.ipv6}
                         for p in node.pods],
                "status": self.node_status(node) if pid else None,
            })
        return {"schema": 1, "prefix": self.prefix, "root": str(self.root),
                "kubeconfig": str(self.admin_kubeconfig),
                "apiserver": f"https://{topo.host_address}:6443",
                "underlay": {"netns": topo.underlay_netns, "interface": topo.bridge,
                             "host_address": topo.host_address},
                "cluster_cidrs": list(CLUSTER_CIDRS), "nodes": nodes}

    # -- check ----------------------------------------------------------------------------

    def capture(self, name: str) -> contextlib.AbstractContextManager[Capture]:
        topo = self.topology
        return capture(topo.underlay_netns, topo.bridge, self.root / f"{name}.pcap",
                       wg_ports=(LISTEN_PORT, LISTEN_PORT + 1), pod_nets=CLUSTER_CIDRS)

    @property
    def pods(self) -> list[Pod]:
        return self.topology.pods

    def check(self, progress: Progress = lambda _: None, tcp_port: int = 7070) -> CheckReport:
        return proof.check(self, progress, tcp_port)

    def detach_datapaths(self) -> None:
        for node in self.nodes:
            for ifname in ["eth0", *self._tunnels(node)]:
                self._tc(node, ["filter", "del", "dev", ifname, "egress", "pref", "10"])
            for pod in node.pods:
                self._tc(node, ["filter", "del", "dev", pod.host_ifname, "ingress", "pref",
                                "10"])

    def _tunnels(self, node: SimNode) -> list[str]:
        """The node's overlay devices (``--overlay``): the program steers there too."""
        out = subprocess.run(["ip", "-n", node.netns, "-o", "link", "show", "type", "vxlan"],
                             capture_output=True, text=True, check=False).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.strip()]

    def reattach_datapaths(self) -> None:
        self.signal_agents(signal.SIGHUP)
        await_condition(self._all_attached, 60, "every agent to re-attach its datapath")

    def _tc(self, node: SimNode, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", node.netns, "tc", *args],
                              capture_output=True, text=True, check=False)

    def _all_attached(self) -> bool:
        for node in self.nodes:
            if self.agent_pid(node) is None:
                continue
            for ifname in ["eth0", *self._tunnels(node)]:  # steering; pod veths: nothing
                out = self._tc(node, ["filter", "show", "dev", ifname, "egress"]).stdout
                if "to_underlay" not in out:
                    return False
        return True

    # -- exec -----------------------------------------------------------------------------

    def netns_of(self, name: str) -> str:
        for node in self.nodes:
            if name == node.name:
                return node.netns
            for pod in node.pods:
                if name == pod.name:
                    return pod.netns
        names = [n.name for n in self.nodes] + [p.name for p in self.topology.pods]
        raise ConfigError(f"no node or pod named {name!r} in the lab; one of: "
                          f"{', '.join(names)}")

    def exec(self, name: str, argv: list[str]) -> int:
        """Runs a command in a node's or pod's network namespace.

        In a node it runs with `nsenter --net` rather than `ip netns exec`, which remounts
        /sys and so hides bpffs (`wgmanager status` then saw no maps), and with the node's
        paths, name and kubeconfig in the environment wgmanager's flags default from.
        """
        if not argv:
            raise ConfigError("nothing to run: wgmanager lab exec NAME -- COMMAND [ARGS...]")
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            return subprocess.call(["ip", "netns", "exec", self.netns_of(name), *argv])
        return subprocess.call(["nsenter", f"--net=/run/netns/{node.netns}", *argv],
                               env={**os.environ, **self.node_env(node)})

    def node_env(self, node: SimNode) -> dict[str, str]:
        """What `wgmanager status` and friends need to find this node's device and maps."""
        return {"WGM_STATE_DIR": str(self.node_dir(node) / "state"),
                "WGM_SOCKET_DIR": str(self.node_dir(node) / "wg"),
                "WGM_PIN_DIR": str(self.pin_root / node.name),
                "NODE_NAME": node.name, "KUBECONFIG": str(self.agent_kubeconfig)}

    # -- state ----------------------------------------------------------------------------

    def _save(self) -> None:
        doc = {"prefix": self.prefix, "pin_root": str(self.pin_root),
               "topology": topology.to_doc(self.topology)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, root: Path = DEFAULT_ROOT) -> Lab:
        try:
            doc = json.loads((root / "lab.json").read_text())
        except FileNotFoundError:
            raise LabError(f"no lab under {root}; start one with `wgmanager lab up`") from None
        except json.JSONDecodeError as e:
            raise LabError(f"{root / 'lab.json'} is corrupt ({e.msg}); remove the lab with "
                           "`wgmanager lab down`") from None
        lab = cls(root, prefix=doc["prefix"], pin_root=Path(doc["pin_root"]).parent)
        lab.topo = topology.from_doc(doc["topology"])
        return lab

    # -- down -----------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Removes everything this lab made; safe to repeat and after any crash."""
        done: list[str] = []
        if self.topo is not None:
            for node in self.topo.nodes:
                pid = self.agent_pid(node)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    done.append(f"stopped agent of {node.name} (pid {pid})")
        for pidfile in self.root.glob("*/wg/*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
                done.append(f"stopped wireguard-go (pid file {pidfile})")
        if self.cp is not None:
            self.cp.stop()
        stopped = controlplane.stop_processes_under(self.cp_dir)
        if stopped:
            done.append(f"stopped {stopped} control-plane processes")
        namespaces = topology.namespaces(self.prefix)
        topology.destroy(self.prefix)
        if namespaces:
            done.append(f"removed {len(namespaces)} network namespaces")
        if self.pin_root.exists():
            shutil.rmtree(self.pin_root, ignore_errors=True)
            done.append(f"removed pinned maps under {self.pin_root}")
        with contextlib.suppress(OSError):
            self.pin_root.parent.rmdir()  # only if no other lab's pins are in it
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            done.append(f"removed {self.root}")
        self.topo = None
        return done


def await_condition(cond: Callable[[], Any], timeout: float, what: str,
                    interval: float = 0.05) -> float:
    """Polls until ``cond()`` is truthy; returns the seconds it took. Raises on timeout."""
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_underlay() -> str:
    """A 10.9x.0 /24 that no route on this machine covers, for the host link."""
    underlay = topology.free_underlay()
    if underlay is None:
        raise LabError("no free 10.90-98.0.0/24 for the lab underlay; remove stale labs "
                       "(wgmanager lab down)")
    return underlay
