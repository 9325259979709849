"""Chooses the WireGuard backend: kernel where the kernel has WireGuard, else wireguard-go."""

from __future__ import annotations

import logging

from wgmanager.config import BackendMode, WireGuardSettings
from wgmanager.errors import BackendUnavailable
from wgmanager.wireguard.backend import WireGuardBackend
from wgmanager.wireguard.kernel import KernelBackend, kernel_unavailable_reason
from wgmanager.wireguard.userspace import UserspaceBackend

log = logging.getLogger(__name__)


def select_backend(settings: WireGuardSettings, ifname: str | None = None) -> WireGuardBackend:
    """The backend for ``ifname`` (default: the configured interface; key rotation asks for
    its second device by name)."""
    ifname = ifname or settings.ifname
    mode = settings.backend
    if mode in (BackendMode.AUTO, BackendMode.KERNEL):
        reason = kernel_unavailable_reason()
        if reason is None:
            return KernelBackend(ifname)
        if mode is BackendMode.KERNEL:
            raise BackendUnavailable(f"{reason} (--backend=kernel forbids the fallback)")
        log.info("using userspace WireGuard", extra={"reason": reason})
    return UserspaceBackend(ifname, socket_dir=settings.socket_dir,
                            spawn=settings.spawn_userspace)
