"""One translation of kernel errors into "what went wrong; how to fix it".

Why: the same errno means different things depending on where it came from. EPERM from
bpf() is a missing capability, EACCES while loading a program is the verifier saying no,
ENOENT from a generic netlink family lookup means the kernel has no WireGuard. The datapath
loader, the doctor and anything else that meets a kernel error use this one table, so a
given failure reads the same, with the same fix, wherever it shows up.

``context`` names where the error came from; the known ones are in ``CONTEXTS``. Any other
string is taken as a description of the operation and only the generic rules apply.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

ENOTSUPP = 524  # the kernel-internal "not supported" that bpf() leaks to user space

CONTEXTS: dict[str, str] = {
    "bpf": "the bpf() syscall failed",
    "bpf-compile": "cannot compile the eBPF program",
    "bpf-load": "cannot load the eBPF program",
    "bpf-pin": "cannot pin or open BPF objects",
    "bpf-attach": "cannot attach the eBPF program",
    "netlink-family": "kernel WireGuard unavailable",
    "link": "network device operation failed",
}

CAPABILITY_FIX = ("run as root or grant CAP_BPF+CAP_NET_ADMIN (and CAP_SYS_ADMIN for bpffs "
                  "pinning)")
HEADERS_FIX = ("install linux-headers for this kernel (or Debian's linux-headers-amd64) and "
               "link /lib/modules/$(uname -r)/build to them (make setup does it)")
VERIFIER = "the kernel's BPF verifier rejected the program (kernel too old?)"
VERIFIER_FIX = "wgmanager needs Linux >= 5.10 with BPF and clsact; run `wgmanager doctor`"
WIREGUARD_FALLBACK = ("the kernel has no 'wireguard' generic netlink family (built without "
                      "WireGuard, or the module is not loaded)")
WIREGUARD_FALLBACK_FIX = ("the userspace backend (wireguard-go) works without it: apt-get "
                          "install wireguard-go, or modprobe wireguard where it is a module")

# Lines of a verifier log (bcc prints it to stderr after a rejected load).
_VERIFIER_MARKS = re.compile(r"processed \d+ insns|invalid (mem|access|indirect|bpf_context|"
                             r"read|write|size|stack|func)|unreachable insn|"
                             r"back-edge|R\d+ !read_ok|verifier")
# Texts that carry an errno by its strerror, checked in this order (most specific first).
_NAMED = (errno.EPERM, errno.EACCES, errno.ENODEV, errno.ENOENT, errno.EBUSY, errno.EEXIST,
          errno.EINVAL, errno.ENOMEM, errno.E2BIG, errno.EOPNOTSUPP, errno.EADDRINUSE)


@dataclass(frozen=True, slots=True)
class Explanation:
    problem: str  # "<where>: <what happened>"
    fix: str  # one line

    def __str__(self) -> str:
        return f"{self.problem}; {self.fix}"


def explain_kernel_error(e: BaseException | str, *, context: str,
                         device: str | None = None) -> str:
    """One line, ``<where>: <what happened>; <fix>``."""
    return str(explain(e, context=context, device=device))


def explain(e: BaseException | str, *, context: str, device: str | None = None) -> Explanation:
    """The problem and the fix apart, for callers that show them separately (the doctor)."""
    text = _text(e)
    code = error_code(e)
    where = CONTEXTS.get(context, context)
    bpf = context.startswith("bpf")

    if "Unable to find kernel headers" in text:
        return Explanation(f"{where}: bcc found no kernel headers", HEADERS_FIX)
    if code == errno.EPERM and bpf:
        what = ("creating its BPF maps is not permitted" if context == "bpf-compile"
                else "operation not permitted")
        return Explanation(f"{where}: {what}", CAPABILITY_FIX)
    if (code == errno.EACCES and context == "bpf-load") or (bpf and _VERIFIER_MARKS.search(text)):
        return Explanation(f"{where}: {VERIFIER}", VERIFIER_FIX)
    if code == errno.EACCES and bpf:
        return Explanation(f"{where}: permission denied", CAPABILITY_FIX)
    if code == errno.EINVAL and context == "bpf-load":
        return Explanation(f"{where}: the kernel rejected the program as invalid (kernel too "
                           "old for a helper it uses?)", VERIFIER_FIX)
    if code == errno.ENOENT and context == "netlink-family":
        return Explanation(f"{where}: {WIREGUARD_FALLBACK}", WIREGUARD_FALLBACK_FIX)
    if code == errno.ENODEV or "No such device" in text:
        name = f"device {device}" if device else "the network device"
        return Explanation(f"{where}: {name} does not exist",
                           "check the name with `ip link` (or create the device first)")
    if code == errno.ENOENT and context == "bpf-pin":
        return Explanation(f"{where}: nothing is pinned there", "start the agent (it pins the "
                           "maps) or check --pin-dir")
    if code == errno.EBUSY:
        return Explanation(f"{where}: the resource is busy (held by another program or tool)",
                           "find the holder (bpftool net show, ip link) and retry")
    if code == errno.EEXIST:
        return Explanation(f"{where}: it already exists (left over from an earlier run?)",
                           "remove it (wgmanager teardown) or reuse it")
    if code in (errno.ENOMEM, errno.E2BIG) and bpf:
        return Explanation(f"{where}: the kernel refused the memory",
                           "lower --max-cidrs, or raise RLIMIT_MEMLOCK (ulimit -l) on kernels "
                           "older than 5.11")
    if code in (errno.EOPNOTSUPP, ENOTSUPP) and bpf:
        return Explanation(f"{where}: the kernel does not support a BPF feature the program "
                           "needs", VERIFIER_FIX)
    if code == errno.EADDRINUSE:
        return Explanation(f"{where}: the address or port is in use",
                           "free it or choose another --listen-port")
    if code in (errno.EPERM, errno.EACCES):
        return Explanation(f"{where}: {os.strerror(code).lower()}",
                           "run as root or with CAP_NET_ADMIN")
    fix = ("run `wgmanager doctor` to check the kernel headers and BPF support"
           if bpf else "see the kernel log (dmesg) for details")
    return Explanation(f"{where}: {_summary(text)}", fix)


# WireGuard's generic netlink requests (wgmanager.wireguard.kernel), where the fix depends on
# the request: errnos not listed here get explain()'s general fix.
WIREGUARD_FIXES: dict[int, str] = {
    errno.ENODEV: "the device does not exist (deleted underneath us?); create it again",
    errno.EOPNOTSUPP: "it is not a kernel WireGuard link, or the kernel cannot make one; "
                      "check `ip -d link show {ifname}`",
    errno.EEXIST: "a link with that name already exists; check `ip -d link show {ifname}`",
    errno.EADDRINUSE: "another socket holds the listen port; free it or choose another port",
    errno.EINVAL: "the kernel rejected a value (port, allowed IP or interface name)",
    errno.ENOENT: "the wireguard netlink family is gone (module unloaded?); restart wgmanager",
    errno.ENOMEM: "the kernel is short of memory; retry",
    errno.ENOBUFS: "the kernel is short of buffer space; retry",
}


def describe_wireguard_failure(ifname: str, operation: str, code: int) -> str:
    """The one-line DeviceError message for a failed WireGuard netlink request."""
    fix = WIREGUARD_FIXES.get(code)
    if fix is None:
        fix = explain(OSError(code, os.strerror(code)), context="wireguard", device=ifname).fix
    return (f"WireGuard device {ifname}: {operation} failed:"
            f" {os.strerror(code)} [errno {code}]; {fix.format(ifname=ifname)}")


def error_code(e: BaseException | str) -> int | None:
    """The errno an exception or message carries: OSError.errno, pyroute2's NetlinkError.code,
    or a strerror text ("Operation not permitted") inside the message."""
    if isinstance(e, BaseException):
        for attr in ("errno", "code"):
            value = getattr(e, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    text = _text(e)
    for code in _NAMED:
        if os.strerror(code) in text:
            return code
    match = re.search(r"\b(E[A-Z0-9]{2,})\b", text)
    if match and isinstance(getattr(errno, match.group(1), None), int):
        return int(getattr(errno, match.group(1)))
    return None


def _text(e: BaseException | str) -> str:
    if isinstance(e, str):
        return e
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename is None else f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def _summary(text: str) -> str:
    """The most telling line of a multi-line message, whitespace collapsed."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    best = next((ln for ln in lines if "error:" in ln), lines[0] if lines else "unknown error")
    return " ".join(best.split())
