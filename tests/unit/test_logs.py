"""Log formatting: structured fields as key=value or JSON, and never a private key."""

from __future__ import annotations

import io
import json
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wgmanager.core.keys import PrivateKey
from wgmanager.logs import JsonFormatter, TextFormatter, fields, setup_logging

SECRET = PrivateKey(bytes(range(100, 132)))


@pytest.fixture
def emit() -> Iterator[Any]:
    """emit(formatter, level, msg, **extra) -> the formatted output of one record."""
    logger = logging.getLogger("wgmanager.test_logs")
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.propagate = False
    logger.setLevel(logging.DEBUG)

    def _emit(formatter: logging.Formatter, level: int, msg: str, *args: object,
              exc_info: Any = None, **extra: object) -> str:
        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        handler.setFormatter(formatter)
        logger.handlers[:] = [handler]
        logger.log(level, msg, *args, extra=extra, exc_info=exc_info)
        return buf.getvalue().removesuffix("\n")

    yield _emit
    logger.handlers[:], logger.propagate, logger.level = saved


def assert_no_secret(text: str) -> None:
    assert SECRET.export_base64() not in text
    assert SECRET.export_hex() not in text
    assert SECRET.export_base64()[:16] not in text


def text_fields(line: str) -> dict[str, str]:
    """The key=value tokens after the message, read back the way a log reader would."""
    return dict(tok.split("=", 1) for tok in shlex.split(line) if "=" in tok)


# ---------------------------------------------------------------------------------------------
# text


def test_text_plain_line(emit: Any) -> None:
    line = emit(TextFormatter(), logging.INFO, "reconciled")
    _ts, level, name, msg = line.split(None, 3)
    assert level == "info"
    assert name == "wgmanager.test_logs:"
    assert msg == "reconciled"


def test_text_extra_fields_as_key_value(emit: Any) -> None:
    line = emit(TextFormatter(), logging.WARNING, "node gets no peer", node="n4", peers=3,
                ok=True)
    assert line.endswith("node gets no peer node=n4 peers=3 ok=True")
    assert " warning " in line


def test_text_quotes_values_with_spaces(emit: Any) -> None:
    line = emit(TextFormatter(), logging.INFO, "x", reason="public key annotation is invalid",
                node="n1")
    assert 'reason="public key annotation is invalid"' in line
    assert text_fields(line) == {"reason": "public key annotation is invalid", "node": "n1"}


def test_text_quotes_empty_values(emit: Any) -> None:
    assert emit(TextFormatter(), logging.INFO, "x", uplink="").endswith(' uplink=""')


@pytest.mark.parametrize("value", ["line one\nline two", "tab\there", 'say "hi"', "a=b",
                                   "cr\rhere"])
def test_text_values_stay_on_one_line_and_read_back(emit: Any, value: str) -> None:
    line = emit(TextFormatter(), logging.INFO, "x", reason=value, node="n1")
    assert "\n" not in line and "\r" not in line
    tail = line.split(" x ", 1)[1]
    assert tail.startswith("reason=") and tail.endswith(" node=n1")
    assert json.loads(tail.removeprefix("reason=").removesuffix(" node=n1")) == value


def test_text_formats_message_args(emit: Any) -> None:
    assert emit(TextFormatter(), logging.INFO, "peers: %d", 4).endswith("peers: 4")


def test_text_exception_follows(emit: Any) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        out = emit(TextFormatter(), logging.ERROR, "failed", exc_info=True, node="n1")
    first, *rest = out.splitlines()
    assert first.endswith("failed node=n1")
    assert "RuntimeError: boom" in rest[-1]


def test_text_private_key_is_redacted(emit: Any) -> None:
    line = emit(TextFormatter(), logging.INFO, "key", key=SECRET, keys=[SECRET],
                nested={"k": SECRET})
    assert_no_secret(line)
    assert "<redacted>" in line
    assert SECRET.public_key.base64() in line


# ---------------------------------------------------------------------------------------------
# json


def test_json_document(emit: Any) -> None:
    out = emit(JsonFormatter(), logging.WARNING, "node gets no peer", node="n4", peers=3,
               ratio=0.5, ok=False, none=None, path=Path("/var/lib/wgmanager"))
    doc = json.loads(out)
    assert "\n" not in out
    assert doc["msg"] == "node gets no peer"
    assert doc["level"] == "warning"
    assert doc["logger"] == "wgmanager.test_logs"
    assert isinstance(doc["ts"], float)
    assert doc["node"] == "n4"
    assert doc["peers"] == 3 and doc["ratio"] == 0.5
    assert doc["ok"] is False and doc["none"] is None
    assert doc["path"] == "/var/lib/wgmanager"
    assert "exc" not in doc


def test_json_without_extra_has_only_standard_keys(emit: Any) -> None:
    doc = json.loads(emit(JsonFormatter(), logging.DEBUG, "hello %s", "there"))
    assert set(doc) == {"ts", "level", "logger", "msg"}
    assert doc["msg"] == "hello there" and doc["level"] == "debug"


def test_json_value_with_newline_stays_one_line(emit: Any) -> None:
    out = emit(JsonFormatter(), logging.INFO, "x", reason="a\nb")
    assert "\n" not in out
    assert json.loads(out)["reason"] == "a\nb"


def test_json_exception(emit: Any) -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        out = emit(JsonFormatter(), logging.ERROR, "failed", exc_info=True)
    assert "\n" not in out
    assert "ValueError: bad" in json.loads(out)["exc"]


def test_json_private_key_is_redacted(emit: Any) -> None:
    out = emit(JsonFormatter(), logging.INFO, "key", key=SECRET, keys=[SECRET])
    assert_no_secret(out)
    doc = json.loads(out)
    assert "<redacted>" in doc["key"] and "<redacted>" in doc["keys"]


# ---------------------------------------------------------------------------------------------
# fields, setup


def test_fields_are_only_the_extras() -> None:
    record = logging.makeLogRecord({"msg": "m", "node": "n1", "peers": 2})
    assert fields(record) == {"node": "n1", "peers": 2}
    assert fields(logging.makeLogRecord({"msg": "m"})) == {}


@pytest.fixture
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]


@pytest.mark.usefixtures("_restore_root")
@pytest.mark.parametrize(("json_format", "kind"), [(False, TextFormatter),
                                                   (True, JsonFormatter)])
def test_setup_logging(json_format: bool, kind: type) -> None:
    setup_logging(level="warning", json_format=json_format)
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    assert isinstance(handler.formatter, kind)


@pytest.mark.usefixtures("_restore_root")
def test_setup_logging_replaces_handlers() -> None:
    setup_logging(level="debug")
    setup_logging(level="info")
    assert len(logging.getLogger().handlers) == 1
    assert logging.getLogger("wgmanager").level == logging.INFO
    assert logging.getLogger().level == logging.WARNING


def test_debug_level_never_enables_library_debug_output() -> None:
    """pyroute2 logs whole netlink messages at DEBUG (a kernel device's private key too)."""
    setup_logging(level="debug")
    assert logging.getLogger("wgmanager.reconciler").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("pyroute2.netlink.core").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("urllib3").isEnabledFor(logging.DEBUG)
