"""A real lab node's config files keep everything the daemons write under the node's own
directory (several containerds and kubelets share one machine), and say what this machine
needs. The integration test tests/integration/test_real_kubelets.py runs them for real."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wgmanager.lab.nodeconfig import (
    CNI_BIN,
    NodeLayout,
    cni_template,
    containerd_toml,
    kubelet_configuration,
)

NODE_DIR = Path("/run/wgmanager-tests/wgk0000/nodes/node1")
CA = Path("/run/wgmanager-tests/wgk0000/controlplane/ca.crt")


def strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, dict):
        for v in doc.values():
            yield from strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from strings(v)
    elif isinstance(doc, str):
        yield doc


def test_containerd_writes_only_under_the_node_dir_and_runs_on_this_machine() -> None:
    doc = tomllib.loads(containerd_toml(NodeLayout(NODE_DIR), sandbox_image="localhost/p:1"))
    paths = [Path(s) for s in strings(doc) if s.startswith("/")]
    assert paths and all(p.is_relative_to(NODE_DIR) or p == CNI_BIN for p in paths), paths
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True  # runc fails every sandbox without it here
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["sandbox_image"] == "localhost/p:1"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cri["cni"]["conf_template"] == str(NodeLayout(NODE_DIR).cni_template)


def test_kubelet_config_paths_identity_checks_and_cgroups() -> None:
    cfg = kubelet_configuration(NodeLayout(NODE_DIR), address="10.90.0.1", client_ca=CA,
                                cgroup_root="/wgmlab-wgk0000-node1")
    paths = [Path(s) for s in strings(cfg) if s.startswith("/") and s != cfg["cgroupRoot"]]
    assert all(p.is_relative_to(NODE_DIR) or p == CA for p in paths), paths
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authentication"]["x509"]["clientCAFile"] == str(CA)
    assert cfg["authorization"]["mode"] == "Webhook"
    assert (cfg["cgroupDriver"], cfg["cgroupRoot"]) == ("cgroupfs", "/wgmlab-wgk0000-node1")
    assert cfg["failSwapOn"] is False
    assert cfg["address"] == "10.90.0.1"


def test_the_cni_template_renders_to_a_dual_stack_bridge() -> None:
    """Rendered as containerd would for two ranges (a stand-in for Go's text/template that
    covers the two loops the template uses), it is bridge + host-local on exactly them."""
    cidrs, routes = ["10.244.1.0/24", "fd00:244:0:1::/64"], ["0.0.0.0/0", "::/0"]

    def loop(match: re.Match[str]) -> str:
        items = cidrs if match.group(1) == "PodCIDRRanges" else routes
        return ", ".join(match.group(2).replace("{{$r}}", item) for item in items)

    text = re.sub(r"\{\{range \$i, \$r := \.(\w+)\}\}\{\{if \$i\}\}, \{\{end\}\}(.*?)\{\{end\}\}",
                  loop, cni_template(mtu=1440))
    plugin = json.loads(text)["plugins"][0]
    assert (plugin["type"], plugin["mtu"], plugin["ipMasq"]) == ("bridge", 1440, False)
    assert plugin["ipam"]["ranges"] == [[{"subnet": c}] for c in cidrs]
    assert plugin["ipam"]["routes"] == [{"dst": r} for r in routes]
