"""Someone with a node credential writes another node's key: noticed, and not rewarded.

The audit's attack (issue 14, finding 1): with any agent's credential, write your own key
into node2's `wgmanager.io/public-key`; every peer follows, and re-patching on every watch
event held the key most of the time and decrypted node2's pods' packets. Node identities
can no longer do it (tests/e2e/test_node_identity.py); anyone with `patch nodes` (here the
lab's admin) still can, and the agents refuse to reward it: node2 sees its annotation forged and
writes its own back (KeyAnnotationOverwritten), every other node sees node2's key jump
outside the rotation protocol (PeerKeyReplaced), and after three jumps within ten minutes
node2 is quarantined on every node: no peer at all, its pods' traffic dropped, nothing in
plaintext, so a key fight can cost node2 its traffic but never hand it to the attacker.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.kubecluster import KubeCluster, await_condition, running_cluster
from wgmanager.core.keys import PrivateKey, PublicKey
from wgmanager.core.mesh import QUARANTINE_REASON
from wgmanager.kube.translate import PUBLIC_KEY_ANNOTATION
from wgmanager.lab import traffic


@pytest.fixture(scope="module")
def kc() -> Iterator[KubeCluster]:
    with running_cluster("wgk") as cluster:
        yield cluster


def forge(kc: KubeCluster, node: str, key: str) -> None:
    kc.core.patch_node(node, {"metadata": {"annotations": {PUBLIC_KEY_ANNOTATION: key}}})


def test_a_key_fight_is_noticed_and_ends_in_quarantine_not_interception(kc: KubeCluster) -> None:
    n1, n2, n3 = kc.lab.nodes
    genuine = kc.annotation(n2.name)
    assert genuine
    attacker = PrivateKey.generate().public_key.base64()
    real, fake = PublicKey.from_base64(genuine), PublicKey.from_base64(attacker)
    observers = (n1, n3)

    def holds(key: PublicKey) -> bool:  # every observer holds this key, or no key of node2
        return all(key in keys or not keys & {real, fake}
                   for keys in (kc.peer_keys(n) for n in observers))

    def quarantined() -> bool:
        return all(not kc.peer_keys(n) & {real, fake} for n in observers)

    for _ in range(5):  # the attacker writes, node2's agent writes its own key back
        if quarantined():
            break
        forge(kc, n2.name, attacker)
        await_condition(lambda: holds(fake) or kc.annotation(n2.name) == genuine, 30,
                        "the forged key to reach the observers")
        await_condition(lambda: kc.annotation(n2.name) == genuine, 30,
                        "node2's agent to write its own key back")
        await_condition(lambda: holds(real), 30, "the genuine key to come back")
    await_condition(quarantined, 30, "every other node to quarantine node2")
    assert "overwritten by someone else" in kc.agent_log(n2)
    for node in observers:
        assert "replaced outside the rotation protocol" in kc.agent_log(node)
        # "node gets no peer" with the reason, once: not again on every later reconcile
        assert kc.agent_log(node).count(QUARANTINE_REASON) == 1
        assert PublicKey.from_base64(attacker) not in kc.peer_keys(node)
    with kc.capture("quarantine") as cap:
        assert traffic.ping(n1.pods[0], n2.pods[0].ipv4, count=3, interval=0.05,
                            wait=1)[1] == 0
        assert traffic.ping(n3.pods[0], n2.pods[0].ipv6, count=3, interval=0.05,
                            wait=1)[1] == 0
        assert traffic.ping(n1.pods[0], n3.pods[0].ipv4, count=3, interval=0.05)[1] == 3
    assert cap.plaintext_pod_packets() == 0
    # `wgmanager status` on an observer says why node2 has no peer (not "missing").
    for node in observers:
        status = kc.lab.node_status(node)
        assert status is not None
        expected = status["expected"]
        assert {"node": n2.name, "reason": QUARANTINE_REASON, "pending": False} \
            in expected["rejected"]
        assert n2.name not in expected["missing"] and status["ok"], status
