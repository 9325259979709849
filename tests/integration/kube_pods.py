"""Helpers for tests on a cluster of real kubelets (``wgmanager.lab.kubelets.RealCluster``):
the API client, a wait that returns what it waited for, and exec into a pod."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.stream import stream

from wgmanager.lab.kubelets import RealCluster


def core(kube: RealCluster) -> Any:
    return client.CoreV1Api(kube.api)


def await_true(cond: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Polls until ``cond()`` is truthy and returns that value (the pod, the object), unlike
    ``wgmanager.lab.lab.await_condition``, which returns the time it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def pod_exec(api: Any, name: str, argv: list[str], timeout: float = 30) -> tuple[int, str]:
    """Runs ``argv`` in the pod through the API server and the kubelet; (exit code, output)."""
    resp = stream(api.connect_get_namespaced_pod_exec, name, "default", command=argv,
                  stdout=True, stderr=True, stdin=False, tty=False, _preload_content=False)
    resp.run_forever(timeout=timeout)
    output = resp.read_stdout() + resp.read_stderr()
    code = resp.returncode
    resp.close()
    return code, output
