"""Structured diagnostic logs on stderr (logfmt or JSON), journald-friendly.

Pass context as ``extra={"session": ..., "user": ...}``; the formatter prints every
extra field. Nothing that logs may hand in a password or token: callers log reasons
and names, never credentials.
"""

from __future__ import annotations

import json
import logging
import sys
import time

worker_index: int | None = None  # set in worker processes; every line then names its worker

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict:
    fields = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
              "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
    fields.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
    if worker_index is not None:
        fields["worker"] = worker_index
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_quote(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def _quote(value) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return json.dumps(text)


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
