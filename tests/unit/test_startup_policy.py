from __future__ import annotations

import pytest

from pgproxy.errors import ClientError, PgProxyError
from pgproxy.frontend.startup import (client_settings, parse_options, quote_ident, quote_literal,
                                      session_settings, text_array)


@pytest.mark.parametrize("params", [
    {"role": "x"}, {"ROLE": "x"}, {"session_authorization": "x"}, {"replication": "database"},
    {"pgproxy.user": "bob"}, {"PGPROXY.groups": "{admins}"},
    {"options": "-c role=x"}, {"options": "-crole=x"}, {"options": "--role=x"}, {"options": "-c Role=x"},
    {"options": "-c geqo=off  -c session_authorization=postgres"}, {"options": "--session-authorization=postgres"},
    {"options": "-c pgproxy.user=bob"}, {"options": r"-c search_path=a\ b -c pgproxy.groups=x"},
])
def test_identity_parameters_are_refused_however_spelled(params):
    with pytest.raises(ClientError) as info:
        client_settings({"user": "alice", **params})
    assert info.value.sqlstate == "42501" and info.value.fatal


def test_ordinary_parameters_pass_and_protocol_options_are_reported():
    settings, pq = client_settings({"user": "a", "database": "d", "application_name": "psql", "DateStyle": "ISO",
                                    "options": r"-c search_path=my\ schema --statement-timeout=5s", "_pq_.x": "1"})
    assert settings == {"application_name": "psql", "datestyle": "ISO", "search_path": "my schema",
                        "statement_timeout": "5s"}
    assert pq == ["_pq_.x"]


@pytest.mark.parametrize("options", ["-B 100", "-c", "-c noequals"])
def test_unsupported_options_are_refused(options):
    with pytest.raises(ClientError) as info:
        parse_options(options)
    assert info.value.sqlstate == "0A000"


def test_quoting_cannot_be_escaped():
    assert quote_ident('a"; DROP TABLE x; --') == '"a""; DROP TABLE x; --"'
    assert quote_literal("it's \\'") == "E'it''s \\\\'''"
    assert text_array(['a"b', "c\\d", "e,f"]) == '{"a\\"b","c\\\\d","e,f"}'


def test_identity_settings_win_over_client_settings():
    settings = session_settings({"application_name": "spoof", "TimeZone": "UTC"}, {"application_name": "alice via x"})
    assert settings == {"application_name": "alice via x", "TimeZone": "UTC"}


def test_client_only_encodings_are_refused_at_startup():
    for value in ("SJIS", "gbk", "BIG5", "Shift_JIS", "win-936", "GB18030"):
        with pytest.raises(PgProxyError) as refused:
            client_settings({"user": "a", "client_encoding": value})
        assert refused.value.sqlstate == "0A000"
        with pytest.raises(PgProxyError):
            client_settings({"user": "a", "options": f"-c client_encoding={value}"})
    assert client_settings({"user": "a", "client_encoding": "UTF8"})[0] == {"client_encoding": "UTF8"}
