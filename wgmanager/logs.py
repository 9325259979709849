"""Logging set-up: fixed message text plus structured fields, as text or one JSON object a line.

Modules log with ``extra={...}``; this formatter prints those fields, so a reader sees e.g.
``node gets no peer node=n4 reason="public key annotation is invalid: ..."``. Secrets never
reach here: key objects render as public keys or ``<redacted>``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={_text(v)}" for k, v in fields(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        doc.update({k: _plain(v) for k, v in fields(record).items()})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, bool, type(None))) else str(v)


def _text(v: Any) -> str:
    s = str(v)
    # Quoted (JSON string escapes) when it would not read back as one key=value token: a
    # newline in a value (an error message, say) must not start a fake log line.
    needs_quotes = not s or any(c.isspace() or not c.isprintable() or c in '"=' for c in s)
    return json.dumps(s) if needs_quotes else s


def setup_logging(*, level: str = "info", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # --log-level applies to wgmanager's own loggers only. Libraries stay at WARNING: at
    # DEBUG pyroute2 dumps whole netlink messages, which for a kernel WireGuard device
    # include the private key.
    root.setLevel(logging.WARNING)
    logging.getLogger("wgmanager").setLevel(level.upper())
