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
repeated statements cost one dict lookup, and plain DML with no function call also by its
literal shape (policy/parsed.py), so new literals in the same statement cost no parse.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from pglast.parser import ParseError

from pgproxy.policy import dict_nodes
from pgproxy.policy.parsed import last_shape, literal_shape, statements

CACHE_SIZE = 20_000
CURSOR_OPT_HOLD = 0x0020  # PostgreSQL's parsenodes.h
SESSION_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared",
                           "pg_try_advisory_lock", "pg_try_advisory_lock_shared"})


class Effects(NamedTuple):
    pin: str = ""              # why the statement ties the client to its connection; "" if it does not
    local: str = ""            # answered by the proxy: "deallocate_all", "deallocate", "discard_all"
    name: str = ""             # the statement DEALLOCATE names
    reset: str = ""            # undoes the identity the proxy applied: "DISCARD ALL", "RESET ALL" or
    #                            "SESSION AUTHORIZATION"; the proxy re-applies it at once
    alone: bool = True         # the text is one statement
    deallocates: bool = False  # drops prepared statements on the backend (DEALLOCATE ALL, DISCARD ALL)
    copy_in: bool = False      # COPY ... FROM STDIN: the server ignores Sync until the copy ends
    refusal: str = ""          # why no client may run it through pgproxy (an encoding it cannot read, …)
    settings: tuple = ()       # session-level SET/RESET of ordinary settings: ((name, value or None), ...);
    #                            they follow the client instead of pinning it (None: back to the default)


NOTHING = Effects()
_cache: OrderedDict[str, Effects] = OrderedDict()
# Shapes (literals blanked) of plain DML known to have no effect, with their Effects:
# "UPDATE t SET a = 5" has "set" in it, and without this every new literal would be parsed
# (over 100 µs).
_inert_shapes: OrderedDict[str, Effects] = OrderedDict()
# Shapes found not to be literal-free (a function call, pg_settings): their texts are checked
# one by one, as if they had no shape.
_not_inert: OrderedDict[str, None] = OrderedDict()
_PLAIN_DML = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"})
# Every answer for texts that come again and again (a prepared statement's, at each
# Execute), NOTHING included: a lookup of the same str costs 40 ns, the word scan 350.
_repeated: dict[str, Effects] = {}
# Client encodings PostgreSQL cannot use on the server: in these a multibyte character's
# second byte can be an ASCII quote-or-backslash look-alike (0x5C), so text that the proxy
# reads one way PostgreSQL reads another. pgproxy refuses them (names as PostgreSQL
# matches them: case and punctuation ignored).
CLIENT_ONLY_ENCODINGS = frozenset({"sjis", "shiftjis", "mskanji", "win932", "windows932", "big5", "win950",
                                   "windows950", "gbk", "win936", "windows936", "uhc", "win949", "windows949",
                                   "johab", "gb18030"})


def client_only_encoding(name: str) -> bool:
    return "".join(ch for ch in name.lower() if ch.isalnum()) in CLIENT_ONLY_ENCODINGS


# Every effect above needs one of these words in the text (SET covers RESET and set_config,
# TEMP covers TEMPORARY and pg_temp, NAMES is SET NAMES). Statements that differ only in
# literals (simple protocol) would miss the cache; this scan lets them skip the parser. A
# Unicode-escaped identifier (U&"...") could spell a name without its letters, so it is
# always parsed.
def _maybe(sql: str) -> bool:
    low = sql.lower()  # chained "in" tests: about 0.3 µs for a short statement, a regex 3.7 µs
    return ("set" in low or "temp" in low or "listen" in low or "prepare" in low or "hold" in low
            or "advisory" in low or "load" in low or "deallocate" in low or "discard" in low
            or "copy" in low or "u&" in low or "names" in low or "pg_settings" in low or "conforming" in low)


def repeated_effects(sql: str) -> Effects:
    """session_effects for a text that is sent again and again (a prepared statement's)."""
    effects = _repeated.get(sql)
    if effects is None:
        effects = session_effects(sql)
        if len(_repeated) >= CACHE_SIZE:
            _repeated.clear()
        _repeated[sql] = effects
    return effects


def session_effects(sql: str) -> Effects:
    shape = last_shape(sql)  # the guard's, for a simple query: its shape may be known inert
    if shape is not None:
        effects = _inert_shapes.get(shape)
        if effects is not None:
            return effects
    if not _maybe(sql):
        if shape is not None and shape not in _not_inert:
            _learn_shape(shape, sql, NOTHING)
        return NOTHING
    effects = _cache.get(sql)
    if effects is not None:
        _cache.move_to_end(sql)
        return effects
    if shape is None:  # not the guard's (looked up above): shape it here
        shape = literal_shape(sql)
        if shape is not None:
            effects = _inert_shapes.get(shape)
            if effects is not None:
                return effects
    effects = _inspect(sql)
    _cache[sql] = effects
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    if shape is not None and effects == Effects(alone=effects.alone) and shape not in _not_inert:
        _learn_shape(shape, sql, effects)
    return effects


def _learn_shape(shape: str, sql: str, effects: Effects) -> None:
    """Keep ``effects`` for every text of ``shape`` if no literal could change them, else
    remember that it cannot be kept (so the shape's next texts are not parsed to find out)."""
    if _literal_free(sql):
        _inert_shapes[shape] = effects
        if len(_inert_shapes) > CACHE_SIZE:
            _inert_shapes.popitem(last=False)
    else:
        _not_inert[shape] = None
        if len(_not_inert) > CACHE_SIZE:
            _not_inert.popitem(last=False)


def _literal_free(sql: str) -> bool:
    """Whether no literal could change what ``sql`` does to the session: plain DML with no
    function call anywhere (set_config's arguments, advisory locks' keys) and not touching
    pg_settings (an UPDATE of it is a SET whose name and value are literals)."""
    if "pg_settings" in sql.lower():
        return False
    try:
        nodes = statements(sql)
    except (ParseError, ValueError):
        return False
    return all(kind in _PLAIN_DML for node in nodes for kind in node) and \
        not any("FuncCall" in node for node in dict_nodes(nodes))


def _inspect(sql: str) -> Effects:
    try:
        nodes = statements(sql)
    except (ParseError, ValueError):
        return NOTHING  # PostgreSQL will refuse it too; nothing can outlive a syntax error
    if len(nodes) == 1:
        local = _answered_locally(nodes[0])
        if local is not None:
            return local
    pin, reset, deallocates, copy_in, refusal = "", "", False, False, ""
    settings = []
    in_block = any("TransactionStmt" in node for node in nodes)
    for node in nodes:
        for kind, body in node.items():
            copy_in = copy_in or (kind == "CopyStmt" and bool(body.get("is_from")) and not body.get("filename"))
            pin = pin or _statement_pin(kind, body)
            change = following_setting(kind, body)
            if change is not None:
                if in_block:
                    pin = pin or "SET"  # it may be rolled back with its transaction: not carried
                settings.append(change)
            if kind == "VariableSetStmt":
                if body.get("kind") == "VAR_RESET_ALL":
                    reset = reset or "RESET ALL"
                elif body.get("name") == "session_authorization":
                    reset = reset or "SESSION AUTHORIZATION"
            elif kind == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
                reset = "DISCARD ALL"
                deallocates = True
            elif kind == "DeallocateStmt":
                deallocates = deallocates or bool(body.get("isall"))
        calls: list = []
        pin = pin or _expression_pin(node, calls)
        if calls:
            if in_block:
                pin = pin or "set_config"
            settings += calls
        refusal = refusal or _refusal(node)
    return Effects(pin=pin, reset=reset, alone=len(nodes) <= 1, deallocates=deallocates, copy_in=copy_in,
                   refusal=refusal, settings=tuple(settings) if not pin else ())


_ENCODING_REFUSAL = ("client-only encodings (SJIS, BIG5, GBK, UHC, JOHAB, GB18030) are not supported through "
                     "pgproxy; use UTF8")


_SCS_REFUSAL = ("standard_conforming_strings can only be on through pgproxy (with it off, backslashes in "
                "strings would be read differently by the proxy and by PostgreSQL)")
_ON = frozenset({"on", "true", "yes", "1", "t", "y"})


def _refusal(tree) -> str:
    """What no client may do through pgproxy, because the proxy could then read statements
    differently from PostgreSQL, or because it outlives every session: UPDATE pg_settings
    (set_config by another name, its values unseen), client_encoding set to a client-only
    encoding or to a value that is not a constant, standard_conforming_strings anything but
    on, and ALTER ROLE/DATABASE … SET (defaults for later logins)."""
    if _sets_unsafe_encoding(tree):
        return _ENCODING_REFUSAL
    for node in dict_nodes(tree):
        update = node.get("UpdateStmt")
        if update is not None and update.get("relation", {}).get("relname", "").lower() == "pg_settings":
            return "UPDATE pg_settings is not supported through pgproxy; use SET or set_config"
        if "AlterRoleSetStmt" in node or "AlterDatabaseSetStmt" in node:
            return "ALTER ROLE/DATABASE … SET changes the defaults of later logins; not allowed through pgproxy"
        setstmt = node.get("VariableSetStmt")
        if setstmt is not None and (setstmt.get("name") or "").lower() == "standard_conforming_strings":
            args = setstmt.get("args", [])
            value = _constant(args[0]) if args else None
            if value is None or value.lower() not in _ON:
                return _SCS_REFUSAL
        call = node.get("FuncCall")
        if call is not None and _function_name(call) == "set_config":
            args = call.get("args", [])
            name = _constant(args[0]) if args else None
            if name is not None and name.lower() == "standard_conforming_strings":
                value = _constant(args[1]) if len(args) > 1 else None
                if value is None or value.lower() not in _ON:
                    return _SCS_REFUSAL
    return ""


def _sets_unsafe_encoding(tree) -> bool:
    """SET client_encoding / SET NAMES / set_config('client_encoding', …) to a client-only
    encoding, or to a value that is not a constant (it could be one)."""
    for node in dict_nodes(tree):
        setstmt = node.get("VariableSetStmt")
        if setstmt is not None and (setstmt.get("name") or "").lower() == "client_encoding":
            for arg in setstmt.get("args", []):
                value = arg.get("A_Const", {}).get("sval", {}).get("sval") if isinstance(arg, dict) else None
                if value is None or client_only_encoding(value):
                    return True
        call = node.get("FuncCall")
        if call is not None and _function_name(call) == "set_config":
            args = call.get("args", [])
            name = _constant(args[0]) if args else None
            if name is None or name.lower() == "client_encoding":
                value = _constant(args[1]) if len(args) > 1 else None
                if name is not None and (value is None or client_only_encoding(value)):
                    return True
    return False


def _constant(node) -> str | None:
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        return _constant(node["TypeCast"].get("arg", {}))
    sval = node.get("A_Const", {}).get("sval")
    return sval.get("sval", "") if isinstance(sval, dict) else None


def _answered_locally(node: dict) -> Effects | None:
    body = node.get("DeallocateStmt")
    if body is not None:
        if body.get("isall"):
            return Effects(local="deallocate_all", deallocates=True)
        return Effects(local="deallocate", name=body.get("name", ""))
    body = node.get("DiscardStmt")
    if body is not None and body.get("target") == "DISCARD_ALL":
        return Effects(local="discard_all", reset="DISCARD ALL", deallocates=True)
    return None


# Settings whose session-level value the proxy can carry to any connection: recorded as the
# client's own and re-applied wherever it lands (as its startup parameters are), instead of
# pinning it — what JDBC, ODBC and ORMs send right after connecting. A role policy may still
# fix some of them (the guard refuses those).
FOLLOWING_SETTINGS = frozenset({
    "application_name", "datestyle", "intervalstyle", "timezone", "search_path", "client_encoding",
    "bytea_output", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "extra_float_digits", "default_transaction_isolation",
    "default_transaction_deferrable", "xmloption", "xmlbinary", "lc_monetary", "lc_numeric", "lc_time",
    "work_mem", "maintenance_work_mem", "jit", "geqo", "synchronous_commit", "row_security",
    "timezone_abbreviations", "cursor_tuple_fraction", "random_page_cost", "enable_seqscan", "enable_hashjoin",
    "enable_mergejoin", "enable_nestloop", "enable_indexscan", "enable_bitmapscan", "constraint_exclusion",
    "gin_fuzzy_search_limit", "array_nulls", "backslash_quote", "escape_string_warning", "quote_all_identifiers",
    "transform_null_equals", "client_min_messages", "default_text_search_config", "plan_cache_mode"})
_PLAIN_IDENTIFIER = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def following_setting(kind: str, body: dict):
    """(name, value) when a top-level SET/RESET changes an ordinary setting to a constant; the
    value is the text set_config takes (None: RESET / DEFAULT). None for anything else."""
    if kind != "VariableSetStmt" or body.get("is_local"):
        return None
    name = (body.get("name") or "").lower()
    if name not in FOLLOWING_SETTINGS:
        return None
    setkind = body.get("kind")
    if setkind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return name, None
    if setkind != "VAR_SET_VALUE":
        return None
    values = []
    for arg in body.get("args", []):
        const = arg.get("A_Const") if isinstance(arg, dict) else None
        if const is None:
            return None  # a cast, an interval: not carried, the client is pinned
        if "sval" in const:
            value = const["sval"].get("sval", "")
        elif "ival" in const:
            value = str(const["ival"].get("ival", 0))
        elif "fval" in const:
            value = const["fval"].get("fval", "")
        elif "boolval" in const:
            value = "on" if const["boolval"].get("boolval") else "off"
        else:
            return None
        if name == "search_path" and not (value and set(value) <= _PLAIN_IDENTIFIER and not value[0].isdigit()):
            value = '"' + value.replace('"', '""') + '"'  # a list of identifiers: quoted as SET would
        values.append(value)
    if not values or (name == "client_encoding" and client_only_encoding(values[0])):
        return None
    return name, ", ".join(values)


def _statement_pin(kind: str, body: dict) -> str:
    if kind == "VariableSetStmt":
        if body.get("is_local") or body.get("name") == "TRANSACTION" or body.get("kind") == "VAR_RESET_ALL":
            return ""
        return "" if following_setting(kind, body) is not None else "SET"
    if kind == "ListenStmt":
        return "LISTEN"
    if kind == "PrepareStmt":
        return "PREPARE"
    if kind == "LoadStmt":
        return "LOAD"
    if kind == "DeclareCursorStmt" and body.get("options", 0) & CURSOR_OPT_HOLD:
        return "WITH HOLD cursor"
    return ""


def _set_config_change(args: list):
    """(name, value) for set_config(<ordinary setting>, <constant>, false) — libpq and pg_dump
    send set_config('search_path', '', false); None for anything else (it pins)."""
    if len(args) != 3:
        return None
    name, value = _constant(args[0]), _constant(args[1])
    if name is None or value is None or name.lower() not in FOLLOWING_SETTINGS:
        return None
    if name.lower() == "client_encoding" and client_only_encoding(value):
        return None
    return name.lower(), value


def _expression_pin(tree, changes: list) -> str:
    """Temporary objects, session advisory locks and session-level set_config, anywhere;
    set_config of ordinary settings to constants goes to ``changes`` instead."""
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
                change = _set_config_change(call.get("args", []))
                if change is None:
                    return "set_config"
                changes.append(change)
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
