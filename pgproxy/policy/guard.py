"""The statement guard: what a statement is (pgaudit's classes, the relations it names)
and whether a client may run it — decided by what the statement can do.

Pure: SQL text in, ``Verdict`` out; the per-role part (``RolePolicy.refusal``) is a few
set operations on a cached verdict. A client must never leave its identity, so the
guard refuses, wherever they appear in a statement (select list, FROM, WHERE,
subqueries, CTEs, defaults, PREPARE, EXPLAIN, COPY's query):

* ``SET``/``RESET`` of ``role`` or ``session_authorization`` (``SET ROLE``, ``SET
  SESSION AUTHORIZATION``, ``RESET ROLE``), in any spelling the parser accepts, writing a
  setting in the identity namespace (``pgproxy.*``), and ``ALTER SYSTEM``;
* ``set_config`` (and ``UPDATE pg_settings``) with one of those names, or with a name it
  cannot know: a name is known when it is a constant, or when it is the ``name`` column
  of ``pg_settings`` filtered by ``name = 'constant'`` / ``name IN (...)`` — what pg_dump
  sends;
* a ``search_path`` that puts another schema before ``pg_catalog`` (the function
  allow-list assumes unqualified names reach the built-ins first);
* ``RESET ALL`` and ``DISCARD ALL`` unless they end the query (the proxy re-applies the
  identity before the next one; statements after them in the same query would run
  without it);
* anything the parser cannot parse, with PostgreSQL's own message and position (42601).

And, unless the role's policy allows them: ``DO`` blocks, creating or altering functions,
procedures, extensions, triggers, casts, operators and aggregates (``code``), COPY to or
from a server file or program, and calling any function that is not a known-safe
built-in (``unknown_functions``; see ``pgproxy.policy.builtins``): a function call,
``CALL``, a function in FROM, ``TABLESAMPLE`` methods and ``OPERATOR(schema.op)``.

Verdicts are cached by text (bounded LRU) and, for statements whose verdict does not
depend on a literal's value, by the text with its literals blanked, so a simple-protocol
query that differs only in its constants costs one regex pass, not a parse.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from pglast.parser import ParseError

from pgproxy.policy import dict_nodes
from pgproxy.policy.parsed import literal_shape, statements
from pgproxy.policy.builtins import ALLOWED_INFORMATION_SCHEMA, ALLOWED_PG_CATALOG, denial

CACHE_SIZE = 20_000
IDENTITY_NAMESPACE = "pgproxy."
IDENTITY_SCHEMA = "pgproxy"  # pgproxy's own functions (pgproxy.person(), ...): allowed
ROLE_SETTINGS = frozenset({"role", "session_authorization"})
READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})

_ROLE_NODES = frozenset({"CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "GrantStmt",
                         "GrantRoleStmt", "ReassignOwnedStmt", "AlterDefaultPrivilegesStmt", "DropOwnedStmt"})
_WRITE_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "TruncateStmt"})
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Comment", "Index", "View", "Define", "Cluster", "Reindex",
                 "RefreshMatView", "SecLabel", "ImportForeignSchema", "CompositeType")
# Statements that create code, or name functions that later run implicitly (access
# methods, foreign-data wrappers and operator families are superuser-only anyway).
_CODE_NODES = frozenset({"DoStmt", "CreateFunctionStmt", "AlterFunctionStmt", "CreateExtensionStmt",
                         "AlterExtensionStmt", "AlterExtensionContentsStmt", "CreateTrigStmt", "CreateEventTrigStmt",
                         "CreatePLangStmt", "CreateTransformStmt", "DefineStmt", "CreateCastStmt",
                         "CreateConversionStmt", "CreateOpClassStmt", "CreateAmStmt", "CreateFdwStmt",
                         "AlterFdwStmt", "AlterOpFamilyStmt"})
# Where a statement names the relation it creates: a relation called pg_settings would
# shadow PostgreSQL's (a temporary one even with an empty search_path).
_CREATED_RELATION = {"CreateStmt": ("relation",), "ViewStmt": ("view",), "CreateSeqStmt": ("sequence",),
                     "CreateTableAsStmt": ("into", "rel"), "SelectStmt": ("intoClause", "rel"),
                     "CreateForeignTableStmt": ("base", "relation")}
_SET_CONFIG_PARAMETERS = ("setting_name", "new_value", "is_local")
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name"})
_OPERATOR_CHARACTERS = frozenset("+-*/<>=~!@#%^&|`?")


class Verdict(NamedTuple):
    classes: tuple[str, ...] = ()
    relations: tuple[str, ...] = ()
    refusal: str = ""               # why no role may run it; "" if the guard lets it through
    sqlstate: str = "42501"         # of the refusal; 42601: a syntax error (refusal is PostgreSQL's message)
    functions: tuple[str, ...] = ()  # names of the functions it calls (lowercase, without schema)
    settings: tuple[str, ...] = ()   # settings it writes (lowercase)
    code: str = ""                  # DO / CREATE FUNCTION / ...: needs allow_functions
    literal_sensitive: bool = False  # the verdict looked at a literal's value
    unknown_functions: tuple[str, ...] = ()  # calls of what is not a known-safe built-in, as written:
    #                                          "dblink", "public.f", "myschema.+" (an operator)
    position: int = 0               # syntax errors: PostgreSQL's 1-based character position (P); 0: none


@dataclass
class RolePolicy:
    """The per-role part of the policy ([[policies]] in the configuration)."""
    read_only: bool = False
    allow_functions: bool = False
    allowed_classes: frozenset = field(default_factory=frozenset)  # empty: all
    denied_functions: frozenset = field(default_factory=frozenset)
    denied_relations: frozenset = field(default_factory=frozenset)
    locked_settings: frozenset = field(default_factory=frozenset)  # set by the policy; clients may not change them
    allowed_functions: frozenset = field(default_factory=frozenset)  # "name" (any schema) or "schema.name"

    def refusal(self, verdict: Verdict) -> str:
        """Why this role may not run the statement; "" if it may. On every statement:
        each rule costs nothing unless the verdict or the policy sets it."""
        if verdict.refusal:
            return verdict.refusal
        if verdict.code and not self.allow_functions:
            return f"{verdict.code} is not allowed for this role"
        if verdict.unknown_functions and not self.allow_functions:
            for name in verdict.unknown_functions:
                if name not in self.allowed_functions and name.rpartition(".")[2] not in self.allowed_functions:
                    return function_refusal(name)
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


def function_refusal(name: str) -> str:
    """The reason for refusing a call of ``name`` (an entry of ``unknown_functions``)."""
    schema, _, bare = name.rpartition(".")
    what = f"operator OPERATOR({name})" if bare[:1] in _OPERATOR_CHARACTERS else f"function {name}()"
    why = denial(bare) if schema in ("", "pg_catalog") else ""
    return f"{what} is not allowed: {why or 'it is not a known-safe built-in (allowed_functions can allow it)'}"


def _relation_names(relations: tuple[str, ...]) -> set[str]:
    names = set(relations)
    names.update(r.rpartition(".")[2] for r in relations)
    return names


# --- caching ----------------------------------------------------------------------------

_by_text: OrderedDict[str, Verdict] = OrderedDict()
_by_shape: OrderedDict[str, Verdict] = OrderedDict()


def _remember(cache: OrderedDict, key: str, verdict: Verdict) -> None:
    cache[key] = verdict
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def classify(sql: str) -> Verdict:
    verdict = _by_text.get(sql)
    if verdict is not None:
        return verdict
    shape = literal_shape(sql)
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
        nodes = statements(sql)
    except ParseError as exc:
        return syntax_error(sql, exc)
    except ValueError:
        return Verdict(refusal="pgproxy could not read the parser's output", sqlstate="XX000")
    walk = _Walk()
    for index, node in enumerate(nodes):
        last = index == len(nodes) - 1
        for kind, body in node.items():
            walk.statement(kind, body, last)
        walk.visit(node)
    walk.finish()
    return Verdict(classes=tuple(sorted(walk.classes)) or ("MISC",),
                   relations=tuple(sorted(walk.relations - walk.ctes)), refusal=walk.refusal,
                   functions=tuple(sorted(walk.functions)), settings=tuple(sorted(walk.settings)), code=walk.code,
                   literal_sensitive=walk.literal_sensitive, unknown_functions=tuple(sorted(walk.unknown)))


def syntax_error(sql: str, exc: ParseError) -> Verdict:
    """PostgreSQL's answer to text it cannot parse: its message (pglast's without the
    ", at index N" it appends) and the 1-based character position it sends in P. pglast
    reports no index for an error at the end of the input, where PostgreSQL puts the
    position just past the last character. Literal-sensitive: the message quotes the
    token and the position counts the characters of the literals before it."""
    message = str(exc.args[0]) if exc.args else "syntax error"
    index = exc.args[1] if len(exc.args) > 1 else None
    if isinstance(index, int):
        position = index + 1
    else:
        position = len(sql) + 1 if message.endswith("at end of input") else 0
    return Verdict(refusal=message, sqlstate="42601", position=position, literal_sensitive=True)


class _Walk:
    def __init__(self) -> None:
        self.classes: set[str] = set()
        self.relations: set[str] = set()
        self.functions: set[str] = set()
        self.unknown: set[str] = set()
        self.settings: set[str] = set()
        self.refusal = ""
        self.code = ""
        self.literal_sensitive = False
        self.ctes: set[str] = set()  # WITH names: not relations
        self.from_settings: dict[int, frozenset[str]] = {}  # set_config calls fed by pg_settings.name
        self.reads_unqualified_settings = False  # ... from "pg_settings" (a CTE of that name would shadow it)

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
        # dict_nodes yields a node before its children: a SelectStmt is seen before the
        # set_config calls in its select list.
        for node in dict_nodes(tree):
            if "relname" in node:  # a RangeVar, tagged or inline (INSERT/UPDATE/DELETE ... relation)
                name, schema = node["relname"], node.get("schemaname")
                self.relations.add(f"{schema}.{name}" if schema else name)
            for kind, body in node.items():
                if isinstance(body, dict):
                    self._node(kind, body)

    def finish(self) -> None:
        if self.reads_unqualified_settings and "pg_settings" in self.ctes:
            self.refuse("set_config with a name from a WITH query called pg_settings is not allowed")

    def _node(self, kind: str, body: dict) -> None:
        if kind == "FuncCall":
            self._call(body)
        elif kind == "CommonTableExpr":
            self.ctes.add(body.get("ctename", ""))
        elif kind == "A_Expr":
            self._operator(body.get("name"))
        elif kind == "SelectStmt":
            self._settings_query(body)
        elif kind == "VariableSetStmt":
            self._set(body)
        elif kind == "TransactionStmt":
            for option in body.get("options", []):
                name = option.get("DefElem", {}).get("defname", "")
                if name:
                    self.settings.add(name.lower())
        elif kind == "CallStmt":
            self._call(body.get("funccall") or {})
        elif kind == "SortBy":
            self._operator(body.get("useOp"))
        elif kind == "RangeTableSample":
            self._function(_names(body.get("method")))
        elif kind in _CODE_NODES:
            self.code = self.code or _code_name(kind, body)
        elif kind == "CopyStmt" and (body.get("filename") or body.get("is_program")):
            self.code = self.code or "COPY to or from a server file or program"
        elif kind in ("AlterRoleSetStmt", "AlterDatabaseSetStmt"):
            self._set(body.get("setstmt") or {})
        elif kind == "AlterSystemStmt":
            self.refuse("ALTER SYSTEM is not allowed: it changes the server's configuration for every session")
        elif kind == "RenameStmt" and body.get("newname") == "pg_settings":
            self.refuse("pgproxy does not allow naming a relation pg_settings: it would shadow PostgreSQL's")
        if kind in _WRITE_NODES:
            self.classes.add("WRITE")
            if kind == "UpdateStmt":
                self._settings_update(body)
        path = _CREATED_RELATION.get(kind)
        if path is not None:
            target = body
            for key in path:
                target = target.get(key) or {}
            if target.get("relname") == "pg_settings":
                self.refuse("pgproxy does not allow naming a relation pg_settings: it would shadow PostgreSQL's")

    # -- functions and operators --

    def _function(self, names: list[str]) -> None:
        """Record a call of ``names`` (schema-qualified or not) unless it is a known-safe
        built-in. Names are compared as PostgreSQL stores them: a quoted "LOWER" is
        not lower."""
        if not names:
            return
        name, schema = names[-1], (names[-2] if len(names) > 1 else "")
        if schema in ("", "pg_catalog"):
            known = name in ALLOWED_PG_CATALOG
        elif schema == "information_schema":
            known = name in ALLOWED_INFORMATION_SCHEMA
        else:
            known = schema == IDENTITY_SCHEMA
        if not known:
            self.unknown.add(f"{schema}.{name}" if schema else name)

    def _operator(self, names) -> None:
        """OPERATOR(schema.op): an operator outside pg_catalog runs a user's function."""
        names = _names(names)
        if len(names) > 1 and names[-2] != "pg_catalog":
            self.unknown.add(f"{names[-2]}.{names[-1]}")

    def _call(self, body: dict) -> None:
        names = _names(body.get("funcname"))
        if not names:
            return
        self._function(names)
        name = names[-1].lower()
        self.functions.add(name)
        if name == "set_config":  # in any schema and spelling: conservative
            self._set_config(body)

    # -- settings --

    def _set(self, body: dict) -> None:
        name = (body.get("name") or "").lower()
        if body.get("kind") == "VAR_SET_MULTI":  # SET TRANSACTION / SESSION CHARACTERISTICS ...
            for arg in body.get("args", []):
                self.settings.add(arg.get("DefElem", {}).get("defname", "").lower())
            return
        if not name:
            return
        self._setting(name)
        if name in ROLE_SETTINGS:
            self.refuse("changing the session's role or authorization is not allowed")
        elif name == "search_path" and body.get("kind") == "VAR_SET_VALUE":
            # SET takes one schema per argument, identifiers already folded, strings as written.
            self.literal_sensitive = True
            self._search_path([_string_constant(arg) for arg in body.get("args", [])])

    def _setting(self, name: str) -> None:
        self.settings.add(name)
        if name.startswith(IDENTITY_NAMESPACE):
            self.refuse(f"the identity setting {name} is set by pgproxy and cannot be changed")

    def _search_path(self, schemas: list[str | None] | None) -> None:
        if schemas is None or None in schemas:
            self.refuse("search_path set to a value pgproxy cannot read is not allowed")
        elif "pg_catalog" in schemas and next(s for s in schemas if s != "pg_temp") != "pg_catalog":
            self.refuse("a search_path that puts another schema before pg_catalog is not allowed")

    def _set_config(self, body: dict) -> None:
        self.literal_sensitive = True
        bound: dict[str, dict] = {}
        for index, arg in enumerate(body.get("args", [])):
            named = arg.get("NamedArgExpr")
            if named is not None:
                bound[named.get("name", "")] = named.get("arg") or {}
            elif index < len(_SET_CONFIG_PARAMETERS):
                bound[_SET_CONFIG_PARAMETERS[index]] = arg
        setting = _string_constant(bound.get("setting_name") or {})
        names = frozenset({setting}) if setting is not None else self.from_settings.get(id(body))
        if names is None or body.get("func_variadic"):
            self.refuse("set_config with a setting name that is not a constant (or pg_settings.name filtered by "
                        "name = '...') is not allowed")
            return
        for name in names:
            self._write(name.lower(), bound.get("new_value") or {}, "set_config")

    def _write(self, name: str, value: dict, how: str) -> None:
        """set_config / UPDATE pg_settings writing ``value`` (a node) to ``name``."""
        self._setting(name)
        if name in ROLE_SETTINGS:
            self.refuse(f"{how} of the role or authorization is not allowed")
        elif name == "search_path":
            text = _string_constant(value)
            self._search_path(None if text is None else _split_identifiers(text))

    def _settings_query(self, body: dict) -> None:
        """SELECT set_config(name, ...) FROM pg_settings WHERE name = 'x' (or IN (...)):
        the names set_config can receive are the constants. Only the select list
        counts (WHERE may be evaluated before the filter), and not subqueries in it
        (their "name" could be another relation's)."""
        targets = body.get("targetList")
        qualifier = _settings_relation(body.get("fromClause"))
        if not targets or qualifier is None:
            return
        calls = [call for call in _direct_calls(targets) if _names(call.get("funcname"))[-1:] == ["set_config"]]
        calls = [call for call in calls if _is_name_column(_first_argument(call), qualifier)]
        names = _name_constants(body.get("whereClause"), qualifier) if calls else None
        if names:
            for call in calls:
                self.from_settings[id(call)] = names
            relation = body["fromClause"][0]["RangeVar"]
            self.reads_unqualified_settings = self.reads_unqualified_settings or not relation.get("schemaname")

    def _settings_update(self, body: dict) -> None:
        """UPDATE pg_settings runs set_config through the view's rule: the same rules."""
        relation = body.get("relation") or {}
        if relation.get("relname") != "pg_settings" or relation.get("schemaname") not in (None, "pg_catalog"):
            return
        self.literal_sensitive = True
        alias = relation.get("alias") or {}
        names = _name_constants(body.get("whereClause"), alias.get("aliasname", "pg_settings"))
        if not names:
            self.refuse("UPDATE pg_settings must name its settings (WHERE name = '...')")
            return
        values = [t.get("ResTarget", {}) for t in body.get("targetList", [])]
        value = next((t.get("val") or {} for t in values if t.get("name") == "setting"), {})
        for name in names:
            self._write(name.lower(), value, "UPDATE pg_settings")


def _names(nodes) -> list[str]:
    if not isinstance(nodes, list):
        return []
    return [n.get("String", {}).get("sval", "") for n in nodes if isinstance(n, dict)]


def _string_constant(node: dict) -> str | None:
    """A string constant, also through a cast to a text type ('role'::text)."""
    if "TypeCast" in node:
        cast = node["TypeCast"]
        names = _names((cast.get("typeName") or {}).get("names"))
        if not names or names[-1] not in _TEXT_TYPES or names[:-1] not in ([], ["pg_catalog"]):
            return None
        return _string_constant(cast.get("arg") or {})
    const = node.get("A_Const")
    if const is None or "sval" not in const:
        return None
    return const["sval"].get("sval", "")


def _split_identifiers(text: str) -> list[str] | None:
    """A list setting as PostgreSQL reads it (SplitIdentifierString): comma-separated,
    unquoted names folded to lower case, "quoted" ones as written; None if malformed."""
    out: list[str] = []
    rest = text.strip()
    if not rest:
        return out
    while True:
        if rest.startswith('"'):
            end, name = 1, ""
            while True:
                quote = rest.find('"', end)
                if quote < 0:
                    return None
                name += rest[end:quote]
                if rest[quote + 1:quote + 2] != '"':
                    break
                name, end = name + '"', quote + 2
            rest = rest[quote + 1:].lstrip()
        else:
            cut = len(rest) if "," not in rest else rest.index(",")
            name, rest = rest[:cut].rstrip(), rest[cut:]
            if not name or any(c.isspace() or c == '"' for c in name):
                return None
            name = "".join(c.lower() if c.isascii() else c for c in name)  # downcase_identifier, UTF-8
        out.append(name)
        if not rest:
            return out
        if not rest.startswith(","):
            return None
        rest = rest[1:].lstrip()


def _direct_calls(tree):
    """FuncCall bodies in an expression tree, not inside subqueries."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            call = node.get("FuncCall")
            if call is not None:
                yield call
            stack.extend(value for key, value in node.items() if key != "SubLink")


def _first_argument(call: dict) -> dict:
    """set_config's setting_name argument, by position or by name."""
    for index, arg in enumerate(call.get("args", [])):
        named = arg.get("NamedArgExpr")
        if named is not None:
            if named.get("name") == "setting_name":
                return named.get("arg") or {}
        elif index == 0:
            return arg
    return {}


def _settings_relation(from_clause) -> str | None:
    """How the name column of pg_settings is qualified when it is the only FROM item
    (its alias, or pg_settings); None when the FROM clause is anything else."""
    if not isinstance(from_clause, list) or len(from_clause) != 1:
        return None
    relation = from_clause[0].get("RangeVar")
    if relation is None or relation.get("relname") != "pg_settings" or relation.get("catalogname") \
            or relation.get("schemaname") not in (None, "pg_catalog"):
        return None
    alias = relation.get("alias")
    if alias is None:
        return "pg_settings"
    return None if alias.get("colnames") else alias.get("aliasname")


def _is_name_column(node, qualifier: str) -> bool:
    fields = _names((node or {}).get("ColumnRef", {}).get("fields")) if isinstance(node, dict) else []
    return fields == ["name"] or fields == [qualifier, "name"]


def _name_constants(where, qualifier: str) -> frozenset[str] | None:
    """The constants a WHERE clause restricts pg_settings.name to: name = 'x',
    'x' = name, name IN ('x', 'y'), AND-ed with anything; None if it does not."""
    if not isinstance(where, dict):
        return None
    boolean = where.get("BoolExpr")
    if boolean is not None:
        if boolean.get("boolop") != "AND_EXPR":
            return None
        found = [names for names in (_name_constants(arg, qualifier) for arg in boolean.get("args", []))
                 if names is not None]
        return frozenset().union(*found) if found else None  # every conjunct holds: the union is safe
    expr = where.get("A_Expr")
    if expr is None or _names(expr.get("name")) != ["="]:
        return None
    left, right = expr.get("lexpr"), expr.get("rexpr")
    if expr.get("kind") == "AEXPR_OP":
        if _is_name_column(right, qualifier):
            left, right = right, left
        constant = _string_constant(right or {}) if _is_name_column(left, qualifier) else None
        return None if constant is None else frozenset({constant})
    if expr.get("kind") == "AEXPR_IN" and _is_name_column(left, qualifier):
        items = (right or {}).get("List", {}).get("items", [])
        constants = [_string_constant(item) for item in items]
        return None if not constants or None in constants else frozenset(constants)
    return None


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
            "CreateConversionStmt": "CREATE CONVERSION", "CreateOpClassStmt": "CREATE OPERATOR CLASS",
            "CreateAmStmt": "CREATE ACCESS METHOD", "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER",
            "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER", "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY"}[kind]


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
