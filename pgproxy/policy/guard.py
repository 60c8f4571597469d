"""The statement guard: what a statement is (pgaudit's classes, the relations it names)
and whether a client may run it.

Pure: SQL text in, ``Verdict`` out; the per-role part (``RolePolicy.refusal``) is a few
set operations on a cached verdict. A client must never leave its identity, so the
guard refuses, wherever they appear in a statement (select list, FROM, WHERE,
subqueries, CTEs, defaults, PREPARE, EXPLAIN, COPY's query):

* ``SET``/``RESET`` of ``role`` or ``session_authorization`` (``SET ROLE``, ``SET
  SESSION AUTHORIZATION``, ``RESET ROLE``), in any spelling the parser accepts;
* writing a setting in the identity namespace (``pgproxy.*``);
* ``set_config`` with one of those names, or with a name that is not a constant;
* ``RESET ALL`` and ``DISCARD ALL`` unless they end the query (the proxy re-applies the
  identity before the next one; statements after them in the same query would run
  without it);
* ``DO`` blocks, creating or altering functions and procedures (``pg_temp`` included),
  extensions, triggers, casts, operators and aggregates, and calling functions that run SQL
  given as text (``query_to_xml``, ``ts_stat``, ``dblink``), unless the role's policy allows them;
* anything the parser cannot parse (42601; fail closed).

Verdicts are cached by text (bounded LRU) and, for statements whose verdict does not
depend on a literal's value, by the text with its literals blanked, so a simple-protocol
query that differs only in its constants costs one regex pass, not a parse.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from pglast.parser import ParseError, parse_sql_json

from pgproxy.policy import dict_nodes

CACHE_SIZE = 20_000
IDENTITY_NAMESPACE = "pgproxy."
ROLE_SETTINGS = frozenset({"role", "session_authorization"})
READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})

_ROLE_NODES = frozenset({"CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "GrantStmt",
                         "GrantRoleStmt", "ReassignOwnedStmt", "AlterDefaultPrivilegesStmt", "DropOwnedStmt"})
_WRITE_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "TruncateStmt"})
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Comment", "Index", "View", "Define", "Cluster", "Reindex",
                 "RefreshMatView", "SecLabel", "ImportForeignSchema", "CompositeType")
_CODE_NODES = frozenset({"DoStmt", "CreateFunctionStmt", "AlterFunctionStmt", "CreateExtensionStmt",
                         "AlterExtensionStmt", "AlterExtensionContentsStmt", "CreateTrigStmt", "CreateEventTrigStmt",
                         "CreatePLangStmt", "CreateTransformStmt", "DefineStmt", "CreateCastStmt",
                         "CreateConversionStmt", "CreateOpClassStmt"})
# Built-in and common extension functions that run SQL given as text: dynamic SQL, which
# the guard cannot see into (query_to_xml('SELECT set_config(''role'', ...)')).
SQL_RUNNING_FUNCTIONS = frozenset({"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "ts_stat",
                                   "dblink", "dblink_exec", "dblink_open", "dblink_send_query"})


class Verdict(NamedTuple):
    classes: tuple[str, ...] = ()
    relations: tuple[str, ...] = ()
    refusal: str = ""              # why no role may run it; "" if the guard lets it through
    sqlstate: str = "42501"
    functions: tuple[str, ...] = ()  # names of the functions it calls
    settings: tuple[str, ...] = ()   # settings it writes (lowercase)
    code: str = ""                  # DO / CREATE FUNCTION / ...: needs allow_functions
    literal_sensitive: bool = False  # the verdict looked at a literal's value


@dataclass
class RolePolicy:
    """The per-role part of the policy ([[policies]] in the configuration)."""
    read_only: bool = False
    allow_functions: bool = False
    allowed_classes: frozenset = field(default_factory=frozenset)  # empty: all
    denied_functions: frozenset = field(default_factory=frozenset)
    denied_relations: frozenset = field(default_factory=frozenset)
    locked_settings: frozenset = field(default_factory=frozenset)  # set by the policy; clients may not change them

    def refusal(self, verdict: Verdict) -> str:
        """Why this role may not run the statement; "" if it may. On every statement:
        each rule costs nothing unless the policy sets it."""
        if verdict.refusal:
            return verdict.refusal
        if verdict.code and not self.allow_functions:
            return f"{verdict.code} is not allowed for this role"
        if self.read_only and not _WRITING_CLASSES.isdisjoint(verdict.classes):
            return "this role is read-only"
        if self.allowed_classes and not self.allowed_classes.issuperset(verdict.classes):
            return f"statement class {', '.join(sorted(set(verdict.classes) - self.allowed_classes))} is not allowed"
        if self.locked_settings and not self.locked_settings.isdisjoint(verdict.settings):
            return f"setting {', '.join(sorted(self.locked_settings & set(verdict.settings)))} is fixed by policy"
        if self.denied_functions and not self.denied_functions.isdisjoint(verdict.functions):
            return f"function {', '.join(sorted(self.denied_functions & set(verdict.functions)))} is denied"
        if self.denied_relations and self.denied_relations & _relation_names(verdict.relations):
            return "relation denied by policy"
        return ""


_WRITING_CLASSES = frozenset({"WRITE", "DDL", "ROLE"})
UNRESTRICTED = RolePolicy(allow_functions=True)


def _relation_names(relations: tuple[str, ...]) -> set[str]:
    names = set(relations)
    names.update(r.rpartition(".")[2] for r in relations)
    return names


# --- caching ----------------------------------------------------------------------------

_by_text: OrderedDict[str, Verdict] = OrderedDict()
_by_shape: OrderedDict[str, Verdict] = OrderedDict()
_STRING = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


def _remember(cache: OrderedDict, key: str, verdict: Verdict) -> None:
    cache[key] = verdict
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _shape(sql: str) -> str | None:
    """The text with string and number literals blanked, when that is sound: no dollar
    quoting, backslashes, comments, quoted identifiers or Unicode escapes, which could
    hide where a literal starts or ends."""
    if "$" in sql or "\\" in sql or '"' in sql or "--" in sql or "/*" in sql or "u&" in sql or "U&" in sql:
        return None  # chained "in" tests: a regex here cost 1 µs more
    return _NUMBER.sub("0", _STRING.sub("''", sql))


def classify(sql: str) -> Verdict:
    verdict = _by_text.get(sql)
    if verdict is not None:
        return verdict
    shape = _shape(sql)
    if shape is not None:
        verdict = _by_shape.get(shape)
        if verdict is not None:
            return verdict
    verdict = _analyse(sql)
    _remember(_by_text, sql, verdict)
    if shape is not None and not verdict.literal_sensitive:
        _remember(_by_shape, shape, verdict)
    return verdict


# --- analysis ---------------------------------------------------------------------------

def _analyse(sql: str) -> Verdict:
    try:
        stmts = json.loads(parse_sql_json(sql)).get("stmts", [])
    except ParseError as exc:
        return Verdict(refusal=f"pgproxy could not parse the statement: {exc}", sqlstate="42601")
    except ValueError:
        return Verdict(refusal="pgproxy could not read the parser's output", sqlstate="42601")
    walk = _Walk()
    nodes = [s.get("stmt", {}) for s in stmts]
    for index, node in enumerate(nodes):
        last = index == len(nodes) - 1
        for kind, body in node.items():
            walk.statement(kind, body, last)
        walk.visit(node)
    return Verdict(tuple(sorted(walk.classes)) or ("MISC",), tuple(sorted(walk.relations - walk.ctes)), walk.refusal,
                   "42501", tuple(sorted(walk.functions)), tuple(sorted(walk.settings)), walk.code,
                   walk.literal_sensitive)


class _Walk:
    def __init__(self) -> None:
        self.classes: set[str] = set()
        self.relations: set[str] = set()
        self.functions: set[str] = set()
        self.settings: set[str] = set()
        self.refusal = ""
        self.code = ""
        self.literal_sensitive = False
        self.ctes: set[str] = set()  # WITH names: not relations

    def refuse(self, reason: str) -> None:
        self.refusal = self.refusal or reason

    def statement(self, kind: str, body: dict, last: bool) -> None:
        """Top-level statements: their class, and the rules about where they stand."""
        if kind == "VariableSetStmt" and body.get("kind") == "VAR_RESET_ALL" and not last:
            self.refuse("RESET ALL must end the query: the statements after it would run without your identity "
                        "settings")
        if kind == "DiscardStmt" and body.get("target") == "DISCARD_ALL" and not last:
            self.refuse("DISCARD ALL must end the query: the statements after it would run without your role")
        if kind in ("ExplainStmt", "PrepareStmt"):
            return  # classified by the statement inside
        self.classes.add(_statement_class(kind, body))

    def visit(self, tree) -> None:
        for node in dict_nodes(tree):
            if "relname" in node:  # a RangeVar, tagged or inline (INSERT/UPDATE/DELETE ... relation)
                name, schema = node["relname"], node.get("schemaname")
                self.relations.add(f"{schema}.{name}" if schema else name)
            for kind, body in node.items():
                if isinstance(body, dict):
                    self._node(kind, body)

    def _node(self, kind: str, body: dict) -> None:
        if kind == "CommonTableExpr":
            self.ctes.add(body.get("ctename", ""))
        elif kind == "FuncCall":
            self._call(body)
        elif kind == "VariableSetStmt":
            self._set(body)
        elif kind == "TransactionStmt":
            for option in body.get("options", []):
                name = option.get("DefElem", {}).get("defname", "")
                if name:
                    self.settings.add(name.lower())
        elif kind in _CODE_NODES:
            self.code = self.code or _code_name(kind, body)
        elif kind in _WRITE_NODES:
            self.classes.add("WRITE")
        elif kind == "AlterRoleSetStmt" or kind == "AlterDatabaseSetStmt":
            setstmt = body.get("setstmt", {})
            self._set(setstmt)

    def _set(self, body: dict) -> None:
        name = (body.get("name") or "").lower()
        if body.get("kind") == "VAR_SET_MULTI":  # SET TRANSACTION / SESSION CHARACTERISTICS ...
            for arg in body.get("args", []):
                self.settings.add(arg.get("DefElem", {}).get("defname", "").lower())
            return
        if not name:
            return
        self.settings.add(name)
        if name in ROLE_SETTINGS:
            self.refuse("changing the session's role or authorization is not allowed")
        elif name.startswith(IDENTITY_NAMESPACE):
            self.refuse(f"the identity setting {name} is set by pgproxy and cannot be changed")

    def _call(self, body: dict) -> None:
        names = [n.get("String", {}).get("sval", "") for n in body.get("funcname", [])]
        name = names[-1].lower() if names else ""
        self.functions.add(name)
        if name in SQL_RUNNING_FUNCTIONS:
            self.code = self.code or f"{name}() (it runs SQL given as text)"
        if name != "set_config":
            return
        self.literal_sensitive = True
        args = body.get("args", [])
        setting = _string_constant(args[0]) if args else None
        if setting is None:
            self.refuse("set_config with a setting name that is not a constant is not allowed")
            return
        setting = setting.lower()
        self.settings.add(setting)
        if setting in ROLE_SETTINGS:
            self.refuse("set_config of the role or authorization is not allowed")
        elif setting.startswith(IDENTITY_NAMESPACE):
            self.refuse(f"the identity setting {setting} is set by pgproxy and cannot be changed")


def _string_constant(node: dict) -> str | None:
    """A string constant, also through a cast ('role'::text)."""
    if "TypeCast" in node:
        return _string_constant(node["TypeCast"].get("arg", {}))
    const = node.get("A_Const")
    if const is None or "sval" not in const:
        return None
    return const["sval"].get("sval", "")


def _code_name(kind: str, body: dict) -> str:
    if kind == "DoStmt":
        return "DO"
    if kind in ("CreateFunctionStmt", "AlterFunctionStmt"):
        what = "PROCEDURE" if body.get("is_procedure") or body.get("objtype") == "OBJECT_PROCEDURE" else "FUNCTION"
        return f"{'CREATE' if kind.startswith('Create') else 'ALTER'} {what}"
    if kind in ("CreateExtensionStmt", "AlterExtensionStmt", "AlterExtensionContentsStmt"):
        return "CREATE EXTENSION" if kind == "CreateExtensionStmt" else "ALTER EXTENSION"
    return {"CreateTrigStmt": "CREATE TRIGGER", "CreateEventTrigStmt": "CREATE EVENT TRIGGER",
            "CreatePLangStmt": "CREATE LANGUAGE", "CreateTransformStmt": "CREATE TRANSFORM",
            "DefineStmt": "CREATE AGGREGATE/OPERATOR/TYPE", "CreateCastStmt": "CREATE CAST",
            "CreateConversionStmt": "CREATE CONVERSION", "CreateOpClassStmt": "CREATE OPERATOR CLASS"}[kind]


def _statement_class(kind: str, body: dict) -> str:
    if kind in ("SelectStmt", "DeclareCursorStmt", "VariableShowStmt", "FetchStmt"):
        if kind == "SelectStmt" and body.get("intoClause"):
            return "DDL"  # SELECT INTO creates a table
        return "READ"
    if kind in _WRITE_NODES:
        return "WRITE"
    if kind == "CopyStmt":
        return "WRITE" if body.get("is_from") else "READ"
    if kind in _ROLE_NODES:
        return "ROLE"
    if kind in ("DoStmt", "CallStmt"):
        return "FUNCTION"
    if kind.startswith(_DDL_PREFIXES):
        return "DDL"
    return "MISC"
