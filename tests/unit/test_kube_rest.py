"""The agent's own API client: kubeconfig credentials, requests, errors, watch streams.

Against a real HTTPS server on loopback (the lab's PKI issues its certificate and the
client's), so the TLS settings a kubeconfig gives are the ones a handshake checks.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wgmanager.errors import ConfigError
from wgmanager.kube.client import NodesAPI, NotFound
from wgmanager.kube.rest import KEEPALIVE_IDLE, ApiStatus, RestClient, connect
from wgmanager.kube.watch import events
from wgmanager.lab.pki import CertificateAuthority, private_pem, write_pair


@dataclass
class Seen:
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    client_cn: list[str] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    seen: Seen

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.requests.append((self.command, self.path, dict(self.headers), body))
        peer = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
        if peer:
            self.seen.client_cn.append(dict(x[0] for x in peer["subject"])["commonName"])
        if self.path.startswith("/api/v1/nodes/missing"):
            self._json(404, {"kind": "Status", "message": 'nodes "missing" not found'})
        elif "watch=true" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for i in range(3):
                line = {"type": "ADDED", "object": {"metadata": {"name": f"n{i}"}}}
                self.wfile.write(json.dumps(line).encode() + b"\n")
        else:
            self._json(200, {"items": [], "metadata": {"resourceVersion": "7"}})

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = _answer


@dataclass
class Server:
    url: str
    seen: Seen
    ca: CertificateAuthority
    dir: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    ca = CertificateAuthority.create()
    cert, key = ca.issue("apiserver", client=False,
                         sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    crt_path, key_path = write_pair(tmp_path, "server", cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt_path, key_path)
    ctx.load_verify_locations(cadata=ca.cert.public_bytes(serialization.Encoding.PEM).decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    seen = Seen()
    handler = type("H", (Handler,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"https://127.0.0.1:{httpd.server_address[1]}", seen, ca, tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def pem(obj: x509.Certificate) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_token_and_ca_file(server: Server) -> None:
    (server.dir / "ca.crt").write_bytes(pem(server.ca.cert))
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority": "ca.crt"},  # relative
                     {"token": "s3cret"})
    api = NodesAPI(connect(cfg))
    assert api.list_page(limit=500, cont="abc")["metadata"]["resourceVersion"] == "7"
    method, path, headers, _ = server.seen.requests[-1]
    assert (method, path) == ("GET", "/api/v1/nodes?limit=500&continue=abc")
    assert headers["Authorization"] == "Bearer s3cret"


def test_inline_client_certificate_leaves_no_file(server: Server, tmp_path: Path) -> None:
    cert, key = server.ca.issue("system:node:n1", ["system:nodes"])
    cfg = kubeconfig(server.dir / "kc", {
        "server": server.url, "certificate-authority-data": b64(pem(server.ca.cert))},
        {"client-certificate-data": b64(pem(cert)), "client-key-data": b64(private_pem(key))})
    before = set(Path("/tmp").iterdir())
    api = NodesAPI(connect(cfg))
    api.patch_annotations("n1", {"wgmanager.io/public-key": "k", "wgmanager.io/x": None})
    method, path, headers, body = server.seen.requests[-1]
    assert (method, path) == ("PATCH", "/api/v1/nodes/n1")
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert json.loads(body) == {"metadata": {"annotations": {"wgmanager.io/public-key": "k",
                                                             "wgmanager.io/x": None}}}
    assert "Authorization" not in headers
    assert server.seen.client_cn[-1] == "system:node:n1"
    assert set(Path("/tmp").iterdir()) == before


def test_token_file_and_client_cert_files(server: Server) -> None:
    cert, key = server.ca.issue("agent")
    write_pair(server.dir, "client", cert, key)
    (server.dir / "ca.crt").write_bytes(pem(server.ca.cert))
    (server.dir / "token").write_text("t0k\n")
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority": str(server.dir / "ca.crt")},
                     {"tokenFile": "token", "client-certificate": "client.crt",
                      "client-key": "client.key"})
    NodesAPI(connect(cfg)).get("n1")
    assert server.seen.requests[-1][2]["Authorization"] == "Bearer t0k"
    assert server.seen.client_cn[-1] == "agent"


def test_an_unknown_ca_is_refused(server: Server) -> None:
    other = CertificateAuthority.create("someone-else")
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority-data": b64(pem(other.cert))},
                     {"token": "x"})
    with pytest.raises(Exception, match="listing nodes"):
        NodesAPI(connect(cfg), request_timeout=5).list_page(limit=1, cont=None)


def test_error_status_maps_to_the_hierarchy(server: Server) -> None:
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority-data": b64(pem(server.ca.cert))},
                     {"token": "x"})
    client = connect(cfg)
    with pytest.raises(ApiStatus) as raised:
        client.json("GET", "/api/v1/nodes/missing")
    assert raised.value.status == 404 and "not found" in str(raised.value)
    with pytest.raises(NotFound):
        NodesAPI(client).get("missing")


def test_watch_streams_events(server: Server) -> None:
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority-data": b64(pem(server.ca.cert))},
                     {"token": "x"})
    resp = NodesAPI(connect(cfg)).watch(resource_version="7", timeout_seconds=5)
    try:
        names = [e["object"]["metadata"]["name"] for e in events(resp)]
    finally:
        resp.close()
        resp.release_conn()
    assert names == ["n0", "n1", "n2"]
    path = server.seen.requests[-1][1]
    assert "resourceVersion=7" in path and "allowWatchBookmarks=true" in path
    assert "timeoutSeconds=5" in path


def test_connections_have_tcp_keepalive(server: Server) -> None:
    """A watch whose server end vanished silently is found by keepalive, not after the
    watch timeout (the e2e cut test proves the effect on a real agent)."""
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority-data": b64(pem(server.ca.cert))},
                     {"token": "x"})
    client = connect(cfg)
    conn = client._pool.connection_from_url(server.url)._new_conn()
    try:
        conn.connect()
        assert conn.sock is not None
        assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
    finally:
        conn.close()


def test_exec_plugin_goes_through_the_kubernetes_package(server: Server) -> None:
    """A laptop's kubeconfig (an exec plugin): delegated, and the token is the plugin's."""
    plugin = server.dir / "plugin.py"
    plugin.write_text("import json\nprint(json.dumps({'apiVersion': "
                      "'client.authentication.k8s.io/v1beta1', 'kind': 'ExecCredential', "
                      "'status': {'token': 'from-exec'}}))\n")
    cfg = kubeconfig(server.dir / "kc", {"server": server.url,
                                         "certificate-authority-data": b64(pem(server.ca.cert))},
                     {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                               "command": sys.executable, "args": [str(plugin)]}})
    NodesAPI(connect(cfg)).get("n1")
    assert server.seen.requests[-1][2]["Authorization"] == "Bearer from-exec"


def test_bad_kubeconfig_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "kc"
    bad.write_text("current-context: nope\ncontexts: []\n")
    with pytest.raises(ConfigError, match="no context named 'nope'"):
        connect(bad)
    with pytest.raises(ConfigError, match="cannot load Kubernetes credentials"):
        connect(tmp_path / "missing")


def test_plain_http_server_needs_no_tls() -> None:
    client = RestClient("http://127.0.0.1:9/", ssl_context=None)
    assert client.server == "http://127.0.0.1:9"
