"""Netlink link events: a new overlay tunnel device (VXLAN, Geneve, IPIP) gets the steering program
at once, and so does a new pod veth when the opt-in fast path (--pod-interfaces) is on.

A CNI may create its VXLAN device after the agent started: until the program is on it,
pods' traffic to other nodes would leave encapsulated but in plaintext, so waiting for the
next resync (60 s) is not acceptable; this watcher shortens that window to milliseconds.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from wgmanager.datapath.links import L3_TUNNEL_KINDS, TUNNEL_KINDS

log = logging.getLogger(__name__)


def watch_new_links(pattern: str, on_new: Callable[[str], None],
                    stop: threading.Event) -> None:
    """Calls ``on_new(ifname)`` for every new tunnel device and every new veth whose name
    matches ``pattern`` (an empty pattern matches no veth).

    Runs until ``stop`` is set (checked between netlink batches) or netlink fails; a failure
    is logged and the agent falls back to its periodic resync.
    """
    try:
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK)
            while not stop.is_set():
                for msg in ipr.get():
                    if msg.get("event") != "RTM_NEWLINK":
                        continue
                    name = msg.get_attr("IFLA_IFNAME") or ""
                    info = msg.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    if kind in TUNNEL_KINDS or kind in L3_TUNNEL_KINDS or (
                            kind == "veth" and pattern
                                                and fnmatch.fnmatchcase(name, pattern)):
                        on_new(name)
    except Exception as e:
        log.warning("link watch stopped; new pod interfaces wait for the next resync",
                    extra={"error": f"{type(e).__name__}: {e}"})
