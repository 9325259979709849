"""The wireguard-go supervisor: the main process of the Helm chart's wireguard-go pods.

Why a pod of its own: in Kubernetes a container restart ends every process in the
container, and deleting a pod every process in the pod, so a wireguard-go started by the
agent would die with each agent restart, deletion or upgrade, taking the tunnels with it.
In its own DaemonSet's pod it survives them all (the chart's wireguard-go-daemonset.yaml).
Why a supervisor rather than a fixed ``wireguard-go wgm0``: the agent needs devices on
demand (key rotation runs a second device, ``<interface>r``, for a while), and a dead
wireguard-go must come back without waiting for the agent.

The protocol lives in files on the socket directory both pods mount (a host path):

- the agent (``UserspaceBackend(spawn=False)``) writes ``<dir>/<ifname>.want`` and waits
  for ``<dir>/<ifname>.sock``;
- the supervisor runs ``wireguard-go -f <ifname>`` for every want file, restarts it when
  it exits (at once the first time, then with a growing delay while it keeps failing), and
  stops it (SIGTERM, then SIGKILL) when the want file is removed.

Each pass re-reads the directory and converges on it (level-triggered, like the agent's
reconciler), so nothing depends on seeing an event: a restarted supervisor, or a want file
written while it was down, is handled by the next pass. It polls every 0.2 s; at a handful
of files that costs nothing measurable, and it works on every filesystem a hostPath can be.

On SIGTERM the supervisor stops its wireguard-go processes and exits; it does not try to
leave them running. A container's processes cannot outlive it anyway, and SIGTERM means
the pod is going away or being replaced (an upgrade). Stopping them in order lets
wireguard-go remove its socket. Until the next supervisor starts the devices again, the
agent's eBPF datapath drops remote pod traffic instead of sending it unencrypted (the
redirect target is gone, and the reconciler writes DROP for peers that are not ready).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wgmanager import config
from wgmanager.errors import BackendUnavailable
from wgmanager.wireguard.userspace import (
    WANT_SUFFIX,
    UserspaceBackend,
    check_can_start,
    start_wireguard_go,
)

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # seconds between passes over the socket directory
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
STABLE_AFTER = 10.0  # a process that ran this long before exiting counts as a fresh failure
MAX_BACKOFF = 30.0

# Linux interface names: 1-15 bytes, no "/", no whitespace, not "." or "..". Anything
# else in a want file's name is not a request wgmanager wrote.
_IFNAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.:-]{1,15}$")


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting after ``failures`` consecutive quick exits.

    The first restart is immediate (a crash after a long run is an accident; the tunnels
    are down until it is back). A process that keeps exiting at once waits 0.5 s, 1 s,
    2 s ... up to 30 s, so a broken binary or a bad name does not spin the CPU or the log.
    """
    if failures <= 1:
        return 0.0
    return float(min(MAX_BACKOFF, 0.5 * 2 ** (failures - 2)))


def wanted_devices(socket_dir: Path) -> tuple[set[str], set[str]]:
    """The interface names the agent asked for, and the want files that name no interface."""
    wanted: set[str] = set()
    invalid: set[str] = set()
    try:
        entries = list(socket_dir.iterdir())
    except FileNotFoundError:
        return wanted, invalid
    for path in entries:
        if not path.name.endswith(WANT_SUFFIX) or path.name.startswith("."):
            continue  # sockets, logs, and the agent's temporary files before their rename
        name = path.name[: -len(WANT_SUFFIX)]
        (wanted if _IFNAME.match(name) else invalid).add(name)
    return wanted, invalid


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    started: float


@dataclass
class _History:
    failures: int = 0
    not_before: float = 0.0


class Supervisor:
    """Keeps one wireguard-go per want file in ``socket_dir``; ``step`` is one pass."""

    def __init__(self, socket_dir: Path, *, binary: str = "wireguard-go",
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.socket_dir = socket_dir
        self.binary = binary
        self.stop_timeout = stop_timeout
        self.children: dict[str, _Child] = {}
        self._history: dict[str, _History] = {}
        self._reported: set[str] = set()  # invalid names and start errors, logged once each

    def step(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        wanted, invalid = wanted_devices(self.socket_dir)
        for name in invalid - self._reported:
            log.warning("ignoring a want file that names no interface",
                        extra={"file": str(self.socket_dir / f"{name}{WANT_SUFFIX}")})
            self._reported.add(name)
        for name in sorted(self.children.keys() - wanted):
            self.stop(name)
        for name in self._history.keys() - wanted:
            del self._history[name]  # asked for again later: a fresh start, no backoff
        for name in sorted(wanted):
            self._keep_running(name, now)

    def _keep_running(self, name: str, now: float) -> None:
        child = self.children.get(name)
        history = self._history.setdefault(name, _History())
        if child is not None:
            code = child.proc.poll()
            if code is None:
                return
            del self.children[name]
            ran = now - child.started
            history.failures = 1 if ran >= STABLE_AFTER else history.failures + 1
            history.not_before = now + restart_delay(history.failures)
            log.warning("wireguard-go exited; restarting it",
                        extra={"ifname": name, "code": code, "ran_seconds": round(ran, 1),
                               "restart_in": round(history.not_before - now, 1)})
        if now < history.not_before:
            return
        if UserspaceBackend(name, socket_dir=self.socket_dir, spawn=False).device_exists():
            # Served by a process that is not ours (one left from before, or started by
            # hand). Starting a second would fail on the socket; look again next pass.
            return
        try:
            proc = start_wireguard_go(name, socket_dir=self.socket_dir, binary=self.binary)
        except (BackendUnavailable, OSError) as e:
            history.failures += 1
            history.not_before = now + max(restart_delay(history.failures), 1.0)
            if name not in self._reported:
                log.error("cannot start wireguard-go", extra={"ifname": name, "error": str(e)})
                self._reported.add(name)
            return
        self._reported.discard(name)
        self.children[name] = _Child(proc, now)
        log.info("wireguard-go started", extra={"ifname": name, "pid": proc.pid})

    def stop(self, name: str) -> None:
        """Stops one device's wireguard-go: SIGTERM, then SIGKILL after ``stop_timeout``."""
        child = self.children.pop(name, None)
        if child is None:
            return
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("wireguard-go ignored SIGTERM; killing it",
                            extra={"ifname": name, "pid": proc.pid})
                proc.kill()
                proc.wait()
        # A killed wireguard-go leaves its socket behind; nobody listens on it any more.
        with contextlib.suppress(FileNotFoundError):
            (self.socket_dir / f"{name}.sock").unlink()
        log.info("wireguard-go stopped", extra={"ifname": name, "pid": proc.pid})

    def stop_all(self) -> None:
        for name in sorted(self.children):
            self.stop(name)

    def run(self, stop: threading.Event, *, poll_interval: float = POLL_INTERVAL) -> None:
        """Passes until ``stop`` is set, then stops every wireguard-go it started."""
        log.info("supervising wireguard-go", extra={"socket_dir": str(self.socket_dir),
                                                     "binary": self.binary})
        try:
            while not stop.is_set():
                self.step()
                stop.wait(poll_interval)
        finally:
            self.stop_all()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket-dir", type=Path, default=config.DEFAULT_SOCKET_DIR,
                   help="the directory shared with the agent: want files in, UAPI sockets "
                        "out (default %(default)s)")
    p.add_argument("--binary", default="wireguard-go",
                   help="the wireguard-go executable (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    check_can_start(args.binary)  # a sidecar that can never start anything says so at once
    args.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Supervisor(args.socket_dir, binary=args.binary).run(stop)
    return 0
