"""The kernel lane: on the host, one test boots the VM and runs tests/kernel/guest in it
(with the kernel backend's unit tests); inside the VM, only those guest tests run.

The guest tests need kernel WireGuard, which this machine's kernel lacks: outside the VM
they are not collected at all (never skipped: a green lane means they ran for real). The
in-VM pytest's own summary is printed at the end of the host run.
"""

from __future__ import annotations

import pytest

from tests.kernel.vm import SUMMARY, in_vm

collect_ignore = ["test_kernel_lane.py"] if in_vm() else ["guest"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(SUMMARY, [])  # test_kernel_lane's
    if lines:
        terminalreporter.section("kernel lane: pytest inside the VM (kernel WireGuard)")
        for line in lines:
            terminalreporter.write_line(line)
