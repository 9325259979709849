"""The doctor's network and cluster probes: uplink and MTU, forwarding sysctls, the
WireGuard listen port, and the API server (reachability, credentials, its clock).

Why apart from ``checks``: these look outward (routes, sockets of other processes,
a remote server) where the rest look at the kernel's BPF and WireGuard support; each half
stays small enough to read at once. Like the rest of the doctor, nothing here raises on
purpose and nothing is changed: the API gets one attempt per call with a 5 s timeout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from wgmanager.commands.doctor.rules import Check, api_failure, mtu_check, udp_inodes
from wgmanager.kernel_errors import explain

API_TIMEOUT = 5.0


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def check_mtu(uplink: str | None, interface: str) -> Check:
    from wgmanager.datapath import links

    with links.iproute() as ipr:
        name = uplink or _default_uplink(ipr)
        if name is None:
            return Check("mtu", "warn", "no default route and no UP device with IPv4",
                         "pass --uplink (the device holding the node's InternalIP)")
        link = links.get_link(ipr, name)
        if link is None:
            why = explain("No such device", context="uplink", device=name)
            return Check("mtu", "fail", why.problem, "pass --uplink with an existing device")
        has_v4 = bool(ipr.get_addr(family=socket.AF_INET, index=link.index))
        wg_link = links.get_link(ipr, interface)
    return mtu_check(name, link.mtu, 4 if has_v4 else 6, interface,
                     wg_link.mtu if wg_link else None)


def _default_uplink(ipr: Any) -> str | None:
    """The device of the default route (IPv4 first), holding its source address if it names
    one; else the first non-loopback UP device with an IPv4 address."""
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_default_routes(family=family):
            src = route.get_attr("RTA_PREFSRC")
            if src:
                owner = next((a["index"] for a in ipr.get_addr(family=family)
                              if a.get_attr("IFA_ADDRESS") == src), None)
                if owner in names:
                    return str(names[owner])
            oif = route.get_attr("RTA_OIF")
            if oif is None and route.get_attr("RTA_MULTIPATH"):
                oif = route.get_attr("RTA_MULTIPATH")[0]["oif"]
            if oif in names:
                return str(names[oif])
    for m in ipr.get_links():
        if m["flags"] & 1 and not m["flags"] & 8 and ipr.get_addr(family=socket.AF_INET,
                                                                  index=m["index"]):
            return str(m.get_attr("IFLA_IFNAME"))  # UP (0x1) and not LOOPBACK (0x8)
    return None


def check_ip_forward() -> Check:
    v4 = _read("/proc/sys/net/ipv4/ip_forward")
    v6 = "?"
    with contextlib.suppress(OSError):
        v6 = _read("/proc/sys/net/ipv6/conf/all/forwarding")
    detail = f"net.ipv4.ip_forward={v4}, net.ipv6.conf.all.forwarding={v6}"
    if v4 == "0":
        return Check("ip-forward", "warn", detail, "the agent sets it; pods need forwarding "
                     "(sysctl -w net.ipv4.ip_forward=1 to set it now)")
    return Check("ip-forward", "ok", detail)


def check_rp_filter() -> Check:
    names = {"0": "off", "1": "strict", "2": "loose"}
    values = {k: _read(f"/proc/sys/net/ipv4/conf/{k}/rp_filter") for k in ("all", "default")}
    shown = ", ".join(f"{k}={v} ({names.get(v, '?')})" for k, v in values.items())
    return Check("rp-filter", "ok", f"{shown}; strict is fine: the agent sets loose on its "
                 "own device")


def check_api(kubeconfig: Path | None, in_cluster: bool, out: dict[str, Any]) -> Check:
    """GET /version (reachability, server time) and a one-item Node list (credentials)."""
    if kubeconfig is None and not in_cluster:
        return Check("kube-api", "warn", "skipped: no kubeconfig and not in a cluster",
                     "pass --kubeconfig or set KUBECONFIG to check the API server")
    import json

    from kubernetes import client as k8s

    from wgmanager.kube.client import load_api

    where = str(kubeconfig) if kubeconfig else "in-cluster config"
    cfg = None
    try:
        loaded = load_api(kubeconfig)
        loaded.close()  # type: ignore[no-untyped-call]
        cfg = loaded.configuration
        cfg.retries = 0  # one attempt each: the doctor reports, the agent retries
        with k8s.ApiClient(cfg) as api:
            sent = time.time()
            version_api: Any = k8s.VersionApi(api)  # raw response: its annotation says not
            resp = version_api.get_code(_preload_content=False, _request_timeout=API_TIMEOUT)
            out["local"] = (sent + time.time()) / 2
            out["date"] = resp.headers.get("Date")
            version = json.loads(resp.data).get("gitVersion", "?")
            k8s.CoreV1Api(api).list_node(limit=1, _preload_content=False,
                                         _request_timeout=API_TIMEOUT)
    except Exception as e:
        return api_failure(e, server=cfg.host if cfg else "the API server", where=where)
    return Check("kube-api", "ok", f"{cfg.host} ({where}): Kubernetes {version}, "
                 "listing nodes allowed")


def check_listen_port(port: int, interface: str, socket_dir: Path) -> Check:
    from wgmanager.wireguard.userspace import UserspaceBackend, serves_device

    inodes: set[int] = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError):
            inodes |= udp_inodes(Path(table).read_text(), port)
    if not inodes:
        return Check("listen-port", "ok", f"UDP {port} is free")
    owners = _socket_owners(inodes)
    ours = UserspaceBackend(interface, socket_dir=socket_dir).pid()
    foreign = {pid: comm for pid, (comm, argv) in owners.items()
               if not (pid == ours or serves_device(comm, argv, interface))}
    if owners and not foreign:
        pids = ", ".join(str(p) for p in sorted(owners))
        return Check("listen-port", "ok", f"UDP {port} is held by our wireguard-go for "
                     f"{interface} (pid {pids})")
    if foreign:
        who = ", ".join(f"{comm} (pid {pid})" for pid, comm in sorted(foreign.items()))
    elif 0 in inodes:  # a socket the kernel opened: kernel WireGuard, VXLAN, ...
        from wgmanager.datapath import links

        with links.iproute() as ipr:
            link = links.get_link(ipr, interface)
        if link is not None and link.kind == "wireguard":
            return Check("listen-port", "ok", f"UDP {port} is held by a kernel socket; "
                         f"{interface} is a kernel WireGuard device (presumably its port)")
        who = "a kernel socket (another WireGuard device or a tunnel?)"
    else:
        who = "a process this user cannot see"
    return Check("listen-port", "warn", f"UDP {port} is in use by {who}",
                 "stop it or choose another --listen-port")


def _socket_owners(inodes: set[int]) -> dict[int, tuple[str, list[str]]]:
    """pid -> (comm, argv) of every process holding one of the socket inodes."""
    wanted = {f"socket:[{i}]" for i in inodes if i}
    found: dict[int, tuple[str, list[str]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in wanted for fd in (proc / "fd").iterdir()):
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                found[int(proc.name)] = ((proc / "comm").read_text().strip(), argv)
    return found
