"""Binary-format values read as PostgreSQL prints them: each value is encoded by PostgreSQL's
own send function and must decode to exactly its text output."""

from __future__ import annotations

import pytest

from pgproxy.protocol.binary_values import decode_binary

VALUES = [
    ("42::int2", 21), ("-7::int4", 23), ("9007199254740993::int8", 20), ("4000000000::oid", 26),
    ("1.5::float8", 701), ("'Infinity'::float8", 701), ("0.25::float4", 700),
    ("0::numeric", 1700), ("1234.5600::numeric", 1700), ("-0.001::numeric", 1700), ("100000000000000000000::numeric", 1700),
    ("123456789.000000001::numeric", 1700), ("'NaN'::numeric", 1700), ("10000::numeric", 1700), ("0.00010000::numeric", 1700),
    ("true", 16), ("false", 16), ("'héllo wörld'::text", 25), ("'abc'::varchar", 1043),
    ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", 2950), ("'\\x00ff10'::bytea", 17),
    ("'2024-02-29'::date", 1082), ("'1999-12-31'::date", 1082), ("'infinity'::date", 1082),
    ("'13:45:06.123'::time", 1083), ("'00:00:00'::time", 1083),
    ("'2024-01-02 03:04:05.123456'::timestamp", 1114), ("'1970-01-01 00:00:00'::timestamp", 1114),
    ("'2024-06-01 12:00:00+02'::timestamptz", 1184), ("'-infinity'::timestamp", 1114),
    ("'1 year 2 mons 3 days 04:05:06'::interval", 1186), ("'-00:00:01'::interval", 1186), ("'0'::interval", 1186),
    ("'{1,2,NULL}'::int4[]", 1007), ("'{\"a b\",c,\"\"}'::text[]", 1009), ("'{{1,2},{3,4}}'::int4[]", 1007),
    ("'{}'::int4[]", 1007), ("'{1.5,-2}'::numeric[]", 1231), ("'{2024-01-01}'::date[]", 1182),
]


@pytest.mark.parametrize("expression, oid", VALUES, ids=[v[0] for v in VALUES])
def test_binary_values_decode_to_postgresqls_own_text(database, expression, oid):
    out = database.psql(f"SET TimeZone = 'UTC'; SELECT encode(pg_catalog.{_send(oid)}({expression}), 'hex'), "
                        f"({expression})::text")
    hex_value, text = out.split("|", 1)
    assert decode_binary(oid, bytes.fromhex(hex_value)) == text


def _send(oid: int) -> str:
    return {21: "int2send", 23: "int4send", 20: "int8send", 26: "oidsend", 701: "float8send", 700: "float4send",
            1700: "numeric_send", 16: "boolsend", 25: "textsend", 1043: "varcharsend", 2950: "uuid_send",
            17: "byteasend", 1082: "date_send", 1083: "time_send", 1114: "timestamp_send", 1184: "timestamptz_send",
            1186: "interval_send"}.get(oid, "array_send")


def test_malformed_values_are_not_decoded():
    assert decode_binary(1700, b"\x00\x01") is None
    assert decode_binary(23, b"\x00") is None
    assert decode_binary(1007, b"\x00\x00\x00\x07" + b"\x00" * 8) is None
    assert decode_binary(9999, b"anything") is None
