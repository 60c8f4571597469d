"""One parse per new statement text, shared by the guard and the session-state check.

Both read the same text when a statement is new (policy/guard.py ``classify`` and
policy/session_state.py ``session_effects``, each with its own cache of decisions). The
parse (``parse_sql_json``, then json.loads) is the costly part; the few texts parsed last
are kept so the second reader of a new text does not parse it again.
"""

from __future__ import annotations

import json
import re

from pglast.parser import ParseError, parse_sql_json

RECENT = 64  # texts kept; decisions are cached by their readers, this only bridges the two

_recent: dict[str, list | Exception] = {}
_last: list = [(None, None)]  # (the text literal_shape saw last, its shape): one slot, replaced whole
_STRING = re.compile(r"'(?:[^']|'')*'")
# A number literal as PostgreSQL's lexer sees one: ASCII digits (a decimal part optional)
# with no name character on either side. Names go on with letters, digits, "_", "$" and
# every non-ASCII character, so "€1" and "t·2" are names, not literals, though Python's \b
# would find a boundary there (and its \d takes "٣" for a digit): a shape must never merge
# two names. NUMBER_LITERAL says that plainly; the pattern used says the same in a form
# the regex engine runs in 40 % of the instructions (callgrind: 6,850 per pgbench statement
# against 16,400 for r"\b\d+(?:\.\d+)?\b"): it starts with a digit, so the engine jumps from
# digit to digit instead of testing a boundary at every character, and it names the ASCII
# characters that end a name instead of those that continue one.
# tests/unit/test_parsed.py holds the two to the same matches.
_NAME_CHARACTER = "A-Za-z0-9_$\x80-\U0010ffff"
_NOT_NAME = r"\x00-#%-/:-@\[-^`{-\x7f"  # ASCII less [0-9A-Za-z_$]
NUMBER_LITERAL = rf"(?<![{_NAME_CHARACTER}])[0-9]+(?:\.[0-9]+)?(?![{_NAME_CHARACTER}])"
_NUMBER = re.compile(rf"[0-9](?:(?<=[{_NOT_NAME}][0-9])|(?<=^[0-9]))[0-9]*(?:\.[0-9]+)?(?:(?=[{_NOT_NAME}])|\Z)")


def literal_shape(sql: str) -> str | None:
    """The text with string and number literals blanked, when that is sound: no dollar
    quoting, backslashes, comments, quoted identifiers or Unicode escapes, which could
    hide where a literal starts or ends. Decisions that do not depend on literals are
    cached by it (the guard's, and the session-state check's for plain DML)."""
    if "$" in sql or "\\" in sql or '"' in sql or "--" in sql or "/*" in sql or "u&" in sql or "U&" in sql:
        shape = None  # chained "in" tests: a regex here cost 1 µs more
    else:
        shape = _NUMBER.sub("0", _STRING.sub("''", sql) if "'" in sql else sql)
    _last[0] = (sql, shape)
    return shape


def last_shape(sql: str) -> str | None:
    """``literal_shape(sql)`` if it was the last text shaped (the guard's, just before the
    session-state check reads the same text), else None: never computed here, so without
    the guard the check costs what it did."""
    text, shape = _last[0]
    return shape if text is sql else None


def statements(sql: str) -> list[dict]:
    """The statements' parse trees (``stmt`` of each), read-only; raises ParseError for text
    PostgreSQL cannot parse and ValueError if the parser's output is unreadable."""
    nodes = _recent.get(sql)
    if nodes is None:
        try:
            nodes = [s.get("stmt", {}) for s in json.loads(parse_sql_json(sql)).get("stmts", [])]
        except (ParseError, ValueError) as exc:
            nodes = exc
        if len(_recent) >= RECENT:
            _recent.clear()
        _recent[sql] = nodes
    if isinstance(nodes, Exception):
        raise nodes
    return nodes
