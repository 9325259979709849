#!/usr/bin/env python3
"""Control-plane scale: one real agent against a real kube-apiserver holding N Node objects.

Setup (``wgmanager.lab``): a one-node lab under /run/wgmanager-bench/<prefix> (network
namespaces named ``<prefix>-...``, a host link on a free 10.9x.0.0/24, etcd +
kube-apiserver bound to the host address, the agent's RBAC as ``Lab`` sets it up). Node
``node1`` is registered as kubelet would and is the only node backed by a process: a real
``wgmanager agent`` in its namespace, with real wireguard-go and the eBPF datapath. The
other N nodes are synthetic Node objects created through the admin client by a few worker
threads: a valid WireGuard public key (annotation), an IPv4 and an IPv6 InternalIP nobody
answers on, and a /24 + /64 pod CIDR pair. Nothing sends traffic to them (no persistent
keepalive, no pod traffic), so they cost the agent exactly their control-plane work.

For each N (ascending; the lab and the API server are reused, N grows):

- ``program_s``: the agent is started (fresh: the previous size's device, filters and maps
  are torn down with `wgmanager teardown`); time until its WireGuard device holds all N
  peers, read over the UAPI socket every 0.1 s (the same socket ``Lab.device`` uses).
- key-change latency, ``idle``: one synthetic node at a time gets a new key (a merge patch
  of its annotation); time from sending the patch (wall clock) to the ``ts`` of the
  agent's own JSON log line ``reconciled`` for the pass that applied it (an incremental
  pass naming the node, or a pass too large to name its nodes, or a full one), written
  once the device acknowledged the write and the datapath map is updated; ms resolution.
  The bench follows the log file (no device access while it waits), then confirms with
  ONE UAPI dump that the device holds the new key; a pass the device does not confirm is
  skipped and counted (``log_misses``), and the next one is taken. It does not poll the
  device while the agent works: at 5,000 peers each dump holds wireguard-go's device lock
  for 14-17 ms, which the agent's write then waits for (the earlier version of this bench
  measured that: a 2.9 ms pass at 100 nodes became 10.6 ms at 5,000, 4.5 ms of it waiting
  on wireguard-go). ``poll_ms`` is now the median duration of that one confirming dump.
  Median and p99 over the changes. Per change, the deltas of
  wgmanager_peer_operations_total and wgmanager_datapath_map_operations_total (scraped
  from the agent's /metrics inside its namespace once its reconcile is recorded) must be
  O(1): 1 add + 1 remove, whatever N is.
- the same while a background thread patches the InternalIPs of other synthetic nodes at
  50 per second (``busy``); the operations of the phase are split by kind (key changes are
  add + remove, address changes are updates).
- the agent's peak RSS (VmRSS of its pid, sampled every 0.25 s) and CPU seconds
  (utime + stime from /proc/<pid>/stat) per phase, and its own
  wgmanager_reconcile_duration_seconds (by kind: full, changes, timers) and
  wgmanager_node_event_to_configured_seconds (sum / count over the phase).

    sudo .venv/bin/python bench/control_plane.py [--sizes 100,1000,5000,10000] [--changes 100]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import Entry, entry, log

from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.lab import lab as labmod
from wgmanager.lab import topology
from wgmanager.lab.lab import Lab, LabError
from wgmanager.lab.topology import SimNode

METRICS_PORT = 9877
CLUSTER_CIDRS = ("10.244.0.0/16", "10.64.0.0/10", "fd00:244::/32")
ANNOTATION = "wgmanager.io/public-key"
WORKERS = 4
MERGE = "application/merge-patch+json"


def synth_name(i: int) -> str:
    return f"synth-{i:05d}"


def synth_node(i: int, key: str) -> dict[str, Any]:
    """Node i: pod CIDRs 10.(64 + i/256).(i%256).0/24 and fd00:244:(0x1000+i)::/64."""
    v4 = f"10.{64 + i // 256}.{i % 256}.0/24"
    v6 = f"fd00:244:{0x1000 + i:x}::/64"
    return {"metadata": {"name": synth_name(i), "annotations": {ANNOTATION: key}},
            "spec": {"podCIDR": v4, "podCIDRs": [v4, v6]},
            "status": {"addresses": addresses(i, 0)}}


def addresses(i: int, generation: int) -> list[dict[str, str]]:
    v4 = ipaddress.IPv4Address("100.64.0.0") + (generation % 2) * 65536 + i
    return [{"type": "InternalIP", "address": str(v4)},
            {"type": "InternalIP", "address": f"fd98::{generation % 2:x}:{i:x}"}]


def new_key() -> PublicKey:
    return PrivateKey.generate().public_key


# -- the agent's device and metrics -------------------------------------------------------

class UapiPoller:
    """Raw `get=1` requests on the agent's wireguard-go socket: cheap enough to poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.last_duration = 0.0

    def get(self) -> bytes:
        for attempt in range(2):
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.settimeout(10)
                    self.sock.connect(str(self.path))
                t0 = time.monotonic()
                self.sock.sendall(b"get=1\n\n")
                buf = b""
                while not (buf.endswith(b"\n\n") and b"errno=" in buf[-16:]):
                    chunk = self.sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionResetError("UAPI socket closed")
                    buf += chunk
                self.last_duration = time.monotonic() - t0
                return buf
            except OSError:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def peers(self) -> int:
        try:
            return self.get().count(b"\npublic_key=")
        except OSError:
            return 0

    def holds(self, key: PublicKey) -> bool:
        return b"public_key=" + key.hex().encode() + b"\n" in self.get()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def scrape(netns: str) -> dict[str, float]:
    """The agent's /metrics as {"name{labels}": value} (comments dropped)."""
    body = benchlib.http_get(netns, "127.0.0.1", METRICS_PORT, "/metrics")
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def summed(m: dict[str, float], name: str) -> float:
    """A series summed over its labels."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


PASS_KINDS = ("full", "changes", "timers")  # wgmanager_reconcile_duration_seconds{kind}


def ops(m: dict[str, float]) -> dict[str, float]:
    duration = "wgmanager_reconcile_duration_seconds"
    by_kind = {f"{kind}_{part}": m.get(f'{duration}_{suffix}{{kind="{kind}"}}', 0.0)
               for kind in PASS_KINDS for part, suffix in (("n", "count"), ("s", "sum"))}
    return by_kind | {"add": m.get('wgmanager_peer_operations_total{op="add"}', 0.0),
            "update": m.get('wgmanager_peer_operations_total{op="update"}', 0.0),
            "remove": m.get('wgmanager_peer_operations_total{op="remove"}', 0.0),
            "map_upsert": m.get('wgmanager_datapath_map_operations_total{op="upsert"}', 0.0),
            "map_delete": m.get('wgmanager_datapath_map_operations_total{op="delete"}', 0.0),
            "events": m.get("wgmanager_node_event_to_configured_seconds_count", 0.0),
            "event_s": m.get("wgmanager_node_event_to_configured_seconds_sum", 0.0),
            "reconciles": summed(m, f"{duration}_count"),
            "reconcile_s": summed(m, f"{duration}_sum")}


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


# -- the bench ----------------------------------------------------------------------------

@dataclass
class Phase:
    latencies_ms: list[float]
    ops_per_change: list[dict[str, float]]
    totals: dict[str, float]
    agent_cpu_s: float
    seconds: float
    background_patches: int = 0
    background_rate: float = 0.0
    poll_ms: float = 0.0
    log_misses: int = 0  # log lines of candidate passes the device did not confirm
    # Per change, the agent's log line of the pass that applied it: its duration and the
    # part of it spent waiting on the WireGuard device (``device_ms``; 0 for a full pass).
    pass_ms: list[float] = field(default_factory=list)
    pass_device_ms: list[float] = field(default_factory=list)


class AgentLog:
    """Follows the agent's JSON log file from its current end: the ``reconciled`` lines of
    its passes, read without touching the device."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.f.seek(0, os.SEEK_END)
        self.buf = b""

    def skip(self) -> None:
        """Forgets everything written so far."""
        self.f.seek(0, os.SEEK_END)
        self.buf = b""

    def passes(self) -> list[dict[str, Any]]:
        """The ``reconciled`` lines written since the last call."""
        self.buf += self.f.read()
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            if b'"reconciled"' not in line:
                continue
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("msg") == "reconciled":
                    out.append(doc)
        return out

    def close(self) -> None:
        self.f.close()


def applies(doc: dict[str, Any], name: str) -> bool:
    """Whether a ``reconciled`` line may be the pass that applied ``name``'s change: an
    incremental pass naming it (or too large to name its nodes), or a full pass."""
    if doc.get("full"):
        return True
    if not doc.get("changed_nodes"):
        return False
    named = doc.get("nodes")
    return named is None or name in str(named).split(",")


class Bench:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lab = Lab(benchlib.BENCH_ROOT / prefix, prefix=prefix,
                       pin_root=benchlib.BENCH_PIN_ROOT)
        self.keys: dict[int, PublicKey] = {}
        self.generation: dict[int, int] = {}  # address generation per synthetic node
        self.created = 0
        self._local = threading.local()
        self.agent: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> SimNode:
        return self.lab.nodes[0]

    # -- lab ------------------------------------------------------------------------------

    def up(self) -> None:
        lab = self.lab
        benchlib.run_dir(self.prefix)
        lab.topo = topology.create(self.prefix, nodes=1, pods_per_node=1,
                                   underlay=labmod.free_underlay(), host_link=True)
        lab._save()
        lab._start_control_plane()  # etcd + kube-apiserver + the agent's RBAC, as `lab up`
        lab._save()
        lab.register_node(self.node)

    def down(self) -> None:
        self.lab.down()
        benchlib.cleanup_prefix(self.prefix)

    def core(self) -> Any:
        """A CoreV1Api per thread (each with its own connection pool)."""
        api = getattr(self._local, "core", None)
        if api is None:
            from kubernetes import client as k8s
            assert self.lab.cp is not None
            api = self._local.core = k8s.CoreV1Api(self.lab.cp.api_client())
        return api

    def create_nodes(self, upto: int) -> float:
        """Creates synthetic nodes [created, upto); returns nodes per second."""
        todo = list(range(self.created, upto))
        for i in todo:
            self.keys[i] = new_key()

        def create(i: int) -> None:
            self.core().create_node(synth_node(i, self.keys[i].base64()),
                                    _preload_content=False)

        t0 = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(create, todo))
        self.created = upto
        return len(todo) / max(1e-9, time.monotonic() - t0)

    def set_key(self, i: int) -> PublicKey:
        key = new_key()
        self.core().patch_node(synth_name(i), {"metadata": {"annotations": {
            ANNOTATION: key.base64()}}}, _preload_content=False, _content_type=MERGE)
        self.keys[i] = key
        return key

    def set_addresses(self, i: int, generation: int) -> None:
        self.core().patch_node_status(synth_name(i), {"status": {
            "addresses": addresses(i, generation)}}, _preload_content=False,
            _content_type=MERGE)

    # -- agent ----------------------------------------------------------------------------

    def start_agent(self) -> subprocess.Popen[bytes]:
        """As Lab.start_agent, with cluster CIDRs that cover the synthetic pod CIDRs."""
        lab, node = self.lab, self.node
        lab.node_dir(node).mkdir(parents=True, exist_ok=True)
        argv = ["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-m",
                "wgmanager", "--log-format", "json", "agent", "--node-name", node.name,
                "--kubeconfig", str(lab.agent_kubeconfig),
                "--cluster-cidrs", ",".join(CLUSTER_CIDRS),
                "--listen-port", str(labmod.LISTEN_PORT), "--health-port",
                str(labmod.HEALTH_PORT), "--metrics-port", str(METRICS_PORT),
                "--no-events", *lab.node_args(node)]
        with open(lab.agent_log_file(node), "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True)
        lab.agent_pid_file(node).write_text(f"{proc.pid}\n")
        self.agent = proc
        return proc

    def agent_pid(self) -> int | None:
        return self.agent.pid if self.agent and self.agent.poll() is None else None

    def stop_agent(self) -> None:
        """SIGTERM, then remove its device, filters and maps: the next start is fresh."""
        if self.agent is not None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(timeout=30)
            self.agent = None
        subprocess.run(["nsenter", f"--net=/run/netns/{self.node.netns}", sys.executable,
                        "-m", "wgmanager", "--log-level", "warning", "teardown",
                        *self.lab.node_args(self.node)], check=True, capture_output=True,
                       timeout=120)

    def poller(self) -> UapiPoller:
        return UapiPoller(self.lab.node_dir(self.node) / "wg" / "wgm0.sock")

    def scrape_ops(self) -> dict[str, float]:
        return ops(scrape(self.node.netns))

    def settle(self, before: dict[str, float], timeout: float) -> dict[str, float]:
        """Scrapes until the agent has recorded a reconcile with an event since ``before``
        and no newer one is pending (two equal scrapes)."""
        deadline = time.monotonic() + timeout
        last = self.scrape_ops()
        while time.monotonic() < deadline:
            time.sleep(0.2)  # a scrape reads the whole device: keep them rare
            now = self.scrape_ops()
            if now["events"] > before["events"] and now == last:
                return now
            last = now
        return last

    # -- measurements ---------------------------------------------------------------------

    def time_to_program(self, n: int, timeout: float) -> tuple[float, float, int]:
        """(seconds from agent start to n peers on its device, agent CPU s, pid)."""
        poll = self.poller()
        t0 = time.monotonic()
        pid = self.start_agent().pid
        try:
            while True:
                peers = poll.peers()
                if peers >= n:
                    break
                if self.agent_pid() is None:
                    log_file = self.lab.agent_log_file(self.node)
                    raise RuntimeError(f"the agent exited; see {log_file}")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"agent held {peers}/{n} peers after {timeout:.0f}s")
                time.sleep(0.1)
            took = time.monotonic() - t0
        finally:
            poll.close()
        # metrics answer once the agent is up; wait for its first reconcile to be recorded
        benchlib.wait_for(lambda: self._metrics_ok(), 60, "the agent's metrics")
        return took, benchlib.proc_cpu_seconds(pid), pid

    def _metrics_ok(self) -> bool:
        try:
            return self.scrape_ops()["reconciles"] >= 1
        except (OSError, RuntimeError):
            return False

    def key_changes(self, pid: int, changes: int, *, rate: float, timeout: float) -> Phase:
        """``changes`` sequential key changes of synthetic nodes; meanwhile ``rate``
        address changes per second of other synthetic nodes (0: idle)."""
        rng = random.Random(len(self.keys) * 7919 + int(rate))
        measured = rng.sample(range(self.created), min(changes, self.created))
        others = [i for i in range(self.created) if i not in set(measured)] or measured
        stop = threading.Event()
        patched = [0]

        span = [0.0, 0.0]
        failed = [0]

        def patch(i: int, generation: int) -> None:
            try:
                self.set_addresses(i, generation)
            except Exception:  # counted and reported: the achieved rate excludes it
                failed[0] += 1

        def background() -> None:
            with ThreadPoolExecutor(WORKERS) as pool:
                span[0] = t_next = time.monotonic()
                while not stop.is_set():
                    i = others[rng.randrange(len(others))]
                    self.generation[i] = self.generation.get(i, 0) + 1  # always a change
                    pool.submit(patch, i, self.generation[i])
                    patched[0] += 1
                    t_next += 1.0 / rate
                    stop.wait(max(0.0, t_next - time.monotonic()))
            span[1] = time.monotonic()  # every submitted patch has been sent

        bg = threading.Thread(target=background, daemon=True) if rate else None
        poll = self.poller()
        cpu0 = benchlib.proc_cpu_seconds(pid)
        start = self.scrape_ops()
        t_start = time.monotonic()
        if bg:
            bg.start()
            time.sleep(1.0)  # let the background load reach its rate
        lat: list[float] = []
        per_change: list[dict[str, float]] = []
        polls: list[float] = []
        misses = 0
        pass_ms: list[float] = []
        pass_device_ms: list[float] = []
        agent_log = AgentLog(self.lab.agent_log_file(self.node))
        try:
            before = self.scrape_ops()
            for i in measured:
                agent_log.skip()
                t0, wall0 = time.monotonic(), time.time()
                key = self.set_key(i)
                done: float | None = None
                while done is None:
                    for doc in agent_log.passes():
                        if float(doc["ts"]) < wall0 - 0.001 or not applies(doc, synth_name(i)):
                            continue
                        held = poll.holds(key)  # the one device read, after the pass
                        polls.append(poll.last_duration)
                        if held:
                            done = float(doc["ts"])
                            pass_ms.append(float(doc.get("ms", 0.0)))
                            pass_device_ms.append(float(doc.get("device_ms", 0.0)))
                            break
                        misses += 1
                    else:
                        time.sleep(0.001)  # reading the log file: the device is untouched
                    if done is None and time.monotonic() - t0 > timeout:
                        raise TimeoutError(f"new key of {synth_name(i)} not on the device "
                                           f"after {timeout:.0f}s")
                # the log's ts has ms resolution: never below the patch's own start
                lat.append(max(0.0, done - wall0) * 1000)
                if bg:
                    continue  # per-change deltas are only meaningful on an idle cluster
                after = self.settle(before, timeout)
                per_change.append(delta(before, after))
                before = after
        finally:
            stop.set()
            if bg:
                bg.join()
            poll.close()
            agent_log.close()
        if bg:
            time.sleep(1.0)
        end = self.settle(start, timeout) if bg else self.scrape_ops()
        return Phase(lat, per_change, delta(start, end),
                     benchlib.proc_cpu_seconds(pid) - cpu0, time.monotonic() - t_start,
                     patched[0] - failed[0],
                     (patched[0] - failed[0]) / max(1e-9, span[1] - span[0]),
                     1000 * benchlib.median(polls) if polls else 0.0, misses,
                     pass_ms, pass_device_ms)


def measure(sizes: list[int], changes: dict[int, int], rate: float,
            keep_log: Path | None = None) -> dict[str, Any]:
    prefix = benchlib.new_prefix()
    bench = Bench(prefix)
    out: dict[str, Any] = {"sizes": {}, "rate": rate}
    try:
        log(f"control plane: lab {prefix} (etcd + kube-apiserver, one agent), sizes {sizes}")
        bench.up()
        for n in sorted(sizes):
            rate_created = bench.create_nodes(n)
            log(f"  {n} synthetic nodes exist (created at {rate_created:.0f} nodes/s)")
            timeout = 120 + n * 0.1
            code = benchlib.code_version()  # what this size's agent process runs
            load_before = os.getloadavg()  # a shared machine: say how busy it was
            with benchlib.RssSampler(bench.agent_pid) as rss:
                program_s, start_cpu, pid = bench.time_to_program(n, timeout=timeout + 600)
                log(f"  {n}: agent programmed {n} peers in {program_s:.1f} s "
                    f"(agent CPU {start_cpu:.1f} s)")
                k = changes.get(n, 0)
                idle = bench.key_changes(pid, k, rate=0, timeout=timeout)
                log(f"  {n}: idle key change -> peer updated: median "
                    f"{benchlib.median(idle.latencies_ms):.0f} ms, p99 "
                    f"{benchlib.percentile(idle.latencies_ms, 99):.0f} ms over {k} changes; "
                    f"ops per change {_per_change(idle.__dict__)}")
                busy = bench.key_changes(pid, k, rate=rate, timeout=timeout)
                log(f"  {n}: busy ({busy.background_rate:.0f} address "
                    f"changes/s) key change -> peer updated: median "
                    f"{benchlib.median(busy.latencies_ms):.0f} ms, p99 "
                    f"{benchlib.percentile(busy.latencies_ms, 99):.0f} ms; totals "
                    f"{ {k2: round(v, 1) for k2, v in busy.totals.items()} }")
            log(f"  {n}: agent peak RSS {rss.peak:.0f} MiB; load average "
                f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
            out["sizes"][n] = {"code": code, "nodes_created_per_s": rate_created,
                               "loadavg": {"before": load_before, "after": os.getloadavg()},
                               "program_s": program_s,
                               "start_cpu_s": start_cpu, "peak_rss_mib": rss.peak,
                               "idle": idle.__dict__, "busy": busy.__dict__}
            bench.stop_agent()
    except BaseException:
        with contextlib.suppress(OSError, LabError):
            tail = bench.lab.agent_log_file(bench.node).read_text().splitlines()[-15:]
            log("agent log (last lines):\n" + "\n".join(tail))
        raise
    finally:
        if keep_log is not None:  # the lab's directory goes with it
            with contextlib.suppress(OSError):
                keep_log.write_bytes(bench.lab.agent_log_file(bench.node).read_bytes())
        bench.down()
    return out


def _per_change(phase: dict[str, Any]) -> dict[str, float]:
    """The largest delta of each counter over single changes (O(1): small and flat)."""
    deltas = phase["ops_per_change"]
    if not deltas:
        return {}
    keys = ("add", "update", "remove", "map_upsert", "map_delete")
    return {k: max(d[k] for d in deltas) for k in keys}


def size_values(n: int, r: dict[str, Any]) -> dict[str, tuple[float, str, str]]:
    """metric -> (value, unit, what) for one cluster size."""
    v: dict[str, tuple[float, str, str]] = {
        "program_all_peers": (r["program_s"], "s",
                              f"agent start to all {n} peers on its WireGuard device (UAPI)"),
        "agent_start_cpu": (r["start_cpu_s"], "CPU-s",
                            f"agent CPU (utime+stime) from start to {n} peers programmed"),
    }
    for phase in ("idle", "busy"):
        ph = r[phase]
        cond = ("cluster otherwise idle" if phase == "idle" else
                f"while {ph['background_rate']:.0f} other nodes' addresses change per second")
        lat = ph["latencies_ms"]
        v[f"key_change_{phase}.median"] = (
            benchlib.median(lat), "ms", f"Node annotation patched (new key) to the new peer "
            f"on the agent's device, {cond}, median of {len(lat)}")
        v[f"key_change_{phase}.p99"] = (benchlib.percentile(lat, 99), "ms",
                                        f"the same, p99 (nearest rank) of {len(lat)}")
        t = ph["totals"]
        if t["reconciles"]:
            v[f"reconcile_{phase}.mean"] = (1000 * t["reconcile_s"] / t["reconciles"], "ms",
                                            f"the agent's own reconcile duration (mean of "
                                            f"every pass, full ones included), {cond}")
        for kind, what in (("changes", "a pass for changed nodes (the key change's own "
                                       "pass)"),
                           ("timers", "a pass for due timers only (a replaced peer's "
                                      "removal, first-handshake checks)"),
                           ("full", "a full pass (the periodic resync)")):
            if t.get(f"{kind}_n"):
                v[f"reconcile_{kind}_{phase}.mean"] = (
                    1000 * t[f"{kind}_s"] / t[f"{kind}_n"], "ms",
                    f"the agent's reconcile duration, {what}, mean of {t[f'{kind}_n']:.0f}, "
                    f"{cond}")
        own = [a - b for a, b in zip(ph.get("pass_ms", []), ph.get("pass_device_ms", []),
                                     strict=True)]
        if own:
            v[f"key_change_pass_{phase}.median"] = (
                benchlib.median(ph["pass_ms"]), "ms",
                f"the agent's pass that applied a key change (its own log line: `ms`), "
                f"median of {len(own)}, {cond}")
            v[f"key_change_pass_own_{phase}.median"] = (
                benchlib.median(own), "ms",
                f"the same pass minus its wait on the WireGuard device (`ms` - "
                f"`device_ms`): the agent's own work, median of {len(own)}, {cond}")
        v[f"agent_cpu_{phase}"] = (ph["agent_cpu_s"] / ph["seconds"], "cores",
                                   f"agent CPU per second of the {phase} phase")
    per = _per_change(r["idle"])
    if per:
        v["peer_ops_per_key_change"] = (
            per["add"] + per["update"] + per["remove"], "ops",
            "largest delta of wgmanager_peer_operations_total over one key change, idle "
            "(O(1) means 2: 1 add + 1 remove)")
        v["map_ops_per_key_change"] = (
            per["map_upsert"] + per["map_delete"], "ops",
            "largest delta of wgmanager_datapath_map_operations_total over one key change")
    busy = r["busy"]
    bt, events = busy["totals"], len(busy["latencies_ms"]) + busy["background_patches"]
    if events:
        v["peer_ops_per_event_busy"] = (
            (bt["add"] + bt["update"] + bt["remove"]) / events, "ops/event",
            "peer operations per Node change in the busy phase (a key change is add + "
            "remove, an address change one update; changes to one node within one "
            "reconcile coalesce)")
    v["agent_peak_rss"] = (r["peak_rss_mib"], "MiB", "agent VmRSS, maximum over the run")
    return v


def entries(raw: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    prev: tuple[int, dict[str, tuple[float, str, str]]] | None = None
    for n, r in sorted(raw["sizes"].items(), key=lambda kv: int(kv[0])):
        values = size_values(int(n), r)
        for metric, (value, unit, what) in values.items():
            base = prev[1].get(metric) if prev else None
            out.append(entry(f"controlplane.{n}.{metric}", value, unit, what,
                             compared_with=f"{prev[0]} nodes" if prev and base else None,
                             baseline_value=base[0] if base else None))
        prev = (int(n), values)
    return out


def run(*, full: bool = False, sizes: list[int] | None = None,
        changes: int | None = None, rate: float = 50.0,
        keep_log: Path | None = None) -> tuple[list[Entry], dict[str, Any]]:
    sizes = sizes or ([100, 1000, 5000, 10000] if full else [100, 1000])
    if changes is not None:
        plan = dict.fromkeys(sizes, changes)
    else:
        # A change costs work for that node only (an incremental reconcile), but polling
        # the device for the new key is O(N) (a full UAPI dump): fewer changes at the
        # larger sizes to keep the run's time bounded.
        plan = {n: 100 if n <= 100 or (full and n <= 1000) else 20 if n > 1000 else 10
                for n in sizes}
    raw = measure(sizes, plan, rate, keep_log)
    raw["changes"] = plan
    return entries(raw), raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated node counts")
    p.add_argument("--changes", type=int, default=None, help="key changes per phase")
    p.add_argument("--rate", type=float, default=50.0, help="background changes per second")
    p.add_argument("--full", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep-agent-log", type=Path, metavar="FILE",
                   help="copy the agent's log here before the lab is removed")
    a = p.parse_args()
    benchlib.terminate_on_sigterm()
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None
    rows, raw = run(full=a.full, sizes=sizes, changes=a.changes, rate=a.rate,
                    keep_log=a.keep_agent_log)
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"machine": benchlib.machine_info(), "results": rows,
                                      "raw": raw}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
