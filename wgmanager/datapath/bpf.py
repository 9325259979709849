"""Load and attach the steering program (bpf/wg_redirect.c): bcc in a child, pyroute2 here.

One compiled program serves every attach point: ``to_underlay`` on the tc egress of the
uplink and of an overlay CNI's VXLAN/Geneve device, ``to_tunnel_l3`` on the egress of an
IPIP device, and (opt-in) ``from_pod`` on the tc ingress of pod veths (docs/architecture.md
says why steering is at egress). Maps are pinned under a per-node bpffs directory, so a
restarted agent loads a new program onto the same maps and swaps it in with one atomic
``tc filter replace``: no packet sees a missing or empty program.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wgmanager.datapath import libbpf
from wgmanager.datapath.mounts import fstype_of
from wgmanager.errors import DatapathError

log = logging.getLogger(__name__)

TC_PRIORITY = 10  # low number: runs before generic filters others may add on the same hook
TC_HANDLE = 0x57  # "W": our filter's handle, so replace/delete never touch anyone else's
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/wgmanager")
DEFAULT_MAX_CIDRS = 65536
COMPILE_TIMEOUT = 120.0  # seconds; a compile takes ~0.3 s, minutes on a starved machine


class Hook(enum.StrEnum):
    FROM_POD = "from_pod"  # tc ingress of a pod's host-side veth (opt-in fast path)
    TO_UNDERLAY = "to_underlay"  # tc egress of the uplink and of VXLAN/Geneve devices
    TO_TUNNEL_L3 = "to_tunnel_l3"  # tc egress of a tunnel with no link layer (IPIP)

    @property
    def parent(self) -> int:
        return 0xFFFFFFF2 if self is Hook.FROM_POD else 0xFFFFFFF3


@dataclass(frozen=True, slots=True)
class Attachment:
    ifname: str
    hook: Hook
    prog_name: str
    prog_id: int | None


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
    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(default_root)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        reason = " ".join(res.stderr.split())
        raise DatapathError(f"bpffs is not mounted at {default_root} and mounting it failed "
                            f"({reason}); mount it: mount -t bpf bpf {default_root}")


class Program:
    """The loaded functions (one fd per hook) over the pinned maps.

    bcc compiles and loads in a child process (``wgmanager.datapath.compiler``), so this
    process never maps LLVM; the child pins the two functions, we open the pins, remove
    them and keep the fds: attaching is by fd, and the maps are reached through their own
    pins (``wgmanager.datapath.maps``).
    """

    def __init__(self, *, pin_dir: Path = DEFAULT_PIN_DIR,
                 max_cidrs: int = DEFAULT_MAX_CIDRS) -> None:
        self.pin_dir = pin_dir
        ensure_bpffs(pin_dir)
        pin_dir.mkdir(parents=True, exist_ok=True)
        self.fds: dict[Hook, int] = {}
        for stale in pin_dir.glob("load-*"):  # left by a loader killed mid-way
            stale.unlink(missing_ok=True)
        pins = _load_in_child(pin_dir, max_cidrs)
        try:
            for hook in Hook:
                self.fds[hook] = libbpf.obj_get(pins[hook.value])
        except OSError as e:
            self.close()
            raise DatapathError(f"cannot open the loaded program under {pin_dir}: "
                                f"{e.strerror}; run as root (CAP_BPF/CAP_SYS_ADMIN)") from e
        finally:
            for path in pins.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

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
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _load_in_child(pin_dir: Path, max_cidrs: int) -> dict[str, str]:
    """Runs the compiler child; returns hook name -> the pin of its loaded function."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    argv = [sys.executable, "-m", "wgmanager.datapath.compiler", str(pin_dir),
            str(max_cidrs), token]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False,
                             timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise DatapathError(f"compiling the eBPF program took over {COMPILE_TIMEOUT:.0f} s; "
                            "check the machine's load and run `wgmanager doctor`") from e
    lines = res.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if "pins" in reply and res.returncode == 0:
        return dict(reply["pins"])
    if "error" in reply:
        raise DatapathError(str(reply["error"]))
    tail = " ".join((res.stderr or res.stdout).split())[-300:]
    raise DatapathError(f"the eBPF compiler process failed (exit {res.returncode}): {tail}; "
                        "run `wgmanager doctor`")


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
