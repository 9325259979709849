"""Fixtures inside the kernel lane's VM: real kernel WireGuard, one namespace per test."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from wgmanager.wireguard.kernel import KernelBackend, kernel_unavailable_reason


@pytest.fixture(scope="session", autouse=True)
def kernel_wireguard() -> None:
    reason = kernel_unavailable_reason()
    if reason is not None:
        pytest.fail(f"the VM should have kernel WireGuard: {reason}", pytrace=False)


@pytest.fixture
def netns() -> Iterator[str]:
    name = "wgk" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def backend(netns: str) -> Iterator[KernelBackend]:
    b = KernelBackend("wgk0", netns=netns)
    try:
        yield b
    finally:
        b.close()
