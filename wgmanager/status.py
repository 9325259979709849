"""`wgmanager status`: what this node's encryption looks like right now, for people and scripts.

``collect`` gathers one JSON-ready document (the stable contract of ``status --json``) from
the live device, the pinned maps, the tc attachments, the key file and, when the API is
reachable, the mesh the agent would compute (so nodes without a valid key are listed with
the reason). ``render`` turns that document into a table. Nothing here writes anything.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from wgmanager.config import NodeSettings
from wgmanager.core.keys import PublicKey
from wgmanager.core.mesh import LocalNodeError, compute_mesh
from wgmanager.core.model import DeviceState, MeshConfig, NodeSpec, network_sort_key
from wgmanager.core.plan import configured
from wgmanager.datapath import links
from wgmanager.datapath.bpf import attachments
from wgmanager.datapath.maps import PinnedMaps
from wgmanager.errors import WgmError
from wgmanager.keystore import KeyStore
from wgmanager.wireguard.backend import WireGuardBackend

SCHEMA_VERSION = 1
RECENT_HANDSHAKE = 180.0  # seconds: WireGuard rekeys every 120 s on an active session


def collect(settings: NodeSettings, backend: WireGuardBackend, *,
            nodes: Iterable[NodeSpec] | None = None,
            mesh_config: MeshConfig | None = None, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "node": settings.node_name,
                           "interface": settings.wireguard.ifname,
                           "backend": backend.kind.value, "errors": []}
    device: DeviceState | None = None
    try:
        if backend.device_exists():
            device = backend.read()
        else:
            doc["errors"].append(f"WireGuard device {settings.wireguard.ifname} is not running")
    except WgmError as e:
        doc["errors"].append(str(e))
    doc["public_key"] = device.public_key.base64() if device and device.public_key else None
    doc["listen_port"] = device.listen_port if device else None
    doc["key"] = _key_info(settings, now)
    with links.iproute() as ipr:
        link = links.get_link(ipr, settings.wireguard.ifname)
        doc["mtu"] = link.mtu if link else None
        attached = [{"ifname": a.ifname, "hook": a.hook.value}
                    for ln in links.list_links(ipr) for a in attachments(ipr, ln.ifname)]
    doc["datapath"] = _datapath(settings, attached, doc["errors"])

    names: dict[PublicKey, str] = {}
    expected: dict[str, Any] | None = None
    if nodes is not None and device is not None and device.public_key is not None:
        expected, names = _expected(settings, device, list(nodes), mesh_config or MeshConfig())
    doc["peers"] = [_peer(st, names.get(key), now) for key, st in
                    sorted((device.peers if device else {}).items(),
                           key=lambda kv: names.get(kv[0], "~" + kv[0].base64()))]
    doc["expected"] = expected
    doc["ok"] = (not doc["errors"] and bool(attached)
                 and (expected is None or (not expected["missing"]
                                           and not expected["unexpected"])))
    return doc


def _key_info(settings: NodeSettings, now: float) -> dict[str, Any]:
    path = KeyStore(settings.state_dir).path
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return {"path": str(path), "age_seconds": None}
    return {"path": str(path), "age_seconds": round(age, 1)}


def _datapath(settings: NodeSettings, attached: list[dict[str, str]],
              errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"pin_dir": str(settings.datapath.pin_dir), "attached": attached,
                           "counters": None, "cidrs": None}
    try:
        with PinnedMaps(settings.datapath.pin_dir) as maps:
            out["counters"] = {c.name.lower(): {"packets": p, "bytes": b}
                               for c, (p, b) in maps.read_counters().items()}
            out["cidrs"] = {str(net): act.name.lower() for net, act in
                            sorted(maps.read_cidrs().items(),
                                   key=lambda kv: network_sort_key(kv[0]))}
    except WgmError as e:
        errors.append(str(e))
    if not attached:
        errors.append("the eBPF datapath is not attached to any interface")
    return out


def _expected(settings: NodeSettings, device: DeviceState, nodes: list[NodeSpec],
              config: MeshConfig) -> tuple[dict[str, Any], dict[PublicKey, str]]:
    assert device.public_key is not None
    try:
        mesh = compute_mesh(local_name=settings.node_name, local_key=device.public_key,
                            specs=nodes, config=config)
    except LocalNodeError as e:
        return ({"peers_expected": None, "peers_configured": len(device.peers),
                 "missing": [], "unexpected": [], "rejected": [], "error": str(e)}, {})
    names = {n.public_key: n.name for n in mesh.nodes.values()}
    missing = sorted(n.name for n in mesh.nodes.values()
                     if not configured(mesh.peers[n.public_key],
                                       device.peers.get(n.public_key)))
    unexpected = sorted(k.base64() for k in device.peers if k not in mesh.peers)
    rejected = [{"node": r.name, "reason": r.reason, "pending": r.pending}
                for r in sorted(mesh.rejected.values(), key=lambda r: r.name)]
    return ({"peers_expected": len(mesh.peers),
             "peers_configured": len(mesh.peers) - len(missing),
             "missing": missing, "unexpected": unexpected, "rejected": rejected}, names)


def _peer(st: Any, node: str | None, now: float) -> dict[str, Any]:
    age = None if st.last_handshake is None else round(max(0.0, now - st.last_handshake), 1)
    return {"node": node, "public_key": st.public_key.base64(),
            "endpoint": str(st.endpoint) if st.endpoint else None,
            "allowed_ips": [str(n) for n in sorted(st.allowed_ips, key=network_sort_key)],
            "last_handshake_age_seconds": age,
            "recent_handshake": age is not None and age < RECENT_HANDSHAKE,
            "rx_bytes": st.rx_bytes, "tx_bytes": st.tx_bytes,
            "persistent_keepalive": st.persistent_keepalive}


def render(doc: dict[str, Any]) -> str:
    lines = [f"node {doc['node']}  interface {doc['interface']} ({doc['backend']})  "
             f"port {doc['listen_port']}  mtu {doc['mtu']}  "
             f"{'OK' if doc['ok'] else 'DEGRADED'}",
             f"public key {doc['public_key']}  key age {_age(doc['key']['age_seconds'])}"]
    dp = doc["datapath"]
    hooks = ", ".join(f"{a['ifname']}/{a['hook']}" for a in dp["attached"]) or "none"
    lines.append(f"datapath attached: {hooks}")
    if dp["counters"]:
        lines.append("datapath packets: " + "  ".join(
            f"{k.replace('_', ' ')} {v['packets']}" for k, v in dp["counters"].items()))
    lines.append("")
    rows = [("NODE", "PUBLIC KEY", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RX", "TX")]
    for p in doc["peers"]:
        rows.append((p["node"] or "?", p["public_key"][:8] + "…", p["endpoint"] or "-",
                     ",".join(p["allowed_ips"]), _age(p["last_handshake_age_seconds"]),
                     _bytes(p["rx_bytes"]), _bytes(p["tx_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    exp = doc["expected"]
    if exp is not None:
        lines.append("")
        lines.append(f"peers expected {exp['peers_expected']}, configured "
                     f"{exp['peers_configured']}")
        for name in exp["missing"]:
            lines.append(f"  missing: {name}")
        for key in exp["unexpected"]:
            lines.append(f"  unexpected peer: {key[:8]}…")
        for r in exp["rejected"]:
            lines.append(f"  no peer for {r['node']}: {r['reason']}")
    for err in doc["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n:.1f}TiB"
