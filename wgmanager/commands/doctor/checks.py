"""`wgmanager doctor`: can this node run wgmanager, and if not, what exactly to fix.

Why: the agent needs a dozen things from the node (a recent kernel, the BPF syscall and
bpffs, kernel headers for bcc, a WireGuard implementation, capabilities, a sane MTU, the
API server). When one is missing the agent fails at the first; the doctor looks at all of
them at once, before install or when encryption misbehaves, and gives one line of fix each.

Rules: every check is a small function returning a ``Check``; none raises (an unexpected
error becomes a ``fail`` carrying the error text). A check that could not run is a ``warn``,
never an ``ok``: the report does not vouch for what it did not see. ``fail`` means the agent
cannot work here; ``run`` exits 1 when any check failed. Nothing here changes the node: the
pin-dir probe and the test compile use temporary bpffs directories that they remove.

The pure parts (version and capability parsing, the MTU rule, rendering) are in
``wgmanager.commands.doctor.rules``, where the unit tests reach them without a kernel; the network
and API probes are in ``wgmanager.commands.doctor.net``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wgmanager import config
from wgmanager.commands.doctor.net import (
    check_api,
    check_ip_forward,
    check_listen_port,
    check_mtu,
    check_rp_filter,
)
from wgmanager.commands.doctor.rules import (
    CAP_NET_ADMIN,
    Check,
    capabilities_check,
    clock_skew_check,
    exit_code,
    kernel_check,
    parse_capeff,
    render,
    to_json,
    wireguard_go_check,
)
from wgmanager.datapath.mounts import fstype_at, propagation_at
from wgmanager.kernel_errors import explain

__all__ = ["Check", "add_arguments", "checks", "exit_code", "render", "run", "to_json"]

BPFFS_ROOT = Path("/sys/fs/bpf")
# bpf(2) by architecture; elsewhere libbpf's wrapper is used.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    env_kubeconfig = os.environ.get("KUBECONFIG")
    p.add_argument("--json", action="store_true", help="a JSON list of checks")
    p.add_argument("--kubeconfig", type=Path,
                   default=Path(env_kubeconfig) if env_kubeconfig else None,
                   help="check the API with this kubeconfig (default: $KUBECONFIG, else "
                        "in-cluster config when KUBERNETES_SERVICE_HOST is set)")
    p.add_argument("--interface", default=config.DEFAULT_IFNAME,
                   help="WireGuard interface name (default %(default)s)")
    p.add_argument("--uplink", default=None,
                   help="underlay device (default: the device of the default route)")
    p.add_argument("--socket-dir", type=Path, default=config.DEFAULT_SOCKET_DIR,
                   help="wireguard-go UAPI socket directory (default %(default)s)")
    p.add_argument("--pin-dir", type=Path, default=config.DEFAULT_PIN_DIR,
                   help="bpffs directory for the datapath maps (default %(default)s)")
    p.add_argument("--listen-port", type=int, default=config.DEFAULT_LISTEN_PORT,
                   help="WireGuard UDP port (default %(default)s)")
    p.add_argument("--skip-compile", action="store_true",
                   help="skip the test compile and load of the eBPF program (bcc)")


def run(args: argparse.Namespace) -> int:
    in_cluster = args.kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    results = checks(interface=args.interface, uplink=args.uplink, socket_dir=args.socket_dir,
                     pin_dir=args.pin_dir, listen_port=args.listen_port,
                     kubeconfig=args.kubeconfig, in_cluster=in_cluster,
                     skip_compile=args.skip_compile)
    print(to_json(results) if args.json else render(results))
    return exit_code(results)


def checks(*, interface: str = config.DEFAULT_IFNAME, uplink: str | None = None,
           socket_dir: Path = config.DEFAULT_SOCKET_DIR,
           pin_dir: Path = config.DEFAULT_PIN_DIR,
           listen_port: int = config.DEFAULT_LISTEN_PORT, kubeconfig: Path | None = None,
           in_cluster: bool = False, skip_compile: bool = False) -> list[Check]:
    api: dict[str, Any] = {}  # what the kube-api check saw, for the clock check
    return [
        _guard("kernel", lambda: kernel_check(platform.release())),
        _guard("bpf-syscall", check_bpf_syscall),
        _guard("bpf-jit", check_bpf_jit),
        _guard("bpffs", check_bpffs),
        _guard("bpffs-propagation", check_bpffs_propagation),
        _guard("pin-dir", lambda: check_pin_dir(pin_dir)),
        _guard("wireguard", check_wireguard),
        _guard("tun", check_tun),
        _guard("kernel-headers", check_headers),
        _guard("bpf-compile", lambda: check_compile(skip_compile)),
        _guard("capabilities",
               lambda: capabilities_check(parse_capeff(_read("/proc/self/status")))),
        _guard("mtu", lambda: check_mtu(uplink, interface)),
        _guard("ip-forward", check_ip_forward),
        _guard("rp-filter", check_rp_filter),
        _guard("kube-api", lambda: check_api(kubeconfig, in_cluster, api)),
        _guard("clock-skew", lambda: clock_skew_check(api.get("date"), api.get("local"))),
        _guard("listen-port", lambda: check_listen_port(listen_port, interface, socket_dir)),
    ]


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as e:
        text = " ".join(f"{type(e).__name__}: {e}".split())
        fix = (explain(e, context=f"{name} check").fix if isinstance(e, OSError)
               else "unexpected; rerun with --json and report the output")
        return Check(name, "fail", f"check failed unexpectedly: {text}", fix)


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def _bpf_map_create() -> int:
    """Creates (and closes) a one-entry array map; returns 0 or the errno."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        from wgmanager.datapath import libbpf

        lib = libbpf._lib()
        lib.bpf_map_create.restype = ctypes.c_int
        fd = lib.bpf_map_create(_BPF_MAP_TYPE_ARRAY, None, 4, 4, 1, None)
        err = -fd if fd < -1 else ctypes.get_errno()
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint32 * 16)(_BPF_MAP_TYPE_ARRAY, 4, 4, 1)
        fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(_BPF_MAP_CREATE), ctypes.byref(attr),
                          ctypes.c_uint(ctypes.sizeof(attr)))
        err = ctypes.get_errno()
    if fd >= 0:
        os.close(fd)
        return 0
    return err or errno.EIO


def check_bpf_syscall() -> Check:
    err = _bpf_map_create()
    if err == 0:
        return Check("bpf-syscall", "ok", "BPF_MAP_CREATE works")
    if err == errno.ENOSYS:
        return Check("bpf-syscall", "fail", "the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL)",
                     "use a kernel built with CONFIG_BPF_SYSCALL=y (Linux >= 5.10)")
    why = explain(OSError(err, os.strerror(err)), context="bpf")
    if err in (errno.EPERM, errno.EACCES):
        return Check("bpf-syscall", "fail", "BPF_MAP_CREATE: not permitted", why.fix)
    return Check("bpf-syscall", "fail", f"BPF_MAP_CREATE: {why.problem}", why.fix)


def check_bpf_jit() -> Check:
    try:
        value = _read("/proc/sys/net/core/bpf_jit_enable")
    except FileNotFoundError:
        return Check("bpf-jit", "warn", "no BPF JIT in this kernel: programs are interpreted",
                     "use a kernel with CONFIG_BPF_JIT for full speed")
    if value == "0":
        return Check("bpf-jit", "warn", "net.core.bpf_jit_enable=0: programs are interpreted",
                     "sysctl -w net.core.bpf_jit_enable=1")
    return Check("bpf-jit", "ok", f"enabled (net.core.bpf_jit_enable={value})")


def check_bpffs() -> Check:
    if fstype_at(_read("/proc/self/mountinfo"), BPFFS_ROOT, exact=True) == "bpf":
        return Check("bpffs", "ok", f"mounted at {BPFFS_ROOT}")
    return Check("bpffs", "fail", f"no bpffs mounted at {BPFFS_ROOT}: maps cannot be pinned",
                 f"mount -t bpf bpf {BPFFS_ROOT}")


def check_bpffs_propagation() -> Check:
    return bpffs_propagation_check(propagation_at(_read("/proc/self/mountinfo"), BPFFS_ROOT))


def bpffs_propagation_check(mode: str | None) -> Check:
    """The Helm chart mounts /sys/fs/bpf into its pods with Bidirectional propagation (so
    the bpffs its init container mounts reaches the host); containerd and CRI-O refuse that
    unless the host's mount there is shared, and the agent pods never start."""
    if mode == "shared":
        return Check("bpffs-propagation", "ok", f"{BPFFS_ROOT} is on a shared mount")
    return Check("bpffs-propagation", "warn",
                 f"{BPFFS_ROOT} is on a {mode or 'missing'} mount, not a shared one: the Helm "
                 "chart's pods (Bidirectional hostPath) would be refused with \"is not a "
                 "shared mount\"",
                 f"mount --make-shared {BPFFS_ROOT} (mount bpffs there first if needed), and "
                 "at boot; systemd hosts are shared already")


def check_pin_dir(pin_dir: Path) -> Check:
    pin_dir = pin_dir.absolute()
    existing = next(p for p in (pin_dir, *pin_dir.parents) if os.path.exists(p))
    if fstype_at(_read("/proc/self/mountinfo"), existing) != "bpf":
        return Check("pin-dir", "fail", f"{pin_dir} is not on a bpffs",
                     f"mount bpffs (mount -t bpf bpf {BPFFS_ROOT}) or use a --pin-dir under it")
    dotted = [part for part in pin_dir.relative_to(existing).parts if "." in part]
    if dotted:  # bpffs refuses names with a dot (EPERM)
        return Check("pin-dir", "fail", f"{pin_dir}: bpffs refuses names with a dot "
                     f"({dotted[0]})", "choose a --pin-dir without dots in its new part")
    try:
        probe = tempfile.mkdtemp(prefix="wgm-doctor-", dir=existing)
    except OSError as e:
        return Check("pin-dir", "fail", f"cannot create directories in {existing}: "
                     f"{e.strerror}", explain(e, context="bpf-pin").fix)
    os.rmdir(probe)
    where = "exists" if existing == pin_dir else f"will be created in {existing}"
    return Check("pin-dir", "ok", f"{pin_dir} {where}, writable")


def check_wireguard() -> Check:
    from wgmanager.wireguard import implementation as impl
    from wgmanager.wireguard.kernel import kernel_unavailable_reason

    reason = kernel_unavailable_reason()
    if reason is None:
        module = impl.module_version()
        return Check("wireguard", "ok", f"kernel (module {module})" if module else "kernel")
    binary = shutil.which("wireguard-go")
    if binary is None:
        return Check("wireguard", "fail", f"neither kernel WireGuard nor wireguard-go: {reason}",
                     "apt-get install wireguard-go (or use a kernel with WireGuard)")
    version = impl.binary_version(binary)
    return wireguard_go_check(binary, version.text(), impl.offload_support(version.version),
                              reason, offload_fix=impl.OFFLOAD_FIX,
                              offloads_since=impl.OFFLOADS_SINCE)


def check_tun() -> Check:
    from wgmanager.wireguard.kernel import kernel_unavailable_reason

    path, problem = "/dev/net/tun", ""
    try:
        os.close(os.open(path, os.O_RDWR))
    except FileNotFoundError:
        problem, fix = f"{path} is missing", "modprobe tun, or mount /dev/net/tun into the pod"
    except OSError as e:
        problem, fix = f"{path} cannot be opened: {e.strerror}", "run as root or with CAP_NET_ADMIN"
    if not problem and CAP_NET_ADMIN not in parse_capeff(_read("/proc/self/status")):
        # Opening is a file permission (a uid 0 without capabilities has it); creating the
        # device (TUNSETIFF) needs CAP_NET_ADMIN.
        problem, fix = (f"{path} opens, but creating a TUN device needs CAP_NET_ADMIN, which "
                        "this process lacks"), "run as root or grant CAP_NET_ADMIN"
    if not problem:
        return Check("tun", "ok", f"{path} opens (wireguard-go needs it)")
    if kernel_unavailable_reason() is None:
        return Check("tun", "ok", f"{problem}; not needed: kernel WireGuard is available")
    return Check("tun", "fail", f"{problem}: wireguard-go cannot create its device", fix)


def check_headers() -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    if not build.exists():
        return Check("kernel-headers", "fail", f"{build} is missing (or a dangling link): bcc "
                     "cannot compile the program", explain("Unable to find kernel headers",
                                                           context="bpf-compile").fix)
    target = f" -> {build.resolve()}" if build.is_symlink() else ""
    return Check("kernel-headers", "ok", f"{build}{target}")


def check_compile(skip: bool) -> Check:
    if skip:
        return Check("bpf-compile", "warn", "skipped (--skip-compile)",
                     "run without --skip-compile to test-build the eBPF program")
    if fstype_at(_read("/proc/self/mountinfo"), BPFFS_ROOT, exact=True) != "bpf":
        return Check("bpf-compile", "fail", "not tried: the test compile pins maps in bpffs",
                     f"mount -t bpf bpf {BPFFS_ROOT}")
    from wgmanager.datapath.bpf import Program
    from wgmanager.errors import WgmError

    tmp = BPFFS_ROOT / f"wgmanager-doctor-{os.getpid()}-{secrets.token_hex(3)}"
    started = time.monotonic()
    try:
        Program(pin_dir=tmp).close()
    except WgmError as e:
        problem, _, fix = str(e).partition("; ")
        return Check("bpf-compile", "fail", problem, fix or "run `wgmanager doctor` as root")
    finally:
        if tmp.is_dir():
            for pinned in tmp.iterdir():
                pinned.unlink()
            tmp.rmdir()
    seconds = time.monotonic() - started
    return Check("bpf-compile", "ok", "compiled and loaded from_pod, to_underlay and "
                 f"to_tunnel_l3 in {seconds:.1f} s (bcc)")
