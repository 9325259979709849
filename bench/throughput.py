#!/usr/bin/env python3
"""iperf3 pod-to-pod throughput between two simulated nodes: plaintext vs wgmanager.

Builds a 2-node topology (network namespaces, host-gw routes), measures TCP throughput from
a pod on node1 to a pod on node2 with the plain routes, then runs `wgmanager apply` on both
nodes (real wireguard-go + the eBPF redirect) and measures again on the same pods. Both
runs share the machine's cores with everything else on it, like the rest of the lab.

    sudo .venv/bin/python bench/throughput.py [--seconds 5] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.harness import Cluster, cleanup_prefix
from wgmanager.lab import topology


def iperf(cluster: Cluster, seconds: int, streams: int = 1) -> dict[str, float]:
    src = cluster.topo.nodes[0].pods[0]
    dst = cluster.topo.nodes[1].pods[0]
    server = subprocess.Popen(["ip", "netns", "exec", dst.netns, "iperf3", "-s", "-1",
                               "--forceflush"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        for _ in range(20):
            line = server.stdout.readline()
            if "Server listening" in line or not line:
                break
        else:
            raise RuntimeError("iperf3 server did not start")
        res = subprocess.run(["ip", "netns", "exec", src.netns, "iperf3", "-c", dst.ipv4,
                              "-t", str(seconds), "-P", str(streams), "-J"],
                             capture_output=True, text=True, check=True, timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    doc = json.loads(res.stdout)
    end = doc["end"]
    return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "cpu_sender_pct": end["cpu_utilization_percent"]["host_total"]}


def run(seconds: int, runs: int) -> dict[str, object]:
    prefix = "wgb" + secrets.token_hex(2)
    out: dict[str, object] = {}
    try:
        topo = topology.create(prefix, nodes=2, pods_per_node=1)
        cluster = Cluster(topo)
        plain = [iperf(cluster, seconds) for _ in range(runs)]
        cluster.generate_keys()
        cluster.write_mesh()
        cluster.apply_all()
        with cluster.capture("bench") as cap:
            enc = [iperf(cluster, seconds) for _ in range(runs)]
        leaked = cap.plaintext_pod_packets()
        for name, samples in (("plaintext", plain), ("wgmanager", enc)):
            med = statistics.median(s["gbit_s"] for s in samples)
            out[name] = {"gbit_s_median": round(med, 3),
                         "gbit_s_runs": [round(s["gbit_s"], 3) for s in samples],
                         "retransmits": [int(s["retransmits"]) for s in samples]}
            print(f"{name:<10} {med:6.2f} Gbit/s  runs={[round(s['gbit_s'], 2) for s in samples]}")
        out["ratio_wgmanager_over_plaintext"] = round(
            out["wgmanager"]["gbit_s_median"] / out["plaintext"]["gbit_s_median"], 3)  # type: ignore[index]
        out["plaintext_pod_packets_on_underlay_during_encrypted_runs"] = leaked
        print(f"ratio {out['ratio_wgmanager_over_plaintext']}, plaintext pod packets seen on "
              f"the underlay during the encrypted runs: {leaked}")
    finally:
        cleanup_prefix(prefix)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = run(a.seconds, a.runs)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
