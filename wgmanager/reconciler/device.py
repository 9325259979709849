"""The node's WireGuard devices as the reconciler sets them up, reads and removes them:
link settings and sysctls around a device, a read that tolerates a missing device, and
`wgmanager teardown`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute

from wgmanager.config import NodeSettings
from wgmanager.core.mesh import Mesh
from wgmanager.core.model import DeviceState
from wgmanager.core.rotation import SLOTS
from wgmanager.datapath import links
from wgmanager.datapath.bpf import attachments, detach
from wgmanager.wireguard.backend import DeviceSettings, WireGuardBackend


def ensure_device(ipr: IPRoute, backend: WireGuardBackend, settings: DeviceSettings,
                  mtu: int, mesh: Mesh) -> int:
    """Creates and configures one device (key, port, fwmark, link up, MTU, sysctls, the
    node's IPv4 address); returns its ifindex."""
    backend.ensure_device()
    backend.configure(settings)
    link = links.ensure_up(ipr, backend.ifname, mtu=mtu)
    ensure_sysctls(backend.ifname, mesh)
    ipv4 = next((a for a in mesh.local.addresses if a.version == 4), None)
    if ipv4 is not None:
        # The kernel's reverse-path check fails on a device with no IPv4 address, which
        # would drop every decrypted IPv4 packet; the node's own address as a /32 (no
        # prefix route, no new reachability) satisfies it.
        links.ensure_address(ipr, backend.ifname, ipv4)
    return link.index


def ensure_sysctls(ifname: str, mesh: Mesh) -> None:
    # Pods' traffic is forwarded by the node; decrypted packets arrive on the WireGuard
    # device while the route back to their source may point elsewhere (the CNI's route),
    # so strict reverse-path filtering would drop them: loose mode on our device only.
    links.ensure_sysctl("net/ipv4/ip_forward", "1")
    links.ensure_sysctl(f"net/ipv4/conf/{ifname}/rp_filter", "2")
    if any(c.version == 6 for c in mesh.local.pod_cidrs):
        # Only when pods have IPv6: with forwarding on, the kernel ignores router
        # advertisements on interfaces with accept_ra=1 (a SLAAC default route vanishes).
        links.ensure_sysctl("net/ipv6/conf/all/forwarding", "1")


def read_or_empty(backend: WireGuardBackend) -> DeviceState:
    """The device, or an empty one with no key when it does not exist (yet)."""
    return backend.read() if backend.device_exists() else empty(backend.ifname)


def empty(ifname: str) -> DeviceState:
    return DeviceState(name=ifname, public_key=None, listen_port=0)


def teardown(settings: NodeSettings,
             backends: Callable[[str], WireGuardBackend]) -> list[str]:
    """Removes what wgmanager put on this node (filters, devices, pinned maps); keeps keys."""
    done: list[str] = []
    with links.iproute() as ipr:
        for link in links.list_links(ipr):
            for att in attachments(ipr, link.ifname):
                if detach(ipr, link.ifname, att.hook):
                    done.append(f"detached {att.hook.value} from {link.ifname}")
    for slot in SLOTS:
        device = backends(settings.wireguard.ifname_for(slot))
        if device.device_exists():
            device.delete_device()
            done.append(f"deleted device {device.ifname}")
    pin_dir: Path = settings.datapath.pin_dir
    if pin_dir.is_dir():
        for pin in sorted(pin_dir.iterdir()):
            pin.unlink()
        pin_dir.rmdir()
        done.append(f"unpinned maps under {pin_dir}")
    return done
