"""``NodeReconciler``: one node's key, devices, peers and datapath brought in line with
the mesh, by full passes (everything read and planned) and incremental ones (the changed
nodes only); the package docstring gives the order of the steps and why."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping

from pyroute2 import IPRoute

from wgmanager.config import NodeSettings, wireguard_mtu
from wgmanager.core.handshake import handshakes_to_start, rotation_roles
from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.mesh import Mesh, datapath_map, old_device_peers
from wgmanager.core.meshindex import MeshChange, MeshIndex
from wgmanager.core.model import (
    Action,
    Endpoint,
    IPNetwork,
    MeshConfig,
    Node,
    NodeSpec,
    PeerConfig,
    PeerState,
    Rejected,
)
from wgmanager.core.plan import (
    AddPeer,
    MapPlan,
    PeerOp,
    adopt_roamed_endpoints,
    defer_replaced_removals,
    plan_fail_closed,
    plan_map,
    plan_peers,
)
from wgmanager.core.rotation import (
    SLOTS,
    Phase,
    RotationState,
    confirmed,
    layout,
    progress,
    published,
    routes,
    stale_sessions,
)
from wgmanager.core.scoped import DeviceModel, change_scope, restrict, scoped_entries
from wgmanager.datapath import links
from wgmanager.datapath.bpf import Hook, Program, attachments, detach
from wgmanager.datapath.maps import DeviceConfig, PinnedMaps
from wgmanager.errors import ConfigError, DatapathError
from wgmanager.keystore import KeyStore, slot_key
from wgmanager.reconciler.device import ensure_device, read_or_empty
from wgmanager.reconciler.peers import (
    REPLACED_PEER_GRACE,
    handshake_kicks,
    new_peers,
    start_handshakes,
)
from wgmanager.reconciler.result import CHANGES, TIMERS, ReconcileResult
from wgmanager.wireguard.backend import DeviceSettings, WireGuardBackend

log = logging.getLogger(__name__)

# A pass names its changed nodes in its log line when they are this few (an operator, or
# bench/control_plane.py, can tell which pass applied a node's change; a line stays short).
NAMED_NODES = 8


def _named(names: Collection[str]) -> dict[str, str]:
    """The ``nodes`` field of an incremental pass's log line (empty: too many to list)."""
    return {"nodes": ",".join(sorted(names))} if 0 < len(names) <= NAMED_NODES else {}


class NodeReconciler:
    """Applies the mesh to this node's device(s) and datapath.

    ``backends`` makes the backend for an interface name: there is one device normally and
    two while the node rotates its key (``wgmanager.core.rotation``), each with its own key
    file, port and interface name, given by the rotation slot.
    """

    def __init__(self, settings: NodeSettings, backends: Callable[[str], WireGuardBackend],
                 mesh_config: MeshConfig) -> None:
        self.settings = settings
        self.mesh_config = mesh_config
        self.keystore = KeyStore(settings.state_dir)
        self._make_backend = backends
        self._backends: dict[str, WireGuardBackend] = {}
        self._keys: dict[int, PrivateKey] = {}
        self._rotation = RotationState()
        self._program: Program | None = None
        self._previous: Mesh | None = None
        self._attached: set[tuple[str, Hook]] = set()
        self._written_endpoints: dict[str, dict[PublicKey, Endpoint]] = {}
        # Peers whose allowed IPs just moved to a new peer, by interface: removed only once
        # their deadline has passed (see defer_replaced_removals).
        self._retiring: dict[str, dict[PublicKey, float]] = {}
        # Peers we follow in the first handshake, by interface: when to check that the
        # leader's handshake arrived (see wgmanager.core.handshake).
        self._following: dict[str, dict[PublicKey, float]] = {}
        # The rotation (request) whose new device started its first handshakes in this
        # process (_claim_first_handshakes).
        self._claimed: str | None = None
        self._clock: Callable[[], float] = time.monotonic
        # Kept between passes so that an event costs work for the nodes it changed (see
        # reconcile): the mesh and its indexes, the device as our acknowledged operations
        # left it, and the CIDR map as we wrote it. Valid only after a full pass succeeded.
        self._index = MeshIndex(local_name=settings.node_name, config=mesh_config)
        self._model: DeviceModel | None = None
        self._map: dict[IPNetwork, Action] | None = None

    def datapath_exists(self) -> bool:
        """Whether this node's maps are pinned (any earlier start loaded the datapath)."""
        return (self.settings.datapath.pin_dir / "cidrs").exists()

    @property
    def mesh(self) -> Mesh | None:
        """The mesh of the last successful reconcile."""
        return self._previous

    @property
    def rotation(self) -> RotationState:
        """The rotation state reconciles apply (``wgmanager.agent.rotation`` keeps it)."""
        return self._rotation

    @rotation.setter
    def rotation(self, state: RotationState) -> None:
        self._rotation = state

    def backend_for(self, slot: int) -> WireGuardBackend:
        ifname = self.settings.wireguard.ifname_for(slot)
        if ifname not in self._backends:
            self._backends[ifname] = self._make_backend(ifname)
        return self._backends[ifname]

    @property
    def backend(self) -> WireGuardBackend:
        """The device traffic goes to: the one with the key peers know us by."""
        return self.backend_for(layout(self._rotation).current)

    def key_for(self, slot: int) -> PrivateKey:
        if slot not in self._keys:
            self._keys[slot] = self.keystore.load_or_create(slot_key(slot)).key
        return self._keys[slot]

    @property
    def private_key(self) -> PrivateKey:
        """The key this node publishes as its own."""
        return self.key_for(published(self._rotation).slot)

    def interfaces(self) -> tuple[str, ...]:
        """The WireGuard interfaces the current rotation state needs."""
        return tuple(self.settings.wireguard.ifname_for(s) for s in layout(self._rotation).slots)

    def retire_slot(self, slot: int) -> list[str]:
        """Deletes a slot's device and destroys its key (a finished or abandoned rotation).

        Only valid when nothing routes to the slot any more: the caller reconciled the state
        that no longer includes it first.
        """
        done: list[str] = []
        backend = self.backend_for(slot)
        if backend.device_exists():
            backend.delete_device()
            done.append(f"deleted device {backend.ifname}")
        self._written_endpoints.pop(backend.ifname, None)
        self._retiring.pop(backend.ifname, None)
        self._following.pop(backend.ifname, None)
        self._keys.pop(slot, None)
        if self.keystore.destroy(slot_key(slot)):
            done.append(f"destroyed key {slot_key(slot)}")
        return done

    def load_datapath(self) -> Program:
        """Compiles and loads the program onto the (possibly existing) pinned maps."""
        if self._program is None:
            dp = self.settings.datapath
            self._program = Program(pin_dir=dp.pin_dir, max_cidrs=dp.max_cidrs)
        return self._program

    def reconcile(self, specs: Mapping[str, NodeSpec] | Iterable[NodeSpec],
                  rotation: RotationState | None = None,
                  quarantined: frozenset[str] = frozenset(), *,
                  changed: Collection[str] | None = None,
                  new_links: Collection[str] = ()) -> ReconcileResult:
        """Brings the live state in line with ``specs``.

        With ``changed`` (the nodes whose events arrived since the last pass) and nothing
        that needs a full pass (not rotating, the last pass succeeded, ``MeshIndex`` can
        follow the change), only those nodes' peers and map entries are planned, against
        the kept device model and map: work proportional to the change. Otherwise (None:
        a periodic resync, a relist, after an error, a recreated device, a rotation) every
        step reads the live state in full, as ``reconcile`` always did.

        ``specs`` by name (the agent's node cache gives them so) is used as is: indexing a
        list of every node costs a Python loop over them, O(N) work on every event.
        """
        started = time.monotonic()
        by_name = (specs if isinstance(specs, Mapping)
                   else {s.name: s for s in specs})
        if rotation is not None:
            self._rotation = rotation
        updated = False
        try:
            if (changed is not None and self._rotation.rotation is None
                    and self._model is not None and self._map is not None):
                change = self._index.update(by_name, changed,
                                            local_key=self.private_key.public_key,
                                            quarantined=quarantined)
                updated = True
                if change is not None:
                    return self._incremental(change, new_links, started)
            return self._full(by_name, quarantined, started)
        except BaseException:
            self._model = self._map = None  # the next pass reads everything again
            if updated:  # the kept mesh was changed in place for this pass
                self._index.rollback()
            self._index.mesh = self._previous
            raise

    def _full(self, by_name: Mapping[str, NodeSpec], quarantined: frozenset[str],
              started: float) -> ReconcileResult:
        self._model = self._map = None
        rot = self._rotation
        lay = layout(rot)
        mesh = self._index.full(by_name, local_key=self.private_key.public_key,
                                quarantined=quarantined)
        if mesh.contested and (self._previous is None
                               or self._previous.contested != mesh.contested):
            log.warning("local pod CIDR overlaps an older node's: traffic to it is dropped; "
                        "fix this node's podCIDR",
                        extra={"cidrs": ", ".join(str(c) for c in mesh.contested)})
        remote = list(mesh.nodes.values())
        program = self.load_datapath()
        wg = self.settings.wireguard
        cur = self.backend_for(lay.current)
        alt = self.backend_for(lay.alt) if lay.alt is not None else None
        with PinnedMaps(self.settings.datapath.pin_dir) as maps, links.iproute() as ipr:
            # 1. Fail closed first: against the device(s) as they are (maybe absent), every
            #    remote CIDR without a configured peer is DROP before anything is attached.
            before = read_or_empty(cur)
            before_alt = read_or_empty(alt) if alt is not None else None
            steer = routes(rot, remote, confirmed(rot, remote, before, before_alt))
            in_kernel = maps.read_cidrs()  # read once: this pass's writes are all ours
            closing = plan_fail_closed(
                datapath_map(mesh, before, self.mesh_config, alt=before_alt, routes=steer,
                             any_key=True),
                in_kernel)
            maps.apply(closing)
            in_kernel.update(closing.upserts)
            for cidr in closing.deletes:
                in_kernel.pop(cidr, None)

            # 2. Devices (one per slot the rotation state needs), keys, links.
            local_addr = mesh.local.addresses[0]
            uplink = (links.get_link(ipr, self.settings.datapath.uplink)
                      if self.settings.datapath.uplink
                      else links.uplink_for(ipr, local_addr, exclude=frozenset(
                          wg.ifname_for(slot) for slot in SLOTS)))
            if uplink is None:
                raise ConfigError(f"uplink {self.settings.datapath.uplink!r} not found")
            mtu = wg.mtu or wireguard_mtu(uplink.mtu, local_addr.version)
            ifindex = {slot: self._ensure_device(ipr, slot, mtu, mesh) for slot in lay.slots}
            cfg = DeviceConfig(ifindex[lay.current], wg.port_for(lay.current), mtu,
                               ifindex[lay.alt] if lay.alt is not None else 0)
            if maps.read_config() != cfg:
                maps.write_config(cfg)

            # 3. Attach: steering on the egress of the uplink and of every overlay tunnel
            #    device (after netfilter); the opt-in fast path on matching pod veths; and
            #    the fast path removed from veths it no longer applies to (an older agent's
            #    default put it on every veth, bypassing the node's netfilter rules).
            pattern = self.settings.datapath.pod_interfaces
            targets = [(uplink.ifname, Hook.TO_UNDERLAY)] + [
                (ln.ifname, tunnel_hook(ln.kind)) for ln in links.tunnel_interfaces(ipr)] + [
                (name, Hook.FROM_POD) for name in links.pod_interfaces(ipr, pattern)]
            for name in links.other_veths(ipr, pattern):
                if any(a.hook is Hook.FROM_POD for a in attachments(ipr, name)) \
                        and detach(ipr, name, Hook.FROM_POD):
                    self._attached.discard((name, Hook.FROM_POD))
                    log.info("datapath detached", extra={"ifname": name,
                                                         "hook": Hook.FROM_POD.value})
            for name, hook in targets:
                # Once per process we swap our freshly loaded program in (a restart); after
                # that only where the kernel shows it missing (a veth recreated by the CNI).
                live = any(a.hook is hook for a in attachments(ipr, name))
                if (name, hook) in self._attached and live:
                    continue
                try:
                    program.attach(ipr, name, hook)
                except DatapathError as e:
                    if name == uplink.ifname or links.get_link(ipr, name) is not None:
                        raise
                    # A veth or tunnel deleted between listing and attaching: it is gone.
                    log.info("interface vanished", extra={"ifname": name,
                                                               "error": str(e)})
                    continue
                self._attached.add((name, hook))

            # 4. Peers (the same on every device), then redirects only into devices that
            #    really hold the peer.
            # While we rotate, the old device keeps the keys it holds (old_device_peers).
            ops = self._apply_peers(cur, mesh, keep_held=rot.rotation is not None)
            if alt is not None:
                ops += self._apply_peers(alt, mesh, keep_held=False, new_device=True)
                self._claim_first_handshakes(alt, rot, remote)
            device = cur.read()
            alt_device = alt.read() if alt is not None else None
            stale = stale_sessions(rot, remote, device, alt_device)
            if stale:
                # Before the next key is withdrawn (after this reconcile): see stale_sessions.
                resets = [AddPeer(mesh.peers[k], fresh=True) for k in stale if k in mesh.peers]
                cur.apply(resets)
                ops += resets
                device = cur.read()
            done = confirmed(rot, remote, device, alt_device)
            desired_map = datapath_map(mesh, device, self.mesh_config, alt=alt_device,
                                       routes=routes(rot, remote, done))
            map_plan = plan_map(desired_map, in_kernel)
            maps.apply(map_plan)
        self._say_rejected(mesh.rejected,
                           self._previous.rejected if self._previous is not None else {})
        self._previous = mesh
        if rot.rotation is None:
            self._model, self._map = DeviceModel(device), desired_map
        result = ReconcileResult(
            mesh, tuple(ops), map_plan, device,
            tuple(f"{n}/{h.value}" for n, h in targets), time.monotonic() - started,
            alt_device, progress(remote, done) if rot.rotation is not None else None)
        log.info("reconciled", extra={"peers": len(device.peers), "peer_ops": len(ops),
                                      "map_upserts": len(map_plan.upserts),
                                      "map_deletes": len(map_plan.deletes),
                                      "rejected": len(mesh.rejected),
                                      "key_rotation": rot.phase, "full": True,
                                      "ms": round(1000 * result.seconds, 1)})
        return result

    def _incremental(self, change: MeshChange, new_links: Collection[str],
                     started: float) -> ReconcileResult:
        """One pass for the nodes in ``change`` (and peers whose removal fell due): the
        same steps and order as a full pass, each restricted to those nodes' peers and
        CIDRs, against the kept device model and map."""
        assert self._model is not None and self._map is not None
        mesh, model, cfg = change.mesh, self._model, self.mesh_config
        cur = self.backend
        scope, keys = change_scope(change, model, self._index.claims)
        now = self._clock()  # and the replaced peers whose grace has ended
        keys |= {k for k, t in self._retiring.get(cur.ifname, {}).items() if t <= now}
        claims = self._index.claims
        with PinnedMaps(self.settings.datapath.pin_dir) as maps:
            closing = plan_fail_closed(
                scoped_entries(mesh, change.names, model, cfg, claims=claims, any_key=True),
                restrict(self._map, scope))
            self._write_map(maps, closing)
            if new_links:
                self._attach_new(new_links)
            desired = {k: mesh.peers[k] for k in keys if k in mesh.peers}
            actual = {k: model.peers[k] for k in keys if k in model.peers}
            ops = self._plan_scoped(cur, desired, actual, keys, now)
            device_started = time.monotonic()
            # The first handshakes ride in the same request as the peers they are for: one
            # wait for the device's configuration lock per pass, not three.
            kicks = self._handshakes_due(cur, model.header.public_key, new_peers(ops),
                                         new_device=False)
            cur.apply([*ops, *handshake_kicks(kicks)])
            model.apply(ops)
            device_s = time.monotonic() - device_started
            map_plan = plan_map(scoped_entries(mesh, change.names, model, cfg, claims=claims),
                                restrict(self._map, scope))
            self._write_map(maps, map_plan)
        # Said before: what these nodes were rejected for in the previous mesh (the kept
        # mesh was updated in place, so it no longer shows that).
        self._say_rejected({n: r for n in change.names
                            if (r := mesh.rejected.get(n)) is not None}, change.old_rejected)
        self._previous = mesh
        # The model's own peer dict, not a copy of every peer (O(N) per event): a result
        # shows the device as of its pass only until the next one.
        result = ReconcileResult(mesh, tuple(ops), map_plan, model.state,
                                 seconds=time.monotonic() - started,
                                 kind=CHANGES if change.names or new_links else TIMERS)
        log.info("reconciled", extra={"peers": len(model.peers), "peer_ops": len(ops),
                                      "map_upserts": len(map_plan.upserts),
                                      "map_deletes": len(map_plan.deletes),
                                      "changed_nodes": len(change.names), "full": False,
                                      **_named(change.names),
                                      "ms": round(1000 * result.seconds, 1),
                                      # of which waiting on the WireGuard device
                                      "device_ms": round(1000 * device_s, 1)})
        return result

    def _plan_scoped(self, backend: WireGuardBackend, desired: dict[PublicKey, PeerConfig],
                     actual: dict[PublicKey, PeerState], keys: set[PublicKey],
                     now: float) -> list[PeerOp]:
        """``_apply_peers``'s planning for some keys only (the other keys' grace periods
        and written endpoints are left as they are)."""
        written = self._written_endpoints.setdefault(backend.ifname, {})
        planned = plan_peers(desired, adopt_roamed_endpoints(desired, actual, written))
        retiring = self._retiring.setdefault(backend.ifname, {})
        mine = {k: t for k, t in retiring.items() if k in keys}
        ops = defer_replaced_removals(planned, actual, mine, now, REPLACED_PEER_GRACE)
        for k in keys:
            retiring.pop(k, None)
            written.pop(k, None)
            want = desired.get(k)
            if want is not None and want.endpoint is not None:
                written[k] = want.endpoint
        retiring.update(mine)
        return ops

    def _write_map(self, maps: PinnedMaps, plan: MapPlan) -> None:
        assert self._map is not None
        maps.apply(plan)
        self._map.update(plan.upserts)
        for cidr in plan.deletes:
            self._map.pop(cidr, None)

    def _attach_new(self, names: Collection[str]) -> None:
        """Steering on tunnel devices, and the fast path on pod veths, that appeared since
        the last pass (no full pass)."""
        with links.iproute() as ipr:
            program = self.load_datapath()
            for name in names:
                link = links.get_link(ipr, name)
                if link is None:
                    continue  # gone again (a pod deleted at once)
                hook = (tunnel_hook(link.kind) if link.kind != "veth" else Hook.FROM_POD)
                if any(a.hook is hook for a in attachments(ipr, name)):
                    continue
                try:
                    program.attach(ipr, name, hook)
                except DatapathError as e:
                    if links.get_link(ipr, name) is not None:
                        raise
                    log.info("interface vanished", extra={"ifname": name, "error": str(e)})
                    continue
                self._attached.add((name, hook))

    @staticmethod
    def _say_rejected(rejected: Mapping[str, Rejected], said: Mapping[str, Rejected]) -> None:
        """Logs each rejection once (every pass would repeat it: thousands at scale);
        ``said``: the rejections of the previous mesh."""
        for rej in rejected.values():
            old = said.get(rej.name)
            if old is not None and old.reason == rej.reason:
                continue
            log.log(logging.INFO if rej.pending else logging.WARNING, "node gets no peer",
                    extra={"node": rej.name, "reason": rej.reason})

    def _ensure_device(self, ipr: IPRoute, slot: int, mtu: int, mesh: Mesh) -> int:
        """Creates and configures one slot's device; returns its ifindex."""
        wg = self.settings.wireguard
        return ensure_device(ipr, self.backend_for(slot),
                             DeviceSettings(self.key_for(slot), wg.port_for(slot), wg.fwmark),
                             mtu, mesh)

    def _apply_peers(self, backend: WireGuardBackend, mesh: Mesh, *,
                     keep_held: bool, new_device: bool = False) -> list[PeerOp]:
        state = backend.read()
        desired = (old_device_peers(mesh, state, self.mesh_config) if keep_held
                   else mesh.peers)
        written = self._written_endpoints.get(backend.ifname, {})
        planned = plan_peers(desired, adopt_roamed_endpoints(desired, state.peers, written))
        retiring = self._retiring.setdefault(backend.ifname, {})
        ops = defer_replaced_removals(planned, state.peers, retiring, self._clock(),
                                      REPLACED_PEER_GRACE)
        backend.apply(ops)
        self._written_endpoints[backend.ifname] = {
            k: p.endpoint for k, p in desired.items() if p.endpoint is not None}
        start_handshakes(backend, self._handshakes_due(backend, state.public_key,
                                                       new_peers(ops), new_device=new_device))
        return ops

    def _claim_first_handshakes(self, alt: WireGuardBackend, rot: RotationState,
                                remote: Iterable[Node]) -> None:
        """Makes our new device start its first handshake with every peer that is not
        rotating, once per rotation and process: in PREPARE, right after it got its peers,
        well before the next key goes out (or in the first SWITCH pass of an agent that
        restarted there).

        Those peers start the handshake themselves the moment they learn our next key
        (``wgmanager.core.handshake``). The first copy steered into the new device would
        make it start one too; if that one reached a peer only after the peer had learnt
        the key (a loaded wireguard-go), it would cross the peer's, and the pair would have
        no session until WireGuard's retry 5 s later. Started here, ours is rejected long
        before (the peers don't know the key yet), and the device starts no other for 5 s:
        the copies wait for the peer's handshake."""
        r = rot.rotation
        if r is None or r.phase is Phase.ROLLBACK or self._claimed == r.request:
            return
        start_handshakes(alt, [n.public_key for n in remote if not n.rotating])
        self._claimed = r.request

    def _handshakes_due(self, backend: WireGuardBackend, own: PublicKey | None,
                        added: list[PublicKey], *, new_device: bool) -> list[PublicKey]:
        """The peers to kick now: new peers we lead, and peers we follow whose check fell
        due (the device starts a handshake only where the leader's did not arrive:
        ``wgmanager.core.handshake``). During a key rotation that handshake is also the
        peer's confirmation, and the side that learns the next key starts it at once
        (``rotation_roles``); ``new_device``: ``backend`` is our rotation's new device."""
        pending = self._following.get(backend.ifname, {})
        now = self._clock()
        if own is None or not (added or any(t <= now for t in pending.values())):
            return []
        rotating = {k: node.rotating for k in added
                    if (node := self._index.owner(k)) is not None}
        rot = self._rotation.rotation
        age = (time.time() - rot.started if rot is not None and rot.phase is Phase.SWITCH
               else None)  # SWITCH began just before our next key went out
        at_once, never = rotation_roles(added, rotating, new_device=new_device,
                                        own_next_key_age=age)
        keys, pending = handshakes_to_start(own, added, pending, now, at_once=at_once,
                                            never=never)
        self._following[backend.ifname] = pending
        return keys

    def next_deadline(self) -> float | None:
        """When a reconcile is next needed (monotonic time): to remove a replaced peer, or to
        check that a new peer's first handshake arrived."""
        deadlines = [t for table in (self._retiring, self._following)
                     for keys in table.values() for t in keys.values()]
        return min(deadlines) if deadlines else None

    def close(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None


def tunnel_hook(kind: str) -> Hook:
    """Where an overlay tunnel device gets the program: L3 tunnels have no Ethernet header."""
    return Hook.TO_TUNNEL_L3 if kind in links.L3_TUNNEL_KINDS else Hook.TO_UNDERLAY
