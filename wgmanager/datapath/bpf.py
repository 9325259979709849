"""Build, load and attach the steering program (bpf/wg_redirect.c) with bcc and pyroute2.

One compiled program serves every attach point: ``from_pod`` on the tc ingress of each pod's
host-side veth, ``to_underlay`` on the tc egress of the uplink (see docs/architecture.md for
why both). Maps are pinned under a per-node bpffs directory, so a restarted agent loads a new
program onto the same maps and swaps it in with one atomic ``tc filter replace``: no packet
sees a missing or empty program.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wgmanager.datapath.mounts import fstype_of
from wgmanager.errors import DatapathError
from wgmanager.kernel_errors import explain_kernel_error

log = logging.getLogger(__name__)

TC_PRIORITY = 10  # low number: runs before generic filters others may add on the same hook
TC_HANDLE = 0x57  # "W": our filter's handle, so replace/delete never touch anyone else's
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/wgmanager")
DEFAULT_MAX_CIDRS = 65536


class Hook(enum.StrEnum):
    FROM_POD = "from_pod"  # tc ingress of a pod's host-side veth
    TO_UNDERLAY = "to_underlay"  # tc egress of the node's uplink

    @property
    def parent(self) -> int:
        return 0xFFFFFFF2 if self is Hook.FROM_POD else 0xFFFFFFF3


@dataclass(frozen=True, slots=True)
class Attachment:
    ifname: str
    hook: Hook
    prog_name: str
    prog_id: int | None


def program_source() -> str:
    src = resources.files("wgmanager.datapath").joinpath("bpf_src/wg_redirect.c")
    return src.read_text()


def ensure_bpffs(pin_dir: Path, *, default_root: Path = Path("/sys/fs/bpf")) -> None:
    """Pinning needs the pin directory on a bpffs that outlives this process.

    bpffs is not always mounted (it is not on this project's CI machine). We mount it only
    at its standard place; anywhere else is the operator's choice and only checked.
    """
    if fstype_of(pin_dir) == "bpf":
        return
    if not pin_dir.is_relative_to(default_root) or os.path.ismount(default_root):
        raise DatapathError(f"pin directory {pin_dir} is not on a bpffs; mount one "
                            f"(mount -t bpf bpf {default_root}) or choose --pin-dir under it")
    import subprocess

    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(default_root)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        reason = " ".join(res.stderr.split())
        raise DatapathError(f"bpffs is not mounted at {default_root} and mounting it failed "
                            f"({reason}); mount it: mount -t bpf bpf {default_root}")


class Program:
    """The compiled program, its loaded functions and its pinned maps."""

    def __init__(self, *, pin_dir: Path = DEFAULT_PIN_DIR,
                 max_cidrs: int = DEFAULT_MAX_CIDRS) -> None:
        self.pin_dir = pin_dir
        ensure_bpffs(pin_dir)
        pin_dir.mkdir(parents=True, exist_ok=True)
        self._bpf = _compile(pin_dir, max_cidrs)
        self.fds: dict[Hook, int] = {}
        for hook in Hook:
            try:
                fn = self._bpf.load_func(hook.value.encode(), self._bpf.SCHED_CLS)
            except Exception as e:
                raise DatapathError(_explain_load_error(str(e))) from e
            self.fds[hook] = fn.fd

    def attach(self, ipr: IPRoute, ifname: str, hook: Hook) -> None:
        """Attaches or atomically replaces our filter on ``ifname``'s hook."""
        idx = _ifindex(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: clsact already there (ours or someone else's)
                raise DatapathError(f"cannot add clsact qdisc on {ifname}: {e.args[1]}") from e
        try:
            ipr.tc("replace-filter", "bpf", idx, TC_HANDLE, fd=self.fds[hook], name=hook.value,
                   parent=hook.parent, prio=TC_PRIORITY, classid=1, direct_action=True)
        except NetlinkError as e:
            raise DatapathError(f"cannot attach {hook.value} to {ifname}: {e.args[1]}; "
                                "check CAP_NET_ADMIN and that the device exists") from e
        log.info("datapath attached", extra={"ifname": ifname, "hook": hook.value})

    def close(self) -> None:
        """Releases our references; attached filters and pinned maps stay in the kernel."""
        self._bpf.cleanup()


def detach(ipr: IPRoute, ifname: str, hook: Hook) -> bool:
    """Removes our filter from a hook; returns False if it was not there."""
    try:
        idx = _ifindex(ipr, ifname)
        ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=hook.parent, prio=TC_PRIORITY)
    except (NetlinkError, DatapathError):
        return False
    return True


def attachments(ipr: IPRoute, ifname: str) -> list[Attachment]:
    """Our filters on ``ifname`` as the kernel reports them."""
    try:
        idx = _ifindex(ipr, ifname)
    except DatapathError:
        return []
    found: list[Attachment] = []
    for hook in Hook:
        try:
            msgs = ipr.get_filters(index=idx, parent=hook.parent)
        except NetlinkError:
            continue
        for msg in msgs:
            if msg.get_attr("TCA_KIND") != "bpf" or msg["info"] >> 16 != TC_PRIORITY:
                continue
            opts = msg.get_attr("TCA_OPTIONS")
            if opts is None:
                continue
            name = opts.get_attr("TCA_BPF_NAME") or ""
            if name.split(":")[0] != hook.value:
                continue
            found.append(Attachment(ifname, hook, name, opts.get_attr("TCA_BPF_ID")))
    return found


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise DatapathError(f"network device {ifname!r} does not exist")
    return int(links[0])


def _compile(pin_dir: Path, max_cidrs: int) -> Any:
    try:
        from bcc import BPF
    except ImportError as e:
        raise DatapathError("the bcc Python module is missing; install Debian's python3-bpfcc "
                            "(the PyPI package named 'bcc' is unrelated)") from e
    headers = Path("/lib/modules") / platform.release() / "build"
    if not headers.exists():
        raise DatapathError(f"kernel headers for bcc are missing ({headers} does not exist); "
                            "install linux-headers and link them there (make setup does it)")
    cflags = [f'-DWGM_PIN_DIR="{pin_dir}"', f"-DWGM_MAX_CIDRS={max_cidrs}",
              "-Wno-unused-value", "-Wno-pointer-sign", "-Wno-compare-distinct-pointer-types"]
    with _quiet_stderr() as captured:
        try:
            # bcc wants bytes: a str works but warns with the whole C source on every load.
            return BPF(text=program_source().encode(), cflags=cflags)
        except Exception as e:
            raise DatapathError(_explain_compile_error(str(e), captured())) from e


def _explain_compile_error(message: str, stderr: str) -> str:
    # bcc's exception says only "Failed to compile"; the cause is in its (captured) stderr.
    return explain_kernel_error(f"{message}\n{stderr}", context="bpf-compile")


def _explain_load_error(message: str) -> str:
    return explain_kernel_error(message, context="bpf-load")


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """bcc prints compiler output to fd 2; capture it so errors become one clear line."""
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        restored = False

        def read() -> str:
            nonlocal restored
            if not restored:
                os.dup2(saved, 2)
                restored = True
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield read
        finally:
            if not restored:
                os.dup2(saved, 2)
            os.close(saved)
