"""The incremental state equals a full computation after any sequence of node events.

Node specs are drawn from small pools on purpose, so that keys clash, pod CIDRs overlap (each
other, the local node's, a cluster CIDR), addresses miss the underlay family and annotations
are invalid far more often than random values would; quarantines come and go. After every
event the mesh ``MeshIndex`` keeps (by ``update``, or ``full`` where ``update`` declines)
must equal ``compute_mesh`` over all specs against the same previous mesh: what the agent
computed before this work on every event. Where ``update`` followed the change, the peers
and the datapath map planned for its scope alone (``wgmanager.core.scoped``) and applied to
the kept device model and map must equal the full plans: the device holding exactly the
mesh's peers, the map exactly ``datapath_map``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.strategies import PROPERTY
from wgmanager.core.keys import PublicKey
from wgmanager.core.mesh import Mesh, compute_mesh, datapath_map
from wgmanager.core.meshindex import MeshChange, MeshIndex
from wgmanager.core.model import Action, DeviceState, IPNetwork, MeshConfig, NodeSpec
from wgmanager.core.plan import plan_fail_closed, plan_map, plan_peers
from wgmanager.core.scoped import DeviceModel, change_scope, restrict, scoped_entries

LOCAL = NodeSpec("local", ("192.168.0.1",), ("10.0.0.0/24", "fd00::/64"), created=5.0)
LOCAL_KEY = PublicKey(bytes([9]) * 32)
CONFIG = MeshConfig(listen_port=51820, cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),
                                                        ipaddress.ip_network("10.9.0.0/24")))
KEYS = [PublicKey(bytes([i]) * 32).base64() for i in range(1, 5)] + [LOCAL_KEY.base64()]
NAMES = [f"n{i}" for i in range(6)]

specs = st.builds(
    NodeSpec,
    name=st.sampled_from(NAMES),
    addresses=st.sampled_from([("192.168.0.2",), ("192.168.0.3", "fd99::3"), ("fd99::4",),
                               ("bogus",), ()]),
    pod_cidrs=st.sampled_from([("10.1.0.0/24",), ("10.1.0.0/24", "fd00:1::/64"),
                               ("10.2.0.0/24",), ("10.3.0.0/24",), ("10.4.0.0/24",),
                               ("10.1.0.0/16",), ("10.0.0.0/25",), ("10.9.0.0/16",),
                               ("10.5.0.1/24",), ()]),
    public_key=st.sampled_from([*KEYS, "not a key", None]),
    created=st.sampled_from([1.0, 2.0, 7.0]),
    port=st.sampled_from([None, None, "51821", "x"]),
    next_public_key=st.sampled_from([None, None, None, KEYS[3]]),
)
events = st.one_of(
    specs.map(lambda s: ("upsert", s)),
    st.sampled_from(NAMES).map(lambda n: ("delete", n)),
    st.frozensets(st.sampled_from(NAMES), max_size=2).map(lambda q: ("quarantine", q)),
)


class Kept:
    """The agent's kept device and map, synced in full from a mesh."""

    def __init__(self, mesh: Mesh, config: MeshConfig) -> None:
        self.config = config
        self.model = DeviceModel(DeviceState("wg0", LOCAL_KEY, 51820))
        self.model.apply(plan_peers(mesh.peers, {}))
        self.map = datapath_map(mesh, self.model.state, config)

    def follow(self, change: MeshChange, index: MeshIndex) -> None:
        """The reconciler's incremental pass, minus the I/O."""
        mesh, cfg = change.mesh, self.config
        cidrs, keys = change_scope(change, self.model, index.claims)
        closing = plan_fail_closed(scoped_entries(mesh, change.names, self.model, cfg,
                                                  claims=index.claims, any_key=True),
                                   restrict(self.map, cidrs))
        self._write(closing.upserts, closing.deletes)
        desired = {k: mesh.peers[k] for k in keys if k in mesh.peers}
        actual = {k: self.model.peers[k] for k in keys if k in self.model.peers}
        self.model.apply(plan_peers(desired, actual))
        plan = plan_map(scoped_entries(mesh, change.names, self.model, cfg, claims=index.claims),
                        restrict(self.map, cidrs))
        self._write(plan.upserts, plan.deletes)

    def _write(self, upserts: dict[IPNetwork, Action] | object, deletes: tuple[IPNetwork, ...],
               ) -> None:
        assert isinstance(upserts, dict)
        self.map.update(upserts)
        for c in deletes:
            self.map.pop(c, None)

    def check(self, mesh: Mesh) -> None:
        assert {k: p.config() for k, p in self.model.peers.items()} == dict(mesh.peers)
        assert self.map == datapath_map(mesh, self.model.state, self.config)


def _expected(current: dict[str, NodeSpec], previous: Mesh | None,
              quarantined: frozenset[str]) -> Mesh:
    return compute_mesh(local_name="local", local_key=LOCAL_KEY, specs=current.values(),
                        config=CONFIG, previous=previous, quarantined=quarantined)


def _frozen(mesh: Mesh | None) -> Mesh | None:
    """A copy of a mesh ``MeshIndex`` keeps (it changes the original in place)."""
    if mesh is None:
        return None
    return replace(mesh, nodes=dict(mesh.nodes), peers=dict(mesh.peers),
                   rejected=dict(mesh.rejected))


@PROPERTY
@given(st.lists(specs, max_size=6), st.lists(st.lists(events, min_size=1, max_size=3),
                                             max_size=12),
       st.lists(st.booleans(), max_size=12))
def test_after_any_events_the_incremental_mesh_equals_a_full_computation(
        initial: list[NodeSpec], batches: list[list[tuple[str, object]]],
        failures: list[bool]) -> None:
    """``failures[i]``: batch i's pass fails after ``update`` (the device refused a write):
    ``rollback`` must restore the previous mesh exactly, and the next pass is full."""
    current = {"local": LOCAL, **{s.name: s for s in initial}}
    quarantined: frozenset[str] = frozenset()
    index = MeshIndex(local_name="local", config=CONFIG)
    assert index.full(current, local_key=LOCAL_KEY) == _expected(current, None, quarantined)
    assert index.mesh is not None
    kept = Kept(index.mesh, CONFIG)
    for i, batch in enumerate(batches):  # the events one debounced pass sees together
        previous = _frozen(index.mesh)
        changed: set[str] = set()
        for kind, arg in batch:
            if kind == "upsert":
                assert isinstance(arg, NodeSpec)
                current[arg.name] = arg
                changed.add(arg.name)
            elif kind == "delete":
                assert isinstance(arg, str)
                current.pop(arg, None)
                changed.add(arg)
            else:
                assert isinstance(arg, frozenset)
                quarantined = arg
        change = index.update(current, changed, local_key=LOCAL_KEY, quarantined=quarantined)
        if i < len(failures) and failures[i]:
            index.rollback()
            assert index.mesh == previous
            change = None  # the reconciler's next pass is full
        got = (change.mesh if change is not None
               else index.full(current, local_key=LOCAL_KEY, quarantined=quarantined))
        assert got == _expected(current, previous, quarantined)
        if change is None:
            kept = Kept(got, CONFIG)  # a full pass re-reads and re-plans everything
            continue
        assert previous is not None  # what it says changed is all that changed
        moved = {n for n in set(got.nodes) | set(previous.nodes)
                 if got.nodes.get(n) != previous.nodes.get(n)}
        assert moved <= change.names
        kept.follow(change, index)
        kept.check(got)


def test_a_key_change_among_valid_nodes_is_incremental() -> None:
    nodes = {"local": LOCAL, **{f"n{i}": NodeSpec(f"n{i}", (f"192.168.0.{i + 2}",),
                                                  (f"10.{i + 1}.0.0/24",), KEYS[i])
                                for i in range(3)}}
    index = MeshIndex(local_name="local", config=CONFIG)
    index.full(nodes, local_key=LOCAL_KEY)
    nodes["n1"] = NodeSpec("n1", ("192.168.0.3",), ("10.2.0.0/24",), KEYS[3])
    change = index.update(nodes, {"n1"}, local_key=LOCAL_KEY)
    assert change is not None and change.names == {"n1"}
    assert change.mesh.nodes["n1"].public_key.base64() == KEYS[3]
    assert change.mesh == _expected(nodes, None, frozenset())
