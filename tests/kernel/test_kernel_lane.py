"""The kernel lane: boots Debian's kernel in a VM (TCG) and runs, in one pytest process,
the tests that need kernel WireGuard (tests/kernel/guest) and the kernel backend's unit
tests. Fails with the in-VM output; prints the in-VM summary either way."""

from __future__ import annotations

import re

import pytest

from tests.kernel import vm

# Boot ~5-15 s, Python imports ~7 s per process under TCG; the lane itself is a few minutes.
LANE_TIMEOUT = 840.0
IN_VM = ("tests/kernel/guest", "tests/unit/test_kernel_backend.py")
_RESULT = re.compile(r"^=+ .*\b(passed|failed|error)\b.* in [\d.]+s.*=+$")


@pytest.mark.timeout(LANE_TIMEOUT + 60)
def test_kernel_lane_in_a_vm(request: pytest.FixtureRequest) -> None:
    cmd = (".venv/bin/python -m pytest -p no:cacheprovider -v -rA --timeout 300 "
           + " ".join(IN_VM))
    run = vm.run(cmd, timeout=LANE_TIMEOUT)
    lines = run.output.splitlines()
    results = [ln for ln in lines if ln.startswith(("PASSED ", "FAILED ", "ERROR ",
                                                    "SKIPPED "))]
    final = [ln for ln in lines if _RESULT.match(ln)]
    request.config.stash[vm.SUMMARY] = [*results, *final,
                                        f"(VM boot and lane: {run.seconds:.0f} s)"]
    assert run.returncode == 0, (
        f"kernel lane failed (exit {run.returncode}) after {run.seconds:.0f} s; in-VM output:\n"
        + (run.output[-20000:] or run.console[-20000:]))
