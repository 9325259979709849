"""The wireguard-go sidecar's supervisor against real wireguard-go, driven the way the agent
drives it: ``UserspaceBackend(spawn=False)`` writing and removing want files.

The supervisor runs as its own process (``wgmanager wireguard-go-supervisor``) inside a
network namespace made for this module, as the sidecar runs in a hostNetwork pod; its
wireguard-go processes make their TUNs there. The socket dir is under the run dir
``/run/wgmanager-tests/<prefix>/`` (with ``owner.pid``), so ``cleanup_prefix`` removes
everything even after a crash: it kills every process left in the namespace, deletes the
namespace and the run dir.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import RUN_ROOT, cleanup_prefix
from wgmanager.core.keys import PrivateKey
from wgmanager.lab.lab import await_condition
from wgmanager.wireguard.backend import DeviceSettings
from wgmanager.wireguard.userspace import UserspaceBackend

FIRST_PORT = 22000  # below the ephemeral range; distinct from the backend test's ports


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    await_condition(cond, timeout, what, interval=0.02)


@dataclass
class Sidecar:
    """A namespace, a socket dir, and at most one supervisor process at a time."""

    prefix: str
    run_dir: Path
    netns: str
    proc: subprocess.Popen[bytes] | None = None
    _n: int = 0

    @property
    def socket_dir(self) -> Path:
        return self.run_dir / "wg"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "supervisor.log"

    def ifname(self) -> str:
        self._n += 1
        return f"wgs{self._n}"

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-m",
                 "wgmanager", "wireguard-go-supervisor", "--socket-dir", str(self.socket_dir),
                 *extra], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def backend(self, ifname: str) -> UserspaceBackend:
        """What the agent in the pod holds: it never spawns."""
        return UserspaceBackend(ifname, socket_dir=self.socket_dir, spawn=False, timeout=10)

    def wireguard_go(self) -> dict[str, int]:
        """Live wireguard-go processes in the namespace, by interface name."""
        res = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True, check=False)
        found: dict[str, int] = {}
        for pid in map(int, res.stdout.split()):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if comm == "wireguard-go" and state not in ("Z", "X"):
                found[argv[-2].decode() if argv[-1] == b"" else argv[-1].decode()] = pid
        return found

    def link_exists(self, ifname: str) -> bool:
        return subprocess.run(["ip", "-n", self.netns, "link", "show", ifname],
                              capture_output=True, check=False).returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def sidecar() -> Iterator[Sidecar]:
    prefix = "wgs" + secrets.token_hex(2)
    run_dir = RUN_ROOT / prefix
    run_dir.mkdir(parents=True)  # no exist_ok: never share a run dir with another run
    (run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
    sc = Sidecar(prefix, run_dir, f"{prefix}-n1")
    try:
        subprocess.run(["ip", "netns", "add", sc.netns], check=True, capture_output=True)
        subprocess.run(["ip", "-n", sc.netns, "link", "set", "lo", "up"], check=True)
        yield sc
    finally:
        if sc.proc is not None and sc.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                sc.terminate()
            if sc.proc.poll() is None:
                sc.proc.kill()
                sc.proc.wait()
        cleanup_prefix(prefix)  # whatever is left in the namespace, the namespace, the dir


def test_the_agent_gets_devices_from_the_sidecar_and_they_come_back_when_killed(
        sidecar: Sidecar) -> None:
    supervisor = sidecar.start()
    wgm0 = sidecar.backend(sidecar.ifname())

    # create: the agent writes the want file and waits for the socket
    assert wgm0.ensure_device() is True
    assert wgm0.want_path.exists() and wgm0.device_exists()
    assert sidecar.link_exists(wgm0.ifname)
    first = sidecar.wireguard_go()[wgm0.ifname]
    parent = int(Path(f"/proc/{first}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == supervisor.pid  # the supervisor's child, not the agent's
    assert not wgm0.pid_path.exists()  # no pid file: the agent is in another pid namespace
    key = PrivateKey.generate()
    wgm0.configure(DeviceSettings(key, FIRST_PORT))
    assert wgm0.read().public_key == key.public_key
    assert wgm0.ensure_device() is False  # exists: nothing to ask for

    # kill wireguard-go: the supervisor starts a new one at once (a fresh, unconfigured
    # device the agent's reconcile then configures again)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: sidecar.wireguard_go().get(wgm0.ifname, first) != first
             and wgm0.device_exists(), 5, "the supervisor to restart wireguard-go")
    second = sidecar.wireguard_go()[wgm0.ifname]
    assert second != first
    assert wgm0.read().public_key is None
    assert sidecar.link_exists(wgm0.ifname)

    # a second device on demand (key rotation's "<interface>r"), then gone again, while
    # the first one runs on untouched
    rot = sidecar.backend(f"{wgm0.ifname}r")
    assert rot.ensure_device() is True
    assert set(sidecar.wireguard_go()) == {wgm0.ifname, rot.ifname}
    rot_pid = sidecar.wireguard_go()[rot.ifname]
    rot.delete_device()
    # delete_device returns once the socket is gone; wireguard-go closes it first, then its
    # TUN and UDP socket, and the supervisor reaps it a moment later.
    assert not rot.want_path.exists() and not rot.device_exists()
    assert not rot.socket_path.exists()
    wait_for(lambda: rot_pid not in sidecar.wireguard_go().values(), 5, "wireguard-go to exit")
    assert not sidecar.link_exists(rot.ifname)
    assert sidecar.wireguard_go() == {wgm0.ifname: second}

    # delete: the want file goes, the process and the TUN go with it
    wgm0.delete_device()
    assert not wgm0.want_path.exists() and not wgm0.device_exists()
    wait_for(lambda: sidecar.wireguard_go() == {}, 5, "wireguard-go to exit")
    assert not sidecar.link_exists(wgm0.ifname)
    wgm0.delete_device()  # idempotent

    assert supervisor.poll() is None
    assert sidecar.terminate() == 0
    log = sidecar.log()
    assert "wireguard-go exited; restarting it" in log
    assert "Traceback" not in log


def test_sigterm_stops_its_devices_and_a_new_sidecar_restores_them(sidecar: Sidecar) -> None:
    sidecar.start()
    dev = sidecar.backend(sidecar.ifname())
    dev.ensure_device()
    pid = sidecar.wireguard_go()[dev.ifname]

    # The pod is going away: the supervisor stops wireguard-go (which removes its socket)
    # and exits 0; the request stays on file.
    assert sidecar.terminate() == 0
    assert sidecar.wireguard_go() == {}
    assert not Path(f"/proc/{pid}/comm").exists() or pid not in sidecar.wireguard_go()
    assert not dev.device_exists() and not dev.socket_path.exists()
    assert not sidecar.link_exists(dev.ifname)
    assert dev.want_path.exists()

    # The replacement sidecar brings the device back before the agent asks again.
    sidecar.start()
    wait_for(dev.device_exists, 5, "the new supervisor to restore the wanted device")
    assert sidecar.link_exists(dev.ifname)
    assert dev.ensure_device() is False
    assert sidecar.terminate() == 0
    assert sidecar.wireguard_go() == {}


def test_bad_requests_and_a_failing_binary_are_logged_not_fatal(sidecar: Sidecar,
                                                                tmp_path: Path) -> None:
    failing = tmp_path / "wireguard-go-fails"
    failing.write_text("#!/bin/sh\necho \"cannot create TUN for $2\" >&2\nexit 1\n")
    failing.chmod(0o755)
    sidecar.socket_dir.mkdir(parents=True)
    (sidecar.socket_dir / "not an interface!.want").write_text("x\n")
    (sidecar.socket_dir / "wgbad.want").write_text("wgbad\n")
    sidecar.start("--binary", str(failing))

    # It keeps retrying with a growing delay: a few attempts in 2.5 s, not hundreds.
    time.sleep(2.5)
    log = sidecar.log()
    attempts = log.count("cannot create TUN for wgbad")
    assert 2 <= attempts <= 6, log
    assert log.count("ignoring a want file that names no interface") == 1
    assert sidecar.proc is not None and sidecar.proc.poll() is None
    assert sidecar.terminate() == 0


def test_a_missing_binary_fails_at_start_in_one_line(sidecar: Sidecar) -> None:
    missing = f"wireguard-go-missing-{secrets.token_hex(3)}"
    proc = sidecar.start("--binary", missing)
    assert proc.wait(timeout=30) == 1
    lines = sidecar.log().strip().splitlines()
    assert lines == [f"wgmanager: error: {missing} not found; install it (apt-get install "
                     "wireguard-go) or use a kernel with WireGuard"]
