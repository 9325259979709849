"""Boots the kernel lane's VM and runs one shell command in it (host side).

Why a VM: this machine's kernel has no WireGuard, and kernel WireGuard is what most nodes
run. The image (Debian's 6.1 kernel, a Debian root filesystem with bcc and that kernel's
headers) is built and cached by scripts/build-vm.sh, which `make setup` runs. The host's
KVM is PVM and crashes a stock kernel, so the VM runs under software emulation (TCG):
correct, about 25x slower than the host, and no measure of throughput.

The VM has no network device. The project directory is shared read-only at the same path
(with a tmpfs overlay, so tests may write), which makes the project's .venv work inside:
it runs on the guest's own python3 (the same Debian build) and sees the guest's bcc.
The command's output streams to the console log; its exit status comes back through a
small writable share. Everything made here (the qemu process, the share) is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
# KVM here is PVM: a stock kernel dies "emulating" cmpxchg16b. qemu64 beat `-cpu max` on TCG.
ACCEL = ["-accel", "tcg,thread=multi", "-cpu", "qemu64"]
MEMORY_MB = 2048
CPUS = 2
# Where the host's lane test leaves the in-VM pytest summary for the terminal report.
SUMMARY = pytest.StashKey[list[str]]()


@dataclass(frozen=True, slots=True)
class VmRun:
    """What a run left: the command's exit status (None when the VM ended without one: a
    guest crash or the timeout), its output, the whole console, and the time it took."""

    returncode: int | None
    output: str
    console: str
    seconds: float


def image() -> Path:
    """The cached image directory; builds it first when missing (as `make setup` does)."""
    res = subprocess.run(["bash", str(PROJECT / "scripts" / "build-vm.sh")],
                         capture_output=True, text=True, check=False, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"scripts/build-vm.sh failed: {res.stderr.strip()[-2000:]}; "
                           "run `make setup` as root")
    return Path(res.stdout.strip().splitlines()[-1])


def _share(path: Path, tag: str, *, readonly: bool) -> list[str]:
    opts = f"local,path={path},mount_tag={tag},security_model=none"
    return ["-virtfs", opts + (",readonly=on" if readonly else "")]


def qemu_argv(img: Path, out: Path, project: Path = PROJECT) -> list[str]:
    cmdline = (f"console=ttyS0 panic=-1 mitigations=off quiet loglevel=4 "
               f"wgm.project={project}")
    return [QEMU, *ACCEL, "-smp", str(CPUS), "-m", str(MEMORY_MB), "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(img / "vmlinux"), "-initrd", str(img / "initramfs.gz"),
            "-append", cmdline,
            *_share(img / "rootfs", "rootfs", readonly=True),
            *_share(project, "project", readonly=True),
            *_share(out, "out", readonly=False)]


def run(command: str, *, timeout: float, img: Path | None = None,
        console_log: Path | None = None) -> VmRun:
    """Boots the VM, runs ``command`` with /bin/sh in the project directory, powers off.

    ``console_log`` keeps the console (kernel messages and the command's output) as it is
    written; the default is a file in the temporary share, removed afterwards.
    """
    if shutil.which(QEMU) is None:
        raise RuntimeError(f"{QEMU} is missing: run `make setup` as root")
    img = img or image()
    out = Path(tempfile.mkdtemp(prefix="wgm-vm-"))
    log_path = console_log or out / "console"
    started = time.monotonic()
    try:
        (out / "cmd").write_text(command + "\n")
        with open(log_path, "w") as console:
            proc = subprocess.Popen(qemu_argv(img, out), stdin=subprocess.DEVNULL,
                                    stdout=console, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        rc_file = out / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
        output = (out / "log").read_text(errors="replace") if (out / "log").exists() else ""
        return VmRun(rc, output, log_path.read_text(errors="replace"),
                     time.monotonic() - started)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def in_vm() -> bool:
    """Whether this process runs inside the kernel lane's VM (guest.sh sets the hostname)."""
    return os.uname().nodename == "wgm-vm"
