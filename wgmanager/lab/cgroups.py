"""A real lab node's cgroups: made before its kubelet starts, emptied and removed after.

Role: each kubelet runs its pods under a cgroup root of its own (``cgroupRoot``), one
level below the root of every hierarchy, the same name in each (cgroup v1 hybrid here:
cpu, memory, pids, ..., name=systemd and the unified v2 one). The kubelet insists that
the root exists, and nothing removes it afterwards, so both ends are here. The pods'
processes are found through these cgroups too: they run in network and mount namespaces
of their own, so neither a node's network namespace nor a cwd finds them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from wgmanager.errors import WgmError

CGROUP_FS = Path("/sys/fs/cgroup")


class CgroupBusy(WgmError):
    """A cgroup could not be removed: something in it outlived SIGKILL."""


def hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, name=systemd, the v2 unified one)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2") and Path(fields[1]).is_relative_to(CGROUP_FS):
            found.append(Path(fields[1]))
    return found


def make(name: str) -> None:
    """``/name`` in every hierarchy; cpuset's CPUs and memory nodes are filled in from the
    root (an empty cpuset cannot take a process)."""
    for hierarchy in hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (path / knob).exists() and not (path / knob).read_text().strip():
                (path / knob).write_text((hierarchy / knob).read_text())


def matching(pattern: str) -> set[str]:
    """Names of top-level cgroups matching a glob, in any hierarchy."""
    return {d.name for h in hierarchies() for d in h.glob(pattern) if d.is_dir()}


def _dirs(name: str) -> list[Path]:
    """Every cgroup under ``/name`` in every hierarchy, deepest first."""
    dirs: list[Path] = []
    for hierarchy in hierarchies():
        top = hierarchy / name
        if top.is_dir():
            dirs += [Path(p) for p, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def pids(name: str) -> set[int]:
    """Every process in the cgroups under ``/name``, in any hierarchy."""
    found: set[int] = set()
    for d in _dirs(name):
        with contextlib.suppress(OSError):
            found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
    return found


def pids_of_pod(name: str, pod_uid: str) -> set[int]:
    """The processes of one pod under the kubelet cgroup root ``/name``: the kubelet's
    cgroupfs driver names a pod's cgroup ``pod<UID>`` (under its QoS class's)."""
    found: set[int] = set()
    for d in _dirs(name):
        if d.name == f"pod{pod_uid}":
            found |= pids(str(d.relative_to(_hierarchy_of(d))))
    return found


def _hierarchy_of(path: Path) -> Path:
    return next(h for h in hierarchies() if path.is_relative_to(h))


def remove(name: str, timeout: float = 10.0) -> None:
    """SIGKILLs what still runs under ``/name``, then removes its cgroups bottom-up (a
    process leaves its cgroup when it exits, before anyone reaps it). Idempotent."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        busy = []
        for d in _dirs(name):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                busy.append(d)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise CgroupBusy(f"cgroups still busy after {timeout:.0f} s: "
                             f"{', '.join(map(str, busy[:3]))}")
        time.sleep(0.1)
