#!/usr/bin/env python3
"""Pod-to-pod throughput, latency and CPU: plaintext vs a hand-built wireguard-go tunnel vs
wgmanager, in one run on the same machine, plus the effect of the knobs that separate them.

Three 2-node topologies are built side by side (network namespaces on a bridge, one pod per
node, host-gw routes, pod MTU 1440; ``wgmanager.lab.topology``), each under its own prefix:

- ``plaintext``: the host-gw routes as built.
- ``baseline``: what a user can build by hand: wireguard-go on each node (in a private
  mount namespace so its socket stays out of /run/wireguard), keys from ``wg genkey``,
  ``wg set`` for the key, port and peer, ``ip link set wg0 up`` at wireguard-go's default
  MTU (1420, as wg-quick would pick on a 1500 underlay) and ``ip route replace`` of the
  remote pod CIDRs through wg0.
- ``wgmanager``: ``wgmanager apply`` on both nodes from a static mesh file (as the
  integration tests do): real wireguard-go, the eBPF redirect, MTU 1440 (uplink - 60).

Measurements, interleaved round by round so drift on the shared machine hits all three:
iperf3 TCP pod1 -> pod2 with 1 and 4 streams (first second omitted), ping RTT (median and
p99 of 200 echoes at 5 ms), and per run the machine's busy CPU time from /proc/stat (all
cores, everything running), the wireguard-go processes' CPU time (utime + stime), TCP
retransmits and UDP receive-buffer drops (Udp RcvbufErrors of both nodes' namespaces).
An underlay capture during the ping phase must hold 0 plaintext pod packets for both
tunnels.

Knobs, each an A/B inside the same rounds (1 stream):

- ``rcvbuf``: wireguard-go 0.0.20220316 never sets SO_RCVBUF, so its UDP sockets get
  net.core.rmem_default (208 KiB), which is global (a child namespace can read it but
  writing it there fails with EINVAL). The bench forces the buffer on the running
  wireguard-go processes' own sockets (pidfd_getfd + SO_RCVBUFFORCE/SO_SNDBUFFORCE, what
  newer wireguard-go does for itself) and puts it back afterwards: a prototype of the
  agent change, applied by hand around the wgmanager run.
- ``mtu``: the baseline tunnel at 1440 (what the agent sets) instead of 1420.
- ``offload`` (--full only): TSO/GSO off on the sending pod's eth0 in the wgmanager
  topology.

    sudo .venv/bin/python bench/throughput.py [--seconds 5] [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import Entry, entry, log

from wgmanager.lab import topology
from wgmanager.lab.capture import capture
from wgmanager.lab.topology import Pod, SimNode, Topology

LISTEN_PORT = 51820
CLUSTER_CIDRS = ["10.244.0.0/16", "fd00:244::/32"]
DEFAULT_RCVBUF = 212992  # net.core.rmem_default on this machine, what wireguard-go gets
RCVBUF_REQUEST = 2 << 20  # setsockopt value; the kernel doubles it: 4 MiB effective
_RTT = re.compile(r"time=([\d.]+) ms")


def sh(argv: list[str], **kw: Any) -> str:
    return topology.run(argv, **kw).stdout


# -- the three ways -----------------------------------------------------------------------

@dataclass
class Way:
    name: str
    topo: Topology
    wg_pids: list[int] = field(default_factory=list)

    @property
    def src(self) -> Pod:
        return self.topo.nodes[0].pods[0]

    @property
    def dst(self) -> Pod:
        return self.topo.nodes[1].pods[0]


def build_plaintext(prefix: str) -> Way:
    return Way("plaintext", topology.create(prefix, nodes=2, pods_per_node=1))


def build_baseline(prefix: str, mtu: int = 1420) -> Way:
    """wireguard-go + wg + ip route, the way a user would do it by hand."""
    topo = topology.create(prefix, nodes=2, pods_per_node=1)
    d = benchlib.run_dir(prefix)
    way = Way("baseline", topo)
    keys: dict[str, tuple[Path, str]] = {}
    for node in topo.nodes:
        priv = d / f"{node.name}.key"
        priv.write_text(subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                       check=True).stdout)
        priv.chmod(0o600)
        pub = subprocess.run(["wg", "pubkey"], input=priv.read_text(), capture_output=True,
                             text=True, check=True).stdout.strip()
        keys[node.name] = (priv, pub)
        sockdir = d / node.name / "wg"
        sockdir.mkdir(parents=True)
        script = ('mkdir -p /run/wireguard && mount --bind "$1" /run/wireguard '
                  '&& exec wireguard-go -f wg0')
        with open(d / node.name / "wireguard-go.log", "ab") as logf:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation",
                 "private", "sh", "-c", script, "wg", str(sockdir)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                             "WG_PROCESS_FOREGROUND": "1",
                                             "LOG_LEVEL": "error"})
        (sockdir / "wg0.pid").write_text(f"{proc.pid}\n")
        benchlib.wait_for(lambda s=sockdir: (s / "wg0.sock").exists(), 10,
                          f"wireguard-go on {node.name}")
        way.wg_pids.append(proc.pid)
    for node, pid in zip(topo.nodes, way.wg_pids, strict=True):
        other = next(n for n in topo.nodes if n is not node)
        sh(["nsenter", "-t", str(pid), "-m", "wg", "set", "wg0",
            "private-key", str(keys[node.name][0]), "listen-port", str(LISTEN_PORT),
            "peer", keys[other.name][1], "endpoint", f"{other.ipv4}:{LISTEN_PORT}",
            "allowed-ips", f"{other.pod_cidr4},{other.pod_cidr6}"])
        topology.ip_batch(node.netns, [
            f"link set wg0 mtu {mtu} up",
            f"route replace {other.pod_cidr4} dev wg0",
            f"route replace {other.pod_cidr6} dev wg0"])
    return way


def build_wgmanager(prefix: str) -> Way:
    """`wgmanager apply` from a static mesh on both nodes (tests/integration/harness.py)."""
    topo = topology.create(prefix, nodes=2, pods_per_node=1)
    d = benchlib.run_dir(prefix)
    way = Way("wgmanager", topo)

    def args(node: SimNode) -> list[str]:
        return ["--state-dir", str(d / node.name / "state"),
                "--socket-dir", str(d / node.name / "wg"),
                "--pin-dir", str(benchlib.pin_dir(prefix) / node.name)]

    def wgm(node: SimNode, *argv: str) -> str:
        return sh(["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-m",
                   "wgmanager", "--log-level", "warning", *argv], timeout=120)

    keys = {n.name: wgm(n, "pubkey", "--state-dir", str(d / n.name / "state")).strip()
            for n in topo.nodes}
    mesh = d / "mesh.json"
    mesh.write_text(json.dumps({"listenPort": LISTEN_PORT, "clusterCIDRs": CLUSTER_CIDRS,
                                "nodes": [n.spec(keys[n.name]) for n in topo.nodes]}))
    for node in topo.nodes:
        wgm(node, "apply", "--mesh", str(mesh), "--node-name", node.name, *args(node))
        way.wg_pids.append(int((d / node.name / "wg" / "wgm0.pid").read_text()))
    return way


# -- measurements -------------------------------------------------------------------------

def iperf(way: Way, seconds: int, streams: int) -> dict[str, float]:
    server = subprocess.Popen(["ip", "netns", "exec", way.dst.netns, "iperf3", "-s", "-1",
                               "--forceflush"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        for _ in range(20):
            line = server.stdout.readline()
            if "Server listening" in line or not line:
                break
        snmp0 = [benchlib.netns_snmp(n.netns) for n in way.topo.nodes]
        wg0 = sum(benchlib.proc_cpu_seconds(p) for p in way.wg_pids)
        busy0, _ = benchlib.machine_busy_seconds()
        t0 = time.monotonic()
        res = subprocess.run(["ip", "netns", "exec", way.src.netns, "iperf3", "-c",
                              way.dst.ipv4, "-t", str(seconds + 1), "-O", "1", "-P",
                              str(streams), "-J"],
                             capture_output=True, text=True, check=True, timeout=seconds + 60)
        wall = time.monotonic() - t0
        busy1, _ = benchlib.machine_busy_seconds()
        wg1 = sum(benchlib.proc_cpu_seconds(p) for p in way.wg_pids)
        snmp1 = [benchlib.netns_snmp(n.netns) for n in way.topo.nodes]
    finally:
        server.kill()
        server.wait()
    end = json.loads(res.stdout)["end"]
    received = end["sum_received"]
    drops = sum(b.get("Udp.RcvbufErrors", 0) - a.get("Udp.RcvbufErrors", 0)
                for a, b in zip(snmp0, snmp1, strict=True))
    busy = busy1 - busy0
    return {"gbit_s": received["bits_per_second"] / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "udp_rcvbuf_errors": float(drops),
            # the whole machine over the client's lifetime (incl. the omitted second)
            "cores_busy": busy / wall,
            "cpu_s_per_gbyte": (busy / wall) / (received["bits_per_second"] / 8e9),
            "wireguard_go_cpu_s_per_s": (wg1 - wg0) / wall}


def ping_rtt(way: Way, count: int = 200, interval: float = 0.005) -> list[float]:
    out = sh(["ip", "netns", "exec", way.src.netns, "ping", "-n", "-c", str(count), "-i",
              str(interval), "-W", "1", way.dst.ipv4], check=False, timeout=count + 30)
    return [float(m) for m in _RTT.findall(out)]


# -- knobs --------------------------------------------------------------------------------

@dataclass
class Variant:
    label: str
    way: Way
    streams: int
    apply: Callable[[], None] = lambda: None
    undo: Callable[[], None] = lambda: None


def rcvbuf_knob(way: Way, request: int) -> tuple[Callable[[], None], Callable[[], None]]:
    def apply() -> None:
        for pid in way.wg_pids:
            benchlib.set_socket_buffers(pid, LISTEN_PORT, rcvbuf=request, sndbuf=request)

    def undo() -> None:
        for pid in way.wg_pids:
            benchlib.set_socket_buffers(pid, LISTEN_PORT, rcvbuf=DEFAULT_RCVBUF // 2,
                                        sndbuf=DEFAULT_RCVBUF // 2)
    return apply, undo


def mtu_knob(way: Way, mtu: int, normal: int) -> tuple[Callable[[], None], Callable[[], None]]:
    def set_mtu(value: int) -> None:
        for node in way.topo.nodes:
            topology.ip_batch(node.netns, [f"link set wg0 mtu {value}"])
        for pod in way.topo.pods:  # forget path MTUs learnt at the other setting
            sh(["ip", "-n", pod.netns, "-4", "route", "flush", "cache"])
            sh(["ip", "-n", pod.netns, "-6", "route", "flush", "cache"])
    return (lambda: set_mtu(mtu)), (lambda: set_mtu(normal))


def offload_knob(way: Way) -> tuple[Callable[[], None], Callable[[], None]]:
    def ethtool(state: str) -> None:
        sh(["ip", "netns", "exec", way.src.netns, "ethtool", "-K", "eth0", "tso", state,
            "gso", state])
    return (lambda: ethtool("off")), (lambda: ethtool("on"))


# -- the run ------------------------------------------------------------------------------

@contextlib.contextmanager
def three_ways() -> Iterator[dict[str, Way]]:
    prefixes = [benchlib.new_prefix() for _ in range(3)]
    try:
        for p in prefixes:
            benchlib.run_dir(p)
        ways = {"plaintext": build_plaintext(prefixes[0]),
                "baseline": build_baseline(prefixes[1]),
                "wgmanager": build_wgmanager(prefixes[2])}
        yield ways
    finally:
        for p in prefixes:
            benchlib.cleanup_prefix(p)


def measure(seconds: int, rounds: int, full: bool = False) -> dict[str, Any]:
    with three_ways() as ways:
        plain, base, wgm = ways["plaintext"], ways["baseline"], ways["wgmanager"]
        for way in ways.values():  # first packets wait for a handshake
            if not any(ping_rtt(way, count=1, interval=0.2) for _ in range(5)):
                raise RuntimeError(f"{way.name}: pod1 cannot reach pod2")
        rcv_apply, rcv_undo = rcvbuf_knob(wgm, RCVBUF_REQUEST)
        mtu_apply, mtu_undo = mtu_knob(base, 1440, 1420)
        off_apply, off_undo = offload_knob(wgm)
        variants = [
            Variant("plaintext/1", plain, 1), Variant("baseline/1", base, 1),
            Variant("wgmanager/1", wgm, 1),
            Variant("wgmanager+rcvbuf/1", wgm, 1, rcv_apply, rcv_undo),
            Variant("baseline+rcvbuf/1", base, 1, *rcvbuf_knob(base, RCVBUF_REQUEST)),
            Variant("baseline+mtu1440/1", base, 1, mtu_apply, mtu_undo),
            *([Variant("wgmanager-offload/1", wgm, 1, off_apply, off_undo)] if full else []),
            Variant("plaintext/4", plain, 4), Variant("baseline/4", base, 4),
            Variant("wgmanager/4", wgm, 4),
            Variant("wgmanager+rcvbuf/4", wgm, 4, rcv_apply, rcv_undo),
        ]
        samples: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
        for r in range(rounds):
            for v in variants:
                v.apply()
                try:
                    s = iperf(v.way, seconds, v.streams)
                finally:
                    v.undo()
                samples[v.label].append(s)
                log(f"  round {r + 1}/{rounds} {v.label:<20} {s['gbit_s']:7.3f} Gbit/s  "
                    f"retr {s['retransmits']:>6.0f}  rcvbuf drops {s['udp_rcvbuf_errors']:>6.0f}"
                    f"  cores {s['cores_busy']:.2f}  wg-go {s['wireguard_go_cpu_s_per_s']:.2f}")
        rtt: dict[str, list[float]] = {}
        leaks: dict[str, int] = {}
        for way in ways.values():
            if way is plain:
                rtt[way.name] = ping_rtt(way)
                continue
            pcap = benchlib.run_dir(way.topo.prefix) / "ping.pcap"
            with capture(way.topo.underlay_netns, way.topo.bridge, pcap, wg_ports=(LISTEN_PORT,),
                         pod_nets=tuple(CLUSTER_CIDRS)) as cap:
                rtt[way.name] = ping_rtt(way)
            leaks[way.name] = cap.plaintext_pod_packets()
        for name, values in rtt.items():
            log(f"  ping {name:<10} median {benchlib.median(values):.3f} ms  "
                f"p99 {benchlib.percentile(values, 99):.3f} ms  ({len(values)} replies)")
        log(f"  plaintext pod packets on the underlay during the pings: {leaks}")
    return {"seconds": seconds, "rounds": rounds, "samples": samples, "rtt_ms": rtt,
            "plaintext_pod_packets_on_underlay": leaks, "rcvbuf_request": RCVBUF_REQUEST}


def _med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def entries(raw: dict[str, Any]) -> list[Entry]:
    s = raw["samples"]
    out: list[Entry] = []
    runs = f"median of {raw['rounds']} {raw['seconds']} s runs"
    for streams in (1, 4):
        p, b, w = (_med(s[f"{n}/{streams}"], "gbit_s")
                   for n in ("plaintext", "baseline", "wgmanager"))
        tcp = f"iperf3 TCP, {streams} stream{'s' * (streams > 1)}, pod on node1 to pod on node2"
        out.append(entry(f"throughput.tcp{streams}.plaintext", p, "Gbit/s",
                         f"{tcp}, host-gw routes, no encryption ({runs})"))
        out.append(entry(f"throughput.tcp{streams}.baseline", b, "Gbit/s",
                         f"{tcp}, hand-built wireguard-go + wg + ip route, MTU 1420 ({runs})",
                         compared_with="plaintext", baseline_value=p))
        out.append(entry(f"throughput.tcp{streams}.wgmanager", w, "Gbit/s",
                         f"{tcp}, wgmanager apply (wireguard-go + eBPF redirect, MTU 1440) "
                         f"({runs})", compared_with="baseline", baseline_value=b))
        out.append(entry(f"throughput.tcp{streams}.wgmanager_vs_plaintext", w, "Gbit/s",
                         "the same wgmanager figure against plaintext",
                         compared_with="plaintext", baseline_value=p))
        for way in ("baseline", "wgmanager"):
            cpu = _med(s[f"{way}/{streams}"], "cpu_s_per_gbyte")
            ref = _med(s[f"plaintext/{streams}"], "cpu_s_per_gbyte")
            out.append(entry(f"cpu.tcp{streams}.{way}", cpu, "CPU-s/GB",
                             f"machine CPU time (all cores, /proc/stat) per GB delivered, "
                             f"{way}, {streams} stream(s)", compared_with="plaintext",
                             baseline_value=ref))
        out.append(entry(
            f"cpu.tcp{streams}.wireguard_go_cores.wgmanager",
            _med(s[f"wgmanager/{streams}"], "wireguard_go_cpu_s_per_s"), "cores",
            f"CPU of both wireguard-go processes (utime+stime per second), wgmanager, "
            f"{streams} stream(s)", compared_with="baseline",
            baseline_value=_med(s[f"baseline/{streams}"], "wireguard_go_cpu_s_per_s")))
        for way in ("baseline", "wgmanager"):
            out.append(entry(
                f"drops.tcp{streams}.{way}", _med(s[f"{way}/{streams}"], "udp_rcvbuf_errors"),
                "packets/run", f"UDP receive-buffer drops (Udp RcvbufErrors) in the nodes' "
                f"namespaces per run, {way}, {streams} stream(s)"))
    rtt = raw["rtt_ms"]
    for q, fn in (("median", benchlib.median),
                  ("p99", lambda v: benchlib.percentile(v, 99))):
        p, b, w = (fn(rtt[n]) for n in ("plaintext", "baseline", "wgmanager"))
        what = f"ping RTT {q}, 200 echoes at 5 ms, pod to pod"
        out.append(entry(f"rtt.{q}.plaintext", p, "ms", what + ", plaintext"))
        out.append(entry(f"rtt.{q}.baseline", b, "ms", what + ", hand-built tunnel",
                         compared_with="plaintext", baseline_value=p))
        out.append(entry(f"rtt.{q}.wgmanager", w, "ms", what + ", wgmanager",
                         compared_with="baseline", baseline_value=b))
    eff = 2 * raw["rcvbuf_request"] >> 20
    for label, ref, what in (
            ("wgmanager+rcvbuf/1", "wgmanager/1",
             f"wgmanager, 1 stream, wireguard-go UDP buffers forced to {eff} MiB"),
            ("wgmanager+rcvbuf/4", "wgmanager/4",
             f"wgmanager, 4 streams, wireguard-go UDP buffers forced to {eff} MiB"),
            ("baseline+rcvbuf/1", "baseline/1",
             f"hand-built tunnel, 1 stream, wireguard-go UDP buffers forced to {eff} MiB"),
            ("baseline+mtu1440/1", "baseline/1",
             "hand-built tunnel, 1 stream, wg0 MTU 1440 (the agent's) instead of 1420"),
            ("wgmanager-offload/1", "wgmanager/1",
             "wgmanager, 1 stream, TSO/GSO off on the sending pod's eth0")):
        if label not in s:
            continue  # the offload knob runs with --full only
        name = "knob." + label.replace("/", ".tcp").replace("+", ".").replace("-", ".")
        out.append(entry(name, _med(s[label], "gbit_s"), "Gbit/s", what,
                         compared_with=ref.replace("/", " ") + " stream(s), same rounds",
                         baseline_value=_med(s[ref], "gbit_s")))
    out.append(entry("security.plaintext_pod_packets", float(
        sum(raw["plaintext_pod_packets_on_underlay"].values())), "packets",
        "plaintext pod packets on the underlay bridge during the pings through both "
        "tunnels (must be 0)"))
    return out


def run(*, full: bool = False, seconds: int | None = None,
        rounds: int | None = None) -> tuple[list[Entry], dict[str, Any]]:
    seconds = seconds or (8 if full else 3)
    rounds = rounds or (5 if full else 2)
    log(f"throughput: plaintext, hand-built wireguard-go, wgmanager; {rounds} rounds of "
        f"{seconds} s iperf3 runs")
    raw = measure(seconds, rounds, full)
    return entries(raw), raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--full", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    benchlib.terminate_on_sigterm()
    rows, raw = run(full=a.full, seconds=a.seconds, rounds=a.rounds)
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"machine": benchlib.machine_info(), "results": rows,
                                      "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
