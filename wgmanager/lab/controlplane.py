"""A real Kubernetes control plane (etcd + kube-apiserver, optionally the controller-manager
and scheduler) on this machine, for the lab and tests.

Role: wgmanager learns its peers from Node objects (addresses, podCIDRs, a public-key
annotation). The lab and the end-to-end tests need an API server to publish and watch them.

Why a real one and not a fake: the behaviour the node agent depends on is the API server's,
not ours: token authentication, RBAC denials, the status subresource, merge patches, watches
resumed from a resourceVersion, 409 on stale writes, and clients surviving an API server
restart. A fake would encode our assumptions about all of that; the real binaries check them.

    ControlPlane(work_dir, controllers=False)
      start()            CA + serving cert + service-account keys + token file, then
                         etcd (127.0.0.1, plain HTTP) and kube-apiserver (TLS, Node+RBAC
                         authorization, NodeRestriction, x509 client certs and tokens);
                         with ``controllers``, kube-controller-manager (node IPAM gives
                         Nodes their podCIDRs, service-account tokens) and kube-scheduler,
                         each with its own client certificate, as kubeadm sets them up
      write_client_kubeconfig(path, user, groups)
                         a kubeconfig with a client certificate from the cluster CA
      stop_apiserver() / start_apiserver()
                         restart only the API server: same certs, tokens and etcd data
      stop()             all of them, SIGTERM then SIGKILL; idempotent

Everything lives in ``work_dir``: keys, logs, etcd data, kubeconfigs, ``owner.pid`` (the
process that started it) and one ``<program>.pid`` per running process, so
``cleanup_stale`` can stop what a crashed run left behind. The processes run with the work
dir as their cwd, which identifies them even after someone deleted the directory.

kube-apiserver is not packaged anywhere: ``make setup`` builds it (and the other Kubernetes
binaries) once from Debian's source package into /var/cache/wgmanager
(scripts/build-kubernetes.sh).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client

from wgmanager.errors import EnvironmentProblem, WgmError
from wgmanager.lab.daemons import Daemons, kill, processes_under
from wgmanager.lab.pki import (
    CertificateAuthority,
    private_pem,
    write_kubeconfig,
    write_pair,
    write_private,
)

DEFAULT_APISERVER = Path("/var/cache/wgmanager/kube-apiserver-1.20.2/kube-apiserver")
DEFAULT_KUBE_DIR = Path("/var/cache/wgmanager/kubernetes-1.20.2")
DEFAULT_ETCD = Path("/usr/bin/etcd")
ADMIN_USER = "wgmanager-admin"
ADMIN_GROUPS = ("system:masters",)
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: what pods are told the API is at
# Node IPAM: one /24 and one /64 per node (1.20 allows at most 16 bits between the two masks).
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:244::/48")
NODE_CIDR_MASKS = (24, 64)
ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
SCHEDULER = "kube-scheduler"
PROGRAMS = (SCHEDULER, CONTROLLER_MANAGER, APISERVER, ETCD)  # stop order
# Controllers that need a cloud provider (there is none): off, as with kubeadm on bare metal.
CLOUD_CONTROLLERS = ("cloud-node-lifecycle", "route", "service")
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


def kube_binary(program: str) -> Path:
    """Another Kubernetes binary (kubelet, controller-manager, ...): $WGM_KUBE_DIR/program,
    else the directory `make setup` builds them into."""
    return Path(os.environ.get("WGM_KUBE_DIR", str(DEFAULT_KUBE_DIR))) / program


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


@dataclass(frozen=True, slots=True)
class ClusterTrust:
    """What a node needs to join the cluster: where the API is and the CA that signs its
    certificates (also for a control plane started by an earlier process)."""

    url: str
    ca_cert: Path
    ca_key: Path

    @classmethod
    def of(cls, work_dir: Path, url: str) -> ClusterTrust:
        """The trust of the control plane whose files are under ``work_dir``."""
        return cls(url, work_dir / "ca.crt", work_dir / "ca.key")

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_cert, self.ca_key)


class ControlPlane:
    def __init__(self, work_dir: Path, *, bind_address: str = "127.0.0.1",
                 secure_port: int = 6443, etcd_client_port: int | None = None,
                 etcd_peer_port: int | None = None, apiserver: Path | None = None,
                 etcd: Path = DEFAULT_ETCD, ready_timeout: float = 60.0,
                 controllers: bool = False, cluster_cidrs: Sequence[str] = CLUSTER_CIDRS,
                 ) -> None:
        """``controllers`` adds kube-controller-manager and kube-scheduler: what real
        kubelets need (podCIDRs for their Nodes, service-account tokens for their pods,
        pods placed on nodes). Tests that only talk to the API leave them out (faster)."""
        self.work_dir = work_dir
        self.controllers = controllers
        self.cluster_cidrs = tuple(str(ipaddress.ip_network(c)) for c in cluster_cidrs)
        self.bind_address = str(ipaddress.ip_address(bind_address))
        self.secure_port = secure_port
        self.etcd_client_port = etcd_client_port or free_port()
        self.etcd_peer_port = etcd_peer_port or free_port()
        self.apiserver_bin = apiserver or apiserver_binary()
        self.etcd_bin = etcd
        self.ready_timeout = ready_timeout
        self._tokens: list[Token] = []
        self._daemons = Daemons(work_dir, error=ControlPlaneError, ready_timeout=ready_timeout)
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
    def trust(self) -> ClusterTrust:
        return ClusterTrust.of(self.work_dir, self.url)

    @property
    def ca_cert(self) -> Path:
        return self.trust.ca_cert

    @property
    def ca_key(self) -> Path:
        return self.trust.ca_key

    @property
    def admin_kubeconfig(self) -> Path:
        return self.work_dir / "admin.kubeconfig"

    def ca(self) -> CertificateAuthority:
        """The cluster CA (written by start()): what signs kubelets' certificates too."""
        return self.trust.ca()

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
        if self._daemons:
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
            if self.controllers:
                self._start_controllers()
        except BaseException:
            self.stop()
            raise

    def start_apiserver(self) -> None:
        """Starts kube-apiserver (again) against the running etcd; returns once it is ready."""
        if self.apiserver_running():
            return
        if not self._daemons.running(ETCD):
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
            f"--client-ca-file={self.ca_cert}",
            # As kubeadm: a kubelet (CN=system:node:NAME, O=system:nodes) may read what its
            # pods need and write only its own Node and Lease; users get what RBAC grants.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            # The API server's identity towards kubelets (logs, exec), checking theirs.
            f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={self.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP",
            # As kubeadm: a front-proxy CA of its own (trusting the cluster CA here would
            # let any kubelet assert any user in a header). Components that delegate
            # authentication read it; without it they complain every few seconds.
            f"--requestheader-client-ca-file={d / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={d / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={d / 'front-proxy-client.key'}",
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
        """Stops the scheduler and controller-manager (if any), kube-apiserver, then etcd.
        Idempotent; the work dir is left for the caller."""
        for program in PROGRAMS:
            self._terminate(program)

    def apiserver_running(self) -> bool:
        return self._daemons.running(APISERVER)

    def ready(self) -> bool:
        """Whether the API server answers /readyz with 200 right now."""
        try:
            return self._apiserver_ready()
        except (OSError, http.client.HTTPException):
            return False

    def pid(self, program: str) -> int | None:
        return self._daemons.pid(program)

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
        return write_kubeconfig(path, server=self.url, ca=self.ca_cert, user=user, token=token)

    def write_client_kubeconfig(self, path: Path, user: str, groups: Sequence[str] = (),
                                ) -> Path:
        """A kubeconfig with a fresh client certificate for ``user`` in ``groups``, signed by
        the cluster CA (written next to it as ``<stem>.crt``/``<stem>.key``). Unlike tokens,
        certificates need no API server restart: any time after start() works."""
        cert, key = self.ca().issue(user, groups)
        crt_path, key_path = write_pair(path.parent, path.stem, cert, key)
        return write_kubeconfig(path, server=self.url, ca=self.ca_cert, user=user,
                                cert=crt_path, key=key_path)

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
        ca = CertificateAuthority.create()
        ca.save(self.ca_cert, self.ca_key)
        # Pods reach the API at the `kubernetes` Service address (the lab DNATs it to us).
        ips = dict.fromkeys([self.bind_address, "127.0.0.1", SERVICE_IP])
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                           "kubernetes.default.svc",
                                           "kubernetes.default.svc.cluster.local")]
        serving, serving_key = ca.issue(APISERVER, client=False, sans=sans)
        write_pair(d, "apiserver", serving, serving_key)
        write_pair(d, "apiserver-kubelet-client",
                   *ca.issue("kube-apiserver-kubelet-client", ["system:masters"]))
        front_proxy = CertificateAuthority.create("wgmanager-lab-front-proxy-ca")
        front_proxy.save(d / "front-proxy-ca.crt", d / "front-proxy-ca.key")
        write_pair(d, "front-proxy-client", *front_proxy.issue("front-proxy-client"))
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_private(d / "sa.key", private_pem(sa_key))
        (d / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.write_kubeconfig(self.admin_kubeconfig, self.admin_token)

    def _write_token_file(self) -> None:
        lines = [f'{t.token},{t.user},{t.user},"{",".join(t.groups)}"' for t in self._tokens]
        write_private(self.work_dir / "tokens.csv", "\n".join(lines) + "\n")

    def _start_controllers(self) -> None:
        """kube-controller-manager, then kube-scheduler, each under its own certificate
        identity (the RBAC bootstrap policy has roles for exactly these names)."""
        d = self.work_dir
        for program in (CONTROLLER_MANAGER, SCHEDULER):
            require_binary(kube_binary(program), program)
        cm_config = self.write_client_kubeconfig(d / "controller-manager.kubeconfig",
                                                 "system:kube-controller-manager")
        sched_config = self.write_client_kubeconfig(d / "scheduler.kubeconfig",
                                                    "system:kube-scheduler")
        masks = dict(zip((4, 6), NODE_CIDR_MASKS, strict=True))
        families = [ipaddress.ip_network(c).version for c in self.cluster_cidrs]
        mask_flags = [f"--node-cidr-mask-size-ipv{v}={masks[v]}" for v in families]
        if len(families) == 1:
            mask_flags = [f"--node-cidr-mask-size={masks[families[0]]}"]
        self._start_secure(CONTROLLER_MANAGER, cm_config, [
            "--allocate-node-cidrs=true",
            f"--cluster-cidr={','.join(self.cluster_cidrs)}",
            *mask_flags,
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--feature-gates=IPv6DualStack=true",
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={self.ca_cert}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={self.ca_cert}",
            f"--cluster-signing-key-file={self.ca_key}",
            f"--controllers=*,{','.join('-' + c for c in CLOUD_CONTROLLERS)}",
            "--configure-cloud-routes=false",
            # Its default, /usr/libexec/kubernetes/..., is created if missing: keep it ours.
            f"--flex-volume-plugin-dir={d / 'flexvolume'}",
        ])
        self._start_secure(SCHEDULER, sched_config, [])

    def _start_secure(self, program: str, kubeconfig: Path, flags: list[str]) -> None:
        """A controller with its health on a free HTTPS port of 127.0.0.1 (labs run side
        by side, so never the fixed default port) and no insecure port; waits for /healthz."""
        port = free_port()
        self._spawn(program, [
            str(kube_binary(program)),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--port=0",
            f"--cert-dir={self.work_dir / (program + '-certs')}",
            "--leader-elect=false", "--profiling=false",
            *flags,
        ])
        self._wait(program, lambda: _https_ok(port, "/healthz"))

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
        self._daemons.spawn(program, argv, env=env)

    def _wait(self, program: str, probe: Callable[[], bool]) -> None:
        self._daemons.wait(program, probe)

    def _terminate(self, program: str) -> None:
        self._daemons.terminate(program)

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


# -- crash cleanup ----------------------------------------------------------------------


def cleanup_stale(root: Path) -> list[str]:
    """Stops control planes under ``root`` whose owner process is gone; removes their dirs.

    Mirrors the integration harness's ``remove_stale_runs``, which removes dead runs' dirs
    but knows nothing of these processes. So, besides the pid files of work dirs that still
    exist, processes are also found by their cwd: a control-plane process whose cwd is
    (or was) under ``root`` and whose owner is gone is stale. Returns the removed dir names.
    """
    removed = []
    if root.is_dir():
        for work_dir in sorted(root.iterdir()):
            if not (work_dir / MARKER).is_file() or _owner_alive(work_dir):
                continue
            for program in PROGRAMS:
                with contextlib.suppress(OSError, ValueError):
                    pid = int((work_dir / f"{program}.pid").read_text().split()[0])
                    if pid in dict(_processes_under(work_dir)):
                        kill(pid)
            shutil.rmtree(work_dir, ignore_errors=True)
            removed.append(work_dir.name)
    for pid, cwd in _processes_under(root):
        if not _owner_alive(cwd):
            kill(pid)
    return removed


def _https_ok(port: int, path: str) -> bool:
    """Whether a component's self-signed health endpoint on 127.0.0.1 answers 200 (what it
    says matters here, not who says it: the port is ours, from free_port)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    finally:
        conn.close()


def _owner_alive(work_dir: Path) -> bool:
    try:
        os.kill(int((work_dir / "owner.pid").read_text().strip()), 0)
    except (OSError, ValueError):  # no file (or no dir), garbage, or no such process
        return False
    return True


def _processes_under(root: Path) -> Iterator[tuple[int, Path]]:
    """(pid, cwd) of every control-plane process whose cwd is (or was) under ``root``."""
    return processes_under(root, PROGRAMS)


def stop_processes_under(work_dir: Path) -> int:
    """Stops every control-plane process running in ``work_dir`` (found by cwd, so a reused
    pid is never hit). For a process that did not start them, e.g. `wgmanager lab down`."""
    count = 0
    for pid, _cwd in list(_processes_under(work_dir)):
        kill(pid)
        count += 1
    return count
