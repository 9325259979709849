"""Test harness: a simulated cluster whose nodes run the real `wgmanager` CLI.

Each node's commands run as separate processes inside the node's network namespace
(``nsenter --net``, like a hostNetwork pod: same mount namespace, so bpffs pins and UAPI
sockets are shared with the host). Each node gets its own key dir, UAPI socket dir and bpffs
pin dir under names derived from the cluster prefix, so ``cleanup`` removes exactly those.
A node can be given another wireguard-go binary (``use_wireguard_go``): its commands then run
with a PATH that finds that binary first, as on a node where it is the one installed.
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
from collections.abc import Callable, Iterator
from pathlib import Path

from wgmanager.lab import kubelets, topology, traffic
from wgmanager.lab.capture import Capture, capture
from wgmanager.lab.topology import Pod, SimNode, Topology

RUN_ROOT = Path("/run/wgmanager-tests")
PIN_ROOT = Path("/sys/fs/bpf/wgmanager-tests")
LAB_PIN_ROOT = Path("/sys/fs/bpf/wgmanager-lab")
WGM = [sys.executable, "-m", "wgmanager"]
CLUSTER_CIDRS = ["10.244.0.0/16", "fd00:244::/32"]
LISTEN_PORT = 51820
FAMILIES = ("ipv4", "ipv6")
# Debian 12's wireguard-go (no TUN offloads, in no package), kept by `make setup`.
OLD_WIREGUARD_GO = Path("/var/cache/wgmanager/wireguard-go-0.0.20220316/usr/bin/wireguard-go")
OLD_WIREGUARD_GO_MISSING = (f"{OLD_WIREGUARD_GO} is absent: `make setup` keeps Debian 12's "
                            "wireguard-go there")


class Cluster:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.run_dir = RUN_ROOT / topo.prefix
        self.pin_root = PIN_ROOT / topo.prefix
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
        self.mesh_path = self.run_dir / "mesh.json"
        self.keys: dict[str, str] = {}
        self.node_env: dict[str, dict[str, str]] = {}  # per node name: environment overrides

    # -- per-node wgmanager -----------------------------------------------------------

    def node_args(self, node: SimNode) -> list[str]:
        return ["--state-dir", str(self.run_dir / node.name / "state"),
                "--socket-dir", str(self.run_dir / node.name / "wg"),
                "--pin-dir", str(self.pin_root / node.name)]

    def use_wireguard_go(self, node: SimNode, binary: Path) -> None:
        """Makes ``binary`` the wireguard-go that ``node``'s commands find first on PATH.

        The userspace backend spawns ``wireguard-go`` from PATH, so a node's ``apply`` then
        starts this binary, exactly as on a node where it is the installed one. Takes effect
        when the node's device is (re)started, not for a wireguard-go already running.
        """
        bin_dir = self.run_dir / node.name / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        link = bin_dir / "wireguard-go"
        link.unlink(missing_ok=True)
        link.symlink_to(binary)
        path = os.environ.get("PATH", os.defpath)
        self.node_env[node.name] = {"PATH": f"{bin_dir}{os.pathsep}{path}"}

    def node_run(self, node: SimNode, argv: list[str], *, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", f"--net=/run/netns/{node.netns}", *argv]
        env = {**os.environ, **self.node_env.get(node.name, {})}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                             env=env)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} on {node.name} failed: {res.stderr.strip()}")
        return res

    def wgm(self, node: SimNode, *argv: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.node_run(node, [*WGM, "--log-level", "warning", *argv], check=check)

    def generate_keys(self) -> None:
        for node in self.topo.nodes:
            res = self.wgm(node, "pubkey", "--state-dir", str(self.run_dir / node.name / "state"))
            self.keys[node.name] = res.stdout.strip()

    def write_mesh(self, *, omit: set[str] = frozenset(), keyless: set[str] = frozenset(),
                   overrides: dict[str, dict[str, object]] | None = None) -> None:
        nodes = []
        for node in self.topo.nodes:
            if node.name in omit:
                continue
            spec = node.spec(None if node.name in keyless else self.keys[node.name])
            spec.update((overrides or {}).get(node.name, {}))
            nodes.append(spec)
        self.mesh_path.write_text(json.dumps({"listenPort": LISTEN_PORT,
                                              "clusterCIDRs": CLUSTER_CIDRS, "nodes": nodes}))

    def apply(self, node: SimNode, mesh: Path | None = None) -> dict[str, object]:
        res = self.wgm(node, "apply", "--mesh", str(mesh or self.mesh_path),
                       "--node-name", node.name, *self.node_args(node))
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def apply_all(self) -> None:
        for node in self.topo.nodes:
            self.apply(node)

    def teardown(self, node: SimNode) -> None:
        self.wgm(node, "teardown", *self.node_args(node))

    # -- traffic ------------------------------------------------------------------------

    def ping(self, pod: Pod, dst: str, *, count: int = 2, interval: float = 0.2,
             size: int = 56, wait: float = 2.0) -> tuple[int, int]:
        return traffic.ping(pod, dst, count=count, interval=interval, size=size, wait=wait)

    def reaches(self, pod: Pod, dst: str) -> bool:
        return traffic.reaches(pod, dst)

    def tcp_server(self, pod: Pod, port: int,
                   count: int = 0) -> contextlib.AbstractContextManager[None]:
        return traffic.tcp_server(pod, port, count)

    def tcp_send(self, pod: Pod, host: str, port: int, nbytes: int = 4096) -> dict[str, object]:
        return traffic.tcp_send(pod, host, port, nbytes)

    def unreachable_pairs(self) -> list[str]:
        """Cross-node pod pairs (both families) that do not answer ICMP; [] when all do."""
        return [f"{a.name} -> {b.name} ({fam})"
                for a, b in self.topo.cross_node_pairs() for fam in FAMILIES
                if not self.reaches(a, getattr(b, fam))]

    def await_sessions(self, timeout: float = 30.0) -> None:
        """Until every cross-node pod pair answers: right after `apply` on every node, a
        pair whose first handshake went to a node not listening yet waits for WireGuard's
        5 s retry, and tests that count every echo must not start inside that window."""
        deadline = time.monotonic() + timeout
        while (missing := self.unreachable_pairs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"pairs still unreachable after {timeout:.0f} s: "
                                     f"{missing}")

    def tcp_failures(self, port: int = 7000, nbytes: int = 64 * 1024) -> list[str]:
        """Cross-node pod pairs (both families) whose TCP transfer failed; [] when none."""
        failures = []
        for server in self.topo.pods:
            clients = [p for p in self.topo.pods if p.node != server.node]
            with self.tcp_server(server, port, count=len(clients) * len(FAMILIES)):
                for client in clients:
                    for fam in FAMILIES:
                        res = self.tcp_send(client, getattr(server, fam), port, nbytes=nbytes)
                        if not res["ok"]:
                            failures.append(f"{client.name} -> {server.name} ({fam}): {res}")
        return failures

    def capture(self, name: str) -> contextlib.AbstractContextManager[Capture]:
        return capture(self.topo.underlay_netns, self.topo.bridge,
                       self.run_dir / f"{name}.pcap", wg_ports=(LISTEN_PORT, LISTEN_PORT + 1),
                       pod_nets=tuple(CLUSTER_CIDRS))

    def assert_only_wireguard(self, name: str, traffic: Callable[[], None]) -> None:
        """Runs ``traffic`` under an underlay capture that must show WireGuard packets and
        nothing else: no plaintext pod packet, nothing unexpected."""
        with self.capture(name) as cap:
            traffic()
        assert cap.plaintext_pod_packets() == 0
        assert cap.unexpected_packets() == 0
        assert cap.wireguard_packets() > 0

    # -- cleanup ------------------------------------------------------------------------

    def cleanup(self) -> None:
        cleanup_prefix(self.topo.prefix)


@contextlib.contextmanager
def applied_cluster(prefix: str, *, wireguard_go: dict[int, Path] | None = None,
                    nodes: int = 3, pods_per_node: int = 2,
                    overlay: str = "none") -> Iterator[Cluster]:
    """A topology with keys generated and `wgmanager apply` run on every node; removed after.

    ``wireguard_go`` maps node indexes to another wireguard-go binary for that node;
    ``overlay`` routes pods as an overlay CNI would (``wgmanager.lab.topology.create``).
    """
    try:
        topo = topology.create(prefix, nodes=nodes, pods_per_node=pods_per_node,
                               overlay=overlay)
        c = Cluster(topo)
        for node in topo.nodes:
            if wireguard_go and node.index in wireguard_go:
                c.use_wireguard_go(node, wireguard_go[node.index])
        c.generate_keys()
        c.write_mesh()
        c.apply_all()
        yield c
    finally:
        cleanup_prefix(prefix)


def cleanup_prefix(prefix: str) -> None:
    """Removes what a cluster with this prefix made: processes, namespaces, pins, files;
    for a cluster of real kubelets also its pods, cgroups and control plane."""
    run_dir = RUN_ROOT / prefix
    for pidfile in run_dir.glob("*/wg/*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
    kubelets.cleanup(run_dir, prefix)
    topology.destroy(prefix)
    shutil.rmtree(PIN_ROOT / prefix, ignore_errors=True)
    shutil.rmtree(LAB_PIN_ROOT / prefix, ignore_errors=True)  # a lab-CLI test's pins
    with contextlib.suppress(OSError):
        PIN_ROOT.rmdir()  # only once no other run's pins are in it
    shutil.rmtree(run_dir, ignore_errors=True)


def remove_stale_runs() -> list[str]:
    """Cleans up after test runs that crashed (their owner process is gone)."""
    removed = []
    if not RUN_ROOT.is_dir():
        return removed
    for run_dir in RUN_ROOT.iterdir():
        try:
            owner = int((run_dir / "owner.pid").read_text().strip())
            os.kill(owner, 0)
            continue  # still running (a concurrent session): not ours to touch
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
        cleanup_prefix(run_dir.name)
        removed.append(run_dir.name)
    return removed
