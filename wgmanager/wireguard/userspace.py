"""The userspace backend: wireguard-go, configured over its UAPI unix socket.

wireguard-go runs as its own process in a new session, so it outlives the agent: an agent
restart leaves the device and its tunnels up. Who starts it depends on ``spawn``:

- ``spawn=True`` (a host, the lab): this backend starts it (``start_wireguard_go``).
- ``spawn=False`` (a Kubernetes pod, where a container restart kills every process in the
  container): a sidecar container runs ``wgmanager wireguard-go-supervisor``. The backend
  asks for a device by writing ``<socket_dir>/<ifname>.want`` and waits for the socket;
  removing the file asks for the device to go. See ``supervisor.py``.

wireguard-go always puts its socket in /var/run/wireguard; when several simulated nodes
share one machine each gets its own ``socket_dir``, which is bind-mounted over
/run/wireguard inside a private mount namespace made just for that wireguard-go process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from wgmanager.core.model import DeviceState
from wgmanager.core.plan import AddPeer, PeerOp, RemovePeer
from wgmanager.errors import BackendUnavailable, DeviceError
from wgmanager.wireguard import uapi
from wgmanager.wireguard.backend import BackendKind, DeviceSettings

log = logging.getLogger(__name__)

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
_NATIVE_SOCKET_DIRS = {Path("/var/run/wireguard"), Path("/run/wireguard")}
WANT_SUFFIX = ".want"
SET_BATCH = 1000  # peer operations per UAPI set request (bounds one request's size and lock)


def want_path(socket_dir: Path, ifname: str) -> Path:
    """The file by which an agent asks the wireguard-go sidecar for device ``ifname``."""
    return socket_dir / f"{ifname}{WANT_SUFFIX}"


def check_can_start(binary: str) -> None:
    """Raises BackendUnavailable, naming the fix, if wireguard-go cannot run here."""
    if shutil.which(binary) is None:
        raise BackendUnavailable(f"{binary} not found; install it (apt-get install "
                                 "wireguard-go) or use a kernel with WireGuard")
    if not os.path.exists("/dev/net/tun"):
        raise BackendUnavailable("/dev/net/tun is missing; wireguard-go needs the TUN "
                                 "driver (modprobe tun, or mount /dev/net/tun into the pod)")


def start_wireguard_go(ifname: str, *, socket_dir: Path, binary: str = "wireguard-go",
                       output: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Starts ``wireguard-go -f IFNAME`` with its UAPI socket in ``socket_dir``; returns at once.

    The one way wgmanager starts wireguard-go, shared by the spawning backend and the
    sidecar's supervisor. The process gets its own session, so a signal aimed at the
    caller's process group (Ctrl-C, a shell's job control) never reaches it: it stops only
    when asked by pid. ``output`` is where its log goes (None: the caller's stdout/stderr).
    """
    check_can_start(binary)
    socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        (socket_dir / f"{ifname}.sock").unlink()  # stale: callers start only when it is dead
    if socket_dir.resolve() in _NATIVE_SOCKET_DIRS:
        argv = [binary, "-f", ifname]
    else:
        script = ('mkdir -p /run/wireguard && mount --bind "$1" /run/wireguard '
                  '&& exec "$2" -f "$3"')
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                "wgmanager-wg", str(socket_dir), binary, ifname]
    # WGM_WIREGUARD_GO_LOG_LEVEL=verbose turns on its per-packet-event log for debugging.
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1",
               LOG_LEVEL=os.environ.get("WGM_WIREGUARD_GO_LOG_LEVEL", "error"))
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            close_fds=True)


class UapiConnection:
    """One connection to a UAPI socket; wireguard-go serves many requests per connection."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._buf = b""

    def close(self) -> None:
        self._sock.close()

    def request(self, payload: bytes) -> str:
        with contextlib.suppress(BrokenPipeError):  # it hung up; the recv below says so
            self._sock.sendall(payload)
        while True:
            end = self._buf.find(b"\n\n")
            if end >= 0 and b"errno=" in self._buf[:end + 1]:
                reply, self._buf = self._buf[:end + 1], self._buf[end + 2:]
                return reply.decode()
            try:
                chunk = self._sock.recv(65536)
            except ConnectionResetError:  # a wireguard-go killed while we were connected
                chunk = b""
            if not chunk:
                raise DeviceError("the WireGuard UAPI socket closed mid-reply; "
                                  "wireguard-go may have exited (check its log)")
            self._buf += chunk


class UserspaceBackend:
    kind = BackendKind.USERSPACE

    def __init__(self, ifname: str, *, socket_dir: Path = DEFAULT_SOCKET_DIR,
                 spawn: bool = True, binary: str = "wireguard-go",
                 timeout: float = 5.0) -> None:
        self.ifname = ifname
        self.socket_dir = socket_dir
        self.spawn = spawn
        self.binary = binary
        self.timeout = timeout
        self._values = uapi.ValueCache()  # parsed keys/networks/endpoints across reads

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f"{self.ifname}.sock"

    @property
    def pid_path(self) -> Path:
        return self.socket_dir / f"{self.ifname}.pid"

    @property
    def log_path(self) -> Path:
        return self.socket_dir / f"{self.ifname}.log"

    # -- device lifecycle -------------------------------------------------------------

    def device_exists(self) -> bool:
        try:
            with self._connect() as conn:
                conn.request(uapi.get_request())
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except DeviceError:
            return False  # accepted, then hung up without a reply: it is exiting
        return True

    @property
    def want_path(self) -> Path:
        return want_path(self.socket_dir, self.ifname)

    def ensure_device(self) -> bool:
        if self.device_exists():
            if not self.spawn:
                # Keep the request on file: a restarted sidecar restores exactly the devices
                # that have one, and stops any that lost it.
                self._write_want()
            return False
        if not self.spawn:
            self._request_from_sidecar()
            return True
        self._start_process()
        return True

    def delete_device(self) -> None:
        if not self.spawn:
            self._withdraw_from_sidecar()
            # Without spawning there is no process of ours: a pid file in a socket dir shared
            # with a sidecar names a process in another container's pid namespace.
            return
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _await(lambda: not process_alive(pid), self.timeout)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        if self.socket_path.exists() and not self.device_exists():
            self.socket_path.unlink()

    def _write_want(self) -> None:
        if self.want_path.exists():
            return
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = self.want_path.with_name(f".{self.want_path.name}.{os.getpid()}")
        tmp.write_text(f"{self.ifname}\n")
        tmp.rename(self.want_path)  # atomic: the supervisor never sees a half-written file

    def _request_from_sidecar(self) -> None:
        self._write_want()
        if not _await(self.device_exists, self.timeout, interval=0.05):
            raise BackendUnavailable(
                f"no wireguard-go socket at {self.socket_path} {self.timeout:.0f}s after "
                f"asking for it in {self.want_path}; is wireguard-go's supervisor "
                f"(wgmanager wireguard-go-supervisor --socket-dir {self.socket_dir}) "
                "running? Check its log")
        log.info("wireguard-go started by its supervisor", extra={"ifname": self.ifname})

    def _withdraw_from_sidecar(self) -> None:
        try:
            self.want_path.unlink()
        except FileNotFoundError:
            return  # never asked for: whatever serves this device is not ours to stop
        # Done when the socket is gone: wireguard-go closes it first on SIGTERM, then (within
        # milliseconds) its TUN and UDP socket; the supervisor reaps it before any restart.
        if not _await(lambda: not self.device_exists(), self.timeout, interval=0.05):
            raise DeviceError(f"wireguard-go's supervisor did not stop {self.ifname} within "
                              f"{self.timeout:.0f}s of removing {self.want_path}; check its "
                              "log")

    def pid(self) -> int | None:
        """The wireguard-go process we started for this device, if it is still running."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def process(self) -> int | None:
        """The wireguard-go serving this device, whoever started it (``find_wireguard_go``)."""
        return find_wireguard_go(self.ifname, self.pid() if self.spawn else None)

    def _start_process(self) -> None:
        check_can_start(self.binary)  # before the log file makes the directory
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        with open(self.log_path, "ab") as logf:
            proc = start_wireguard_go(self.ifname, socket_dir=self.socket_dir,
                                      binary=self.binary, output=logf)
        self.pid_path.write_text(f"{proc.pid}\n")
        if not _await(lambda: proc.poll() is not None or self.device_exists(), self.timeout):
            proc.kill()
            raise BackendUnavailable(f"wireguard-go for {self.ifname} did not open "
                                     f"{self.socket_path} within {self.timeout:.0f}s")
        if proc.poll() is not None:
            tail = self._log_tail()
            raise BackendUnavailable(f"wireguard-go for {self.ifname} exited with code "
                                     f"{proc.returncode}: {tail}")
        log.info("wireguard-go started", extra={"ifname": self.ifname, "pid": proc.pid})

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "no log"
        return lines[-1] if lines else "no output"

    # -- configuration ----------------------------------------------------------------

    def configure(self, settings: DeviceSettings) -> bool:
        state = self.read()
        lines = uapi.device_lines(
            private_key=(settings.private_key
                         if state.public_key != settings.private_key.public_key else None),
            listen_port=(settings.listen_port
                         if state.listen_port != settings.listen_port else None),
            fwmark=settings.fwmark if state.fwmark != settings.fwmark else None,
        )
        if not lines:
            return False
        self._set(lines, what="device settings")
        return True

    def read(self) -> DeviceState:
        with self._session() as conn:
            reply = conn.request(uapi.get_request())
        try:
            return uapi.parse_get(self.ifname, reply, self._values)
        except (uapi.ProtocolError, ValueError) as e:
            raise DeviceError(f"unreadable state from wireguard-go on {self.ifname}: {e}") from e

    def apply(self, ops: Sequence[PeerOp]) -> None:
        """Applies ``ops`` in order, up to ``SET_BATCH`` of them per ``set`` request.

        wireguard-go takes any number of peer sections in one request (5,000 peers: one
        request instead of 5,000 round trips). It stops at the first line it rejects and
        says only the errno, so a rejected batch is sent again one operation per request:
        the error then names the operation, as one request per operation did. Replaying is
        safe: each operation sets what it names (the peer, its endpoint, which peer holds
        an allowed IP), so running a batch's prefix twice, in order, ends the same.
        """
        if not ops:
            return
        with self._session() as conn:
            for start in range(0, len(ops), SET_BATCH):
                batch = ops[start:start + SET_BATCH]
                reply = conn.request(uapi.set_request(
                    line for op in batch for line in uapi.op_lines(op)))
                if len(batch) == 1:
                    self._check(reply, _describe(batch[0]))
                elif abs(uapi.parse_errno(reply)) != 0:
                    for op in batch:
                        self._check(conn.request(uapi.set_request(uapi.op_lines(op))),
                                    _describe(op))

    def _set(self, lines: list[str], *, what: str) -> None:
        with self._session() as conn:
            self._check(conn.request(uapi.set_request(lines)), what)

    def _check(self, reply: str, what: str) -> None:
        # wireguard-go replies with a negated errno (errno=-22 for EINVAL).
        code = abs(uapi.parse_errno(reply))
        if code != 0:
            raise DeviceError(f"wireguard-go on {self.ifname} rejected {what}: "
                              f"{errno.errorcode.get(code, code)} ({os.strerror(code)})")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[UapiConnection]:
        conn = UapiConnection(self.socket_path, self.timeout)
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _session(self) -> Iterator[UapiConnection]:
        try:
            with self._connect() as conn:
                yield conn
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DeviceError(f"WireGuard device {self.ifname} is not running (no socket at "
                              f"{self.socket_path}); the agent will restart it") from e
        except TimeoutError as e:
            raise DeviceError(f"wireguard-go on {self.ifname} did not answer within "
                              f"{self.timeout:.0f}s") from e


def _describe(op: PeerOp) -> str:
    verb = ("resetting" if op.fresh else "adding") if isinstance(op, AddPeer) else (
        "removing" if isinstance(op, RemovePeer) else "updating")
    return f"{verb} peer {op.public_key.short()}"


def serves_device(comm: str, argv: Sequence[str], ifname: str) -> bool:
    """Whether a process, by its /proc comm and argv, is a wireguard-go for ``ifname``."""
    return comm == "wireguard-go" and ifname in argv[1:]


def find_wireguard_go(ifname: str, hint: int | None = None) -> int | None:
    """The wireguard-go process serving ``ifname`` in this network namespace, or None.

    ``hint`` (the pid file's pid) wins when it is one. Otherwise /proc is searched, which
    finds a sidecar's process too when it is visible (a shared or host pid namespace);
    several simulated nodes may each run one for the same name, so only processes in this
    network namespace count (where the device's TUN is).
    """
    def matches(pid: int, own_netns: os.stat_result | None) -> bool:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if not serves_device(comm, argv.split("\0"), ifname):
                return False
            if own_netns is None:
                return True
            netns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return False
        return (netns.st_dev, netns.st_ino) == (own_netns.st_dev, own_netns.st_ino)

    if hint is not None and matches(hint, None) and process_alive(hint):
        return hint
    own = os.stat("/proc/self/ns/net")
    for entry in sorted(int(e) for e in os.listdir("/proc") if e.isdigit()):
        if matches(entry, own) and process_alive(entry):
            return entry
    return None


def process_alive(pid: int) -> bool:
    """Whether wireguard-go (or any process) ``pid`` still runs (also used by the tests)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone; reap it.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    # Alive while any thread runs: after a kill a Go process's leader can be a zombie while
    # other threads (still holding the socket and the TUN) exit; threads already dead
    # linger in task/ in state X (or Z) for a moment and must not count. A thread that
    # vanishes between listing and reading says nothing about the others: read them all.
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def _await(cond: object, timeout: float, interval: float = 0.01) -> bool:
    """Polls ``cond`` until true or ``timeout``; for conditions with no event to wait on."""
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())
