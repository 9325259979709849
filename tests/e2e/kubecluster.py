"""The e2e tests' view of a lab: `wgmanager.lab.Lab` plus a few assertions helpers.

The tests build their cluster with the same code as `wgmanager lab up` (a real etcd +
kube-apiserver with TLS, token auth and RBAC; Node objects registered as kubelet would; one
real agent process per node), under /run/wgmanager-tests so that crashed runs are swept by
the integration harness's stale-run cleanup.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

from tests.integration.harness import PIN_ROOT, RUN_ROOT, cleanup_prefix
from wgmanager.core.keys import PublicKey
from wgmanager.datapath.maps import PinnedMaps
from wgmanager.lab import traffic
from wgmanager.lab.capture import Capture
from wgmanager.lab.lab import Lab, await_condition
from wgmanager.lab.topology import Pod, SimNode
from wgmanager.wireguard.userspace import UserspaceBackend

__all__ = ["GET_ONLY_USER", "KubeCluster", "await_condition"]
GET_ONLY_USER = "wgmanager-get-only"  # may read its own Node but not list them


class KubeCluster:
    def __init__(self, prefix: str) -> None:
        self.lab = Lab(RUN_ROOT / prefix, prefix=prefix, pin_root=PIN_ROOT,
                       extra_users=(GET_ONLY_USER,))

    @property
    def topo(self) -> Any:
        return self.lab.topology

    @property
    def core(self) -> Any:
        return self.lab.core

    @property
    def cp(self) -> Any:
        assert self.lab.cp is not None
        return self.lab.cp

    def members(self) -> list[SimNode]:
        return [n for n in self.lab.nodes if self.lab.agent_pid(n) is not None]

    def register_node(self, node: SimNode) -> None:
        self.lab.register_node(node)

    def register(self, name: str, addresses: list[str], pod_cidrs: list[str], *,
                 annotations: dict[str, str] | None = None) -> None:
        self.lab.register(name, addresses, pod_cidrs, annotations=annotations)

    def delete_node(self, name: str) -> None:
        self.core.delete_node(name)

    def annotation(self, name: str) -> str | None:
        return self.lab.annotation(name)

    def start_agent(self, node: SimNode) -> None:
        self.lab.start_agent(node)

    def kill_agent(self, node: SimNode, sig: int = signal.SIGKILL) -> None:
        self.lab.stop_agent(node, sig)

    def agent_log(self, node: SimNode) -> str:
        path = self.lab.agent_log_file(node)
        return path.read_text(errors="replace") if path.exists() else ""

    def readyz(self, node: SimNode) -> dict[str, Any] | None:
        return self.lab.health(node)

    def device(self, node: SimNode) -> UserspaceBackend:
        return self.lab.device(node)

    def peer_keys(self, node: SimNode) -> set[PublicKey]:
        return self.lab.peer_keys(node)

    def converged(self, members: list[SimNode]) -> bool:
        return self.lab.converged(members)

    def capture(self, name: str) -> contextlib.AbstractContextManager[Capture]:
        return self.lab.capture(name)

    def reaches(self, pod: Pod, dst: str) -> bool:
        return traffic.reaches(pod, dst)

    def ping(self, pod: Pod, dst: str, **kwargs: Any) -> tuple[int, int]:
        return traffic.ping(pod, dst, **kwargs)

    def diagnose(self) -> str:
        """Each node's datapath, device and neighbours: attached to assertion messages."""
        out = []
        for node in self.members():
            with contextlib.suppress(Exception), PinnedMaps(self.lab.pin_root / node.name) as m:
                out.append(f"{node.name} map={m.read_cidrs()} counters={m.read_counters()}")
            with contextlib.suppress(Exception):
                out.append(f"{node.name} peers={self.device(node).read().peers}")
            res = subprocess.run(["ip", "netns", "exec", node.netns, "ip", "-6", "neigh"],
                                 capture_output=True, text=True, check=False)
            out.append(f"{node.name} neigh6={res.stdout.strip()!r}")
            out.append(f"{node.name} log tail={self.agent_log(node)[-600:]!r}")
        return "\n".join(out)


@contextlib.contextmanager
def running_cluster(stem: str, *, nodes: int = 3, pods_per_node: int = 1) -> Iterator[KubeCluster]:
    """A lab cluster with every agent started, under a fresh prefix starting with ``stem``;
    removed completely afterwards (a module fixture's body)."""
    prefix = stem + secrets.token_hex(2)
    cluster = KubeCluster(prefix)
    try:
        cluster.lab.up(nodes=nodes, pods_per_node=pods_per_node)
        yield cluster
    finally:
        cluster.lab.down()
        cleanup_prefix(prefix)
