"""The `wgmanager lab ...` commands: progress for people, stable JSON for machines."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from wgmanager.errors import ConfigError
from wgmanager.lab import kubelab, kubelets, topology
from wgmanager.lab.kubelab import KubeLab
from wgmanager.lab.lab import Lab, LabError


def _progress(message: str) -> None:
    print(f"  - {message}", flush=True)


AnyLab = Lab | KubeLab


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, BPF); run it with sudo")
    command = args.lab_command
    if command == "up":
        return up(args)
    if command == "down":
        done = _down(args)
        print("\n".join(done) if done else "nothing to remove: no lab found")
        return 0
    lab = load(args.root)
    if command == "status":
        doc = lab.status()
        print(json.dumps(doc, indent=2) if args.json else render_status(doc))
        return 0
    if command == "check":
        return check(lab)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return lab.exec(args.name, argv)


def load(root: Path) -> AnyLab:
    """Whichever lab is up under ``root``: the chart on real kubelets, or agent processes."""
    if (root / kubelab.STATE_FILE).exists():
        return KubeLab.load(root)
    return Lab.load(root)


def _existing(args: argparse.Namespace) -> AnyLab | None:
    """A healthy lab of the requested shape (repeat `up` is harmless), or None if there is
    no lab at all. Anything else, such as the remains of a crashed run, is a clear error."""
    try:
        lab = load(args.root)
    except LabError:
        if topology.namespaces(args.prefix) or (args.root / "owner.pid").exists():
            raise LabError(f"a leftover lab (from a crashed or interrupted run) is in the way "
                           f"under {args.root}; remove it with `wgmanager lab down`") from None
        return None
    kind = "daemonset" if isinstance(lab, KubeLab) else "processes"
    nodes = lab.topology.nodes
    shape = (len(nodes), len(nodes[0].pods) if nodes else 0)
    if shape != (args.nodes, args.pods_per_node) or kind != args.agents:
        raise LabError(f"a lab with {shape[0]} nodes x {shape[1]} pods (--agents {kind}) is "
                       "up; remove it with `wgmanager lab down` before building another")
    if isinstance(lab, KubeLab):
        problems = lab.broken()
    else:
        problems = [f"{n.name}'s agent is not running" for n in lab.nodes
                    if lab.agent_pid(n) is None]
        if not lab.cp_dir.exists():
            problems.append("its control plane is gone")
    if problems:
        raise LabError(f"the lab under {args.root} is broken ({'; '.join(problems)}); "
                       "rebuild it: `wgmanager lab down` then `wgmanager lab up`")
    return lab


def _down(args: argparse.Namespace) -> list[str]:
    """`down` must work after any crash: with no readable state, clean up by prefix, both
    what real kubelets leave (processes, cgroups) and what agent processes leave."""
    try:
        return load(args.root).down()
    except LabError:
        done = kubelets.cleanup(args.root, args.prefix)
        return done + Lab(args.root, prefix=args.prefix).down()


def up(args: argparse.Namespace) -> int:
    existing = _existing(args)
    if existing is not None:
        print(render_status(existing.status()))
        print("\nthe lab is already up (nothing to do); `wgmanager lab down` removes it")
        return 0
    started = time.monotonic()
    lab: AnyLab
    overlay = getattr(args, "overlay", "none")
    if overlay != "none" and args.agents != "processes":
        raise ConfigError(f"--overlay {overlay} needs --agents processes (real kubelets get "
                          "their pod routes from the controller-manager's CIDRs, host-gw)")
    if args.agents == "daemonset":
        print(f"wgmanager lab up: {args.nodes} real kubelets, {args.pods_per_node} pods each, "
              "the Helm chart's DaemonSet", flush=True)
        lab = KubeLab(args.root, prefix=args.prefix)
        lab.up(nodes=args.nodes, pods_per_node=args.pods_per_node, progress=_progress)
    else:
        print(f"wgmanager lab up: {args.nodes} nodes, {args.pods_per_node} pods each, one "
              f"agent process per node, pod routes: {overlay if overlay != 'none' else 'host-gw'}",
              flush=True)
        lab = Lab(args.root, prefix=args.prefix)
        lab.up(nodes=args.nodes, pods_per_node=args.pods_per_node, progress=_progress,
               overlay=overlay)
    doc = lab.status()
    print(render_status(doc))
    print(f"\nlab up in {time.monotonic() - started:.1f}s. Next: `wgmanager lab check`; "
          f"the API: --kubeconfig {doc['kubeconfig']}; `wgmanager lab down` to "
          "remove it.")
    return 0


def check(lab: AnyLab) -> int:
    started = time.monotonic()
    report = lab.check(progress=_progress)
    rows = [("FROM", "TO", "FAMILY", "ICMP", "TCP")]
    rows += [(p.src, p.dst, p.family, _mark(p.icmp), _mark(p.tcp)) for p in report.pairs]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    passed = sum(p.ok for p in report.pairs)
    print(f"\npairs: {passed}/{len(report.pairs)} passed")
    print(f"underlay capture, encryption on: {report.plaintext_encrypted} plaintext pod "
          f"packets (want 0), {report.wireguard_packets} WireGuard packets, "
          f"{report.unexpected_encrypted} other packets (want 0)")
    print(f"sanity inversion, datapath detached: {report.plaintext_inverted} plaintext pod "
          "packets (want > 0: the detector works)")
    print(f"after re-attaching: {report.plaintext_restored} plaintext pod packets (want 0)")
    verdict = "PASS" if report.ok else "FAIL"
    print(f"\n{verdict} in {time.monotonic() - started:.1f}s")
    return 0 if report.ok else 1


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def render_status(doc: dict[str, Any]) -> str:
    lines = [f"lab {doc['prefix']}: API server {doc['apiserver']}, kubeconfig "
             f"{doc['kubeconfig']}",
             f"underlay: bridge {doc['underlay']['interface']} in netns "
             f"{doc['underlay']['netns']}", ""]
    rows = _kubelet_rows(doc) if doc.get("agents") == "daemonset" else _process_rows(doc)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _pods(node: dict[str, Any]) -> str:
    return " ".join(f"{p['name']}={p['ipv4']}" for p in node["pods"])


def _kubelet_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("NODE", "READY", "ADDRESS", "AGENT POD", "PEERS",
                                    "HANDSHAKES", "PODS")]
    for n in doc["nodes"]:
        agent = n["agent"]
        state = ("ready" if agent["ready"] else "not ready") if agent["running"] else "down"
        wg = n["wireguard"]
        rows.append((n["name"], "yes" if n["ready"] else "no", n["ipv4"],
                     f"{agent['pod'] or '-'} {state}, {agent['restarts']} restarts",
                     f"{wg['peers']}/{wg['peers_expected']}", str(wg["handshakes"]),
                     _pods(n)))
    return rows


def _process_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("NODE", "NETNS", "ADDRESS", "AGENT", "PEERS",
                                    "HANDSHAKES", "PODS")]
    for n in doc["nodes"]:
        agent = n["agent"]
        state = ("ready" if agent["ready"] else "not ready") if agent["running"] else "down"
        st = n["status"] or {}
        peers = st.get("peers") or []
        expected = (st.get("expected") or {}).get("peers_expected")
        ages = [p["last_handshake_age_seconds"] for p in peers
                if p["last_handshake_age_seconds"] is not None]
        hs = f"{len(ages)} (newest {min(ages):.0f}s)" if ages else "none yet"
        rows.append((n["name"], n["netns"], n["ipv4"], f"{state} pid {agent['pid']}",
                     f"{len(peers)}/{expected if expected is not None else '?'}", hs,
                     _pods(n)))
    return rows
