"""One node's encryption, end to end: key, WireGuard device, peers and eBPF datapath.

``NodeReconciler`` turns a list of node descriptions into the live state, in an order that
never lets pod traffic out in plaintext:

1. the program's pinned maps get fail-closed entries (every remote CIDR is DROP until its
   peer exists) before any program is attached;
2. the device, its key and its link settings are ensured, and the map learns its ifindex;
3. the programs are attached (or atomically replaced, after a restart);
4. peers are changed incrementally, the device is read back, and only CIDRs whose peer the
   device really holds become REDIRECT.

Every step reads live state and writes only differences, so a repeat run (an agent restart)
changes nothing and drops nothing. The Kubernetes agent and `wgmanager apply` both use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wgmanager.config import NodeSettings, wireguard_mtu
from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.mesh import Mesh, compute_mesh, datapath_map
from wgmanager.core.model import DeviceState, Endpoint, MeshConfig, NodeSpec
from wgmanager.core.plan import MapPlan, PeerOp, adopt_roamed_endpoints, plan_map, plan_peers
from wgmanager.datapath import links
from wgmanager.datapath.bpf import Hook, Program, attachments, detach
from wgmanager.datapath.maps import DeviceConfig, PinnedMaps
from wgmanager.errors import ConfigError, DatapathError
from wgmanager.keystore import KeyStore
from wgmanager.wireguard.backend import DeviceSettings, WireGuardBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    mesh: Mesh
    peer_ops: tuple[PeerOp, ...]
    map_plan: MapPlan
    device: DeviceState
    attached: tuple[str, ...] = field(default=())
    seconds: float = 0.0


class NodeReconciler:
    def __init__(self, settings: NodeSettings, backend: WireGuardBackend,
                 mesh_config: MeshConfig) -> None:
        self.settings = settings
        self.backend = backend
        self.mesh_config = mesh_config
        self._key: PrivateKey | None = None
        self._program: Program | None = None
        self._previous: Mesh | None = None
        self._attached: set[tuple[str, Hook]] = set()
        self._written_endpoints: dict[PublicKey, Endpoint] = {}

    def datapath_exists(self) -> bool:
        """Whether this node's maps are pinned (any earlier start loaded the datapath)."""
        return (self.settings.datapath.pin_dir / "cidrs").exists()

    @property
    def mesh(self) -> Mesh | None:
        """The mesh of the last successful reconcile."""
        return self._previous

    @property
    def private_key(self) -> PrivateKey:
        if self._key is None:
            self._key = KeyStore(self.settings.state_dir).load_or_create().key
        return self._key

    def load_datapath(self) -> Program:
        """Compiles and loads the program onto the (possibly existing) pinned maps."""
        if self._program is None:
            dp = self.settings.datapath
            self._program = Program(pin_dir=dp.pin_dir, max_cidrs=dp.max_cidrs)
        return self._program

    def reconcile(self, specs: Iterable[NodeSpec]) -> ReconcileResult:
        started = time.monotonic()
        key = self.private_key
        mesh = compute_mesh(local_name=self.settings.node_name, local_key=key.public_key,
                            specs=specs, config=self.mesh_config, previous=self._previous)
        program = self.load_datapath()
        wg = self.settings.wireguard
        with PinnedMaps(self.settings.datapath.pin_dir) as maps, links.iproute() as ipr:
            # 1. Fail closed first: against the device as it is (maybe absent), every remote
            #    CIDR without a configured peer is DROP before anything is attached.
            before = self.backend.read() if self.backend.device_exists() else _empty(wg.ifname)
            maps.apply(plan_map(datapath_map(mesh, before, self.mesh_config), maps.read_cidrs()))

            # 2. Device, key, link.
            self.backend.ensure_device()
            self.backend.configure(DeviceSettings(key, wg.listen_port, wg.fwmark))
            local_addr = mesh.local.addresses[0]
            uplink = (links.get_link(ipr, self.settings.datapath.uplink)
                      if self.settings.datapath.uplink else links.uplink_for(ipr, local_addr))
            if uplink is None:
                raise ConfigError(f"uplink {self.settings.datapath.uplink!r} not found")
            mtu = wg.mtu or wireguard_mtu(uplink.mtu, local_addr.version)
            wg_link = links.ensure_up(ipr, wg.ifname, mtu=mtu)
            self._ensure_sysctls(wg.ifname, mesh)
            ipv4 = next((a for a in mesh.local.addresses if a.version == 4), None)
            if ipv4 is not None:
                # The kernel's reverse-path check fails on a device with no IPv4 address, which
                # would drop every decrypted IPv4 packet; the node's own address as a /32 (no
                # prefix route, no new reachability) satisfies it.
                links.ensure_address(ipr, wg.ifname, ipv4)
            cfg = DeviceConfig(wg_link.index, wg.listen_port, mtu)
            if maps.read_config() != cfg:
                maps.write_config(cfg)

            # 3. Attach: the guard on the uplink, the fast path on every pod veth.
            targets = [(uplink.ifname, Hook.TO_UNDERLAY)] + [
                (name, Hook.FROM_POD)
                for name in links.pod_interfaces(ipr, self.settings.datapath.pod_interfaces)]
            for name, hook in targets:
                # Once per process we swap our freshly loaded program in (a restart); after
                # that only where the kernel shows it missing (a veth recreated by the CNI).
                live = any(a.hook is hook for a in attachments(ipr, name))
                if (name, hook) in self._attached and live:
                    continue
                try:
                    program.attach(ipr, name, hook)
                except DatapathError as e:
                    if hook is Hook.TO_UNDERLAY or links.get_link(ipr, name) is not None:
                        raise
                    # A pod veth deleted between listing and attaching: its pod is gone.
                    log.info("pod interface vanished", extra={"ifname": name,
                                                               "error": str(e)})
                    continue
                self._attached.add((name, hook))

            # 4. Peers, then REDIRECT only for what the device really holds.
            actual = adopt_roamed_endpoints(mesh.peers, self.backend.read().peers,
                                            self._written_endpoints)
            ops = plan_peers(mesh.peers, actual)
            self.backend.apply(ops)
            self._written_endpoints = {k: p.endpoint for k, p in mesh.peers.items()
                                       if p.endpoint is not None}
            device = self.backend.read()
            map_plan = plan_map(datapath_map(mesh, device, self.mesh_config), maps.read_cidrs())
            maps.apply(map_plan)
        self._previous = mesh
        for rej in mesh.rejected.values():
            log.log(logging.INFO if rej.pending else logging.WARNING, "node gets no peer",
                    extra={"node": rej.name, "reason": rej.reason})
        result = ReconcileResult(mesh, tuple(ops), map_plan, device,
                                 tuple(f"{n}/{h.value}" for n, h in targets),
                                 time.monotonic() - started)
        log.info("reconciled", extra={"peers": len(device.peers), "peer_ops": len(ops),
                                      "map_upserts": len(map_plan.upserts),
                                      "map_deletes": len(map_plan.deletes),
                                      "rejected": len(mesh.rejected)})
        return result

    def _ensure_sysctls(self, ifname: str, mesh: Mesh) -> None:
        # Pods' traffic is forwarded by the node; decrypted packets arrive on the WireGuard
        # device while the route back to their source may point elsewhere (the CNI's route),
        # so strict reverse-path filtering would drop them: loose mode on our device only.
        links.ensure_sysctl("net/ipv4/ip_forward", "1")
        links.ensure_sysctl(f"net/ipv4/conf/{ifname}/rp_filter", "2")
        if any(c.version == 6 for c in mesh.local.pod_cidrs):
            # Only when pods have IPv6: with forwarding on, the kernel ignores router
            # advertisements on interfaces with accept_ra=1 (a SLAAC default route vanishes).
            links.ensure_sysctl("net/ipv6/conf/all/forwarding", "1")

    def close(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None


def teardown(settings: NodeSettings, backend: WireGuardBackend) -> list[str]:
    """Removes what wgmanager put on this node (filters, device, pinned maps); keeps the key."""
    done: list[str] = []
    with links.iproute() as ipr:
        for link in links.list_links(ipr):
            for att in attachments(ipr, link.ifname):
                if detach(ipr, link.ifname, att.hook):
                    done.append(f"detached {att.hook.value} from {link.ifname}")
    if backend.device_exists():
        backend.delete_device()
        done.append(f"deleted device {backend.ifname}")
    pin_dir: Path = settings.datapath.pin_dir
    if pin_dir.is_dir():
        for pin in sorted(pin_dir.iterdir()):
            pin.unlink()
        pin_dir.rmdir()
        done.append(f"unpinned maps under {pin_dir}")
    return done


def _empty(ifname: str) -> DeviceState:
    return DeviceState(name=ifname, public_key=None, listen_port=0)
