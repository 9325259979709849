"""Test harness: a simulated cluster whose nodes run the real `wgmanager` CLI.

Each node's commands run as separate processes inside the node's network namespace
(``nsenter --net``, like a hostNetwork pod: same mount namespace, so bpffs pins and UAPI
sockets are shared with the host). Each node gets its own key dir, UAPI socket dir and bpffs
pin dir under names derived from the cluster prefix, so ``cleanup`` removes exactly those.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wgmanager.lab import topology
from wgmanager.lab.topology import Pod, SimNode, Topology

RUN_ROOT = Path("/run/wgmanager-tests")
PIN_ROOT = Path("/sys/fs/bpf/wgmanager-tests")
WGM = [sys.executable, "-m", "wgmanager"]
POD_FILTER = "net 10.244.0.0/16 or net fd00:244::/32"
CLUSTER_CIDRS = ["10.244.0.0/16", "fd00:244::/32"]
LISTEN_PORT = 51820


@dataclass
class Capture:
    pcap: Path

    def count(self, bpf_filter: str) -> int:
        res = subprocess.run(["tcpdump", "-nn", "-r", str(self.pcap), bpf_filter],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"tcpdump -r failed: {res.stderr.strip()}")
        return len([ln for ln in res.stdout.splitlines() if ln.strip()])

    def plaintext_pod_packets(self) -> int:
        return self.count(POD_FILTER)

    def wireguard_packets(self) -> int:
        return self.count(f"udp port {LISTEN_PORT}")

    def unexpected_packets(self) -> int:
        """Anything but WireGuard UDP and link-local housekeeping (ARP, ND, multicast)."""
        return self.count(f"(ip or ip6) and not (udp port {LISTEN_PORT}) "
                          "and not (ip6 and dst net ff00::/8) "
                          "and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)")

    def fragments(self) -> int:
        return self.count("(ip and (ip[6:2] & 0x3fff) != 0) or (ip6 and ip6[6] == 44)")


class Cluster:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.run_dir = RUN_ROOT / topo.prefix
        self.pin_root = PIN_ROOT / topo.prefix
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
        self.mesh_path = self.run_dir / "mesh.json"
        self.keys: dict[str, str] = {}

    # -- per-node wgmanager -----------------------------------------------------------

    def node_args(self, node: SimNode) -> list[str]:
        return ["--state-dir", str(self.run_dir / node.name / "state"),
                "--socket-dir", str(self.run_dir / node.name / "wg"),
                "--pin-dir", str(self.pin_root / node.name)]

    def node_run(self, node: SimNode, argv: list[str], *, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", f"--net=/run/netns/{node.netns}", *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
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
        """(transmitted, received)."""
        res = subprocess.run(["ip", "netns", "exec", pod.netns, "ping", "-n", "-q",
                              "-c", str(count), "-i", str(interval), "-s", str(size),
                              "-W", str(wait), dst],
                             capture_output=True, text=True, check=False,
                             timeout=count * interval + wait + 30)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", res.stdout)
        if m is None:
            raise AssertionError(f"ping {dst} from {pod.name}: {res.stdout} {res.stderr}")
        return int(m.group(1)), int(m.group(2))

    def reaches(self, pod: Pod, dst: str) -> bool:
        """One ICMP echo, retried once: the first packet may wait for a handshake."""
        for _ in range(2):
            _, received = self.ping(pod, dst, count=1, wait=2.0)
            if received:
                return True
        return False

    @contextlib.contextmanager
    def tcp_server(self, pod: Pod, port: int, count: int = 0) -> Iterator[None]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "wgmanager.lab.probe",
             "serve", "--port", str(port), "--count", str(count)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise AssertionError(f"probe server in {pod.name} failed: {proc.stderr.read()}")
            yield
        finally:
            proc.kill()
            proc.wait()

    def tcp_send(self, pod: Pod, host: str, port: int, nbytes: int = 4096) -> dict[str, object]:
        res = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-m",
                              "wgmanager.lab.probe", "send", host, str(port),
                              "--bytes", str(nbytes)],
                             capture_output=True, text=True, check=False, timeout=60)
        try:
            return json.loads(res.stdout)  # type: ignore[no-any-return]
        except json.JSONDecodeError:
            return {"ok": False, "error": res.stderr.strip()}

    @contextlib.contextmanager
    def capture(self, name: str) -> Iterator[Capture]:
        """tcpdump on the underlay bridge, started (listening) before the body runs."""
        pcap = self.run_dir / f"{name}.pcap"
        proc = subprocess.Popen(["ip", "netns", "exec", self.topo.underlay_netns, "tcpdump",
                                 "-i", self.topo.bridge, "-nn", "-U", "--immediate-mode",
                                 "-w", str(pcap)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "listening on" not in line:
            proc.kill()
            raise AssertionError(f"tcpdump did not start: {line}")
        try:
            yield Capture(pcap)
        finally:
            time.sleep(0.2)  # in-flight packets are on the wire within microseconds; margin
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)

    # -- cleanup ------------------------------------------------------------------------

    def cleanup(self) -> None:
        cleanup_prefix(self.topo.prefix)


def cleanup_prefix(prefix: str) -> None:
    """Removes what a cluster with this prefix made: processes, namespaces, pins, files."""
    run_dir = RUN_ROOT / prefix
    for pidfile in run_dir.glob("*/wg/*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
    topology.destroy(prefix)
    shutil.rmtree(PIN_ROOT / prefix, ignore_errors=True)
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
