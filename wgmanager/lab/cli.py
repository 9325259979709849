"""The `wgmanager lab ...` commands: progress for people, stable JSON for machines."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from wgmanager.lab import topology
from wgmanager.lab.lab import Lab, LabError


def _progress(message: str) -> None:
    print(f"  - {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, BPF); run it with sudo")
    command = args.lab_command
    if command == "up":
        return up(args)
    if command == "down":
        lab = _load_or_bare(args)
        done = lab.down()
        print("\n".join(done) if done else "nothing to remove: no lab found")
        return 0
    lab = Lab.load(args.root)
    if command == "status":
        doc = lab.status()
        print(json.dumps(doc, indent=2) if args.json else render_status(doc))
        return 0
    if command == "check":
        return check(lab)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return lab.exec(args.name, argv)


def _existing(args: argparse.Namespace) -> Lab | None:
    """A healthy lab of the requested shape (repeat `up` is harmless), or None if there is
    no lab at all. Anything else, such as the remains of a crashed run, is a clear error."""
    try:
        lab = Lab.load(args.root)
    except LabError:
        if topology.namespaces(args.prefix) or (args.root / "owner.pid").exists():
            raise LabError(f"a leftover lab (from a crashed or interrupted run) is in the way "
                           f"under {args.root}; remove it with `wgmanager lab down`") from None
        return None
    shape = (len(lab.nodes), len(lab.nodes[0].pods) if lab.nodes else 0)
    if shape != (args.nodes, args.pods_per_node):
        raise LabError(f"a lab with {shape[0]} nodes x {shape[1]} pods is up; remove it "
                       "with `wgmanager lab down` before building another shape")
    dead = [n.name for n in lab.nodes if lab.agent_pid(n) is None]
    if dead or not lab.cp_dir.exists():
        raise LabError(f"the lab under {args.root} is broken (agents not running: "
                       f"{', '.join(dead) or 'none'}); rebuild it: `wgmanager lab down` "
                       "then `wgmanager lab up`")
    return lab


def _load_or_bare(args: argparse.Namespace) -> Lab:
    """`down` must work after any crash: with no readable state, clean up by prefix."""
    try:
        return Lab.load(args.root)
    except LabError:
        return Lab(args.root, prefix=args.prefix)


def up(args: argparse.Namespace) -> int:
    existing = _existing(args)
    if existing is not None:
        print(render_status(existing.status()))
        print("\nthe lab is already up (nothing to do); `wgmanager lab down` removes it")
        return 0
    lab = Lab(args.root, prefix=args.prefix)
    started = time.monotonic()
    print(f"wgmanager lab up: {args.nodes} nodes, {args.pods_per_node} pods each", flush=True)
    lab.up(nodes=args.nodes, pods_per_node=args.pods_per_node, progress=_progress)
    doc = lab.status()
    print(render_status(doc))
    print(f"\nlab up in {time.monotonic() - started:.1f}s. Next: `wgmanager lab check`; "
          f"the API: --kubeconfig {doc['kubeconfig']}; `wgmanager lab down` to "
          "remove it.")
    return 0


def check(lab: Lab) -> int:
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
    rows = [("NODE", "NETNS", "ADDRESS", "AGENT", "PEERS", "HANDSHAKES", "PODS")]
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
                     " ".join(f"{p['name']}={p['ipv4']}" for p in n["pods"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


