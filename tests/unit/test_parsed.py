"""literal_shape (policy/parsed.py): the key the guard's and the session-state check's
decisions are cached by. Two statements that differ in more than their literals must never
share a shape, so its fast number pattern is held to the plain definition here."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.policy import parsed
from pgproxy.policy.parsed import NUMBER_LITERAL, literal_shape

_REFERENCE_NUMBER = re.compile(NUMBER_LITERAL)
_REFERENCE_STRING = re.compile(r"'(?:[^']|'')*'")

# Name characters (ASCII, "$", a non-ASCII letter, and non-ASCII characters that are no
# letters to Python but continue a name in PostgreSQL: "€", "·"), Unicode digits
# (Arabic-Indic three, superscript two), decimal points, quotes, operators and white space:
# where a literal's boundary is decided.
SQL_CHARACTERS = st.sampled_from(list("ab_Z$0129.٣²é€· 'x-+=,;()\n\t#%/:@[^`{~\x7f\x00"))


def reference_shape(sql: str) -> str | None:
    if literal_shape(sql) is None:
        return None  # the refusal part (comments, quoting) is the same code: not what is tested
    return _REFERENCE_NUMBER.sub("0", _REFERENCE_STRING.sub("''", sql))


@settings(max_examples=3000)
@given(st.text(SQL_CHARACTERS, max_size=40))
def test_the_number_pattern_matches_exactly_what_the_plain_one_does(text):
    assert [m.span() for m in parsed._NUMBER.finditer(text)] == \
        [m.span() for m in _REFERENCE_NUMBER.finditer(text)]


@settings(max_examples=3000)
@given(st.text(SQL_CHARACTERS, max_size=60))
def test_the_shape_is_the_plain_definitions(sql):
    assert literal_shape(sql) == reference_shape(sql)


def test_literals_are_blanked_and_names_with_digits_are_kept():
    assert literal_shape("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;") == \
        "SELECT abalance FROM pgbench_accounts WHERE aid = 0;"
    assert literal_shape("SELECT t1.c2 FROM t1 WHERE x = 1.5 AND y = 'it''s'") == \
        "SELECT t1.c2 FROM t1 WHERE x = 0 AND y = ''"
    assert literal_shape("SELECT 7") == "SELECT 0"
    assert literal_shape("SELECT a FROM t WHERE b = 12abc") == "SELECT a FROM t WHERE b = 12abc"
    assert literal_shape("SELECT t1 FROM t2") != literal_shape("SELECT t1 FROM t3")
    # names to PostgreSQL, though Python's \b and \d would see a number in them
    for name in ("€1", "t·2", "٣", "x١٢", "5€"):
        assert literal_shape(f"SELECT * FROM {name}") == f"SELECT * FROM {name}", name


def test_text_that_could_hide_a_literals_end_has_no_shape():
    for sql in ("SELECT $$1$$", "SELECT 'a\\'", 'SELECT "1"', "SELECT 1 -- 2", "SELECT 1 /* 2 */", "SELECT U&'1'"):
        assert literal_shape(sql) is None, sql
