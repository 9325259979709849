"""Talking to the API server: configuration, errors, and the annotation patch.

Errors are mapped to a small hierarchy so callers decide by kind, not by status code:

    KubeError
     ├── Gone              410: the watch's resourceVersion is too old; relist
     ├── Forbidden         401/403: RBAC or credentials; retrying will not help
     ├── NotFound          404
     └── Transient         409/429/5xx and connection failures; retry with backoff
"""

from __future__ import annotations

import json
import logging
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.connection import HTTPConnection
from urllib3.exceptions import HTTPError

from wgmanager.errors import ConfigError, WgmError
from wgmanager.kube.translate import annotations_patch

log = logging.getLogger(__name__)

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


class KubeError(WgmError):
    pass


class Gone(KubeError):
    pass


class Forbidden(KubeError):
    pass


class NotFound(KubeError):
    pass


class Transient(KubeError):
    pass


def classify(e: Exception, what: str) -> KubeError:
    if isinstance(e, ApiException):
        status = e.status or 0
        reason = (e.reason or "").strip()
        if status == 410:
            return Gone(f"{what}: resourceVersion expired (410)")
        if status in (401, 403):
            return Forbidden(f"{what}: {status} {reason}; check the agent's token and its "
                             "ClusterRole (docs/install.md lists the RBAC it needs)")
        if status == 404:
            return NotFound(f"{what}: not found")
        return Transient(f"{what}: {status} {reason}")
    return Transient(f"{what}: {type(e).__name__}: {e}")


def load_api(kubeconfig: Path | None) -> k8s.ApiClient:
    """An ApiClient from a kubeconfig file, or in-cluster config when none is given."""
    cfg = k8s.Configuration()
    try:
        if kubeconfig is not None:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), client_configuration=cfg)
        else:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg)
    except (k8s_config.ConfigException, OSError) as e:
        where = kubeconfig or "in-cluster service account"
        raise ConfigError(f"cannot load Kubernetes credentials from {where}: {e}; pass "
                          "--kubeconfig or run inside a pod with a service account") from e
    cfg.socket_options = keepalive_socket_options()
    return k8s.ApiClient(cfg)


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset on success."""

    initial: float = 0.5
    maximum: float = 30.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class NodesAPI:
    """The handful of Node calls the agent makes, returning plain JSON dicts.

    ``writer`` is the identity our own Node's annotations are written with: the node's own
    (its kubelet's credentials), which the API server's Node authorizer and NodeRestriction
    let write that Node and no other. Reads and watches use ``api``, the agent's service
    account, which then needs no write access to nodes at all. Without a writer, writes use
    ``api`` too, and whoever holds that credential can write every node's key.
    """

    def __init__(self, api: k8s.ApiClient, *, request_timeout: float = 30.0,
                 writer: k8s.ApiClient | None = None, writer_source: str = "") -> None:
        # Typed as Any: with _preload_content=False the client returns raw responses, which
        # its generated annotations do not describe.
        self.core: Any = k8s.CoreV1Api(api)
        self.writer: Any = k8s.CoreV1Api(writer) if writer is not None else self.core
        self.writer_source = writer_source
        self.request_timeout = request_timeout

    def list_page(self, *, limit: int, cont: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"limit": limit, "_preload_content": False,
                                  "_request_timeout": self.request_timeout}
        if cont:
            kwargs["_continue"] = cont
        try:
            resp = self.core.list_node(**kwargs)
            return json.loads(resp.data)  # type: ignore[no-any-return]
        except (ApiException, HTTPError, OSError, ValueError) as e:
            raise classify(e, "listing nodes") from e

    def watch(self, *, resource_version: str, timeout_seconds: int) -> Any:
        """A streaming response of watch events (one JSON object per line)."""
        try:
            return self.core.list_node(
                watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds, _preload_content=False,
                _request_timeout=(self.request_timeout, timeout_seconds + 30))
        except (ApiException, HTTPError, OSError) as e:
            raise classify(e, "watching nodes") from e

    def get(self, name: str) -> dict[str, Any]:
        try:
            resp = self.core.read_node(name, _preload_content=False,
                                       _request_timeout=self.request_timeout)
            return json.loads(resp.data)  # type: ignore[no-any-return]
        except (ApiException, HTTPError, OSError, ValueError) as e:
            raise classify(e, f"reading node {name}") from e

    def patch_annotations(self, name: str, values: dict[str, str | None]) -> None:
        """Sets (None: removes) exactly these annotations on the Node, nothing else."""
        try:
            # Raw response: the patched Node is not needed, and deserialising it into the
            # client's models could fail on fields this client version does not know.
            resp = self.writer.patch_node(name, annotations_patch(values),
                                          _preload_content=False,
                                          _request_timeout=self.request_timeout)
            resp.release_conn()
        except ApiException as e:
            if e.status == 403 and self.writer_source:
                raise Forbidden(
                    f"annotating node {name}: 403 with the node credentials from "
                    f"{self.writer_source}: they must be node {name}'s own (the kubelet's, "
                    f"user system:node:{name}); point --node-kubeconfig at this node's "
                    "kubelet kubeconfig") from e
            raise classify(e, f"annotating node {name}") from e
        except (HTTPError, OSError) as e:
            raise classify(e, f"annotating node {name}") from e
