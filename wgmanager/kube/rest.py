"""The API server's REST interface over urllib3: credentials, requests, status errors.

Why not the ``kubernetes`` package here: importing any part of it runs its package
``__init__``, which loads the dynamic client, jsonschema, websocket and OAuth libraries,
~20 MiB of resident memory for the agent's whole life (measured: 59 vs 39 MiB after
importing the agent's other libraries), for five kinds of request on plain JSON (list,
watch, get and patch a Node; create an Event). urllib3, which that package uses
underneath, makes them directly. The lab, the startup-taint controller and doctor keep the
package; the agent, `status` and `rotate-keys` use this.

Credentials (``connect``): a kubeconfig's current context with a bearer token (inline or
``tokenFile``) and/or a client certificate (file or inline data), the CA (file or data);
or, without a kubeconfig, the in-cluster service account, whose token is re-read as the
kubelet rotates it. Inline key material is loaded through an anonymous in-memory file, so
nothing is left on disk. Kubeconfig features beyond those (exec plugins, auth providers,
proxies: a cloud user's laptop, never a node) go through the ``kubernetes`` package's own
loader, imported only then.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
import yaml
from urllib3.connection import HTTPConnection

from wgmanager.errors import ConfigError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD = 60.0  # seconds; kubelet refreshes a projected token long before it expires
# Kubeconfig user fields this module handles itself; any other makes ``connect`` delegate.
_OWN_USER_FIELDS = frozenset({"token", "tokenFile", "client-certificate",
                              "client-certificate-data", "client-key", "client-key-data"})
_OWN_CLUSTER_FIELDS = frozenset({"server", "certificate-authority",
                                 "certificate-authority-data", "insecure-skip-tls-verify",
                                 "extensions"})

# TCP keepalive on every connection to the API server (client-go dials with one too). A
# watch waits for the server to speak; if the server's end of the connection vanished
# without a word reaching us (a NAT table replaced under it, a load balancer or API server
# failing over), the read would otherwise wait out the whole watch timeout (5.5 min) and the
# node would miss every change meanwhile. With these, a peer that answers with a reset is
# found after KEEPALIVE_IDLE seconds of silence, a black hole after idle + interval * count.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 4


def keepalive_socket_options(idle: int = KEEPALIVE_IDLE, interval: int = KEEPALIVE_INTERVAL,
                             count: int = KEEPALIVE_COUNT) -> list[tuple[int, int, int]]:
    """urllib3 socket options: its defaults (no Nagle) plus Linux TCP keepalive."""
    return [*HTTPConnection.default_socket_options,
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)]


class ApiStatus(Exception):
    """The API server answered with an error status (``status``, ``reason``, its message)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {message}" if message else ""))
        self.status = status
        self.reason = reason


class RestClient:
    """Requests to one API server with one identity; thread-safe (urllib3's pool is)."""

    def __init__(self, server: str, *, ssl_context: ssl.SSLContext | None,
                 authorization: Callable[[], str | None] = lambda: None,
                 proxy: str | None = None, pool_size: int = 4) -> None:
        self.server = server.rstrip("/")
        self._authorization = authorization
        kwargs: dict[str, Any] = {"maxsize": pool_size, "retries": False,
                                  "socket_options": keepalive_socket_options()}
        if ssl_context is not None:
            kwargs["ssl_context"] = ssl_context
        self._pool = (urllib3.ProxyManager(proxy, **kwargs) if proxy
                      else urllib3.PoolManager(**kwargs))

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Any = None, content_type: str = "application/json",
                timeout: float | tuple[float, float] = 30.0,
                stream: bool = False) -> urllib3.BaseHTTPResponse:
        """One request; raises ``ApiStatus`` for an error status. With ``stream`` the body
        is left unread (a watch): the caller closes the response."""
        url = self.server + path
        if query:
            url += "?" + urlencode({k: _query_value(v) for k, v in query.items()})
        headers = {"Accept": "application/json", "User-Agent": "wgmanager"}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        resp = self._pool.request(method, url, body=data, headers=headers,
                                  timeout=urllib3.Timeout(connect=connect, read=read),
                                  preload_content=not stream, redirect=False)
        if resp.status >= 400:
            raise _status_error(resp, stream)
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose reply is a JSON object."""
        resp = self.request(method, path, **kwargs)
        return json.loads(resp.data)  # type: ignore[no-any-return]


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _status_error(resp: urllib3.BaseHTTPResponse, streamed: bool) -> ApiStatus:
    try:
        raw = resp.read() if streamed else resp.data
        message = str(json.loads(raw).get("message", ""))
    except (ValueError, AttributeError, urllib3.exceptions.HTTPError, OSError):
        message = ""
    finally:
        if streamed:
            resp.release_conn()
    return ApiStatus(resp.status, resp.reason or "", message)


def node_path(name: str = "") -> str:
    """The Nodes collection, or one Node."""
    return "/api/v1/nodes" + (f"/{quote(name, safe='')}" if name else "")


def events_path(namespace: str) -> str:
    """The (core/v1) Events of a namespace."""
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/events"


# -- credentials ------------------------------------------------------------------------

def connect(kubeconfig: Path | None) -> RestClient:
    """A client from a kubeconfig file, or from the in-cluster service account."""
    try:
        if kubeconfig is None:
            return _in_cluster()
        return _from_kubeconfig(kubeconfig)
    except (OSError, ValueError, KeyError, TypeError, ssl.SSLError, yaml.YAMLError) as e:
        where = kubeconfig or "in-cluster service account"
        raise ConfigError(f"cannot load Kubernetes credentials from {where}: {e}; pass "
                          "--kubeconfig or run inside a pod with a service account") from e


def _in_cluster() -> RestClient:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ValueError("KUBERNETES_SERVICE_HOST/PORT are not set (not in a pod)")
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    return RestClient(server, ssl_context=ctx,
                      authorization=_TokenFile(SERVICE_ACCOUNT / "token").header)


def _from_kubeconfig(path: Path) -> RestClient:
    doc = yaml.safe_load(path.read_text()) or {}
    current = doc.get("current-context")
    context = _named(doc.get("contexts"), current, "context")
    cluster = _named(doc.get("clusters"), context.get("cluster"), "cluster")
    user = _named(doc.get("users"), context.get("user"), "user") if context.get("user") else {}
    if set(user) - _OWN_USER_FIELDS or set(cluster) - _OWN_CLUSTER_FIELDS:
        return _delegated(path)
    base = path.parent

    def file(name: str) -> str | None:
        return str(base / user[name]) if user.get(name) else None

    ctx = ssl.create_default_context(
        cafile=str(base / cluster["certificate-authority"])
        if cluster.get("certificate-authority") else None,
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        if cluster.get("certificate-authority-data") else None)
    if cluster.get("insecure-skip-tls-verify"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = file("client-certificate"), file("client-key")
    if user.get("client-certificate-data") or user.get("client-key-data"):
        _load_cert_data(ctx, user.get("client-certificate-data"),
                        user.get("client-key-data"), cert, key)
    elif cert:
        ctx.load_cert_chain(cert, key)
    auth: Callable[[], str | None] = lambda: None  # noqa: E731
    if user.get("token"):
        header = f"Bearer {user['token']}"
        auth = lambda: header  # noqa: E731
    elif user.get("tokenFile"):
        auth = _TokenFile(base / user["tokenFile"]).header
    server = str(cluster["server"])
    return RestClient(server, ssl_context=ctx if server.startswith("https") else None,
                      authorization=auth)


def _named(items: Any, name: Any, field: str) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(field) or {}
            if not isinstance(value, dict):
                raise ValueError(f"{field} {name!r} is not a mapping")
            return value
    raise ValueError(f"no {field} named {name!r} (current-context and its references)")


def _load_cert_data(ctx: ssl.SSLContext, cert_data: str | None, key_data: str | None,
                    cert_file: str | None, key_file: str | None) -> None:
    """Loads a client certificate given inline, through anonymous in-memory files (the
    ``ssl`` module reads key material from paths only)."""
    fds: list[int] = []

    def path_of(data: str | None, fallback: str | None) -> str | None:
        if data is None:
            return fallback
        fd = os.memfd_create("wgmanager-kubeconfig", os.MFD_CLOEXEC)
        fds.append(fd)
        os.write(fd, base64.b64decode(data))
        return f"/proc/self/fd/{fd}"

    try:
        cert = path_of(cert_data, cert_file)
        key = path_of(key_data, key_file)
        if cert is None:
            raise ValueError("client-key-data without a client certificate")
        ctx.load_cert_chain(cert, key)
    finally:
        for fd in fds:
            os.close(fd)


class _TokenFile:
    """A bearer token read from a file, re-read every ``TOKEN_REREAD`` seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._value = self._read()
        self._read_at = time.monotonic()

    def _read(self) -> str:
        return self.path.read_text().strip()

    def header(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._read_at > TOKEN_REREAD:
                # On failure keep the last token: the API server says when it is no good.
                with contextlib.suppress(OSError):
                    self._value = self._read()
                self._read_at = time.monotonic()
            return f"Bearer {self._value}" if self._value else None


def _delegated(path: Path) -> RestClient:
    """Kubeconfig features this module does not implement, via the kubernetes package."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    cfg = k8s.Configuration()
    try:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(path), client_configuration=cfg)
    except k8s_config.ConfigException as e:
        raise ValueError(str(e)) from e
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)

    def auth() -> str | None:
        # "Bearer ..." as the loader stores it; the call runs its refresh hook (an exec
        # plugin's token is fetched again when it expires).
        value: str | None = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        return value

    return RestClient(cfg.host, ssl_context=ctx if cfg.host.startswith("https") else None,
                      authorization=auth, proxy=cfg.proxy or None)
