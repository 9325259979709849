"""The `wgmanager` command line: a thin layer that builds settings and calls the node code.

Every failure ends in one line on stderr, ``wgmanager: error: <what> ; <fix>``, and a
non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from wgmanager import __version__, config
from wgmanager.config import BackendMode
from wgmanager.core.mesh import LocalNodeError
from wgmanager.core.model import IPNetwork
from wgmanager.errors import ConfigError, WgmError
from wgmanager.logs import setup_logging
from wgmanager.wireguard.backend import WireGuardBackend


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wgmanager", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"wgmanager {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser("pubkey", help="print this node's public key (creating the key pair)")
    k.add_argument("--state-dir", type=Path, default=config.DEFAULT_STATE_DIR)

    a = sub.add_parser("apply", help="configure this node once from a static mesh file")
    a.add_argument("--mesh", type=Path, required=True, help="mesh JSON file (docs/operations.md)")
    a.add_argument("--node-name", required=True, help="this node's name in the mesh file")
    _node_flags(a)

    g = sub.add_parser("agent", help="run the node agent against the Kubernetes API")
    g.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="this node's Node name (default: $NODE_NAME)")
    g.add_argument("--kubeconfig", type=Path, default=_env_path("KUBECONFIG"),
                   help="kubeconfig file (default: $KUBECONFIG, else in-cluster config)")
    g.add_argument("--node-kubeconfig", type=Path, default=_env_path("WGM_NODE_KUBECONFIG"),
                   help="this node's own credentials (its kubelet's kubeconfig, e.g. "
                        "/etc/kubernetes/kubelet.conf on kubeadm), used for the only writes "
                        "the agent makes to Nodes: the API server then refuses a node "
                        "writing another node's keys (default: $WGM_NODE_KUBECONFIG; without "
                        "it, writes use --kubeconfig's identity, which can write any node)")
    g.add_argument("--events-namespace", default=os.environ.get("POD_NAMESPACE") or "default",
                   help="namespace the agent's Events are created in (default: "
                        "$POD_NAMESPACE, else default)")
    g.add_argument("--cluster-cidrs", default="",
                   help="comma-separated CIDRs covering all pod networks; pod traffic into "
                        "them with no ready peer is dropped (fail closed)")
    g.add_argument("--persistent-keepalive", type=int, default=0,
                   help="seconds between keepalives to each peer (0: off)")
    g.add_argument("--health-address", default="0.0.0.0")
    g.add_argument("--health-port", type=int, default=9876,
                   help="serves /healthz and /readyz (0: disabled)")
    g.add_argument("--metrics-address", default="0.0.0.0")
    g.add_argument("--metrics-port", type=int, default=9877,
                   help="serves Prometheus /metrics (0: disabled)")
    g.add_argument("--metrics-per-peer", action="store_true",
                   help="per-peer byte and handshake series (one series per node: mind "
                        "the cardinality on large clusters)")
    g.add_argument("--no-events", dest="events", action="store_false",
                   help="do not record Kubernetes Events on this node's Node object")
    g.add_argument("--resync-interval", type=float, default=60.0,
                   help="seconds between full reconciles without events")
    g.add_argument("--debounce", type=float, default=0.1,
                   help="while node events keep arriving, seconds from the end of one "
                        "reconcile to the start of the next (a burst becomes few passes); "
                        "an event after a quiet spell is reconciled at once")
    g.add_argument("--fail-mode", choices=["closed", "open"], default="closed",
                   help="traffic to a remote pod CIDR whose peer is not ready: closed drops "
                        "it (default), open lets it take the CNI's path unencrypted")
    g.add_argument("--key-rotation-interval", type=parse_duration, default=0.0,
                   metavar="DURATION",
                   help="rotate this node's key on a schedule, e.g. 720h or 30d (default: "
                        "off); nodes spread over the last 20%% of the interval")
    g.add_argument("--key-rotation-timeout", type=parse_duration, default=300.0,
                   metavar="DURATION",
                   help="roll a rotation back if peers have not switched by then (default "
                        "5m)")
    g.add_argument("--key-rotation-settle", type=float, default=0.1, metavar="SECONDS",
                   help="how long a rotating node sends through both devices before it "
                        "publishes its next key (default 0.1): longer protects packets "
                        "delayed in a loaded node's WireGuard and costs as long of duplicate "
                        "packets per peer")
    _node_flags(g)

    r = sub.add_parser("rotate-keys", help="rotate WireGuard keys without losing traffic "
                                           "(through the Kubernetes API)")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("nodes", nargs="*", default=[], metavar="NODE",
                       help="the nodes to rotate")
    which.add_argument("--all", action="store_true", help="every node that runs an agent")
    r.add_argument("--max-concurrent", type=int, default=1, metavar="K",
                   help="nodes rotating at the same time (default %(default)s)")
    r.add_argument("--wait", dest="wait", action="store_true", default=True,
                   help="wait until every node runs on its new key (the default)")
    r.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return once every agent has accepted the request")
    r.add_argument("--timeout", type=parse_duration, default=600.0, metavar="DURATION",
                   help="give up after this long (default 10m)")
    r.add_argument("--kubeconfig", type=Path, default=_env_path("KUBECONFIG"),
                   help="kubeconfig file (default: $KUBECONFIG, else in-cluster config)")

    st = sub.add_parser("status", help="show this node's WireGuard device, peers and datapath")
    st.add_argument("--json", action="store_true", help="stable machine-readable output")
    st.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                    help="this node's name, to compare with the API (default: $NODE_NAME)")
    st.add_argument("--kubeconfig", type=Path, default=_env_path("KUBECONFIG"),
                    help="compare with the Nodes in this cluster (default: $KUBECONFIG)")
    _node_flags(st)

    d = sub.add_parser("doctor", help="preflight: can this node run wgmanager, and if not, "
                                      "what to fix")
    from wgmanager.commands.doctor import checks as doctor

    doctor.add_arguments(d)

    lab = sub.add_parser("lab", help="a multi-node encrypted cluster on this machine")
    lab.add_argument("--root", type=Path, default=Path("/run/wgmanager-lab"),
                     help="where the lab keeps its state (default %(default)s)")
    lab.add_argument("--prefix", default="wgl",
                     help="name prefix of the lab's namespaces (default %(default)s)")
    lsub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    lu = lsub.add_parser("up", help="build the lab: real kubelets, pods, the Helm chart")
    lu.add_argument("--nodes", type=int, default=3)
    lu.add_argument("--pods-per-node", type=int, default=2)
    lu.add_argument("--agents", choices=("daemonset", "processes"), default="daemonset",
                    help="daemonset (default): real kubelets run the Helm chart's "
                         "DaemonSet, as users install it; processes: one agent process per "
                         "node namespace and no kubelets (seconds instead of minutes)")
    lu.add_argument("--overlay", choices=("none", "vxlan"), default="none",
                    help="with --agents processes: route pods to other nodes through a "
                         "VXLAN device as flannel's vxlan backend does (default: host-gw "
                         "routes); `lab check` then proves the overlay encrypted")
    lsub.add_parser("down", help="remove everything the lab created")
    ls = lsub.add_parser("status", help="nodes, agents, peers and handshakes")
    ls.add_argument("--json", action="store_true")
    lsub.add_parser("check", help="prove connectivity and encryption (non-zero on failure)")
    le = lsub.add_parser("exec", help="run a command inside a node or pod: exec NAME -- CMD")
    le.add_argument("name")
    le.add_argument("argv", nargs=argparse.REMAINDER)

    t = sub.add_parser("teardown", help="remove wgmanager's device, filters and maps from "
                                        "this node (the key is kept)")
    _node_flags(t)

    sc = sub.add_parser("startup-taint-controller",
                        help="remove the startup taint from each node once its agent is "
                             "Ready (the Helm chart's startupTaint Deployment)")
    sc.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "kube-system"),
                    help="where the agent pods run (default: $POD_NAMESPACE, else "
                         "%(default)s)")
    sc.add_argument("--taint-key", default="wgmanager.io/agent-not-ready",
                    help="the taint kubelets register with (default %(default)s)")
    sc.add_argument("--agent-selector", default="app.kubernetes.io/component=agent",
                    help="label selector of the agent pods (default %(default)s)")
    sc.add_argument("--kubeconfig", type=Path, default=_env_path("KUBECONFIG"),
                    help="kubeconfig file (default: $KUBECONFIG, else in-cluster config)")

    w = sub.add_parser("wireguard-go-supervisor",
                       help="run wireguard-go for the devices the agent asks for (the Helm "
                            "chart's wireguard-go pods)")
    from wgmanager.wireguard import supervisor

    supervisor.add_arguments(w)
    return p


def _node_flags(p: argparse.ArgumentParser) -> None:
    # The path flags also default from WGM_STATE_DIR, WGM_SOCKET_DIR and WGM_PIN_DIR, so that
    # a shell set up for one node (`wgmanager lab exec NODE`) needs no flags.
    p.add_argument("--state-dir", type=Path,
                   default=_env_path("WGM_STATE_DIR") or config.DEFAULT_STATE_DIR,
                   help="where the private key lives (default $WGM_STATE_DIR, else "
                        "%(default)s)")
    p.add_argument("--interface", default=config.DEFAULT_IFNAME,
                   help="WireGuard interface name (default %(default)s)")
    p.add_argument("--listen-port", type=int, default=None,
                   help="WireGuard UDP port (default: the mesh's, else 51820)")
    p.add_argument("--rotation-listen-port", type=int, default=None,
                   help="UDP port of the second device a key rotation runs (default: "
                        "listen port + 1); open it between nodes too")
    p.add_argument("--mtu", type=int, default=None,
                   help="WireGuard MTU (default: uplink MTU - 60 for IPv4, - 80 for IPv6)")
    p.add_argument("--backend", type=BackendMode, choices=list(BackendMode),
                   default=BackendMode.AUTO)
    p.add_argument("--socket-dir", type=Path,
                   default=_env_path("WGM_SOCKET_DIR") or config.DEFAULT_SOCKET_DIR,
                   help="wireguard-go UAPI socket directory (default $WGM_SOCKET_DIR, else "
                        "%(default)s)")
    p.add_argument("--no-spawn-userspace", dest="spawn_userspace", action="store_false",
                   help="never start wireguard-go (its own pod runs it)")
    p.add_argument("--pin-dir", type=Path,
                   default=_env_path("WGM_PIN_DIR") or config.DEFAULT_PIN_DIR,
                   help="bpffs directory for the datapath maps (default $WGM_PIN_DIR, else "
                        "%(default)s)")
    p.add_argument("--uplink", default=None,
                   help="underlay device (default: the one holding the node's InternalIP)")
    p.add_argument("--pod-interfaces", default=config.DEFAULT_POD_INTERFACES,
                   help="glob of host-side pod veth names that get the pre-netfilter fast path "
                        "(from_pod; the sending node's iptables rules do not see what it "
                        "steers); default none: steering at the uplink's egress, after "
                        "netfilter")
    p.add_argument("--max-cidrs", type=int, default=65536)


def settings_from(args: argparse.Namespace, node_name: str,
                  listen_port: int) -> config.NodeSettings:
    if args.mtu is not None and not 576 <= args.mtu <= 65535:
        raise ConfigError(f"--mtu {args.mtu} is out of range (576-65535)")
    if not 1 <= listen_port <= 65535:
        raise ConfigError(f"--listen-port {listen_port} is out of range (1-65535)")
    if len(args.interface) > config.MAX_IFNAME:
        raise ConfigError(f"--interface {args.interface!r} is longer than {config.MAX_IFNAME}"
                          " characters (key rotation's second device appends one)")
    rotation_port = args.rotation_listen_port
    if rotation_port is not None and not 1 <= rotation_port <= 65535:
        raise ConfigError(f"--rotation-listen-port {rotation_port} is out of range (1-65535)")
    if (rotation_port or listen_port + 1) in (listen_port, 65536):
        raise ConfigError("key rotation needs a second port: set --rotation-listen-port to a "
                          "port other than --listen-port")
    rotation = config.RotationSettings()
    if getattr(args, "key_rotation_interval", None) is not None:
        if args.key_rotation_timeout <= 0:
            raise ConfigError("--key-rotation-timeout must be positive, e.g. 5m")
        settle = args.key_rotation_settle
        if not 0 <= settle <= MAX_SETTLE:
            raise ConfigError(f"--key-rotation-settle {settle:g} is out of range: give 0 to "
                              f"{MAX_SETTLE:g} seconds, e.g. 0.1")
        rotation = config.RotationSettings(interval=args.key_rotation_interval,
                                           timeout=args.key_rotation_timeout, settle=settle)
    return config.NodeSettings(
        node_name=node_name,
        state_dir=args.state_dir,
        wireguard=config.WireGuardSettings(
            ifname=args.interface, listen_port=listen_port, mtu=args.mtu,
            backend=args.backend, socket_dir=args.socket_dir,
            spawn_userspace=args.spawn_userspace, rotation_port=rotation_port),
        datapath=config.DatapathSettings(
            pin_dir=args.pin_dir, max_cidrs=args.max_cidrs, uplink=args.uplink,
            pod_interfaces=args.pod_interfaces),
        rotation=rotation,
    )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


MAX_SETTLE = 5.0  # seconds; past that a rotation only gains duplicates and time


def parse_duration(text: str) -> float:
    """Seconds from "90", "45s", "10m", "720h" or "30d"; "0" or "off" is 0 (disabled)."""
    t = text.strip().lower()
    if t in ("0", "off", ""):
        return 0.0
    unit = _UNITS.get(t[-1])
    number = t[:-1] if unit is not None else t
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 10m, 720h, "
                                         "30d)") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


def _backends(settings: config.NodeSettings) -> Callable[[str], WireGuardBackend]:
    from wgmanager.wireguard.select import select_backend

    return lambda ifname: select_backend(settings.wireguard, ifname)


def cmd_pubkey(args: argparse.Namespace) -> int:
    from wgmanager.keystore import KeyStore

    print(KeyStore(args.state_dir).load_or_create().key.public_key.base64())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from wgmanager.commands import meshfile
    from wgmanager.reconciler import NodeReconciler

    mesh = meshfile.load(args.mesh)
    mesh_config = mesh.config
    if args.listen_port is not None:
        mesh_config = replace(mesh_config, listen_port=args.listen_port)
    settings = settings_from(args, args.node_name, mesh_config.listen_port)
    reconciler = NodeReconciler(settings, _backends(settings), mesh_config)
    try:
        # A static mesh file cannot carry a rotation; a node that rotated under an agent
        # before keeps its current slot (key and device).
        result = reconciler.reconcile(mesh.nodes, reconciler.keystore.load_rotation())
    finally:
        reconciler.close()
    summary = {
        "node": settings.node_name,
        "backend": reconciler.backend.kind.value,
        "interface": reconciler.backend.ifname,
        "public_key": result.device.public_key.base64() if result.device.public_key else None,
        "peers": len(result.device.peers),
        "peer_ops": len(result.peer_ops),
        "map_changes": len(result.map_plan.upserts) + len(result.map_plan.deletes),
        "attached": list(result.attached),
        "rejected": {r.name: r.reason for r in result.mesh.rejected.values()},
        "seconds": round(result.seconds, 3),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    import signal

    from wgmanager.agent.health import HealthSettings
    from wgmanager.agent.loop import Agent, AgentTiming
    from wgmanager.agent.metrics import AgentMetrics
    from wgmanager.core.model import MeshConfig
    from wgmanager.kube.client import NodesAPI
    from wgmanager.kube.events import EventRecorder
    from wgmanager.kube.rest import connect
    from wgmanager.reconciler import NodeReconciler

    if not args.node_name:
        raise ConfigError("no node name: pass --node-name or set NODE_NAME (the Helm chart "
                          "sets it from the downward API)")
    port = args.listen_port or config.DEFAULT_LISTEN_PORT
    if not 0 <= args.persistent_keepalive <= 65535:
        raise ConfigError("--persistent-keepalive must be 0-65535 seconds")
    if args.resync_interval <= 0 or args.debounce < 0:
        raise ConfigError("--resync-interval must be > 0 and --debounce >= 0")
    mesh_config = MeshConfig(listen_port=port, persistent_keepalive=args.persistent_keepalive,
                             cluster_cidrs=parse_cidrs(args.cluster_cidrs, "--cluster-cidrs"),
                             fail_closed=args.fail_mode == "closed")
    settings = settings_from(args, args.node_name, port)
    if not mesh_config.fail_closed:
        logging.getLogger("wgmanager.agent.loop").warning(
            "--fail-mode open: pod traffic to a node whose peer is not ready leaves "
            "unencrypted; use it only where availability matters more than confidentiality")
    elif not mesh_config.cluster_cidrs:
        logging.getLogger("wgmanager.agent.loop").warning(
            "no --cluster-cidrs: traffic to a pod CIDR no node claims (a deleted node's, a new "
            "node's before its key) follows the CNI's route in plaintext; set the cluster's "
            "pod CIDRs")
    api_client = connect(args.kubeconfig)
    if args.node_kubeconfig is not None:
        nodes_api = NodesAPI(api_client, writer=connect(args.node_kubeconfig),
                             writer_source=str(args.node_kubeconfig))
    else:
        logging.getLogger("wgmanager.agent.loop").warning(
            "no --node-kubeconfig: this node's key is published with the agent's own "
            "credentials, which can write every node's key; give the agent the node's "
            "kubelet kubeconfig so that a node can only speak for itself")
        nodes_api = NodesAPI(api_client)
    metrics = AgentMetrics(per_peer=args.metrics_per_peer) if args.metrics_port else None
    agent = Agent(
        reconciler=NodeReconciler(settings, _backends(settings), mesh_config),
        nodes_api=nodes_api,
        timing=AgentTiming(debounce=args.debounce, resync_interval=args.resync_interval),
        health=(HealthSettings(args.health_address, args.health_port)
                if args.health_port else None),
        metrics=metrics,
        events=(EventRecorder(api_client, args.node_name, namespace=args.events_namespace)
                if args.events else None),
    )
    if metrics is not None:
        try:
            metrics.serve(args.metrics_address, args.metrics_port)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {args.metrics_address}:"
                              f"{args.metrics_port}: {e.strerror}; choose another "
                              "--metrics-port") from e
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.poke())
    agent.run()
    return 0


def parse_cidrs(text: str, flag: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(ipaddress.ip_network(part, strict=True))
        except ValueError:
            raise ConfigError(f"{flag}: {part!r} is not a network address (e.g. "
                              "10.244.0.0/16)") from None
    return tuple(out)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def cmd_status(args: argparse.Namespace) -> int:
    from wgmanager.commands import status
    from wgmanager.core.model import MeshConfig
    from wgmanager.kube.client import KubeError, NodesAPI
    from wgmanager.kube.rest import connect
    from wgmanager.kube.translate import node_spec

    port = args.listen_port or config.DEFAULT_LISTEN_PORT
    settings = settings_from(args, args.node_name or "", port)
    nodes = None
    api_error = None
    if args.node_name and args.kubeconfig is not None:
        try:
            api = NodesAPI(connect(args.kubeconfig), request_timeout=5.0)
            items = api.list_page(limit=0, cont=None).get("items") or []
            nodes = [node_spec(item) for item in items]
        except (KubeError, ConfigError) as e:
            api_error = f"cannot compare with the API: {e}"
    doc = status.collect(settings, _backends(settings), nodes=nodes,
                         mesh_config=MeshConfig(listen_port=port))
    if api_error:
        doc["errors"].append(api_error)
        doc["ok"] = False
    print(json.dumps(doc, indent=2) if args.json else status.render(doc))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from wgmanager.commands.doctor import checks as doctor

    return doctor.run(args)


def cmd_lab(args: argparse.Namespace) -> int:
    from wgmanager.lab import cli as lab_cli

    return lab_cli.run(args)


def cmd_wireguard_go_supervisor(args: argparse.Namespace) -> int:
    from wgmanager.wireguard import supervisor

    return supervisor.run(args)


def cmd_startup_taint_controller(args: argparse.Namespace) -> int:
    import signal
    import threading

    from wgmanager.kube.client import load_api
    from wgmanager.kube.startup_taint import StartupTaintController

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    StartupTaintController(load_api(args.kubeconfig), namespace=args.namespace,
                           key=args.taint_key, selector=args.agent_selector).run(stop)
    return 0


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    from wgmanager.commands.rotate_keys import rotate
    from wgmanager.kube.client import NodesAPI
    from wgmanager.kube.rest import connect

    if args.all == bool(args.nodes):
        raise ConfigError("name the nodes to rotate, or pass --all (not both)")
    api = NodesAPI(connect(args.kubeconfig), request_timeout=10.0)
    return rotate(api, None if args.all else args.nodes, max_concurrent=args.max_concurrent,
                  wait=args.wait, timeout=args.timeout)


def cmd_teardown(args: argparse.Namespace) -> int:
    from wgmanager.reconciler import teardown

    settings = settings_from(args, "", args.listen_port or config.DEFAULT_LISTEN_PORT)
    for line in teardown(settings, _backends(settings)):
        print(line)
    return 0


COMMANDS = {"pubkey": cmd_pubkey, "apply": cmd_apply, "agent": cmd_agent,
            "status": cmd_status, "doctor": cmd_doctor, "lab": cmd_lab,
            "teardown": cmd_teardown, "rotate-keys": cmd_rotate_keys,
            "wireguard-go-supervisor": cmd_wireguard_go_supervisor,
            "startup-taint-controller": cmd_startup_taint_controller}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level, json_format=args.log_format == "json")
    try:
        return COMMANDS[args.command](args)
    except (WgmError, LocalNodeError) as e:
        print(f"wgmanager: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130




if __name__ == "__main__":
    sys.exit(main())
