"""Typed access to the datapath's pinned maps: CIDR actions, device config, counters.

The Python structures mirror bpf/wg_redirect.c. Keys are IPv6; IPv4 networks are stored
IPv4-mapped (::ffff:0:0/96 + prefix) so one LPM trie serves both families.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wgmanager.core.model import Action, IPNetwork
from wgmanager.core.plan import MapPlan
from wgmanager.datapath import libbpf
from wgmanager.errors import DatapathError

_V4_MAPPED = bytes(10) + b"\xff\xff"


class Counter(enum.IntEnum):
    """Counter slots of the program; keep in step with CNT_* in bpf/wg_redirect.c."""

    PASSED = 0
    REDIRECTED = 1
    DROPPED_NOT_READY = 2
    DROPPED_NO_DEVICE = 3
    OVERSIZE = 4


class CidrKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_ubyte * 16)]


class CidrValue(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint32)]


class ConfigValue(ctypes.Structure):
    _fields_ = [("wg_ifindex", ctypes.c_uint32), ("wg_port", ctypes.c_uint32),
                ("wg_mtu", ctypes.c_uint32), ("alt_ifindex", ctypes.c_uint32)]


class CounterValue(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    wg_ifindex: int
    wg_port: int
    wg_mtu: int
    alt_ifindex: int = 0  # the second device while the node rotates its key


def encode_cidr(net: IPNetwork) -> CidrKey:
    if net.version == 4:
        raw, plen = _V4_MAPPED + net.network_address.packed, net.prefixlen + 96
    else:
        raw, plen = net.network_address.packed, net.prefixlen
    key = CidrKey(prefixlen=plen)
    ctypes.memmove(key.addr, raw, 16)
    return key


def decode_cidr(key: CidrKey) -> IPNetwork:
    raw = bytes(key.addr)
    if raw[:12] == _V4_MAPPED and key.prefixlen >= 96:
        return ipaddress.IPv4Network((raw[12:], key.prefixlen - 96))
    return ipaddress.IPv6Network((raw, key.prefixlen))


class PinnedMaps:
    """The maps pinned under ``pin_dir`` by a loaded program. Holds fds; close() them."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        try:
            self._cidrs = libbpf.obj_get(str(pin_dir / "cidrs"))
            self._config = libbpf.obj_get(str(pin_dir / "config"))
            self._counters = libbpf.obj_get(str(pin_dir / "counters"))
        except FileNotFoundError:
            raise DatapathError(f"no wgmanager maps pinned under {pin_dir}: the datapath was "
                                "never loaded on this node (start the agent)") from None
        except OSError as e:
            raise DatapathError(f"cannot open pinned maps under {pin_dir}: {e.strerror}; "
                                "run as root (CAP_BPF/CAP_SYS_ADMIN)") from e

    def close(self) -> None:
        for fd in (self._cidrs, self._config, self._counters):
            os.close(fd)

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_cidrs(self) -> dict[IPNetwork, Action]:
        out: dict[IPNetwork, Action] = {}
        key: CidrKey | None = None
        nxt = CidrKey()
        value = CidrValue()
        while libbpf.next_key(self._cidrs, key, nxt):
            key = CidrKey.from_buffer_copy(nxt)
            if libbpf.lookup(self._cidrs, key, value):
                out[decode_cidr(key)] = Action(value.action)
        return out

    def apply(self, plan: MapPlan) -> None:
        """Upserts first, then deletes, as planned: no destination is left unmatched."""
        for net, action in plan.upserts.items():
            try:
                libbpf.update(self._cidrs, encode_cidr(net), CidrValue(int(action)))
            except OSError as e:
                raise DatapathError(f"cannot write {net} into the CIDR map: {e.strerror}; "
                                    "the map may be full (raise --max-cidrs)") from e
        for net in plan.deletes:
            libbpf.delete(self._cidrs, encode_cidr(net))

    def read_config(self) -> DeviceConfig:
        value = ConfigValue()
        libbpf.lookup(self._config, ctypes.c_uint32(0), value)
        return DeviceConfig(value.wg_ifindex, value.wg_port, value.wg_mtu, value.alt_ifindex)

    def write_config(self, cfg: DeviceConfig) -> None:
        libbpf.update(self._config, ctypes.c_uint32(0),
                      ConfigValue(cfg.wg_ifindex, cfg.wg_port, cfg.wg_mtu, cfg.alt_ifindex))

    def read_counters(self) -> Mapping[Counter, tuple[int, int]]:
        """(packets, bytes) per counter, summed over CPUs."""
        ncpu = libbpf.possible_cpus()
        values = (CounterValue * ncpu)()
        out: dict[Counter, tuple[int, int]] = {}
        for c in Counter:
            libbpf.lookup(self._counters, ctypes.c_uint32(int(c)), values)
            out[c] = (sum(v.packets for v in values), sum(v.bytes for v in values))
        return out
