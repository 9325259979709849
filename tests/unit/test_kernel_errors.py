"""The shared translation of kernel errors: each errno, read in its context, gives one line
naming the problem and its fix; bpf.py's messages come from it."""

from __future__ import annotations

import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from wgmanager.datapath.compiler import _explain_compile_error, _explain_load_error
from wgmanager.kernel_errors import (
    CAPABILITY_FIX,
    HEADERS_FIX,
    VERIFIER,
    error_code,
    explain,
    explain_kernel_error,
)

BCC_EPERM_STDERR = "could not open bpf map: counters, error: Operation not permitted\n"
VERIFIER_LOG = """0: (bf) r6 = r1
1: (61) r2 = *(u32 *)(r6 +76)
R2 invalid mem access 'scalar'
processed 12 insns (limit 1000000) max_states_per_insn 0 total_states 1
"""


def test_eperm_from_bpf_is_the_capability_fix() -> None:
    msg = explain_kernel_error(OSError(errno.EPERM, "Operation not permitted"), context="bpf")
    assert msg == f"the bpf() syscall failed: operation not permitted; {CAPABILITY_FIX}"
    assert "CAP_BPF+CAP_NET_ADMIN" in msg


def test_eacces_from_bpf_is_the_capability_fix() -> None:
    assert explain(OSError(errno.EACCES, "Permission denied"), context="bpf").fix == \
        CAPABILITY_FIX


def test_bcc_compile_without_permission() -> None:
    msg = _explain_compile_error("Failed to compile BPF module <text>", BCC_EPERM_STDERR)
    assert msg == ("cannot compile the eBPF program: creating its BPF maps is not permitted; "
                   + CAPABILITY_FIX)


def test_missing_kernel_headers() -> None:
    stderr = "chdir(/lib/modules/6.18.44/build): No such file or directory\n" \
             "Unable to find kernel headers. Try rebuilding kernel with CONFIG_IKHEADERS=m\n"
    msg = _explain_compile_error("Failed to compile BPF module <text>", stderr)
    assert msg == f"cannot compile the eBPF program: bcc found no kernel headers; {HEADERS_FIX}"
    assert "/lib/modules/$(uname -r)/build" in msg


def test_other_compile_errors_name_the_first_error_line() -> None:
    stderr = ("specified path /tmp/x/cidrs is not on BPF FS\n"
              "/virtual/main.c:82:25: error: bpf_table counters failed to open\n"
              "    struct counter *c = counters.lookup(&slot);\n"
              "4 errors generated.\n")
    msg = _explain_compile_error("Failed to compile BPF module <text>", stderr)
    assert msg.startswith("cannot compile the eBPF program: /virtual/main.c:82:25: error: "
                          "bpf_table counters failed to open; ")
    assert "\n" not in msg


def test_verifier_rejection_at_load() -> None:
    msg = _explain_load_error("Failed to load BPF program b'from_pod': Permission denied")
    assert msg.startswith(f"cannot load the eBPF program: {VERIFIER}; ")
    assert "kernel too old?" in msg


def test_verifier_log_is_recognised_even_with_einval() -> None:
    why = explain(f"Invalid argument\n{VERIFIER_LOG}", context="bpf-load")
    assert VERIFIER in why.problem


def test_einval_at_load_without_a_log() -> None:
    msg = _explain_load_error("Failed to load BPF program b'to_underlay': Invalid argument")
    assert "rejected the program as invalid" in msg
    assert "Linux >= 5.10" in msg


def test_eperm_at_load_is_capabilities_not_the_verifier() -> None:
    msg = _explain_load_error("Failed to load BPF program b'from_pod': Operation not permitted")
    assert msg.endswith(CAPABILITY_FIX)
    assert VERIFIER not in msg


def test_unknown_load_error_keeps_the_message() -> None:
    assert _explain_load_error("Failed to load BPF program b'x': Bad address").startswith(
        "cannot load the eBPF program: Failed to load BPF program b'x': Bad address; ")


def test_missing_wireguard_family_explains_the_fallback() -> None:
    why = explain(NetlinkError(errno.ENOENT), context="netlink-family")
    assert why.problem.startswith("kernel WireGuard unavailable: the kernel has no "
                                  "'wireguard' generic netlink family")
    assert "wireguard-go" in why.fix


def test_eperm_from_netlink_is_cap_net_admin_not_bpf() -> None:
    why = explain(NetlinkError(errno.EPERM), context="netlink-family")
    assert why.fix == "run as root or with CAP_NET_ADMIN"


@pytest.mark.parametrize("e", [NetlinkError(errno.ENODEV), OSError(errno.ENODEV, "x"),
                               "Cannot find device: No such device"])
def test_missing_device_is_named(e: BaseException | str) -> None:
    msg = explain_kernel_error(e, context="link", device="eth9")
    assert msg.startswith("network device operation failed: device eth9 does not exist; ")


def test_ebusy_and_eexist() -> None:
    assert "busy" in explain(OSError(errno.EBUSY, "busy"), context="bpf-attach").problem
    exists = explain(NetlinkError(errno.EEXIST), context="link")
    assert "already exists" in exists.problem
    assert "teardown" in exists.fix


def test_enoent_on_a_pin_points_at_the_agent() -> None:
    why = explain(FileNotFoundError(errno.ENOENT, "No such file or directory",
                                    "/sys/fs/bpf/wgmanager/cidrs"), context="bpf-pin")
    assert why.problem == "cannot pin or open BPF objects: nothing is pinned there"


def test_unknown_context_is_used_as_the_operation() -> None:
    msg = explain_kernel_error(OSError(errno.EIO, "Input/output error"), context="reading x")
    assert msg == "reading x: Input/output error; see the kernel log (dmesg) for details"


def test_always_one_line() -> None:
    for ctx in ("bpf", "bpf-compile", "bpf-load", "link", "whatever"):
        assert "\n" not in explain_kernel_error(f"oops\n{VERIFIER_LOG}\nmore", context=ctx)


@pytest.mark.parametrize(("e", "code"), [
    (OSError(errno.EPERM, "x"), errno.EPERM),
    (NetlinkError(errno.ENOENT), errno.ENOENT),
    ("Failed to load BPF program b'x': Permission denied", errno.EACCES),
    ("bpf() returned EBUSY", errno.EBUSY),
    ("something else", None),
    (RuntimeError("no errno here"), None),
])
def test_error_code(e: BaseException | str, code: int | None) -> None:
    assert error_code(e) == code
