"""The one interface both WireGuard backends implement, and the choice between them.

Backends speak typed values (``DeviceState``, ``PeerOp``) and translate at their edge; nothing
raw from netlink or the UAPI socket leaks past them. Link-level settings (up, MTU, addresses)
are the same for both and live in ``wgmanager.datapath.links``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from wgmanager.core.keys import PrivateKey
from wgmanager.core.model import DeviceState
from wgmanager.core.plan import PeerOp


class BackendKind(enum.StrEnum):
    KERNEL = "kernel"
    USERSPACE = "userspace"


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Device-wide settings. ``fwmark`` 0 means unset."""

    private_key: PrivateKey
    listen_port: int
    fwmark: int = 0


class WireGuardBackend(Protocol):
    kind: BackendKind
    ifname: str

    def ensure_device(self) -> bool:
        """Creates the interface if it is missing; returns True if it had to be created."""

    def device_exists(self) -> bool: ...

    def delete_device(self) -> None:
        """Removes the interface (and, for userspace, stops its process). Idempotent."""

    def configure(self, settings: DeviceSettings) -> bool:
        """Sets key, port and fwmark where they differ; returns True if anything was written."""

    def read(self) -> DeviceState:
        """The device as it is now, peers and statistics included."""

    def apply(self, ops: Sequence[PeerOp]) -> None:
        """Applies peer operations in order; each touches only the peer it names."""

