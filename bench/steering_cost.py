#!/usr/bin/env python3
"""What steering after netfilter costs per packet: the program on the uplink's egress (the
default since issue 18) against the old redirect at the pod veth's ingress (still there,
opt-in, ``--pod-interfaces``), on the same topology, alternating A/B in one run.

One 2-node ``wgmanager apply`` topology (``throughput.build_wgmanager``: real wireguard-go,
the real program, host-gw routes, pod MTU 1440). Between measurements the bench re-applies
node1 with or without ``--pod-interfaces 'veth*'`` and checks where the filter is.

1. ``kernel path``: the per-packet CPU cost of everything between the pod's veth and the
   verdict. The pod sends small UDP packets with sendmmsg(2) to an address in a pod CIDR
   whose node has no ready peer (node1 routes 10.244.99.0/24 via node2, the mesh has no
   node for it: the cluster CIDR's DROP), so both modes end in the program's DROP, one at
   the veth, the other after routing, FORWARD, POSTROUTING, the neighbour layer and the
   uplink's qdisc. The sender's thread CPU time covers the whole path: the veth hands the
   packet to the backlog and the softirq runs on the sender's stack when the syscall
   re-enables bottom halves, and this kernel has no IRQ time accounting, so that time is
   charged to the thread. Figure: median ns per packet over PAIRS alternating batches,
   and the median of the paired differences.
2. ``tunnel``: iperf3 TCP, 1 stream, pod1 -> pod2 through WireGuard, Gbit/s and the
   machine's CPU-seconds per GB delivered, per mode, alternating over ROUNDS.

    sudo .venv/bin/python bench/steering_cost.py [--pairs 15] [--rounds 3] [--seconds 5]
                                                 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import throughput
from benchlib import log

from wgmanager.lab.topology import SimNode, ip_batch

DROP_CIDR = "10.244.99.0/24"  # inside the cluster CIDR, no node: DROP in both modes
DROP_DST = "10.244.99.7"
MODES = ("egress", "pod-veth")

SENDER = textwrap.dedent("""
    import ctypes, json, socket, sys, time
    dst, k = sys.argv[1], int(sys.argv[2])
""") + benchlib.SENDMMSG + textwrap.dedent("""\
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((dst, 9))
    fd, sent = s.fileno(), 0
    t0 = time.thread_time()
    while sent < k:
        n = libc.sendmmsg(fd, msgs, min(VLEN, k - sent), 0)
        if n < 0:
            raise OSError(ctypes.get_errno(), "sendmmsg")
        sent += n
    print(json.dumps({"ns_per_packet": (time.thread_time() - t0) / sent * 1e9}))
""")


class Bench:
    def __init__(self, way: throughput.Way, binary: str) -> None:
        self.way = way
        self.prefix = way.topo.prefix
        self.dir = benchlib.run_dir(self.prefix)
        self.path = benchlib.path_with_wireguard_go(binary, self.dir / "bin")
        self.node1: SimNode = way.topo.nodes[0]

    def set_mode(self, mode: str) -> None:
        node = self.node1
        extra = ["--pod-interfaces", "veth*"] if mode == "pod-veth" else []
        throughput.sh(["nsenter", f"--net=/run/netns/{node.netns}", "env", f"PATH={self.path}",
                       sys.executable, "-m", "wgmanager", "--log-level", "warning", "apply",
                       "--mesh", str(self.dir / "mesh.json"), "--node-name", node.name,
                       "--state-dir", str(self.dir / node.name / "state"),
                       "--socket-dir", str(self.dir / node.name / "wg"),
                       "--pin-dir", str(benchlib.pin_dir(self.prefix) / node.name), *extra],
                      timeout=120)
        veth = self.way.src.host_ifname
        out = throughput.sh(["ip", "netns", "exec", node.netns, "tc", "filter", "show", "dev",
                             veth, "ingress"], check=False)
        if ("from_pod" in out) != (mode == "pod-veth"):
            raise RuntimeError(f"mode {mode}: from_pod on {veth} is {'from_pod' in out}")

    def kernel_path(self, packets: int) -> float:
        out = throughput.sh(["ip", "netns", "exec", self.way.src.netns, sys.executable, "-c",
                             SENDER, DROP_DST, str(packets)], timeout=600)
        return float(json.loads(out)["ns_per_packet"])


def measure(pairs: int, rounds: int, seconds: int, packets: int,
            binary: str) -> dict[str, Any]:
    prefix = benchlib.new_prefix()
    try:
        benchlib.run_dir(prefix)
        way = throughput.build_wgmanager(prefix, binary)
        bench = Bench(way, binary)
        node2 = way.topo.nodes[1]
        ip_batch(bench.node1.netns, [f"route add {DROP_CIDR} via {node2.ipv4}"])
        if not any(throughput.ping_rtt(way, count=1, interval=0.2) for _ in range(5)):
            raise RuntimeError("pod1 cannot reach pod2")
        kernel: dict[str, list[float]] = {m: [] for m in MODES}
        diffs: list[float] = []
        for mode in MODES:  # warm-up: caches, the neighbour entry, the first compile
            bench.set_mode(mode)
            bench.kernel_path(packets // 4)
        for i in range(pairs):
            got = {}
            for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
                bench.set_mode(mode)
                got[mode] = bench.kernel_path(packets)
                kernel[mode].append(got[mode])
            diffs.append(got["egress"] - got["pod-veth"])
            log(f"  pair {i + 1}/{pairs}: egress {got['egress']:.0f} ns/packet, "
                f"pod-veth {got['pod-veth']:.0f} ns/packet, "
                f"loadavg {os.getloadavg()[0]:.2f}")
        tunnel: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for r in range(rounds):
            for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
                bench.set_mode(mode)
                s = throughput.iperf(way, seconds, 1)
                tunnel[mode].append(s)
                log(f"  round {r + 1}/{rounds} {mode:<8} {s['gbit_s']:.3f} Gbit/s "
                    f"{s['cpu_s_per_gbyte']:.1f} CPU-s/GB retr {s['retransmits']:.0f}")
        bench.set_mode("egress")
        leak_pcap = bench.dir / "leak.pcap"
        with throughput.capture(way.topo.underlay_netns, way.topo.bridge, leak_pcap,
                                wg_ports=(throughput.LISTEN_PORT,),
                                pod_nets=tuple(throughput.CLUSTER_CIDRS)) as cap:
            throughput.ping_rtt(way, count=50)
        return {
            "loadavg_end": os.getloadavg(),
            "kernel_path_ns_per_packet": {m: statistics.median(v) for m, v in kernel.items()},
            "kernel_path_samples": kernel,
            "kernel_path_delta_ns_median": statistics.median(diffs),
            "kernel_path_deltas": diffs,
            "tunnel_gbit_s": {m: statistics.median(s["gbit_s"] for s in v)
                              for m, v in tunnel.items()},
            "tunnel_cpu_s_per_gbyte": {m: statistics.median(s["cpu_s_per_gbyte"] for s in v)
                                       for m, v in tunnel.items()},
            "tunnel_samples": tunnel,
            "plaintext_pod_packets_egress_mode": cap.plaintext_pod_packets(),
        }
    finally:
        benchlib.cleanup_prefix(prefix)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--wireguard-go", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("steering_cost.py needs root (network namespaces, BPF); run it with sudo",
              file=sys.stderr)
        return 2
    benchlib.remove_stale_runs()
    binary = benchlib.resolve_wireguard_go(args.wireguard_go)
    start = os.getloadavg()
    log(f"loadavg at start: {start}")
    res = measure(args.pairs, args.rounds, args.seconds, args.packets, binary)
    res["loadavg_start"] = start
    k, t = res["kernel_path_ns_per_packet"], res["tunnel_gbit_s"]
    c = res["tunnel_cpu_s_per_gbyte"]
    log(f"kernel path to the verdict: egress {k['egress']:.0f} ns/packet, pod-veth "
        f"{k['pod-veth']:.0f} ns/packet, paired delta median "
        f"{res['kernel_path_delta_ns_median']:.0f} ns")
    log(f"tunnel, 1 TCP stream: egress {t['egress']:.3f} Gbit/s ({c['egress']:.1f} CPU-s/GB), "
        f"pod-veth {t['pod-veth']:.3f} Gbit/s ({c['pod-veth']:.1f} CPU-s/GB)")
    log(f"plaintext pod packets (egress mode, 50 pings): "
        f"{res['plaintext_pod_packets_egress_mode']}; loadavg at end {res['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
