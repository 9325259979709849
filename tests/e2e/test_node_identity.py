"""A node speaks only for itself: the audit's attack (issue 14, finding 1) refused by the
API server, not merely noticed by the agents.

Each lab agent reads Nodes with the agents' shared identity and writes its own Node's
annotations with its node's identity (a kubelet's client certificate, system:node:NAME), as
the Helm chart's nodeIdentity does. The API server runs with the Node authorizer and the
NodeRestriction admission plugin, as kubeadm sets it up. Before, one agent credential
rewrote another node's key and every node followed within 0.64 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from tests.e2e.kubecluster import KubeCluster, running_cluster
from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.kube.translate import NEXT_KEY_ANNOTATION, PUBLIC_KEY_ANNOTATION


@pytest.fixture(scope="module")
def kc() -> Iterator[KubeCluster]:
    with running_cluster("wgi") as cluster:
        yield cluster


def core_from(kubeconfig: Any) -> Any:
    return k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig)))


def status_of(call: Any) -> int:
    try:
        call()
    except ApiException as e:
        return int(e.status)
    return 200


def annotate(key: str, value: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {key: value}}}


def test_keys_were_published_with_each_nodes_own_identity(kc: KubeCluster) -> None:
    """The lab's agents can only have published their keys as themselves: their shared
    identity may not write Nodes at all."""
    for node in kc.lab.nodes:
        assert PublicKey.from_base64(kc.annotation(node.name) or "")
    shared = core_from(kc.lab.agent_kubeconfig)
    n1 = kc.lab.nodes[0]
    assert status_of(lambda: shared.patch_node(n1.name, annotate("example.com/probe", "1"))) \
        == 403


@pytest.mark.parametrize("annotation", [PUBLIC_KEY_ANNOTATION, NEXT_KEY_ANNOTATION])
def test_a_nodes_credentials_cannot_write_another_nodes_key(kc: KubeCluster,
                                                            annotation: str) -> None:
    n1, n2, n3 = kc.lab.nodes
    genuine = kc.annotation(n2.name)
    before = {n.name: kc.peer_keys(n) for n in (n1, n3)}
    attacker = core_from(kc.lab.node_kubeconfig(n1))
    forged = PrivateKey.generate().public_key.base64()
    assert status_of(lambda: attacker.patch_node(n2.name, annotate(annotation, forged))) == 403
    # Nothing changed: node2's key, and every peer on the other nodes.
    assert kc.annotation(n2.name) == genuine
    node2 = kc.core.read_node(n2.name)
    assert (node2.metadata.annotations or {}).get(NEXT_KEY_ANNOTATION) is None
    assert {n.name: kc.peer_keys(n) for n in (n1, n3)} == before


def test_a_nodes_credentials_cannot_touch_other_nodes_at_all(kc: KubeCluster) -> None:
    """What the shared agent credential could do before (cordon, taint, label, delete any
    node) is refused for a node's own credentials on every other node."""
    n1, n2, _ = kc.lab.nodes
    attacker = core_from(kc.lab.node_kubeconfig(n1))
    assert status_of(lambda: attacker.patch_node(
        n2.name, {"spec": {"unschedulable": True}})) == 403
    assert status_of(lambda: attacker.patch_node(
        n2.name, {"spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}})) == 403
    assert status_of(lambda: attacker.patch_node(
        n2.name, {"metadata": {"labels": {"example.com/x": "1"}}})) == 403
    assert status_of(lambda: attacker.delete_node(n2.name)) == 403
    node2 = kc.core.read_node(n2.name)
    assert not node2.spec.unschedulable
    assert all(t.key != "x" for t in node2.spec.taints or [])
    # Its own Node it may annotate (that is how its key gets published).
    assert status_of(lambda: attacker.patch_node(
        n1.name, annotate("example.com/own", "1"))) == 200
    kc.core.patch_node(n1.name, {"metadata": {"annotations": {"example.com/own": None}}})


def test_the_shared_agent_credential_reads_nodes_and_records_events_only(
        kc: KubeCluster) -> None:
    shared = core_from(kc.lab.agent_kubeconfig)
    assert len(shared.list_node().items) >= 3
    n2 = kc.lab.nodes[1]
    forged = PrivateKey.generate().public_key.base64()
    assert status_of(lambda: shared.patch_node(
        n2.name, annotate(PUBLIC_KEY_ANNOTATION, forged))) == 403
    events = kc.core.list_namespaced_event("default").items
    assert any(e.reason == "PublicKeyPublished" and e.involved_object.name == n2.name
               for e in events)
