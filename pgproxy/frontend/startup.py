"""Which client startup parameters reach PostgreSQL, and the identity settings' values.

Pure functions. A client may not choose its role or identity: ``role``,
``session_authorization``, ``replication`` and anything in the ``pgproxy.`` namespace
are refused, whether given directly or inside ``options`` (``-c role=x``,
``--role=x``). Ordinary settings (DateStyle, TimeZone, search_path, ...) pass.
"""

from __future__ import annotations

from pgproxy.backend.identity import EMPTY
from pgproxy.errors import forbidden_parameter, protocol_violation, unsupported
from pgproxy.policy.session_state import client_only_encoding

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
                _check(opt_name, opt_value)
                settings[opt_name] = opt_value
            continue
        _check(name, value)
        settings[name] = value
    if len(settings) > MAX_SETTINGS:
        raise protocol_violation("too many startup parameters")
    # Most clients set nothing: they share one read-only empty mapping (memory per idle client).
    return settings or EMPTY, protocol_options


def _check(name: str, value: str) -> None:
    if name in FORBIDDEN or name.startswith(IDENTITY_NAMESPACE) or not name:
        raise forbidden_parameter(name)
    if name == "standard_conforming_strings" and value.strip().lower() not in ("on", "true", "yes", "1"):
        raise unsupported("standard_conforming_strings other than on")
    if name == "client_encoding" and client_only_encoding(value):
        # In these a character's second byte can look like a quote or backslash: what the
        # proxy reads and what PostgreSQL reads could differ (policy/session_state.py).
        raise unsupported(f"client_encoding {value} (client-only encodings are not supported; use UTF8)")


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


def session_settings(client: dict[str, str], identity: dict[str, str]) -> dict[str, str]:
    """Everything a backend connection must carry for one client: the identity settings win
    over a client setting of the same name (application_name)."""
    return {**client, **identity}
