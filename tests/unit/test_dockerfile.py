"""deploy/Dockerfile, which cannot be built here (no container engine): linted by hadolint,
read for what it installs, and its `pip install` step reproduced on exactly the files the
build context lets in, to prove the package it installs carries the eBPF program's source."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# What the agent, its sidecar and the chart's containers run in the image.
IMAGE_PACKAGES = {"python3", "python3-venv", "python3-bpfcc", "wireguard-tools", "iproute2"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def test_hadolint_finds_nothing() -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing; run `make setup` (it installs the test extras)",
                    pytrace=False)
    res = subprocess.run([hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert json.loads(res.stdout or "[]") == [], res.stdout
    assert res.returncode == 0, res.stderr


def test_debian_12_with_the_packages_the_node_tests_use() -> None:
    steps = instructions()
    assert [args for kw, args in steps if kw == "FROM"] == ["debian:bookworm-slim"]
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    apt = re.search(r"apt-get install -y --no-install-recommends (.*?) &&", runs)
    assert apt is not None
    installed = set(shlex.split(apt.group(1)))
    assert installed >= IMAGE_PACKAGES
    assert "bcc" not in re.findall(r"pip install (\S+)", runs)  # PyPI's bcc is unrelated
    # the same Debian packages scripts/setup.sh installs on the machines the tests run on
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    listed = re.search(r"APT_PACKAGES=\((.*?)\n\)", setup, re.S)
    assert listed is not None
    setup_packages = {word for line in listed.group(1).splitlines()
                      for word in line.split("#")[0].split()}
    assert IMAGE_PACKAGES - {"python3"} <= setup_packages


def test_wireguard_go_is_the_backports_build_make_setup_pins() -> None:
    """The image runs the same wireguard-go the tests and benchmarks ran (TUN offloads)."""
    runs = " ".join(args for kw, args in instructions() if kw == "RUN")
    pinned = re.search(r'VERSION="\$\{WG_GO_VERSION:-(\S+?)\}"',
                       (ROOT / "scripts" / "install-wireguard-go.sh").read_text())
    assert pinned is not None
    assert "bookworm-backports main" in runs
    assert re.search(r"-t bookworm-backports\s+wireguard-go=" + re.escape(pinned.group(1)),
                     runs), runs


def test_the_venv_sees_debians_bcc_and_is_the_entrypoint() -> None:
    steps = instructions()
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert "python3 -m venv --system-site-packages /opt/wgmanager" in runs
    assert "/opt/wgmanager/bin/pip install --no-cache-dir /src" in runs
    assert "import bcc" in runs  # the build itself fails if the venv cannot see bcc
    assert dict(steps)["ENTRYPOINT"] == '["/opt/wgmanager/bin/wgmanager"]'
    assert "USER" not in dict(steps)  # root: the agent configures the node


def context_files() -> list[str]:
    """The COPY sources, checked against the allow-list in .dockerignore."""
    sources = []
    for kw, args in instructions():
        if kw == "COPY":
            sources += args.split()[:-1]
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "the .dockerignore is an allow-list"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert any(fnmatch.fnmatch(src, a) for a in allowed), f"{src} is not in .dockerignore"
    return sources


def test_pip_install_of_the_build_context_ships_the_ebpf_source(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for src in context_files():
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, context / src, symlinks=True,  # COPY keeps symlinks
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, context / src)
    assert (context / "wgmanager" / "datapath" / "bpf_src").is_symlink()
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "--no-cache-dir", "-q", "-w",
                          str(tmp_path / "dist"), str(context)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("wgmanager-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wgmanager/datapath/bpf_src/wg_redirect.c" in names
    assert "wgmanager/wireguard/supervisor.py" in names
    assert not any(n.startswith("tests/") for n in names)
