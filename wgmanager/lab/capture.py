"""Underlay captures: the detector behind every "zero plaintext" claim.

tcpdump runs on the underlay bridge inside the lab's underlay namespace and writes a pcap;
counts are taken afterwards with BPF filters. ``--immediate-mode`` matters: without it
packets can sit in the capture ring when tcpdump is stopped and go uncounted, and a
detector that under-counts would make "zero plaintext" meaningless.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_POD_NETS = ("10.244.0.0/16", "fd00:244::/32")


@dataclass
class Capture:
    pcap: Path
    # WireGuard's ports: the listen port and the one a key rotation's second device uses.
    wg_ports: tuple[int, ...] = (51820, 51821)
    pod_nets: tuple[str, ...] = DEFAULT_POD_NETS

    @property
    def _wireguard(self) -> str:
        return " or ".join(f"udp port {p}" for p in self.wg_ports)

    def count(self, bpf_filter: str) -> int:
        return len(self.lines(bpf_filter))

    def lines(self, bpf_filter: str) -> list[str]:
        """tcpdump's one-line summaries of the matching packets (for failure messages)."""
        res = subprocess.run(["tcpdump", "-nn", "-r", str(self.pcap), bpf_filter],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"tcpdump -r failed: {res.stderr.strip()}")
        return [ln for ln in res.stdout.splitlines() if ln.strip()]

    def plaintext_pod_packets(self) -> int:
        return self.count(" or ".join(f"net {n}" for n in self.pod_nets))

    def wireguard_packets(self) -> int:
        return self.count(self._wireguard)

    def unexpected_packets(self) -> int:
        """Anything but WireGuard UDP and link-local housekeeping (ARP, ND, multicast).

        Traffic to and from the lab's API server (TCP 6443 on the host link) is expected
        control-plane traffic, not pod traffic, and is excluded too.
        """
        return len(self.unexpected())

    def unexpected(self) -> list[str]:
        """The packets ``unexpected_packets`` counts."""
        return self.lines(f"(ip or ip6) and not ({self._wireguard}) "
                          "and not (tcp port 6443) "
                          "and not (ip6 and dst net ff00::/8) "
                          "and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)")

    def fragments(self) -> int:
        return self.count("(ip and (ip[6:2] & 0x3fff) != 0) or (ip6 and ip6[6] == 44)")


@contextlib.contextmanager
def capture(netns: str, ifname: str, pcap: Path, *, wg_ports: tuple[int, ...] = (51820, 51821),
            pod_nets: tuple[str, ...] = DEFAULT_POD_NETS) -> Iterator[Capture]:
    """tcpdump on ``ifname`` in ``netns``, listening before the body runs."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", ifname, "-nn",
                             "-U", "--immediate-mode", "-w", str(pcap)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"tcpdump did not start: {line.strip()}")
    try:
        yield Capture(pcap, wg_ports, pod_nets)
    finally:
        time.sleep(0.2)  # in-flight packets are on the wire within microseconds; margin
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
