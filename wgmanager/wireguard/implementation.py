"""Which WireGuard implementation serves a device, told truthfully: for wireguard-go, the
binary the process actually runs, a version that is true, and whether its TUN has offloads.

Why: wireguard-go's speed depends on its build (Debian 12's 0.0.20220316 opens its TUN
without offloads; bookworm-backports' 0.0.20231211 with them, about 3x the throughput
here), and its ``--version`` cannot tell them apart: the backports build prints
v0.0.20230223. When a Debian package owns the file, the package's version is the truth;
otherwise ``--version`` is all there is, and it is labelled as the binary's own claim.
Whether a running device has offloads is read from its TUN (netlink IFLA_TUN_VNET_HDR),
never inferred from a version.

The pure parts (parsing dpkg's and wireguard-go's output, choosing the version, the offload
threshold, the JSON document and its one line of text) are plain functions the unit tests
call; ``binary_version``, ``tun_offloads``, ``module_version`` and ``describe`` do the I/O.
Nothing here raises for a fact it cannot get: that fact is None.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wgmanager.wireguard.backend import BackendKind, WireGuardBackend
from wgmanager.wireguard.userspace import UserspaceBackend, find_wireguard_go

OFFLOADS_SINCE = "0.0.20230223"  # the first wireguard-go release that opens its TUN offloaded
OFFLOAD_FIX = ("install wireguard-go from bookworm-backports (apt-get install -t "
               "bookworm-backports wireguard-go; `make setup` does it): without TUN offloads "
               "it works, at about a third of the throughput")
MODULE_VERSION = Path("/sys/module/wireguard/version")
DELETED = " (deleted)"  # what the kernel appends to /proc/PID/exe when the file was replaced
_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class BinaryVersion:
    """A wireguard-go binary's version and where it came from: ``source`` "dpkg" (the
    version of the package owning the file) or "--version" (the binary's own claim)."""

    version: str | None = None
    source: str | None = None
    package: str | None = None

    def text(self) -> str:
        if self.version is None:
            return "(version unknown)"
        if self.source == "dpkg":
            return f"{self.version} (package {self.package})"
        return f"{self.version} (its --version; no package owns it)"


# -- pure -------------------------------------------------------------------------------


def parse_dpkg_search(output: str, path: str) -> str | None:
    """The package owning ``path`` in ``dpkg-query -S`` output (``pkg[, pkg]: /path``)."""
    for line in output.splitlines():
        if line.startswith("diversion by "):
            continue
        packages, sep, found = line.partition(": ")
        if sep and found.strip() == path:
            return packages.split(",")[0].strip()
    return None


def dpkg_candidates(path: str, resolved: str) -> list[str]:
    """The names dpkg may know a file by: as given and resolved, each with and without the
    /usr prefix (on a merged-/usr system /bin/x is /usr/bin/x; dpkg knows one of them)."""
    out: list[str] = []
    for p in (path, resolved):
        for name in (p, p.removeprefix("/usr") if p.startswith("/usr/") else f"/usr{p}"):
            if name not in out:
                out.append(name)
    return out


def parse_version_output(text: str) -> str | None:
    """``wireguard-go v0.0.20230223`` (first line of ``--version``) -> ``v0.0.20230223``."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    m = re.match(r"wireguard-go\s+(\S+)", lines[0].strip())
    return m.group(1) if m else lines[0].strip()[:80]


def choose_version(package: str | None, package_version: str | None,
                   version_output: str | None) -> BinaryVersion:
    """The package's version when a package owns the binary (``--version`` lies: the
    backports build prints v0.0.20230223); else what ``--version`` claims, labelled so."""
    if package and package_version:
        return BinaryVersion(package_version, "dpkg", package)
    claimed = parse_version_output(version_output or "")
    return BinaryVersion(claimed, "--version") if claimed else BinaryVersion()


def _release(version: str) -> tuple[int, int, int] | None:
    m = re.match(r"(?:\d+:)?v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def offload_support(version: str | None) -> bool | None:
    """Whether a wireguard-go of this version (a package's or ``--version``'s) opens its TUN
    with offloads: from 0.0.20230223 on. None when the version is unknown or unreadable."""
    release = _release(version) if version else None
    threshold = _release(OFFLOADS_SINCE)
    return None if release is None or threshold is None else release >= threshold


def split_exe(link: str) -> tuple[str, bool]:
    """``readlink /proc/PID/exe`` -> (path, replaced): the kernel appends " (deleted)" when
    the file the process runs was removed or replaced (a package upgrade) since it started."""
    if link.endswith(DELETED):
        return link.removesuffix(DELETED), True
    return link, False


def tun_offloads_from_link(msg: Any) -> bool | None:
    """IFLA_TUN_VNET_HDR of a pyroute2 link message (vnet_hdr: the TUN carries offloaded
    GSO/GRO packets); None if the link is not a TUN or the kernel does not say."""
    info = msg.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "tun":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    vnet_hdr = data.get_attr("IFLA_TUN_VNET_HDR") if data is not None else None
    return None if vnet_hdr is None else bool(vnet_hdr)


def userspace_doc(*, pid: int | None, binary: str | None, replaced: bool,
                  running: BinaryVersion, on_disk: BinaryVersion | None,
                  offloads: bool | None) -> dict[str, Any]:
    """The ``implementation`` document of ``status --json`` for wireguard-go.

    ``version`` is the running binary's; when the file was replaced since the process
    started, ``replaced`` is true and ``replaced_by`` is the version now on disk (what a
    restart would run). ``offloads`` is what the live TUN says (None: no device seen).
    """
    return {"kind": BackendKind.USERSPACE.value, "pid": pid, "binary": binary,
            "version": running.version, "version_source": running.source,
            "package": running.package, "replaced": replaced,
            "replaced_by": on_disk.version if replaced and on_disk else None,
            "offloads": offloads}


def kernel_doc(module_version: str | None) -> dict[str, Any]:
    """The ``implementation`` document for kernel WireGuard (the same keys as userspace)."""
    return {"kind": BackendKind.KERNEL.value, "pid": None, "binary": None,
            "version": module_version, "version_source": "module" if module_version else None,
            "package": None, "replaced": False, "replaced_by": None, "offloads": None}


def render(doc: dict[str, Any]) -> str:
    """One line for ``status``'s text output."""
    if doc["kind"] == BackendKind.KERNEL.value:
        version = f"module {doc['version']}" if doc["version"] else "module version unknown"
        return f"wireguard: kernel ({version})"
    if doc["pid"] is None:
        running = "wireguard-go (no process serving the device is visible from here)"
    elif doc["binary"] is None:
        running = f"wireguard-go pid {doc['pid']} (its binary cannot be read from here)"
    else:
        version = BinaryVersion(doc["version"], doc["version_source"], doc["package"]).text()
        running = f"{doc['binary']} {version}, pid {doc['pid']}"
        if doc["replaced"]:
            now = doc["replaced_by"] or "gone"
            running += (f"; replaced on disk since start (now {now}): restart to run the "
                        "new one")
    offloads = {True: "on", False: "off", None: "unknown"}[doc["offloads"]]
    return f"wireguard: userspace, {running}; TUN offloads {offloads}"


# -- I/O --------------------------------------------------------------------------------


def _output(argv: list[str]) -> str | None:
    """stdout of a short command (also when it fails: dpkg-query -S reports what it found),
    or None when it cannot run."""
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")  # a wireguard-go never daemonizes
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                             check=False, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def binary_version(path: str) -> BinaryVersion:
    """The true version of the wireguard-go at ``path`` (dpkg's, else ``--version``'s)."""
    names = dpkg_candidates(path, os.path.realpath(path))
    found = _output(["dpkg-query", "-S", *names]) or ""
    package = next((p for name in names if (p := parse_dpkg_search(found, name))), None)
    package_version = None
    if package is not None:
        package_version = _output(["dpkg-query", "-W", "-f=${Version}", package])
        if package_version:
            package_version = package_version.strip().splitlines()[0]
    if package and package_version:
        return choose_version(package, package_version, None)
    return choose_version(None, None, _output([path, "--version"]))


def tun_offloads(ifname: str) -> bool | None:
    """Whether ``ifname`` (in this network namespace) is a TUN opened with vnet_hdr."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with contextlib.suppress(NetlinkError, OSError), IPRoute() as ipr:
        msgs = ipr.get_links(ifname=ifname)
        return tun_offloads_from_link(msgs[0]) if msgs else None
    return None


def module_version() -> str | None:
    try:
        return MODULE_VERSION.read_text().strip() or None
    except OSError:
        return None


def describe(backend: WireGuardBackend) -> dict[str, Any]:
    """The implementation serving ``backend``'s device, for ``status``."""
    if backend.kind is BackendKind.KERNEL:
        return kernel_doc(module_version())
    pid = (backend.process() if isinstance(backend, UserspaceBackend)
           else find_wireguard_go(backend.ifname))
    binary, replaced, running, on_disk = None, False, BinaryVersion(), None
    if pid is not None:
        with contextlib.suppress(OSError):
            binary, replaced = split_exe(os.readlink(f"/proc/{pid}/exe"))
    if binary is not None and not replaced:
        running = binary_version(binary)
    elif binary is not None:
        # What runs is no longer on disk: only its own claim is left to ask (the kernel
        # still executes the old file through /proc/PID/exe); dpkg knows the new file.
        running = choose_version(None, None, _output([f"/proc/{pid}/exe", "--version"]))
        on_disk = binary_version(binary) if os.path.exists(binary) else None
    return userspace_doc(pid=pid, binary=binary, replaced=replaced,
                         running=running, on_disk=on_disk,
                         offloads=tun_offloads(backend.ifname))
