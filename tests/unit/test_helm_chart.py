"""The Helm chart (deploy/helm/wgmanager), rendered by the real helm and checked three ways:

1. every rendering passes kubernetes-validate --strict against the oldest Kubernetes the
   chart claims (Chart.yaml kubeVersion), a middle one and the newest the validator ships;
2. the objects say what the values ask for (flag off: nothing; flag on: the args, mounts,
   capabilities and RBAC below), and the agent's RBAC is exactly what wgmanager/kube calls;
3. the container args parse with the agent's own argument parser (``cli.build_parser``), so
   the chart can never pass a flag the agent does not have.

Each values set is rendered once per session (helm runs in parallel); tests share them.
helm, kubernetes-validate and hadolint come from the test extras (``make setup``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from wgmanager import config
from wgmanager.commands import main as cli
from wgmanager.config import BackendMode

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "wgmanager"
KUBE = ROOT / "wgmanager" / "kube"
NAMESPACE = "wgm"
RELEASE = "r"
FULLNAME = "r-wgmanager"
# The oldest schemas kubernetes-validate ships, a middle one and its newest. The chart's
# floor (Chart.yaml kubeVersion) is older: 1.20, where the lab installs and runs it.
KUBERNETES_VERSIONS = ("1.25", "1.31", "1.37")
KUBE_FLOOR = "1.20"
DIGEST = "sha256:" + "ab" * 32

Obj = dict[str, Any]

ON: dict[str, Any] = {"encryption": {"enabled": True}}


def on(**wireguard: Any) -> dict[str, Any]:
    return {"encryption": {"enabled": True, "wireguard": wireguard}}


# name -> (values, namespace). Every option of the chart appears at least once.
RENDERS: dict[str, tuple[dict[str, Any], str]] = {
    "defaults": ({}, NAMESPACE),
    "off-with-everything-else": ({"metrics": {"serviceMonitor": {"enabled": True}},
                                  "clusterPodCIDRs": ["10.244.0.0/16"]}, NAMESPACE),
    "on": (ON, NAMESPACE),
    "on-kube-system": (ON, "kube-system"),
    "listen-port": (on(listenPort=51900), NAMESPACE),
    "rotation-port": (on(rotationListenPort=52000), NAMESPACE),
    "mtu": (on(mtu=1380), NAMESPACE),
    "keepalive": (on(persistentKeepalive=25), NAMESPACE),
    "interface": (on(interface="wgx9"), NAMESPACE),
    "fallback-always": (on(userspaceFallback="always"), NAMESPACE),
    "fallback-never": (on(userspaceFallback="never"), NAMESPACE),
    "sidecar-privileged": (on(userspace={"privileged": True}), NAMESPACE),
    "startup-taint": ({**ON, "startupTaint": {"enabled": True}}, "kube-system"),
    "fail-open": ({"encryption": {"enabled": True, "failClosed": False}}, NAMESPACE),
    "key-rotation": ({"encryption": {"enabled": True, "keyRotationInterval": "720h"}},
                     NAMESPACE),
    "node-encryption-off": ({"encryption": {"enabled": True, "nodeEncryption": False}},
                            NAMESPACE),
    "cluster-cidrs": ({**ON, "clusterPodCIDRs": ["10.244.0.0/16", "fd00:244::/48"]},
                      NAMESPACE),
    "pod-interfaces-uplink": ({**ON, "podInterfaces": "cali*", "uplink": "eth1"}, NAMESPACE),
    "image": ({**ON, "image": {"repository": "registry.example/net/wgmanager", "tag": "1.2.3",
                               "pullPolicy": "Always"},
               "imagePullSecrets": [{"name": "regcred"}]}, NAMESPACE),
    "digest": ({**ON, "image": {"digest": DIGEST}}, NAMESPACE),
    "resources": ({**ON, "agent": {"resources": {"requests": {"cpu": "1"},
                                                 "limits": {"memory": "2Gi"}}}}, NAMESPACE),
    "tolerations": ({**ON, "tolerations": [{"key": "dedicated", "operator": "Equal",
                                            "value": "net", "effect": "NoSchedule"}],
                     "nodeSelector": {"wgmanager.io/encrypt": "true"}}, NAMESPACE),
    "priority-class": ({**ON, "priorityClassName": "net-critical"}, NAMESPACE),
    "update-strategy": ({**ON, "updateStrategy": {"type": "OnDelete"}}, NAMESPACE),
    "logging": ({**ON, "agent": {"logLevel": "debug", "logFormat": "text"}}, NAMESPACE),
    "health-port": ({**ON, "health": {"port": 19876}}, NAMESPACE),
    "metrics-port": ({**ON, "metrics": {"port": 19877, "perPeer": True}}, NAMESPACE),
    "metrics-off": ({**ON, "metrics": {"enabled": False}}, NAMESPACE),
    "service-monitor": ({**ON, "metrics": {"serviceMonitor": {
        "enabled": True, "interval": "15s", "labels": {"release": "prom"}}}}, NAMESPACE),
    "no-events": ({**ON, "agent": {"events": False}}, NAMESPACE),
    "no-node-identity": ({**ON, "nodeIdentity": {"enabled": False}}, NAMESPACE),
    "eks-node-identity": ({**ON, "nodeIdentity": {
        "kubeletKubeconfig": "/var/lib/kubelet/kubeconfig",
        "hostPaths": ["/var/lib/kubelet/pki", "/etc/kubernetes/pki"]}}, NAMESPACE),
    "existing-service-account": ({**ON, "serviceAccount": {"create": False, "name": "net-sa"},
                                  "rbac": {"create": False}}, NAMESPACE),
    "pod-metadata": ({**ON, "podAnnotations": {"a.example/x": "1"},
                      "podLabels": {"team": "net"}, "fullnameOverride": "wgm"}, NAMESPACE),
    "teardown": ({"teardown": {"enabled": True}}, NAMESPACE),
}

# Values that must not render, and the one line helm must say (a fragment of it).
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "node-encryption": ({"encryption": {"enabled": True, "nodeEncryption": True}},
                        "encryption.nodeEncryption=true is not supported: this version of "
                        "wgmanager encrypts pod-to-pod traffic only; set "
                        "encryption.nodeEncryption=false"),
    "node-encryption-while-off": ({"encryption": {"nodeEncryption": True}},
                                  "encryption.nodeEncryption=true is not supported"),
    "typo": ({"encryption": {"enable": True}}, "Additional property enable is not allowed"),
    "type": ({"encryption": {"enabled": True, "type": "ipsec"}},
             'encryption.type must be one of the following: "wireguard"'),
    "fallback": (on(userspaceFallback="sometimes"),
                 "userspaceFallback must be one of the following"),
    "mtu": (on(mtu=100), "encryption.wireguard.mtu"),
    "interface": (on(interface="wg-name-too-long"), "encryption.wireguard.interface"),
    "rotation-interval": ({"encryption": {"enabled": True, "keyRotationInterval": "1 month"}},
                          "encryption.keyRotationInterval"),
    "same-ports": (on(rotationListenPort=51820), "rotationListenPort equals listenPort"),
    "no-rotation-port": (on(listenPort=65535), "set encryption.wireguard.rotationListenPort"),
    "metrics-on-health-port": ({**ON, "metrics": {"port": 9876}},
                               "metrics.port equals health.port"),
    "monitor-without-metrics": ({**ON, "metrics": {"enabled": False,
                                                   "serviceMonitor": {"enabled": True}}},
                                "needs metrics.enabled=true"),
    "admission-policy-with-node-identity": (
        {**ON, "nodeIdentity": {"admissionPolicy": True}},
        "nodeIdentity.admissionPolicy=true is for nodeIdentity.enabled=false"),
    "teardown-while-on": ({**ON, "teardown": {"enabled": True}},
                          "set encryption.enabled=false with it"),
    "unnamed-service-account": ({**ON, "serviceAccount": {"create": False}},
                                "serviceAccount.create=false needs serviceAccount.name"),
}


# -- running the tools ----------------------------------------------------------------------


def tool(name: str) -> str:
    """A tool from the test extras: next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing; run `make setup` (it installs the test extras)",
                    pytrace=False)
    return found


@dataclass(frozen=True)
class Helm:
    binary: str
    env: dict[str, str]
    scratch: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, *argv], capture_output=True, text=True,
                              env=self.env, timeout=60, check=False)

    def template(self, name: str, values: dict[str, Any], namespace: str,
                 chart: Path = CHART, *extra: str) -> subprocess.CompletedProcess[str]:
        values_file = self.scratch / f"values-{name}.yaml"
        values_file.write_text(json.dumps(values))  # JSON is YAML, with exact types
        return self.run("template", RELEASE, str(chart), "--namespace", namespace,
                        "--values", str(values_file), *extra)


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")  # helm's cache and config: never the repo
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "KUBECONFIG": str(home / "none"),
           "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    return Helm(tool("helm"), env, home)


@dataclass(frozen=True)
class Render:
    name: str
    text: str
    objects: list[Obj]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.of_kind(kind)
                 if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} objects named {name}"
        return found[0]

    @property
    def daemonset(self) -> Obj:
        """The agent's DaemonSet (teardown's in the teardown render)."""
        found = [o for o in self.of_kind("DaemonSet")
                 if o["metadata"]["labels"]["app.kubernetes.io/component"]
                 == ("teardown" if self.name == "teardown" else "agent")]
        assert len(found) == 1, f"{self.name}: {len(found)} agent DaemonSets"
        return found[0]

    @property
    def pod(self) -> Obj:
        spec: Obj = self.daemonset["spec"]["template"]["spec"]
        return spec

    @property
    def wireguard_go(self) -> Obj:
        """wireguard-go's own DaemonSet (its pods outlive the agent's)."""
        return self.one("DaemonSet", FULLNAME + "-wireguard-go")

    def has_wireguard_go(self) -> bool:
        return any(o["metadata"]["name"] == FULLNAME + "-wireguard-go"
                   for o in self.of_kind("DaemonSet"))

    def pod_of(self, container: str) -> Obj:
        """The pod spec holding ``container``: wireguard-go's is its own DaemonSet's."""
        if container == "wireguard-go":
            spec: Obj = self.wireguard_go["spec"]["template"]["spec"]
            return spec
        return self.pod

    def container(self, name: str) -> Obj:
        pod = self.pod_of(name)
        found = [c for c in pod["containers"] + pod.get("initContainers", [])
                 if c["name"] == name]
        assert len(found) == 1, f"{self.name}: no container {name}"
        return found[0]

    def has_container(self, name: str) -> bool:
        return any(c["name"] == name for c in self.pod["containers"])

    def volume(self, name: str, container: str = "agent") -> Obj:
        found = [v for v in self.pod_of(container)["volumes"] if v["name"] == name]
        assert len(found) == 1, f"{self.name}: no volume {name}"
        return found[0]

    def mounts(self, container: str) -> dict[str, Obj]:
        return {m["mountPath"]: m for m in self.container(container).get("volumeMounts", [])}

    def agent_args(self) -> argparse.Namespace:
        return parse(self.container("agent")["args"])


@pytest.fixture(scope="module")
def renders(helm: Helm) -> dict[str, Render]:
    def render(name: str) -> Render:
        values, namespace = RENDERS[name]
        res = helm.template(name, values, namespace)
        assert res.returncode == 0, f"helm template ({name}): {res.stderr.strip()}"
        objects = [o for o in yaml.safe_load_all(res.stdout) if o]
        return Render(name, res.stdout, objects)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(RENDERS, pool.map(render, RENDERS), strict=True))


@pytest.fixture(scope="module")
def on_render(renders: dict[str, Render]) -> Render:
    return renders["on"]


def parse(args: list[str]) -> argparse.Namespace:
    """The agent's own parser; argparse exits on an unknown flag, which fails the test."""
    assert all(isinstance(a, str) for a in args), args
    try:
        return cli.build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"the agent's parser rejects the chart's args {args}") from e


# -- 1. helm lint, schemas ------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["--set", "encryption.enabled=true"]],
                         ids=["defaults", "on"])
def test_helm_lint_strict(helm: Helm, values: list[str]) -> None:
    res = helm.run("lint", "--strict", str(CHART), *values)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


def test_every_rendering_is_valid_kubernetes(renders: dict[str, Render],
                                            tmp_path: Path) -> None:
    # Each distinct object once, in a file named after the first rendering that made it
    # (many renderings share their ServiceAccount and RBAC): the validator is slow per object.
    seen: set[str] = set()
    files = []
    for name, r in renders.items():
        fresh = []
        for o in r.objects:
            key = json.dumps(o, sort_keys=True)
            if key not in seen:
                seen.add(key)
                fresh.append(o)
        if fresh:
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(fresh))
            files.append(str(path))

    def validate(version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet",
                               "-k", version, *files], capture_output=True, text=True,
                              timeout=300, check=False)

    with ThreadPoolExecutor(max_workers=len(KUBERNETES_VERSIONS)) as pool:
        results = list(pool.map(validate, KUBERNETES_VERSIONS))
    assert sum(r.of_kind("ServiceMonitor") != [] for r in renders.values()) == 1
    for version, res in zip(KUBERNETES_VERSIONS, results, strict=True):
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        # The one kind without a built-in schema is the prometheus-operator CRD.
        problems = [line for line in lines if not re.match(
            r"WARN .* Couldn't find schema for kind ServiceMonitor ", line)]
        assert res.returncode == 0 and not problems, (
            f"Kubernetes {version}:\n" + "\n".join(problems) + res.stderr)
        assert len(lines) == 1, lines  # that one warning


def test_the_chart_refuses_kubernetes_older_than_it_is_run_on(helm: Helm) -> None:
    """The floor is the lab's API server (tests/e2e install the chart there)."""
    res = helm.template("old", ON, NAMESPACE, CHART, "--kube-version", "1.19.0")
    assert res.returncode != 0 and "requires kubeVersion: >=1.20.0-0" in res.stderr
    floor = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert floor == f">={KUBE_FLOOR}.0-0"
    assert helm.template("floor", ON, NAMESPACE, CHART, "--kube-version",
                         f"{KUBE_FLOOR}.2").returncode == 0


@pytest.mark.parametrize("name", REFUSED)
def test_contradictory_values_fail_in_one_clear_line(helm: Helm, name: str) -> None:
    values, message = REFUSED[name]
    res = helm.template(f"refused-{name}", values, NAMESPACE)
    assert res.returncode != 0 and res.stdout == ""
    assert message in res.stderr, res.stderr
    if "schema" not in res.stderr:  # our own fail messages: exactly one line after "Error:"
        error = next(line for line in res.stderr.splitlines() if line.startswith("Error:"))
        assert message in error


def test_the_optional_admission_policy_confines_the_agents_account(helm: Helm,
                                                                   tmp_path: Path) -> None:
    """nodeIdentity off + admissionPolicy on, for clusters >= 1.32: rendered and
    schema-validated (the lab's 1.20 API server cannot run it)."""
    values = {**ON, "nodeIdentity": {"enabled": False, "admissionPolicy": True}}
    res = helm.template("vap", values, NAMESPACE, CHART, "--kube-version", "1.32.0")
    assert res.returncode == 0, res.stderr
    objs = {o["kind"]: o for o in yaml.safe_load_all(res.stdout) if o}
    policy, binding = (objs["ValidatingAdmissionPolicy"],
                       objs["ValidatingAdmissionPolicyBinding"])
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    match = policy["spec"]["matchConditions"][0]["expression"]
    assert f"system:serviceaccount:{NAMESPACE}:{FULLNAME}" in match
    assert "authentication.kubernetes.io/node-name" in str(policy["spec"]["variables"])
    old = helm.template("vap-old", values, NAMESPACE, CHART, "--kube-version", "1.31.4")
    assert old.returncode != 0 and "needs Kubernetes >= 1.32" in old.stderr
    path = tmp_path / "vap.yaml"
    path.write_text(yaml.safe_dump_all([policy, binding]))
    check = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k",
                            KUBERNETES_VERSIONS[-1], str(path)], capture_output=True,
                           text=True, timeout=300, check=False)
    assert check.returncode == 0 and check.stdout.strip() == "", check.stdout + check.stderr


# -- 2. flag off ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["defaults", "off-with-everything-else"])
def test_encryption_off_renders_nothing(renders: dict[str, Render], name: str) -> None:
    assert renders[name].objects == []


def test_every_object_carries_the_standard_labels(renders: dict[str, Render]) -> None:
    for r in renders.values():
        for o in r.objects:
            labels = o["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "wgmanager", (r.name, o["kind"])
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"] == "wgmanager-0.1.0"
            if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                assert o["metadata"]["namespace"] == RENDERS[r.name][1]


# -- 3. flag on: the DaemonSet --------------------------------------------------------------


def test_on_renders_the_agent_and_its_rbac(on_render: Render) -> None:
    kinds = sorted(o["kind"] for o in on_render.objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "DaemonSet", "Role",
                     "RoleBinding", "ServiceAccount"]
    ds = on_render.daemonset
    assert ds["metadata"]["name"] == FULLNAME
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}
    pod = on_render.pod
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every node
    assert pod["serviceAccountName"] == FULLNAME
    assert "priorityClassName" not in pod  # outside kube-system
    assert [c["name"] for c in pod["initContainers"]] == ["mount-bpffs"]
    assert [c["name"] for c in pod["containers"]] == ["agent"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["image"] == "wgmanager:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"


def test_wireguard_go_runs_in_a_daemonset_of_its_own(on_render: Render) -> None:
    """Deleting or upgrading an agent pod must not end the node's tunnels: wireguard-go is
    not in the agent's pod, and `helm upgrade` never replaces it unasked (OnDelete)."""
    ds = on_render.wireguard_go
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "wireguard-go"
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    agent_selector = on_render.daemonset["spec"]["selector"]["matchLabels"]
    assert selector != agent_selector  # neither DaemonSet adopts the other's pods
    pod = on_render.pod_of("wireguard-go")
    assert [c["name"] for c in pod["containers"]] == ["wireguard-go"]
    assert pod["hostNetwork"] is True and pod["automountServiceAccountToken"] is False
    # the same nodes as the agent
    for key in ("tolerations", "nodeSelector"):
        assert pod[key] == on_render.pod[key], key
    assert "serviceAccountName" not in pod


def test_agent_args_parse_with_the_agents_parser(on_render: Render) -> None:
    args = on_render.agent_args()
    assert args.command == "agent"
    assert (args.log_level, args.log_format) == ("info", "json")
    assert args.interface == config.DEFAULT_IFNAME
    assert args.listen_port == config.DEFAULT_LISTEN_PORT
    assert args.mtu is None  # auto
    assert args.persistent_keepalive == 0
    assert args.backend is BackendMode.AUTO
    assert args.spawn_userspace is False  # the sidecar runs wireguard-go
    assert args.socket_dir == config.DEFAULT_SOCKET_DIR
    assert args.pin_dir == config.DEFAULT_PIN_DIR
    assert args.state_dir == config.DEFAULT_STATE_DIR
    assert args.pod_interfaces == "" and args.uplink is None
    assert args.cluster_cidrs == ""
    assert (args.health_port, args.metrics_port) == (9876, 9877)
    assert args.metrics_per_peer is False and args.events is True
    # the key rotation and fail-mode flags, as the agent itself reads them
    reference = parse(["agent", "--rotation-listen-port", "51821", "--fail-mode", "closed",
                       "--key-rotation-interval", "0"])
    for dest in ("rotation_listen_port", "fail_mode", "key_rotation_interval"):
        assert getattr(args, dest) == getattr(reference, dest), dest


def test_agent_gets_its_node_name_from_the_downward_api(on_render: Render) -> None:
    env = {e["name"]: e for e in on_render.container("agent")["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_mounts_match_the_paths_the_agent_is_given(on_render: Render) -> None:
    args = on_render.agent_args()
    mounts = on_render.mounts("agent")

    def host_path(mount: Obj) -> Obj:
        hp: Obj = on_render.volume(mount["name"])["hostPath"]
        return hp

    bpffs = mounts["/sys/fs/bpf"]
    assert args.pin_dir.is_relative_to("/sys/fs/bpf")
    assert bpffs["mountPropagation"] == "HostToContainer"
    assert host_path(bpffs) == {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}
    init = on_render.mounts("mount-bpffs")["/sys/fs/bpf"]
    assert init["name"] == bpffs["name"] and init["mountPropagation"] == "Bidirectional"

    state = mounts[str(args.state_dir)]  # the key survives pod restarts and reboots
    assert host_path(state) == {"path": "/var/lib/wgmanager", "type": "DirectoryOrCreate"}
    assert not state.get("readOnly", False)

    for headers in ("/lib/modules", "/usr/src"):  # bcc's compile
        assert mounts[headers]["readOnly"] is True
        assert host_path(mounts[headers]) == {"path": headers, "type": "Directory"}

    sockets = mounts[str(args.socket_dir)]
    assert host_path(sockets) == {"path": "/var/run/wireguard", "type": "DirectoryOrCreate"}
    sidecar = parse(on_render.container("wireguard-go")["args"])
    assert sidecar.command == "wireguard-go-supervisor"
    assert sidecar.socket_dir == args.socket_dir
    wg_sockets = on_render.mounts("wireguard-go")[str(sidecar.socket_dir)]
    assert on_render.volume(wg_sockets["name"], "wireguard-go")["hostPath"] == host_path(sockets)
    tun = on_render.mounts("wireguard-go")["/dev/net/tun"]
    assert on_render.volume(tun["name"], "wireguard-go")["hostPath"] == {
        "path": "/dev/net/tun", "type": "CharDevice"}


def test_capabilities(on_render: Render) -> None:
    # The agent: privileged (it writes /proc/sys, read-only in unprivileged containers).
    assert on_render.container("agent")["securityContext"] == {"privileged": True}
    # The init container: privileged only because Bidirectional propagation requires it.
    assert on_render.container("mount-bpffs")["securityContext"] == {"privileged": True}
    command = " ".join(on_render.container("mount-bpffs")["command"])
    assert "mount -t bpf bpf /sys/fs/bpf" in command
    # The sidecar, which parses packets from the network: CAP_NET_ADMIN and nothing else.
    sc = on_render.container("wireguard-go")["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_only_the_agent_gets_an_api_token(on_render: Render) -> None:
    assert on_render.pod["automountServiceAccountToken"] is False
    assert on_render.one("ServiceAccount")["automountServiceAccountToken"] is False
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    mount = on_render.mounts("agent")[token_path]
    sources = on_render.volume(mount["name"])["projected"]["sources"]
    assert sources[0]["serviceAccountToken"] == {"path": "token", "expirationSeconds": 3607}
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    assert token_path not in on_render.mounts("wireguard-go")
    assert on_render.pod_of("wireguard-go")["automountServiceAccountToken"] is False


def test_probes_use_the_agents_health_endpoints(renders: dict[str, Render]) -> None:
    for name in ("on", "health-port"):
        r = renders[name]
        agent = r.container("agent")
        ports = {p["name"]: p for p in agent["ports"]}
        assert ports["health"]["containerPort"] == r.agent_args().health_port
        assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert renders["health-port"].agent_args().health_port == 19876


# -- 4. RBAC: exactly what the agent calls --------------------------------------------------

# Each request wgmanager/kube makes (``.api.`` or ``.writer.`` then ``json``/``request``
# with the method and the path helper of wgmanager.kube.rest) -> the (resource, verb) pairs
# it needs. A GET of the Nodes collection is the paginated list and the watch.
API_VERBS: dict[str, set[tuple[str, str]]] = {
    "GET node_path": {("nodes", "get"), ("nodes", "list"), ("nodes", "watch")},
    "PATCH node_path": {("nodes", "patch")},
    "POST events_path": {("events", "create")},
}
# The startup-taint controller's CoreV1Api methods (it uses the kubernetes package).
CORE_API_VERBS: dict[str, set[tuple[str, str]]] = {
    "list_node": {("nodes", "list"), ("nodes", "watch")},
    "read_node": {("nodes", "get")},
    "patch_node": {("nodes", "patch")},
    "list_namespaced_pod": {("pods", "list"), ("pods", "watch")},
}
CALL = re.compile(r"\.(api|writer)\.(?:json|request)\(\s*\"(\w+)\",\s*(\w+)\(")
# Modules whose API calls are not the agent's but another component's, with its own account.
NOT_THE_AGENT = {"startup_taint.py"}


def rules(role: Obj) -> set[tuple[str, str]]:
    out = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        out |= {(res, verb) for res in rule["resources"] for verb in rule["verbs"]}
    return out


def test_the_cluster_role_grants_exactly_what_the_agent_calls(
        renders: dict[str, Render]) -> None:
    """With its ServiceAccount the agent reads Nodes and creates Events in its namespace;
    its one write to a Node (``.writer.``) uses the node's own identity (nodeIdentity)."""
    called, written = set(), set()
    for path in sorted(p for p in KUBE.glob("*.py") if p.name not in NOT_THE_AGENT):
        for who, method, where in CALL.findall(path.read_text()):
            (written if who == "writer" else called).add(f"{method} {where}")
    unknown = (called | written) - API_VERBS.keys()
    assert not unknown, (f"wgmanager/kube calls {sorted(unknown)}: add them to API_VERBS "
                         "with the verbs they need, and to the chart's ClusterRole if needed")
    needed = set().union(*(API_VERBS[m] for m in called))
    assert needed == {("nodes", "get"), ("nodes", "list"), ("nodes", "watch"),
                      ("events", "create")}
    assert written == {"PATCH node_path"}
    on = renders["on"]
    assert "*" not in str(on.one("ClusterRole")["rules"])
    assert rules(on.one("ClusterRole")) == needed - {("events", "create")}
    assert rules(on.one("Role")) == {("events", "create")}
    assert on.one("Role")["metadata"]["namespace"] == NAMESPACE
    assert on.one("RoleBinding")["subjects"] == on.one("ClusterRoleBinding")["subjects"]
    # Without the node's identity the account patches Nodes itself (any Node: say so).
    assert rules(renders["no-node-identity"].one("ClusterRole")) == (
        needed - {("events", "create")} | API_VERBS["PATCH node_path"])
    # --no-events: no Events, no events rule
    assert "--no-events" in renders["no-events"].container("agent")["args"]
    assert renders["no-events"].agent_args().events is False
    assert renders["no-events"].of_kind("Role") == []


@pytest.mark.parametrize("name", ["on", "eks-node-identity", "no-node-identity"])
def test_the_agent_writes_with_the_kubelets_identity(renders: dict[str, Render],
                                                     name: str) -> None:
    r = renders[name]
    values = RENDERS[name][0].get("nodeIdentity", {})
    args = r.agent_args()
    mounts = r.mounts("agent")
    if values.get("enabled") is False:
        assert args.node_kubeconfig is None
        assert not any(m.startswith("/var/lib/kubelet") for m in mounts)
        return
    kubeconfig = values.get("kubeletKubeconfig", "/etc/kubernetes/kubelet.conf")
    assert str(args.node_kubeconfig) == kubeconfig
    mount = mounts[kubeconfig]
    assert mount["readOnly"] is True
    assert r.volume(mount["name"])["hostPath"] == {"path": kubeconfig, "type": "File"}
    for path in values.get("hostPaths", ["/var/lib/kubelet/pki"]):
        assert mounts[path]["readOnly"] is True  # the certificates, at the same path
        assert r.volume(mounts[path]["name"])["hostPath"] == {"path": path,
                                                              "type": "Directory"}
    env = {e["name"]: e for e in r.container("agent")["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_the_binding_names_the_account_the_pods_run_as(renders: dict[str, Render]) -> None:
    r = renders["on"]
    binding = r.one("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME,
                                    "namespace": NAMESPACE}]
    assert r.one("ServiceAccount")["metadata"]["name"] == r.pod["serviceAccountName"]

    existing = renders["existing-service-account"]
    assert sorted(o["kind"] for o in existing.objects) == ["DaemonSet", "DaemonSet"]
    assert existing.pod["serviceAccountName"] == "net-sa"


# -- 5. each option -------------------------------------------------------------------------


def test_wireguard_ports(renders: dict[str, Render]) -> None:
    def udp(r: Render) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in r.container("agent")["ports"]
                if p["protocol"] == "UDP"}

    assert udp(renders["on"]) == {"wireguard": 51820, "wg-rotation": 51821}
    assert renders["listen-port"].agent_args().listen_port == 51900
    assert udp(renders["listen-port"]) == {"wireguard": 51900, "wg-rotation": 51901}
    assert udp(renders["rotation-port"]) == {"wireguard": 51820, "wg-rotation": 52000}
    for name, port in (("on", 51821), ("listen-port", 51901), ("rotation-port", 52000)):
        assert renders[name].agent_args().rotation_listen_port == port


@pytest.mark.parametrize(("name", "dest", "value"), [
    ("mtu", "mtu", 1380),
    ("keepalive", "persistent_keepalive", 25),
    ("interface", "interface", "wgx9"),
    ("pod-interfaces-uplink", "pod_interfaces", "cali*"),
    ("pod-interfaces-uplink", "uplink", "eth1"),
    ("cluster-cidrs", "cluster_cidrs", "10.244.0.0/16,fd00:244::/48"),
    ("logging", "log_level", "debug"),
    ("logging", "log_format", "text"),
    ("metrics-port", "metrics_port", 19877),
    ("metrics-port", "metrics_per_peer", True),
    ("metrics-off", "metrics_port", 0),
])
def test_option_reaches_the_agent(renders: dict[str, Render], name: str, dest: str,
                                  value: object) -> None:
    assert getattr(renders[name].agent_args(), dest) == value
    assert getattr(renders["on"].agent_args(), dest) != value


def test_cluster_cidrs_are_networks_the_agent_accepts(renders: dict[str, Render]) -> None:
    text = renders["cluster-cidrs"].agent_args().cluster_cidrs
    assert [str(n) for n in cli.parse_cidrs(text, "--cluster-cidrs")] == [
        "10.244.0.0/16", "fd00:244::/48"]


@pytest.mark.parametrize(("name", "flag"), [
    ("fail-open", ["--fail-mode", "open"]),
    ("key-rotation", ["--key-rotation-interval", "720h"]),
])
def test_rotation_and_fail_mode_options(renders: dict[str, Render], name: str,
                                        flag: list[str]) -> None:
    dest = flag[0].lstrip("-").replace("-", "_")
    assert getattr(renders[name].agent_args(), dest) == getattr(parse(["agent", *flag]), dest)
    assert getattr(renders["on"].agent_args(), dest) != getattr(parse(["agent", *flag]), dest)


@pytest.mark.parametrize(("name", "backend", "sidecar"), [
    ("on", BackendMode.AUTO, True),
    ("fallback-always", BackendMode.USERSPACE, True),
    ("fallback-never", BackendMode.KERNEL, False),
])
def test_userspace_fallback(renders: dict[str, Render], name: str, backend: BackendMode,
                            sidecar: bool) -> None:
    r = renders[name]
    args = r.agent_args()
    assert args.backend is backend
    assert r.has_wireguard_go() is sidecar
    assert args.spawn_userspace is not sidecar  # the agent never starts wireguard-go in a pod
    assert not r.has_container("wireguard-go")
    assert not any(v["name"] == "dev-net-tun" for v in r.pod["volumes"])


def test_sidecar_can_be_privileged_for_runtimes_that_deny_the_tun_device(
        renders: dict[str, Render]) -> None:
    sc = renders["sidecar-privileged"].container("wireguard-go")["securityContext"]
    assert sc == {"privileged": True}


def test_image(renders: dict[str, Render]) -> None:
    r = renders["image"]
    for c in r.pod["containers"] + r.pod["initContainers"]:
        assert c["image"] == "registry.example/net/wgmanager:1.2.3"
        assert c["imagePullPolicy"] == "Always"
    assert r.pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert renders["digest"].container("agent")["image"] == f"wgmanager@{DIGEST}"


def test_scheduling_options(renders: dict[str, Render]) -> None:
    r = renders["tolerations"]
    assert r.pod["tolerations"] == RENDERS["tolerations"][0]["tolerations"]
    # helm merges maps with the defaults (null removes a key) and replaces lists
    assert r.pod["nodeSelector"] == {"wgmanager.io/encrypt": "true",
                                     "kubernetes.io/os": "linux"}
    assert renders["on"].pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert renders["priority-class"].pod["priorityClassName"] == "net-critical"
    assert renders["on-kube-system"].pod["priorityClassName"] == "system-node-critical"
    # OnDelete with the default rollingUpdate left in would be rejected by the API server
    assert renders["update-strategy"].daemonset["spec"]["updateStrategy"] == {
        "type": "OnDelete"}


def test_resources(renders: dict[str, Render]) -> None:
    assert renders["resources"].container("agent")["resources"] == {
        "requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}
    on = renders["on"]
    assert on.container("agent")["resources"]["requests"]["memory"] == "256Mi"
    assert "cpu" not in on.container("wireguard-go")["resources"]["limits"]  # never throttled


def test_pod_metadata(renders: dict[str, Render]) -> None:
    r = renders["pod-metadata"]
    meta = r.daemonset["spec"]["template"]["metadata"]
    assert meta["annotations"]["a.example/x"] == "1"
    assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == "agent"
    assert meta["labels"]["team"] == "net"
    assert r.daemonset["metadata"]["name"] == "wgm"


def test_metrics_ports(renders: dict[str, Render]) -> None:
    def tcp(r: Render) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in r.container("agent")["ports"]
                if p["protocol"] == "TCP"}

    assert tcp(renders["on"]) == {"health": 9876, "metrics": 9877}
    assert tcp(renders["metrics-port"]) == {"health": 9876, "metrics": 19877}
    assert tcp(renders["metrics-off"]) == {"health": 9876}


def test_service_monitor_finds_the_agents(renders: dict[str, Render]) -> None:
    assert renders["on"].of_kind("ServiceMonitor") == [] == renders["on"].of_kind("Service")
    r = renders["service-monitor"]
    service, monitor = r.one("Service"), r.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items())
    pod_labels = r.daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "metrics", "/metrics", "15s")
    (port,) = service["spec"]["ports"]
    agent_ports = {p["name"]: p["containerPort"] for p in r.container("agent")["ports"]}
    assert port["name"] == "metrics" and agent_ports[port["targetPort"]] == port["port"]


# -- 6. teardown ----------------------------------------------------------------------------


def test_teardown_runs_wgmanager_teardown_on_every_node(renders: dict[str, Render]) -> None:
    r = renders["teardown"]
    assert [o["kind"] for o in r.objects] == ["DaemonSet"]  # no account, no RBAC: no API
    assert r.pod["automountServiceAccountToken"] is False and r.pod["hostNetwork"] is True
    assert r.pod["tolerations"] == [{"operator": "Exists"}]
    init = r.container("teardown")
    args = parse(init["args"])
    agent = renders["on"].agent_args()
    assert args.command == "teardown"
    for dest in ("interface", "backend", "socket_dir", "pin_dir", "state_dir"):
        assert getattr(args, dest) == getattr(agent, dest), dest
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert init["securityContext"]["privileged"] is False
    assert r.mounts("teardown")["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    # Idles, and exits on SIGTERM (a bare `sleep` as PID 1 ignores it: 30 s per pod).
    assert r.pod["containers"][0]["command"] == ["sh", "-c",
                                                 "trap 'exit 0' TERM; sleep infinity & wait"]


# -- 7. NOTES.txt ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def notes(helm: Helm) -> Iterator[dict[str, str]]:
    """NOTES.txt rendered by helm (``helm template`` skips it, so a copy renders it as an
    ordinary template) for three situations."""
    chart = helm.scratch / "notes-chart"
    shutil.copytree(CHART, chart)
    # helm template parses every output as YAML: carry the text in one YAML string.
    (chart / "templates" / "NOTES.txt").rename(chart / "NOTES.tpl")
    (chart / "templates" / "notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "NOTES.tpl") . | toJson }}\n')
    cases = {"off": {}, "on": {**ON}, "on-open-never": {
        "encryption": {"enabled": True, "failClosed": False,
                       "wireguard": {"userspaceFallback": "never", "mtu": 1400}},
        "clusterPodCIDRs": ["10.244.0.0/16"]}, "teardown": {"teardown": {"enabled": True}}}
    out = {}
    for name, values in cases.items():
        res = helm.template(f"notes-{name}", copy.deepcopy(values), NAMESPACE, chart,
                            "--show-only", "templates/notes.yaml")
        assert res.returncode == 0, res.stderr
        out[name] = yaml.safe_load(res.stdout)["notes"]
    yield out


def test_notes(notes: dict[str, str]) -> None:
    assert "encryption is OFF" in notes["off"] and "encryption.enabled=true" in notes["off"]
    on = notes["on"]
    assert "UDP 51820 and UDP 51821" in on
    assert "WARNING: clusterPodCIDRs is empty" in on
    assert "dropped (fail closed)" in on
    assert f"rollout status daemonset/{FULLNAME}" in on
    assert "--set encryption.enabled=false --set teardown.enabled=true" in on
    other = notes["on-open-never"]
    assert "UNENCRYPTED" in other and "userspaceFallback=never" in other
    assert "(1400)" in other and "WARNING" not in other
    assert f"daemonset/{FULLNAME}-teardown" in notes["teardown"]


# -- 7. the startup taint controller ---------------------------------------------------------


def test_startup_taint_controller_is_off_by_default(on_render: Render) -> None:
    assert on_render.of_kind("Deployment") == []


def test_startup_taint_controller_gets_exactly_what_it_calls(
        renders: dict[str, Render]) -> None:
    """Its calls, read from its module, against its ClusterRole (Nodes) and Role (the agent
    pods in the release's namespace); nothing for the agent's account changes."""
    r = renders["startup-taint"]
    called = set(re.findall(r"\.core\.(\w+)\(", (KUBE / "startup_taint.py").read_text()))
    needed = set().union(*(CORE_API_VERBS[m] for m in called))
    needed -= {("nodes", "watch")}  # it lists nodes on a resync, never watches them
    name = FULLNAME + "-startup-taint"
    assert rules(r.one("ClusterRole", name)) == {v for v in needed if v[0] == "nodes"}
    assert rules(r.one("Role", name)) == {v for v in needed if v[0] == "pods"}
    assert r.one("Role", name)["metadata"]["namespace"] == "kube-system"
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        assert r.one(kind, name)["subjects"] == [
            {"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}]
    assert rules(r.one("ClusterRole", FULLNAME)) == rules(renders["on"].one("ClusterRole"))


def test_startup_taint_controller_runs_anywhere_the_taint_is(renders: dict[str, Render]) -> None:
    dep = renders["startup-taint"].one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1
    assert {"key": "wgmanager.io/agent-not-ready", "operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["serviceAccountName"] == FULLNAME + "-startup-taint"
    container = pod["containers"][0]
    args = parse(container["args"])
    assert args.command == "startup-taint-controller"
    assert args.taint_key == "wgmanager.io/agent-not-ready"
    assert args.agent_selector == "app.kubernetes.io/component=agent"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
