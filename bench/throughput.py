#!/usr/bin/env python3
"""Pod-to-pod throughput, latency and CPU: plaintext vs a hand-built wireguard-go tunnel vs
wgmanager, in one run on the same machine, plus the effect of the knobs that separate them.

Three 2-node topologies are built side by side (network namespaces on a bridge, one pod per
node, host-gw routes, pod MTU 1440; ``wgmanager.lab.topology``), each under its own prefix:

- ``plaintext``: the host-gw routes as built.
- ``baseline``: what a user can build by hand: wireguard-go on each node (in a private
  mount namespace so its socket stays out of /run/wireguard), the very binary wgmanager
  runs (resolved once from PATH, or ``--wireguard-go PATH`` for both; each process's
  /proc/PID/exe is checked), keys from ``wg genkey``,
  ``wg set`` for the key, port and peer, ``ip link set wg0 up`` at wireguard-go's default
  MTU (1420, as wg-quick would pick on a 1500 underlay) and ``ip route replace`` of the
  remote pod CIDRs through wg0.
- ``wgmanager``: ``wgmanager apply`` on both nodes from a static mesh file (as the
  integration tests do): real wireguard-go, the eBPF redirect, MTU 1440 (uplink - 60).
  wgmanager spawns ``wireguard-go`` from PATH; the bench puts a one-symlink directory
  first on the PATH it runs ``wgmanager apply`` with, so it spawns the chosen binary.

Measurements, interleaved round by round so drift on the shared machine hits all three:
iperf3 TCP pod1 -> pod2 with 1 and 4 streams (first second omitted), ping RTT (median and
p99 of 200 echoes at 5 ms), and per run the machine's busy CPU time from /proc/stat (all
cores, everything running), the wireguard-go processes' CPU time (utime + stime), TCP
retransmits and UDP receive-buffer drops (Udp RcvbufErrors of both nodes' namespaces).
An underlay capture during the ping phase must hold 0 plaintext pod packets for both
tunnels.

Knobs, each an A/B inside the same rounds (1 stream). A knob reads the state it changes
before it changes it and puts back exactly that; after every row the bench re-reads the
devices of all three topologies (wireguard-go socket buffers, wg MTUs, pod offload
features) and stops if anything differs from the start, so no row measures a state
another row left behind.

- ``rcvbuf``: wireguard-go 0.0.20220316 never sets SO_RCVBUF, so its UDP sockets get
  net.core.rmem_default (208 KiB), which is global (a child namespace can read it but
  writing it there fails with EINVAL). The bench forces the buffer on the running
  wireguard-go processes' own sockets (pidfd_getfd + SO_RCVBUFFORCE/SO_SNDBUFFORCE, what
  newer wireguard-go does for itself) and puts the sizes it found back afterwards.
  Only run when it would enlarge the buffers: 0.0.20231211 sets 14 MiB itself, and
  shrinking them to 4 MiB is not a knob anyone would turn.
- ``mtu``: the baseline tunnel at 1440 (what the agent sets) instead of 1420.
- ``offload`` (--full only): TSO/GSO off on the sending pod's eth0 in the wgmanager
  topology.

With ``--profile`` one more 1-stream wgmanager run is sampled system-wide with ``perf``
(after the rounds, so it perturbs no other row) and the busy samples are split into
``CATEGORY_WHAT``: ChaCha20-Poly1305 in wireguard-go, its copies, TUN offload code, device
code and Go runtime, kernel copies, checksums, TUN/UDP/GSO/GRO, the rest of the kernel's
network path, the TC program and its hook and helpers, iperf3, scheduling and syscall
entry, other kernel, and other processes (the machine is shared); each share is also given
as CPU-seconds per GB delivered. Debian's wireguard-go is stripped: its functions are
named from .gopclntab (``benchlib.GoSymbols``).

    sudo .venv/bin/python bench/throughput.py [--seconds 5] [--rounds 2] [--json FILE]
        [--wireguard-go PATH] [--profile] [--full]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from benchlib import Entry, entry, log

from wgmanager.lab import topology
from wgmanager.lab.capture import capture
from wgmanager.lab.topology import Pod, SimNode, Topology

LISTEN_PORT = 51820
CLUSTER_CIDRS = ["10.244.0.0/16", "fd00:244::/32"]
RCVBUF_REQUEST = 2 << 20  # setsockopt value; the kernel doubles it: 4 MiB effective
PROFILE_HZ = 997  # perf sampling frequency per CPU (prime: no lockstep with timers)
_RTT = re.compile(r"time=([\d.]+) ms")


def sh(argv: list[str], **kw: Any) -> str:
    return topology.run(argv, **kw).stdout


# -- the three ways -----------------------------------------------------------------------

@dataclass
class Way:
    name: str
    topo: Topology
    wg_pids: list[int] = field(default_factory=list)
    wg_ifname: str | None = None  # None: no tunnel (plaintext)

    @property
    def src(self) -> Pod:
        return self.topo.nodes[0].pods[0]

    @property
    def dst(self) -> Pod:
        return self.topo.nodes[1].pods[0]


def build_plaintext(prefix: str) -> Way:
    return Way("plaintext", topology.create(prefix, nodes=2, pods_per_node=1))


def build_baseline(prefix: str, binary: str, mtu: int = 1420) -> Way:
    """wireguard-go + wg + ip route, the way a user would do it by hand, with ``binary``
    (an absolute path: the same file wgmanager runs, or the comparison is meaningless)."""
    topo = topology.create(prefix, nodes=2, pods_per_node=1)
    d = benchlib.run_dir(prefix)
    way = Way("baseline", topo, wg_ifname="wg0")
    keys: dict[str, tuple[Path, str]] = {}
    for node in topo.nodes:
        priv = d / f"{node.name}.key"
        priv.write_text(subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                       check=True).stdout)
        priv.chmod(0o600)
        pub = subprocess.run(["wg", "pubkey"], input=priv.read_text(), capture_output=True,
                             text=True, check=True).stdout.strip()
        keys[node.name] = (priv, pub)
        sockdir = d / node.name / "wg"
        sockdir.mkdir(parents=True)
        script = ('mkdir -p /run/wireguard && mount --bind "$1" /run/wireguard '
                  '&& exec "$2" -f wg0')
        with open(d / node.name / "wireguard-go.log", "ab") as logf:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation",
                 "private", "sh", "-c", script, "wg", str(sockdir), binary],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                             "WG_PROCESS_FOREGROUND": "1",
                                             "LOG_LEVEL": "error"})
        (sockdir / "wg0.pid").write_text(f"{proc.pid}\n")
        benchlib.wait_for(lambda s=sockdir: (s / "wg0.sock").exists(), 10,
                          f"wireguard-go on {node.name}")
        way.wg_pids.append(proc.pid)
    benchlib.wireguard_go_pids_run(way.wg_pids, binary)
    for node, pid in zip(topo.nodes, way.wg_pids, strict=True):
        other = next(n for n in topo.nodes if n is not node)
        sh(["nsenter", "-t", str(pid), "-m", "wg", "set", "wg0",
            "private-key", str(keys[node.name][0]), "listen-port", str(LISTEN_PORT),
            "peer", keys[other.name][1], "endpoint", f"{other.ipv4}:{LISTEN_PORT}",
            "allowed-ips", f"{other.pod_cidr4},{other.pod_cidr6}"])
        topology.ip_batch(node.netns, [
            f"link set wg0 mtu {mtu} up",
            f"route replace {other.pod_cidr4} dev wg0",
            f"route replace {other.pod_cidr6} dev wg0"])
    return way


def build_wgmanager(prefix: str, binary: str) -> Way:
    """`wgmanager apply` from a static mesh on both nodes (tests/integration/harness.py),
    with ``binary`` as the ``wireguard-go`` on its PATH (what a node's PATH decides)."""
    topo = topology.create(prefix, nodes=2, pods_per_node=1)
    d = benchlib.run_dir(prefix)
    way = Way("wgmanager", topo, wg_ifname="wgm0")
    path = benchlib.path_with_wireguard_go(binary, d / "bin")

    def args(node: SimNode) -> list[str]:
        return ["--state-dir", str(d / node.name / "state"),
                "--socket-dir", str(d / node.name / "wg"),
                "--pin-dir", str(benchlib.pin_dir(prefix) / node.name)]

    def wgm(node: SimNode, *argv: str) -> str:
        return sh(["nsenter", f"--net=/run/netns/{node.netns}", "env", f"PATH={path}",
                   sys.executable, "-m", "wgmanager", "--log-level", "warning", *argv],
                  timeout=120)

    keys = {n.name: wgm(n, "pubkey", "--state-dir", str(d / n.name / "state")).strip()
            for n in topo.nodes}
    mesh = d / "mesh.json"
    mesh.write_text(json.dumps({"listenPort": LISTEN_PORT, "clusterCIDRs": CLUSTER_CIDRS,
                                "nodes": [n.spec(keys[n.name]) for n in topo.nodes]}))
    for node in topo.nodes:
        wgm(node, "apply", "--mesh", str(mesh), "--node-name", node.name, *args(node))
        way.wg_pids.append(int((d / node.name / "wg" / "wgm0.pid").read_text()))
    benchlib.wireguard_go_pids_run(way.wg_pids, binary)
    return way


# -- measurements -------------------------------------------------------------------------

def iperf(way: Way, seconds: int, streams: int,
          alongside: list[str] | None = None) -> dict[str, float]:
    """One iperf3 run; ``alongside`` is a command started with the client and waited for
    after it (the profiler)."""
    server = subprocess.Popen(["ip", "netns", "exec", way.dst.netns, "iperf3", "-s", "-1",
                               "--forceflush"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        for _ in range(20):
            line = server.stdout.readline()
            if "Server listening" in line or not line:
                break
        snmp0 = [benchlib.netns_snmp(n.netns) for n in way.topo.nodes]
        wg0 = sum(benchlib.proc_cpu_seconds(p) for p in way.wg_pids)
        busy0, _ = benchlib.machine_busy_seconds()
        t0 = time.monotonic()
        side = (subprocess.Popen(alongside, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) if alongside else None)
        side_name = alongside[0] if alongside else ""
        try:
            res = subprocess.run(["ip", "netns", "exec", way.src.netns, "iperf3", "-c",
                                  way.dst.ipv4, "-t", str(seconds + 1), "-O", "1", "-P",
                                  str(streams), "-J"], capture_output=True, text=True,
                                 check=True, timeout=seconds + 60)
            wall = time.monotonic() - t0
        finally:
            if side is not None:
                try:
                    _, err = side.communicate(timeout=seconds + 60)
                except subprocess.TimeoutExpired:
                    side.kill()
                    side.wait()
                    raise
                if side.returncode != 0:
                    raise RuntimeError(f"{side_name} failed: {err.strip()}")
        busy1, _ = benchlib.machine_busy_seconds()
        wg1 = sum(benchlib.proc_cpu_seconds(p) for p in way.wg_pids)
        snmp1 = [benchlib.netns_snmp(n.netns) for n in way.topo.nodes]
    finally:
        server.kill()
        server.wait()
    end = json.loads(res.stdout)["end"]
    received = end["sum_received"]
    drops = sum(b.get("Udp.RcvbufErrors", 0) - a.get("Udp.RcvbufErrors", 0)
                for a, b in zip(snmp0, snmp1, strict=True))
    busy = busy1 - busy0
    return {"gbit_s": received["bits_per_second"] / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "udp_rcvbuf_errors": float(drops),
            # the whole machine over the client's lifetime (incl. the omitted second)
            "cores_busy": busy / wall,
            "cpu_s_per_gbyte": (busy / wall) / (received["bits_per_second"] / 8e9),
            "wireguard_go_cpu_s_per_s": (wg1 - wg0) / wall}


def ping_rtt(way: Way, count: int = 200, interval: float = 0.005) -> list[float]:
    out = sh(["ip", "netns", "exec", way.src.netns, "ping", "-n", "-c", str(count), "-i",
              str(interval), "-W", "1", way.dst.ipv4], check=False, timeout=count + 30)
    return [float(m) for m in _RTT.findall(out)]


# -- knobs --------------------------------------------------------------------------------

@dataclass
class Variant:
    label: str
    way: Way
    streams: int
    apply: Callable[[], None] = lambda: None
    undo: Callable[[], None] = lambda: None


Knob = tuple[Callable[[], None], Callable[[], None]]


def rcvbuf_knob(way: Way, request: int) -> Knob:
    """Forces ``request`` (doubled by the kernel) on both wireguard-go processes' UDP
    sockets; the undo puts back, socket by socket, the sizes found before (whatever the
    binary had set) and raises if they do not read back equal."""
    saved: dict[int, dict[int, tuple[int, int]]] = {}

    def apply() -> None:
        saved.clear()
        for pid in way.wg_pids:
            saved[pid] = benchlib.socket_buffers(pid, LISTEN_PORT)
            benchlib.set_socket_buffers(pid, LISTEN_PORT, rcvbuf=request, sndbuf=request)

    def undo() -> None:
        for pid, before in saved.items():
            benchlib.restore_socket_buffers(pid, LISTEN_PORT, before)
    return apply, undo


def link_mtu(netns: str, ifname: str) -> int:
    out = sh(["ip", "-n", netns, "-j", "link", "show", "dev", ifname])
    return int(json.loads(out)[0]["mtu"])


def tun_vnet_hdr(netns: str, ifname: str) -> bool | None:
    """Whether wireguard-go opened its TUN with offloads (IFF_VNET_HDR: TSO, UDP GSO/GRO)."""
    out = sh(["ip", "-n", netns, "-d", "-j", "link", "show", "dev", ifname])
    data = json.loads(out)[0].get("linkinfo", {}).get("info_data", {})
    return data.get("vnet_hdr") if isinstance(data, dict) else None


def mtu_knob(way: Way, mtu: int) -> Knob:
    """Sets the tunnel MTU on both nodes; the undo restores each node's MTU as found."""
    assert way.wg_ifname is not None
    ifname = way.wg_ifname
    saved: dict[str, int] = {}

    def set_mtu(values: dict[str, int]) -> None:
        for node in way.topo.nodes:
            topology.ip_batch(node.netns, [f"link set {ifname} mtu {values[node.netns]}"])
        for pod in way.topo.pods:  # forget path MTUs learnt at the other setting
            sh(["ip", "-n", pod.netns, "-4", "route", "flush", "cache"])
            sh(["ip", "-n", pod.netns, "-6", "route", "flush", "cache"])

    def apply() -> None:
        saved.clear()
        saved.update({n.netns: link_mtu(n.netns, ifname) for n in way.topo.nodes})
        set_mtu(dict.fromkeys(saved, mtu))
    return apply, lambda: set_mtu(saved)


# ethtool -k prints some features under their pre-2.6.39 aggregate names; -K wants these
_LEGACY_FEATURES = {"rx-checksumming": "rx", "tx-checksumming": "tx", "scatter-gather": "sg",
                    "tcp-segmentation-offload": "tso", "udp-fragmentation-offload": "ufo",
                    "generic-segmentation-offload": "gso", "generic-receive-offload": "gro",
                    "large-receive-offload": "lro", "rx-vlan-offload": "rxvlan",
                    "tx-vlan-offload": "txvlan", "ntuple-filters": "ntuple",
                    "receive-hashing": "rxhash"}


def features(netns: str, ifname: str) -> dict[str, str]:
    """``ethtool -k``: feature -> "on" / "off", with " [fixed]" for what cannot change."""
    out = sh(["ip", "netns", "exec", netns, "ethtool", "-k", ifname])
    feats: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        name, sep, value = line.strip().partition(": ")
        if sep:
            feats[name] = value.strip()
    return feats


def offload_knob(way: Way) -> Knob:
    """TSO and GSO off on the sending pod's eth0. ``tso on`` would not undo it: it also
    switches sub-features (e.g. tx-tcp-mangleid-segmentation) that were off before, so the
    undo sets back every feature that differs, aggregates first, then the individual ones."""
    netns = way.src.netns
    saved: dict[str, str] = {}

    def apply() -> None:
        saved.clear()
        saved.update(features(netns, "eth0"))
        sh(["ip", "netns", "exec", netns, "ethtool", "-K", "eth0", "tso", "off", "gso", "off"])

    def undo() -> None:
        now = features(netns, "eth0")
        changed = [k for k, v in saved.items() if now.get(k) != v and "[fixed]" not in v]
        for names in ([k for k in changed if k in _LEGACY_FEATURES],
                      [k for k in changed if k not in _LEGACY_FEATURES]):
            args = [a for k in names for a in (_LEGACY_FEATURES.get(k, k), saved[k].split()[0])]
            if args:
                sh(["ip", "netns", "exec", netns, "ethtool", "-K", "eth0", *args])
    return apply, undo


def device_state(ways: dict[str, Way]) -> dict[str, Any]:
    """Everything a knob may touch, in all three topologies: the wireguard-go processes'
    socket buffers (per socket), the tunnel MTUs and the sending pods' offload features.
    JSON-ready (string keys)."""
    state: dict[str, Any] = {}
    for way in ways.values():
        st: dict[str, Any] = {"src_pod_eth0_features": features(way.src.netns, "eth0")}
        if way.wg_ifname:
            st["wg_mtu"] = {n.name: link_mtu(n.netns, way.wg_ifname) for n in way.topo.nodes}
            st["wg_tun_vnet_hdr"] = {n.name: tun_vnet_hdr(n.netns, way.wg_ifname)
                                     for n in way.topo.nodes}
            st["wg_socket_buffers"] = {
                str(pid): {str(ino): list(v) for ino, v in
                           benchlib.socket_buffers(pid, LISTEN_PORT).items()}
                for pid in way.wg_pids}
        state[way.name] = st
    return state


def state_diff(before: Any, after: Any, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [d for k in sorted(set(before) | set(after))
                for d in state_diff(before.get(k), after.get(k), f"{path}/{k}")]
    return [] if before == after else [f"{path}: {before} -> {after}"]


# -- where the cycles go ------------------------------------------------------------------

# Checked in this order on kernel symbols; the first match names the sample's category.
_KERNEL_CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("idle", re.compile(r"^(default_idle|default_idle_call|arch_cpu_idle|do_idle|cpu_idle_poll"
                        r"|cpuidle_\w+|\w*safe_halt|\w*_idle|poll_idle|intel_idle\w*"
                        r"|acpi_idle\w*|mwait_idle\w*|cpu_startup_entry)$")),
    ("tc_program", re.compile(r"^bpf_prog_")),
    ("tc_hook_and_helpers", re.compile(r"^(__?bpf_\w+|bpf_\w+|trie_\w+|longest_prefix_match"
                                       r"|cls_bpf_\w+|tcf_classify\w*|tcx_\w+|sch_handle_\w+"
                                       r"|skb_do_redirect|__dev_forward_skb\w*)$")),
    ("kernel_copies", re.compile(r"copy_user|rep_movs|memcpy|memmove|copy_to_iter|copy_from_iter"
                                 r"|copyin|copyout|skb_copy|copy_page|csum_partial_copy")),
    ("kernel_checksums", re.compile(r"csum|checksum")),
    ("kernel_tun_udp_gso_gro", re.compile(r"tun_|tun$|udp|gso|gro|skb_segment|vnet|virtio_net")),
    ("kernel_tcp_ip_veth_bridge", re.compile(
        r"tcp|^ip_|^ip6|ipv6|inet|netif|napi|net_rx|^dev_|^__dev_|skb|veth|^br_|^nf_|nft_"
        r"|qdisc|neigh|fib|^rt6?_|^dst_|sock|sendmsg|recvmsg|^icmp|xmit|process_backlog"
        r"|^net_|^__net|^raw_")),
    ("kernel_sched_irq_syscall", re.compile(
        r"schedule|switch|wake|ttwu|enqueue|dequeue|pick_next|update_curr|select_task"
        r"|_raw_spin_unlock_irq|futex|irqentry|softirq|syscall|entry_SYSCALL|exit_to_user"
        r"|hrtimer|tick_|^rcu_")),
]
_GO_CRYPTO = re.compile(r"chacha20|poly1305|curve25519|blake2s|golang\.org/x/crypto")
CATEGORY_WHAT = {
    "crypto_chacha20poly1305": "ChaCha20-Poly1305 (and the rest of x/crypto) in wireguard-go",
    "wireguard_go_copies": "wireguard-go's memory copies and clears (runtime.memmove, ...)",
    "wireguard_go_tun_offload": "wireguard-go's TUN offload code (TCP/UDP checksums, GSO split,"
                                " GRO coalescing: golang.zx2c4.com/wireguard/tun)",
    "wireguard_go_device": "wireguard-go's device, peer and socket code (queues, routines)",
    "wireguard_go_runtime": "the Go runtime and sync in wireguard-go (scheduler, GC, pools)",
    "wireguard_go_unresolved": "wireguard-go user space with no function name (no pclntab; "
                               "vdso)",
    "tc_program": "the TC eBPF program itself (bpf_prog_*)",
    "tc_hook_and_helpers": "its hook, helpers and LPM map lookups (tcf_classify, bpf_redirect,"
                           " trie_lookup_elem, ...)",
    "kernel_copies": "kernel copies (copy_user/rep_movs, memcpy, skb and iov copies)",
    "kernel_checksums": "kernel checksums (csum_*)",
    "kernel_tun_udp_gso_gro": "kernel TUN, UDP, GSO/GRO and segmentation paths",
    "kernel_tcp_ip_veth_bridge": "the rest of the kernel network path (TCP, IP, veth, bridge,"
                                 " qdisc, sockets, NAPI)",
    "iperf3_user": "iperf3 in user space",
    "kernel_sched_irq_syscall": "kernel scheduling, wakeups, syscall and interrupt entry/exit"
                                " (cpu-clock also charges interrupts-off time here)",
    "kernel_other": "other kernel time (memory, locks, VFS, ...)",
    "other_processes": "other processes on the machine, user and kernel (except network-path"
                       " symbols, which may be our packets' softirq); perf itself",
}
_NETWORK_PATH = {"tc_program", "tc_hook_and_helpers", "kernel_checksums",
                 "kernel_tun_udp_gso_gro", "kernel_tcp_ip_veth_bridge"}


def categorize(s: benchlib.PerfSample, wg_exe: str, go: benchlib.GoSymbols | None) -> str:
    """The sample's category: by symbol in the kernel (softirqs run in whatever process
    they interrupt, so a network-path symbol counts as such in any process), by process
    and Go function in user space."""
    ours = s.comm in ("wireguard-go", "iperf3") or s.comm.startswith(
        ("ksoftirqd", "swapper", "kworker"))
    if s.kernel:
        cat = next((name for name, rx in _KERNEL_CATEGORIES if rx.search(s.sym)),
                   "kernel_other")
        return cat if ours or cat in _NETWORK_PATH or cat == "idle" else "other_processes"
    if s.dso == wg_exe or s.comm == "wireguard-go":
        fn = go.lookup(s.ip) if go is not None and s.dso == wg_exe else None
        if fn is None:
            return "wireguard_go_unresolved"
        if _GO_CRYPTO.search(fn):
            return "crypto_chacha20poly1305"
        if fn.startswith(("runtime.memmove", "runtime.memclr", "runtime.duff")):
            return "wireguard_go_copies"
        if fn.startswith("golang.zx2c4.com/wireguard/tun."):
            return "wireguard_go_tun_offload"
        if fn.startswith(("runtime.", "sync.", "internal/", "type:")):
            return "wireguard_go_runtime"
        return "wireguard_go_device"
    return "iperf3_user" if s.comm == "iperf3" else "other_processes"


def profile(way: Way, seconds: int, binary: str, event: str) -> dict[str, Any]:
    """One 1-stream iperf3 run through ``way`` with ``perf record -a`` sampling every CPU
    over iperf3's measured window (perf waits out the omitted first second). cpu-clock is a
    timer interrupt, not an NMI: time with interrupts off is charged to where they come
    back on (e.g. _raw_spin_unlock_irqrestore, counted in kernel_other)."""
    data = benchlib.run_dir(way.topo.prefix) / "perf.data"
    cmd = ["perf", "record", "-a", "-e", event, "-F", str(PROFILE_HZ), "--no-buildid-cache",
           "-q", "-D", "1000", "-o", str(data), "--", "sleep", str(seconds + 1)]
    run_ = iperf(way, seconds, 1, alongside=cmd)
    wg_exe = os.path.realpath(binary)
    go = benchlib.GoSymbols.load(wg_exe)
    samples = benchlib.perf_samples(data)
    data.unlink()
    counts: dict[str, int] = dict.fromkeys(["idle", *CATEGORY_WHAT], 0)
    comms: dict[str, int] = {}
    top: dict[str, int] = {}
    for smp in samples:
        cat = categorize(smp, wg_exe, go)
        counts[cat] += 1
        if cat == "idle":
            continue
        comm = smp.comm if smp.comm in ("wireguard-go", "iperf3") else \
            smp.comm.split("/")[0] if smp.comm.startswith(("ksoftirqd", "swapper")) else "other"
        comms[comm] = comms.get(comm, 0) + 1
        fn = (go.lookup(smp.ip) if go and smp.dso == wg_exe else None) or smp.sym
        key = f"{fn} ({os.path.basename(smp.dso)}) [{cat}]"
        top[key] = top.get(key, 0) + 1
    busy = sum(counts.values()) - counts["idle"]
    shares = {k: v / busy for k, v in counts.items() if k != "idle"} if busy else {}
    ours = 1 - shares.get("other_processes", 0.0)
    return {"event": event, "hz": PROFILE_HZ, "seconds": seconds, "samples": len(samples),
            "busy_samples": busy, "idle_samples": counts["idle"],
            "go_symbols": ("from .gopclntab" if go else "unavailable: DSO level only"),
            "wireguard_go": wg_exe, "run": run_, "counts": counts, "shares": shares,
            "cpu_s_per_gbyte": {k: v * run_["cpu_s_per_gbyte"] for k, v in shares.items()},
            # /proc/stat's figure without the other processes' share: the datapath's own
            "datapath_cpu_s_per_gbyte": ours * run_["cpu_s_per_gbyte"],
            "busy_samples_by_comm": dict(sorted(comms.items(), key=lambda kv: -kv[1])),
            "top_functions": sorted(top.items(), key=lambda kv: -kv[1])[:30]}


# -- the run ------------------------------------------------------------------------------

@contextlib.contextmanager
def three_ways(binary: str) -> Iterator[dict[str, Way]]:
    prefixes = [benchlib.new_prefix() for _ in range(3)]
    try:
        for p in prefixes:
            benchlib.run_dir(p)
        ways = {"plaintext": build_plaintext(prefixes[0]),
                "baseline": build_baseline(prefixes[1], binary),
                "wgmanager": build_wgmanager(prefixes[2], binary)}
        yield ways
    finally:
        for p in prefixes:
            benchlib.cleanup_prefix(p)


def measure(seconds: int, rounds: int, binary: str, full: bool = False,
            profile_event: str | None = None) -> dict[str, Any]:
    with three_ways(binary) as ways:
        plain, base, wgm = ways["plaintext"], ways["baseline"], ways["wgmanager"]
        for way in ways.values():  # first packets wait for a handshake
            if not any(ping_rtt(way, count=1, interval=0.2) for _ in range(5)):
                raise RuntimeError(f"{way.name}: pod1 cannot reach pod2")
        initial = device_state(ways)
        # The knob only makes sense where it enlarges: never shrink a binary's own choice.
        own = min(v[0] for way in (base, wgm) for pid in way.wg_pids
                  for v in benchlib.socket_buffers(pid, LISTEN_PORT).values())
        rcvbuf = own < 2 * RCVBUF_REQUEST
        log(f"  wireguard-go's own UDP receive buffers: {own:,} bytes; rcvbuf knob "
            f"({2 * RCVBUF_REQUEST:,}) {'runs' if rcvbuf else 'skipped: it would shrink them'}")
        variants = [
            Variant("plaintext/1", plain, 1), Variant("baseline/1", base, 1),
            Variant("wgmanager/1", wgm, 1),
            *([Variant("wgmanager+rcvbuf/1", wgm, 1, *rcvbuf_knob(wgm, RCVBUF_REQUEST)),
               Variant("baseline+rcvbuf/1", base, 1, *rcvbuf_knob(base, RCVBUF_REQUEST))]
              if rcvbuf else []),
            Variant("baseline+mtu1440/1", base, 1, *mtu_knob(base, 1440)),
            *([Variant("wgmanager-offload/1", wgm, 1, *offload_knob(wgm))] if full else []),
            Variant("plaintext/4", plain, 4), Variant("baseline/4", base, 4),
            Variant("wgmanager/4", wgm, 4),
            *([Variant("wgmanager+rcvbuf/4", wgm, 4, *rcvbuf_knob(wgm, RCVBUF_REQUEST))]
              if rcvbuf else []),
        ]
        samples: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
        for r in range(rounds):
            for v in variants:
                v.apply()
                try:
                    s = iperf(v.way, seconds, v.streams)
                finally:
                    v.undo()
                    left = state_diff(initial, device_state(ways))
                    if left:
                        raise RuntimeError(f"{v.label} left the devices changed: {left}")
                samples[v.label].append(s)
                log(f"  round {r + 1}/{rounds} {v.label:<20} {s['gbit_s']:7.3f} Gbit/s  "
                    f"retr {s['retransmits']:>6.0f}  rcvbuf drops {s['udp_rcvbuf_errors']:>6.0f}"
                    f"  cores {s['cores_busy']:.2f}  wg-go {s['wireguard_go_cpu_s_per_s']:.2f}")
        prof = None
        if profile_event:
            prof = profile(wgm, seconds, binary, profile_event)
            log(f"  profile wgmanager/1 ({prof['event']}, {prof['busy_samples']} busy samples, "
                f"{prof['run']['gbit_s']:.3f} Gbit/s, "
                f"{prof['run']['cpu_s_per_gbyte']:.1f} CPU-s/GB, "
                f"{prof['datapath_cpu_s_per_gbyte']:.1f} without other processes):")
            for k, share in sorted(prof["shares"].items(), key=lambda kv: -kv[1]):
                log(f"    {share:6.1%}  {prof['cpu_s_per_gbyte'][k]:6.2f} CPU-s/GB  {k}")
        rtt: dict[str, list[float]] = {}
        leaks: dict[str, int] = {}
        for way in ways.values():
            if way is plain:
                rtt[way.name] = ping_rtt(way)
                continue
            pcap = benchlib.run_dir(way.topo.prefix) / "ping.pcap"
            with capture(way.topo.underlay_netns, way.topo.bridge, pcap, wg_ports=(LISTEN_PORT,),
                         pod_nets=tuple(CLUSTER_CIDRS)) as cap:
                rtt[way.name] = ping_rtt(way)
            leaks[way.name] = cap.plaintext_pod_packets()
        for name, values in rtt.items():
            log(f"  ping {name:<10} median {benchlib.median(values):.3f} ms  "
                f"p99 {benchlib.percentile(values, 99):.3f} ms  ({len(values)} replies)")
        log(f"  plaintext pod packets on the underlay during the pings: {leaks}")
    return {"seconds": seconds, "rounds": rounds, "samples": samples, "rtt_ms": rtt,
            "plaintext_pod_packets_on_underlay": leaks, "rcvbuf_request": RCVBUF_REQUEST,
            "rcvbuf_knob": ("ran" if rcvbuf else f"skipped: wireguard-go's own UDP receive "
                            f"buffers ({own} bytes) are already >= {2 * RCVBUF_REQUEST}"),
            "device_state": initial, "profile": prof}


def _med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def entries(raw: dict[str, Any]) -> list[Entry]:
    s = raw["samples"]
    out: list[Entry] = []
    runs = f"median of {raw['rounds']} {raw['seconds']} s runs"
    wg = raw["wireguard_go"]
    wgv = f"wireguard-go {wg['package_version'] or wg['realpath']}"
    for streams in (1, 4):
        p, b, w = (_med(s[f"{n}/{streams}"], "gbit_s")
                   for n in ("plaintext", "baseline", "wgmanager"))
        tcp = f"iperf3 TCP, {streams} stream{'s' * (streams > 1)}, pod on node1 to pod on node2"
        out.append(entry(f"throughput.tcp{streams}.plaintext", p, "Gbit/s",
                         f"{tcp}, host-gw routes, no encryption ({runs})"))
        out.append(entry(f"throughput.tcp{streams}.baseline", b, "Gbit/s",
                         f"{tcp}, hand-built {wgv} + wg + ip route, MTU 1420 ({runs})",
                         compared_with="plaintext", baseline_value=p))
        out.append(entry(f"throughput.tcp{streams}.wgmanager", w, "Gbit/s",
                         f"{tcp}, wgmanager apply ({wgv} + eBPF redirect, MTU 1440) "
                         f"({runs})", compared_with="baseline", baseline_value=b))
        out.append(entry(f"throughput.tcp{streams}.wgmanager_vs_plaintext", w, "Gbit/s",
                         "the same wgmanager figure against plaintext",
                         compared_with="plaintext", baseline_value=p))
        for way in ("baseline", "wgmanager"):
            cpu = _med(s[f"{way}/{streams}"], "cpu_s_per_gbyte")
            ref = _med(s[f"plaintext/{streams}"], "cpu_s_per_gbyte")
            out.append(entry(f"cpu.tcp{streams}.{way}", cpu, "CPU-s/GB",
                             f"machine CPU time (all cores, /proc/stat) per GB delivered, "
                             f"{way}, {streams} stream(s)", compared_with="plaintext",
                             baseline_value=ref))
        out.append(entry(
            f"cpu.tcp{streams}.wireguard_go_cores.wgmanager",
            _med(s[f"wgmanager/{streams}"], "wireguard_go_cpu_s_per_s"), "cores",
            f"CPU of both wireguard-go processes (utime+stime per second), wgmanager, "
            f"{streams} stream(s)", compared_with="baseline",
            baseline_value=_med(s[f"baseline/{streams}"], "wireguard_go_cpu_s_per_s")))
        for way in ("baseline", "wgmanager"):
            out.append(entry(
                f"drops.tcp{streams}.{way}", _med(s[f"{way}/{streams}"], "udp_rcvbuf_errors"),
                "packets/run", f"UDP receive-buffer drops (Udp RcvbufErrors) in the nodes' "
                f"namespaces per run, {way}, {streams} stream(s)"))
    rtt = raw["rtt_ms"]
    for q, fn in (("median", benchlib.median),
                  ("p99", lambda v: benchlib.percentile(v, 99))):
        p, b, w = (fn(rtt[n]) for n in ("plaintext", "baseline", "wgmanager"))
        what = f"ping RTT {q}, 200 echoes at 5 ms, pod to pod"
        out.append(entry(f"rtt.{q}.plaintext", p, "ms", what + ", plaintext"))
        out.append(entry(f"rtt.{q}.baseline", b, "ms", what + ", hand-built tunnel",
                         compared_with="plaintext", baseline_value=p))
        out.append(entry(f"rtt.{q}.wgmanager", w, "ms", what + ", wgmanager",
                         compared_with="baseline", baseline_value=b))
    eff = 2 * raw["rcvbuf_request"] >> 20
    for label, ref, what in (
            ("wgmanager+rcvbuf/1", "wgmanager/1",
             f"wgmanager, 1 stream, wireguard-go UDP buffers forced to {eff} MiB"),
            ("wgmanager+rcvbuf/4", "wgmanager/4",
             f"wgmanager, 4 streams, wireguard-go UDP buffers forced to {eff} MiB"),
            ("baseline+rcvbuf/1", "baseline/1",
             f"hand-built tunnel, 1 stream, wireguard-go UDP buffers forced to {eff} MiB"),
            ("baseline+mtu1440/1", "baseline/1",
             "hand-built tunnel, 1 stream, wg0 MTU 1440 (the agent's) instead of 1420"),
            ("wgmanager-offload/1", "wgmanager/1",
             "wgmanager, 1 stream, TSO/GSO off on the sending pod's eth0")):
        if label not in s:
            continue  # the offload knob runs with --full only
        name = "knob." + label.replace("/", ".tcp").replace("+", ".").replace("-", ".")
        out.append(entry(name, _med(s[label], "gbit_s"), "Gbit/s", what,
                         compared_with=ref.replace("/", " ") + " stream(s), same rounds",
                         baseline_value=_med(s[ref], "gbit_s")))
    prof = raw.get("profile")
    if prof:
        total = prof["run"]["cpu_s_per_gbyte"]
        for cat, what in CATEGORY_WHAT.items():
            out.append(entry(
                f"profile.tcp1.wgmanager.{cat}", prof["cpu_s_per_gbyte"][cat], "CPU-s/GB",
                f"{what}: CPU-seconds per GB delivered (machine-wide perf {prof['event']} "
                f"samples, wgmanager, 1 stream, one {prof['seconds']} s run; ratio = share "
                f"of busy CPU)", compared_with="all busy CPU, same run",
                baseline_value=total))
        out.append(entry(
            "profile.tcp1.wgmanager.datapath_cpu_s_per_gbyte", prof["datapath_cpu_s_per_gbyte"],
            "CPU-s/GB", "machine CPU per GB delivered in the profiled run without the other "
            "processes' samples: what the datapath itself costs on a shared machine",
            compared_with="all busy CPU, same run", baseline_value=total))
    out.append(entry("security.plaintext_pod_packets", float(
        sum(raw["plaintext_pod_packets_on_underlay"].values())), "packets",
        "plaintext pod packets on the underlay bridge during the pings through both "
        "tunnels (must be 0)"))
    return out


def run(*, full: bool = False, seconds: int | None = None, rounds: int | None = None,
        wireguard_go: str | None = None,
        profile: bool = False) -> tuple[list[Entry], dict[str, Any]]:
    """``wireguard_go``: the binary both tunnels run (default: the one on PATH, which is
    what wgmanager would spawn). ``profile``: add the perf breakdown (needs perf)."""
    seconds = seconds or (8 if full else 3)
    rounds = rounds or (5 if full else 2)
    binary = benchlib.resolve_wireguard_go(wireguard_go)
    info = benchlib.wireguard_go_info(binary)
    event = None
    if profile:
        event = benchlib.perf_event()
        if event is None:
            raise RuntimeError("--profile needs a working perf (Debian: linux-perf)")
    log(f"throughput: plaintext, hand-built wireguard-go, wgmanager; {rounds} rounds of "
        f"{seconds} s iperf3 runs; wireguard-go {binary} "
        f"({info['package']} {info['package_version']}, says "
        f"{info['self_reported_version']!r})")
    load0 = Path("/proc/loadavg").read_text().strip()
    raw = measure(seconds, rounds, binary, full, event)
    raw.update(wireguard_go=info, loadavg_at_start=load0,
               loadavg_at_end=Path("/proc/loadavg").read_text().strip())
    return entries(raw), raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--full", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--wireguard-go", metavar="PATH",
                   help="the wireguard-go binary both tunnels run (default: wireguard-go on "
                        "PATH, which wgmanager spawns), e.g. Debian 12's old build under "
                        "/var/cache/wgmanager")
    p.add_argument("--profile", action="store_true",
                   help="one more wgmanager 1-stream run under perf: where the CPU goes")
    a = p.parse_args()
    benchlib.terminate_on_sigterm()
    rows, raw = run(full=a.full, seconds=a.seconds, rounds=a.rounds,
                    wireguard_go=a.wireguard_go, profile=a.profile)
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"machine": benchlib.machine_info(), "results": rows,
                                      "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
