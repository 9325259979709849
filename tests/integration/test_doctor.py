"""`wgmanager doctor` on this machine, for real: no mocks, root, the real kernel and bcc.

This machine's kernel has no WireGuard, so the doctor must say so and point at wireguard-go;
bcc must compile and load the real program; an unreachable API server must fail with one
line of fix; a real API server must pass (and its clock must agree with ours); and the same
command run without capabilities must fail the capability and BPF checks, saying how to fix
them. It names the wireguard-go on PATH with its package version (its --version lies) and
warns, with the fix, when that build has no TUN offloads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import RUN_ROOT
from wgmanager.commands.doctor import checks as doctor
from wgmanager.commands.doctor import net as doctor_net
from wgmanager.commands.doctor.rules import RBAC_FIX, Check
from wgmanager.lab.controlplane import ControlPlane, cleanup_stale, free_port
from wgmanager.wireguard.kernel import kernel_unavailable_reason

DOCTOR = """
import argparse, sys
from wgmanager.commands.doctor import checks as doctor
p = argparse.ArgumentParser()
doctor.add_arguments(p)
sys.exit(doctor.run(p.parse_args(sys.argv[1:])))
"""
ROOT = Path(__file__).resolve().parents[2]  # this checkout: its code is what runs
API_ENV = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
LEFTOVERS = ("wgmanager-doctor-*", "wgm-doctor-*")
OLD_WIREGUARD_GO = Path("/var/cache/wgmanager/wireguard-go-0.0.20220316/usr/bin")


def unprivileged() -> list[str]:
    """A process without any capability, as an unprivileged container runs: the checkout
    owner's uid (root's, usually) with empty effective, permitted, inheritable, ambient and
    bounding sets. Not `nobody`: a checkout under a 0700 directory (/root, `mktemp -d`) is
    out of its reach, while its owner reaches it without CAP_DAC_OVERRIDE."""
    owner = ROOT.stat()
    return ["setpriv", f"--reuid={owner.st_uid}", f"--regid={owner.st_gid}", "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]


def run_doctor(*argv: str, privileged: bool = True,
               path_first: Path | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in API_ENV}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, not whatever the venv points at
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env.get('PATH', '/usr/bin:/bin')}"
    cmd = [*([] if privileged else unprivileged()), sys.executable, "-c", DOCTOR, *argv]
    res = subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True, timeout=180,
                         check=False)
    return res.returncode, res.stdout, res.stderr


def by_name(results: list[Check] | list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows = [dataclasses.asdict(r) if isinstance(r, Check) else r for r in results]
    return {r["name"]: r for r in rows}


def leftovers() -> list[Path]:
    return [p for pattern in LEFTOVERS for p in Path("/sys/fs/bpf").glob(pattern)]


def assert_fixes_are_one_line(results: dict[str, dict[str, Any]]) -> None:
    for r in results.values():
        if r["status"] != "ok":
            assert r["fix"] and "\n" not in r["fix"], r


def test_this_machine_passes_with_userspace_wireguard() -> None:
    reason = kernel_unavailable_reason()
    assert reason is not None, "this test expects a kernel without WireGuard"
    results = by_name(doctor.checks())
    assert_fixes_are_one_line(results)

    wg = results["wireguard"]
    assert wg["status"] == "ok", wg  # `make setup` installs the backports build: offloads
    binary = shutil.which("wireguard-go")
    package = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wireguard-go"],
                             capture_output=True, text=True, check=True).stdout
    assert wg["detail"].startswith(f"userspace: wireguard-go {binary} {package} (package "
                                   "wireguard-go), with TUN offloads; ")
    assert reason in wg["detail"]
    assert "kernel WireGuard unavailable" in wg["detail"]

    compiled = results["bpf-compile"]
    assert compiled["status"] == "ok", compiled
    assert re.search(r"compiled and loaded from_pod, to_underlay and to_tunnel_l3 in \d+\.\d s",
                     compiled["detail"])
    for name in ("kernel", "bpf-syscall", "bpffs", "pin-dir", "tun", "kernel-headers",
                 "capabilities", "mtu", "rp-filter"):
        assert results[name]["status"] == "ok", results[name]
    assert results["capabilities"]["detail"] == "effective: CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN"
    assert results["kube-api"]["status"] == "warn"  # no kubeconfig: skipped, said so
    assert results["clock-skew"]["status"] == "warn"
    assert not [r for r in results.values() if r["status"] == "fail"]
    assert not leftovers()


def test_command_exits_0_here_when_the_api_check_is_skipped() -> None:
    code, out, err = run_doctor()
    print(out)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert any(ln.startswith("wireguard ") and "userspace: wireguard-go" in ln for ln in lines)
    assert any(ln.startswith("kube-api ") and "WARN" in ln for ln in lines)
    assert lines[-1].endswith("0 fail: this node can run wgmanager")

    code, out, _ = run_doctor("--json", "--skip-compile")
    assert code == 0
    doc = json.loads(out)
    assert [set(d) for d in doc] == [{"name", "status", "detail", "fix"}] * len(doc)
    assert by_name(doc)["bpf-compile"]["status"] == "warn"  # skipped is never "ok"
    assert not leftovers()


def test_unreachable_api_server_fails_with_one_line_of_fix(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "unreachable.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}))
    started = time.monotonic()
    code, out, err = run_doctor("--json", "--skip-compile", "--kubeconfig", str(kubeconfig))
    assert time.monotonic() - started < 30  # one attempt, no retry loop
    assert code == 1, out + err
    results = by_name(json.loads(out))
    api = results["kube-api"]
    assert api["status"] == "fail"
    assert api["detail"].startswith(f"cannot reach https://127.0.0.1:1 ({kubeconfig}): "
                                    "NewConnectionError: ")
    assert "Connection refused" in api["detail"]
    assert api["fix"].startswith("check the API address and network")
    assert "\n" not in api["fix"]
    assert [n for n, r in results.items() if r["status"] == "fail"] == ["kube-api"]
    assert results["clock-skew"]["status"] == "warn"


NO_RBAC_USER = "wgm-doctor-no-rbac"  # authenticated, granted nothing


@dataclasses.dataclass
class Api:
    cp: ControlPlane
    no_rbac_token: str


@pytest.fixture(scope="module")
def api_server() -> Iterator[Api]:
    cleanup_stale(RUN_ROOT)
    cp = ControlPlane(RUN_ROOT / f"wgdoc{secrets.token_hex(2)}", secure_port=free_port())
    token = cp.add_token(NO_RBAC_USER)
    try:
        cp.start()
        yield Api(cp, token)
    finally:
        cp.stop()
        shutil.rmtree(cp.work_dir, ignore_errors=True)


def test_real_api_server_and_clock(api_server: Api) -> None:
    control_plane = api_server.cp
    results = by_name(doctor.checks(kubeconfig=control_plane.admin_kubeconfig,
                                    skip_compile=True))
    api, clock = results["kube-api"], results["clock-skew"]
    assert api["status"] == "ok", api
    assert api["detail"] == (f"{control_plane.url} ({control_plane.admin_kubeconfig}): "
                             "Kubernetes v1.20.2, listing nodes allowed")
    assert clock["status"] == "ok", clock  # the API server shares this machine's clock
    assert re.fullmatch(r"local clock [01]\.\d s (ahead of|behind) the API server .*",
                        clock["detail"])


def test_api_credentials_without_rbac_fail_with_the_rbac_fix(api_server: Api,
                                                             tmp_path: Path) -> None:
    control_plane = api_server.cp
    bad_token = control_plane.write_kubeconfig(tmp_path / "bad.kubeconfig", "not-a-token")
    api = by_name(doctor.checks(kubeconfig=bad_token, skip_compile=True))["kube-api"]
    assert api["status"] == "fail"
    assert api["detail"] == f"{control_plane.url} ({bad_token}) answered 401 Unauthorized"
    assert api["fix"] == RBAC_FIX

    no_rbac = control_plane.write_kubeconfig(tmp_path / "no-rbac.kubeconfig",
                                             api_server.no_rbac_token)
    results = by_name(doctor.checks(kubeconfig=no_rbac, skip_compile=True))
    assert results["kube-api"]["status"] == "fail"  # /version is open to it, nodes are not
    assert results["kube-api"]["detail"].endswith("answered 403 Forbidden")
    assert results["kube-api"]["fix"] == RBAC_FIX
    assert results["clock-skew"]["status"] == "ok"  # /version answered before the 403


def test_an_old_wireguard_go_on_path_warns_with_the_fix() -> None:
    if not (OLD_WIREGUARD_GO / "wireguard-go").exists():
        pytest.skip(f"{OLD_WIREGUARD_GO}/wireguard-go is absent: `make setup` keeps Debian "
                    "12's wireguard-go there")
    code, out, err = run_doctor("--json", "--skip-compile", path_first=OLD_WIREGUARD_GO)
    assert code == 0, out + err  # a warn: a node with the old binary still works
    wg = by_name(json.loads(out))["wireguard"]
    assert wg["status"] == "warn"
    assert wg["detail"].startswith(f"userspace: wireguard-go {OLD_WIREGUARD_GO}/wireguard-go "
                                   "v0.0.20220316 (its --version; no package owns it), no TUN "
                                   "offloads (older than 0.0.20230223); ")
    assert wg["fix"].startswith("install wireguard-go from bookworm-backports")
    assert "`make setup` does it" in wg["fix"]


def test_unprivileged_user_fails_capabilities_and_bpf_with_the_fix() -> None:
    code, out, err = run_doctor("--json", privileged=False)
    assert code == 1, out + err
    results = by_name(json.loads(out))
    assert_fixes_are_one_line(results)
    print(json.dumps(results, indent=1))

    caps = results["capabilities"]
    assert caps["status"] == "fail"
    assert caps["detail"] == "missing CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN (bpffs pinning)"
    assert caps["fix"].startswith("run as root or grant CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN")
    syscall = results["bpf-syscall"]
    assert (syscall["status"], syscall["detail"]) == ("fail", "BPF_MAP_CREATE: not permitted")
    assert syscall["fix"].startswith("run as root or grant CAP_BPF+CAP_NET_ADMIN")
    compiled = results["bpf-compile"]
    assert compiled["status"] == "fail"
    assert compiled["detail"] == ("cannot compile the eBPF program: creating its BPF maps is "
                                  "not permitted")
    assert compiled["fix"].startswith("run as root or grant CAP_BPF+CAP_NET_ADMIN")
    tun = results["tun"]
    assert tun["status"] == "fail"  # root opens it (crw------- root), but TUNSETIFF needs caps
    assert tun["detail"] in (
        "/dev/net/tun opens, but creating a TUN device needs CAP_NET_ADMIN, which this process "
        "lacks: wireguard-go cannot create its device",
        "/dev/net/tun cannot be opened: Permission denied: wireguard-go cannot create its "
        "device")  # the second: a checkout owned by a user other than root
    assert "wireguard-go" in results["wireguard"]["detail"]  # the family lookup needs no caps
    assert results["kernel"]["status"] == "ok"
    assert not leftovers()


# Runs in a network namespace of its own (unshare --net): a wireguard-go there holds the
# port, and nothing on this machine's own network changes.
PORT_SCRIPT = """
import dataclasses, json, socket, sys
from pathlib import Path
from wgmanager.commands.doctor import net as doctor_net
from wgmanager.core.keys import PrivateKey
from wgmanager.wireguard.backend import DeviceSettings
from wgmanager.wireguard.userspace import UserspaceBackend
sock_dir = Path(sys.argv[1])
out = {"free": doctor_net.check_listen_port(51820, "wgdoc0", sock_dir)}
b = UserspaceBackend("wgdoc0", socket_dir=sock_dir)
try:
    b.ensure_device()
    b.configure(DeviceSettings(PrivateKey.generate(), 51820))
    out["ours"] = doctor_net.check_listen_port(51820, "wgdoc0", sock_dir)
    out["other_device"] = doctor_net.check_listen_port(51820, "wgdoc1", sock_dir)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 51821))
    out["foreign"] = doctor_net.check_listen_port(51821, "wgdoc0", sock_dir)
    out["pids"] = {"wireguard_go": b.pid(), "self": __import__("os").getpid()}
finally:
    b.delete_device()
print(json.dumps({k: v if k == "pids" else dataclasses.asdict(v) for k, v in out.items()}))
"""


def test_listen_port_knows_our_wireguard_go_from_others(tmp_path: Path) -> None:
    res = subprocess.run(["unshare", "--net", sys.executable, "-c", PORT_SCRIPT,
                          str(tmp_path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    wg_pid, own_pid = out["pids"]["wireguard_go"], out["pids"]["self"]
    assert out["free"] == {"name": "listen-port", "status": "ok",
                           "detail": "UDP 51820 is free", "fix": ""}
    assert out["ours"]["status"] == "ok"
    assert out["ours"]["detail"] == (f"UDP 51820 is held by our wireguard-go for wgdoc0 "
                                     f"(pid {wg_pid})")
    assert out["other_device"]["status"] == "warn"  # a wireguard-go, but not for this device
    assert out["other_device"]["detail"] == f"UDP 51820 is in use by wireguard-go (pid {wg_pid})"
    assert out["foreign"]["status"] == "warn"
    assert out["foreign"]["detail"].endswith(f"(pid {own_pid})")
    assert out["foreign"]["fix"] == "stop it or choose another --listen-port"


def test_bad_uplink_and_pin_dirs_are_named() -> None:
    mtu = doctor_net.check_mtu("wgdoc-nosuch", "wgm0")
    assert (mtu.status, mtu.detail) == ("fail", "uplink: device wgdoc-nosuch does not exist")
    outside = doctor.check_pin_dir(Path("/tmp/wgmanager-pins"))
    assert outside.status == "fail"
    assert outside.detail == "/tmp/wgmanager-pins is not on a bpffs"
    dotted = doctor.check_pin_dir(Path("/sys/fs/bpf/wg.manager/maps"))
    assert dotted.status == "fail"
    assert "bpffs refuses names with a dot (wg.manager)" in dotted.detail
    assert not os.path.exists("/sys/fs/bpf/wg.manager")  # bpffs: stat() of it is EPERM
