"""Chooses the WireGuard backend: kernel where the kernel has WireGuard, else wireguard-go."""

from __future__ import annotations

import logging

from wgmanager.config import WireGuardSettings
from wgmanager.errors import BackendUnavailable
from wgmanager.wireguard.backend import BackendMode, WireGuardBackend
from wgmanager.wireguard.kernel import KernelBackend, kernel_unavailable_reason
from wgmanager.wireguard.userspace import UserspaceBackend

log = logging.getLogger(__name__)


def select_backend(settings: WireGuardSettings) -> WireGuardBackend:
    mode = settings.backend
    if mode in (BackendMode.AUTO, BackendMode.KERNEL):
        reason = kernel_unavailable_reason()
        if reason is None:
            return KernelBackend(settings.ifname)
        if mode is BackendMode.KERNEL:
            raise BackendUnavailable(f"{reason} (--backend=kernel forbids the fallback)")
        log.info("using userspace WireGuard", extra={"reason": reason})
    return UserspaceBackend(settings.ifname, socket_dir=settings.socket_dir,
                            spawn=settings.spawn_userspace)
