from __future__ import annotations

import json
import struct
import uuid

from pgproxy.audit import AuditLog, decode_binary
from pgproxy.config import AuditSection

SESSION = {"session": "s1", "user": "alice", "role": "r", "auth_method": "jwt"}


CHAIN = ("writer", "seq", "prev")


def _records(tmp_path, **cfg) -> list[dict]:
    """The two records written, without the trail's own records and chain members."""
    log = AuditLog(AuditSection(file=str(tmp_path / "a.jsonl"), **cfg))
    log.statement(AuditLog.session_prefix(SESSION), "SELECT $1, $2, $3", [b"abc", struct.pack("!i", 7), None],
                  ([0, 1, 0], (25, 23, 25)), [b"SELECT 1\0"], 1.0, 0.002, "ok", None, 99)
    log.event("auth_failure", user="bob", reason="expired")
    log.close()  # flushes everything queued
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in CHAIN} for r in records if not r["event"].startswith("audit_")]


def test_statement_record_fields_and_flush_on_close(tmp_path):
    statement, failure = _records(tmp_path)
    assert statement["user"] == "alice" and statement["statement"] == "SELECT $1, $2, $3"
    assert statement["parameters"] == ["abc", "7", None]
    assert (statement["command"], statement["rows"], statement["outcome"], statement["backend_pid"]) == ("SELECT", 1, "ok", 99)
    assert statement["duration_ms"] == 2.0
    assert failure == {"ts": failure["ts"], "user": "bob", "reason": "expired", "event": "auth_failure"}


def test_parameter_modes(tmp_path):
    assert _records(tmp_path, parameters="redacted")[0]["parameters"] == ["<redacted>", "<redacted>", None]
    assert "parameters" not in _records(tmp_path, parameters="off")[-2]
    assert _records(tmp_path, max_parameter_length=2)[-2]["parameters"][0] == "ab…"


def test_binary_decoding_of_common_types():
    assert decode_binary(20, struct.pack("!q", -5)) == "-5"
    assert decode_binary(16, b"\x01") == "true"
    u = uuid.uuid4()
    assert decode_binary(2950, u.bytes) == str(u)
    assert decode_binary(17, b"\x00\xff") == "\\x00ff"
    assert decode_binary(23, b"\x00") is None  # wrong size: not guessed
    assert decode_binary(1700, b"\x00\x01") is None  # numeric: shown as <binary>
