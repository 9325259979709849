"""`wgmanager status` names the wireguard-go a device really runs: no mocks.

Real devices, one per binary, in a network namespace of this module's own
(``wgd<hex>-n1``): the bookworm-backports build from PATH (TUN offloads; its --version
lies) and Debian 12's old build kept by `make setup` in /var/cache/wgmanager (no offloads,
in no package). Each is checked against independent sources: dpkg for the version,
`ip -d link` for vnet_hdr. Everything lives under ``/run/wgmanager-tests/<prefix>/`` and is
removed by ``harness.cleanup_prefix`` (processes by pid file, the namespace, the files).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import OLD_WIREGUARD_GO as OLD_BINARY
from tests.integration.harness import OLD_WIREGUARD_GO_MISSING as OLD_MISSING
from tests.integration.harness import RUN_ROOT, WGM, cleanup_prefix

# Runs inside the namespace: start the device the way the agent does; print its pid.
START = r"""
import json, sys
from pathlib import Path
from wgmanager.wireguard.userspace import UserspaceBackend
a = json.loads(sys.argv[1])
b = UserspaceBackend(a["ifname"], socket_dir=Path(a["socket_dir"]), binary=a["binary"])
b.ensure_device()
print(json.dumps({"pid": b.pid()}))
"""


@dataclass
class Lab:
    prefix: str
    run_dir: Path
    netns: str

    def nsrun(self, *argv: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *argv],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, f"{' '.join(argv)}: {res.stdout}{res.stderr}"
        return res

    def node_args(self, ifname: str) -> list[str]:
        # The harness layout: cleanup_prefix stops <run dir>/*/wg/*.pid.
        node = self.run_dir / ifname
        return ["--interface", ifname, "--socket-dir", str(node / "wg"), "--state-dir",
                str(node / "state"), "--pin-dir", str(node / "pins")]

    def start(self, ifname: str, binary: str) -> int:
        args = {"ifname": ifname, "socket_dir": str(self.run_dir / ifname / "wg"),
                "binary": binary}
        out = self.nsrun(sys.executable, "-c", START, json.dumps(args)).stdout
        pid = json.loads(out.strip().splitlines()[-1])["pid"]
        assert isinstance(pid, int)
        return pid

    def status(self, ifname: str, *extra: str) -> dict[str, Any]:
        res = self.nsrun(*WGM, "--log-level", "error", "status", "--json",
                         *self.node_args(ifname), *extra)
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def status_text(self, ifname: str) -> str:
        res = self.nsrun(*WGM, "--log-level", "error", "status", *self.node_args(ifname))
        return res.stdout

    def vnet_hdr(self, ifname: str) -> bool:
        """Independent of the code under test: what `ip -d link` prints for the TUN."""
        out = subprocess.run(["ip", "-n", self.netns, "-d", "link", "show", ifname],
                             capture_output=True, text=True, check=True).stdout
        assert "tun type tun" in out, out
        assert ("vnet_hdr on" in out) != ("vnet_hdr off" in out), out
        return "vnet_hdr on" in out


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "wgd" + secrets.token_hex(3)
    run_dir = RUN_ROOT / prefix
    run_dir.mkdir(parents=True)  # no exist_ok: never share another run's directory
    (run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
    lab = Lab(prefix, run_dir, f"{prefix}-n1")
    try:
        subprocess.run(["ip", "netns", "add", lab.netns], check=True, capture_output=True)
        yield lab
    finally:
        cleanup_prefix(prefix)  # the devices' processes, the namespace, the run dir


def dpkg_version_of(path: str) -> tuple[str, str]:
    owner = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True,
                           check=True).stdout
    package = owner.split(":")[0]
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True, check=True).stdout
    return package, version


def version_claim(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    return out.split()[1]  # "wireguard-go v0.0.20230223"


def test_the_binary_from_path_reports_its_package_version_and_offloads(lab: Lab) -> None:
    found = shutil.which("wireguard-go")
    assert found is not None
    binary = os.path.realpath(found)
    package, version = dpkg_version_of(binary)
    pid = lab.start("wgd0", "wireguard-go")

    impl = lab.status("wgd0")["implementation"]
    assert impl == {"kind": "userspace", "pid": pid, "binary": binary, "version": version,
                    "version_source": "dpkg", "package": package, "replaced": False,
                    "replaced_by": None, "offloads": lab.vnet_hdr("wgd0")}
    assert impl["offloads"] is True, ("the wireguard-go on PATH opens its TUN without "
                                      "offloads: `make setup` installs the backports build")
    assert version.startswith("0.0.20231211")
    assert version_claim(binary) == "v0.0.20230223"  # why the package version is asked
    line = f"wireguard: userspace, {binary} {version} (package {package}), pid {pid}; " \
           "TUN offloads on"
    assert line in lab.status_text("wgd0").splitlines()


def test_the_old_binary_reports_its_claim_and_no_offloads(lab: Lab) -> None:
    if not OLD_BINARY.exists():
        pytest.skip(OLD_MISSING)
    pid = lab.start("wgd1", str(OLD_BINARY))

    impl = lab.status("wgd1")["implementation"]
    assert impl == {"kind": "userspace", "pid": pid, "binary": str(OLD_BINARY),
                    "version": "v0.0.20220316", "version_source": "--version", "package": None,
                    "replaced": False, "replaced_by": None, "offloads": False}
    assert lab.vnet_hdr("wgd1") is False
    assert (f"wireguard: userspace, {OLD_BINARY} v0.0.20220316 (its --version; no package "
            f"owns it), pid {pid}; TUN offloads off") in lab.status_text("wgd1").splitlines()


def test_a_sidecar_s_process_is_found_without_a_pid_file(lab: Lab) -> None:
    pid = lab.start("wgd2", "wireguard-go")
    with_pid_file = lab.status("wgd2")["implementation"]
    # --no-spawn-userspace: the pid file is not ours to trust; /proc is searched instead
    # (comm, argv and this network namespace).
    searched = lab.status("wgd2", "--no-spawn-userspace")["implementation"]
    assert searched == with_pid_file
    assert searched["pid"] == pid


def test_a_binary_replaced_under_a_running_device_says_restart(lab: Lab) -> None:
    old = OLD_BINARY if OLD_BINARY.exists() else Path(str(shutil.which("wireguard-go")))
    new = shutil.which("wireguard-go")
    assert new is not None
    bin_dir = lab.run_dir / "bin"
    bin_dir.mkdir()
    installed = bin_dir / "wireguard-go"
    shutil.copy2(old, installed)
    pid = lab.start("wgd3", str(installed))
    shutil.copy2(new, bin_dir / "wireguard-go.new")
    os.replace(bin_dir / "wireguard-go.new", installed)  # as dpkg upgrades a file

    impl = lab.status("wgd3")["implementation"]
    assert impl["pid"] == pid and impl["binary"] == str(installed)
    assert impl["replaced"] is True
    assert impl["version"] == version_claim(str(old))  # what runs: no package owns it
    assert impl["version_source"] == "--version"
    assert impl["replaced_by"] == version_claim(new)  # what a restart would run
    assert impl["offloads"] is lab.vnet_hdr("wgd3")
    line = next(ln for ln in lab.status_text("wgd3").splitlines()
                if ln.startswith("wireguard: "))
    assert f"replaced on disk since start (now {impl['replaced_by']}): restart to run the " \
           "new one" in line
