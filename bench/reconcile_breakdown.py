#!/usr/bin/env python3
"""Where one steady-state reconcile spends its time at N nodes (no API server, no agent).

Builds a one-node topology in a scratch namespace ``<prefix>-n1``, writes a static mesh
of the node plus N synthetic nodes (the same keys, addresses and pod CIDRs as
bench/control_plane.py), runs `wgmanager apply` twice (the first programs N peers, the
second is a no-op reconcile and reports its own duration, which includes compiling the
eBPF program once per process), then times each step the reconciler repeats per event
in a separate process inside the namespace, against the live device and maps: the best
of 3 runs of

- ``device_read``: one full UAPI dump of the WireGuard device, parsed (reconciler.py does 4
  per reconcile: before step 1, in configure(), before planning and after applying);
- ``compute_mesh``: validation and claims of every node (with and without ``previous``);
- ``datapath_map`` and ``map_read_cidrs`` (2 each per reconcile), ``plan_map`` (2),
  ``plan_peers`` (1).

    sudo .venv/bin/python bench/reconcile_breakdown.py [--sizes 1000,5000]

Prints one JSON object per size (milliseconds). Not part of bench/run.py; it explains
the control-plane figures (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import control_plane
from benchlib import log

from wgmanager.lab import topology

STEPS = r'''
import json, sys, time
from pathlib import Path
from wgmanager.commands import meshfile
from wgmanager.core.mesh import compute_mesh, datapath_map
from wgmanager.core.plan import plan_map, plan_peers
from wgmanager.datapath.maps import PinnedMaps
from wgmanager.keystore import KeyStore
from wgmanager.wireguard.userspace import UserspaceBackend
d, pins = Path(sys.argv[1]), Path(sys.argv[2])
mesh_file = meshfile.load(d / "mesh.json")
dev = UserspaceBackend("wgm0", socket_dir=d / "wg", spawn=False)
key = KeyStore(d / "state").load_or_create().key.public_key
def best(fn):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return round(min(times) * 1000, 1), result
out = {}
out["device_read"], state = best(dev.read)
def mesh(previous=None):
    return compute_mesh(local_name="node1", local_key=key, specs=mesh_file.nodes,
                        config=mesh_file.config, previous=previous)
out["compute_mesh"], m = best(mesh)
out["compute_mesh_with_previous"], _ = best(lambda: mesh(m))
out["datapath_map"], want = best(lambda: datapath_map(m, state, mesh_file.config))
with PinnedMaps(pins) as maps:
    out["map_read_cidrs"], have = best(maps.read_cidrs)
out["plan_map"], _ = best(lambda: plan_map(want, have))
out["plan_peers"], _ = best(lambda: plan_peers(m.peers, state.peers))
out["per_reconcile_estimate"] = round(4 * out["device_read"] + out["compute_mesh_with_previous"]
    + 2 * (out["datapath_map"] + out["map_read_cidrs"] + out["plan_map"])
    + out["plan_peers"], 1)
print(json.dumps(out))
'''


def breakdown(n: int) -> dict[str, Any]:
    with benchlib.owned_prefix() as prefix:
        d = benchlib.run_dir(prefix)
        node = topology.create(prefix, nodes=1, pods_per_node=1).nodes[0]
        pins = benchlib.pin_dir(prefix) / node.name
        args = ["--state-dir", str(d / "state"), "--socket-dir", str(d / "wg"),
                "--pin-dir", str(pins)]
        nodes = [node.spec(None)]
        for i in range(n):
            obj = control_plane.synth_node(i, control_plane.new_key().base64())
            nodes.append({"name": obj["metadata"]["name"],
                          "addresses": [a["address"] for a in obj["status"]["addresses"]],
                          "podCIDRs": obj["spec"]["podCIDRs"],
                          "publicKey": obj["metadata"]["annotations"][control_plane.ANNOTATION]})
        (d / "mesh.json").write_text(json.dumps({
            "listenPort": 51820, "clusterCIDRs": list(control_plane.CLUSTER_CIDRS),
            "nodes": nodes}))
        inside = ["nsenter", f"--net=/run/netns/{node.netns}", sys.executable]
        apply = [*inside, "-m", "wgmanager", "--log-level", "warning", "apply", "--mesh",
                 str(d / "mesh.json"), "--node-name", node.name, *args]
        first = json.loads(topology.run(apply, timeout=600).stdout)
        second = json.loads(topology.run(apply, timeout=600).stdout)
        steps = json.loads(topology.run([*inside, "-c", STEPS, str(d), str(pins)],
                                        timeout=600).stdout)
    return {"nodes": n, "first_apply_s": first["seconds"],
            "noop_apply_s_incl_compile": second["seconds"], "steps_ms": steps,
            "code": benchlib.code_version()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,5000")
    a = p.parse_args()
    benchlib.terminate_on_sigterm()
    for n in (int(s) for s in a.sizes.split(",")):
        log(f"reconcile breakdown at {n} nodes")
        print(json.dumps(breakdown(n)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
