"""Shared pieces of the benchmark scripts: names, cleanup, machine facts, result entries.

Every benchmark names what it creates ``wgb`` + 4 hex digits (network namespaces
``<prefix>-...``, a host veth ``<prefix>h``) and keeps its files under
``/run/wgmanager-bench/<prefix>`` and its bpffs pins under
``/sys/fs/bpf/wgmanager-bench/<prefix>``, with ``owner.pid`` naming the process that made
them. ``cleanup_prefix`` removes exactly that; ``remove_stale_runs`` does it for runs whose
owner died (a SIGKILLed benchmark). Nothing here touches /run/wgmanager-lab or
/run/wgmanager-tests.

Result entries (what bench/run.py collects into bench/results.json) are plain dicts:
``{name, value, unit, compared_with, baseline_value, ratio, what}``; ``ratio`` is always
``value / baseline_value``. Benchmarks measure; they never assert timings.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import datetime
import gzip
import hashlib
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgmanager.lab import controlplane, topology

REPO = Path(__file__).resolve().parent.parent
BENCH_ROOT = Path("/run/wgmanager-bench")
BENCH_PIN_ROOT = Path("/sys/fs/bpf/wgmanager-bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET = 0x40000000
SYS_PIDFD_GETFD = 438  # x86_64
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
Entry = dict[str, Any]
T = TypeVar("T")


# -- naming and cleanup -------------------------------------------------------------------


# The ctypes set-up of sendmmsg(2) that the per-packet cost benchmarks' sender scripts
# start with (run inside a scratch namespace with `python -c`): VLEN 32-byte UDP
# datagrams per system call, so what is timed is the kernel's send path, not Python.
SENDMMSG = textwrap.dedent("""\
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]
    class mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
    libc = ctypes.CDLL(None, use_errno=True)
    payload = ctypes.create_string_buffer(b"x" * 32, 32)
    iov = iovec(ctypes.addressof(payload), 32)
    VLEN = 64
    msgs = (mmsghdr * VLEN)()
    for m in msgs:
        m.hdr.iov, m.hdr.iovlen = ctypes.pointer(iov), 1
""")

def new_prefix() -> str:
    return "wgb" + secrets.token_hex(2)


def run_dir(prefix: str) -> Path:
    """The run's own directory, with owner.pid written (made on first call)."""
    d = BENCH_ROOT / prefix
    d.mkdir(parents=True, exist_ok=True)
    owner = d / "owner.pid"
    if not owner.exists():
        owner.write_text(f"{os.getpid()}\n")
    return d


def pin_dir(prefix: str) -> Path:
    return BENCH_PIN_ROOT / prefix


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def kill_pidfiles(root: Path, needle: bytes) -> None:
    """SIGKILLs the processes named by ``*.pid`` files under ``root`` whose command line
    still holds ``needle`` (never a reused pid)."""
    for pidfile in root.rglob("*.pid"):
        if pidfile.name == "owner.pid":
            continue
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().strip())
            if needle in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)


def cleanup_prefix(prefix: str) -> None:
    """Removes what a benchmark run with this prefix made: processes, namespaces, pins, files.
    Idempotent, and safe after a crash."""
    d = BENCH_ROOT / prefix
    if d.is_dir():
        kill_pidfiles(d, b"wireguard-go")
        kill_pidfiles(d, b"wgmanager")
        controlplane.stop_processes_under(d / "controlplane")
    topology.destroy(prefix)  # kills what still runs in our namespaces, deletes them
    shutil.rmtree(pin_dir(prefix), ignore_errors=True)
    with contextlib.suppress(OSError):
        BENCH_PIN_ROOT.rmdir()  # only once no other run's pins are in it
    shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
        BENCH_ROOT.rmdir()


def remove_stale_runs() -> list[str]:
    """Cleans up after benchmark runs whose owner process is gone."""
    removed: list[str] = []
    if not BENCH_ROOT.is_dir():
        return removed
    for d in BENCH_ROOT.iterdir():
        try:
            os.kill(int((d / "owner.pid").read_text().strip()), 0)
            continue  # still running: not ours to touch
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
        cleanup_prefix(d.name)
        removed.append(d.name)
    return removed


@contextlib.contextmanager
def owned_prefix() -> Iterator[str]:
    """A fresh prefix whose resources are removed on exit, also on failure."""
    prefix = new_prefix()
    run_dir(prefix)
    try:
        yield prefix
    finally:
        cleanup_prefix(prefix)


def terminate_on_sigterm() -> None:
    """Turns SIGTERM into SystemExit so that every ``finally`` (cleanup) runs."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


# -- machine and process facts ------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                                  check=False, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = out(["git", "rev-parse", "HEAD"])
    dirty = bool(out(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "kernel": platform.release(),
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "code": code_version(),
        "python": platform.python_version(),
        "wireguard_go": out(["dpkg-query", "-W", "-f=${Version}", "wireguard-go"]),
        # the binary on PATH, which wgmanager spawns (a benchmark may record another)
        "wireguard_go_binary": (wireguard_go_info(resolve_wireguard_go())
                                if shutil.which("wireguard-go") else None),
        "loadavg_at_start": out(["cat", "/proc/loadavg"]),
    }


def code_version() -> str:
    """The git commit plus a digest of the wgmanager sources as they are on disk now
    (the tree is shared and may change during a long run; this says what ran)."""
    h = hashlib.sha256()
    for f in sorted((REPO / "wgmanager").rglob("*.py")) + sorted((REPO / "bpf").glob("*")):
        with contextlib.suppress(OSError):
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, cwd=REPO, check=False).stdout.strip()
    return f"{commit or 'unknown'}+src:{h.hexdigest()[:12]}"


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU-seconds over all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK


class RssSampler:
    """Samples a process's VmRSS in the background; ``peak`` is the maximum seen."""

    def __init__(self, pid: Callable[[], int | None], interval: float = 0.25) -> None:
        self._pid = pid
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self._pid()
            if pid is not None:
                self.peak = max(self.peak, proc_rss_mib(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- namespaces and sockets ---------------------------------------------------------------

def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Runs ``fn`` in a short-lived thread that has joined ``netns`` (setns applies to the
    calling thread only), e.g. to open a socket there. Sockets keep their namespace."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 30.0) -> str:
    """GET http://host:port/path from inside ``netns`` (no subprocess, no proxy)."""
    sock = in_netns(netns, lambda: socket.create_connection((host, port), timeout=timeout))
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks).decode(errors="replace")
    head, _, body = raw.partition("\r\n\r\n")
    if " 200 " not in head.splitlines()[0]:
        raise RuntimeError(f"GET {path} in {netns}: {head.splitlines()[0]}")
    return body


def udp_sockets_of(pid: int, port: int) -> list[int]:
    """The fd numbers of ``pid``'s UDP sockets bound to ``port`` (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                fds.append(int(fd))
    return fds


def _each_udp_socket(pid: int, port: int, fn: Callable[[socket.socket], T]) -> dict[int, T]:
    """Calls ``fn`` on a duplicate (pidfd_getfd(2)) of each of ``pid``'s UDP sockets bound to
    ``port``, which is the same kernel socket; returns the results keyed by socket inode, so
    that a caller can tell the same sockets from new ones the process opened meanwhile."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    out: dict[int, T] = {}
    try:
        for target in udp_sockets_of(pid, port):
            dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
            if dup < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
            s = socket.socket(fileno=dup)
            try:
                out[os.fstat(dup).st_ino] = fn(s)
            finally:
                s.close()  # closes our duplicate only
    finally:
        os.close(pidfd)
    return out


def _buffers(s: socket.socket) -> tuple[int, int]:
    return (s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


def socket_buffers(pid: int, port: int) -> dict[int, tuple[int, int]]:
    """The kernel's current (SO_RCVBUF, SO_SNDBUF) of each of ``pid``'s UDP sockets on
    ``port``, keyed by socket inode: what a knob must read before it changes them, because
    the right value to put back depends on the binary (wireguard-go 0.0.20220316 leaves
    net.core.rmem_default, 0.0.20231211 sets 14 MiB itself)."""
    return _each_udp_socket(pid, port, _buffers)


def set_socket_buffers(pid: int, port: int, *, rcvbuf: int | None = None,
                       sndbuf: int | None = None) -> list[tuple[int, int]]:
    """Sets SO_RCVBUF/SO_SNDBUF on another process's UDP sockets (wireguard-go's), the way
    newer wireguard-go does it for itself (SO_*BUFFORCE, so net.core.rmem_max does not cap
    it): pidfd_getfd(2) gives us a duplicate of its socket, which is the same socket.
    The value is what setsockopt takes (the kernel doubles it). Returns the resulting
    (SO_RCVBUF, SO_SNDBUF) per socket."""
    def apply(s: socket.socket) -> tuple[int, int]:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        if sndbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
        return _buffers(s)
    return list(_each_udp_socket(pid, port, apply).values())


def restore_socket_buffers(pid: int, port: int, saved: dict[int, tuple[int, int]]) -> None:
    """Puts back exactly what ``socket_buffers`` read, socket by socket, and raises if the
    sockets or their sizes then differ from ``saved`` (a knob must not leave a state the
    next measurement did not ask for). setsockopt doubles its argument and every size the
    kernel reports is such a doubled (even) value, so half of it restores it exactly. The
    only trace left is the SOCK_*BUF_LOCK bit, which only TCP's buffer autotuning reads."""
    def put(s: socket.socket) -> None:
        ino = os.fstat(s.fileno()).st_ino
        if ino not in saved:
            raise RuntimeError(f"pid {pid} opened a new UDP socket on port {port} while its "
                               "buffers were changed; cannot restore it")
        rcv, snd = saved[ino]
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcv // 2)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, snd // 2)
    _each_udp_socket(pid, port, put)
    now = socket_buffers(pid, port)
    if now != saved:
        raise RuntimeError(f"pid {pid}: UDP socket buffers on port {port} are {now} after "
                           f"restoring, not {saved}")


def netns_snmp(netns: str) -> dict[str, int]:
    """/proc/net/snmp of a namespace as {"Udp.RcvbufErrors": n, ...}."""
    text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    out: dict[str, int] = {}
    for head, vals in zip(text[::2], text[1::2], strict=False):
        proto, names = head.split(":", 1)
        for k, v in zip(names.split(), vals.split(":", 1)[1].split(), strict=False):
            with contextlib.suppress(ValueError):
                out[f"{proto}.{k}"] = int(v)
    return out


# -- the wireguard-go binary -------------------------------------------------------------

def resolve_wireguard_go(binary: str | None = None) -> str:
    """The absolute path of the wireguard-go a benchmark runs: ``binary`` if given (a path
    or a name), else the first on PATH, which is what wgmanager's backend would spawn.
    Resolved once, so that every tunnel in a run uses the same file."""
    found = shutil.which(binary or "wireguard-go")
    if found is None:
        raise FileNotFoundError(f"{binary or 'wireguard-go'}: not found (make setup "
                                "installs it)")
    return os.path.abspath(found)


def path_with_wireguard_go(binary: str, bin_dir: Path) -> str:
    """A PATH on which the name ``wireguard-go`` is ``binary``: wgmanager spawns
    ``wireguard-go`` from PATH, so this is how a benchmark makes it run a given binary
    without any flag (``bin_dir`` gets one symlink; nothing else is shadowed)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "wireguard-go"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(binary)
    return f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"


def wireguard_go_info(binary: str) -> dict[str, Any]:
    """What a wireguard-go binary really is, for the raw results: its path, digest, the
    Debian package and version that installed it (dpkg -S, dpkg-query), else the version in
    the Debian changelog shipped beside it (a binary unpacked from a .deb, like Debian 12's
    build kept under /var/cache/wgmanager), and what it says itself: 0.0.20231211's
    ``--version`` wrongly prints v0.0.20230223, so that one is recorded, never trusted."""
    real = os.path.realpath(binary)
    info: dict[str, Any] = {"path": binary, "realpath": real, "package": None,
                            "package_version": None, "version_source": None}
    with contextlib.suppress(OSError):
        info["sha256"] = hashlib.sha256(Path(real).read_bytes()).hexdigest()

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    info["self_reported_version"] = out([real, "--version"]).split("\n", 1)[0]
    for candidate in dict.fromkeys((binary, real)):
        owner = out(["dpkg", "-S", candidate])
        if owner and ":" in owner:
            pkg = owner.split(":", 1)[0].strip()
            info.update(package=pkg, version_source="dpkg",
                        package_version=out(["dpkg-query", "-W", "-f=${Version}", pkg]) or None)
            return info
    parts = Path(real).parts
    if parts[-3:-1] == ("usr", "bin"):  # <root>/usr/bin/NAME unpacked from a .deb
        doc = Path(*parts[:-3], "usr", "share", "doc", parts[-1])
        for changelog in (doc / "changelog.Debian.amd64.gz", doc / "changelog.Debian.gz"):
            with contextlib.suppress(OSError, EOFError):
                with gzip.open(changelog, "rt") as f:
                    m = re.match(r"(\S+) \(([^)]+)\)", f.readline())
                if m:
                    info.update(package=m[1], package_version=m[2],
                                version_source=str(changelog))
                    return info
    return info


def wireguard_go_pids_run(pids: Sequence[int], binary: str) -> None:
    """Raises unless every pid executes ``binary`` (/proc/PID/exe), so a row can never
    silently compare two different wireguard-go builds."""
    want = os.path.realpath(binary)
    for pid in pids:
        exe = os.path.realpath(f"/proc/{pid}/exe")
        if exe != want:
            raise RuntimeError(f"wireguard-go pid {pid} runs {exe}, not {want}")


# -- where the cycles go: perf and Go symbols ---------------------------------------------

class GoSymbols:
    """Function names of a Go executable from its .gopclntab, which ``strip`` keeps (Go
    needs it for stack traces): Debian's wireguard-go binaries are stripped, so perf shows
    ``[unknown]`` for every user-space sample, and Debian's go 1.19 ``addr2line`` misreads
    go1.20+ tables. Handles the go1.18 and go1.20+ layouts (pcHeader magic 0xfffffff0 /
    0xfffffff1) of non-PIE amd64 ELF files; ``load`` returns None for anything else."""

    def __init__(self, starts: list[int], names: list[str], end: int) -> None:
        self.starts, self.names, self.end = starts, names, end

    @classmethod
    def load(cls, path: str) -> GoSymbols | None:
        try:
            data = Path(path).read_bytes()
            if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
                return None  # not a 64-bit little-endian ELF
            if struct.unpack_from("<H", data, 0x10)[0] != 2:
                return None  # ET_DYN (PIE): perf's addresses would need the load bias
            shoff = struct.unpack_from("<Q", data, 0x28)[0]
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
            sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
                        for i in range(shnum)]
            strtab = sections[shstrndx][4]

            def name(off: int) -> bytes:
                return data[strtab + off:data.index(b"\0", strtab + off)]
            pcln = next((sec for sec in sections if name(sec[0]) == b".gopclntab"), None)
            if pcln is None:
                return None
            tab = data[pcln[4]:pcln[4] + pcln[5]]
            magic, ptrsize = struct.unpack_from("<I", tab, 0)[0], tab[7]
            if magic not in (0xFFFFFFF0, 0xFFFFFFF1) or ptrsize != 8:
                return None
            nfunc, _nfiles, text, funcnames, _cu, _files, _pc, functab = struct.unpack_from(
                "<8Q", tab, 8)
            starts: list[int] = []
            names: list[str] = []
            for i in range(nfunc):
                entry, funcoff = struct.unpack_from("<II", tab, functab + 8 * i)
                nameoff = struct.unpack_from("<i", tab, functab + funcoff + 4)[0]
                at = funcnames + nameoff
                starts.append(text + entry)
                names.append(tab[at:tab.index(b"\0", at)].decode(errors="replace"))
            end = text + struct.unpack_from("<I", tab, functab + 8 * nfunc)[0]
        except (OSError, struct.error, ValueError, IndexError):
            return None
        return cls(starts, names, end) if starts else None

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        return self.names[i] if i >= 0 and addr < self.end else None


def perf_event() -> str | None:
    """The perf event to sample with: ``cycles`` where the CPU's counters are exposed (not in
    this machine's VM: "<not supported>"), else the ``cpu-clock`` software timer; None
    without a working perf."""
    if shutil.which("perf") is None:
        return None
    for event in ("cycles", "cpu-clock"):
        try:
            res = subprocess.run(["perf", "stat", "-x,", "-e", event, "true"],
                                 capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if res.returncode == 0 and "<not supported>" not in res.stderr \
                and "<not counted>" not in res.stderr:
            return event
    return None


@dataclass(frozen=True)
class PerfSample:
    comm: str
    ip: int
    sym: str  # "[unknown]" when perf could not name it
    dso: str  # "[kernel.kallsyms]", a path, or "[unknown]"

    @property
    def kernel(self) -> bool:
        return self.dso.startswith("[kernel") or self.ip >= 1 << 63


_PERF_LINE = re.compile(r"^\s*(.*?)\s+\d+\s+([0-9a-f]+)\s+(.*?)\s+\(([^()]*)\)\s*$")


def perf_samples(data: Path) -> list[PerfSample]:
    """The samples of a ``perf record`` file (comm, ip, symbol, DSO), via ``perf script``."""
    res = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"],
                         capture_output=True, text=True, check=True, timeout=300)
    out = []
    for line in res.stdout.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            out.append(PerfSample(m[1], int(m[2], 16), m[3], m[4]))
    return out


# -- statistics and entries ---------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with 100 samples p99 is the 99th value."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def entry(name: str, value: float, unit: str, what: str, *, compared_with: str | None = None,
          baseline_value: float | None = None, digits: int = 3) -> Entry:
    ratio = None
    if baseline_value not in (None, 0) and value == value:  # value is not NaN
        ratio = round(value / baseline_value, 3)  # type: ignore[operator]
    return {"name": name, "value": _round(value, digits), "unit": unit,
            "compared_with": compared_with,
            "baseline_value": None if baseline_value is None else _round(baseline_value, digits),
            "ratio": ratio, "what": what}


def _round(v: float, digits: int) -> float:
    if v != v:
        return v
    if abs(v) >= 100:
        return round(v, 1)
    return round(v, digits)


def wait_for(cond: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
