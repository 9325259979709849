"""Long-running lab processes kept under one work dir, so that a crash leaves them findable.

Role: the lab runs real daemons (etcd, kube-apiserver, controllers; per node a namespace
holder, containerd and a kubelet). Each lives by the same conventions, here once:

    Daemons(work_dir, error=SomeError)
      spawn(program, argv)   its own session (outlives a crashed owner, never gets our
                             SIGINT), cwd = work dir, output to <program>.log, pid to
                             <program>.pid (pid and start time)
      wait(program, probe)   polls until the probe says ready; fails fast when the process
                             exits, with the end of its log in the error
      terminate(program)     SIGTERM, then SIGKILL after a grace period
    processes_under(root, comms)   live processes of those names whose cwd is under root:
                             how a later run finds what a killed one left, even after its
                             directory was deleted (the kernel keeps the cwd path)
    kill(pid)                SIGKILL and wait until it is gone

Why cwd and not pid files alone: pids are reused, and the harness removes a dead run's
directory (and so its pid files) before anything else gets to look.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from wgmanager.errors import WgmError

COMM_LEN = 15  # the kernel cuts /proc/PID/comm at 15 characters


class Daemons:
    def __init__(self, work_dir: Path, *, error: type[WgmError] = WgmError,
                 ready_timeout: float = 60.0) -> None:
        self.work_dir = work_dir
        self.error = error
        self.ready_timeout = ready_timeout
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def __bool__(self) -> bool:
        return bool(self._procs)

    def spawn(self, program: str, argv: list[str], *, env: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        with open(self.work_dir / f"{program}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.work_dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._procs[program] = proc
        # The start time makes the pid file unambiguous: pids are reused, start times not.
        (self.work_dir / f"{program}.pid").write_text(f"{proc.pid} {start_time(proc.pid)}\n")
        return proc

    def running(self, program: str) -> bool:
        return self.pid(program) is not None

    def pid(self, program: str) -> int | None:
        """The program's pid while it runs: spawned by this object, or by an earlier
        process (a later `wgmanager lab` command), then found by its pid file and checked
        by its start time, so a reused pid is never mistaken for it."""
        proc = self._procs.get(program)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        try:
            pid, started = (self.work_dir / f"{program}.pid").read_text().split()
            if start_time(int(pid)) == started and alive(int(pid)):
                return int(pid)
        except (OSError, ValueError):
            pass
        return None

    def wait(self, program: str, probe: Callable[[], bool], timeout: float | None = None,
             ) -> None:
        """Polls ``probe`` until it says yes; fails fast if the process exits. On failure the
        process is stopped and the error carries the end of its log."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last = "no answer yet"
        while True:
            proc = self._procs[program]
            if proc.poll() is not None:
                self.terminate(program)
                raise self.error(f"{program} exited with status {proc.returncode}; "
                                 f"{self.log_tail(program)}")
            try:
                if probe():
                    return
                last = "not ready"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                tail = self.log_tail(program)
                self.terminate(program)
                raise self.error(f"{program} not ready after {limit:.0f} s ({last}); {tail}")
            time.sleep(0.1)

    def log_tail(self, program: str, lines: int = 15) -> str:
        log = self.work_dir / f"{program}.log"
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return f"no log at {log}"
        if not tail:
            return f"{log} is empty"
        return f"last lines of {log}:\n" + "\n".join(tail)

    def terminate(self, program: str, grace: float = 10.0) -> None:
        proc = self._procs.pop(program, None)
        if proc is None and (pid := self.pid(program)) is not None:  # an earlier run's
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            kill(pid)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (self.work_dir / f"{program}.pid").unlink(missing_ok=True)


def processes_under(root: Path, comms: Collection[str]) -> Iterator[tuple[int, Path]]:
    """(pid, cwd) of every process named in ``comms`` whose cwd is (or was) under ``root``."""
    names = {c[:COMM_LEN] for c in comms}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in names:
                continue
            cwd = Path(os.readlink(entry / "cwd").removesuffix(" (deleted)"))
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if cwd.is_relative_to(root):
            yield int(entry.name), cwd


def kill(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL, then waits until the process is gone (or a zombie its parent must reap)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it only waits for its parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
