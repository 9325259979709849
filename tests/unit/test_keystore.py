"""KeyStore: file format, permissions, corruption recovery, atomic writes, no leaked secrets."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from wgmanager.core.keys import PrivateKey
from wgmanager.errors import KeyStoreError
from wgmanager.keystore import KeyStore, LoadResult

WG = shutil.which("wg") or ("/usr/bin/wg" if os.path.exists("/usr/bin/wg") else None)
FIXED_NOW = datetime(2026, 11, 22, 10, 15, 0, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_strings(key: PrivateKey) -> list[str]:
    b64 = key.export_base64()
    return [b64, b64.rstrip("="), key.export_hex(), key.export_hex().upper()]


def _assert_not_leaked(secrets: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """No secret appears in the rendered log text nor in any record's fields (extras)."""
    haystacks = [caplog.text]
    haystacks += [repr(vars(record)) for record in caplog.records]
    for hay in haystacks:
        for secret in secrets:
            assert secret not in hay


def _assert_exc_clean(exc: BaseException, secrets: list[str]) -> None:
    chain: BaseException | None = exc
    while chain is not None:
        for text in (str(chain), repr(chain)):
            for secret in secrets:
                assert secret not in text
        chain = chain.__cause__ or chain.__context__


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="wgmanager.keystore")
    return caplog


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --- creation and reload -------------------------------------------------------------------


def test_creates_key_file_0600_in_new_0700_dir(tmp_path: Path, permissive_umask: None) -> None:
    state = tmp_path / "a" / "b" / "state"
    result = KeyStore(state_dir=state).load_or_create()
    assert result.created is True
    assert result.recovered_from is None
    assert _mode(state) == 0o700
    assert _mode(state / "private.key") == 0o600
    assert _files(state) == {"private.key"}


def test_file_format_is_base64_and_newline(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key = store.load_or_create().key
    assert store.path == tmp_path / "private.key"
    content = store.path.read_bytes()
    assert content == key.export_base64().encode("ascii") + b"\n"
    assert len(base64.b64decode(content.strip(), validate=True)) == 32


def test_reload_returns_same_key_and_created_false(tmp_path: Path) -> None:
    first = KeyStore(tmp_path).load_or_create()
    second = KeyStore(tmp_path).load_or_create()
    assert second == LoadResult(first.key, created=False, recovered_from=None)
    assert second.key.public_key == first.key.public_key


def test_existing_dir_is_used_as_is(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    KeyStore(tmp_path).load_or_create()
    assert _mode(tmp_path) == 0o755
    assert _mode(tmp_path / "private.key") == 0o600


def test_accepts_wg_genkey_style_file_written_by_someone_else(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    (tmp_path / "private.key").write_text(key.export_base64() + "\n")
    (tmp_path / "private.key").chmod(0o600)
    result = KeyStore(tmp_path).load_or_create()
    assert result.key == key
    assert result.created is False


# --- corruption ------------------------------------------------------------------------------

_GOOD = PrivateKey.generate().export_base64()
CORRUPT = {
    "empty": b"",
    "newline-only": b"\n",
    "truncated-base64": _GOOD[:20].encode() + b"\n",
    "truncated-one-char": _GOOD[:-1].encode(),
    "garbage": b"this is not a key at all\n",
    "31-bytes": base64.b64encode(bytes(range(1, 32))) + b"\n",
    "33-bytes": base64.b64encode(bytes(range(1, 34))) + b"\n",
    "all-zero": base64.b64encode(bytes(32)) + b"\n",
    "binary-junk": bytes([0xFF, 0x00, 0xFE, 0x80, 0x81]) * 9,
    "key-with-trailing-junk": _GOOD.encode() + b"\nextra\n",
    "huge": b"A" * 100_000,
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_key_is_moved_aside_and_replaced(
    tmp_path: Path, caplog_debug: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "private.key"
    path.write_bytes(content)
    path.chmod(0o600)
    store = KeyStore(tmp_path, clock=lambda: FIXED_NOW)

    result = store.load_or_create()

    aside = tmp_path / "private.key.corrupt-20261122T101500Z"
    assert result.created is True
    assert result.recovered_from == aside
    assert aside.read_bytes() == content  # preserved byte-for-byte
    assert _mode(aside) == 0o600
    assert _files(tmp_path) == {"private.key", aside.name}
    assert KeyStore(tmp_path).load() == result.key  # the new key is valid on disk
    assert path.read_text() == result.key.export_base64() + "\n"

    warnings = [r for r in caplog_debug.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    record = warnings[0]
    assert "corrupt" in record.getMessage()
    assert "peers" in record.getMessage()
    assert record.__dict__["moved_to"] == str(aside)
    assert record.__dict__["path"] == str(path)
    assert record.__dict__["public_key"] == result.key.public_key.base64()
    # Neither the new key nor whatever was in the corrupt file reaches the log.
    leaked = _secret_strings(result.key)
    if content.strip():
        leaked.append(content.strip()[:40].decode("latin-1"))
    _assert_not_leaked(leaked, caplog_debug)


def test_two_corruptions_in_the_same_second_get_distinct_aside_files(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, clock=lambda: FIXED_NOW)
    path = store.path
    path.write_bytes(b"first\n")
    first = store.load_or_create().recovered_from
    path.write_bytes(b"second\n")
    second = store.load_or_create().recovered_from
    path.write_bytes(b"third\n")
    third = store.load_or_create().recovered_from

    assert first is not None and second is not None and third is not None
    assert len({first, second, third}) == 3
    assert first.name == "private.key.corrupt-20261122T101500Z"
    assert first.read_bytes() == b"first\n"
    assert second.read_bytes() == b"second\n"
    assert third.read_bytes() == b"third\n"


def test_two_corruptions_with_real_clock_get_distinct_aside_files(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    asides = []
    for content in (b"x", b"y"):
        store.path.write_bytes(content)
        result = store.load_or_create()
        assert result.recovered_from is not None
        asides.append(result.recovered_from)
    assert asides[0] != asides[1]
    assert [a.read_bytes() for a in asides] == [b"x", b"y"]
    assert all(a.name.startswith("private.key.corrupt-") for a in asides)


def test_aside_timestamp_is_utc(tmp_path: Path) -> None:
    from datetime import timedelta, timezone

    local = datetime(2026, 11, 22, 12, 15, 0, tzinfo=timezone(timedelta(hours=2)))
    store = KeyStore(tmp_path, clock=lambda: local)
    store.path.write_bytes(b"junk")
    result = store.load_or_create()
    assert result.recovered_from == tmp_path / "private.key.corrupt-20261122T101500Z"


def test_key_file_that_is_a_directory_is_an_error_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "private.key").mkdir()
    with pytest.raises(KeyStoreError, match="not a regular file"):
        KeyStore(tmp_path).load_or_create()
    assert (tmp_path / "private.key").is_dir()


# --- permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o666, 0o700])
def test_loose_permissions_are_fixed_with_warning(
    tmp_path: Path, caplog_debug: pytest.LogCaptureFixture, loose: int
) -> None:
    store = KeyStore(tmp_path)
    key = store.load_or_create().key
    store.path.chmod(loose)
    caplog_debug.clear()

    result = store.load_or_create()

    assert result == LoadResult(key, created=False, recovered_from=None)
    expected = 0o600 if loose & 0o077 else loose
    assert _mode(store.path) == expected
    warnings = [r for r in caplog_debug.records if r.levelno == logging.WARNING]
    if loose & 0o077:
        assert len(warnings) == 1
        assert warnings[0].__dict__["path"] == str(store.path)
        assert warnings[0].__dict__["old_mode"] == oct(loose)
    else:
        assert warnings == []
    _assert_not_leaked(_secret_strings(key), caplog_debug)


def test_correct_permissions_log_no_warning(
    tmp_path: Path, caplog_debug: pytest.LogCaptureFixture
) -> None:
    store = KeyStore(tmp_path)
    store.load_or_create()
    caplog_debug.clear()
    store.load_or_create()
    assert not [r for r in caplog_debug.records if r.levelno >= logging.WARNING]


# --- atomic write ----------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["write", "fsync", "replace", "fchmod"])
def test_failed_write_leaves_original_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = KeyStore(tmp_path)
    original = store.load_or_create().key
    before = store.path.read_bytes()
    new = PrivateKey.generate()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(KeyStoreError) as excinfo:
        store.write(new)
    monkeypatch.undo()

    assert store.path.read_bytes() == before
    assert _files(tmp_path) == {"private.key"}
    assert store.load() == original
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(store.path) in message
    _assert_exc_clean(excinfo.value, _secret_strings(new) + _secret_strings(original))


def test_failed_directory_fsync_after_replace_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(tmp_path)
    store.load_or_create()
    new = PrivateKey.generate()
    real_fsync = os.fsync
    calls = []

    def fsync_fails_second_time(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_second_time)
    with pytest.raises(KeyStoreError) as excinfo:
        store.write(new)
    monkeypatch.undo()
    # The rename happened; durability is what could not be confirmed. No temp file remains.
    assert _files(tmp_path) == {"private.key"}
    assert store.load() == new
    _assert_exc_clean(excinfo.value, _secret_strings(new))


def test_write_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore(tmp_path)
    store.load_or_create()
    real_fsync = os.fsync
    synced: list[bool] = []

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.write(PrivateKey.generate())
    assert synced == [False, True]  # file first, then the directory


def test_write_mode_is_0600_regardless_of_umask(tmp_path: Path, permissive_umask: None) -> None:
    store = KeyStore(tmp_path)
    store.write(PrivateKey.generate())
    assert _mode(store.path) == 0o600


def test_write_replaces_existing_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.load_or_create()
    new = PrivateKey.generate()
    store.write(new)
    assert store.load_or_create() == LoadResult(new, created=False, recovered_from=None)


# --- other key files (rotation) --------------------------------------------------------------


def test_named_key_round_trip(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    main = store.load_or_create().key
    nxt = PrivateKey.generate()
    assert store.load("next.key") is None
    store.write(nxt, name="next.key")
    assert _mode(tmp_path / "next.key") == 0o600
    assert store.load("next.key") == nxt
    assert store.load() == main


def test_load_of_corrupt_named_key_raises_without_moving(
    tmp_path: Path, caplog_debug: pytest.LogCaptureFixture
) -> None:
    store = KeyStore(tmp_path)
    half = PrivateKey.generate().export_base64()[:30]
    (tmp_path / "next.key").write_text(half)
    with pytest.raises(KeyStoreError) as excinfo:
        store.load("next.key")
    message = str(excinfo.value)
    assert str(tmp_path / "next.key") in message
    assert "\n" not in message
    assert half not in message
    assert _files(tmp_path) == {"next.key"}
    assert (tmp_path / "next.key").read_text() == half
    _assert_not_leaked([half], caplog_debug)


def test_load_of_corrupt_main_key_raises_without_moving(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.path.write_bytes(b"junk")
    with pytest.raises(KeyStoreError, match="corrupt"):
        store.load()
    assert _files(tmp_path) == {"private.key"}


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden"])
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    store = KeyStore(tmp_path)
    with pytest.raises(ValueError):
        store.write(PrivateKey.generate(), name=name)
    with pytest.raises(ValueError):
        store.load(name)
    assert _files(tmp_path) == set()


# --- unusable state directory ----------------------------------------------------------------


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("x")
    with pytest.raises(KeyStoreError) as excinfo:
        KeyStore(not_a_dir).load_or_create()
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(not_a_dir) in message
    assert "--state-dir" in message
    assert not_a_dir.read_text() == "x"


def test_state_dir_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    state = blocker / "state"
    with pytest.raises(KeyStoreError) as excinfo:
        KeyStore(state).load_or_create()
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(state) in message
    assert "--state-dir" in message


def test_state_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod does not deny access; simulate what access(2) reports.
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(KeyStoreError) as excinfo:
        KeyStore(tmp_path).load_or_create()
    message = str(excinfo.value)
    assert message == (
        f"key state directory {tmp_path} is not writable: "
        "run as root or point --state-dir at a writable directory"
    )
    assert _files(tmp_path) == set()


def test_write_into_missing_dir_raises_keystoreerror(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "missing")
    with pytest.raises(KeyStoreError) as excinfo:
        store.write(PrivateKey.generate())
    assert "\n" not in str(excinfo.value)


# --- no secrets anywhere ---------------------------------------------------------------------


def test_no_private_key_material_in_logs_or_errors_across_paths(
    tmp_path: Path, caplog_debug: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys: list[PrivateKey] = []
    errors: list[BaseException] = []
    store = KeyStore(tmp_path / "state", clock=lambda: FIXED_NOW)

    keys.append(store.load_or_create().key)  # create
    keys.append(store.load_or_create().key)  # reload
    store.path.chmod(0o644)
    keys.append(store.load_or_create().key)  # permission fix
    store.path.write_text(keys[0].export_base64()[:-3])
    keys.append(store.load_or_create().key)  # corrupt -> replaced
    nxt = PrivateKey.generate()
    keys.append(nxt)
    store.write(nxt, name="next.key")
    (tmp_path / "state" / "next.key").write_text(nxt.export_base64()[:-2])
    with pytest.raises(KeyStoreError) as e1:
        store.load("next.key")
    errors.append(e1.value)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "x")))
        with pytest.raises(KeyStoreError) as e2:
            store.write(nxt)
        errors.append(e2.value)
    with pytest.raises(KeyStoreError) as e3:
        KeyStore(store.path).load_or_create()
    errors.append(e3.value)

    assert caplog_debug.records  # the paths above did log
    secrets = [s for k in keys for s in _secret_strings(k)]
    _assert_not_leaked(secrets, caplog_debug)
    for exc in errors:
        _assert_exc_clean(exc, secrets)
    for k in keys:
        assert k.export_base64() not in repr(LoadResult(k, created=True, recovered_from=None))


# --- interoperability with wireguard-tools --------------------------------------------------


@pytest.mark.skipif(WG is None, reason="wireguard-tools (wg) not installed")
def test_wg_pubkey_reads_our_key_file(tmp_path: Path) -> None:
    assert WG is not None
    store = KeyStore(tmp_path)
    key = store.load_or_create().key
    out = subprocess.run(
        [WG, "pubkey"], input=store.path.read_bytes(), capture_output=True, check=True
    )
    assert out.stdout.decode().strip() == key.public_key.base64()


@pytest.mark.skipif(WG is None, reason="wireguard-tools (wg) not installed")
def test_we_read_wg_genkey_output(tmp_path: Path) -> None:
    assert WG is not None
    genkey = subprocess.run([WG, "genkey"], capture_output=True, check=True).stdout
    pub = subprocess.run([WG, "pubkey"], input=genkey, capture_output=True, check=True).stdout
    (tmp_path / "private.key").write_bytes(genkey)
    (tmp_path / "private.key").chmod(0o600)
    result = KeyStore(tmp_path).load_or_create()
    assert result.created is False
    assert result.key.public_key.base64() == pub.decode().strip()


def test_quarantined_nodes_round_trip_and_unreadable_means_none(tmp_path: Path) -> None:
    """The agent records the nodes it quarantines for `status`; a damaged file is not fatal
    (status then shows them as missing, never crashes)."""
    store = KeyStore(tmp_path / "state")
    assert store.load_quarantined() == frozenset()
    store.save_quarantined(frozenset({"node2", "node9"}))
    assert store.load_quarantined() == {"node2", "node9"}
    store.save_quarantined(frozenset())
    assert store.load_quarantined() == frozenset()
    (tmp_path / "state" / "quarantined.json").write_text("{not json")
    assert store.load_quarantined() == frozenset()
