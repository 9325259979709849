"""`wgmanager lab check`: the proof a lab is encrypted, whatever runs its agents.

The same proof for both kinds of lab (agents as processes, ``lab.Lab``; the Helm chart's
DaemonSet on real kubelets, ``kubelab.KubeLab``), the way `cilium connectivity test` does
it: every pair of pods on different nodes over ICMP and TCP, IPv4 and IPv6, with an
underlay capture that must hold zero pod packets; then the sanity inversion (datapath
detached: the same capture must see pod packets, so the detector is known to work); then
encryption restored and checked again. Traffic runs with this machine's tools inside the
pods' network namespaces (``traffic``), so a pod image needs no ping or Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from wgmanager.lab import traffic
from wgmanager.lab.capture import Capture
from wgmanager.lab.topology import Pod

Progress = Callable[[str], None]
FAMILIES = ("ipv4", "ipv6")


@dataclass(frozen=True)
class Pair:
    src: str
    dst: str
    family: str
    icmp: bool
    tcp: bool

    @property
    def ok(self) -> bool:
        return self.icmp and self.tcp


@dataclass(frozen=True)
class CheckReport:
    pairs: tuple[Pair, ...]
    plaintext_encrypted: int  # pod packets seen on the underlay with encryption on: must be 0
    unexpected_encrypted: int  # anything but WireGuard/housekeeping/control plane: must be 0
    wireguard_packets: int
    plaintext_inverted: int  # with the datapath detached: must be > 0
    plaintext_restored: int  # after re-attaching: must be 0

    @property
    def ok(self) -> bool:
        return (all(p.ok for p in self.pairs) and self.plaintext_encrypted == 0
                and self.unexpected_encrypted == 0 and self.wireguard_packets > 0
                and self.plaintext_inverted > 0 and self.plaintext_restored == 0)


class Provable(Protocol):
    """What a lab offers the proof."""

    @property
    def pods(self) -> Sequence[Pod]: ...

    def capture(self, name: str) -> contextlib.AbstractContextManager[Capture]:
        """tcpdump on the underlay for the body's duration."""

    def detach_datapaths(self) -> None:
        """Removes every node's steering filters, so pod traffic leaves in plaintext."""

    def reattach_datapaths(self) -> None:
        """Has every agent put its filters back; returns once all are attached."""


def check(lab: Provable, progress: Progress = lambda _: None,
          tcp_port: int = 7070) -> CheckReport:
    pods = list(lab.pods)
    pairs: list[Pair] = []
    progress("pod-to-pod over ICMP and TCP between every pair on different nodes, with an "
             "underlay capture")
    with lab.capture("check-encrypted") as enc:
        for server in pods:
            clients = [p for p in pods if p.node != server.node]
            with traffic.tcp_server(server, tcp_port, count=len(clients) * len(FAMILIES)):
                for client in clients:
                    for fam in FAMILIES:
                        dst = getattr(server, fam)
                        icmp = traffic.reaches(client, dst)
                        tcp = bool(traffic.tcp_send(client, dst, tcp_port, 16384)["ok"])
                        pairs.append(Pair(client.name, server.name, fam, icmp, tcp))
    progress("sanity inversion: datapath detached on every node, same traffic")
    lab.detach_datapaths()
    try:
        with lab.capture("check-inverted") as inv:
            sample_traffic(pods)
    finally:
        progress("re-attaching (agents reconcile on SIGHUP)")
        lab.reattach_datapaths()
    with lab.capture("check-restored") as again:
        sample_traffic(pods)
    return CheckReport(tuple(pairs), enc.plaintext_pod_packets(), enc.unexpected_packets(),
                       enc.wireguard_packets(), inv.plaintext_pod_packets(),
                       again.plaintext_pod_packets())


def sample_traffic(pods: Sequence[Pod]) -> None:
    """One echo per pair and family: enough for a capture to judge, quick to run."""
    for a in pods:
        for b in pods:
            if a.node != b.node:
                for fam in FAMILIES:
                    traffic.ping(a, getattr(b, fam), count=1, wait=1)
