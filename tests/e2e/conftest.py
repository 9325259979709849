"""End-to-end fixtures: the integration prerequisites plus a real kube-apiserver binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import prerequisites  # noqa: F401 - the same session checks
from wgmanager.errors import EnvironmentProblem
from wgmanager.lab.controlplane import apiserver_binary, cleanup_stale, require_binary


@pytest.fixture(scope="session", autouse=True)
def control_plane_binaries() -> None:
    try:
        require_binary(apiserver_binary())
    except EnvironmentProblem as e:
        pytest.fail(str(e), pytrace=False)
    cleanup_stale(Path("/run/wgmanager-tests"))
