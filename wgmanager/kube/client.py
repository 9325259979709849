"""Talking to the API server: configuration, errors, and the annotation patch.

Errors are mapped to a small hierarchy so callers decide by kind, not by status code:

    KubeError
     ├── Gone              410: the watch's resourceVersion is too old; relist
     ├── Forbidden         401/403: RBAC or credentials; retrying will not help
     ├── NotFound          404
     └── Transient         409/429/5xx and connection failures; retry with backoff
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from urllib3.exceptions import HTTPError

from wgmanager.errors import ConfigError, WgmError
from wgmanager.kube.rest import ApiStatus, RestClient, keepalive_socket_options, node_path
from wgmanager.kube.translate import annotations_patch

if TYPE_CHECKING:
    from kubernetes import client as k8s

log = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"

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
    """A KubeError for an API status (ours, ``ApiStatus``, or the kubernetes package's
    ``ApiException``: both carry ``status`` and ``reason``) or a connection failure."""
    status = getattr(e, "status", None)
    if isinstance(e, ApiStatus) or (isinstance(status, int) and hasattr(e, "reason")):
        status = status or 0
        reason = (getattr(e, "reason", "") or "").strip()
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
    """An ApiClient of the kubernetes package (for the commands that use its typed API:
    the startup-taint controller, doctor), from a kubeconfig file or in-cluster config.
    Imported here, not at the top: the agent never loads that package (see kube.rest)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

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

    def __init__(self, api: RestClient, *, request_timeout: float = 30.0,
                 writer: RestClient | None = None, writer_source: str = "") -> None:
        self.api = api
        self.writer = writer if writer is not None else api
        self.writer_source = writer_source
        self.request_timeout = request_timeout

    def list_page(self, *, limit: int, cont: str | None) -> dict[str, Any]:
        query: dict[str, Any] = {"limit": limit} if limit else {}
        if cont:
            query["continue"] = cont
        try:
            return self.api.json("GET", node_path(), query=query,
                                 timeout=self.request_timeout)
        except (ApiStatus, HTTPError, OSError, ValueError) as e:
            raise classify(e, "listing nodes") from e

    def watch(self, *, resource_version: str, timeout_seconds: int) -> Any:
        """A streaming response of watch events (one JSON object per line)."""
        try:
            return self.api.request(
                "GET", node_path(), query={
                    "watch": True, "resourceVersion": resource_version,
                    "allowWatchBookmarks": True, "timeoutSeconds": timeout_seconds},
                timeout=(self.request_timeout, timeout_seconds + 30), stream=True)
        except (ApiStatus, HTTPError, OSError) as e:
            raise classify(e, "watching nodes") from e

    def get(self, name: str) -> dict[str, Any]:
        try:
            return self.api.json("GET", node_path(name), timeout=self.request_timeout)
        except (ApiStatus, HTTPError, OSError, ValueError) as e:
            raise classify(e, f"reading node {name}") from e

    def patch_annotations(self, name: str, values: dict[str, str | None]) -> None:
        """Sets (None: removes) exactly these annotations on the Node, nothing else."""
        try:
            self.writer.request("PATCH", node_path(name), body=annotations_patch(values),
                                content_type=MERGE_PATCH, timeout=self.request_timeout)
        except ApiStatus as e:
            if e.status == 403 and self.writer_source:
                raise Forbidden(
                    f"annotating node {name}: 403 with the node credentials from "
                    f"{self.writer_source}: they must be node {name}'s own (the kubelet's, "
                    f"user system:node:{name}); point --node-kubeconfig at this node's "
                    "kubelet kubeconfig") from e
            raise classify(e, f"annotating node {name}") from e
        except (HTTPError, OSError) as e:
            raise classify(e, f"annotating node {name}") from e
