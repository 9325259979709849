#!/usr/bin/env python3
"""Key rotation under traffic: packets lost, and how long `wgmanager rotate-keys --all` takes.

Why: a WireGuard peer *is* its public key, so replacing a node's key the obvious way makes
every peer drop that node's traffic until it has learnt the new key. The rotation protocol
(``wgmanager.core.rotation``: a second device per rotating node on listen port + 1,
clone-to-both eBPF steering until each peer confirms the new key by a handshake) promises
that nothing is lost. This measures that promise on a real lab with traffic crossing every
node, how long an operator waits for a whole cluster, where that time goes, and what the
naive swap costs instead.

Setup: a ``wgmanager.lab.Lab`` of N nodes (default 5), one pod each, under
/run/wgmanager-bench/<prefix> (namespaces ``<prefix>-...``, pins under
/sys/fs/bpf/wgmanager-bench/<prefix>): real etcd + kube-apiserver, one real agent per node
with real wireguard-go and the eBPF datapath. The agents are started exactly as
``Lab.start_agent`` does, plus ``--log-format json`` (millisecond timestamps, to time the
phases of the protocol from their logs).

Each rotation run (``--max-concurrent 1``, then 2, on the same lab):

- traffic starts 1 s before and stops 2 s after the command: ``ping -D -i 0.01`` around a
  ring, pod of node i -> pod of node i+1 over IPv4 (every node sends and receives), plus
  one IPv6 ping across the ring; two TCP echo streams (``wgmanager.lab.probe stream``,
  8 KiB every 10 ms, checked byte for byte; ``traffic.tcp_server`` + ``traffic.tcp_stream``,
  back-to-back connections of ``segment`` seconds until the run ends); a capture on the
  underlay bridge (``Lab.capture``);
- ``wgmanager rotate-keys --all --max-concurrent K`` runs as a user runs it: a subprocess
  with the lab's admin kubeconfig; each output line is timestamped as it arrives.

Reported: the command's wall time (and from the first "requested" to the last "completed"
line), each node's time from its own output, ping echoes sent / lost / duplicated, TCP
connections reset or failed and the longest time a stream received nothing, plaintext pod
packets on the underlay (must be 0), and, for K = 1, the protocol's phases per node from the
agents' logs (request seen, second wireguard-go up, next key published, last peer switched,
all peers confirmed, new key published, noticed by the CLI, next node requested).

Loss accounting: ``ping -D`` prints every reply with its arrival time. An echo is lost when
its sequence number is missing while a later one was answered; the echoes sent after the
last reply are "in flight" at the stop and not counted, unless nothing was answered in the
last 0.25 s (then they are lost). ``(DUP!)`` replies are duplicates (both copies of a
cloned packet delivered), kept as bursts (time, count). The TC programs' drop counters
(peer not ready, no device) are read from the pinned maps before and after, and each
node's UDP receive-buffer drops (``RcvbufErrors``, IPv4 + IPv6: wireguard-go's socket), so
a loss can be told apart from a datapath drop or a full socket. For every loss the agents'
log lines around it are kept in the raw output, and for every node its rotation's timeline.

Baseline, ``naive``: under the same traffic, one node's key is replaced the way a tool
without the protocol would: stop its agent (SIGTERM: device and datapath stay), write a new
private key into its current key file (``KeyStore.write``), start the agent; measured until
every node holds the new key.

    sudo .venv/bin/python bench/rotation.py [--nodes 5] [--concurrency 1,2] [--no-naive]
                                            [--json FILE]

Benchmarks measure; nothing here asserts a timing or a count.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import Entry, entry, log

from wgmanager.core.keys import PrivateKey
from wgmanager.datapath.maps import Counter, PinnedMaps
from wgmanager.keystore import KeyStore, slot_key
from wgmanager.lab import lab as labmod
from wgmanager.lab import traffic
from wgmanager.lab.lab import Lab
from wgmanager.lab.topology import Pod, SimNode

PING_INTERVAL = 0.01
STREAM_PORTS = (7200, 7201)
LEAD_S = 1.0  # traffic runs this long before the measured action
TAIL_S = 2.0  # and this long after it
IN_FLIGHT_S = 0.25  # echoes sent after the last reply count as lost only past this silence
ROTATE_TIMEOUT_S = 300
CONTEXT_S = 1.0  # agent log lines kept around each loss
NAIVE = "naive key swap of one node"  # stop its agent, new key file, start it (docstring)
T = TypeVar("T")


# -- the lab ------------------------------------------------------------------------------

# -- traffic ------------------------------------------------------------------------------

_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*?icmp_seq=(\d+).*? time=([\d.]+) ms")
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received"
                      r"(?:, \+(\d+) duplicates)?(?:, \+(\d+) errors)?")


@dataclass
class PingResult:
    src: str
    dst: str
    family: str
    transmitted: int  # ping's own count
    counted: int  # echoes whose fate is known (the ones in flight at the stop excluded)
    received: int  # distinct echoes answered
    lost: int
    duplicates: int
    errors: int  # ICMP errors ping reported (unreachable, ...)
    lost_at: list[float]  # estimated send time of each lost echo (Unix time)
    duplicate_bursts: list[tuple[float, int]]  # (first arrival, count), 0.2 s apart
    rtt_max_ms: float  # of first replies (duplicates excluded)
    rtt_p99_ms: float
    duplicate_rtt_max_ms: float  # how late the duplicates came
    other_output: list[str] = field(default_factory=list)


class PingProbe:
    """``ping -D -i 0.01`` in the background; ``stop()`` interrupts it and accounts."""

    def __init__(self, src: Pod, dst: str, family: str) -> None:
        self.src, self.dst, self.family = src.name, dst, family
        # `ip netns exec` execs ping (no fork): SIGINT to this pid reaches ping itself.
        self.proc = subprocess.Popen(["ip", "netns", "exec", src.netns, "ping", "-n", "-D",
                                      "-i", str(PING_INTERVAL), dst],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.replies: dict[int, float] = {}  # unwrapped icmp_seq -> reply time
        self.rtts: list[float] = []  # ms, first replies
        self.dups: list[tuple[float, float]] = []  # (arrival time, rtt ms)
        self.other: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        wraps, last = 0, 0
        for line in self.proc.stdout:
            m = _REPLY.match(line)
            if m is None:
                self.other.append(line.rstrip())
                continue
            seq = int(m.group(2))
            if seq < last - 30000:  # icmp_seq wraps at 65536 (after 655 s at 10 ms)
                wraps += 1
            last = seq
            seq += wraps * 65536
            if "(DUP!)" in line or seq in self.replies:
                self.dups.append((float(m.group(1)), float(m.group(3))))
            else:
                self.replies[seq] = float(m.group(1))
                self.rtts.append(float(m.group(3)))

    def stop(self) -> PingResult:
        stopped = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self.thread.join(timeout=30)
        summary = next((m for ln in self.other if (m := _SUMMARY.search(ln))), None)
        if summary is None:
            raise RuntimeError(f"ping {self.src} -> {self.dst} printed no summary: "
                               f"{self.other[-5:]}")
        transmitted = int(summary.group(1))
        errors = int(summary.group(4) or 0)
        last = max(self.replies, default=0)
        silent = stopped - self.replies[last] if last else float("inf")
        counted = transmitted if silent > IN_FLIGHT_S else last
        lost = [s for s in range(1, counted + 1) if s not in self.replies]
        return PingResult(self.src, self.dst, self.family, transmitted, counted,
                          len(self.replies), len(lost), len(self.dups), errors,
                          self._send_times(lost), self._bursts(),
                          max(self.rtts, default=float("nan")),
                          benchlib.percentile(self.rtts, 99),
                          max((r for _, r in self.dups), default=0.0),
                          [ln for ln in self.other if ln and not _SUMMARY.search(ln)][:20])

    def _bursts(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        last = float("-inf")
        for t, _ in self.dups:
            if t - last < 0.2:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((round(t, 3), 1))
            last = t
        return out

    def _send_times(self, lost: list[int]) -> list[float]:
        """When each lost echo was sent, interpolated between the neighbouring replies."""
        seqs = sorted(self.replies)
        out = []
        for s in lost:
            i = bisect.bisect_left(seqs, s)
            prev = seqs[i - 1] if i > 0 else None
            nxt = seqs[i] if i < len(seqs) else None
            if prev is not None and nxt is not None:
                t0, t1 = self.replies[prev], self.replies[nxt]
                out.append(t0 + (s - prev) * (t1 - t0) / (nxt - prev))
            elif prev is not None:
                out.append(self.replies[prev] + (s - prev) * PING_INTERVAL)
            elif nxt is not None:
                out.append(self.replies[nxt] - (nxt - s) * PING_INTERVAL)
        return [round(t, 3) for t in out]


class StreamLoop:
    """Back-to-back ``traffic.tcp_stream`` connections of ``segment`` seconds from ``src``
    to a ``traffic.tcp_server`` until stopped (the probe's stream has a fixed length)."""

    def __init__(self, src: Pod, dst: Pod, host: str, port: int, family: str,
                 segment: float) -> None:
        self.label = f"{src.name} -> {dst.name} {family}"
        self.src, self.host, self.port, self.segment = src, host, port, segment
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.results.append(dict(traffic.tcp_stream(self.src, self.host, self.port,
                                                        self.segment).result()))
            if time.monotonic() - t0 < 1.0:
                self._stop.wait(0.5)  # refused at once: don't spin

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self.thread.join()
        return self.results


@dataclass
class TrafficReport:
    pings: list[PingResult]
    streams: dict[str, list[dict[str, Any]]]  # label -> one result per connection
    plaintext_pod_packets: int
    unexpected_packets: int
    wireguard_packets: int

    @property
    def sent(self) -> int:
        return sum(p.counted for p in self.pings)

    @property
    def lost(self) -> int:
        return sum(p.lost for p in self.pings)

    @property
    def duplicates(self) -> int:
        return sum(p.duplicates for p in self.pings)

    def _conns(self) -> list[dict[str, Any]]:
        return [c for conns in self.streams.values() for c in conns]

    @property
    def tcp_resets(self) -> int:
        return sum("reset" in str(c.get("error", "")).lower() for c in self._conns())

    @property
    def tcp_failed(self) -> int:
        return sum(not c.get("ok") for c in self._conns())

    @property
    def tcp_max_stall(self) -> float:
        return max((float(c.get("max_stall_seconds", 0.0)) for c in self._conns()),
                   default=float("nan"))

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "lost": self.lost, "duplicates": self.duplicates,
                "ping_errors": sum(p.errors for p in self.pings),
                "tcp_connections": len(self._conns()), "tcp_failed": self.tcp_failed,
                "tcp_resets": self.tcp_resets, "tcp_max_stall_s": self.tcp_max_stall,
                "plaintext_pod_packets": self.plaintext_pod_packets,
                "unexpected_packets": self.unexpected_packets,
                "wireguard_packets": self.wireguard_packets}


def under_traffic(lab: Lab, name: str, segment: float, action: Callable[[], T], *,
                  tcp: bool = True) -> tuple[T, TrafficReport]:
    """Runs ``action`` with the pings, streams (unless not ``tcp``) and capture of the
    module docstring."""
    pods = [n.pods[0] for n in lab.nodes]
    n = len(pods)
    stream_pairs = [(pods[0], pods[n // 2], "ipv4"), (pods[(n // 2 + 1) % n], pods[1 % n],
                                                      "ipv6")] if tcp else []
    with contextlib.ExitStack() as stack:
        for (_, dst, _), port in zip(stream_pairs, STREAM_PORTS, strict=False):
            stack.enter_context(traffic.tcp_server(dst, port))
        cap = stack.enter_context(lab.capture(name))
        pings = [PingProbe(pods[i], pods[(i + 1) % n].ipv4, "ipv4") for i in range(n)]
        pings.append(PingProbe(pods[0], pods[n // 2].ipv6, "ipv6"))
        streams = [StreamLoop(src, dst, getattr(dst, fam), port, fam, segment)
                   for (src, dst, fam), port in zip(stream_pairs, STREAM_PORTS, strict=False)]
        try:
            time.sleep(LEAD_S)
            value = action()
            time.sleep(TAIL_S)
        finally:
            ping_results = [p.stop() for p in pings]
            stream_results = {s.label: s.stop() for s in streams}
    return value, TrafficReport(ping_results, stream_results, cap.plaintext_pod_packets(),
                                cap.unexpected_packets(), cap.wireguard_packets())


# -- rotate-keys and the agents' logs -----------------------------------------------------

_DONE = re.compile(r"^(\S+): completed in ([\d.]+)s")


@dataclass
class RotateRun:
    max_concurrent: int
    rc: int
    started: float  # Unix time the command was started
    seconds: float  # its wall time, Python start-up included
    lines: list[tuple[float, str]]  # (Unix time read, line)

    def first(self, prefix: str) -> dict[str, float]:
        """node -> time of its first output line starting with ``<node>: <prefix>``."""
        out: dict[str, float] = {}
        for t, line in self.lines:
            node, _, rest = line.partition(": ")
            if rest.startswith(prefix) and node not in out:
                out[node] = t
        return out

    @property
    def per_node(self) -> dict[str, float]:
        """Each node's time as rotate-keys reports it (its request to its completion)."""
        return {m.group(1): float(m.group(2))
                for _, line in self.lines if (m := _DONE.match(line))}


def rotate_all(lab: Lab, max_concurrent: int) -> RotateRun:
    argv = [sys.executable, "-m", "wgmanager", "rotate-keys", "--all", "--max-concurrent",
            str(max_concurrent), "--timeout", str(ROTATE_TIMEOUT_S),
            "--kubeconfig", str(lab.admin_kubeconfig)]
    started, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=benchlib.REPO)
    assert proc.stdout is not None
    lines = [(time.time(), line.rstrip()) for line in proc.stdout]
    rc = proc.wait()
    return RotateRun(max_concurrent, rc, started, time.monotonic() - t0, lines)


@dataclass(frozen=True)
class Event:
    ts: float
    node: str
    msg: str
    fields: dict[str, Any]

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items()
                         if k not in ("ts", "level", "logger", "msg"))
        return f"{clock(self.ts)} {self.node}: {self.msg} {extra}".rstrip()


def clock(ts: float) -> str:
    """HH:MM:SS.mmm, local time (as the lab's text logs)."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def agent_events(lab: Lab, since: float, until: float) -> list[Event]:
    """Every JSON log line of every agent in [since, until], in time order."""
    out: list[Event] = []
    for node in lab.nodes:
        with contextlib.suppress(OSError):
            for raw in lab.agent_log_file(node).read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(doc, dict) and since <= float(doc.get("ts", 0)) <= until:
                    out.append(Event(float(doc["ts"]), node.name, str(doc.get("msg", "")),
                                     doc))
    return sorted(out, key=lambda e: e.ts)


PHASES = ("request seen by the agent", "second wireguard-go up", "next key published",
          "last peer switched", "all peers confirmed", "new key published",
          "rotate-keys notices", "next node requested")


def phase_times(run: RotateRun, events: list[Event],
                names: list[str]) -> dict[str, dict[str, float]]:
    """node -> phase -> seconds, for a run with --max-concurrent 1 (phases in order; each
    is the time since the previous one's end)."""
    requested, noticed = run.first("requested"), run.first("completed")
    order = sorted(requested, key=lambda k: requested[k])

    def first(node: str, msg: str, after: float,
              pred: Callable[[Event], bool] = lambda _e: True) -> float | None:
        return next((e.ts for e in events
                     if e.node == node and e.msg == msg and e.ts >= after and pred(e)), None)

    out: dict[str, dict[str, float]] = {}
    for i, node in enumerate(order):
        marks: list[float | None] = [requested[node]]
        start = first(node, "key rotation started", requested[node] - 0.5)
        marks.append(start)
        if start is None:
            out[node] = {}
            continue
        marks.append(first(node, "wireguard-go started", start))
        published = first(node, "next public key published", start,
                          lambda e: e.fields.get("public_key") not in (None, "None"))
        # Peers switch in a pass after the node's clone-to-both steering; the agent logs
        # its publish only once the API server has answered, and the watch can deliver
        # the change to a peer before that: the publish happened before the first switch.
        steered = first(node, "reconciled", start,
                        lambda e: e.fields.get("key_rotation") == "switch")
        switched = [first(peer, "reconciled", steered,
                          lambda e: int(e.fields.get("peer_ops", 0)) > 0)
                    for peer in names if peer != node] if steered is not None else [None]
        if published is not None and None not in switched:
            published = min(published, *(t for t in switched if t is not None))
        marks.append(published)
        marks.append(None if None in switched else max(t for t in switched if t is not None))
        done = first(node, "key rotation completed", published or start)
        marks.append(done)
        marks.append(first(node, "public key published", done) if done is not None else None)
        marks.append(noticed.get(node))
        marks.append(requested[order[i + 1]] if i + 1 < len(order) else None)
        phases: dict[str, float] = {}
        for name, a, b in zip(PHASES, marks, marks[1:], strict=False):
            if a is not None and b is not None:
                phases[name] = round(b - a, 3)
        out[node] = phases
    return out


def routine(e: Event) -> bool:
    """A reconcile that changed nothing (logged every 0.25 s by a rotating agent)."""
    return e.msg == "reconciled" and not any(
        int(e.fields.get(k, 0) or 0) for k in ("peer_ops", "map_upserts", "map_deletes"))


def timelines(run: RotateRun, events: list[Event]) -> dict[str, list[str]]:
    """Per rotating node, from its request to rotate-keys noticing its completion: its own
    log lines and the other agents' non-routine ones."""
    requested, noticed = run.first("requested"), run.first("completed")
    out: dict[str, list[str]] = {}
    for node, t0 in requested.items():
        t1 = noticed.get(node, t0 + 60) + 0.2
        out[node] = [f"{e.ts - t0:+7.3f} {e.line()}" for e in events
                     if t0 - 0.2 <= e.ts <= t1 and (e.node == node or not routine(e))]
    return out


def loss_context(pings: list[PingResult], events: list[Event]) -> list[dict[str, Any]]:
    """Each burst of consecutive losses of one ping, with the agents' log lines around it."""
    out: list[dict[str, Any]] = []
    for p in pings:
        bursts: list[list[float]] = []
        for t in p.lost_at:
            if bursts and t - bursts[-1][-1] < 0.1:
                bursts[-1].append(t)
            else:
                bursts.append([t])
        for b in bursts:
            around = [e.line() for e in events
                      if b[0] - CONTEXT_S <= e.ts <= b[-1] + CONTEXT_S and not routine(e)]
            before = [e.line() for e in events if e.ts <= b[0] and not routine(e)][-4:]
            out.append({"ping": f"{p.src} -> {p.dst} ({p.family})", "lost": len(b),
                        "from": b[0], "to": b[-1], "just_before": before,
                        "agent_log": around[:60]})
    return out


# -- the measurements ---------------------------------------------------------------------

def wait_settled(lab: Lab, timeout: float = 120.0) -> float:
    """Until every node holds every other node's published key and no node is rotating."""
    def settled() -> bool:
        for node in lab.nodes:
            anns = (lab.core.read_node(node.name).metadata.annotations or {})
            if anns.get("wgmanager.io/next-public-key"):
                return False
        return lab.converged(list(lab.nodes))
    return labmod.await_condition(settled, timeout, "the mesh to settle", interval=0.2)


def datapath_drops(lab: Lab) -> dict[str, int]:
    """Packets each node's TC program dropped so far (peer not ready, or no device)."""
    out: dict[str, int] = {}
    for node in lab.nodes:
        with PinnedMaps(lab.pin_root / node.name) as maps:
            counters = maps.read_counters()
        out[node.name] = (counters[Counter.DROPPED_NOT_READY][0]
                          + counters[Counter.DROPPED_NO_DEVICE][0])
    return out


def udp_rcvbuf_errors(lab: Lab) -> dict[str, int]:
    """UDP datagrams each node's kernel dropped because a socket's receive buffer was full
    (IPv4 + IPv6): on a node, that is wireguard-go's socket."""
    out: dict[str, int] = {}
    for node in lab.nodes:
        v6 = subprocess.run(["ip", "netns", "exec", node.netns, "cat", "/proc/net/snmp6"],
                            capture_output=True, text=True, check=True).stdout
        n6 = next((int(ln.split()[1]) for ln in v6.splitlines()
                   if ln.startswith("Udp6RcvbufErrors")), 0)
        out[node.name] = benchlib.netns_snmp(node.netns).get("Udp.RcvbufErrors", 0) + n6
    return out


def counters(lab: Lab) -> dict[str, dict[str, int]]:
    return {"datapath_drops": datapath_drops(lab), "udp_rcvbuf_errors": udp_rcvbuf_errors(lab)}


def counters_since(lab: Lab, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {what: {k: v - before[what].get(k, 0) for k, v in now.items()}
            for what, now in counters(lab).items()}


def keys(lab: Lab) -> dict[str, str]:
    return {n.name: lab.annotation(n.name) or "" for n in lab.nodes}


def measure_rotation(lab: Lab, max_concurrent: int, segment: float, *,
                     tcp: bool = True) -> dict[str, Any]:
    before = keys(lab)
    before_counters = counters(lab)
    t0 = time.time()
    run, report = under_traffic(lab, f"rotate-c{max_concurrent}", segment,
                                lambda: rotate_all(lab, max_concurrent), tcp=tcp)
    dropped = counters_since(lab, before_counters)
    events = agent_events(lab, t0, time.time())
    after = keys(lab)
    try:
        settle_s: float | None = wait_settled(lab, 60)
    except labmod.LabError:
        settle_s = None
    requested, noticed = run.first("requested"), run.first("completed")
    agent_seconds = {e.node: float(e.fields.get("seconds", "nan")) for e in events
                     if e.msg == "key rotation completed"}
    out: dict[str, Any] = {
        "max_concurrent": max_concurrent, "rc": run.rc, "wall_seconds": round(run.seconds, 3),
        "request_to_last_completed_s": round(max(noticed.values()) - min(requested.values()),
                                              3) if requested and noticed else None,
        "per_node_seconds": run.per_node, "agent_seconds": agent_seconds,
        "keys_changed": sum(before[k] != after.get(k) for k in before),
        "settled_after_s": settle_s,
        **report.summary(), **dropped,
        "pings": [asdict(p) for p in report.pings], "streams": report.streams,
        "loss": loss_context(report.pings, events),
        "timelines": timelines(run, events),
        "cli_output": [f"{t - run.started:7.3f} {line}" for t, line in run.lines],
    }
    if max_concurrent == 1:
        out["phases"] = phase_times(run, events, [n.name for n in lab.nodes])
    return out


def measure_naive(lab: Lab, node: SimNode, segment: float) -> dict[str, Any]:
    store = KeyStore(lab.node_dir(node) / "state")
    old = lab.annotation(node.name)
    marks: dict[str, float] = {}

    def swap() -> None:
        marks["stop"] = time.time()
        lab.stop_agent(node)  # SIGTERM: device, filters and maps stay; traffic still flows
        store.write(PrivateKey.generate(), name=slot_key(store.load_rotation().slot))
        marks["start"] = time.time()
        lab.start_agent(node)
        labmod.await_condition(lambda: lab.annotation(node.name) not in (None, old)
                               and lab.converged(list(lab.nodes)), 120,
                               "every node to hold the swapped key", interval=0.1)
        marks["converged"] = time.time()

    t0 = time.time()
    before_counters = counters(lab)
    _, report = under_traffic(lab, "naive", segment, swap)
    dropped = counters_since(lab, before_counters)
    events = agent_events(lab, t0, time.time())
    losses = loss_context(report.pings, events)
    return {"node": node.name, "agent_start_to_converged_s":
            round(marks["converged"] - marks["start"], 3),
            "stop_to_converged_s": round(marks["converged"] - marks["stop"], 3),
            "longest_outage_s": max((round(b["to"] - b["from"] + PING_INTERVAL, 3)
                                     for b in losses), default=0.0),
            **report.summary(), **dropped,
            "pings": [asdict(p) for p in report.pings], "streams": report.streams,
            "loss": losses}


def measure(nodes: int, concurrency: list[int], naive: bool,
            tcp: bool = True, settle: float | None = None) -> dict[str, Any]:
    prefix = benchlib.new_prefix()
    benchlib.run_dir(prefix)
    lab = Lab(benchlib.BENCH_ROOT / prefix, prefix=prefix, pin_root=benchlib.BENCH_PIN_ROOT)
    # JSON log lines carry millisecond timestamps for the phase timings.
    lab.agent_global_args = ("--log-format", "json")
    raw: dict[str, Any] = {"nodes": nodes, "prefix": prefix, "tcp": tcp, "runs": [],
                           "settle": settle}
    segment = 30.0  # first stream connections: a guess; later ones follow the measured time
    try:
        log(f"rotation: lab {prefix}, {nodes} nodes, one pod each")
        t0 = time.monotonic()
        lab.up(nodes=nodes, pods_per_node=1, progress=lambda m: log(f"  {m}"),
               agent_args=([] if settle is None else ["--key-rotation-settle", str(settle)]))
        raw["lab_up_s"] = round(time.monotonic() - t0, 1)
        for k in concurrency:
            wait_settled(lab)
            log(f"  rotate-keys --all --max-concurrent {k} under traffic")
            r = measure_rotation(lab, k, segment, tcp=tcp)
            raw["runs"].append(r)
            segment = max(10.0, 1.2 * r["wall_seconds"] + 2)
            log(f"  max-concurrent {k}: {r['wall_seconds']:.1f} s (rc {r['rc']}), "
                f"{r['keys_changed']}/{nodes} keys changed; ping {r['lost']}/{r['sent']} "
                f"lost, {r['duplicates']} duplicates; tcp {r['tcp_connections']} connections, "
                f"{r['tcp_failed']} failed, {r['tcp_resets']} resets, max stall "
                f"{r['tcp_max_stall_s']:.3f} s; plaintext {r['plaintext_pod_packets']}, "
                f"unexpected {r['unexpected_packets']}; dropped by the TC programs "
                f"{r['datapath_drops']}, by full UDP receive buffers {r['udp_rcvbuf_errors']}")
            for loss in r["loss"]:
                log(f"    LOST {loss['lost']} on {loss['ping']} at {clock(loss['from'])} "
                    f"(over {loss['to'] - loss['from']:.2f} s): "
                    + "; last agent lines before it: " + "; ".join(loss["just_before"]))
        if naive:
            wait_settled(lab)
            node = lab.nodes[len(lab.nodes) // 2]
            log(f"  naive key swap of {node.name} under traffic")
            nv = measure_naive(lab, node, min(segment, 20.0))
            raw["naive"] = nv
            log(f"  naive: ping {nv['lost']}/{nv['sent']} lost, longest outage "
                f"{nv['longest_outage_s']:.2f} s, tcp {nv['tcp_failed']} failed / "
                f"{nv['tcp_resets']} resets, max stall {nv['tcp_max_stall_s']:.2f} s; "
                f"converged {nv['agent_start_to_converged_s']:.1f} s after the agent start; "
                f"UDP receive-buffer drops {nv['udp_rcvbuf_errors']}")
    except BaseException:
        with contextlib.suppress(Exception):
            for node in lab.nodes:
                tail = lab.agent_log_file(node).read_text().splitlines()[-8:]
                log(f"{node.name} agent log (last lines):\n" + "\n".join(tail))
        raise
    finally:
        lab.down()
        benchlib.cleanup_prefix(prefix)
    return raw


# -- entries ------------------------------------------------------------------------------

def _median(values: Sequence[float]) -> float:
    return benchlib.median([v for v in values if v == v])


def entries(raw: dict[str, Any]) -> list[Entry]:
    n = raw["nodes"]
    runs = {r["max_concurrent"]: r for r in raw["runs"]}
    naive = raw.get("naive")

    def nv(key: str) -> float | None:
        return float(naive[key]) if naive else None

    out: list[Entry] = []
    first = runs.get(1) or (raw["runs"][0] if raw["runs"] else None)
    if first is not None:
        k = first["max_concurrent"]
        cond = f"rotate-keys --all --max-concurrent {k}, {n} nodes, under traffic"
        out += [
            entry(f"rotation.all_{n}_nodes_seconds", first["wall_seconds"], "s",
                  f"wall time of `{cond}` (Python start-up included)"),
            entry("rotation.per_node_seconds.median",
                  _median(list(first["per_node_seconds"].values())), "s",
                  "one node's rotation as rotate-keys reports it (request to completion), "
                  "median over the nodes; the naive swap: its agent stopped to every node "
                  "holding the new key", compared_with=NAIVE if naive else None,
                  baseline_value=nv("stop_to_converged_s")),
            entry("rotation.packets_lost", first["lost"], "packets",
                  f"ping echoes lost, {len(first['pings'])} pings at 10 ms covering every "
                  f"node, {cond} (of {first['sent']} sent)",
                  compared_with=NAIVE if naive else None, baseline_value=nv("lost")),
            entry("rotation.packets_sent", first["sent"], "packets",
                  f"ping echoes sent (and accounted) during {cond}"),
            entry("rotation.ping_duplicates", first["duplicates"], "packets",
                  "duplicate echo replies (both copies of a cloned packet delivered)",
                  compared_with=NAIVE if naive else None, baseline_value=nv("duplicates")),
            entry("rotation.duplicate_max_delay_ms",
                  max((p["duplicate_rtt_max_ms"] for p in first["pings"]), default=0.0), "ms",
                  "round trip of the latest duplicate reply (how late a duplicate arrives)"),
            entry("rotation.tcp_resets", first["tcp_resets"], "connections",
                  f"TCP echo streams reset ({first['tcp_connections']} connections, "
                  f"{first['tcp_failed']} failed in any way)",
                  compared_with=NAIVE if naive else None, baseline_value=nv("tcp_resets")),
            entry("rotation.tcp_max_stall_seconds", first["tcp_max_stall_s"], "s",
                  "longest time a TCP stream received no echoed byte",
                  compared_with=NAIVE if naive else None,
                  baseline_value=nv("tcp_max_stall_s")),
            entry("rotation.udp_receive_buffer_drops",
                  sum(first.get("udp_rcvbuf_errors", {}).values()), "packets",
                  "UDP datagrams the nodes' kernels dropped for a full socket receive buffer "
                  "(wireguard-go's), all nodes, during the rotation"),
            entry("rotation.plaintext_packets", first["plaintext_pod_packets"], "packets",
                  "pod packets seen in plaintext on the underlay during the rotation "
                  "(must be 0)"),
        ]
        for phase in PHASES:
            vals = [p[phase] for p in first.get("phases", {}).values() if phase in p]
            if vals:
                out.append(entry(f"rotation.phase.{phase.replace(' ', '_')}.median",
                                 _median(vals), "s",
                                 f"per node, from the previous phase's end to '{phase}' "
                                 f"(agents' JSON logs and rotate-keys output), median of "
                                 f"{len(vals)}"))
    base = runs.get(1)
    for k, r in sorted(runs.items()):
        if k == 1:
            continue
        cmp = "--max-concurrent 1, same lab" if base else None
        out += [
            entry(f"rotation.concurrent{k}.all_{n}_nodes_seconds", r["wall_seconds"], "s",
                  f"wall time of rotate-keys --all --max-concurrent {k}, {n} nodes",
                  compared_with=cmp, baseline_value=base["wall_seconds"] if base else None),
            entry(f"rotation.concurrent{k}.packets_lost", r["lost"], "packets",
                  f"ping echoes lost (of {r['sent']}), --max-concurrent {k}",
                  compared_with=cmp, baseline_value=base["lost"] if base else None),
            entry(f"rotation.concurrent{k}.tcp_resets", r["tcp_resets"], "connections",
                  f"TCP streams reset, --max-concurrent {k}"),
            entry(f"rotation.concurrent{k}.plaintext_packets", r["plaintext_pod_packets"],
                  "packets", f"plaintext pod packets on the underlay, --max-concurrent {k}"),
        ]
    if naive:
        out += [
            entry("rotation.naive_swap.packets_lost", naive["lost"], "packets",
                  f"{NAIVE} ({naive['node']}: agent stopped, new key written to its key file, "
                  f"agent started) under the same traffic: ping echoes lost (of "
                  f"{naive['sent']})"),
            entry("rotation.naive_swap.longest_outage_seconds", naive["longest_outage_s"],
                  "s", "naive swap: longest run of consecutive lost echoes on one ping"),
            entry("rotation.naive_swap.converge_seconds", naive["agent_start_to_converged_s"],
                  "s", "naive swap: agent start to every node holding the new key"),
        ]
    return out


def run(*, full: bool = False, nodes: int = 5, concurrency: Sequence[int] = (1, 2),
        naive: bool = True, tcp: bool = True,
        settle: float | None = None) -> tuple[list[Entry], dict[str, Any]]:
    """bench/run.py's entry point (``full`` changes nothing: one lab, a few runs)."""
    del full
    raw = measure(nodes, list(concurrency), naive, tcp, settle)
    return entries(raw), raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--concurrency", default="1,2",
                   help="comma-separated --max-concurrent values, one run each (same lab)")
    p.add_argument("--no-naive", dest="naive", action="store_false",
                   help="skip the naive key swap baseline")
    p.add_argument("--no-tcp", dest="tcp", action="store_false",
                   help="pings only, no TCP streams (to tell a ping loss caused by the "
                        "streams' load from one caused by the rotation itself)")
    p.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                   help="the agents' --key-rotation-settle (default: theirs), to measure "
                        "what it costs in duplicates and protects")
    p.add_argument("--json", type=Path, help="also write the entries and raw data here")
    a = p.parse_args()
    benchlib.terminate_on_sigterm()
    rows, raw = run(nodes=a.nodes, concurrency=[int(k) for k in a.concurrency.split(",")],
                    naive=a.naive, tcp=a.tcp, settle=a.settle)
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"machine": benchlib.machine_info(), "results": rows,
                                      "raw": raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
