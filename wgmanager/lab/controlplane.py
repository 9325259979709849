"""A real Kubernetes control plane (etcd + kube-apiserver) on this machine, for the lab and tests.

Role: wgmanager learns its peers from Node objects (addresses, podCIDRs, a public-key
annotation). The lab and the end-to-end tests need an API server to publish and watch them.

Why a real one and not a fake: the behaviour the node agent depends on is the API server's,
not ours: token authentication, RBAC denials, the status subresource, merge patches, watches
resumed from a resourceVersion, 409 on stale writes, and clients surviving an API server
restart. A fake would encode our assumptions about all of that; the real binaries check them.

    ControlPlane(work_dir)
      start()            CA + serving cert + service-account keys + token file, then
                         etcd (127.0.0.1, plain HTTP) and kube-apiserver (TLS, RBAC)
      stop_apiserver() / start_apiserver()
                         restart only the API server: same certs, tokens and etcd data
      stop()             both, SIGTERM then SIGKILL; idempotent

Everything lives in ``work_dir``: keys, logs, etcd data, kubeconfigs, ``owner.pid`` (the
process that started it) and one ``<program>.pid`` per running process, so
``cleanup_stale`` can stop what a crashed run left behind. The processes run with the work
dir as their cwd, which identifies them even after someone deleted the directory.

kube-apiserver is not packaged anywhere: ``make setup`` builds it once from Debian's source
package into /var/cache/wgmanager (scripts/build-kube-apiserver.sh).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client

from wgmanager.errors import EnvironmentProblem, WgmError

DEFAULT_APISERVER = Path("/var/cache/wgmanager/kube-apiserver-1.20.2/kube-apiserver")
DEFAULT_ETCD = Path("/usr/bin/etcd")
ADMIN_USER = "wgmanager-admin"
ADMIN_GROUPS = ("system:masters",)
SERVICE_CIDR = "10.96.0.0/16"
ETCD = "etcd"
APISERVER = "kube-apiserver"
MARKER = "controlplane.json"  # says "this work dir is a control plane's" to cleanup_stale


class ControlPlaneError(WgmError):
    """The control plane did not start or stop as asked (the message carries the log tail)."""


@dataclass(frozen=True, slots=True)
class Token:
    token: str
    user: str
    groups: tuple[str, ...]


def apiserver_binary() -> Path:
    """The kube-apiserver to run: $WGM_KUBE_APISERVER, else the one `make setup` builds."""
    return Path(os.environ.get("WGM_KUBE_APISERVER", str(DEFAULT_APISERVER)))


def require_binary(path: Path, program: str = APISERVER) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise EnvironmentProblem(f"{program} not found at {path}; run `make setup` "
                                 "(it builds it once into /var/cache/wgmanager)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick; small race, fine for tests)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ControlPlane:
    def __init__(self, work_dir: Path, *, bind_address: str = "127.0.0.1",
                 secure_port: int = 6443, etcd_client_port: int | None = None,
                 etcd_peer_port: int | None = None, apiserver: Path | None = None,
                 etcd: Path = DEFAULT_ETCD, ready_timeout: float = 60.0) -> None:
        self.work_dir = work_dir
        self.bind_address = str(ipaddress.ip_address(bind_address))
        self.secure_port = secure_port
        self.etcd_client_port = etcd_client_port or free_port()
        self.etcd_peer_port = etcd_peer_port or free_port()
        self.apiserver_bin = apiserver or apiserver_binary()
        self.etcd_bin = etcd
        self.ready_timeout = ready_timeout
        self._tokens: list[Token] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.admin_token = self.add_token(ADMIN_USER, ADMIN_GROUPS)

    # -- configuration ------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.bind_address
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        return f"https://{host}:{self.secure_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client_port}"

    @property
    def ca_cert(self) -> Path:
        return self.work_dir / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.work_dir / "admin.kubeconfig"

    def add_token(self, user: str, groups: Sequence[str] = ()) -> str:
        """A bearer token for ``user`` in ``groups``. kube-apiserver reads the token file only
        when it starts: add tokens before start(), or between stop_apiserver() and
        start_apiserver()."""
        if self.apiserver_running():
            raise ControlPlaneError("kube-apiserver reads tokens at start: add_token before "
                                    "start() or while the API server is stopped")
        for name in (user, *groups):
            if not name or any(c in name for c in ',"\n'):
                raise ValueError(f"user/group names cannot be empty or hold , \" or newline: "
                                 f"{name!r}")
        token = secrets.token_hex(16)
        self._tokens.append(Token(token, user, tuple(groups)))
        return token

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Generates credentials, starts etcd and kube-apiserver, waits until /readyz is ok."""
        if self._procs:
            raise ControlPlaneError(f"control plane in {self.work_dir} already started; "
                                    "stop() first, or start_apiserver() after stop_apiserver()")
        require_binary(self.apiserver_bin)
        require_binary(self.etcd_bin, ETCD)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "owner.pid").write_text(f"{os.getpid()}\n")
        (self.work_dir / MARKER).write_text(json.dumps({
            "url": self.url, "etcd": self.etcd_url, "apiserver": str(self.apiserver_bin),
        }) + "\n")
        try:
            self._write_credentials()
            self._start_etcd()
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise

    def start_apiserver(self) -> None:
        """Starts kube-apiserver (again) against the running etcd; returns once it is ready."""
        if self.apiserver_running():
            return
        if not self._running(ETCD):
            raise ControlPlaneError("etcd is not running: call start() first")
        self._write_token_file()
        d = self.work_dir
        self._spawn(APISERVER, [
            str(self.apiserver_bin),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.bind_address}",
            f"--secure-port={self.secure_port}",
            f"--cert-dir={d / 'apiserver-certs'}",  # unused (we pass certs); keeps /var/run clean
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            # Without the (1.20: alpha) gate, Node.spec.podCIDRs silently keeps only the first
            # CIDR, and wgmanager's nodes have one IPv4 and one IPv6 pod CIDR.
            "--feature-gates=IPv6DualStack=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
        ])
        self._wait(APISERVER, self._apiserver_ready)

    def stop_apiserver(self) -> None:
        self._terminate(APISERVER)

    def stop(self) -> None:
        """Stops kube-apiserver, then etcd. Idempotent; the work dir is left for the caller."""
        self._terminate(APISERVER)
        self._terminate(ETCD)

    def apiserver_running(self) -> bool:
        return self._running(APISERVER)

    def ready(self) -> bool:
        """Whether the API server answers /readyz with 200 right now."""
        try:
            return self._apiserver_ready()
        except (OSError, http.client.HTTPException):
            return False

    def pid(self, program: str) -> int | None:
        proc = self._procs.get(program)
        return proc.pid if proc is not None and proc.poll() is None else None

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- clients ------------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig for whoever holds ``token``.

        The CA is named by path, not embedded: the kubernetes client copies embedded
        ``-data`` into a temporary file it removes only at a clean exit, so every SIGKILLed
        agent (the crash tests kill many) would leave one behind in /tmp.
        """
        user = next((t.user for t in self._tokens if t.token == token), "user")
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "wgmanager-lab",
                          "cluster": {"server": self.url,
                                      "certificate-authority": str(self.ca_cert.resolve())}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "wgmanager-lab",
                          "context": {"cluster": "wgmanager-lab", "user": user}}],
            "current-context": "wgmanager-lab",
        }
        _write_private(path, json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
        return path

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """A client of its own (no global kubernetes config is touched); admin by default."""
        cfg = client.Configuration(host=self.url, ssl_ca_cert=str(self.ca_cert))
        cfg.api_key = {"authorization": token or self.admin_token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        cfg.proxy = None  # a local control plane is never behind an environment proxy
        return client.ApiClient(cfg)

    # -- internals ----------------------------------------------------------------------

    def _write_credentials(self) -> None:
        d = self.work_dir
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("wgmanager-lab-ca", ca_key.public_key(), ca_key, None, is_ca=True)
        ips = dict.fromkeys([self.bind_address, "127.0.0.1"])
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default")]
        serving_key = ec.generate_private_key(ec.SECP256R1())
        serving = _certificate(APISERVER, serving_key.public_key(), ca_key, ca, sans=sans)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        pem = serialization.Encoding.PEM
        self.ca_cert.write_bytes(ca.public_bytes(pem))
        (d / "apiserver.crt").write_bytes(serving.public_bytes(pem))
        _write_private(d / "apiserver.key", _private_pem(serving_key))
        _write_private(d / "sa.key", _private_pem(sa_key))
        (d / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.write_kubeconfig(self.admin_kubeconfig, self.admin_token)

    def _write_token_file(self) -> None:
        lines = [f'{t.token},{t.user},{t.user},"{",".join(t.groups)}"' for t in self._tokens]
        _write_private(self.work_dir / "tokens.csv", "\n".join(lines) + "\n")

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn(ETCD, [
            str(self.etcd_bin),
            "--name=wgmanager-lab",
            f"--data-dir={self.work_dir / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=wgmanager-lab={peer}",
            "--logger=zap",
        ], env={k: v for k, v in os.environ.items() if not k.startswith("ETCD_")})
        self._wait(ETCD, self._etcd_healthy)

    def _spawn(self, program: str, argv: list[str],
               env: dict[str, str] | None = None) -> None:
        with open(self.work_dir / f"{program}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.work_dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._procs[program] = proc
        (self.work_dir / f"{program}.pid").write_text(f"{proc.pid}\n")

    def _running(self, program: str) -> bool:
        proc = self._procs.get(program)
        return proc is not None and proc.poll() is None

    def _wait(self, program: str, probe: Callable[[], bool]) -> None:
        """Polls ``probe`` until it says yes; fails fast if the process exits. On failure the
        process is stopped and the error carries the end of its log."""
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        while True:
            proc = self._procs[program]
            if proc.poll() is not None:
                self._terminate(program)
                raise ControlPlaneError(f"{program} exited with status {proc.returncode}; "
                                        f"{self._log_tail(program)}")
            try:
                if probe():
                    return
                last = "not ready"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                tail = self._log_tail(program)
                self._terminate(program)
                raise ControlPlaneError(f"{program} not ready after {self.ready_timeout:.0f} s "
                                        f"({last}); {tail}")
            time.sleep(0.1)

    def _etcd_healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.etcd_client_port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
        finally:
            conn.close()

    def _apiserver_ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        conn = http.client.HTTPSConnection(self.bind_address, self.secure_port, context=ctx,
                                           timeout=2)
        try:
            conn.request("GET", "/readyz", headers={"Authorization": f"Bearer {self.admin_token}"})
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        finally:
            conn.close()

    def _log_tail(self, program: str, lines: int = 15) -> str:
        log = self.work_dir / f"{program}.log"
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return f"no log at {log}"
        if not tail:
            return f"{log} is empty"
        return f"last lines of {log}:\n" + "\n".join(tail)

    def _terminate(self, program: str, grace: float = 10.0) -> None:
        proc = self._procs.pop(program, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (self.work_dir / f"{program}.pid").unlink(missing_ok=True)



# -- crash cleanup ----------------------------------------------------------------------


def cleanup_stale(root: Path) -> list[str]:
    """Stops control planes under ``root`` whose owner process is gone; removes their dirs.

    Mirrors the integration harness's ``remove_stale_runs``, which removes dead runs' dirs
    but knows nothing of these processes. So, besides the pid files of work dirs that still
    exist, processes are also found by their cwd: an etcd or kube-apiserver whose cwd is
    (or was) under ``root`` and whose owner is gone is stale. Returns the removed dir names.
    """
    removed = []
    if root.is_dir():
        for work_dir in sorted(root.iterdir()):
            if not (work_dir / MARKER).is_file() or _owner_alive(work_dir):
                continue
            for program in (APISERVER, ETCD):
                with contextlib.suppress(OSError, ValueError):
                    pid = int((work_dir / f"{program}.pid").read_text().strip())
                    if pid in dict(_processes_under(work_dir)):
                        _kill(pid)
            shutil.rmtree(work_dir, ignore_errors=True)
            removed.append(work_dir.name)
    for pid, cwd in _processes_under(root):
        if not _owner_alive(cwd):
            _kill(pid)
    return removed


def _owner_alive(work_dir: Path) -> bool:
    try:
        os.kill(int((work_dir / "owner.pid").read_text().strip()), 0)
    except (OSError, ValueError):  # no file (or no dir), garbage, or no such process
        return False
    return True


def _processes_under(root: Path) -> Iterator[tuple[int, Path]]:
    """(pid, cwd) of every etcd and kube-apiserver whose cwd is (or was) under ``root``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in (ETCD, APISERVER):
                continue
            cwd = Path(os.readlink(entry / "cwd").removesuffix(" (deleted)"))
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if cwd.is_relative_to(root):
            yield int(entry.name), cwd


def _kill(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL, then waits until the process is gone (or a zombie its parent must reap)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.05)


# -- certificates -----------------------------------------------------------------------


def _certificate(cn: str, public_key: ec.EllipticCurvePublicKey,
                 issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, *,
                 is_ca: bool = False, sans: list[x509.GeneralName] | None = None,
                 ) -> x509.Certificate:
    """A CA (issuer None: self-signed) or a TLS server certificate signed by ``issuer``."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_cert_sign=False, crl_sign=False,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .add_extension(x509.SubjectAlternativeName(sans or []), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       issuer_key.public_key()), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: str | bytes) -> None:
    """Writes a file only root can read (keys, tokens, kubeconfigs with tokens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def stop_processes_under(work_dir: Path) -> int:
    """Stops every etcd/kube-apiserver running in ``work_dir`` (found by cwd, so a reused
    pid is never hit). For a process that did not start them, e.g. `wgmanager lab down`."""
    count = 0
    for pid, _cwd in list(_processes_under(work_dir)):
        _kill(pid)
        count += 1
    return count
