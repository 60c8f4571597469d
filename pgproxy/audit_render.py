"""A statement's audit record as JSON text: the part of the trail paid for per statement.

Pure and compiled (pgproxy/compiled.py; audit_render.pxd types it): ``AuditLog`` keeps a
statement's fields when it ends and hands them here in batches (pgproxy/audit.py says
when). ``StatementRenderer.render`` returns the record's JSON object without its closing
brace — the chain members follow (``AuditLog._put``).

No json.dumps: the line is one f-string of C-escaped pieces (``_json_str`` is the json
module's C escaper), and what a session repeats is escaped once — its members (the
session prefix, rendered at login), a prepared statement's text, a command tag, a guard
verdict. The bytes are exactly json.dumps' with ``ensure_ascii=False`` and the members in
this order (tests/unit/test_audit_render.py compares them).

Why its own module: compiled with C types for its locals, the caches and the options, a
record costs about half what the same code costs as Python (``python -m
pgproxy._build --bench``: ``render``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from pgproxy.protocol.binary_values import decode_binary
from pgproxy.protocol.messages import parse_command_tag

CACHE_ENTRIES = 1024       # statement texts and command tags rendered once (each cache; cleared when full)
CACHE_TEXT_LENGTH = 2048   # longer texts are escaped each time (bounds the text cache to a few MB)

_json_str = json.encoder.py_encode_basestring if json.encoder.c_encode_basestring is None \
    else json.encoder.c_encode_basestring
_verdict_cache: dict = {}
# The UTC second last formatted, and its text up to the second (``iso``).
_second = -1
_second_text = ""


class StatementRenderer:
    """Renders statement records under one [audit] section's options; a reload makes a
    new one (its caches hold texts cut to the old ``max_statement_length``)."""

    __slots__ = ("_texts", "_tags", "_statement_limit", "_parameter_limit", "_parameters")

    def __init__(self, max_statement_length: int, max_parameter_length: int, parameters: str) -> None:
        self._texts: dict = {}  # prepared statement text -> its JSON string
        self._tags: dict = {}   # CommandComplete body -> '"command": ..., "rows": ...'
        self._statement_limit = max_statement_length
        self._parameter_limit = max_parameter_length
        self._parameters = parameters  # "full" | "redacted" | "off"

    def render(self, record: tuple) -> str:
        """``record``: (started, session_prefix, text, params, param_info, raw_tags,
        duration_s, outcome, sqlstate, backend_pid, verdict), as AuditLog.statement kept it."""
        started, prefix, text, params, param_info, raw_tags, duration_s, outcome, sqlstate, pid, verdict = record
        if params is not None:  # the extended protocol: a prepared text, again and again
            statement = self._texts.get(text)
            if statement is None:
                statement = self._cache_text(text)
        else:  # the simple protocol's literals differ every time: a cache would only miss
            statement = self._text_json(text)
        extra = ""
        if len(raw_tags) == 1:
            raw = raw_tags[0]
            command = self._tags.get(raw) if type(raw) is bytes else None
            if command is None:
                command = self._cache_tag(raw)
        else:  # none (it failed, or was cut short), or a multi-statement query
            command, extra = commands(raw_tags)
        if sqlstate:
            extra += f', "sqlstate": {_json_str(sqlstate)}'
        if verdict is not None:
            extra += verdict_members(verdict)
        if params is not None and self._parameters != "off":
            extra += ', "parameters": ' + self._params_json(params, param_info)
        return (f'{{"ts": "{iso(started)}", "event": "statement", {prefix}, '
                f'"backend_pid": {"null" if pid is None else pid}, "statement": {statement}, {command}, '
                f'"duration_ms": {ms(duration_s)}, "outcome": "{outcome}"{extra}')

    def _text_json(self, text: str) -> str:
        if len(text) <= self._statement_limit:
            return _json_str(text)
        return _json_str(text[:self._statement_limit] + "…")

    def _cache_text(self, text: str) -> str:
        rendered = self._text_json(text)
        if len(text) <= CACHE_TEXT_LENGTH:
            if len(self._texts) >= CACHE_ENTRIES:
                self._texts.clear()
            self._texts[text] = rendered
        return rendered

    def _cache_tag(self, raw) -> str:
        tag, count = parse_command_tag(bytes(raw))
        rendered = f'"command": {_json_str(tag)}, "rows": {"null" if count is None else count}'
        if type(raw) is bytes and len(raw) <= 64:  # (a bytearray cannot be a key)
            if len(self._tags) >= CACHE_ENTRIES:
                self._tags.clear()
            self._tags[raw] = rendered
        return rendered

    def _params_json(self, params: list, param_info) -> str:
        """json.dumps(ensure_ascii=False) of the rendered values, from C-escaped strings."""
        if len(params) == 1:
            value = params[0]
            return "[null]" if value is None else f"[{_json_str(self._param(0, value, param_info))}]"
        return "[" + ", ".join(["null" if value is None else _json_str(self._param(i, value, param_info))
                                for i, value in enumerate(params)]) + "]"

    def _param(self, index: int, value, formats_and_types) -> str:
        if self._parameters == "redacted":
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
        if len(text) <= self._parameter_limit:
            return text
        return text[:self._parameter_limit] + "…"


def verdict_members(verdict) -> str:
    """', "classes": [...], "relations": [...]' for a guard verdict, rendered once per verdict."""
    members = _verdict_cache.get(verdict)
    if members is None:
        members = (f', "classes": {json.dumps(list(verdict.classes))}, '
                   f'"relations": {json.dumps(list(verdict.relations), ensure_ascii=False)}')
        if len(_verdict_cache) > 10_000:
            _verdict_cache.clear()
        _verdict_cache[verdict] = members
    return members


def iso(ts: float) -> str:
    """UTC ISO-8601 with microseconds; the part up to the second is formatted once a second."""
    global _second, _second_text
    second = int(ts)
    if second != _second:
        _second_text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = second
    micro = int((ts - second) * 1_000_000)  # truncated, as "%d" of the float did
    return f"{_second_text}.{micro:06d}+00:00"


def ms(seconds: float) -> str:
    """``repr(round(seconds * 1000, 3))`` (what json.dumps writes), without float repr's cost.

    Below 1e9 ms the value has at most 12 significant digits, so the shortest repr of the
    rounded float is the correctly rounded decimal "%.3f" gives, less trailing zeros."""
    value = seconds * 1000
    if not 0.0 <= value < 1e9:  # negative, huge, nan: as before
        return repr(round(value, 3))
    text = ("%.3f" % value).rstrip("0")
    return text + "0" if text[-1] == "." else text


def commands(raw_tags: list) -> tuple:
    """The command and rows members for no tag or several, and the commands member after the outcome."""
    tags, rows = [], None
    for raw in raw_tags:
        tag, count = parse_command_tag(bytes(raw))
        tags.append(tag)
        if count is not None:
            rows = (rows or 0) + count
    command = f'"command": {_json_str(tags[-1]) if tags else "null"}, "rows": {"null" if rows is None else rows}'
    return command, f', "commands": {json.dumps(tags, ensure_ascii=False)}' if len(tags) > 1 else ""
