"""Traffic between simulated pods: ICMP, the TCP probe, and long-running pings.

Everything runs inside the pods' namespaces with the system's own tools (ping) or the
probe module, and is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from wgmanager.lab.topology import Pod

_PING = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping(pod: Pod, dst: str, *, count: int = 2, interval: float = 0.2, size: int = 56,
         wait: float = 2.0) -> tuple[int, int]:
    """(transmitted, received).

    With ``-w`` ping waits for every reply up to the deadline: without it, once one reply is
    in, iputils waits only twice the longest round trip for the others, so on a busy machine
    a reply a few milliseconds late was counted as lost. (With a deadline, ping keeps
    probing until ``count`` replies or the deadline: a lost echo still shows as
    transmitted > received.)
    """
    deadline = math.ceil(count * interval + wait)
    res = subprocess.run(["ip", "netns", "exec", pod.netns, "ping", "-n", "-q", "-c",
                          str(count), "-i", str(interval), "-s", str(size), "-W", str(wait),
                          "-w", str(deadline), dst], capture_output=True, text=True,
                         check=False, timeout=deadline + 30)
    m = _PING.search(res.stdout)
    if m is None:
        raise RuntimeError(f"ping {dst} from {pod.name}: {res.stdout} {res.stderr}".strip())
    return int(m.group(1)), int(m.group(2))


def reaches(pod: Pod, dst: str) -> bool:
    """One ICMP echo, retried once: the first packet may wait for a handshake."""
    return any(ping(pod, dst, count=1, wait=2.0)[1] for _ in range(2))


@contextlib.contextmanager
def tcp_server(pod: Pod, port: int, count: int = 0) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", pod.netns, sys.executable, "-m",
                             "wgmanager.lab.probe", "serve", "--port", str(port),
                             "--count", str(count)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"probe server in {pod.name} failed: {proc.stderr.read()}")
        yield
    finally:
        proc.kill()
        proc.wait()


def tcp_send(pod: Pod, host: str, port: int, nbytes: int = 4096) -> dict[str, object]:
    res = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-m",
                          "wgmanager.lab.probe", "send", host, str(port), "--bytes",
                          str(nbytes)], capture_output=True, text=True, check=False, timeout=60)
    try:
        return json.loads(res.stdout)  # type: ignore[no-any-return]
    except json.JSONDecodeError:
        return {"ok": False, "error": res.stderr.strip() or "probe printed nothing"}


@dataclass
class PingRun:
    """A ping at a fixed interval in the background; ``result()`` once it has finished."""

    thread: threading.Thread
    output: dict[str, str]

    def result(self) -> tuple[int, int]:
        self.thread.join()
        m = _PING.search(self.output.get("out", ""))
        if m is None:
            raise RuntimeError(f"background ping printed no summary: {self.output}")
        return int(m.group(1)), int(m.group(2))

    def losses(self) -> str:
        """Where the unanswered echoes were, for a failure message: each missing sequence
        number with the wall-clock time of the reply before it (ping -D), and the last
        reply's; an echo after the last reply may be one ping stopped waiting for."""
        self.thread.join()
        replies: dict[int, float] = {}
        for m in _REPLY.finditer(self.output.get("out", "")):
            replies.setdefault(int(m.group(2)), float(m.group(1)))
        if not replies:
            return "no replies at all"
        last = max(replies)
        sent, _ = self.result()
        missing = [q for q in range(1, sent + 1) if q not in replies]
        shown = [f"seq {q} (reply before it at "
                 f"{replies.get(max((r for r in replies if r < q), default=0), 0):.3f})"
                 for q in missing[:10]]
        return (f"{len(missing)} missing: {', '.join(shown)}; last reply seq {last} at "
                f"{replies[last]:.3f}")


_REPLY = re.compile(r"\[(\d+\.\d+)\].*?icmp_seq=(\d+)")


def continuous_ping(pod: Pod, dst: str, seconds: float, interval: float = 0.01) -> PingRun:
    output: dict[str, str] = {}
    count = max(1, int(seconds / interval))

    def run() -> None:
        # -D: every reply with its arrival time, so a loss can be placed (``losses``).
        res = subprocess.run(["ip", "netns", "exec", pod.netns, "ping", "-n", "-D", "-i",
                              str(interval), "-c", str(count), "-W", "1", dst],
                             capture_output=True, text=True, check=False)
        output["out"] = res.stdout + res.stderr

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return PingRun(t, output)


@dataclass
class StreamRun:
    """A long TCP stream in the background; ``result()`` once it has finished."""

    thread: threading.Thread
    output: dict[str, str]

    def result(self) -> dict[str, object]:
        self.thread.join()
        try:
            return json.loads(self.output.get("out", ""))  # type: ignore[no-any-return]
        except json.JSONDecodeError:
            return {"ok": False, "error": self.output.get("err") or "probe printed nothing"}


def tcp_stream(pod: Pod, host: str, port: int, seconds: float) -> StreamRun:
    """One TCP connection echoing a steady stream for ``seconds`` (see probe.stream)."""
    output: dict[str, str] = {}

    def run() -> None:
        res = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-m",
                              "wgmanager.lab.probe", "stream", host, str(port), "--seconds",
                              str(seconds)], capture_output=True, text=True, check=False,
                             timeout=seconds + 120)
        output["out"], output["err"] = res.stdout, res.stderr

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return StreamRun(t, output)
