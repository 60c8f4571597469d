"""The identity switch as protocol messages: what makes a backend connection someone's.

Pure. No client-controlled text is ever SQL here: every statement is a constant, pure
ASCII text, and every value (role, settings, the nonce) travels as a bound parameter.
ASCII cannot be misread in any client encoding (in GBK, SJIS, BIG5 … a byte below 0x80
is never part of a multibyte character), so what the connection's current
``client_encoding`` is does not matter to the statement; parameters are converted by
PostgreSQL as data, never parsed as SQL.

A switch is, in order, sent without waiting:

    reset    DISCARD ALL (another person: drops temporary objects, prepared statements,
             portals, LISTEN, advisory locks, sequence state, settings and role), or
             RESET ALL (the same person with other settings); omitted at login
    apply    SELECT set_config('role', $1, false), set_config($2, $3, false), …
             (one statement: it applies whole or not at all), including the nonce
    Sync     commits the apply on its own, so no client ROLLBACK can undo it
    guard    SELECT 1/… fails unless the nonce is in place

The guard runs in the client's own batch, before its first message: if the switch
failed, PostgreSQL then skips the client's messages up to their Sync. The nonce is
random per switch, so no earlier session can have planted it.
"""

from __future__ import annotations

import secrets

from pgproxy.protocol import messages as msg
from pgproxy.protocol.pipeline import BIND, EXECUTE, PARSE

NONCE_SETTING = "pgproxy.switch"
DISCARD = "DISCARD ALL"
RESET = "RESET ALL"
_RESETS = {DISCARD: msg.parse_message("", DISCARD) + msg.bind_message("", "") + msg.execute_message(),
           RESET: msg.parse_message("", RESET) + msg.bind_message("", "") + msg.execute_message()}
GUARD_SQL = "SELECT 1/coalesce((pg_catalog.current_setting('pgproxy.switch', true) = $1)::int, 0)"
_apply_texts: dict[int, str] = {}


def new_nonce() -> str:
    return secrets.token_hex(8)


def apply_text(pairs: int) -> str:
    """``SELECT set_config('role', $1, false), set_config($2, $3, false), …`` for ``pairs`` settings."""
    text = _apply_texts.get(pairs)
    if text is None:
        calls = ["pg_catalog.set_config('role', $1, false)"]
        calls += [f"pg_catalog.set_config(${2 * i + 2}, ${2 * i + 3}, false)" for i in range(pairs)]
        text = _apply_texts[pairs] = "SELECT " + ", ".join(calls)
    return text


def reset_messages(reset: str) -> bytes:
    """Parse/Bind/Execute of DISCARD ALL or RESET ALL."""
    return _RESETS[reset]


def apply_messages(role: str, settings: dict[str, str], nonce: str) -> bytes:
    """Parse/Bind/Execute of the statement that sets the role, the settings and the nonce.
    ``client_encoding`` comes last among the settings: the values are bound as UTF-8,
    which the connection speaks until then (RESET ALL and DISCARD ALL restore it)."""
    # standard_conforming_strings first: RESET ALL restores role and database defaults, and
    # with it off the proxy would read strings differently from PostgreSQL (session_state.py).
    items = [("standard_conforming_strings", "on")]
    items += sorted(((k, v) for k, v in settings.items() if k.lower() != "standard_conforming_strings"),
                    key=lambda kv: kv[0].lower() == "client_encoding")
    values: list[str] = [role]
    for name, value in items:
        values += (name, value)
    values += (NONCE_SETTING, nonce)
    return (msg.parse_message("", apply_text(len(items) + 1))
            + msg.bind_message("", "", [v.encode() for v in values]) + msg.execute_message())


# The replies a switch earns before its Sync (reset, apply) and after it (the guard).
SWITCH_REPLIES = (PARSE, BIND, EXECUTE, PARSE, BIND, EXECUTE)
GUARD_REPLIES = (PARSE, BIND)  # and the guard's EXECUTE, which confirms the switch


def switch_messages(reset: str, role: str, settings: dict[str, str], nonce: str) -> bytes:
    """The whole switch: reset, apply, Sync, guard — the one implementation, used at login
    (followed by a Sync and waited for) and in front of a client's messages."""
    return reset_messages(reset) + apply_messages(role, settings, nonce) + msg.SYNC + guard_messages(nonce)


def guard_messages(nonce: str) -> bytes:
    """Parse/Bind/Execute of the guard: fails (division by zero) unless ``nonce`` is in place."""
    return msg.parse_message("", GUARD_SQL) + msg.bind_message("", "", [nonce.encode()]) + msg.execute_message()
