#!/usr/bin/env python3
"""Runs every benchmark, prints one table and writes bench/results.json.

    sudo .venv/bin/python bench/run.py [--full] [--only datapath,...,rotation] [--merge]
                                       [--profile]

(`make bench` / `make bench-full` run `make setup` first, then this.)

1. ``datapath``     bench/datapath_cost.py: per-packet cost of the TC program at 10-100k
                    CIDRs vs the iptables / iptables-legacy / nft-set rules a
                    route/rule-based tool would need.
2. ``throughput``   bench/throughput.py: iperf3 and ping between pods on two simulated
                    nodes, plaintext vs a hand-built wireguard-go tunnel vs wgmanager, CPU,
                    and the knobs (receive buffer, MTU, offloads); with --profile, where
                    the CPU goes (perf: crypto, copies, TUN/UDP, the TC program).
3. ``controlplane`` bench/control_plane.py: one agent against a real kube-apiserver with
                    100 and 1,000 Node objects (and 5,000 and 10,000 with --full): time to program,
                    key-change latency idle and under 50 changes/s, RSS, CPU, operations
                    per event.

4. ``rotation``     bench/rotation.py: a 5-node lab, `wgmanager rotate-keys --all` with
                    --max-concurrent 1 and 2 under 10 ms pings through every node, two TCP
                    streams and an underlay capture: time (per node, per protocol phase),
                    packets lost and duplicated, TCP resets and stalls, plaintext; and a
                    naive key swap of one node under the same traffic as the baseline.

bench/results.json holds ``machine`` (kernel, CPU, nproc, date, git commit, ...),
``command``, ``wall_seconds``, ``code_per_benchmark`` (git commit + a digest of the
wgmanager sources each benchmark ran: a shared tree may change during a run),
``results`` (a list of {name, value, unit, compared_with, baseline_value, ratio, what};
ratio = value / baseline_value; each also names its ``benchmark``), ``errors`` and each
benchmark's ``raw`` samples. With ``--merge`` the figures of the benchmarks not run now are
kept from the existing file (with their own date, command and code version in
``merged_from``), so that one benchmark can be re-run without discarding the others.
Benchmarks measure; nothing here asserts a timing. The exit status is non-zero only when
a benchmark could not run at all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import control_plane
import datapath_cost
import rotation
import throughput
from benchlib import Entry, log

BENCHES: dict[str, Callable[..., tuple[list[Entry], dict[str, Any]]]] = {
    "datapath": datapath_cost.run,
    "throughput": throughput.run,
    "controlplane": control_plane.run,
    "rotation": rotation.run,
}
# Entries written before they named their benchmark, recognised by name.
LEGACY_PREFIXES = {"datapath": ("datapath.",),
                   "throughput": ("throughput.", "cpu.", "rtt.", "drops.", "knob.", "security."),
                   "controlplane": ("controlplane.",), "rotation": ("rotation.",)}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def fmt(v: float | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(rows: list[Entry]) -> str:
    head = ("name", "value", "unit", "compared with", "baseline", "ratio")
    body = [(r["name"], fmt(r["value"]), r["unit"], r["compared_with"] or "",
             fmt(r["baseline_value"]), fmt(r["ratio"])) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    right = {1, 4, 5}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(head), line(tuple("-" * w for w in widths))] +
                     [line(b) for b in body])


def benchmark_of(e: Entry) -> str:
    name = e.get("benchmark")
    if isinstance(name, str):
        return name
    return next((b for b, prefixes in LEGACY_PREFIXES.items()
                 if str(e["name"]).startswith(prefixes)), "unknown")


def merge(doc: dict[str, Any], old: dict[str, Any], ran: set[str]) -> None:
    """Adds to ``doc`` what ``old`` holds for the benchmarks not in ``ran`` (in place)."""
    kept = [{**e, "benchmark": benchmark_of(e)} for e in old.get("results", [])
            if benchmark_of(e) not in ran]
    names = sorted({e["benchmark"] for e in kept})
    doc["results"] = kept + doc["results"]
    for key in ("seconds_per_benchmark", "code_per_benchmark", "raw", "errors"):
        doc[key] = {**{b: v for b, v in old.get(key, {}).items() if b in names}, **doc[key]}
    earlier = old.get("merged_from", {})
    machine = old.get("machine", {})
    doc["merged_from"] = {b: earlier.get(b) or {"date": machine.get("date"),
                                                "command": old.get("command"),
                                                "git_commit": machine.get("git_commit")}
                          for b in names}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true",
                   help="longer runs, more samples, 5,000 nodes (tens of minutes)")
    p.add_argument("--only", default=",".join(BENCHES),
                   help=f"comma-separated subset of {', '.join(BENCHES)}")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--merge", action="store_true",
                   help="keep the other benchmarks' figures from the existing output file")
    p.add_argument("--profile", action="store_true",
                   help="throughput: one more wgmanager run under perf (where the CPU goes)")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py needs root (network namespaces, bpf, wireguard-go)",
              file=sys.stderr)
        return 2
    chosen = [b.strip() for b in a.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    benchlib.terminate_on_sigterm()
    stale = benchlib.remove_stale_runs()
    if stale:
        log(f"removed what crashed benchmark runs left behind: {stale}")

    machine = benchlib.machine_info()
    log(f"machine: {machine['cpu_model']}, {machine['nproc']} CPUs, kernel "
        f"{machine['kernel']}, commit {machine['git_commit'][:12]}")
    started = time.monotonic()
    results: list[Entry] = []
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    code: dict[str, str] = {}  # the code each benchmark ran (sources may change meanwhile)
    for name in chosen:
        t0 = time.monotonic()
        code[name] = benchlib.code_version()
        try:
            extra = {"profile": True} if name == "throughput" and a.profile else {}
            rows, raw[name] = BENCHES[name](full=a.full, **extra)
            results += [{**r, "benchmark": name} for r in rows]
        except Exception as e:  # one broken benchmark must not hide the others' figures
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"{name} FAILED:\n{traceback.format_exc()}")
        timings[name] = round(time.monotonic() - t0, 1)
        after = benchlib.code_version()
        if after != code[name]:
            log(f"{name}: NOTE the wgmanager sources changed during this benchmark "
                f"({code[name]} -> {after}); its figures mix both")
            code[name] += f" -> {after}"
        log(f"{name}: {timings[name]:.0f} s")
    wall = time.monotonic() - started

    doc: dict[str, Any] = {
        "machine": machine,
        "command": "bench/run.py" + (" --full" if a.full else "") +
                   ("" if a.only == ",".join(BENCHES) else f" --only {a.only}") +
                   (" --profile" if a.profile else "") +
                   (" --merge" if a.merge else ""),
        "wall_seconds": round(wall, 1), "seconds_per_benchmark": timings,
        "code_per_benchmark": code,
        "results": results, "errors": errors, "raw": raw}
    kept = ""
    if a.merge and a.output.exists():
        merge(doc, json.loads(a.output.read_text()), ran=set(chosen))
        kept = (f" (with {len(doc['results']) - len(results)} earlier figures of "
                f"{', '.join(doc['merged_from'])})")
    a.output.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(table(results))
    print(f"\n{len(results)} figures in {wall:.0f} s; written to {a.output}{kept}")
    for name, err in errors.items():
        print(f"{name}: FAILED: {err}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
