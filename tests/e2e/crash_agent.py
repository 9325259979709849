"""`python -m tests.e2e.crash_agent POINT wgmanager-args...`: the agent, killed on purpose.

Runs the real `wgmanager` command line with ``KeyRotator.checkpoint`` replaced by a SIGKILL
of the process at POINT (one of ``wgmanager.agent.rotation.CHECKPOINTS``), so the crash
tests can stop an agent between any two steps of the rotation protocol. It lives with the
tests: the production command line has no way to crash itself.
"""

from __future__ import annotations

import os
import signal
import sys

from wgmanager.agent.rotation import CHECKPOINTS, KeyRotator
from wgmanager.commands.main import main


def crash_at(point: str) -> None:
    if point not in CHECKPOINTS:
        raise SystemExit(f"unknown checkpoint {point!r}; one of {', '.join(CHECKPOINTS)}")

    def checkpoint(self: KeyRotator, reached: str) -> None:
        if reached == point:
            print(f"crashing on purpose at {point}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    KeyRotator.checkpoint = checkpoint  # type: ignore[method-assign]


if __name__ == "__main__":
    crash_at(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
