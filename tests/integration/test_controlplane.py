"""The lab's control plane is a real etcd + kube-apiserver, and behaves like one.

Each test is an API-server behaviour wgmanager's Kubernetes integration relies on: token
authentication, RBAC, Node status via its subresource, merge patches, watches resumed from a
resourceVersion, 409 on stale writes, surviving an API server restart; and the lab's own
promise that a crashed run's processes are found and stopped. No mocks: real processes.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from wgmanager.errors import EnvironmentProblem
from wgmanager.lab.controlplane import (
    APISERVER,
    ETCD,
    ControlPlane,
    ControlPlaneError,
    cleanup_stale,
    free_port,
)

RUN_ROOT = Path("/run/wgmanager-tests")
REPO = Path(__file__).resolve().parents[2]
AGENT = "wgm-test-agent"  # a user with no RBAC until test_rbac grants it some
MERGE = "application/merge-patch+json"


@dataclass
class Lab:
    cp: ControlPlane
    agent_token: str
    admin: client.CoreV1Api
    agent: client.CoreV1Api
    startup_seconds: float


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    cleanup_stale(RUN_ROOT)
    cp = ControlPlane(RUN_ROOT / f"wgcp{secrets.token_hex(2)}", secure_port=free_port())
    agent_token = cp.add_token(AGENT, ["wgmanager:test"])
    try:
        started = time.monotonic()
        cp.start()
        startup = time.monotonic() - started
        yield Lab(cp, agent_token, client.CoreV1Api(cp.api_client()),
                  client.CoreV1Api(cp.api_client(agent_token)), startup)
    finally:
        cp.stop()
        cleanup_stale(cp.work_dir)  # the crash tests' control planes, should one have leaked
        shutil.rmtree(cp.work_dir, ignore_errors=True)


def node(name: str) -> client.V1Node:
    return client.V1Node(metadata=client.V1ObjectMeta(name=name),
                         spec=client.V1NodeSpec(pod_cidrs=["10.244.1.0/24", "fd00:244:1::/64"]))


def ensure_node(api: client.CoreV1Api, name: str) -> client.V1Node:
    try:
        return api.read_node(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return api.create_node(node(name))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_apiserver_becomes_ready_and_authenticates_by_token(lab: Lab) -> None:
    assert lab.cp.ready()
    print(f"control plane ready in {lab.startup_seconds:.1f} s")
    assert lab.startup_seconds < lab.cp.ready_timeout
    version = client.VersionApi(lab.cp.api_client()).get_code()
    assert version.git_version.startswith("v1.20.2")
    with pytest.raises(ApiException) as exc:
        client.CoreV1Api(lab.cp.api_client("not-a-token")).list_node()
    assert exc.value.status == 401


def test_admin_creates_node_with_status_then_lists_and_merge_patches_it(lab: Lab) -> None:
    lab.admin.create_node(node("n1"))
    lab.admin.patch_node_status("n1", {"status": {"addresses": [
        {"type": "InternalIP", "address": "10.99.0.1"},
        {"type": "InternalIP", "address": "fd99::1"}]}})

    listed = {n.metadata.name: n for n in lab.admin.list_node().items}
    assert [a.address for a in listed["n1"].status.addresses] == ["10.99.0.1", "fd99::1"]
    assert listed["n1"].spec.pod_cidrs == ["10.244.1.0/24", "fd00:244:1::/64"]

    lab.admin.patch_node("n1", {"metadata": {"annotations": {"a.wgmanager.io/x": "1",
                                                              "a.wgmanager.io/y": "2"}}},
                         _content_type=MERGE)
    lab.admin.patch_node("n1", {"metadata": {"annotations": {"a.wgmanager.io/x": None}}},
                         _content_type=MERGE)
    annotations = lab.admin.read_node("n1").metadata.annotations
    assert annotations.get("a.wgmanager.io/y") == "2"
    assert "a.wgmanager.io/x" not in annotations  # merge patch: null deletes the key


def test_kubeconfig_is_self_contained(lab: Lab, tmp_path: Path) -> None:
    api = config.new_client_from_config(config_file=str(lab.cp.admin_kubeconfig))
    assert client.CoreV1Api(api).list_namespace().items  # default, kube-system, ...
    agent_cfg = lab.cp.write_kubeconfig(tmp_path / "agent.kubeconfig", lab.agent_token)
    assert oct(agent_cfg.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ApiException) as exc:  # authenticated (not 401), just not allowed
        client.CoreV1Api(config.new_client_from_config(config_file=str(agent_cfg))).list_node()
    assert exc.value.status == 403


def test_rbac_denies_then_allows_after_a_cluster_role_binding(lab: Lab) -> None:
    with pytest.raises(ApiException) as exc:
        lab.agent.list_node()
    assert exc.value.status == 403

    rbac = client.RbacAuthorizationV1Api(lab.cp.api_client())
    rbac.create_cluster_role(client.V1ClusterRole(
        metadata=client.V1ObjectMeta(name="wgm-test-nodes"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["nodes"],
                                   verbs=["get", "list", "watch", "patch"])]))
    rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name="wgm-test-nodes"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                  name="wgm-test-nodes"),
        subjects=[client.RbacV1Subject(kind="User", name=AGENT,
                                       api_group="rbac.authorization.k8s.io")]))

    deadline = time.monotonic() + 10  # the RBAC authorizer learns of bindings by a watch
    while True:
        try:
            lab.agent.list_node()
            break
        except ApiException as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    ensure_node(lab.admin, "n1")
    lab.agent.patch_node("n1", {"metadata": {"annotations": {"a.wgmanager.io/agent": "yes"}}},
                         _content_type=MERGE)
    with pytest.raises(ApiException) as exc:
        lab.agent.delete_node("n1")  # not granted
    assert exc.value.status == 403


def test_watch_from_a_resource_version_replays_added_and_modified(lab: Lab) -> None:
    api = lab.admin  # (the agent may watch too, once test_rbac ran; the admin always may)
    rv = api.list_node().metadata.resource_version
    api.create_node(node("watched"))
    api.patch_node("watched", {"metadata": {"labels": {"wgm": "1"}}}, _content_type=MERGE)

    seen = []
    w = watch.Watch()
    for event in w.stream(api.list_node, resource_version=rv, timeout_seconds=10):
        if event["object"].metadata.name == "watched":
            seen.append(event["type"])
        if seen == ["ADDED", "MODIFIED"]:
            w.stop()
    assert seen == ["ADDED", "MODIFIED"]


def test_stale_replace_is_a_409_conflict(lab: Lab) -> None:
    stale = ensure_node(lab.admin, "n1")
    lab.admin.patch_node("n1", {"metadata": {"labels": {"wgm-bump": "1"}}}, _content_type=MERGE)
    stale.metadata.labels = {**(stale.metadata.labels or {}), "wgm-stale": "1"}
    with pytest.raises(ApiException) as exc:
        lab.admin.replace_node("n1", stale)
    assert exc.value.status == 409
    fresh = lab.admin.read_node("n1")
    fresh.metadata.labels["wgm-fresh"] = "1"
    assert lab.admin.replace_node("n1", fresh).metadata.labels["wgm-fresh"] == "1"


def test_apiserver_restart_keeps_data_and_clients_reconnect(lab: Lab) -> None:
    ensure_node(lab.admin, "n1")
    lab.admin.patch_node("n1", {"metadata": {"annotations": {"a.wgmanager.io/keep": "me"}}},
                         _content_type=MERGE)
    etcd_pid = lab.cp.pid(ETCD)

    lab.cp.stop_apiserver()
    assert not lab.cp.ready() and lab.cp.pid(APISERVER) is None
    with pytest.raises(urllib3.exceptions.HTTPError):
        lab.admin.list_node()
    started = time.monotonic()
    lab.cp.start_apiserver()
    print(f"kube-apiserver restarted in {time.monotonic() - started:.1f} s")

    assert lab.cp.pid(ETCD) == etcd_pid  # only the API server restarted
    same_client = lab.admin  # built before the restart: reconnects on its own
    assert same_client.read_node("n1").metadata.annotations["a.wgmanager.io/keep"] == "me"
    assert "n1" in [n.metadata.name for n in same_client.list_node().items]


def test_misuse_is_refused_without_side_effects(lab: Lab) -> None:
    with pytest.raises(ControlPlaneError, match="add_token before"):
        lab.cp.add_token("late", [])  # the running API server would never see it
    with pytest.raises(ControlPlaneError, match="already started"):
        lab.cp.start()
    assert lab.cp.ready()


def test_missing_binary_names_the_fix(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, apiserver=tmp_path / "nope")
    with pytest.raises(EnvironmentProblem) as exc:
        cp.start()
    assert str(exc.value) == (f"kube-apiserver not found at {tmp_path / 'nope'}; run `make "
                              "setup` (it builds it once into /var/cache/wgmanager)")


CHILD = """
import sys, time
from pathlib import Path
from wgmanager.lab.controlplane import ControlPlane, free_port
cp = ControlPlane(Path(sys.argv[1]), secure_port=free_port())
cp.start()
print(cp.pid("etcd"), cp.pid("kube-apiserver"), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("dir_deleted", [False, True], ids=["pid-files", "dir-already-removed"])
def test_cleanup_stale_stops_what_a_crashed_owner_left(lab: Lab, dir_deleted: bool) -> None:
    """A run dies without stop(): cleanup_stale finds its etcd and kube-apiserver, from the
    pid files, or (when the harness's remove_stale_runs already deleted the dir) by cwd."""
    root = lab.cp.work_dir / f"crashed-{int(dir_deleted)}"
    work = root / "cp"
    owner = subprocess.Popen([sys.executable, "-c", CHILD, str(work)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdout is not None
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        owner.kill()  # the crash: no stop(), no cleanup
        owner.wait()
    assert all(alive(p) for p in pids)  # own sessions: they outlive their owner
    if dir_deleted:
        shutil.rmtree(work)

    removed = cleanup_stale(root)

    assert removed == ([] if dir_deleted else ["cp"])
    assert not work.exists()
    assert not any(alive(p) for p in pids)
    assert lab.cp.ready()  # a live owner's control plane is left alone
