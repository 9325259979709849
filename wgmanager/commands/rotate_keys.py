"""`wgmanager rotate-keys`: ask agents, through the Kubernetes API, to rotate their keys.

The request is an annotation on the Node (a fresh id per node and run); the agent answers in
its status annotation (``wgmanager.core.rotation.status_annotation``) and does the rotation
itself, so the CLI needs nothing but API access: no node login, no key ever leaves a node.
With several nodes it rolls through them ``max_concurrent`` at a time and stops starting new
ones after the first failure. A node counts as done only when its agent reports the rotation
completed, which it does once every peer has confirmed the new key by a handshake, and the
Node's published key is the new one.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from wgmanager.core.rotation import RotationStatus
from wgmanager.errors import ConfigError, WgmError
from wgmanager.kube.client import NodesAPI
from wgmanager.kube.translate import (
    NEXT_KEY_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    ROTATE_REQUEST_ANNOTATION,
    ROTATION_STATUS_ANNOTATION,
)

ACK_TIMEOUT = 30.0  # seconds for an agent to pick a request up before we call it absent


@dataclass
class Job:
    node: str
    old_key: str
    request: str = ""
    started: float = 0.0
    state: str = "waiting"  # waiting, requested, <phase>, completed, failed
    detail: str = ""
    new_key: str = ""
    seconds: float = 0.0
    acked: bool = False
    peers: tuple[int, int] = field(default=(0, 0))

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "failed")


class Progress:
    """A one-line bar on a terminal; one plain line per change otherwise (logs, CI)."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.tty = out.isatty()
        self.total = total
        self._last: dict[str, str] = {}

    def update(self, jobs: Sequence[Job]) -> None:
        if self.tty:
            done = sum(j.finished for j in jobs)
            width = 20
            bar = "#" * (width * done // max(self.total, 1))
            active = [j for j in jobs if j.state not in ("waiting", "completed", "failed")]
            now = "  ".join(f"{j.node}: {_describe(j)}" for j in active[:3])
            self.out.write(f"\r\x1b[K[{bar:<{width}}] {done}/{self.total} nodes  {now}")
            self.out.flush()
            return
        for j in jobs:
            line = _describe(j)
            if j.state != "waiting" and self._last.get(j.node) != line:
                self._last[j.node] = line
                print(f"{j.node}: {line}", file=self.out, flush=True)

    def finish(self, jobs: Sequence[Job]) -> None:
        if self.tty:
            self.update(jobs)
            self.out.write("\n")
            for j in jobs:
                if j.finished:
                    print(f"{j.node}: {_describe(j)}", file=self.out)
            self.out.flush()


def _describe(j: Job) -> str:
    if j.state == "completed":
        return f"completed in {j.seconds:.1f}s, new public key {j.new_key}"
    if j.state == "failed":
        return f"FAILED: {j.detail}"
    if j.state == "switch":
        return f"switching peers {j.peers[0]}/{j.peers[1]}"
    if j.state == "rollback":
        return f"rolling back ({j.detail})"
    return j.state


def rotate(api: NodesAPI, names: Sequence[str] | None, *, max_concurrent: int = 1,
           wait: bool = True, timeout: float = 600.0, poll: float = 0.2,
           out: TextIO = sys.stdout, err: TextIO = sys.stderr,
           clock: Callable[[], float] = time.monotonic) -> int:
    """Runs a rotation; returns the exit code (0 only if every node completed)."""
    if max_concurrent < 1:
        raise ConfigError("--max-concurrent must be at least 1")
    if timeout <= 0:
        raise ConfigError("--timeout must be positive")
    nodes = {str((n.get("metadata") or {}).get("name")): n for n in _all_nodes(api)}
    jobs: list[Job] = []
    if names is None:  # --all
        for name in sorted(nodes):
            key = _annotation(nodes[name], PUBLIC_KEY_ANNOTATION)
            if key:
                jobs.append(Job(name, key))
            else:
                print(f"{name}: skipped: no wgmanager agent (no {PUBLIC_KEY_ANNOTATION} "
                      "annotation)", file=err)
        if not jobs:
            raise ConfigError("no node runs a wgmanager agent (no Node has the "
                              f"{PUBLIC_KEY_ANNOTATION} annotation); is the DaemonSet "
                              "deployed with encryption.enabled=true?")
    else:
        for name in dict.fromkeys(names):
            if name not in nodes:
                raise ConfigError(f"node {name!r} not found; `kubectl get nodes` lists the "
                                  "names")
            key = _annotation(nodes[name], PUBLIC_KEY_ANNOTATION)
            if not key:
                raise ConfigError(f"node {name!r} has no wgmanager agent (no "
                                  f"{PUBLIC_KEY_ANNOTATION} annotation); check that the "
                                  "wgmanager pod runs on it")
            jobs.append(Job(name, key))
    progress = Progress(out, len(jobs))
    deadline = clock() + timeout
    failed = False
    try:
        while True:
            for j in jobs:
                if j.state not in ("waiting", "completed", "failed"):
                    _observe(api, j, clock())
            failed = failed or any(j.state == "failed" for j in jobs)
            running = [j for j in jobs if j.state not in ("waiting", "completed", "failed")]
            if not failed:  # the next node starts as soon as one finished
                for j in jobs:
                    if len(running) >= max_concurrent:
                        break
                    if j.state == "waiting":
                        _request(api, j, clock())
                        running.append(j)
            progress.update(jobs)
            if all(j.finished or (failed and j.state == "waiting") for j in jobs):
                break
            if not wait and all(j.acked or j.finished for j in jobs):
                break
            if clock() > deadline:
                for j in jobs:
                    if not j.finished and j.state != "waiting":
                        j.state, j.detail = "failed", (
                            f"timed out after {timeout:.0f}s in phase {j.state}"
                            + (f" ({j.peers[0]}/{j.peers[1]} peers switched)"
                               if j.peers[1] else ""))
                failed = True
                break
            time.sleep(poll)
    finally:
        progress.finish(jobs)
    skipped = [j.node for j in jobs if j.state == "waiting"]
    if skipped:
        print(f"not started after the failure: {', '.join(skipped)}", file=err)
    if not wait:
        return 1 if failed else 0
    return 0 if all(j.state == "completed" for j in jobs) else 1


def _request(api: NodesAPI, job: Job, now: float) -> None:
    job.request = f"{int(time.time())}-{secrets.token_hex(4)}"
    job.started = now
    api.patch_annotations(job.node, {ROTATE_REQUEST_ANNOTATION: job.request})
    job.state = "requested"


def _observe(api: NodesAPI, job: Job, now: float) -> None:
    try:
        node = api.get(job.node)
    except WgmError as e:
        job.detail = str(e)  # transient: keep waiting until the deadline
        return
    status = RotationStatus.parse(_annotation(node, ROTATION_STATUS_ANNOTATION))
    if status is None or status.request != job.request:
        if not job.acked and now - job.started > ACK_TIMEOUT:
            job.state, job.detail = "failed", (
                f"the agent did not pick up the request within {ACK_TIMEOUT:.0f}s; is the "
                "wgmanager agent running on this node?")
        return
    job.acked = True
    job.peers = (status.confirmed, status.peers)
    if status.phase != "idle":
        job.state, job.detail = status.phase, status.reason
        return
    key = _annotation(node, PUBLIC_KEY_ANNOTATION)
    if status.result != "completed":
        job.state, job.detail = "failed", status.result or "the agent gave no result"
    elif key and key != job.old_key and not _annotation(node, NEXT_KEY_ANNOTATION):
        job.state, job.new_key, job.seconds = "completed", key, now - job.started
    # else: completed, but the new key annotation is not visible yet: look again


def _annotation(node: dict[str, Any], name: str) -> str:
    value = ((node.get("metadata") or {}).get("annotations") or {}).get(name)
    return value if isinstance(value, str) else ""


def _all_nodes(api: NodesAPI) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cont: str | None = None
    while True:
        page = api.list_page(limit=500, cont=cont)
        items += page.get("items") or []
        cont = (page.get("metadata") or {}).get("continue") or None
        if not cont:
            return items
