"""The agent's leading-edge debounce: a lone event goes at once, a burst is batched."""

from __future__ import annotations

import itertools

import pytest

from wgmanager.agent.loop import coalesce_delay


@pytest.mark.parametrize(("now", "last_end", "debounce", "wait"), [
    (100.0, float("-inf"), 0.1, 0.0),  # the first event ever
    (100.0, 99.0, 0.1, 0.0),  # quiet for a second: no wait
    (100.0, 99.9, 0.1, 0.0),  # exactly one debounce since the last pass
    (100.0, 99.95, 0.1, 0.05),  # a burst: until one debounce after the last pass
    (100.0, 100.0, 0.1, 0.1),  # events arrived during the pass that just ended
    (100.0, 100.0, 0.0, 0.0),  # --debounce 0: never wait
])
def test_wait_before_a_pass(now: float, last_end: float, debounce: float, wait: float) -> None:
    assert coalesce_delay(now, last_end, debounce) == pytest.approx(wait)


def test_a_steady_stream_gets_one_pass_per_debounce() -> None:
    """Events every 20 ms and 5 ms passes: passes start at most every debounce + pass."""
    debounce, pass_s, t, end = 0.1, 0.005, 0.0, float("-inf")
    starts = []
    while t < 2.0:
        t += coalesce_delay(t, end, debounce)
        starts.append(t)
        end = t + pass_s
        t = end + 0.02  # the next event arrives 20 ms after the pass
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(debounce + pass_s)
    assert len(starts) <= 2.0 / debounce + 1
