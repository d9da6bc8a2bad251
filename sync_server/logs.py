"""Structured logs: one JSON object per line on stderr (``LOG_FORMAT = "json"``, the
default) or plain text (``"text"``).

A JSON line holds ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and every field
passed as ``extra={...}`` (``round_id``, ``device_id``, ``version``, ``epsilon``, ``status``,
``path``, ``duration_ms``, ...); an exception adds ``exc_info`` (the formatted traceback, so
it stays on the one line). ``install`` puts one handler on the ``sync_server`` logger, once
per process however many apps are created; a second call only switches its format."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOGGER = "sync_server"
FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={...}`` fields of a record."""
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"LOG_FORMAT must be one of {FORMATS}, got {fmt!r}")


def _handler(logger: logging.Logger) -> logging.Handler | None:
    return next((h for h in logger.handlers if getattr(h, "_pocketrec", False)), None)


def install(fmt: str = "json", name: str = LOGGER, level: int = logging.INFO) -> logging.Handler:
    """Our stderr handler on logger ``name`` (idempotent: never a second one)."""
    logger = logging.getLogger(name)
    handler = _handler(logger)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._pocketrec = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # Ours is the output: nothing goes on to the root logger, which a library may configure
    # mid-run (litert-torch's export logs through the root logger, whose first call installs
    # a basicConfig handler on stderr), else every line would be printed twice there, the
    # second copy not JSON.
    logger.propagate = False
    handler.setFormatter(formatter(fmt))
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler
