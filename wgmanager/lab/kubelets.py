"""Real Kubernetes nodes: the lab's node network namespaces, each with containerd and a kubelet.

Role: wgmanager's agent runs as a DaemonSet pod and speaks for its node with the kubelet's
identity, and what it encrypts is the traffic of real pods. The plain-process lab shows
neither, so this module turns each simulated node into a node a cluster really has:

    RealCluster(prefix, root)        topology (no veth pods) + control plane with its
      .start() / .stop()             controllers + one KubeNode per node, Ready, routed;
                                     stop() leaves nothing (see below)
    KubeNode(node, dir, ...)         one node:
      a holder process in the node's network namespace and a mount namespace of its own
        (a slave of the host's: host mounts show inside, nothing made inside leaks out),
        where a fresh tmpfs covers /run/containerd (shim sockets) and /run/wireguard, the
        node's own dirs cover /var/log (pod logs), /var/lib/cni (IPAM, CNI cache) and
        /var/lib/kubelet (the device-plugin socket ignores --root-dir; it also holds the
        kubelet's kubeconfig and pki/ for hostPath pods, see ``NODE_KUBECONFIG``) and
        /var/lib/wgmanager (the agent's private key), and a fresh bpffs,
        made shared, replaces whatever the host has on /sys/fs/bpf (kubelet and containerd
        refuse a non-shared one for a Bidirectional hostPath);
      containerd in those namespaces (``nodeconfig``: every path under the node's dir, CRI
        as this machine needs it, a CNI template that containerd renders for the podCIDRs
        the kubelet hands it: bridge + host-local, IPv4 and IPv6);
      images imported from the cached OCI archives (there is no registry);
      a kubelet with its own client certificate (CN=system:node:NAME, O=system:nodes), a
        CA-signed serving certificate, webhook authorization, cgroupfs under a cgroup root
        of its own (``cgroups``), --root-dir and --node-ip of its own;
      routes to the other nodes' podCIDRs and the API Service DNAT (``nodenet``).

Leaving nothing behind: everything a node mounts exists only in its mount namespace, which
the kernel tears down (overlays, shm, secret tmpfs, netns bind mounts, bpffs) once its last
process is gone; pod network namespaces die with their processes and take their veths;
cgroups are removed once their processes are killed; files are under ``root``. So stopping
is killing, in order: kubelet, containerd, the node's other processes (by network namespace
and cwd), its pods (by cgroup), then removing cgroups, namespaces and files. ``cleanup``
does the same from names alone (prefix and work dir) for a run whose owner was killed.

What is left on purpose: empty mount-point directories (MOUNTPOINTS) created when a machine
lacks them; removing one would detach the mounts a concurrent lab has on it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from kubernetes import client as k8s

from wgmanager.errors import EnvironmentProblem, WgmError
from wgmanager.lab import cgroups, controlplane, nodenet, topology
from wgmanager.lab.controlplane import ClusterTrust, ControlPlane, kube_binary, require_binary
from wgmanager.lab.daemons import Daemons, kill, processes_under
from wgmanager.lab.nodeconfig import (
    NODE_KUBECONFIG,
    NODE_PKI,
    NodeLayout,
    cni_template,
    containerd_toml,
    kubelet_configuration,
)
from wgmanager.lab.pki import write_kubeconfig, write_pair
from wgmanager.lab.topology import SimNode, Topology

IMAGES_INDEX = Path("/var/cache/wgmanager/images/images.json")
CHECKOUT_AGENT_IMAGE = Path(__file__).resolve().parents[2] / "build" / "agent-image.json"
DEFAULT_IMAGES = ("pause", "busybox")
HOLDER, CONTAINERD, KUBELET = "holder", "containerd", "kubelet"
# Everything a node runs outside its pods, by comm, for clean-up by cwd.
NODE_COMMS = ("sleep", "nsenter", "unshare", "containerd", "containerd-shim-runc-v2", "kubelet")
# Host directories a node covers with its own mount; created (empty) if a machine lacks them
# and never removed (removing a directory detaches what other labs mounted on it).
MOUNTPOINTS = (Path("/run/containerd"), Path("/run/wireguard"), Path("/var/lib/cni"),
               Path("/var/lib/kubelet"), Path("/var/lib/wgmanager"))
Progress = Callable[[str], None]


class KubeletError(WgmError):
    """A node's containerd or kubelet did not come up (the message carries its log tail)."""


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    ref: str
    archive: Path


def image_index(path: Path = IMAGES_INDEX) -> dict[str, Image]:
    """The images scripts/build-images.sh cached, by name (pause, busybox, wgmanager, ...).
    The agent image is this checkout's (``CHECKOUT_AGENT_IMAGE``) when it has one: the
    machine-wide index names the last one built, which may be another checkout's."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"no image index at {path} ({exc}); run `make setup` (it "
                                 "builds the lab's images once)") from None
    with contextlib.suppress(OSError, ValueError):
        doc["wgmanager"] = json.loads(CHECKOUT_AGENT_IMAGE.read_text())
    return {name: Image(name, e["ref"], Path(e["archive"])) for name, e in doc.items()}


def images(names: Sequence[str], path: Path = IMAGES_INDEX) -> list[Image]:
    """The named images, or an error naming the missing ones and the fix."""
    index = image_index(path)
    missing = [n for n in names if n not in index or not index[n].archive.is_file()]
    if missing:
        raise EnvironmentProblem(f"image(s) {', '.join(missing)} not built in {path.parent}; "
                                 "run `make setup` (scripts/build-images.sh)")
    return [index[n] for n in names]


def cgroup_name(prefix: str, node: str) -> str:
    """A node's cgroup root: unique per lab and node, recognisable by prefix after a crash."""
    return f"wgmlab-{prefix}-{node}"


class KubeNode:
    """One real node inside ``node``'s network namespace; files under ``work_dir``."""

    def __init__(self, node: SimNode, work_dir: Path, *, prefix: str, pod_mtu: int,
                 sandbox_image: str, ready_timeout: float = 60.0,
                 register_taints: Sequence[str] = ()) -> None:
        """``sandbox_image`` is the pause image's reference (it must be imported: there is
        no registry to pull it from). ``register_taints`` ("key=value:Effect") are the taints
        the kubelet registers its Node with."""
        self.node = node
        self.register_taints = tuple(register_taints)
        self.sandbox_image = sandbox_image
        self.layout = NodeLayout(work_dir)
        self.dir = work_dir
        self.pod_mtu = pod_mtu
        self.cgroup = cgroup_name(prefix, node.name)
        self.daemons = Daemons(work_dir, error=KubeletError, ready_timeout=ready_timeout)

    @property
    def kubeconfig(self) -> Path:
        """The kubelet's identity: what the agent will speak for its node with."""
        return self.layout.kubeconfig

    node_kubeconfig = NODE_KUBECONFIG
    """The same identity at the path every node has for it in its own mount namespace
    (certificates and CA under ``NODE_PKI``): what a hostPath pod on the node mounts."""
    node_pki = NODE_PKI

    def enter(self) -> list[str]:
        """The command prefix that runs a program in this node's network and mount
        namespaces (``wg show`` there finds the node's WireGuard sockets)."""
        return self._enter()

    def holder_pid(self) -> int | None:
        return self.daemons.pid(HOLDER)

    # -- start ------------------------------------------------------------------------------

    def prepare(self, cp: ClusterTrust) -> None:
        """Credentials, config files and the cgroup root; nothing runs yet."""
        lay = self.layout
        for d in (*lay.mounted_dirs.values(), lay.cni_conf_dir, lay.containerd_dir / "opt"):
            d.mkdir(parents=True, exist_ok=True)
        (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
        ca = cp.ca()
        name = f"system:node:{self.node.name}"
        # One identity, two views of its paths: from this machine (the kubelet, tests) and
        # from inside the node, as a hostPath pod there sees it (the chart's nodeIdentity).
        lay.pki_dir.mkdir(parents=True, exist_ok=True)
        crt, key = write_pair(lay.pki_dir, "kubelet-client", *ca.issue(name, ["system:nodes"]))
        shutil.copyfile(cp.ca_cert, lay.pki_dir / "ca.crt")
        write_kubeconfig(lay.kubeconfig, server=cp.url, ca=cp.ca_cert, user=name, cert=crt,
                         key=key)
        write_kubeconfig(lay.node_kubeconfig, server=cp.url, ca=NODE_PKI / "ca.crt",
                         user=name, cert=NODE_PKI / crt.name, key=NODE_PKI / key.name)
        sans: list[x509.GeneralName] = [x509.DNSName(self.node.name)]
        sans += [x509.IPAddress(ipaddress.ip_address(a))
                 for a in (self.node.ipv4, self.node.ipv6)]
        write_pair(self.dir, "kubelet-serving",
                   *ca.issue(name, ["system:nodes"], client=False, sans=sans))
        lay.containerd_config.write_text(containerd_toml(lay, sandbox_image=self.sandbox_image))
        lay.cni_template.write_text(cni_template(mtu=self.pod_mtu))
        lay.resolv_conf.write_text("# no DNS servers: nothing pods resolve leaves the lab\n")
        config = kubelet_configuration(lay, address=self.node.ipv4, client_ca=cp.ca_cert,
                                       cgroup_root=f"/{self.cgroup}")
        lay.kubelet_config.write_text(json.dumps(config, indent=2) + "\n")
        cgroups.make(self.cgroup)

    def start_runtime(self) -> None:
        """The namespace holder, then containerd; returns once containerd answers."""
        for mountpoint in MOUNTPOINTS:
            mountpoint.mkdir(parents=True, exist_ok=True)
        ready = self.dir / "mounts.ready"
        ready.unlink(missing_ok=True)
        script = "; ".join([
            "set -e",
            "mount -t tmpfs -o mode=0711 tmpfs /run/containerd",
            "mount -t tmpfs -o mode=0700 tmpfs /run/wireguard",
            *(f"mount --bind {own} {host}" for host, own in self.layout.mounted_dirs.items()),
            # A bpffs the host mounted (not shared) would stay under the node's, and
            # containerd checks the first mount it finds on the path: "not a shared mount".
            "while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf; done",
            "mount -t bpf bpf /sys/fs/bpf",
            "mount --make-shared /sys/fs/bpf",
            f"touch {ready}",
            "exec sleep infinity",
        ])
        self.daemons.spawn(HOLDER, [
            "nsenter", f"--net=/run/netns/{self.node.netns}", "--",
            "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script])
        self.daemons.wait(HOLDER, ready.exists, timeout=10)
        self.daemons.spawn(CONTAINERD, [*self._enter(), "containerd", "--config",
                                        str(self.layout.containerd_config)])
        self.daemons.wait(CONTAINERD, self._containerd_answers)

    def import_images(self, wanted: Sequence[Image]) -> None:
        for image in wanted:
            res = subprocess.run(["ctr", "--address", str(self.layout.socket), "-n", "k8s.io",
                                  "images", "import", str(image.archive)],
                                 capture_output=True, text=True, check=False, timeout=600)
            if res.returncode != 0:
                raise KubeletError(f"importing {image.ref} into {self.node.name}'s containerd "
                                   f"failed: {res.stderr.strip()[-500:]}")

    def start_kubelet(self) -> None:
        """Starts the kubelet; it registers its Node itself (see RealCluster.wait_ready)."""
        kubelet = require_binary(kube_binary(KUBELET), KUBELET)
        lay = self.layout
        # No cloud here: the AWS SDK is told so instead of finding out by timing out.
        env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
        self.daemons.spawn(KUBELET, [
            *self._enter(), str(kubelet),
            f"--config={lay.kubelet_config}",
            f"--kubeconfig={lay.kubeconfig}",
            f"--root-dir={lay.kubelet_dir}",
            f"--hostname-override={self.node.name}",
            f"--node-ip={self.node.ipv4}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{lay.socket}",
            f"--containerd={lay.socket}",  # cAdvisor's view of the containers
            f"--pod-infra-container-image={self.sandbox_image}",  # image GC never drops it
            *([f"--register-with-taints={','.join(self.register_taints)}"]
              if self.register_taints else []),
            "--v=1",
        ], env=env)

    def check_running(self) -> None:
        """Raises with the log tail if containerd or the kubelet has exited."""
        for program in (CONTAINERD, KUBELET):
            if not self.daemons.running(program) and (self.dir / f"{program}.pid").exists():
                raise KubeletError(f"{self.node.name}'s {program} exited; "
                                   f"{self.daemons.log_tail(program)}")

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Kubelet, containerd (each SIGTERM, then SIGKILL), then everything else the node
        ran; the mount namespace and what was mounted in it go with the last process."""
        self.daemons.terminate(KUBELET, grace=5)
        self.daemons.terminate(CONTAINERD, grace=5)
        kill_node(self.dir, self.node.netns, self.cgroup)
        self.daemons.terminate(HOLDER, grace=1)
        cgroups.remove(self.cgroup)

    # -- internals --------------------------------------------------------------------------

    def _enter(self) -> list[str]:
        pid = self.holder_pid()
        if pid is None:
            raise KubeletError(f"{self.node.name}'s namespace holder is not running; "
                               f"{self.daemons.log_tail(HOLDER)}")
        return ["nsenter", f"--target={pid}", "--mount", "--net", "--"]

    def _containerd_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(self.layout.socket))
        return True


# -- the cluster --------------------------------------------------------------------------


class RealCluster:
    """A topology whose nodes are real kubelets, with a control plane that runs the
    controllers, everything under ``root`` and named by ``prefix``."""

    def __init__(self, prefix: str, root: Path, *, nodes: int = 2,
                 image_names: Sequence[str] = DEFAULT_IMAGES, ready_timeout: float = 120.0,
                 register_taints: Sequence[str] = ()) -> None:
        self.prefix = prefix
        self.register_taints = tuple(register_taints)
        self.root = root
        self.node_count = nodes
        self.image_names = tuple(image_names)
        self.ready_timeout = ready_timeout
        self.topo: Topology | None = None
        self.cp: ControlPlane | None = None
        self.nodes: list[KubeNode] = []
        self.timings: dict[str, float] = {}

    @property
    def api(self) -> k8s.ApiClient:
        assert self.cp is not None
        return self.cp.api_client()

    def node(self, name: str) -> KubeNode:
        return next(n for n in self.nodes if n.node.name == name)

    def start(self, progress: Progress = lambda _: None) -> None:
        """Brings everything up, Nodes Ready and routed; on failure removes it all."""
        wanted = images(["pause", *(n for n in self.image_names if n != "pause")])
        require_binary(kube_binary(KUBELET), KUBELET)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "owner.pid").write_text(f"{os.getpid()}\n")
        began = time.monotonic()
        try:
            with self._timed("network"):
                progress(f"network: {self.node_count} node namespaces on an underlay bridge")
                underlay = topology.free_underlay()
                if underlay is None:
                    raise KubeletError("no free 10.90-98.0.0/24 for the lab underlay; "
                                       "remove stale labs (wgmanager lab down)")
                self.topo = topology.create(self.prefix, nodes=self.node_count,
                                            pods_per_node=0, underlay=underlay,
                                            host_link=True, pod_routes=False)
                for sim in self.topo.nodes:
                    nodenet.dead_end_route(sim.netns)
            assert self.topo.host_address is not None
            with self._timed("control plane"):
                progress(f"control plane on {self.topo.host_address}:6443")
                self.cp = ControlPlane(self.root / "controlplane",
                                       bind_address=self.topo.host_address, secure_port=6443,
                                       controllers=True)
                self.cp.start()
            self.nodes = start_nodes(self.topo.nodes, self.root, self.cp.trust,
                                     prefix=self.prefix,
                                     pod_mtu=self.topo.pod_mtu, images=wanted,
                                     timings=self.timings, progress=progress,
                                     register_taints=self.register_taints)
            with self._timed("kubelets"):
                progress("kubelets: waiting for every Node to be Ready")
                self.wait_ready()
            with self._timed("routes"):
                self.sync_routes()
            self.timings["total"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    @contextlib.contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.timings[what] = time.monotonic() - began

    def wait_ready(self) -> float:
        """Until every node's Node is Ready and has its podCIDRs; fails fast (with the log)
        when a kubelet or containerd exits."""
        return wait_ready(self.api, self.nodes, self.ready_timeout, self.root)

    def sync_routes(self) -> None:
        """Routes each node's podCIDRs from every other node and the API Service DNAT."""
        assert self.topo is not None and self.cp is not None
        sync_routes(self.api, self.topo, self.cp.secure_port)

    def stop(self) -> None:
        """Removes everything: nodes, control plane, namespaces, cgroups, files."""
        for kn in self.nodes:
            with contextlib.suppress(Exception):
                kn.stop()
        if self.cp is not None:
            self.cp.stop()
        cleanup(self.root, self.prefix)
        self.nodes = []


def start_nodes(sims: Sequence[SimNode], root: Path, cp: ClusterTrust, *, prefix: str,
                pod_mtu: int, images: Sequence[Image], timings: dict[str, float],
                progress: Progress = lambda _: None,
                register_taints: Sequence[str] = ()) -> list[KubeNode]:
    """containerd, the images and a kubelet on each of ``sims`` (a cluster's first nodes, or
    one joining later); returns without waiting for the Nodes to be Ready. ``images`` starts
    with the pause image."""
    nodes = [KubeNode(sim, root / "nodes" / sim.name, prefix=prefix, pod_mtu=pod_mtu,
                      sandbox_image=images[0].ref, register_taints=register_taints)
             for sim in sims]
    began = time.monotonic()
    progress("containerd per node")
    for kn in nodes:
        kn.prepare(cp)
    _parallel([kn.start_runtime for kn in nodes])
    timings["containerd"] = time.monotonic() - began
    began = time.monotonic()
    progress(f"importing {', '.join(i.ref for i in images)}")
    _parallel([functools.partial(kn.import_images, images) for kn in nodes])
    timings["images"] = time.monotonic() - began
    for kn in nodes:
        kn.start_kubelet()
    return nodes


def wait_ready(api: k8s.ApiClient, nodes: Sequence[KubeNode], timeout: float,
               root: Path) -> float:
    """Until every one of ``nodes`` is Ready with its podCIDRs; fails fast (with the log)
    when one's kubelet or containerd exits. The seconds it took."""
    core: Any = k8s.CoreV1Api(api)
    began = time.monotonic()
    names = {kn.node.name for kn in nodes}
    while True:
        for kn in nodes:
            kn.check_running()
        ready = {n.metadata.name for n in core.list_node().items
                 if n.spec.pod_cidrs and node_ready(n)}
        if names <= ready:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise KubeletError(f"nodes not Ready after {timeout:.0f} s: "
                               f"{', '.join(sorted(names - ready))}; see the kubelet logs "
                               f"under {root / 'nodes'}")
        time.sleep(0.5)


def sync_routes(api: k8s.ApiClient, topo: Topology, api_port: int) -> None:
    """Each node's routes to the other nodes' podCIDRs (from their Nodes) and to the API
    Service: what a routed CNI and kube-proxy would set up."""
    assert topo.host_address is not None
    core: Any = k8s.CoreV1Api(api)
    cidrs = {n.metadata.name: list(n.spec.pod_cidrs or []) for n in core.list_node().items}
    nodenet.sync_routes(topo, cidrs)
    for sim in topo.nodes:
        nodenet.service_dnat(sim.netns, topo.host_address, api_port)


def node_ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True"
               for c in (node.status.conditions or []))


def _parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Runs ``jobs`` at once (each mostly waits on a process) and re-raises the first error."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


# -- clean-up -----------------------------------------------------------------------------


def kill_node(work_dir: Path, netns: str | None, cgroup: str) -> None:
    """SIGKILLs a node's own processes (by network namespace, and by cwd: shims run in their
    bundle dirs, daemons in the node's dir), then its pods (by cgroup): in that order, so
    no kubelet or containerd is left to start a container again."""
    pids = set(topology.pids_in(netns)) if netns else set()
    pids |= {pid for pid, _ in processes_under(work_dir, NODE_COMMS)}
    pids.discard(os.getpid())
    for pid in pids:
        kill(pid)
    for pid in cgroups.pids(cgroup):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cleanup(root: Path, prefix: str) -> list[str]:
    """Removes a real cluster's every trace, from its names alone (also after its owner was
    killed): node processes, pods, cgroups, control plane, namespaces, files. Idempotent."""
    done = []
    netns = set(topology.namespaces(prefix))
    node_dirs = sorted((root / "nodes").glob("*")) if (root / "nodes").is_dir() else []
    names = cgroups.matching(cgroup_name(prefix, "*"))
    for d in node_dirs:
        index = d.name.removeprefix("node")
        ns = f"{prefix}-n{index}"
        kill_node(d, ns if ns in netns else None, cgroup_name(prefix, d.name))
    for pid, _ in processes_under(root, NODE_COMMS):  # a node dir already deleted
        kill(pid)
    for name in sorted(names):
        cgroups.remove(name)
        done.append(f"removed cgroup {name}")
    stopped = controlplane.stop_processes_under(root)
    if stopped:
        done.append(f"stopped {stopped} control-plane processes")
    if netns:
        topology.destroy(prefix)
        done.append(f"removed {len(netns)} network namespaces")
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
        done.append(f"removed {root}")
    return done


def leftovers(root: Path, prefix: str) -> list[str]:
    """What of a real cluster still exists (empty when ``cleanup`` did its job): processes
    and mounts under ``root`` in any mount namespace, cgroups, network namespaces."""
    found = [f"process {pid} ({cwd})" for pid, cwd in processes_under(root, NODE_COMMS)]
    found += [f"process {pid} ({cwd})"
              for pid, cwd in processes_under(root, controlplane.PROGRAMS)]
    seen: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            mnt = os.readlink(entry / "ns" / "mnt")
            if mnt in seen:
                continue
            seen.add(mnt)
            mounts = (entry / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        for line in mounts:
            target = Path(line.split()[4])
            if target.is_relative_to(root):
                found.append(f"mount {target} (seen by pid {entry.name})")
    found += [f"cgroup {n}" for n in sorted(cgroups.matching(cgroup_name(prefix, "*")))]
    found += [f"netns {n}" for n in topology.namespaces(prefix)]
    if root.exists():
        found.append(f"directory {root}")
    return found


