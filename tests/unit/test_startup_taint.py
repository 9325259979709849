"""The startup taint controller's decisions (wgmanager.kube.startup_taint), pure."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from wgmanager.kube.startup_taint import TAINT_KEY, pod_ready, ready_nodes, without_taint

taints = st.lists(st.fixed_dictionaries({
    "key": st.sampled_from([TAINT_KEY, "node.kubernetes.io/not-ready", "team/gpu"]),
    "effect": st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"]),
    "value": st.sampled_from(["true", ""]),
}), max_size=5)


@given(taints)
def test_without_taint_removes_exactly_ours_or_says_there_was_none(ts: list[dict[str, Any]],
                                                                   ) -> None:
    kept = without_taint(ts, TAINT_KEY)
    if any(t["key"] == TAINT_KEY for t in ts):
        assert kept == [t for t in ts if t["key"] != TAINT_KEY]  # others untouched, in order
    else:
        assert kept is None  # nothing to patch


def test_without_taint_of_a_node_without_taints() -> None:
    assert without_taint(None, TAINT_KEY) is None
    assert without_taint([], TAINT_KEY) is None
    assert without_taint([{"key": TAINT_KEY, "effect": "NoSchedule"}], TAINT_KEY) == []


def pod(node: str | None, ready: str = "True", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"agent-{node}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node} if node else {},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}}


def test_only_ready_agent_pods_free_their_node() -> None:
    pods = [pod("a"), pod("b", ready="False"), pod("c", deleting=True), pod(None),
            {"metadata": {}, "spec": {"nodeName": "d"}, "status": {}}]
    assert ready_nodes(pods) == {"a"}
    assert pod_ready(pod("a")) and not pod_ready(pod("c", deleting=True))
