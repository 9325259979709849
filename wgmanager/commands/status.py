"""`wgmanager status`: what this node's encryption looks like right now, for people and scripts.

``collect`` gathers one JSON-ready document (the stable contract of ``status --json``) from
the live device and the implementation serving it (``implementation``: for wireguard-go the
binary its process runs, a true version and whether its TUN has offloads), the pinned maps,
the tc attachments, the key file and, when the API is reachable, the mesh the agent would
compute (so nodes without a valid key are listed with the reason). ``render`` turns that
document into a table. Nothing here writes anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from wgmanager.config import NodeSettings
from wgmanager.core.keys import PublicKey
from wgmanager.core.mesh import LocalNodeError, compute_mesh
from wgmanager.core.model import DeviceState, MeshConfig, NodeSpec, network_sort_key
from wgmanager.core.plan import configured
from wgmanager.core.rotation import RotationState, layout
from wgmanager.datapath import links
from wgmanager.datapath.bpf import attachments
from wgmanager.datapath.maps import PinnedMaps
from wgmanager.errors import WgmError
from wgmanager.keystore import KeyStore, slot_key
from wgmanager.wireguard import implementation
from wgmanager.wireguard.backend import WireGuardBackend

SCHEMA_VERSION = 1
RECENT_HANDSHAKE = 180.0  # seconds: WireGuard rekeys every 120 s on an active session


def collect(settings: NodeSettings, backends: Callable[[str], WireGuardBackend], *,
            nodes: Iterable[NodeSpec] | None = None,
            mesh_config: MeshConfig | None = None, now: float | None = None) -> dict[str, Any]:
    """``backends`` gives the backend for an interface name: which device is current
    depends on the key rotation state (two devices alternate)."""
    now = time.time() if now is None else now
    store = KeyStore(settings.state_dir)
    errors: list[str] = []
    try:
        rotation = store.load_rotation()
    except WgmError as e:
        errors.append(str(e))
        rotation = RotationState()
    lay = layout(rotation)
    ifname = settings.wireguard.ifname_for(lay.current)
    backend = backends(ifname)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "node": settings.node_name,
                           "interface": ifname, "backend": backend.kind.value,
                           "implementation": implementation.describe(backend),
                           "errors": errors}
    device: DeviceState | None = None
    try:
        if backend.device_exists():
            device = backend.read()
        else:
            doc["errors"].append(f"WireGuard device {ifname} is not running")
    except WgmError as e:
        doc["errors"].append(str(e))
    doc["public_key"] = device.public_key.base64() if device and device.public_key else None
    doc["listen_port"] = device.listen_port if device else None
    doc["key"] = _key_info(store, rotation, now)
    doc["key_rotation"] = _rotation_info(settings, rotation, backends, now)
    with links.iproute() as ipr:
        link = links.get_link(ipr, ifname)
        doc["mtu"] = link.mtu if link else None
        attached = [{"ifname": a.ifname, "hook": a.hook.value}
                    for ln in links.list_links(ipr) for a in attachments(ipr, ln.ifname)]
    doc["datapath"] = _datapath(settings, attached, doc["errors"])

    names: dict[PublicKey, str] = {}
    expected: dict[str, Any] | None = None
    if nodes is not None and device is not None and device.public_key is not None:
        expected, names = _expected(settings, device, list(nodes), mesh_config or MeshConfig(),
                                    store.load_quarantined())
    doc["peers"] = [_peer(st, names.get(key), now) for key, st in
                    sorted((device.peers if device else {}).items(),
                           key=lambda kv: names.get(kv[0], "~" + kv[0].base64()))]
    doc["expected"] = expected
    doc["ok"] = (not doc["errors"] and bool(attached)
                 and (expected is None or (not expected["missing"]
                                           and not expected["unexpected"])))
    return doc


def _key_info(store: KeyStore, rotation: RotationState, now: float) -> dict[str, Any]:
    name = slot_key(rotation.slot)
    mtime = store.mtime(name)
    return {"path": str(store.state_dir / name),
            "age_seconds": None if mtime is None else round(now - mtime, 1)}


def _rotation_info(settings: NodeSettings, rotation: RotationState,
                   backends: Callable[[str], WireGuardBackend], now: float) -> dict[str, Any]:
    """The rotation phase, and while one runs, how far the peers are (from the devices)."""
    out: dict[str, Any] = {"phase": rotation.phase, "slot": rotation.slot,
                           "last_request": rotation.last_request or None,
                           "last_result": rotation.last_result or None,
                           "last_finished_age_seconds": (round(now - rotation.last_finished, 1)
                                                         if rotation.last_finished else None)}
    rot = rotation.rotation
    if rot is None:
        return out
    out.update(request=rot.request, from_slot=rot.from_slot, to_slot=rot.to_slot,
               running_seconds=round(now - rot.began, 1), reason=rot.reason or None)
    alt = backends(settings.wireguard.ifname_for(rot.to_slot))
    try:
        if alt.device_exists():
            dev = alt.read()
            out["new_interface"] = alt.ifname
            out["new_public_key"] = dev.public_key.base64() if dev.public_key else None
            out["peers_on_new_key"] = sum(
                1 for p in dev.peers.values()
                if p.last_handshake is not None and p.last_handshake >= rot.started)
    except WgmError as e:
        out["error"] = str(e)
    return out


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
              config: MeshConfig, quarantined: frozenset[str],
              ) -> tuple[dict[str, Any], dict[PublicKey, str]]:
    """What the agent should have configured: the mesh it computes, with the nodes it said
    it quarantines (in the state dir), which then show as rejected and not as missing."""
    assert device.public_key is not None
    try:
        mesh = compute_mesh(local_name=settings.node_name, local_key=device.public_key,
                            specs=nodes, config=config, quarantined=quarantined)
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
             implementation.render(doc["implementation"]),
             f"public key {doc['public_key']}  key age {_age(doc['key']['age_seconds'])}",
             _render_rotation(doc["key_rotation"])]
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


def _render_rotation(rot: dict[str, Any]) -> str:
    if rot["phase"] == "idle":
        if not rot["last_result"]:
            return "key rotation: idle (never rotated)"
        return (f"key rotation: idle (last {rot['last_result']}, "
                f"{_age(rot['last_finished_age_seconds'])})")
    line = f"key rotation: {rot['phase']} for {rot['running_seconds']:.0f}s"
    if "peers_on_new_key" in rot:
        line += f", {rot['peers_on_new_key']} peer(s) on the new key"
    if rot.get("reason"):
        line += f" ({rot['reason']})"
    return line


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
