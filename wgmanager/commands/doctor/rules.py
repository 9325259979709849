"""The doctor's judgements, as pure functions: facts in, a ``Check`` out.

Why separate from ``checks``: that module gathers facts from the kernel, /proc and
the API server; this one decides what they mean (version thresholds, the capability set,
the MTU rule, clock skew, how an API failure reads) and renders the report. Keeping the
decisions free of I/O lets the unit tests pin every threshold and message without root.
"""

from __future__ import annotations

import email.utils
import json
import re
from dataclasses import asdict, dataclass
from typing import Literal

from wgmanager.config import wireguard_mtu
from wgmanager.errors import ConfigError

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")

MIN_KERNEL = (4, 19, 0)  # below: the program cannot load (helpers, clsact, LPM trie)
RECOMMENDED_KERNEL = (5, 10, 0)  # the supported floor (docs/install.md)
MIN_INNER_MTU = 1280  # IPv6's minimum, inside the tunnel
MAX_SKEW = 5.0  # seconds
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
RBAC_FIX = ("check the token/RBAC: the agent needs get/list/watch/patch on nodes "
            "(docs/install.md)")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""  # one line; required for warn and fail

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: unknown status {self.status!r}")
        if self.status != "ok" and not self.fix:
            raise ValueError(f"check {self.name}: a {self.status} needs a fix")
        if "\n" in self.fix or "\n" in self.detail:
            raise ValueError(f"check {self.name}: detail and fix are one line each")


def parse_kernel_version(release: str) -> tuple[int, int, int] | None:
    """``6.18.44-fc-v669`` -> (6, 18, 44); ``5.10-rc1`` -> (5, 10, 0); None if unparsable."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def kernel_check(release: str) -> Check:
    version = parse_kernel_version(release)
    if version is None:
        return Check("kernel", "warn", f"cannot parse the kernel release {release!r}",
                     "make sure the kernel is Linux >= 5.10")
    if version < MIN_KERNEL:
        return Check("kernel", "fail", f"Linux {release} is older than 4.19: the eBPF program "
                     "cannot load", "upgrade the kernel to >= 5.10")
    if version < RECOMMENDED_KERNEL:
        return Check("kernel", "warn", f"Linux {release} is older than 5.10, the supported "
                     "floor", "upgrade the kernel to >= 5.10")
    return Check("kernel", "ok", f"Linux {release}")


def parse_caps(mask: str) -> frozenset[int]:
    """A capability mask as /proc shows it (hex, no 0x) -> the set of capability numbers."""
    value = int(mask, 16)
    return frozenset(bit for bit in range(value.bit_length()) if value >> bit & 1)


def parse_capeff(status_text: str) -> frozenset[int]:
    """The effective capabilities from the text of /proc/<pid>/status."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "CapEff":
            return parse_caps(value.strip())
    raise ValueError("no CapEff line in /proc/self/status")


def capabilities_check(caps: frozenset[int]) -> Check:
    missing = []
    if CAP_NET_ADMIN not in caps:
        missing.append("CAP_NET_ADMIN")
    if CAP_BPF not in caps and CAP_SYS_ADMIN not in caps:
        missing.append("CAP_BPF")
    if CAP_SYS_ADMIN not in caps:
        missing.append("CAP_SYS_ADMIN (bpffs pinning)")
    if missing:
        return Check("capabilities", "fail", f"missing {', '.join(missing)}",
                     "run as root or grant CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN "
                     "(securityContext.capabilities.add)")
    have = [n for n, c in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_BPF", CAP_BPF),
                           ("CAP_SYS_ADMIN", CAP_SYS_ADMIN)) if c in caps]
    return Check("capabilities", "ok", f"effective: {', '.join(have)}")


def wireguard_go_check(binary: str, version: str, offloads: bool | None, reason: str, *,
                       offload_fix: str, offloads_since: str) -> Check:
    """Userspace WireGuard: ``binary`` and ``version`` (a true version, as text) of the
    wireguard-go on PATH, whether that version opens its TUN with offloads, and why the
    kernel's WireGuard is not used. A build without offloads works, slower: a warn."""
    detail = f"userspace: wireguard-go {binary} {version}"
    status: Status = "ok"
    fixes = []
    if offloads is None:
        detail += ", TUN offload support unknown"
        status = "warn"
        fixes.append(offload_fix)
    elif not offloads:
        detail += f", no TUN offloads (older than {offloads_since})"
        status = "warn"
        fixes.append(offload_fix)
    else:
        detail += ", with TUN offloads"
    # Without CAP_NET_ADMIN the probe can find the family but not use it: inconclusive.
    if "CAP_NET_ADMIN" in reason:
        status = "warn"
        fixes.insert(0, "run the doctor as root to tell whether kernel WireGuard is usable")
    return Check("wireguard", status, f"{detail}; {reason}", "; ".join(fixes))


def mtu_check(uplink: str, uplink_mtu: int, family: int, interface: str,
              wg_link_mtu: int | None) -> Check:
    """The MTU rule of docs/architecture.md: pod MTU <= WireGuard MTU = uplink - overhead."""
    wg = wireguard_mtu(uplink_mtu, family)
    other = 6 if family == 4 else 4
    detail = (f"{uplink} MTU {uplink_mtu} -> WireGuard MTU {wg} over IPv{family} "
              f"({wireguard_mtu(uplink_mtu, other)} over IPv{other}); pods must use MTU "
              f"<= {wg}")
    if wg_link_mtu is not None:
        detail += f"; {interface} has MTU {wg_link_mtu}"
    if wireguard_mtu(uplink_mtu, 6) < MIN_INNER_MTU:
        return Check("mtu", "warn", detail, f"raise {uplink}'s MTU to >= "
                     f"{MIN_INNER_MTU + 80}: IPv6 inside the tunnel needs {MIN_INNER_MTU}")
    if wg_link_mtu is not None and wg_link_mtu > wg:
        return Check("mtu", "warn", detail, f"restart the agent (it sets the MTU from the "
                     f"uplink) or pass --mtu <= {wg}: larger packets fragment on the underlay")
    return Check("mtu", "ok", detail)


def udp_inodes(table: str, port: int) -> set[int]:
    """Socket inodes bound to local ``port`` in /proc/net/udp or udp6 (0: a kernel socket)."""
    found = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1]:
            continue
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            found.add(int(fields[9]))
    return found


def api_failure(e: BaseException, *, server: str, where: str) -> Check:
    """How an API call's failure reads: credentials/RBAC, an unhealthy server, or no route."""
    if isinstance(e, ConfigError):
        problem, _, _ = str(e).partition("; ")
        return Check("kube-api", "fail", problem,
                     "pass a valid --kubeconfig, or run in a pod with a service account")
    status = getattr(e, "status", None)
    if isinstance(status, int) and status:
        reason = (getattr(e, "reason", "") or "").strip()
        detail = f"{server} ({where}) answered {status} {reason}".rstrip()
        if status in (401, 403):
            return Check("kube-api", "fail", detail, RBAC_FIX)
        return Check("kube-api", "fail", detail,
                     "check the API server's health (kubectl get --raw /readyz)")
    inner = getattr(e, "reason", None)
    cause = inner if isinstance(inner, BaseException) else e
    text = re.sub(r"<[^>]*>: |\b\w*Connection(Pool)?\([^)]*\): ", "", str(cause))
    detail = f"cannot reach {server} ({where}): {type(cause).__name__}: {' '.join(text.split())}"
    if "SSL" in type(cause).__name__ or "CERTIFICATE" in text:
        return Check("kube-api", "fail", detail,
                     "check the API server's CA (certificate-authority in the kubeconfig)")
    return Check("kube-api", "fail", detail, "check the API address and network (the server "
                 "in the kubeconfig, firewalls, the API server running)")


def clock_skew_check(date_header: str | None, local: float | None) -> Check:
    """``local`` is this machine's time (epoch seconds) when the API's ``Date`` was sent."""
    if date_header is None or local is None:
        return Check("clock-skew", "warn", "not measured: no answer from the API server",
                     "make the kube-api check pass to compare clocks")
    try:
        server = email.utils.parsedate_to_datetime(date_header).timestamp() + 0.5
    except (TypeError, ValueError):
        return Check("clock-skew", "warn", f"not measured: unreadable Date {date_header!r}",
                     "compare `date -u` with the API server's clock by hand")
    skew = local - server  # Date has 1 s resolution: +0.5 is the middle of its second
    side = "ahead of" if skew > 0 else "behind"
    detail = f"local clock {abs(skew):.1f} s {side} the API server (HTTP Date, 1 s resolution)"
    if abs(skew) > MAX_SKEW:
        return Check("clock-skew", "warn", detail, "sync the clock (chrony or systemd-timesyncd)"
                     ": WireGuard handshakes tolerate skew, certificates and tokens do not")
    return Check("clock-skew", "ok", detail)


def exit_code(results: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in results) else 0


def to_json(results: list[Check]) -> str:
    return json.dumps([asdict(c) for c in results], indent=2)


def render(results: list[Check]) -> str:
    shown = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    width = max([len("CHECK"), *(len(c.name) for c in results)])
    lines = [f"{'CHECK'.ljust(width)}  STATUS  DETAIL"]
    for c in results:
        lines.append(f"{c.name.ljust(width)}  {shown[c.status].ljust(6)}  {c.detail}")
        if c.fix:
            lines.append(f"{''.ljust(width)}          fix: {c.fix}")
    counts = {s: sum(c.status == s for c in results) for s in STATUSES}
    verdict = ("fix the failed checks: wgmanager cannot work on this node" if counts["fail"]
               else "this node can run wgmanager")
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail: {verdict}")
    return "\n".join(lines)
