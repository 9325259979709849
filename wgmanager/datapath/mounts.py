"""Which filesystem a path lives on, from /proc/self/mountinfo.

The datapath needs it (pinned maps must sit on bpffs) and so does `doctor`; the parser is
pure so it can be tested on sample text.
"""

from __future__ import annotations

from pathlib import Path


def fstype_at(mountinfo: str, path: Path, *, exact: bool = False) -> str | None:
    """The filesystem type of the mount holding ``path`` (with ``exact``, mounted at it).

    ``mountinfo`` is the text of /proc/self/mountinfo; a later mount on the same point hides
    an earlier one, so the last match wins.
    """
    target, best, fstype = str(path), "", None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = fields[4]
        inside = target == point if exact else (
            target == point or target.startswith(point.rstrip("/") + "/"))
        if inside and len(point) >= len(best):
            best, fstype = point, right.split()[0]
    return fstype


def propagation_at(mountinfo: str, path: Path) -> str | None:
    """How the mount holding ``path`` propagates: "shared", "slave" or "private" (None when
    no mount holds it). The optional fields of a mountinfo line say it: ``shared:N`` for a
    peer group (a mount that is also a slave is still shared), ``master:N`` for a slave."""
    target, best, mode = str(path), "", None
    for line in mountinfo.splitlines():
        left, sep, _ = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 6:
            continue
        point = fields[4]
        if (target == point or target.startswith(point.rstrip("/") + "/")) \
                and len(point) >= len(best):
            tags = fields[6:]
            best = point
            mode = ("shared" if any(t.startswith("shared:") for t in tags)
                    else "slave" if any(t.startswith("master:") for t in tags) else "private")
    return mode


def fstype_of(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (which may not exist yet)."""
    with open("/proc/self/mountinfo") as f:
        return fstype_at(f.read(), path.absolute())
