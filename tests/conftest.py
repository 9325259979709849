"""Marks every test under tests/integration, tests/e2e and tests/kernel as `integration`
(root, real kernel objects), so `pytest -m "not integration"` runs only the fast pure tests."""

from __future__ import annotations

from pathlib import Path

import pytest

_ROOT_TESTS = [Path(__file__).parent / d for d in ("integration", "e2e", "kernel")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(Path(item.fspath).is_relative_to(d) for d in _ROOT_TESTS):
            item.add_marker(pytest.mark.integration)
