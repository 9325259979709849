"""Integration fixtures: real namespaces, wireguard-go and bcc. Root is required.

Missing prerequisites fail the run with the fix (they are installed by `make setup`);
they never silently skip, so a green run always means the real datapath was exercised.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Cluster, applied_cluster, remove_stale_runs


@pytest.fixture(scope="session", autouse=True)
def prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("integration tests need root (network namespaces, BPF)")
    for tool in ("wireguard-go", "tcpdump", "nsenter", "ip", "ping"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing")
    try:
        import bcc  # noqa: F401
    except ImportError:
        problems.append("python3-bpfcc is missing")
    if not Path(f"/lib/modules/{platform.release()}/build").exists():
        problems.append("kernel headers are not linked for bcc")
    if problems:
        pytest.fail("; ".join(problems) + " -- run `make setup` as root", pytrace=False)
    remove_stale_runs()


def new_prefix() -> str:
    return "wgt" + secrets.token_hex(2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """3 nodes x 2 pods, keys generated, wgmanager applied on every node."""
    with applied_cluster(new_prefix()) as c:
        yield c
