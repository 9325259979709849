"""Chooses the WireGuard backend: kernel where the kernel has WireGuard, else wireguard-go.

A node can move from one to the other: it ran wireguard-go while its kernel lacked
WireGuard, then booted a kernel that has it, and AUTO now picks the kernel. What the
userspace backend left (a wireguard-go process with its TUN named like our device, or a
want file asking the sidecar for one) would make the kernel backend refuse that name as
foreign on every reconcile, and the node would fail closed for good. As Cilium does at
init, the kernel backend retires such a leftover, once, before it creates its device; only
what is ours: our want file, or a wireguard-go serving exactly this interface name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from wgmanager.config import BackendMode, WireGuardSettings
from wgmanager.errors import BackendUnavailable, DeviceError
from wgmanager.wireguard.backend import WireGuardBackend
from wgmanager.wireguard.kernel import KernelBackend, kernel_unavailable_reason
from wgmanager.wireguard.userspace import UserspaceBackend, process_alive

log = logging.getLogger(__name__)
STOP_TIMEOUT = 5.0  # wireguard-go exits within milliseconds of SIGTERM


def select_backend(settings: WireGuardSettings, ifname: str | None = None) -> WireGuardBackend:
    """The backend for ``ifname`` (default: the configured interface; key rotation asks for
    its second device by name)."""
    ifname = ifname or settings.ifname
    mode = settings.backend
    if mode in (BackendMode.AUTO, BackendMode.KERNEL):
        reason = kernel_unavailable_reason()
        if reason is None:
            name = ifname
            return KernelBackend(ifname, retire_leftover=lambda: retire_userspace_leftover(
                settings, name))
        if mode is BackendMode.KERNEL:
            raise BackendUnavailable(f"{reason} (--backend=kernel forbids the fallback)")
        log.info("using userspace WireGuard", extra={"reason": reason})
    return UserspaceBackend(ifname, socket_dir=settings.socket_dir,
                            spawn=settings.spawn_userspace)


def retire_userspace_leftover(settings: WireGuardSettings, ifname: str) -> bool:
    """Stops what the userspace backend left for ``ifname``; True if there was anything.

    The want file goes first (a sidecar then stops its wireguard-go and does not restart
    it); a wireguard-go serving ``ifname`` in this network namespace (started by an
    earlier agent, or a sidecar whose processes we see) gets SIGTERM; its pid file and
    socket are removed.
    """
    userspace = UserspaceBackend(ifname, socket_dir=settings.socket_dir, spawn=True,
                                 timeout=STOP_TIMEOUT)
    found = False
    if userspace.want_path.exists():
        userspace.want_path.unlink(missing_ok=True)
        found = True
        log.warning("withdrew a leftover request for a wireguard-go device: the kernel "
                    "backend serves it now", extra={"ifname": ifname,
                                                    "want_file": str(userspace.want_path)})
    pid = userspace.process()
    if pid is not None:
        found = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _exited(pid, STOP_TIMEOUT):
            raise DeviceError(f"WireGuard device {ifname}: the leftover wireguard-go (pid "
                              f"{pid}) did not exit within {STOP_TIMEOUT:.0f}s of SIGTERM; "
                              f"stop it (kill {pid}) so the kernel backend can take the name")
        log.warning("stopped a leftover wireguard-go device: the kernel backend serves it now",
                    extra={"ifname": ifname, "pid": pid})
    if found or userspace.pid_path.exists() or userspace.socket_path.exists():
        userspace.delete_device()  # its pid file and socket, if it left them
    return found


def _exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
