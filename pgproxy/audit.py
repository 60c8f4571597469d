"""The audit trail: one JSON line per event, written off the hot path.

Sessions hand records to ``AuditLog`` as cheap tuples; a writer thread turns them into
JSON, batches them and appends them to the file. Statement parameters travel as the
raw bytes the client bound and are rendered in the writer thread, so the relay pays
only for a queue put. The queue is bounded: when the disk cannot keep up, sessions
wait for the writer rather than drop a record (invariant: every statement that
reaches the database is audited). ``close()`` flushes everything queued.

No record ever holds a password or a token: authentication failures carry the user,
the reason and the client address only.
"""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time
import uuid
from datetime import datetime, timezone

from pgproxy.config import AuditSection

log = logging.getLogger("pgproxy.audit")

_STOP = object()
_BATCH = 512


class AuditLog:
    def __init__(self, cfg: AuditSection) -> None:
        self._cfg = cfg
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self._file = open(cfg.file, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self.records_written = 0
        self.write_errors = 0
        self._thread.start()

    # --- producers (event loop) -----------------------------------------------------

    def event(self, event: str, **fields) -> None:
        fields["event"] = event
        self._put(("event", time.time(), fields))

    def statement(self, session: dict, text: str, params: list | None, param_formats: list | None,
                  tags: list[str], rows: int | None, started: float, duration_s: float,
                  outcome: str, sqlstate: str | None, backend_pid: int | None) -> None:
        self._put(("statement", started, session, text, params, param_formats, tags, rows,
                   duration_s, outcome, sqlstate, backend_pid))

    def _put(self, record: tuple) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._queue.put(record)  # back-pressure rather than a lost record

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._file.close()

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for record in batch:
                if record is _STOP:
                    stopping = True
                    continue
                try:
                    lines.append(json.dumps(self._render(record), ensure_ascii=False, default=str))
                except Exception:  # a record we cannot render must not stop the trail
                    log.exception("cannot render an audit record")
                    self.write_errors += 1
            if lines:
                try:
                    self._file.write("\n".join(lines) + "\n")
                    self._file.flush()
                    self.records_written += len(lines)
                except OSError as exc:
                    self.write_errors += 1
                    log.error("audit write failed: %s", exc)

    def _render(self, record: tuple) -> dict:
        if record[0] == "event":
            _, ts, fields = record
            return {"ts": _iso(ts), **fields}
        (_, started, session, text, params, formats, tags, rows, duration_s, outcome, sqlstate, pid) = record
        cfg = self._cfg
        out = {"ts": _iso(started), "event": "statement", **session, "backend_pid": pid,
               "statement": text if len(text) <= cfg.max_statement_length else text[:cfg.max_statement_length] + "…",
               "command": tags[-1] if tags else None, "rows": rows,
               "duration_ms": round(duration_s * 1000, 3), "outcome": outcome}
        if len(tags) > 1:
            out["commands"] = tags
        if sqlstate:
            out["sqlstate"] = sqlstate
        if params is not None and cfg.parameters != "off":
            out["parameters"] = [self._render_param(i, p, formats) for i, p in enumerate(params)]
        return out

    def _render_param(self, index: int, value: bytes | None, formats_and_types: tuple | None):
        if value is None:
            return None
        if self._cfg.parameters == "redacted":
            return "<redacted>"
        formats, types = formats_and_types or ((), ())
        fmt = formats[0] if len(formats) == 1 else (formats[index] if index < len(formats) else 0)
        if fmt == 1:
            oid = types[index] if index < len(types) else 0
            text = decode_binary(oid, value)
            if text is None:
                return f"<binary {len(value)} bytes>"
        else:
            text = value.decode("utf-8", "replace")
        limit = self._cfg.max_parameter_length
        return text if len(text) <= limit else text[:limit] + "…"


_BINARY_NUMBERS = {21: "!h", 23: "!i", 20: "!q", 26: "!I", 700: "!f", 701: "!d"}
_BINARY_TEXT = {25, 1043, 19, 705, 114, 1042}


def decode_binary(oid: int, value: bytes) -> str | None:
    """Readable text for a binary-format parameter of a common type, else None."""
    try:
        if oid in _BINARY_NUMBERS:
            return str(struct.unpack(_BINARY_NUMBERS[oid], value)[0])
        if oid == 16 and len(value) == 1:
            return "true" if value[0] else "false"
        if oid in _BINARY_TEXT:
            return value.decode("utf-8", "replace")
        if oid == 3802 and value[:1] == b"\x01":  # jsonb: version byte, then text
            return value[1:].decode("utf-8", "replace")
        if oid == 2950 and len(value) == 16:
            return str(uuid.UUID(bytes=value))
        if oid == 17:
            return "\\x" + value.hex()
    except (struct.error, ValueError):
        return None
    return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")
