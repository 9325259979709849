"""An incremental pass's log line names its changed nodes when they are few: operators and
bench/control_plane.py tell from it which pass applied a node's change."""

from __future__ import annotations

import pytest

from wgmanager.reconciler.node import NAMED_NODES, _named


@pytest.mark.parametrize(("names", "field"), [
    (set(), {}),  # a timers pass changed no node
    ({"b", "a"}, {"nodes": "a,b"}),  # sorted: the same set gives the same line
    ({f"n{i}" for i in range(NAMED_NODES)}, {"nodes": ",".join(
        sorted(f"n{i}" for i in range(NAMED_NODES)))}),
    ({f"n{i}" for i in range(NAMED_NODES + 1)}, {}),  # too many: the line stays short
])
def test_the_nodes_field_names_few_changed_nodes(names: set[str],
                                                 field: dict[str, str]) -> None:
    assert _named(names) == field
