"""What a statement does to the *session*, for transaction pooling.

A transaction-pooled client shares backend connections; anything that outlives its
transaction (a session-level SET, LISTEN, a temporary object, SQL PREPARE, a WITH HOLD
cursor, a session-level advisory lock, LOAD) would leak to the next client, so the
client is pinned to its connection (or refused, by configuration). A few statements
are answered by the proxy itself when they are a whole simple query: ``DEALLOCATE``
and ``DISCARD ALL`` refer to the client's own prepared statements, which the proxy
renames per backend connection.

Pure: SQL text in, ``Effects`` out. Parsing uses ``parse_sql_json`` (C, a few µs) and
walks plain dicts; results are cached by text in a bounded LRU, so a driver's
repeated statements cost one dict lookup.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import NamedTuple

from pglast.parser import ParseError, parse_sql_json

from pgproxy.policy import dict_nodes

CACHE_SIZE = 20_000
CURSOR_OPT_HOLD = 0x0020  # PostgreSQL's parsenodes.h
SESSION_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared",
                           "pg_try_advisory_lock", "pg_try_advisory_lock_shared"})


class Effects(NamedTuple):
    pin: str = ""              # why the statement ties the client to its connection; "" if it does not
    local: str = ""            # answered by the proxy: "deallocate_all", "deallocate", "discard_all"
    name: str = ""             # the statement DEALLOCATE names
    stale: bool = False        # may undo settings the proxy applied (RESET ALL, SESSION AUTHORIZATION, DISCARD)
    deallocates: bool = False  # drops prepared statements on the backend (DEALLOCATE ALL, DISCARD ALL)
    copy_in: bool = False      # COPY ... FROM STDIN: the server ignores Sync until the copy ends


NOTHING = Effects()
_cache: OrderedDict[str, Effects] = OrderedDict()
# Every effect above needs one of these words in the text (SET covers RESET and set_config,
# TEMP covers TEMPORARY and pg_temp). Statements that differ only in literals (simple
# protocol) would miss the cache; this scan lets them skip the parser. A Unicode-escaped
# identifier (U&"...") could spell a name without its letters, so it is always parsed.
def _maybe(sql: str) -> bool:
    low = sql.lower()  # chained "in" tests: about 0.3 µs for a short statement, a regex 3.7 µs
    return ("set" in low or "temp" in low or "listen" in low or "prepare" in low or "hold" in low
            or "advisory" in low or "load" in low or "deallocate" in low or "discard" in low
            or "copy" in low or "u&" in low)


def session_effects(sql: str) -> Effects:
    if not _maybe(sql):
        return NOTHING
    effects = _cache.get(sql)
    if effects is not None:
        _cache.move_to_end(sql)
        return effects
    effects = _inspect(sql)
    _cache[sql] = effects
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return effects


def _inspect(sql: str) -> Effects:
    try:
        stmts = json.loads(parse_sql_json(sql)).get("stmts", [])
    except (ParseError, ValueError):
        return NOTHING  # PostgreSQL will refuse it too; nothing can outlive a syntax error
    nodes = [s.get("stmt", {}) for s in stmts]
    if len(nodes) == 1:
        local = _answered_locally(nodes[0])
        if local is not None:
            return local
    pin, stale, deallocates, copy_in = "", False, False, False
    for node in nodes:
        for kind, body in node.items():
            copy_in = copy_in or (kind == "CopyStmt" and bool(body.get("is_from")) and not body.get("filename"))
            pin = pin or _statement_pin(kind, body)
            if kind == "VariableSetStmt" and (body.get("kind") == "VAR_RESET_ALL"
                                              or body.get("name") == "session_authorization"):
                stale = True
            elif kind == "DiscardStmt":
                stale = True
                deallocates = deallocates or body.get("target") == "DISCARD_ALL"
            elif kind == "DeallocateStmt":
                deallocates = deallocates or bool(body.get("isall"))
        pin = pin or _expression_pin(node)
    return Effects(pin=pin, stale=stale, deallocates=deallocates, copy_in=copy_in)


def _answered_locally(node: dict) -> Effects | None:
    body = node.get("DeallocateStmt")
    if body is not None:
        if body.get("isall"):
            return Effects(local="deallocate_all", deallocates=True)
        return Effects(local="deallocate", name=body.get("name", ""))
    body = node.get("DiscardStmt")
    if body is not None and body.get("target") == "DISCARD_ALL":
        return Effects(local="discard_all", stale=True, deallocates=True)
    return None


def _statement_pin(kind: str, body: dict) -> str:
    if kind == "VariableSetStmt":
        if body.get("is_local") or body.get("name") == "TRANSACTION" or body.get("kind") == "VAR_RESET_ALL":
            return ""
        return "SET"
    if kind == "ListenStmt":
        return "LISTEN"
    if kind == "PrepareStmt":
        return "PREPARE"
    if kind == "LoadStmt":
        return "LOAD"
    if kind == "DeclareCursorStmt" and body.get("options", 0) & CURSOR_OPT_HOLD:
        return "WITH HOLD cursor"
    return ""


def _expression_pin(tree) -> str:
    """Temporary objects, session advisory locks and session-level set_config, anywhere."""
    for node in dict_nodes(tree):
        if node.get("relpersistence") == "t" or node.get("schemaname") == "pg_temp":
            return "temporary object"
        call = node.get("FuncCall")
        if call is not None:
            name = _function_name(call)
            if name == "pg_temp":
                return "temporary object"
            if name in SESSION_LOCKS:
                return "advisory lock"
            if name == "set_config" and not _is_true(call.get("args", [])[2:3]):
                return "set_config"
        names = node.get("funcname")
        if isinstance(names, list) and any(_sval(n) == "pg_temp" for n in names):
            return "temporary object"
    return ""


def _function_name(call: dict) -> str:
    names = [_sval(n) for n in call.get("funcname", [])]
    if "pg_temp" in names[:-1]:
        return "pg_temp"
    return names[-1] if names else ""


def _sval(node) -> str:
    return node.get("String", {}).get("sval", "") if isinstance(node, dict) else ""


def _is_true(args: list) -> bool:
    """set_config's third argument is the constant true (transaction-local)."""
    if not args:
        return False
    const = args[0].get("A_Const", {})
    if "boolval" in const:
        return bool(const["boolval"].get("boolval"))
    sval = const.get("sval", {}).get("sval")
    return isinstance(sval, str) and sval.strip().lower() in ("true", "t", "on", "yes", "1")
