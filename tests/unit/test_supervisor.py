"""The supervisor's pure parts: which want files are requests, and how restarts back off.
The supervisor itself runs against real wireguard-go in tests/integration/test_supervisor.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from wgmanager.commands import main as cli
from wgmanager.wireguard.supervisor import MAX_BACKOFF, restart_delay, wanted_devices
from wgmanager.wireguard.userspace import UserspaceBackend, want_path


@pytest.mark.parametrize(("failures", "delay"), [
    (0, 0.0), (1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0), (7, 16.0), (8, MAX_BACKOFF),
    (50, MAX_BACKOFF),
])
def test_restart_delay(failures: int, delay: float) -> None:
    assert restart_delay(failures) == delay


def test_wanted_devices_reads_want_files_only(tmp_path: Path) -> None:
    for name in ("wgm0.want", "wgm0r.want", "wgm0.sock", "wgm0.log", ".wgm1.want.123",
                 "bad name.want", "..want", "sixteen-chars-xx.want"):
        (tmp_path / name).write_text("")
    # dot files are the agent's temporary files before their atomic rename
    assert wanted_devices(tmp_path) == ({"wgm0", "wgm0r"}, {"bad name", "sixteen-chars-xx"})
    assert wanted_devices(tmp_path / "missing") == (set(), set())


def test_the_agent_and_the_supervisor_agree_on_the_file_name(tmp_path: Path) -> None:
    dev = UserspaceBackend("wgm0r", socket_dir=tmp_path, spawn=False)
    assert dev.want_path == want_path(tmp_path, "wgm0r") == tmp_path / "wgm0r.want"
    dev.want_path.write_text("wgm0r\n")
    assert wanted_devices(tmp_path) == ({"wgm0r"}, set())


def test_cli_defaults() -> None:
    args = cli.build_parser().parse_args(["wireguard-go-supervisor"])
    assert args.socket_dir == Path("/var/run/wireguard") and args.binary == "wireguard-go"
    args = cli.build_parser().parse_args(["wireguard-go-supervisor", "--socket-dir", "/s",
                                          "--binary", "/usr/local/bin/wg-go"])
    assert (args.socket_dir, args.binary) == (Path("/s"), "/usr/local/bin/wg-go")
