"""The doctor's pure parts: parsers, thresholds, the MTU rule, how failures read, the report
and its exit code. The checks against the real kernel are in tests/integration."""

from __future__ import annotations

import argparse
import email.utils
import errno
import json
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.connection import HTTPSConnection
from urllib3.exceptions import MaxRetryError, NewConnectionError

from wgmanager import config
from wgmanager.commands.doctor import checks as doctor
from wgmanager.commands.doctor.rules import (
    RBAC_FIX,
    Check,
    api_failure,
    capabilities_check,
    clock_skew_check,
    exit_code,
    kernel_check,
    mtu_check,
    parse_capeff,
    parse_caps,
    parse_kernel_version,
    render,
    to_json,
    udp_inodes,
    wireguard_go_check,
)
from wgmanager.datapath.mounts import fstype_at, propagation_at
from wgmanager.errors import ConfigError
from wgmanager.wireguard.implementation import OFFLOAD_FIX, OFFLOADS_SINCE

# --- kernel version ------------------------------------------------------------------------

@pytest.mark.parametrize(("release", "version"), [
    ("6.18.44-fc-v669", (6, 18, 44)),
    ("5.10.0-28-amd64", (5, 10, 0)),
    ("4.19", (4, 19, 0)),
    ("6.9-rc1", (6, 9, 0)),
    ("5.15.153.1-microsoft-standard-WSL2", (5, 15, 153)),
    ("unknown", None),
])
def test_parse_kernel_version(release: str, version: tuple[int, int, int] | None) -> None:
    assert parse_kernel_version(release) == version


@pytest.mark.parametrize(("release", "status"), [
    ("4.14.300", "fail"), ("4.18.0-553.el8", "fail"), ("4.19.0", "warn"), ("5.4.0-150", "warn"),
    ("5.9.16", "warn"), ("5.10.0", "ok"), ("6.18.44-fc-v669", "ok"), ("weird", "warn"),
])
def test_kernel_thresholds(release: str, status: str) -> None:
    check = kernel_check(release)
    assert check.status == status
    assert release in check.detail


# --- capabilities --------------------------------------------------------------------------

ROOT_STATUS = """Name:\tpython3
Umask:\t0022
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
"""


@pytest.mark.parametrize(("mask", "caps"), [
    ("0000000000000000", set()),
    ("0000000000001000", {12}),
    ("0000008000201000", {12, 21, 39}),
    ("0000000000003000", {12, 13}),
])
def test_parse_caps(mask: str, caps: set[int]) -> None:
    assert parse_caps(mask) == caps


def test_parse_capeff_of_root() -> None:
    caps = parse_capeff(ROOT_STATUS)
    assert {12, 21, 39} <= caps
    assert 24 not in caps  # 0x...feffffff: bit 24 (CAP_SYS_RESOURCE) is clear
    assert max(caps) == 40


def test_parse_capeff_needs_the_line() -> None:
    with pytest.raises(ValueError, match="CapEff"):
        parse_capeff("Name:\tx\nCapPrm:\t0\n")


def test_capabilities_of_root_are_enough() -> None:
    check = capabilities_check(parse_capeff(ROOT_STATUS))
    assert check.status == "ok"
    assert check.detail == "effective: CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN"


def test_no_capabilities_names_every_missing_one() -> None:
    check = capabilities_check(parse_caps("0"))
    assert check.status == "fail"
    assert check.detail == "missing CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN (bpffs pinning)"
    assert check.fix.startswith("run as root or grant CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN")


@pytest.mark.parametrize(("mask", "status", "missing"), [
    ("0000008000001000", "fail", "missing CAP_SYS_ADMIN (bpffs pinning)"),  # NET_ADMIN + BPF
    ("0000000000201000", "ok", None),  # SYS_ADMIN stands in for BPF (kernels < 5.8)
    ("0000008000200000", "fail", "missing CAP_NET_ADMIN"),
])
def test_partial_capabilities(mask: str, status: str, missing: str | None) -> None:
    check = capabilities_check(parse_caps(mask))
    assert check.status == status
    if missing:
        assert check.detail == missing


# --- MTU -----------------------------------------------------------------------------------

# --- wireguard-go --------------------------------------------------------------------------

NO_KERNEL_WG = "kernel WireGuard unavailable: built without it; the userspace backend works"


def wg_go(version: str, offloads: bool | None, reason: str = NO_KERNEL_WG) -> Check:
    return wireguard_go_check("/usr/bin/wireguard-go", version, offloads, reason,
                              offload_fix=OFFLOAD_FIX, offloads_since=OFFLOADS_SINCE)


def test_wireguard_go_with_offloads_is_ok() -> None:
    check = wg_go("0.0.20231211-1~bpo12+1 (package wireguard-go)", True)
    assert (check.status, check.fix) == ("ok", "")
    assert check.detail == ("userspace: wireguard-go /usr/bin/wireguard-go 0.0.20231211-1~bpo12+1 "
                            f"(package wireguard-go), with TUN offloads; {NO_KERNEL_WG}")


def test_wireguard_go_without_offloads_warns_with_the_fix() -> None:
    check = wg_go("0.0.20220316-1+b4 (package wireguard-go)", False)
    assert check.status == "warn"  # it works, slower: never a fail
    assert "no TUN offloads (older than 0.0.20230223)" in check.detail
    assert check.fix == OFFLOAD_FIX
    assert "bookworm-backports" in check.fix and "`make setup` does it" in check.fix
    unknown = wg_go("(version unknown)", None)
    assert unknown.status == "warn" and "TUN offload support unknown" in unknown.detail


def test_wireguard_go_without_cap_net_admin_is_inconclusive() -> None:
    reason = "kernel WireGuard unavailable: configuring it needs CAP_NET_ADMIN, which ..."
    check = wg_go("0.0.20231211-1~bpo12+1 (package wireguard-go)", True, reason)
    assert check.status == "warn"
    assert check.fix == "run the doctor as root to tell whether kernel WireGuard is usable"
    both = wg_go("v0.0.20220316 (its --version; no package owns it)", False, reason)
    assert both.fix == ("run the doctor as root to tell whether kernel WireGuard is usable; "
                        + OFFLOAD_FIX)


@pytest.mark.parametrize(("uplink_mtu", "family", "wg"), [
    (1500, 4, 1440), (1500, 6, 1420), (9001, 4, 8941), (1400, 4, 1340), (1360, 6, 1280),
])
def test_mtu_arithmetic(uplink_mtu: int, family: int, wg: int) -> None:
    check = mtu_check("eth0", uplink_mtu, family, "wgm0", None)
    assert check.status == "ok"
    assert wg == config.wireguard_mtu(uplink_mtu, family)
    assert f"eth0 MTU {uplink_mtu} -> WireGuard MTU {wg} over IPv{family}" in check.detail
    assert check.detail.endswith(f"pods must use MTU <= {wg}")


def test_mtu_shows_the_other_family_too() -> None:
    assert "(1420 over IPv6)" in mtu_check("eth0", 1500, 4, "wgm0", None).detail


def test_small_uplink_mtu_warns() -> None:
    check = mtu_check("eth0", 1359, 4, "wgm0", None)
    assert check.status == "warn"
    assert "1360" in check.fix


def test_device_mtu_larger_than_the_rule_warns() -> None:
    check = mtu_check("eth0", 1500, 4, "wgm0", 1500)
    assert check.status == "warn"
    assert "wgm0 has MTU 1500" in check.detail
    assert "--mtu <= 1440" in check.fix
    assert mtu_check("eth0", 1500, 4, "wgm0", 1420).status == "ok"  # lower is fine


# --- mounts and sockets --------------------------------------------------------------------

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
23 22 0:22 / /sys rw,nosuid shared:2 - sysfs sysfs rw
24 23 0:23 / /sys/fs/bpf rw,relatime shared:3 - bpf bpf rw,mode=700
25 22 0:24 / /proc rw - proc proc rw
26 22 0:25 / /tmp rw - tmpfs tmpfs rw
27 26 0:26 / /tmp rw - bpf bpf rw
"""


@pytest.mark.parametrize(("path", "exact", "fstype"), [
    ("/sys/fs/bpf", True, "bpf"),
    ("/sys/fs/bpf/wgmanager", False, "bpf"),
    ("/sys/fs/bpf/wgmanager", True, None),
    ("/sys/fs/bpfx", False, "sysfs"),
    ("/sys", True, "sysfs"),
    ("/var/lib", False, "ext4"),
    ("/tmp/x", False, "bpf"),  # stacked over tmpfs: the last mount wins
])
def test_fstype_at(path: str, exact: bool, fstype: str | None) -> None:
    assert fstype_at(MOUNTINFO, Path(path), exact=exact) == fstype


PROPAGATION = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:22 / /sys rw,nosuid - sysfs sysfs rw
24 23 0:23 / /sys/fs/bpf rw,relatime master:3 - bpf bpf rw
25 22 0:24 / /run rw shared:7 master:2 - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(("path", "mode"), [
    ("/sys/fs/bpf", "slave"),          # master:N only
    ("/sys/fs/bpf/wgmanager", "slave"),
    ("/sys/kernel", "private"),        # no optional field
    ("/run/x", "shared"),              # shared and a slave: still propagates out
    ("/var/lib", "shared"),
])
def test_propagation_at(path: str, mode: str) -> None:
    assert propagation_at(PROPAGATION, Path(path)) == mode


@pytest.mark.parametrize(("mode", "status"), [("shared", "ok"), ("slave", "warn"),
                                              ("private", "warn"), (None, "warn")])
def test_bpffs_propagation_check(mode: str | None, status: str) -> None:
    """The chart's Bidirectional bpffs mount needs a shared host mount; this machine's is
    private, which is how the lab's real kubelets found it."""
    check = doctor.bpffs_propagation_check(mode)
    assert check.status == status
    if status == "warn":
        assert "not a shared one" in check.detail and "mount --make-shared" in check.fix


UDP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  110: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41234 2 0000000000000000 0
  111: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 1717 2 0000000000000000 0
  112: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0
"""  # noqa: E501
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   12: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41235 2 0000000000000000 0
"""  # noqa: E501


def test_udp_inodes() -> None:
    assert udp_inodes(UDP, 51820) == {41234, 0}
    assert udp_inodes(UDP, 53) == {1717}
    assert udp_inodes(UDP6, 51820) == {41235}
    assert udp_inodes(UDP, 51821) == set()


# --- the API and the clock -----------------------------------------------------------------

def test_forbidden_is_rbac() -> None:
    check = api_failure(ApiException(status=403, reason="Forbidden"),
                        server="https://10.0.0.1:6443", where="/etc/kubeconfig")
    assert check.status == "fail"
    assert check.detail == "https://10.0.0.1:6443 (/etc/kubeconfig) answered 403 Forbidden"
    assert check.fix == RBAC_FIX
    assert api_failure(ApiException(status=401, reason="Unauthorized"), server="s",
                       where="w").fix == RBAC_FIX


def test_server_error_is_health() -> None:
    check = api_failure(ApiException(status=503, reason="Service Unavailable"), server="s",
                        where="w")
    assert "readyz" in check.fix


def test_refused_connection_names_the_error_class_without_object_reprs() -> None:
    conn = HTTPSConnection("127.0.0.1", 1)  # never connects: only its repr is used
    cause = NewConnectionError(conn, "Failed to establish a new connection: [Errno 111] "
                                     "Connection refused")
    e = MaxRetryError(None, "/version", reason=cause)  # type: ignore[arg-type]
    check = api_failure(e, server="https://127.0.0.1:1", where="kc")
    assert check.detail == ("cannot reach https://127.0.0.1:1 (kc): NewConnectionError: Failed "
                            "to establish a new connection: [Errno 111] Connection refused")
    assert check.fix.startswith("check the API address and network")


def test_bad_kubeconfig() -> None:
    check = api_failure(ConfigError("cannot load Kubernetes credentials from x: boom; pass "
                                    "--kubeconfig or run inside a pod"), server="?", where="x")
    assert check.detail == "cannot load Kubernetes credentials from x: boom"
    assert "--kubeconfig" in check.fix


@pytest.mark.parametrize(("offset", "status", "side"), [
    (0.0, "ok", None), (4.0, "ok", "ahead of"), (-4.0, "ok", "behind"),
    (10.0, "warn", "ahead of"), (-30.0, "warn", "behind"),
])
def test_clock_skew(offset: float, status: str, side: str | None) -> None:
    server = 1_700_000_000.0
    date = email.utils.formatdate(server, usegmt=True)
    check = clock_skew_check(date, server + 0.5 + offset)
    assert check.status == status
    assert f"{abs(offset):.1f} s" in check.detail
    if side:
        assert side in check.detail
    if status == "warn":
        assert "certificates and tokens" in check.fix


def test_clock_skew_not_measured() -> None:
    assert clock_skew_check(None, None).status == "warn"
    assert "unreadable" in clock_skew_check("yesterday-ish", 1.0).detail


# --- the report ----------------------------------------------------------------------------

RESULTS = [
    Check("kernel", "ok", "Linux 6.18.44"),
    Check("ip-forward", "warn", "net.ipv4.ip_forward=0", "the agent sets it"),
    Check("capabilities", "fail", "missing CAP_NET_ADMIN", "run as root"),
]


def test_check_requires_a_fix_for_warn_and_fail() -> None:
    with pytest.raises(ValueError, match="needs a fix"):
        Check("x", "warn", "d")
    with pytest.raises(ValueError, match="one line"):
        Check("x", "fail", "d", "two\nlines")
    with pytest.raises(ValueError, match="unknown status"):
        Check("x", "bad", "d", "f")  # type: ignore[arg-type]


def test_render_table() -> None:
    assert render(RESULTS).splitlines() == [
        "CHECK         STATUS  DETAIL",
        "kernel        ok      Linux 6.18.44",
        "ip-forward    WARN    net.ipv4.ip_forward=0",
        "                      fix: the agent sets it",
        "capabilities  FAIL    missing CAP_NET_ADMIN",
        "                      fix: run as root",
        "",
        "1 ok, 1 warn, 1 fail: fix the failed checks: wgmanager cannot work on this node",
    ]
    assert render(RESULTS[:2]).endswith("1 ok, 1 warn, 0 fail: this node can run wgmanager")


def test_json_shape() -> None:
    doc = json.loads(to_json(RESULTS))
    assert doc[0] == {"name": "kernel", "status": "ok", "detail": "Linux 6.18.44", "fix": ""}
    assert [set(d) for d in doc] == [{"name", "status", "detail", "fix"}] * 3


@pytest.mark.parametrize(("results", "code"), [
    (RESULTS[:1], 0), (RESULTS[:2], 0), (RESULTS, 1), ([], 0), (RESULTS[2:], 1),
])
def test_exit_code(results: list[Check], code: int) -> None:
    assert exit_code(results) == code


# --- the command's surface -----------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    doctor.add_arguments(p)
    return p.parse_args(argv)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    args = parse([])
    assert (args.interface, args.listen_port, args.uplink) == ("wgm0", 51820, None)
    assert args.pin_dir == Path("/sys/fs/bpf/wgmanager")
    assert args.socket_dir == Path("/var/run/wireguard")
    assert (args.json, args.skip_compile, args.kubeconfig) == (False, False, None)
    monkeypatch.setenv("KUBECONFIG", "/etc/k.conf")
    assert parse([]).kubeconfig == Path("/etc/k.conf")


def test_run_prints_and_returns_the_exit_code(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, object] = {}

    def fake_checks(**kwargs: object) -> list[Check]:
        seen.update(kwargs)
        return RESULTS

    monkeypatch.setattr(doctor, "checks", fake_checks)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert doctor.run(parse(["--json", "--skip-compile", "--listen-port", "5"])) == 1
    assert json.loads(capsys.readouterr().out)[2]["status"] == "fail"
    assert seen["in_cluster"] is True and seen["skip_compile"] is True
    assert seen["listen_port"] == 5
    assert doctor.run(parse(["--kubeconfig", "/k"])) == 1
    assert capsys.readouterr().out.startswith("CHECK")
    assert seen["in_cluster"] is False and seen["kubeconfig"] == Path("/k")


def test_a_check_that_raises_becomes_a_fail() -> None:
    def boom() -> Check:
        raise RuntimeError("something\nbroke")

    def denied() -> Check:
        raise PermissionError(errno.EACCES, "Permission denied", "/proc/x")

    check = doctor._guard("x", boom)
    assert (check.status, check.detail) == ("fail", "check failed unexpectedly: RuntimeError: "
                                                    "something broke")
    assert doctor._guard("y", denied).fix == "run as root or with CAP_NET_ADMIN"
