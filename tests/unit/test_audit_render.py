from __future__ import annotations

import json
import random
import struct
import uuid
from datetime import datetime, timezone

import pytest

from pgproxy.audit import AuditLog
from pgproxy.audit_render import CACHE_ENTRIES as _CACHE_ENTRIES
from pgproxy.audit_render import CACHE_TEXT_LENGTH as _CACHE_TEXT_LENGTH
from pgproxy.audit_render import ms as _ms
from pgproxy.protocol.binary_values import decode_binary
from pgproxy.audit_verify import verify
from pgproxy.config import AuditSection
from pgproxy.policy.guard import Verdict
from pgproxy.protocol.messages import parse_command_tag

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


# --- the statement record is exactly what json.dumps of the record would give ---------

def _reference_line(cfg: AuditSection, session: dict, started, text, params, info, tags, duration_s, outcome,
                    sqlstate, pid, verdict) -> str:
    """The statement record as json.dumps renders its dict (the chain members left out)."""
    second = int(started)
    ts = (datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
          + ".%06d+00:00" % int((started - second) * 1_000_000))
    parsed = [parse_command_tag(raw) for raw in tags]
    counts = [count for _, count in parsed if count is not None]
    record = {"ts": ts, "event": "statement", **session, "backend_pid": pid,
              "statement": text if len(text) <= cfg.max_statement_length else text[:cfg.max_statement_length] + "…",
              "command": parsed[-1][0] if parsed else None, "rows": sum(counts) if counts else None,
              "duration_ms": round(duration_s * 1000, 3), "outcome": outcome}
    if len(parsed) > 1:
        record["commands"] = [tag for tag, _ in parsed]
    if sqlstate:
        record["sqlstate"] = sqlstate
    if verdict is not None:
        record["classes"], record["relations"] = list(verdict.classes), list(verdict.relations)
    if params is not None and cfg.parameters != "off":
        formats, types = info or ((), ())
        values = []
        for i, value in enumerate(params):
            if value is None or cfg.parameters == "redacted":
                values.append(None if value is None else "<redacted>")
                continue
            fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
            shown = (decode_binary(types[i] if i < len(types) else 0, value) if fmt == 1
                     else value.decode("utf-8", "replace"))
            if shown is None:  # not decoded: named, never cut
                values.append(f"<binary {len(value)} bytes>")
            else:
                values.append(shown if len(shown) <= cfg.max_parameter_length
                              else shown[:cfg.max_parameter_length] + "…")
        record["parameters"] = values
    return json.dumps(record, ensure_ascii=False)


def _cases(rng: random.Random):
    texts = ["SELECT abalance FROM pgbench_accounts WHERE aid = $1", "SELECT 'a \"quoted\" \\ back\nslash'",
             "SELECT 'grüße, 日本, \u2028, \x01, 🐘'", "x" * 40, "", "BEGIN", "SELECT $1, $2, $3"]
    tag_sets = [[b"SELECT 1"], [b"SELECT 1\0"], [], [b"INSERT 0 3", b"UPDATE 2", b"COMMIT"], [b"BEGIN"],
                [b"SET"], [b"SELECT 12345"], [b"CREATE TABLE", b"SELECT 0"]]
    params = [None, [], [None], [b"48213"], [b"a\"b\\c\n\xff\xfe"], [b"abc", struct.pack("!i", 7), None],
              [b"x" * 300], [struct.pack("!q", -5)]]
    infos = [None, ((0,), (23,)), ((1,), (20,)), ([0, 1, 0], (25, 23, 25)), ((), ()), ((1, 0), (23,))]
    durations = [0.0, 0.000187, 0.0005, 0.0000004999, 0.0000005, 1.2345, 0.001, 12345.6789, 2.0, 1e-9,
                 0.1 + 0.2, 5e5]
    verdicts = [None, Verdict(classes=("SELECT",), relations=("public.pgbench_accounts",)),
                Verdict(classes=("DML", "SELECT"), relations=("ä.t", "s.\"q\""))]
    session = {"session": "3f2a9c1e", "user": "alice@example.com", "role": "app \"sales\"", "auth_method": "jwt",
               "application_name": "pgbench ü"}
    for _ in range(400):
        p = rng.choice(params)
        yield (session, rng.uniform(1.7e9, 1.8e9) if rng.random() < 0.8 else float(rng.randrange(10**9)),
               rng.choice(texts), p, rng.choice(infos) if p else None, rng.choice(tag_sets), rng.choice(durations),
               rng.choice(["ok", "error", "connection_lost"]), rng.choice([None, "", "23505", "57014"]),
               rng.choice([None, 4242]), rng.choice(verdicts))


@pytest.mark.parametrize("options", [{}, {"parameters": "redacted"}, {"parameters": "off"},
                                     {"max_statement_length": 10, "max_parameter_length": 3}])
def test_statement_lines_are_byte_for_byte_what_json_dumps_gives(tmp_path, options):
    cfg = AuditSection(file=str(tmp_path / "a.jsonl"), **options)
    log = AuditLog(cfg)
    expected = []
    for session, started, text, params, info, tags, duration, outcome, sqlstate, pid, verdict in \
            _cases(random.Random(7)):
        log.statement(AuditLog.session_prefix(session), text, params, info, tags, started, duration, outcome,
                      sqlstate, pid, verdict)  # texts and tags repeat: most come from the caches
        expected.append(_reference_line(cfg, session, started, text, params, info, tags, duration, outcome,
                                        sqlstate, pid, verdict))
    log.close()
    lines = (tmp_path / "a.jsonl").read_bytes().decode().split("\n")  # not splitlines(): U+2028 is in a text
    got = [line[:line.rindex(', "writer": "')] + "}" for line in lines if '"event": "statement"' in line]
    assert got == expected
    assert verify([str(tmp_path / "a.jsonl")]).problems == []


def test_duration_is_rendered_as_repr_of_the_rounded_milliseconds():
    rng = random.Random(11)
    values = [0.0, -0.0, 5e-7, 4.999999e-7, 1.5e-6, 2.5e-6, 0.0010005, 999999.9999995, 1e6 - 1e-9, 1e6, 1e7,
              -0.001, float("inf"), float("nan")]
    values += [rng.uniform(0, 10 ** rng.randrange(-6, 7)) for _ in range(50_000)]
    values += [round(rng.uniform(0, 100), 6) for _ in range(10_000)]  # ties at the fourth decimal
    assert [_ms(v) for v in values] == [repr(round(v * 1000, 3)) for v in values]


def test_a_reload_that_shortens_statements_applies_to_texts_already_seen(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(AuditSection(file=str(path)))
    prefix = AuditLog.session_prefix(SESSION)
    text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    log.statement(prefix, text, [b"1"], None, [b"SELECT 1"], 1.0, 0.001, "ok", None, 1)
    log.reconfigure(AuditSection(file=str(path), max_statement_length=6))
    log.statement(prefix, text, [b"2"], None, [b"SELECT 1"], 1.0, 0.001, "ok", None, 1)
    log.close()
    assert [r["statement"] for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "statement"] \
        == [text, "SELECT…"]


def test_the_caches_of_texts_and_tags_stay_bounded(tmp_path):
    log = AuditLog(AuditSection(file=str(tmp_path / "a.jsonl"), queue_size=10_000_000))
    prefix = AuditLog.session_prefix(SESSION)
    for i in range(3 * _CACHE_ENTRIES):
        log.statement(prefix, f"SELECT {i}, $1", [b"1"], None, [f"SELECT {i}".encode()], 1.0, 0.001, "ok", None, 1)
    log.statement(prefix, "SELECT " + "x" * (_CACHE_TEXT_LENGTH + 1), [], None, [b"SELECT 1"], 1.0, 0.001, "ok",
                  None, 1)
    log.close()
    assert 0 < len(log._renderer._texts) <= _CACHE_ENTRIES and 0 < len(log._renderer._tags) <= _CACHE_ENTRIES
    assert not any(len(text) > _CACHE_TEXT_LENGTH for text in log._renderer._texts)
    assert verify([str(tmp_path / "a.jsonl")]).problems == []
