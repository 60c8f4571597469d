"""Readable text for binary-format values of common types (for the audit's parameters).

Pure. Drivers such as asyncpg send parameters in binary; PostgreSQL's ParameterDescription
(or the Parse) tells their types. ``decode_binary`` returns the text PostgreSQL itself
would print for integers, floats, numeric, bool, text types, uuid, bytea (hex), json/jsonb,
date, time, timestamp(tz), interval and one-dimensional or nested arrays of these — or
None for anything else, or for a value that does not parse (it is then marked binary).
"""

from __future__ import annotations

import struct
import uuid
from datetime import date, datetime, timedelta

_INTS = {21: struct.Struct("!h"), 23: struct.Struct("!i"), 20: struct.Struct("!q"), 26: struct.Struct("!I")}
_FLOATS = {700: struct.Struct("!f"), 701: struct.Struct("!d")}
_TEXT = frozenset({25, 1043, 19, 705, 114, 1042, 18})
_EPOCH_DATE = date(2000, 1, 1)
_EPOCH = datetime(2000, 1, 1)
_I64_MAX, _I64_MIN = (1 << 63) - 1, -(1 << 63)
_I32_MAX, _I32_MIN = (1 << 31) - 1, -(1 << 31)
# array type -> element type
ARRAY_ELEMENTS = {1005: 21, 1007: 23, 1016: 20, 1028: 26, 1021: 700, 1022: 701, 1231: 1700, 1000: 16, 1009: 25,
                  1015: 1043, 1003: 19, 1014: 1042, 2951: 2950, 1001: 17, 199: 114, 3807: 3802, 1182: 1082,
                  1183: 1083, 1115: 1114, 1185: 1184, 1187: 1186}
MAX_ARRAY_ELEMENTS = 10_000


def decode_binary(oid: int, value: bytes) -> str | None:
    try:
        return _decode(oid, value, 0)
    except (struct.error, ValueError, OverflowError, IndexError):
        return None


def _decode(oid: int, value: bytes, depth: int) -> str | None:
    if oid in _INTS:
        return str(_INTS[oid].unpack(value)[0])
    if oid in _FLOATS:
        number = _FLOATS[oid].unpack(value)[0]
        return {float("inf"): "Infinity", float("-inf"): "-Infinity"}.get(number, "NaN" if number != number
                                                                         else repr(number))
    if oid == 16 and len(value) == 1:
        return "true" if value[0] else "false"
    if oid in _TEXT:
        return value.decode("utf-8", "replace")
    if oid == 3802 and value[:1] == b"\x01":  # jsonb: a version byte, then text
        return value[1:].decode("utf-8", "replace")
    if oid == 2950 and len(value) == 16:
        return str(uuid.UUID(bytes=value))
    if oid == 17:
        return "\\x" + value.hex()
    if oid == 1700:
        return _numeric(value)
    if oid == 1082:
        days = struct.unpack("!i", value)[0]
        if days in (_I32_MAX, _I32_MIN):
            return "infinity" if days > 0 else "-infinity"
        return (_EPOCH_DATE + timedelta(days=days)).isoformat()
    if oid == 1083:
        micros = struct.unpack("!q", value)[0]
        return _clock(micros)
    if oid in (1114, 1184):
        micros = struct.unpack("!q", value)[0]
        if micros in (_I64_MAX, _I64_MIN):
            return "infinity" if micros > 0 else "-infinity"
        moment = _EPOCH + timedelta(microseconds=micros)
        text = f"{moment.date().isoformat()} {_clock(micros % 86_400_000_000)}"
        return text + "+00" if oid == 1184 else text
    if oid == 1186:
        micros, days, months = struct.unpack("!qii", value)
        return _interval(micros, days, months)
    if oid in ARRAY_ELEMENTS and depth == 0:
        return _array(value, ARRAY_ELEMENTS[oid])
    return None


def _clock(micros: int) -> str:
    seconds, fraction = divmod(micros, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return text + (f".{fraction:06d}".rstrip("0") if fraction else "")


def _interval(micros: int, days: int, months: int) -> str:
    parts = []
    years, months = divmod(months, 12) if months >= 0 else (-(-months // 12), -(-months % 12))
    for count, unit in ((years, "year"), (months, "mon"), (days, "day")):
        if count:
            parts.append(f"{count} {unit}{'s' if abs(count) != 1 else ''}")
    if micros or not parts:
        sign = "-" if micros < 0 else ""
        parts.append(sign + _clock(abs(micros)))
    return " ".join(parts)


def _numeric(value: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", value)
    if sign == 0xC000:
        return "NaN"
    if sign == 0xD000:
        return "Infinity"
    if sign == 0xF000:
        return "-Infinity"
    digits = struct.unpack_from(f"!{ndigits}h", value, 8)
    if len(value) != 8 + 2 * ndigits or any(not 0 <= d < 10000 for d in digits):
        raise ValueError("malformed numeric")
    whole = "".join(f"{d:04d}" for d in digits[:max(weight + 1, 0)]) or "0"
    if weight + 1 > ndigits:
        whole += "0000" * (weight + 1 - ndigits)
    whole = whole.lstrip("0") or "0"
    fraction = "0000" * max(-weight - 1, 0) + "".join(f"{d:04d}" for d in digits[max(weight + 1, 0):])
    fraction = (fraction + "0" * dscale)[:dscale]
    text = whole + ("." + fraction if dscale else "")
    return "-" + text if sign == 0x4000 else text


def _array(value: bytes, element: int) -> str | None:
    ndim, _flags, element_oid = struct.unpack_from("!iii", value)
    if ndim == 0:
        return "{}"
    if not 0 < ndim <= 6:
        raise ValueError("bad dimensions")
    dims = [struct.unpack_from("!ii", value, 12 + 8 * i)[0] for i in range(ndim)]
    total = 1
    for size in dims:
        total *= size
    if total > MAX_ARRAY_ELEMENTS or total < 0:
        return None
    pos = 12 + 8 * ndim
    items: list[str] = []
    for _ in range(total):
        length = struct.unpack_from("!i", value, pos)[0]
        pos += 4
        if length == -1:
            items.append("NULL")
            continue
        text = _decode(element_oid or element, value[pos:pos + length], 1)
        if text is None:
            return None
        pos += length
        items.append(_array_item(text))
    if pos != len(value):
        raise ValueError("trailing bytes")
    return _nest(items, dims)


def _array_item(text: str) -> str:
    if text == "" or text.upper() == "NULL" or any(c in text for c in '{},"\\ \t\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _nest(items: list[str], dims: list[int]) -> str:
    if len(dims) == 1:
        return "{" + ",".join(items) + "}"
    step = len(items) // dims[0] if dims[0] else 0
    return "{" + ",".join(_nest(items[i * step:(i + 1) * step], dims[1:]) for i in range(dims[0])) + "}"
