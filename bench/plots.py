#!/usr/bin/env python3
"""The plots of docs/benchmarks.md, as SVG files drawn from bench/results.json.

No plotting library: a line chart with a logarithmic x axis (the number of nodes or map
entries) is a few dozen SVG elements, and the files stay reviewable in a diff.

    .venv/bin/python bench/plots.py [--results bench/results.json] [--out docs/plots]

Charts (each series is one metric name pattern of results.json, ``{n}`` the x value):

- controlplane_latency.svg: key change -> peer updated, idle and busy, median and p99, ms;
- controlplane_rss.svg: the agent's peak RSS, MiB;
- datapath_cost.svg: the TC program's cost per packet against the number of map entries, ns.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

W, H = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 180, 40, 50
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


@dataclass(frozen=True)
class Chart:
    file: str
    title: str
    x_label: str
    y_label: str
    series: tuple[tuple[str, str], ...]  # (label, metric pattern with {n})


CHARTS = (
    Chart("controlplane_latency.svg", "Key change -> peer updated (one agent, real API server)",
          "nodes", "ms",
          (("idle, median", "controlplane.{n}.key_change_idle.median"),
           ("idle, p99", "controlplane.{n}.key_change_idle.p99"),
           ("50 changes/s, median", "controlplane.{n}.key_change_busy.median"),
           ("50 changes/s, p99", "controlplane.{n}.key_change_busy.p99"),
           ("reconcile (mean)", "controlplane.{n}.reconcile_idle.mean"))),
    Chart("controlplane_rss.svg", "Agent peak RSS", "nodes", "MiB",
          (("agent VmRSS", "controlplane.{n}.agent_peak_rss"),)),
    Chart("datapath_cost.svg", "TC program cost per packet (BPF_PROG_TEST_RUN)",
          "CIDR map entries", "ns/packet",
          (("hit, redirect", "datapath.bpf.hit_redirect.{n}"),
           ("hit, catch-all drop", "datapath.bpf.hit_catchall_drop.{n}"),
           ("miss, pass", "datapath.bpf.miss_pass.{n}"))),
)


def points(results: list[dict[str, Any]], pattern: str) -> list[tuple[float, float]]:
    rx = re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)") + "$")
    out = []
    for r in results:
        m = rx.match(r["name"])
        if m and r.get("value") is not None:
            out.append((float(m.group(1)), float(r["value"])))
    return sorted(out)


def _ticks(lo: float, hi: float) -> list[float]:
    """About five round ticks from 0 to hi."""
    step = 10 ** math.floor(math.log10(max(hi, 1e-9) / 5))
    for mult in (1, 2, 5, 10):
        if hi / (step * mult) <= 6:
            step *= mult
            break
    return [i * step for i in range(int(hi / step) + 2) if i * step >= lo]


def svg(chart: Chart, results: list[dict[str, Any]]) -> str:
    data = [(label, points(results, pat)) for label, pat in chart.series]
    data = [(label, pts) for label, pts in data if pts]
    xs = sorted({x for _, pts in data for x, _ in pts})
    if not xs:
        raise ValueError(f"no data for {chart.file}")
    ymax = max(y for _, pts in data for _, y in pts) * 1.1
    yticks = _ticks(0, ymax)
    ymax = max(ymax, yticks[-1])
    lx0, lx1 = math.log10(xs[0]), math.log10(xs[-1])
    span = (lx1 - lx0) or 1.0

    def px(x: float) -> float:
        return LEFT + (math.log10(x) - lx0) / span * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return H - BOTTOM - y / ymax * (H - TOP - BOTTOM)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{chart.title}</text>']
    for t in yticks:
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for x in xs:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" y2="{H - BOTTOM}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">'
                   f'{int(x):,}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">'
               f'{chart.x_label} (log scale)</text>')
    out.append(f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">{chart.y_label}</text>')
    for i, (label, pts) in enumerate(data):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                   'stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}">'
                       f'<title>{label}: {y:g} {chart.y_label} at {int(x):,}</title></circle>')
        ly = TOP + 10 + i * 18
        out.append(f'<line x1="{W - RIGHT + 10}" x2="{W - RIGHT + 30}" y1="{ly}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{W - RIGHT + 36}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("results.json"))
    p.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "plots")
    a = p.parse_args()
    results = json.loads(a.results.read_text())["results"]
    a.out.mkdir(parents=True, exist_ok=True)
    for chart in CHARTS:
        (a.out / chart.file).write_text(svg(chart, results))
        print(a.out / chart.file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
