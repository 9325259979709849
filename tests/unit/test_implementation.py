"""Which WireGuard implementation runs, told truthfully: the pure parts (dpkg's and
wireguard-go's output, the version choice, the offload threshold, the status document and
its line). Real binaries and devices: tests/integration/test_implementation.py."""

from __future__ import annotations

from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from wgmanager.wireguard.implementation import (
    BinaryVersion,
    choose_version,
    dpkg_candidates,
    kernel_doc,
    offload_support,
    parse_dpkg_search,
    parse_version_output,
    render,
    split_exe,
    tun_offloads_from_link,
    userspace_doc,
)
from wgmanager.wireguard.userspace import serves_device

BACKPORTS = "0.0.20231211-1~bpo12+1"
VERSION_TEXT = ("wireguard-go v0.0.20230223\n\nUserspace WireGuard daemon for linux-amd64.\n"
                "Information available at https://www.wireguard.com.\n")


# --- dpkg -------------------------------------------------------------------------------

@pytest.mark.parametrize(("output", "path", "package"), [
    ("wireguard-go: /usr/bin/wireguard-go\n", "/usr/bin/wireguard-go", "wireguard-go"),
    ("wireguard-go:amd64: /usr/bin/wireguard-go\n", "/usr/bin/wireguard-go",
     "wireguard-go:amd64"),
    ("a, b: /usr/bin/x\n", "/usr/bin/x", "a"),
    ("diversion by local from: /usr/bin/x\ndiversion by local to: /usr/bin/x.real\n"
     "pkg: /usr/bin/x\n", "/usr/bin/x", "pkg"),
    ("diversion by local from: /usr/bin/x\n", "/usr/bin/x", None),
    ("wireguard-go: /usr/bin/wireguard-go\n", "/usr/bin/wireguard", None),  # exact path only
    ("", "/usr/bin/wireguard-go", None),  # dpkg-query: no path found matching ... (stderr)
])
def test_parse_dpkg_search(output: str, path: str, package: str | None) -> None:
    assert parse_dpkg_search(output, path) == package


def test_dpkg_candidates_cover_merged_usr() -> None:
    assert dpkg_candidates("/bin/wireguard-go", "/usr/bin/wireguard-go") == [
        "/bin/wireguard-go", "/usr/bin/wireguard-go"]
    assert dpkg_candidates("/usr/bin/wg", "/usr/bin/wg") == ["/usr/bin/wg", "/bin/wg"]
    assert dpkg_candidates("/opt/wg/link", "/var/cache/wg") == [
        "/opt/wg/link", "/usr/opt/wg/link", "/var/cache/wg", "/usr/var/cache/wg"]


# --- choosing the version ---------------------------------------------------------------

def test_parse_version_output() -> None:
    assert parse_version_output(VERSION_TEXT) == "v0.0.20230223"
    assert parse_version_output("wireguard-go v0.0.20220316\n") == "v0.0.20220316"
    assert parse_version_output("") is None
    assert parse_version_output("something else 1.2\nmore") == "something else 1.2"


def test_the_package_version_wins_over_what_the_binary_claims() -> None:
    # The backports build carries the offload code but prints v0.0.20230223.
    chosen = choose_version("wireguard-go", BACKPORTS, VERSION_TEXT)
    assert chosen == BinaryVersion(BACKPORTS, "dpkg", "wireguard-go")
    assert chosen.text() == f"{BACKPORTS} (package wireguard-go)"


def test_without_a_package_the_claim_is_labelled() -> None:
    chosen = choose_version(None, None, "wireguard-go v0.0.20220316\n\nUserspace ...")
    assert chosen == BinaryVersion("v0.0.20220316", "--version", None)
    assert chosen.text() == "v0.0.20220316 (its --version; no package owns it)"
    # A package that owns the file but whose version cannot be read is no package version.
    assert choose_version("wireguard-go", None, VERSION_TEXT).source == "--version"


def test_nothing_known_is_unknown() -> None:
    assert choose_version(None, None, None) == BinaryVersion()
    assert choose_version(None, None, "").text() == "(version unknown)"


@pytest.mark.parametrize(("version", "offloads"), [
    ("0.0.20220316-1+b4", False),  # Debian 12
    ("0.0.20220316", False),
    ("v0.0.20220316", False),
    ("0.0.20230223", True),  # the first release with offloads
    ("v0.0.20230223", True),
    (BACKPORTS, True),
    ("1:0.0.20250522-1", True),  # an epoch
    ("0.0.20201118-5", False),
    ("v0.1.0", True),
    ("(devel)", None),
    ("", None),
    (None, None),
])
def test_offload_support_by_version(version: str | None, offloads: bool | None) -> None:
    assert offload_support(version) is offloads


# --- the running process and its TUN ----------------------------------------------------

def test_split_exe_notices_a_replaced_binary() -> None:
    assert split_exe("/usr/bin/wireguard-go") == ("/usr/bin/wireguard-go", False)
    assert split_exe("/usr/bin/wireguard-go (deleted)") == ("/usr/bin/wireguard-go", True)


def _link(kind: str | None, data: list[tuple[str, int]] | None) -> Any:
    info: list[tuple[str, Any]] = []
    if kind is not None:
        info.append(("IFLA_INFO_KIND", kind))
    if data is not None:
        info.append(("IFLA_INFO_DATA", {"attrs": data}))
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", "wgm0")] + ([("IFLA_LINKINFO", {"attrs": info})]
                                              if kind is not None else [])
    msg.encode()
    decoded = ifinfmsg(msg.data)  # as the kernel's answer arrives: decoded bytes
    decoded.decode()
    return decoded


@pytest.mark.parametrize(("kind", "data", "offloads"), [
    ("tun", [("IFLA_TUN_PI", 0), ("IFLA_TUN_VNET_HDR", 1)], True),  # 0.0.20231211
    ("tun", [("IFLA_TUN_PI", 1), ("IFLA_TUN_VNET_HDR", 0)], False),  # 0.0.20220316
    ("tun", [("IFLA_TUN_PI", 1)], None),  # an old kernel that does not say
    ("tun", None, None),
    ("wireguard", None, None),
    (None, None, None),
])
def test_tun_offloads_from_link(kind: str | None, data: list[tuple[str, int]] | None,
                                offloads: bool | None) -> None:
    assert tun_offloads_from_link(_link(kind, data)) is offloads


@pytest.mark.parametrize(("comm", "argv", "ifname", "serves"), [
    ("wireguard-go", ["wireguard-go", "-f", "wgm0", ""], "wgm0", True),
    ("wireguard-go", ["/var/cache/x/wireguard-go", "-f", "wgm0", ""], "wgm0", True),
    ("wireguard-go", ["wireguard-go", "-f", "wgm0r", ""], "wgm0", False),
    ("unshare", ["unshare", "--mount", "sh", "-c", "...", "wgm0"], "wgm0", False),
    ("wgm0", ["wgm0"], "wgm0", False),  # the name as argv[0] is not a device argument
])
def test_serves_device(comm: str, argv: list[str], ifname: str, serves: bool) -> None:
    assert serves_device(comm, argv, ifname) is serves


# --- the status document and its line ----------------------------------------------------

DOC_KEYS = {"kind", "pid", "binary", "version", "version_source", "package", "replaced",
            "replaced_by", "offloads"}


def test_userspace_doc_and_line() -> None:
    doc = userspace_doc(pid=42, binary="/usr/bin/wireguard-go", replaced=False,
                        running=BinaryVersion(BACKPORTS, "dpkg", "wireguard-go"),
                        on_disk=None, offloads=True)
    assert doc == {"kind": "userspace", "pid": 42, "binary": "/usr/bin/wireguard-go",
                   "version": BACKPORTS, "version_source": "dpkg", "package": "wireguard-go",
                   "replaced": False, "replaced_by": None, "offloads": True}
    assert render(doc) == (f"wireguard: userspace, /usr/bin/wireguard-go {BACKPORTS} (package "
                           "wireguard-go), pid 42; TUN offloads on")


def test_old_binary_outside_any_package() -> None:
    doc = userspace_doc(pid=7, binary="/opt/wireguard-go", replaced=False,
                        running=BinaryVersion("v0.0.20220316", "--version"), on_disk=None,
                        offloads=False)
    assert doc["version_source"] == "--version" and doc["package"] is None
    assert render(doc) == ("wireguard: userspace, /opt/wireguard-go v0.0.20220316 (its "
                           "--version; no package owns it), pid 7; TUN offloads off")


def test_a_replaced_binary_says_restart() -> None:
    doc = userspace_doc(pid=7, binary="/usr/bin/wireguard-go", replaced=True,
                        running=BinaryVersion("v0.0.20220316", "--version"),
                        on_disk=BinaryVersion(BACKPORTS, "dpkg", "wireguard-go"),
                        offloads=False)
    assert (doc["replaced"], doc["replaced_by"], doc["version"]) == (True, BACKPORTS,
                                                                     "v0.0.20220316")
    assert render(doc).endswith(f"pid 7; replaced on disk since start (now {BACKPORTS}): "
                                "restart to run the new one; TUN offloads off")
    gone = userspace_doc(pid=7, binary="/usr/bin/wireguard-go", replaced=True,
                         running=BinaryVersion(), on_disk=None, offloads=None)
    assert "(now gone)" in render(gone)


def test_no_visible_process() -> None:
    doc = userspace_doc(pid=None, binary=None, replaced=False, running=BinaryVersion(),
                        on_disk=None, offloads=True)
    assert set(doc) == DOC_KEYS
    assert render(doc) == ("wireguard: userspace, wireguard-go (no process serving the device "
                           "is visible from here); TUN offloads on")
    unreadable = userspace_doc(pid=9, binary=None, replaced=False, running=BinaryVersion(),
                               on_disk=None, offloads=None)
    assert render(unreadable) == ("wireguard: userspace, wireguard-go pid 9 (its binary cannot "
                                  "be read from here); TUN offloads unknown")


def test_kernel_doc_has_the_same_keys() -> None:
    doc = kernel_doc("1.0.0")
    assert set(doc) == DOC_KEYS
    assert (doc["kind"], doc["version"], doc["version_source"]) == ("kernel", "1.0.0", "module")
    assert render(doc) == "wireguard: kernel (module 1.0.0)"
    assert render(kernel_doc(None)) == "wireguard: kernel (module version unknown)"
    assert kernel_doc(None)["version_source"] is None
