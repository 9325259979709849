"""The agent's Event rate limit: the same event at most once per interval, a changed
message at once (the audit saw PeerRejected keep its first reason for ten minutes)."""

from __future__ import annotations

from wgmanager.kube.events import EventRecorder
from wgmanager.kube.rest import RestClient


def recorder(now: list[float]) -> EventRecorder:
    # loopback discard port: nothing is ever delivered
    return EventRecorder(RestClient("http://127.0.0.1:9", ssl_context=None), "node1",
                         min_interval=600.0, clock=lambda: now[0])


def test_a_changed_reason_is_sent_at_once_and_a_repeat_is_not() -> None:
    now = [1000.0]
    events = recorder(now)
    assert events.warning("PeerRejected", "node b: no InternalIP", subject="b")
    assert not events.warning("PeerRejected", "node b: no InternalIP", subject="b")
    assert events.warning("PeerRejected", "node b: pod CIDR overlaps", subject="b")
    assert events.warning("PeerRejected", "node c: no InternalIP", subject="c")
    now[0] += 601
    assert events.warning("PeerRejected", "node b: no InternalIP", subject="b")
