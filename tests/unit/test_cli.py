"""The command line: parsing, defaults, and one-line errors. Nothing here touches the system:
every test fails before a backend is chosen, or replaces the backend choice."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgmanager import __version__, config
from wgmanager.commands import main as cli
from wgmanager.config import BackendMode
from wgmanager.core.keys import PrivateKey
from wgmanager.errors import ConfigError

KEY = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() installs its own root handler; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing a backend probes the kernel or starts wireguard-go: never in unit tests."""
    def refuse(settings: object) -> object:
        raise AssertionError("a unit test reached backend selection")

    monkeypatch.setattr("wgmanager.wireguard.select.select_backend", refuse)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wgmanager: error: ")
    return lines[0]


def write_mesh(path: Path, nodes: list[dict[str, object]] | None = None) -> Path:
    path.write_text(json.dumps({"nodes": nodes if nodes is not None else [
        {"name": "n1", "addresses": ["10.99.0.1"], "podCIDRs": ["10.244.1.0/24"],
         "publicKey": KEY}]}))
    return path


# ---------------------------------------------------------------------------------------------
# parsing


def test_apply_defaults() -> None:
    args = cli.build_parser().parse_args(["apply", "--mesh", "f", "--node-name", "n"])
    assert args.command == "apply"
    assert args.mesh == Path("f")
    assert args.node_name == "n"
    assert args.interface == "wgm0" == config.DEFAULT_IFNAME
    assert args.state_dir == Path("/var/lib/wgmanager")
    assert args.backend is BackendMode.AUTO
    assert args.listen_port is None
    assert args.mtu is None
    assert args.spawn_userspace is True
    assert args.socket_dir == config.DEFAULT_SOCKET_DIR
    assert args.pin_dir == config.DEFAULT_PIN_DIR
    assert args.uplink is None
    assert args.pod_interfaces == ""  # from_pod is opt-in: steering is after netfilter
    assert args.max_cidrs == 65536
    assert args.log_level == "info" and args.log_format == "text"


def test_apply_flags() -> None:
    args = cli.build_parser().parse_args([
        "--log-level", "debug", "--log-format", "json",
        "apply", "--mesh", "m.json", "--node-name", "n", "--interface", "wg9",
        "--state-dir", "/s", "--listen-port", "51821", "--mtu", "1400",
        "--backend", "userspace", "--no-spawn-userspace", "--uplink", "eth1"])
    assert args.backend is BackendMode.USERSPACE
    assert (args.interface, args.state_dir, args.listen_port, args.mtu) == (
        "wg9", Path("/s"), 51821, 1400)
    assert args.spawn_userspace is False and args.uplink == "eth1"
    assert (args.log_level, args.log_format) == ("debug", "json")


def test_pubkey_defaults() -> None:
    args = cli.build_parser().parse_args(["pubkey"])
    assert args.command == "pubkey" and args.state_dir == Path("/var/lib/wgmanager")


@pytest.mark.parametrize("argv", [
    [],
    ["apply", "--node-name", "n"],
    ["apply", "--mesh", "f"],
    ["apply", "--mesh", "f", "--node-name", "n", "--backend", "magic"],
    ["apply", "--mesh", "f", "--node-name", "n", "--mtu", "big"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"wgmanager {__version__}"


# ---------------------------------------------------------------------------------------------
# errors: one line, exit 1


def test_apply_missing_mesh_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["apply", "--mesh", "/nonexistent", "--node-name", "x"]) == 1
    line = one_error_line(capsys)
    assert "/nonexistent" in line


def test_apply_invalid_mesh_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mesh = tmp_path / "mesh.json"
    mesh.write_text("{\n  nodes: [\n")
    assert cli.main(["apply", "--mesh", str(mesh), "--node-name", "x"]) == 1
    assert str(mesh) in one_error_line(capsys)


def test_apply_bad_mesh_structure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mesh = tmp_path / "mesh.json"
    mesh.write_text('{"nodes": [], "clusterCIDRs": 5}')
    assert cli.main(["apply", "--mesh", str(mesh), "--node-name", "x"]) == 1
    assert "clusterCIDRs" in one_error_line(capsys)


def test_apply_interface_name_too_long(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    mesh = write_mesh(tmp_path / "mesh.json")
    rc = cli.main(["apply", "--mesh", str(mesh), "--node-name", "n1",
                   "--state-dir", str(tmp_path / "s"), "--interface", "a" * 16])
    assert rc == 1
    assert "--interface" in one_error_line(capsys)


def test_interface_name_of_14_is_accepted_and_its_rotation_device_fits() -> None:
    args = cli.build_parser().parse_args(["apply", "--mesh", "f", "--node-name", "n",
                                          "--interface", "a" * 14])
    wg = cli.settings_from(args, "n", 51820).wireguard
    assert wg.ifname == "a" * 14
    assert wg.ifname_for(1) == "a" * 14 + "r"
    assert len(wg.ifname_for(1)) == 15  # IFNAMSIZ - 1


def test_rotation_port_defaults_to_the_next_port_and_must_differ() -> None:
    args = cli.build_parser().parse_args(["apply", "--mesh", "f", "--node-name", "n"])
    assert cli.settings_from(args, "n", 51820).wireguard.port_for(1) == 51821
    args = cli.build_parser().parse_args(["apply", "--mesh", "f", "--node-name", "n",
                                          "--rotation-listen-port", "51820"])
    with pytest.raises(ConfigError, match="--rotation-listen-port"):
        cli.settings_from(args, "n", 51820)
    args = cli.build_parser().parse_args(["apply", "--mesh", "f", "--node-name", "n"])
    with pytest.raises(ConfigError, match="second port"):
        cli.settings_from(args, "n", 65535)


@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0.0), ("off", 0.0), ("90", 90.0), ("45s", 45.0), ("10m", 600.0),
    ("720h", 2_592_000.0), ("30d", 2_592_000.0), ("1.5h", 5400.0)])
def test_durations(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "10x", "h", "nan", "inf"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="duration"):
        cli.parse_duration(text)


def test_agent_rotation_flags_reach_the_settings() -> None:
    args = cli.build_parser().parse_args([
        "agent", "--node-name", "n", "--key-rotation-interval", "30d",
        "--key-rotation-timeout", "2m"])
    rot = cli.settings_from(args, "n", 51820).rotation
    assert (rot.interval, rot.timeout, rot.settle) == (30 * 86400, 120, 0.1)
    args = cli.build_parser().parse_args(["agent", "--node-name", "n",
                                          "--key-rotation-settle", "0.3"])
    assert cli.settings_from(args, "n", 51820).rotation.settle == 0.3


@pytest.mark.parametrize("value", ["-0.1", "6", "nan"])
def test_a_settle_out_of_range_is_one_line_naming_the_flag_and_the_range(value: str) -> None:
    args = cli.build_parser().parse_args(["agent", "--node-name", "n",
                                          f"--key-rotation-settle={value}"])
    with pytest.raises(ConfigError, match=r"^--key-rotation-settle .* out of range: give 0 "
                                          r"to 5 seconds, e\.g\. 0\.1$"):
        cli.settings_from(args, "n", 51820)


def test_the_production_cli_has_no_crash_hook() -> None:
    """Fault injection lives in tests/e2e/crash_agent.py, out of users' reach."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["agent", "--node-name", "n", "--test-crash-at", "x"])


def test_rotate_keys_needs_nodes_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["rotate-keys"])
    assert exc.value.code == 2
    assert "NODE --all is required" in capsys.readouterr().err


@pytest.mark.parametrize("mtu", ["0", "575", "65536", "-1", "100000"])
def test_apply_mtu_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                mtu: str) -> None:
    mesh = write_mesh(tmp_path / "mesh.json")
    rc = cli.main(["apply", "--mesh", str(mesh), "--node-name", "n1",
                   "--state-dir", str(tmp_path / "s"), "--mtu", mtu])
    assert rc == 1
    assert "--mtu" in one_error_line(capsys)


@pytest.mark.parametrize("port", ["0", "65536", "-5"])
def test_apply_listen_port_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        port: str) -> None:
    mesh = write_mesh(tmp_path / "mesh.json")
    rc = cli.main(["apply", "--mesh", str(mesh), "--node-name", "n1",
                   "--state-dir", str(tmp_path / "s"), "--listen-port", port])
    assert rc == 1
    assert "--listen-port" in one_error_line(capsys)


def test_teardown_interface_too_long(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["teardown", "--interface", "x" * 20]) == 1
    assert "--interface" in one_error_line(capsys)


def test_settings_from() -> None:
    args = cli.build_parser().parse_args([
        "apply", "--mesh", "f", "--node-name", "n", "--mtu", "576", "--state-dir", "/s",
        "--max-cidrs", "10", "--pod-interfaces", "cali*"])
    s = cli.settings_from(args, "n", 51821)
    assert s.node_name == "n" and s.state_dir == Path("/s")
    assert s.wireguard.mtu == 576 and s.wireguard.listen_port == 51821
    assert s.wireguard.ifname == "wgm0" and s.wireguard.backend is BackendMode.AUTO
    assert s.datapath.max_cidrs == 10 and s.datapath.pod_interfaces == "cali*"


def test_settings_from_default_mtu_is_automatic() -> None:
    args = cli.build_parser().parse_args(["apply", "--mesh", "f", "--node-name", "n"])
    assert cli.settings_from(args, "n", 51820).wireguard.mtu is None


def test_apply_unknown_node_name_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A --node-name missing from the mesh file is a user error, not a traceback."""
    class Backend:
        kind = None
        ifname = "wgm0"

    monkeypatch.setattr("wgmanager.wireguard.select.select_backend", lambda s: Backend())
    mesh = write_mesh(tmp_path / "mesh.json")
    rc = cli.main(["--log-level", "error", "apply", "--mesh", str(mesh), "--node-name", "nope",
                   "--state-dir", str(tmp_path / "s")])
    assert rc == 1
    assert "'nope'" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# pubkey


def test_pubkey_creates_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    assert cli.main(["pubkey", "--state-dir", str(state)]) == 0
    out, err = capsys.readouterr()
    printed = out.strip()
    assert out == printed + "\n"
    assert len(base64.b64decode(printed, validate=True)) == 32

    key_file = state / "private.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = key_file.read_text().strip()
    private = PrivateKey.from_base64(secret)
    assert private.public_key.base64() == printed
    for text in (out, err):
        assert secret not in text
        assert private.export_hex() not in text


def test_pubkey_is_stable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "s")
    assert cli.main(["pubkey", "--state-dir", state]) == 0
    first = capsys.readouterr().out
    assert cli.main(["pubkey", "--state-dir", state]) == 0
    assert capsys.readouterr().out == first


def test_pubkey_unusable_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["pubkey", "--state-dir", str(blocker)]) == 1
    assert str(blocker) in one_error_line(capsys)
