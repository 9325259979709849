"""ctypes bindings to the few libbpf calls wgmanager needs beyond bcc.

bcc compiles and loads the program, in a short-lived child (``wgmanager.datapath.compiler``);
libbpf (a small C library, which bcc itself links) gives a stable C API for pinning and
opening pinned programs and maps, reading and writing maps without recompiling (so the
agent and ``status`` never map bcc's compiler), and BPF_PROG_TEST_RUN, which bcc 0.26 does
not expose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import cache

from wgmanager.errors import DatapathError


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts from libbpf 1.x bpf.h (sz first, for forward compatibility).
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise DatapathError(f"cannot load libbpf ({name}): {e}; install Debian's libbpf1") from e
    vp, i, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_pin.argtypes = [i, ctypes.c_char_p]
    lib.bpf_map_lookup_elem.argtypes = [i, vp, vp]
    lib.bpf_map_update_elem.argtypes = [i, vp, vp, u64]
    lib.bpf_map_delete_elem.argtypes = [i, vp]
    lib.bpf_map_get_next_key.argtypes = [i, vp, vp]
    lib.bpf_prog_test_run_opts.argtypes = [i, ctypes.POINTER(_TestRunOpts)]
    for fn in ("bpf_obj_get", "bpf_obj_pin", "bpf_map_lookup_elem", "bpf_map_update_elem",
               "bpf_map_delete_elem", "bpf_map_get_next_key", "bpf_prog_test_run_opts"):
        getattr(lib, fn).restype = i
    return lib


def _errno(ret: int) -> int:
    # libbpf 1.x returns -errno and also sets errno; accept either convention.
    return -ret if ret < -1 else ctypes.get_errno()


def obj_get(path: str) -> int:
    """Opens a pinned object; raises FileNotFoundError when nothing is pinned there."""
    fd = _lib().bpf_obj_get(path.encode())
    if fd < 0:
        err = _errno(fd)
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def obj_pin(fd: int, path: str) -> None:
    """Pins a loaded program or map at ``path`` (on a bpffs) so another process can open it."""
    ret = _lib().bpf_obj_pin(fd, path.encode())
    if ret != 0:
        err = _errno(ret)
        raise OSError(err, os.strerror(err), path)


def lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret == 0:
        return True
    err = _errno(ret)
    if err == errno.ENOENT:
        return False
    raise OSError(err, os.strerror(err))


def update(fd: int, key: ctypes._CData, value: ctypes._CData) -> None:
    ret = _lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0)
    if ret != 0:
        err = _errno(ret)
        raise OSError(err, os.strerror(err))


def delete(fd: int, key: ctypes._CData) -> bool:
    ret = _lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret == 0:
        return True
    err = _errno(ret)
    if err == errno.ENOENT:
        return False
    raise OSError(err, os.strerror(err))


def next_key(fd: int, key: ctypes._CData | None, out: ctypes._CData) -> bool:
    """Fills ``out`` with the key after ``key`` (the first key when None); False at the end."""
    ret = _lib().bpf_map_get_next_key(fd, ctypes.byref(key) if key is not None else None,
                                      ctypes.byref(out))
    if ret == 0:
        return True
    err = _errno(ret)
    if err == errno.ENOENT:
        return False
    raise OSError(err, os.strerror(err))


def prog_test_run(prog_fd: int, packet: bytes, repeat: int) -> tuple[int, int]:
    """Runs a loaded program ``repeat`` times on ``packet``: (return value, mean ns per run).

    A test run executes the real program against its real maps (counters move).
    """
    buf = ctypes.create_string_buffer(packet, len(packet))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(buf),
                        data_size_in=len(packet), repeat=repeat)
    ret = _lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if ret != 0:
        err = _errno(ret)
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return int(opts.retval), int(opts.duration)


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not online CPU)."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count
