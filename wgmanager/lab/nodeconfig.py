"""What a real lab node's files are and say: containerd's config, the CNI template, the
KubeletConfiguration. Pure: paths in, text out; ``kubelets`` writes and runs them.

Role: several containerds and kubelets share one machine here, and each default path they
have (/var/lib/containerd, /run/containerd, /var/lib/kubelet, /opt/containerd, runc's
root, the CNI conf dir, ...) would be shared by all of them. So every path a node's daemons
write is spelled out under the node's own directory (``NodeLayout``), which is also what
makes "remove the directory" a complete clean-up. The few paths the binaries cannot be told
(shim sockets in /run/containerd, pod logs in /var/log/pods, IPAM state in /var/lib/cni, the
device-plugin socket in /var/lib/kubelet), and the host paths a node's hostPath pods use
(/var/lib/wgmanager, /var/lib/kubelet/kubeconfig and pki), are covered by mounts in the
node's own mount namespace instead (see ``kubelets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
# The kubelet's identity as seen inside the node's mount namespace (and so by a hostPath
# pod there): where EKS, GKE and AKS keep it, with its certificates and the cluster CA in
# a directory of their own (the Helm chart's nodeIdentity.kubeletKubeconfig / hostPaths).
NODE_KUBECONFIG = Path("/var/lib/kubelet/kubeconfig")
NODE_PKI = Path("/var/lib/kubelet/pki")


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """The files of one node, all under ``dir``."""

    dir: Path

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def containerd_dir(self) -> Path:
        return self.dir / "containerd"

    @property
    def containerd_config(self) -> Path:
        return self.dir / "containerd.toml"

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.dir / "cni" / "net.d"

    @property
    def cni_template(self) -> Path:
        return self.dir / "cni" / "template.json"

    @property
    def kubelet_dir(self) -> Path:
        """The kubelet's --root-dir (pods' volumes, its checkpoints)."""
        return self.dir / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.dir / "kubelet.json"

    @property
    def kubeconfig(self) -> Path:
        """The kubelet's identity: what the agent will speak for its node with."""
        return self.dir / "kubelet.kubeconfig"

    @property
    def pki_dir(self) -> Path:
        """The kubelet's client certificate and key and the cluster CA: ``NODE_PKI`` inside
        the node (``kubeconfig`` names them by this path, ``node_kubeconfig`` by that one)."""
        return self.mounted_dirs[NODE_PKI.parent] / NODE_PKI.name

    @property
    def node_kubeconfig(self) -> Path:
        """The same identity for use inside the node: ``NODE_KUBECONFIG`` there."""
        return self.mounted_dirs[NODE_KUBECONFIG.parent] / NODE_KUBECONFIG.name

    @property
    def resolv_conf(self) -> Path:
        return self.dir / "resolv.conf"

    @property
    def mounted_dirs(self) -> dict[Path, Path]:
        """Host path -> the node's own directory mounted over it in the node's namespace."""
        return {Path("/var/log"): self.dir / "var-log",
                Path("/var/lib/cni"): self.dir / "cni-state",
                Path("/var/lib/kubelet"): self.dir / "var-lib-kubelet",
                # wgmanager's state dir (the node's private key): else every node's agent
                # would read and write the one key of the machine.
                Path("/var/lib/wgmanager"): self.dir / "var-lib-wgmanager"}


def containerd_toml(layout: NodeLayout, *, sandbox_image: str) -> str:
    """containerd 1.6 config: everything under the node's dir, CRI as this machine needs."""
    d = layout.containerd_dir
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join([
        "version = 2",
        f'root = "{d / "root"}"',
        f'state = "{d / "state"}"',
        'disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", '
        '"io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", '
        '"io.containerd.snapshotter.v1.aufs"]',
        "[grpc]", f'  address = "{layout.socket}"',
        "[ttrpc]", f'  address = "{layout.socket}.ttrpc"',
        '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{d / "opt"}"',
        f"[{cri}]",
        f'  sandbox_image = "{sandbox_image}"',
        # runc cannot write oom_score_adj here (no CAP_SYS_RESOURCE in the bounding set):
        # without this every sandbox fails with "can't get final child's PID from pipe".
        "  restrict_oom_score_adj = true",
        # Pod network namespaces under the state dir, not in the host's /run/netns.
        "  netns_mounts_under_state_dir = true",
        '  stream_server_address = "127.0.0.1"',
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",
        f'  Root = "{layout.runc_root}"',
        f"[{cri}.cni]",
        f'  bin_dir = "{CNI_BIN}"',
        f'  conf_dir = "{layout.cni_conf_dir}"',
        f'  conf_template = "{layout.cni_template}"',
        "  max_conf_num = 1",
        "",
    ])


def cni_template(*, mtu: int) -> str:
    """containerd renders this (Go text/template) once the kubelet hands it the Node's
    podCIDRs: a bridge holding the first address of each range as the pods' gateway, IPAM
    on exactly those ranges (IPv4 and IPv6), no masquerade (pod addresses stay on the wire
    between nodes: the traffic wgmanager encrypts)."""
    ranges = ('{{range $i, $r := .PodCIDRRanges}}{{if $i}}, {{end}}'
              '[{"subnet": "{{$r}}"}]{{end}}')
    routes = '{{range $i, $r := .Routes}}{{if $i}}, {{end}}{"dst": "{{$r}}"}{{end}}'
    return "\n".join([
        "{",
        '  "cniVersion": "0.4.0",',
        '  "name": "wgmanager-lab",',
        '  "plugins": [{',
        '    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,',
        f'    "hairpinMode": true, "mtu": {mtu},',
        f'    "ipam": {{"type": "host-local", "ranges": [{ranges}],',
        f'             "routes": [{routes}]}}',
        "  }]",
        "}",
        "",
    ])


def kubelet_configuration(layout: NodeLayout, *, address: str, client_ca: Path,
                          cgroup_root: str) -> dict[str, Any]:
    """The KubeletConfiguration (written as JSON, which the kubelet reads as YAML)."""
    return {
        "kind": "KubeletConfiguration",
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "address": address,  # the API server reaches it over the underlay
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(layout.dir / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(layout.dir / "kubelet-serving.key"),
        # As kubeadm: callers (the API server) by client certificate or token, checked
        # against the API server's authorization.
        "authentication": {"anonymous": {"enabled": False},
                           "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(client_ca)}},
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        # Pods get no DNS servers ("" would mean the host's): nothing they resolve leaves.
        "resolvConf": str(layout.resolv_conf),
        "volumePluginDir": str(layout.dir / "volume-plugins"),
        "featureGates": {"IPv6DualStack": True},
        "makeIPTablesUtilChains": False,
        "serializeImagePulls": False,
        # No registry to pull from again: never garbage-collect the imported images,
        # and do not evict for a shared machine's disk or memory.
        "imageGCHighThresholdPercent": 100,
        "evictionHard": {"memory.available": "1%", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "nodeStatusUpdateFrequency": "4s",  # Ready soon after the CNI config appears
        "containerLogMaxSize": "5Mi",
    }
