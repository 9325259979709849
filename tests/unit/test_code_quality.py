"""The codebase's own rules, checked by the tools that define them.

The layering contract (the pure core imports no adapter library) is an architecture claim in
docs/architecture.md; lint-imports proves it on every run. mypy --strict and ruff keep the
code readable for the next person.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("argv", [
    ["lint-imports"],
    ["mypy"],
    ["ruff", "check", "wgmanager", "tests", "bench"],
], ids=["import-layers", "mypy-strict", "ruff"])
def test_tool_passes(argv: list[str]) -> None:
    res = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=ROOT, capture_output=True,
                         text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_every_module_has_a_layer() -> None:
    """The layers contract names every top-level module and package of wgmanager, so a new
    module cannot sit outside the architecture (import-linter checks only what is named)."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c["layers"] for c in contracts["contracts"] if c["type"] == "layers")
    named = {m.strip() for layer in layers for m in layer.split("|")}
    package = ROOT / "wgmanager"
    modules = {f"wgmanager.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"wgmanager.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert modules - named == set(), "add these to a layer in pyproject.toml"
