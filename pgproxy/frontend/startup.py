"""Which client startup parameters reach PostgreSQL, and how SQL for the identity is built.

Pure functions. A client may not choose its role or identity: ``role``,
``session_authorization``, ``replication`` and anything in the ``pgproxy.`` namespace
are refused, whether given directly or inside ``options`` (``-c role=x``,
``--role=x``). Ordinary settings (DateStyle, TimeZone, search_path, ...) pass.
"""

from __future__ import annotations

from pgproxy.errors import forbidden_parameter, protocol_violation, unsupported

IDENTITY_NAMESPACE = "pgproxy."
FORBIDDEN = {"role", "session_authorization", "replication", "is_superuser"}
NOT_SETTINGS = {"user", "database"}  # startup keys that are not run-time settings
MAX_SETTINGS = 64


def client_settings(params: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(settings to apply on the backend, unknown protocol options to report)."""
    settings: dict[str, str] = {}
    protocol_options: list[str] = []
    for key, value in params.items():
        name = key.lower()
        if name in NOT_SETTINGS:
            continue
        if name.startswith("_pq_."):
            protocol_options.append(key)
            continue
        if name == "options":
            for opt_name, opt_value in parse_options(value).items():
                _check(opt_name)
                settings[opt_name] = opt_value
            continue
        _check(name)
        settings[name] = value
    if len(settings) > MAX_SETTINGS:
        raise protocol_violation("too many startup parameters")
    return settings, protocol_options


def _check(name: str) -> None:
    if name in FORBIDDEN or name.startswith(IDENTITY_NAMESPACE) or not name:
        raise forbidden_parameter(name)


def parse_options(options: str) -> dict[str, str]:
    """Parse the ``options`` startup parameter the way PostgreSQL does (``-c k=v``, ``--k=v``;
    a backslash escapes the next character)."""
    words = _split_words(options)
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            if i + 1 >= len(words):
                raise unsupported("-c without a setting in options")
            pair, i = words[i + 1], i + 2
        elif word.startswith("-c"):
            pair, i = word[2:], i + 1
        elif word.startswith("--"):
            pair, i = word[2:], i + 1
        else:
            raise unsupported(f"option {word!r} (only -c name=value is supported)")
        name, sep, value = pair.partition("=")
        if not sep:
            raise unsupported(f"option {pair!r} has no value")
        out[name.replace("-", "_").lower()] = value
    return out


def _split_words(text: str) -> list[str]:
    words, current, escaped, has_word = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
            has_word = True
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if has_word:
                words.append("".join(current))
                current, has_word = [], False
        else:
            current.append(ch)
            has_word = True
    if has_word:
        words.append("".join(current))
    return words


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    # E'' form: correct whatever standard_conforming_strings says.
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def text_array(items) -> str:
    """A PostgreSQL array literal ({"a","b"}) that policies can cast with ::text[]."""
    return "{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "}"


SWITCH_NONCE = "pgproxy.switch"


def session_settings(client: dict[str, str], identity: dict[str, str]) -> dict[str, str]:
    """Everything a backend connection must carry for one client: the identity settings win
    over a client setting of the same name (application_name)."""
    return {**client, **identity}


def switch_sql(role: str, settings: dict[str, str], *, deallocate: bool, nonce: int) -> str:
    """One simple query that makes a backend connection someone's: their role, only their
    settings (RESET ALL drops the previous client's), their identity settings, and a nonce
    that a guard statement checks before any of the client's statements may run.

    A multi-statement query runs as one implicit transaction: it applies whole or not at all.
    ``deallocate``: the connection served another person, whose prepared statements go.
    """
    calls = [f"set_config({quote_literal(k)}, {quote_literal(v)}, false)" for k, v in settings.items()]
    calls.append(f"set_config('{SWITCH_NONCE}', '{nonce}', false)")
    drop = "DEALLOCATE ALL; " if deallocate else ""
    return f"SET ROLE {quote_ident(role)}; RESET ALL; {drop}SELECT {', '.join(calls)}"


def guard_sql(nonce: int) -> str:
    """Fails (division by zero) unless the switch carrying ``nonce`` took effect."""
    return f"SELECT 1/coalesce((current_setting('{SWITCH_NONCE}', true) = '{nonce}')::int, 0)"
