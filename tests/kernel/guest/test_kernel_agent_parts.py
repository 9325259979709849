"""The agent's use of the kernel backend: metrics scrapes that leave no sockets behind, and
a node that moves from wireguard-go to kernel WireGuard (real kernel, in the VM)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netns import setns

from wgmanager.agent.metrics import AgentMetrics, LiveSources
from wgmanager.config import BackendMode, WireGuardSettings
from wgmanager.core.keys import PrivateKey
from wgmanager.errors import WgmError
from wgmanager.kube.watch import WatchHealth
from wgmanager.wireguard.backend import DeviceSettings
from wgmanager.wireguard.kernel import KernelBackend
from wgmanager.wireguard.select import select_backend
from wgmanager.wireguard.userspace import UserspaceBackend, process_alive, want_path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_metrics_scrapes_open_no_socket_each(netns: str, tmp_path: Path) -> None:
    # Before: each scrape is served on a new thread, and pyroute2 opens a netlink socket per
    # thread that is never closed: 50 scrapes, 50 more descriptors.
    def agent_metrics() -> str:  # in the node's namespace, as the agent runs
        backend = KernelBackend("wgk0")
        backend.ensure_device()
        backend.configure(DeviceSettings(PrivateKey.generate(), 51820))
        metrics = AgentMetrics()
        metrics.attach(LiveSources(device=backend.read, pin_dir=lambda: tmp_path / "none",
                                   mesh=lambda: None, key_mtime=lambda: None,
                                   watch=WatchHealth, backend="kernel",
                                   interface=lambda: backend.ifname))
        metrics.serve("127.0.0.1", 19877)

        def scrape() -> str:
            with urllib.request.urlopen("http://127.0.0.1:19877/metrics", timeout=30) as r:
                return r.read().decode()

        first = scrape()  # the first read opens the reader's socket
        before = open_fds()
        up = sum("wgmanager_device_up 1.0" in scrape() for _ in range(50))
        return f"{first.count('wgmanager_device_up 1.0')} {up} {open_fds() - before}"

    first_up, up, grown = map(int, _in_netns(netns, agent_metrics).split())
    assert (first_up, up) == (1, 50)
    assert grown <= 2  # 50 before the fix


def _in_netns(netns: str, fn: Callable[[], str]) -> str:
    """Runs ``fn`` in a forked child inside ``netns`` (as an agent runs in its node's)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        setns(netns, flags=0)
        try:
            child.send(fn())
        except WgmError as e:
            child.send(f"error: {e}")

    proc = ctx.Process(target=run)
    proc.start()
    answer = parent.recv() if parent.poll(120) else "no answer"
    proc.join(30)
    return str(answer)


def _link_kind(netns: str, ifname: str) -> str:
    with IPRoute(netns=netns, flags=0) as ipr:
        links = ipr.link("get", ifname=ifname)
        return str(links[0].get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or "")


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "wg"
    yield d
    for pidfile in d.glob("*.pid"):  # a wireguard-go a failed test left running
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), 9)


@pytest.mark.parametrize("leftover", ["wireguard-go", "sidecar want file"])
def test_a_node_moving_to_kernel_wireguard_retires_the_userspace_device(
        netns: str, socket_dir: Path, leftover: str) -> None:
    # Before: the kernel backend found wireguard-go's TUN named like its device and refused
    # it as foreign on every reconcile: the node failed closed for good.
    settings = WireGuardSettings(ifname="wgk0", socket_dir=socket_dir,
                                 backend=BackendMode.AUTO,
                                 spawn_userspace=leftover == "wireguard-go")

    def run_userspace() -> str:
        userspace = UserspaceBackend("wgk0", socket_dir=socket_dir, spawn=True)
        userspace.ensure_device()
        if leftover == "sidecar want file":
            # What a sidecar setup leaves: the request, and the device it serves.
            want_path(socket_dir, "wgk0").write_text("wgk0\n")
        return str(userspace.pid())

    pid = int(_in_netns(netns, run_userspace))
    assert _link_kind(netns, "wgk0") == "tun"

    def run_kernel() -> str:
        b = select_backend(settings)
        assert isinstance(b, KernelBackend)
        b.ensure_device()
        b.configure(DeviceSettings(PrivateKey.generate(), 51820))
        return "ok"

    assert _in_netns(netns, run_kernel) == "ok"
    assert _link_kind(netns, "wgk0") == "wireguard"
    assert not process_alive(pid)
    assert not want_path(socket_dir, "wgk0").exists()
    assert not (socket_dir / "wgk0.sock").exists()
    assert not (socket_dir / "wgk0.pid").exists()


def test_a_foreign_link_of_our_name_is_still_refused(netns: str, socket_dir: Path) -> None:
    subprocess.run(["ip", "-n", netns, "link", "add", "wgk0", "type", "dummy"], check=True)
    settings = WireGuardSettings(ifname="wgk0", socket_dir=socket_dir)

    def run_kernel() -> str:
        select_backend(settings).ensure_device()
        return "ok"

    answer = _in_netns(netns, run_kernel)
    assert answer.startswith("error: WireGuard device wgk0: a dummy link of that name exists")
    assert _link_kind(netns, "wgk0") == "dummy"
