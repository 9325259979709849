#!/usr/bin/env python3
"""Per-packet cost of steering: wgmanager's TC program vs the netfilter rules a
route/rule-based tool would need, at 10 to 100,000 remote pod CIDRs, in one run.

1. The real TC program (bpf/wg_redirect.c, loaded with bcc onto a scratch pin directory).
   Its LPM trie holds N remote /24s plus the local /24 and a /7 catch-all. The kernel runs
   the program on one frame REPEAT times per BPF_PROG_TEST_RUN and reports the mean ns per
   run; the figure is the median of several batches. Cases: the destination hits a
   REDIRECT entry (the last /24 inserted), hits the catch-all (DROP), misses (PASS).

2. Netfilter, measured in a scratch network namespace ``<prefix>-nf`` made (and deleted)
   here: a veth pair whose far end drops our packets at once (wrong MAC), and a sender
   that pushes K small UDP packets through a connected socket with sendmmsg(2) and reads
   its own thread CPU time, which includes the kernel's OUTPUT hook evaluating the rules
   (no pktgen, no perf). The output chain starts with one "control" rule accepting
   198.51.100.0/24, then the N rules. Batches to the control destination (leaves the
   chain at rule 1) alternate with batches to the measured destination, in one process
   and one ruleset; the added cost per packet is the median over the pairs of
   (measured - control). Variants:

   - ``iptables`` (Debian 12's default, the nf_tables backend): N rules
     ``-d CIDR -j ACCEPT`` in a linear chain. A packet that matches none (any non-pod
     destination, or the last CIDR) walks all N; a hit on rule k walks k.
   - ``iptables-legacy`` (the x_tables backend many older tools still use): the same rules.
   - ``nft`` with an interval set: one rule ``ip daddr @remote accept``, N elements; hit
     (the last CIDR) and miss.

   The send path itself (~2.5 us per packet here) is in both batches of a pair and
   cancels; with no rules at all this method reads 7-20 ns, which is its resolution.

    sudo .venv/bin/python bench/datapath_cost.py [--sizes 10,1000,10000,100000]
                                                  [--rule-sizes ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import Entry, entry, log

from wgmanager.core.model import Action
from wgmanager.core.plan import MapPlan
from wgmanager.datapath import libbpf
from wgmanager.datapath.bpf import Hook, Program
from wgmanager.datapath.maps import DeviceConfig, PinnedMaps
from wgmanager.datapath.packets import frame

REPEAT = 200_000
BATCHES = 7
PAIRS = 21
CONTROL_DST = "198.51.100.7"  # leaves the chain at the first rule
MISS_DST = "192.0.2.7"  # matches no rule
CATCHALL = "10.0.0.0/7"  # the cluster-wide DROP entry: covers every remote /24 below
CATCHALL_DST = "11.255.255.7"  # under the catch-all, in no remote /24 (n < 131,071)
SIZES = (10, 1000, 10_000, 100_000)


def remote_cidrs(n: int) -> list[ipaddress.IPv4Network]:
    # N distinct /24s from 10.0.1.0 upwards (past 10.255.255.0 into 11.x), skipping the
    # local 10.0.0.0/24.
    return [ipaddress.IPv4Network(((10 << 24) | ((i + 1) << 8), 24)) for i in range(n)]


def hit_address(n: int) -> str:
    return str(remote_cidrs(n)[-1].network_address + 7)


# -- 1. the TC program --------------------------------------------------------------------

def measure_bpf(sizes: list[int], pin: Path, batches: int = BATCHES) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    program = Program(pin_dir=pin, max_cidrs=max(sizes) + 16)
    try:
        with PinnedMaps(pin) as maps:
            maps.write_config(DeviceConfig(wg_ifindex=1, wg_port=51820, wg_mtu=1420))
            base = {ipaddress.ip_network(CATCHALL): Action.DROP,
                    ipaddress.ip_network("10.0.0.0/24"): Action.LOCAL}
            maps.apply(MapPlan(base, ()))
            filled = 0
            for n in sorted(sizes):
                new = remote_cidrs(n)[filled:]
                maps.apply(MapPlan({c: Action.REDIRECT for c in new}, ()))
                filled = n
                cases = {
                    "hit_redirect": frame("10.0.0.5", hit_address(n)),
                    "hit_catchall_drop": frame("10.0.0.5", CATCHALL_DST),
                    "miss_pass": frame("10.0.0.5", MISS_DST),
                }
                for case, pkt in cases.items():
                    runs = [libbpf.prog_test_run(program.fds[Hook.FROM_POD], pkt, REPEAT)[1]
                            for _ in range(batches)]
                    rows.append({"entries": n, "case": case,
                                 "ns_per_packet": statistics.median(runs),
                                 "min": min(runs), "max": max(runs)})
                    log(f"  bpf {n:>7} CIDRs  {case:<18} {statistics.median(runs):>6} ns/packet "
                        f"(min {min(runs)}, max {max(runs)})")
    finally:
        program.close()
        shutil.rmtree(pin, ignore_errors=True)
    return rows


# -- 2. netfilter -------------------------------------------------------------------------

# Runs inside the scratch namespace. sendmmsg(2) through ctypes sends VLEN packets per
# system call, so the figure is the kernel's send path (~2.5 us), not Python. Batches to
# the control and the measured destination alternate; we keep each pair's difference.
SENDER = textwrap.dedent("""
    import ctypes, json, socket, sys, time
    control, target = sys.argv[1], sys.argv[2]
    pairs, budget = int(sys.argv[3]), float(sys.argv[4])
""") + benchlib.SENDMMSG + textwrap.dedent("""\
    def batch(dst, k):  # CPU ns per packet of this thread (the OUTPUT hook runs here)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((dst, 9))
        fd, sent = s.fileno(), 0
        t0 = time.thread_time()
        while sent < k:
            n = libc.sendmmsg(fd, msgs, min(VLEN, k - sent), 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), "sendmmsg")
            sent += n
        ns = (time.thread_time() - t0) / sent * 1e9
        s.close()
        return ns
    def size(dst):  # packets for ~budget seconds of CPU
        return max(10, min(1000000, int(budget / (batch(dst, 64) * 1e-9))))
    kc, kt = size(control), size(target)
    c, t = [], []
    for _ in range(pairs):
        c.append(batch(control, kc))
        t.append(batch(target, kt))
    print(json.dumps({"control": c, "target": t, "k_control": kc, "k_target": kt}))
""")


class Scratch:
    """A network namespace with a veth pair; packets routed out of v0 are dropped by v1."""

    def __init__(self, prefix: str) -> None:
        self.netns = f"{prefix}-nf"

    def create(self) -> None:
        benchlib.topology.run(["ip", "netns", "add", self.netns])
        benchlib.topology.ip_batch(self.netns, [
            "link set lo up", "link add v0 type veth peer name v1",
            "link set v0 up", "link set v1 up", "addr add 10.0.0.1/24 dev v0",
            # a next hop whose MAC nobody has: v1 drops the frames as PACKET_OTHERHOST
            "neigh add 10.0.0.2 lladdr 02:00:00:00:00:01 dev v0 nud permanent",
            "route add 10.0.0.0/7 via 10.0.0.2 dev v0",
            "route add 192.0.2.0/24 via 10.0.0.2 dev v0",
            "route add 198.51.100.0/24 via 10.0.0.2 dev v0"])

    def destroy(self) -> None:
        benchlib.topology.run(["ip", "netns", "del", self.netns], check=False)

    def sh(self, argv: list[str], stdin: str | None = None) -> str:
        return benchlib.topology.run(["ip", "netns", "exec", self.netns, *argv], input=stdin,
                                     timeout=600).stdout

    def send(self, target: str, pairs: int, budget: float) -> dict[str, Any]:
        out = self.sh([sys.executable, "-c", SENDER, CONTROL_DST, target, str(pairs),
                       str(budget)])
        return json.loads(out)


def iptables_rules(n: int) -> str:
    lines = ["*filter", ":OUTPUT ACCEPT [0:0]", "-A OUTPUT -d 198.51.100.0/24 -j ACCEPT"]
    lines += [f"-A OUTPUT -d {c} -j ACCEPT" for c in remote_cidrs(n)]
    return "\n".join([*lines, "COMMIT", ""])


def nft_set_rules(n: int) -> str:
    elements = ",\n".join(f"    {c}" for c in remote_cidrs(n))
    return ("table ip wgb {\n"
            "  set remote { type ipv4_addr; flags interval;\n"
            f"    elements = {{\n{elements}\n    }}\n  }}\n"
            "  chain out { type filter hook output priority 0; policy accept;\n"
            "    ip daddr 198.51.100.0/24 accept\n"
            "    ip daddr @remote accept\n  }\n}\n")


VARIANTS = {
    # name: (load argv, unload argv, rules(n), cases)
    "iptables": (["iptables-restore"], ["iptables", "-F", "OUTPUT"], iptables_rules,
                 ("miss",)),
    "iptables-legacy": (["iptables-legacy-restore"], ["iptables-legacy", "-F", "OUTPUT"],
                        iptables_rules, ("miss",)),
    "nft-set": (["nft", "-f", "-"], ["nft", "delete", "table", "ip", "wgb"], nft_set_rules,
                ("hit", "miss")),
}


def measure_netfilter(sizes: list[int], prefix: str, pairs: int = PAIRS,
                      budget: float = 0.03) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    scratch = Scratch(prefix)
    scratch.create()
    try:
        for n in sorted(sizes):
            for variant, (load, unload, rules, cases) in VARIANTS.items():
                scratch.sh(load, rules(n))
                try:
                    for case in cases:
                        dst = hit_address(n) if case == "hit" else MISS_DST
                        r = scratch.send(dst, pairs, budget)
                        c = statistics.median(r["control"])
                        added = statistics.median(
                            t - c for c, t in zip(r["control"], r["target"], strict=True))
                        rows.append({"variant": variant, "rules": n, "case": case,
                                     "added_ns_per_packet": round(added, 1),
                                     "control_ns": r["control"], "target_ns": r["target"],
                                     "packets_per_batch": [r["k_control"], r["k_target"]]})
                        log(f"  {variant:<15} {n:>7} CIDRs  {case:<5} +{added:>10.0f} ns/packet"
                            f"  (send {c:.0f} ns without the rules)")
                finally:
                    scratch.sh(unload)
    finally:
        scratch.destroy()
    return rows


# -- entries ------------------------------------------------------------------------------

def entries(bpf: list[dict[str, Any]], nf: list[dict[str, Any]]) -> list[Entry]:
    out: list[Entry] = []
    nf_by = {(r["variant"], r["rules"], r["case"]): float(r["added_ns_per_packet"])
             for r in nf}
    for r in bpf:
        n, case, ns = int(r["entries"]), str(r["case"]), float(r["ns_per_packet"])
        base = nf_by.get(("iptables", n, "miss")) if case != "hit_catchall_drop" else None
        out.append(entry(
            f"datapath.bpf.{case}.{n}", ns, "ns/packet",
            f"wgmanager's TC program (BPF_PROG_TEST_RUN) with {n} remote CIDRs in its LPM "
            f"trie, {case.replace('_', ' ')}",
            compared_with=(f"iptables (nf_tables) linear chain of {n} rules, per packet"
                           if base is not None else None),
            baseline_value=base, digits=1))
    for r in nf:
        variant, n, case = str(r["variant"]), int(r["rules"]), str(r["case"])
        what = {"iptables": f"{n} iptables rules (nf_tables backend) walked in full",
                "iptables-legacy": f"{n} iptables-legacy rules walked in full",
                "nft-set": f"one nft rule, interval set of {n} CIDRs, {case}"}[variant]
        out.append(entry(f"datapath.{variant}.{case}.{n}", float(r["added_ns_per_packet"]),
                         "ns/packet", what + " (added per-packet cost of the rules)",
                         digits=1))
    return out


def run(*, full: bool = False, sizes: list[int] | None = None,
        rule_sizes: list[int] | None = None) -> tuple[list[Entry], dict[str, Any]]:
    sizes = sizes or list(SIZES)
    rule_sizes = rule_sizes or list(SIZES)
    batches = 11 if full else BATCHES
    with benchlib.owned_prefix() as prefix:
        log(f"datapath cost: TC program at {sizes} CIDRs; netfilter at {rule_sizes} rules "
            f"(scratch netns {prefix}-nf)")
        bpf = measure_bpf(sizes, benchlib.pin_dir(prefix) / "bpf", batches)
        nf = measure_netfilter(rule_sizes, prefix, 41 if full else PAIRS)
    raw = {"repeat": REPEAT, "batches": batches, "bpf": bpf, "netfilter": nf}
    return entries(bpf, nf), raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--rule-sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--full", action="store_true", help="more batches per figure")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    benchlib.terminate_on_sigterm()
    rows, raw = run(full=a.full, sizes=[int(s) for s in a.sizes.split(",")],
                    rule_sizes=[int(s) for s in a.rule_sizes.split(",")])
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"machine": benchlib.machine_info(), "results": rows,
                                      "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
