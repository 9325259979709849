"""`wgmanager lab ...` run as a user runs it: a separate process, no standard input."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.harness import RUN_ROOT


class LabCLI:
    """One lab's CLI: ``cli("up", "--nodes", "3")`` runs ``wgmanager lab up --nodes 3`` with
    the lab's root and prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.root = RUN_ROOT / prefix

    def __call__(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wgmanager", "lab", "--root",
                               str(self.root), "--prefix", self.prefix, *argv],
                              capture_output=True, text=True, check=False, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def adopt(self) -> None:
        """Makes this process the owner of the lab `up` made: the `up` process that wrote
        the owner files (the lab's and its control plane's) has exited, so a concurrent
        session's sweep of crashed runs (``harness.remove_stale_runs``,
        ``controlplane.cleanup_stale``) would take it for one and stop it mid-test."""
        for owner in self.root.rglob("owner.pid"):
            owner.write_text(f"{os.getpid()}\n")
