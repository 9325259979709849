#!/usr/bin/env python3
"""Per-packet cost of the real TC program against the number of remote CIDRs in its map.

Loads bpf/wg_redirect.c with bcc onto a scratch pin directory, fills the LPM trie with N
remote /24s (plus the local /24 and a /8 catch-all), and times BPF_PROG_TEST_RUN on frames
that hit a REDIRECT entry, hit the catch-all (DROP) and miss the map (PASS). The kernel
reports the mean ns per run; we take the median of several batches.

    sudo .venv/bin/python bench/datapath_cost.py [--sizes 10,1000,10000,100000] [--json FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import secrets
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgmanager.core.model import Action
from wgmanager.core.plan import MapPlan
from wgmanager.datapath import libbpf
from wgmanager.datapath.bpf import Hook, Program
from wgmanager.datapath.maps import DeviceConfig, PinnedMaps
from wgmanager.datapath.packets import frame

REPEAT = 200_000
BATCHES = 7


def remote_cidrs(n: int) -> list[ipaddress.IPv4Network]:
    # N distinct /24s inside 10.0.0.0/8, skipping the local 10.0.0.0/24.
    return [ipaddress.IPv4Network(((10 << 24) | ((i + 1) << 8), 24)) for i in range(n)]


def measure(sizes: list[int]) -> list[dict[str, object]]:
    pin = Path("/sys/fs/bpf") / f"wgmanager-bench-{secrets.token_hex(3)}"
    rows: list[dict[str, object]] = []
    program = Program(pin_dir=pin, max_cidrs=max(sizes) + 16)
    try:
        with PinnedMaps(pin) as maps:
            maps.write_config(DeviceConfig(wg_ifindex=1, wg_port=51820, wg_mtu=1420))
            base = {ipaddress.ip_network("10.0.0.0/8"): Action.DROP,
                    ipaddress.ip_network("10.0.0.0/24"): Action.LOCAL}
            maps.apply(MapPlan(base, ()))
            filled = 0
            for n in sorted(sizes):
                new = remote_cidrs(n)[filled:]
                maps.apply(MapPlan({c: Action.REDIRECT for c in new}, ()))
                filled = n
                last = remote_cidrs(n)[-1]
                cases = {
                    "hit_redirect": frame("10.0.0.5", str(last.network_address + 7)),
                    "hit_catchall_drop": frame("10.0.0.5", "10.255.255.7"),
                    "miss_pass": frame("10.0.0.5", "192.0.2.7"),
                }
                for case, pkt in cases.items():
                    runs = [libbpf.prog_test_run(program.fds[Hook.FROM_POD], pkt, REPEAT)[1]
                            for _ in range(BATCHES)]
                    rows.append({"entries": n, "case": case,
                                 "ns_per_packet": statistics.median(runs),
                                 "min": min(runs), "max": max(runs)})
                    print(f"{n:>7} entries  {case:<18} {statistics.median(runs):>5} ns/packet "
                          f"(min {min(runs)}, max {max(runs)})", flush=True)
    finally:
        program.close()
        shutil.rmtree(pin, ignore_errors=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,1000,10000,100000")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = measure([int(s) for s in a.sizes.split(",")])
    if a.json:
        a.json.write_text(json.dumps({"kernel": platform.release(), "repeat": REPEAT,
                                      "batches": BATCHES, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
