"""Pods on a new node encrypted from their first packet: the startup taint, removed when the
node's agent is Ready.

Why: a node's agent is a DaemonSet pod, and the kubelet starts it alongside every other pod
scheduled there. A pod that sends before the agent has attached the datapath goes out in
plaintext over the CNI's route (measured: tests/e2e/test_lab_on_kubelets.py). Kubelets
registered with ``--register-with-taints=wgmanager.io/agent-not-ready=true:NoSchedule``
get no ordinary pods until this controller removes that taint, which it does once the
node's agent pod is Ready (its /readyz: synced with the API, datapath attached). Cilium's
operator does the same with node.cilium.io/agent-not-ready.

Why a controller and not the agent: the agent writes its Node with the node's own identity,
and NodeRestriction forbids a node to change its own taints (so that a node cannot invite
workloads). This one cluster-wide Deployment holds ``patch nodes``, not every node.

Work is proportional to change: a watch on the agent pods, one GET (and at most one PATCH)
per pod that turns Ready, and a full pass (one pod list, one node list) at start and on each
resync. The PATCH is a JSON patch that first tests the taint list it read, so a concurrent
change by anyone else is never overwritten (the next event or resync retries).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from wgmanager.kube.watch import events

log = logging.getLogger(__name__)

TAINT_KEY = "wgmanager.io/agent-not-ready"
AGENT_SELECTOR = "app.kubernetes.io/component=agent"


def without_taint(taints: Iterable[Mapping[str, Any]] | None,
                  key: str) -> list[dict[str, Any]] | None:
    """The taint list without ``key`` (any value or effect), or None if it has no such taint."""
    current = [dict(t) for t in taints or []]
    kept = [t for t in current if t.get("key") != key]
    return kept if len(kept) != len(current) else None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod (raw API JSON) is Ready and not being deleted."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def ready_nodes(pods: Iterable[Mapping[str, Any]]) -> set[str]:
    """Names of the nodes whose agent pod is Ready."""
    return {p["spec"]["nodeName"] for p in pods
            if pod_ready(p) and (p.get("spec") or {}).get("nodeName")}


class StartupTaintController:
    def __init__(self, api: k8s.ApiClient, *, namespace: str, key: str = TAINT_KEY,
                 selector: str = AGENT_SELECTOR, resync_seconds: int = 300,
                 request_timeout: float = 30.0) -> None:
        # Typed as Any: with _preload_content=False the client returns raw responses.
        self.core: Any = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.key = key
        self.selector = selector
        self.resync_seconds = resync_seconds
        self.request_timeout = request_timeout

    def run(self, stop: threading.Event) -> None:
        """Full pass, then watch until the resync period ends; again, until ``stop``."""
        while not stop.is_set():
            try:
                version = self.full_pass()
                self._watch(version, stop)
            except (ApiException, HTTPError, OSError) as e:
                log.warning("startup taint controller: %s; retrying in 5 s", _describe(e))
                stop.wait(5)

    def full_pass(self) -> str:
        """Removes the taint from every tainted node whose agent is Ready; returns the pod
        list's resourceVersion, where the watch starts."""
        pods = _json(self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False,
            _request_timeout=self.request_timeout))
        ready = ready_nodes(pods["items"])
        cont: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cont:
                params["_continue"] = cont
            nodes = _json(self.core.list_node(**params, _preload_content=False,
                                              _request_timeout=self.request_timeout))
            for node in nodes["items"]:
                name = node["metadata"]["name"]
                if name in ready:
                    self._untaint(node)
            cont = nodes["metadata"].get("continue")
            if not cont:
                break
        return str(pods["metadata"]["resourceVersion"])

    def node_ready(self, name: str) -> bool:
        """One node's agent turned Ready: removes its taint if it has one. True if removed."""
        node = _json(self.core.read_node(name, _preload_content=False,
                                         _request_timeout=self.request_timeout))
        return self._untaint(node)

    def _watch(self, version: str, stop: threading.Event) -> None:
        resp = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, watch=True,
            resource_version=version, timeout_seconds=self.resync_seconds,
            _preload_content=False,
            _request_timeout=(self.request_timeout, self.resync_seconds + 30))
        try:
            for event in events(resp):
                if stop.is_set():
                    return
                if event["type"] == "ERROR":  # e.g. 410 Gone: start over with a full pass
                    return
                if event["type"] in ("ADDED", "MODIFIED") and ready_nodes([event["object"]]):
                    self.node_ready(event["object"]["spec"]["nodeName"])
        finally:
            resp.release_conn()

    def _untaint(self, node: Mapping[str, Any]) -> bool:
        name = node["metadata"]["name"]
        taints = (node.get("spec") or {}).get("taints")
        kept = without_taint(taints, self.key)
        if kept is None:
            return False
        patch = [{"op": "test", "path": "/spec/taints", "value": taints},
                 {"op": "replace", "path": "/spec/taints", "value": kept}]
        try:
            self.core.patch_node(name, patch, _request_timeout=self.request_timeout)
        except ApiException as e:
            if e.status in (404, 409, 422):  # gone, or changed since read: next event/resync
                log.info("node %s changed while removing %s (%s); will retry", name,
                         self.key, e.status)
                return False
            raise
        log.info("removed taint %s from node %s: its agent is Ready", self.key, name)
        return True



def _json(resp: Any) -> dict[str, Any]:
    try:
        return json.loads(resp.data)  # type: ignore[no-any-return]
    finally:
        resp.release_conn()


def _describe(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"API error {e.status} {(e.reason or '').strip()}"
    return f"{type(e).__name__}: {e}"
