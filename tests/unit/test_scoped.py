"""``DeviceModel`` advances exactly as ``apply_peer_ops``, the reference model of WireGuard's
semantics, and its index of allowed-IP holders stays true."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.strategies import PROPERTY, actual_peers, desired_peers, networks, pooled_keys
from wgmanager.core.keys import PublicKey
from wgmanager.core.model import DeviceState, PeerState
from wgmanager.core.plan import AddPeer, PeerOp, RemovePeer, UpdatePeer, plan_peers
from wgmanager.core.plan import apply_peer_ops as reference_apply
from wgmanager.core.scoped import DeviceModel


def _check(model: DeviceModel, want: dict[PublicKey, PeerState]) -> None:
    assert model.peers == want
    assert model.owner == {ip: k for k, p in want.items() for ip in p.allowed_ips}


@PROPERTY
@given(actual_peers(), st.lists(desired_peers(), min_size=1, max_size=4))
def test_planned_operations_advance_the_model_like_the_reference(
        actual: dict[PublicKey, PeerState], targets: list[dict]) -> None:
    model = DeviceModel(DeviceState("wg0", None, 0, peers=actual))
    reference = dict(actual)
    for desired in targets:
        ops = plan_peers(desired, reference)
        model.apply(ops)
        reference = reference_apply(reference, ops)
        _check(model, reference)


updates = st.builds(UpdatePeer, public_key=pooled_keys,
                    add_allowed_ips=st.frozensets(networks, max_size=3),
                    remove_allowed_ips=st.frozensets(networks, max_size=3))
removes = st.builds(RemovePeer, public_key=pooled_keys)


@PROPERTY
@given(actual_peers(), desired_peers(), st.lists(st.one_of(updates, removes), max_size=6))
def test_any_operations_advance_the_model_like_the_reference(
        actual: dict[PublicKey, PeerState], adds: dict, more: list[PeerOp]) -> None:
    """Also the operations a plan never makes: an allowed IP both added and removed, an
    IP taken from one peer by another, a peer re-added with fewer IPs."""
    ops: list[PeerOp] = [AddPeer(p) for p in adds.values()]
    reference = dict(actual)
    model = DeviceModel(DeviceState("wg0", None, 0, peers=actual))
    for op in [*ops, *more]:
        if isinstance(op, UpdatePeer) and op.public_key not in reference:
            continue  # the reference raises, as a device refuses it
        reference = reference_apply(reference, [op])
        model.apply([op])
        _check(model, reference)
