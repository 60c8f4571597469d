"""``pgproxy check-backend``: the database setups that would let a person leave their identity.

Logs in as the pool role (the configuration's backend section, TLS included) to every
database clients can reach — ``backend.databases``, or when that is empty every database
that allows connections and is not a template — and reports every unsafe setting with its
fix. A database it cannot log in to is a finding too: it was not checked. The guard refuses
statements; these are the holes it cannot see.

The roles (the cluster's, checked once):

* the pool role is superuser, BYPASSRLS or CREATEROLE, or INHERITs the mapped roles
  (then it holds their privileges without SET ROLE);
* a mapped role is superuser, BYPASSRLS or CREATEROLE;
* ``backend.login = "per_role"``: a mapped role is a member of another mapped role or of the
  pool role (it is the session user, so SET ROLE reaches whatever it is a member of), or
  cannot log in to a database clients use.

Each database:

* TEMP is granted to PUBLIC or a mapped role (temporary functions are an escape path; under
  transaction pooling temporary objects also pass from one person to the next);
* a mapped role may CREATE in a schema (functions with dynamic SQL, SECURITY DEFINER);
* row-level security is enabled but not forced on a table a mapped role owns (owners
  bypass policies that are not forced);
* a function a mapped role may execute runs dynamic SQL or changes the role or settings
  (read from its body), is written in a language whose body cannot be read, or is SECURITY
  DEFINER without a search_path that ends with pg_temp; dblink is installed and executable.

With per_role it also prints the pg_hba.conf and pg_ident.conf lines for the configured
method (cert with ``backend.sslcert``, peer over a Unix socket, else a password); with
pool_role, a note recommending per_role. ``check`` collects, ``run`` prints. The rules on text (``body_reasons``,
``search_path_pinned``, ``login_guidance``, ``pool_mode_for``) are pure.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
from dataclasses import dataclass, field

from pgproxy.backend.connection import BackendConnection, open_connection
from pgproxy.config import Config
from pgproxy.errors import PgProxyError
from pgproxy.frontend.startup import quote_literal
from pgproxy.protocol import messages as msg

CLUSTER = "cluster"  # the tag of findings about roles, which every database shares
LOGINS_AT_ONCE = 8  # per_role: test logins in flight together

# What a function body may do that the guard would refuse in a statement: (pattern, why).
# Read from plpgsql and sql bodies as text, comments and strings included: a false alarm
# costs a look, a miss costs an identity.
_BODY_RULES = [
    (r"\bexecute\b", "runs dynamic SQL (EXECUTE)"),
    (r"\bset_config\b", "changes settings with set_config (pgproxy's identity settings too)"),
    (r"\b(?:set|reset)\s+(?:(?:session|local)\s+)?role\b", "changes the role (SET ROLE / RESET ROLE)"),
    (r"\b(?:set|reset)\s+(?:(?:session|local)\s+)?session\s+authorization\b",
     "changes the session user (SET SESSION AUTHORIZATION)"),
    (r"\b(?:set|reset)\s+(?:(?:session|local)\s+)?\"?pgproxy\.",
     "changes pgproxy's identity settings (SET pgproxy.…)"),
    (r"\breset\s+all\b", "resets every setting (RESET ALL)"),
    (r"\bdblink", "runs SQL on a new connection (dblink)"),
    (r"\bquery_to_xml", "runs SQL text it is given (query_to_xml)"),
    (r"\bts_stat\b", "runs SQL text it is given (ts_stat)"),
    (r"\bts_rewrite\b", "runs SQL text it is given (ts_rewrite)"),
]
_BODY_PATTERNS = [(re.compile(pattern, re.IGNORECASE), why) for pattern, why in _BODY_RULES]
READABLE_LANGUAGES = ("plpgsql", "sql")
# Extensions whose functions are escape routes themselves (members of other extensions are
# the extension's business and are not listed).
RISKY_EXTENSIONS = {"dblink": "runs SQL text on a new connection, as any role whose password it is given"}


@dataclass
class Report:
    databases: list[str] = field(default_factory=list)     # the databases checked
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (database or CLUSTER, problem, fix)
    guidance: list[str] = field(default_factory=list)      # per_role: pg_hba.conf / pg_ident.conf lines
    notes: list[str] = field(default_factory=list)


# --- pure rules ---------------------------------------------------------------------

def mapped_roles(cfg: Config) -> list[str]:
    """Every role the configuration can switch to (templates with {username} cannot be listed)."""
    roles = {rule.role for rule in cfg.roles if "{username}" not in rule.role}
    if cfg.auth.default_role and "{username}" not in cfg.auth.default_role:
        roles.add(cfg.auth.default_role)
    roles.update(account.role for account in (cfg.service_accounts or {}).values() if getattr(account, "role", ""))
    roles.update(policy.role for policy in cfg.policies)
    return sorted(roles)


def has_role_templates(cfg: Config) -> bool:
    return any("{username}" in rule.role for rule in cfg.roles) or "{username}" in cfg.auth.default_role


def login_mode(cfg: Config) -> str:
    return getattr(cfg.backend, "login", "pool_role")


def pool_mode_for(cfg: Config, database: str, role: str) -> str:
    """The server's choice: the role's mode, else the database's, else backend.pool_mode."""
    backend = cfg.backend
    return backend.role_pool_modes.get(role) or backend.database_pool_modes.get(database) or backend.pool_mode


def body_reasons(language: str, body: str) -> list[str]:
    """Why a function written in ``language`` with this body is an escape route ([] if it is not)."""
    if language not in READABLE_LANGUAGES:
        return []
    return [why for pattern, why in _BODY_PATTERNS if pattern.search(body or "")]


def language_reason(language: str, trusted: bool) -> str:
    """Why a function in this language is reported without reading it ("" for plpgsql and sql)."""
    if language in READABLE_LANGUAGES:
        return ""
    if language in ("c", "internal"):
        return f"runs C code (language {language}) outside pg_catalog, which no check can read"
    if not trusted:
        return f"is written in the untrusted language {language} (it can do anything the server's OS user can)"
    return f"is written in language {language}, whose body check-backend does not read (it can run dynamic SQL)"


def search_path_entries(value: str) -> list[str]:
    """The schemas of a search_path setting, as PostgreSQL reads them (quoted names kept as written)."""
    entries = []
    for item in value.split(","):
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] == '"':
            entries.append(item[1:-1].replace('""', '"'))
        elif item:
            entries.append(item.lower())
    return entries


def search_path_pinned(value: str | None) -> bool:
    """Does a function's ``search_path`` setting keep its callers' objects out of its name lookups?

    Set, without ``$user``, and ending with ``pg_temp``: unlisted, pg_temp is searched
    first for tables and types, so a caller's temporary table would stand in for one the
    function means (PostgreSQL's advice for SECURITY DEFINER functions)."""
    if value is None:
        return False
    entries = search_path_entries(value)
    return bool(entries) and entries[-1] == "pg_temp" and "$user" not in entries


def hba_name(name: str) -> str:
    """A database or role name as a pg_hba.conf / pg_ident.conf field."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.$-]*", name) and name not in (
            "all", "sameuser", "samerole", "samegroup", "replication"):
        return name
    return '"' + name.replace('"', '""') + '"'


def login_method(cfg: Config) -> str:
    """How the database should authenticate the mapped roles in per_role mode."""
    if cfg.backend.sslcert:
        return "cert"
    if cfg.backend.host.startswith("/"):
        return "peer"
    return "password"


def login_guidance(method: str, databases: list[str], roles: list[str], address: str,
                   certificate_cn: str, os_user: str, tls: bool) -> list[str]:
    """The pg_hba.conf and pg_ident.conf lines that let pgproxy log in as each mapped role.

    ``databases`` empty: all. One map, ``pgproxy``, from the name PostgreSQL sees (the
    certificate's CN, or the OS user on the Unix socket) to each role: nobody else may use it."""
    db_field = ",".join(hba_name(d) for d in databases) or "all"
    role_field = ",".join(hba_name(r) for r in roles) or "<role>"
    if method == "cert":
        lines = [f"    pg_hba.conf:   hostssl {db_field} {role_field} {address} cert map=pgproxy"]
        lines += [f"    pg_ident.conf: pgproxy {hba_name(certificate_cn)} {hba_name(r)}" for r in roles]
        lines.append("    (the server's ssl_ca_file must hold the CA that signed backend.sslcert)")
    elif method == "peer":
        lines = [f"    pg_hba.conf:   local {db_field} {role_field} peer map=pgproxy"]
        lines += [f"    pg_ident.conf: pgproxy {hba_name(os_user)} {hba_name(r)}" for r in roles]
        lines.append(f"    ({os_user} is the OS user this command runs as: use the one pgproxy runs as)")
    else:
        lines = [f"    pg_hba.conf:   {'hostssl' if tls else 'host'} {db_field} {role_field} {address} scram-sha-256",
                 "    (each role's password in backend.role_secrets_file; no pg_ident.conf lines)"]
    return lines


def _network(address: str | None) -> str:
    if not address:
        return "<pgproxy's address>"
    return f"{address}/128" if ":" in address else f"{address}/32"


def _certificate_cn(path: str) -> str:
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        with open(path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else "<CN of backend.sslcert>"
    except (OSError, ValueError, ImportError):
        return "<CN of backend.sslcert>"


def _os_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# --- SQL ----------------------------------------------------------------------------

def _array(names: list[str]) -> str:
    return "ARRAY[" + ", ".join(quote_literal(n) for n in names) + "]::text[]" if names else "ARRAY[]::text[]"


def _role_queries(pool_role: str, roles: list[str]) -> list[str]:
    """Queries returning (problem, fix) rows about the roles themselves."""
    pool, mapped = quote_literal(pool_role), _array(roles)
    return [
        "SELECT v.problem, v.fix FROM pg_roles, LATERAL (VALUES "
        "(rolsuper, ' is a superuser', ' NOSUPERUSER'), (rolbypassrls, ' has BYPASSRLS', ' NOBYPASSRLS'), "
        "(rolcreaterole, ' has CREATEROLE', ' NOCREATEROLE'), "
        "(rolinherit, ' INHERITs the roles it is granted', ' NOINHERIT')) AS a(bad, what, clause), "
        "LATERAL (SELECT 'pool role ' || rolname || a.what, 'ALTER ROLE ' || quote_ident(rolname) || a.clause) "
        f"AS v(problem, fix) WHERE rolname = {pool} AND a.bad",
        "SELECT v.problem, v.fix FROM pg_roles, LATERAL (VALUES "
        "(rolsuper, ' is a superuser', ' NOSUPERUSER'), (rolbypassrls, ' has BYPASSRLS', ' NOBYPASSRLS'), "
        "(rolcreaterole, ' has CREATEROLE', ' NOCREATEROLE')) AS a(bad, what, clause), "
        "LATERAL (SELECT 'mapped role ' || rolname || a.what, 'ALTER ROLE ' || quote_ident(rolname) || a.clause) "
        f"AS v(problem, fix) WHERE rolname = ANY({mapped}) AND a.bad ORDER BY 1",
    ]


def _membership_query(pool_role: str, roles: list[str]) -> str:
    """per_role: (problem, fix) for each mapped role that is a member of another mapped role or
    the pool role; the fix revokes the direct grants that lead there."""
    others = _array(sorted(set(roles) | {pool_role}))
    return (
        "SELECT 'mapped role ' || r.rolname || ' is a member of ' || o.rolname || "
        "CASE WHEN o.rolname = " + quote_literal(pool_role) + " THEN ', the pool role' ELSE '' END || "
        "': logged in as itself (backend.login = per_role), SET ROLE ' || o.rolname || ' reaches it', "
        "'REVOKE ' || string_agg(DISTINCT quote_ident(g.rolname), ', ') || ' FROM ' || quote_ident(r.rolname) "
        "FROM pg_roles r, pg_roles o, pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        f"WHERE r.rolname = ANY({_array(roles)}) AND o.rolname = ANY({others}) AND r.oid <> o.oid "
        "AND pg_has_role(r.oid, o.oid, 'MEMBER') AND m.member = r.oid "
        "AND (g.oid = o.oid OR pg_has_role(g.oid, o.oid, 'MEMBER')) "
        "GROUP BY r.rolname, o.rolname ORDER BY r.rolname, o.rolname")


def _database_queries(roles: list[str]) -> list[str]:
    """Queries returning (problem, fix) rows about the current database."""
    mapped = _array(roles)
    return [
        "SELECT 'TEMP on database ' || current_database() || ' is granted to PUBLIC', "
        "'REVOKE TEMPORARY ON DATABASE ' || quote_ident(current_database()) || ' FROM PUBLIC' FROM pg_database "
        "WHERE datname = current_database() AND (datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(datacl) a "
        "WHERE a.grantee = 0 AND a.privilege_type = 'TEMPORARY'))",
        "SELECT 'mapped role ' || r.rolname || ' may CREATE in schema ' || n.nspname, "
        "'REVOKE CREATE ON SCHEMA ' || quote_ident(n.nspname) || ' FROM ' || quote_ident(r.rolname) || "
        "' (and from PUBLIC)' FROM pg_roles r, pg_namespace n "
        f"WHERE r.rolname = ANY({mapped}) AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' "
        "AND has_schema_privilege(r.oid, n.oid, 'CREATE') ORDER BY 1",
        "SELECT 'table ' || c.oid::regclass || ' has row-level security that its owner ' || "
        "pg_get_userbyid(c.relowner) || ', a mapped role, bypasses (not FORCEd)', "
        "'ALTER TABLE ' || c.oid::regclass || ' FORCE ROW LEVEL SECURITY (or give it an owner that no mapped "
        "role is)' FROM pg_class c WHERE c.relrowsecurity AND NOT c.relforcerowsecurity AND EXISTS "
        f"(SELECT 1 FROM pg_roles r WHERE r.rolname = ANY({mapped}) AND pg_has_role(r.oid, c.relowner, 'MEMBER')) "
        "ORDER BY 1",
    ]


def _temp_query(roles: list[str]) -> str:
    return (f"SELECT rolname, quote_ident(rolname) FROM pg_roles WHERE rolname = ANY({_array(roles)}) "
            "AND has_database_privilege(oid, current_database(), 'TEMPORARY') ORDER BY 1")


def _function_query(roles: list[str], server_version: int) -> str:
    """One row per function outside pg_catalog and information_schema (and not an extension's)
    that a mapped role may execute: signature, kind, owner, language, trusted, SECURITY DEFINER,
    search_path setting, body, the roles."""
    # BEGIN ATOMIC bodies (14+) are kept parsed, not as text: deparse them.
    body = "coalesce(pg_get_function_sqlbody(p.oid), p.prosrc)" if server_version >= 140000 else "p.prosrc"
    return (
        "SELECT * FROM (SELECT quote_ident(n.nspname) || '.' || quote_ident(p.proname) || '(' || "
        "pg_get_function_identity_arguments(p.oid) || ')', "
        "CASE p.prokind WHEN 'p' THEN 'procedure' ELSE 'function' END, pg_get_userbyid(p.proowner), l.lanname, "
        "l.lanpltrusted::text, p.prosecdef::text, "
        "(SELECT substr(c, 13) FROM unnest(p.proconfig) c WHERE c LIKE 'search\\_path=%' LIMIT 1), "
        f"{body}, "
        "array_to_string(ARRAY(SELECT r.rolname FROM pg_roles r "
        f"WHERE r.rolname = ANY({_array(roles)}) AND has_function_privilege(r.oid, p.oid, 'EXECUTE') "
        "ORDER BY 1), ',') AS roles "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' "
        "AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND p.prokind <> 'a' "  # an aggregate's parts are listed themselves
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid "
        "AND d.deptype = 'e')) AS f WHERE roles <> '' ORDER BY 1")


def _extension_query(roles: list[str]) -> str:
    names = _array(sorted(RISKY_EXTENSIONS))
    return (
        "SELECT e.extname, quote_ident(e.extname), array_to_string(ARRAY(SELECT r.rolname FROM pg_roles r "
        f"WHERE r.rolname = ANY({_array(roles)}) AND EXISTS (SELECT 1 FROM pg_depend d "
        "WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid AND d.classid = 'pg_proc'::regclass "
        "AND d.deptype = 'e' AND has_function_privilege(r.oid, d.objid, 'EXECUTE')) ORDER BY 1), ',') "
        f"FROM pg_extension e WHERE e.extname = ANY({names}) ORDER BY 1")


# --- checking -----------------------------------------------------------------------


async def _rows(conn: BackendConnection, query: str) -> list[list[str | None]]:
    return [msg.parse_data_row(raw[5:]) for kind, raw in await conn.run(query) if kind == ord("D")]


async def _login(cfg: Config, database: str, user: str, password: str | None) -> BackendConnection:
    backend = cfg.backend
    return await open_connection(backend.host, backend.port, database, user, password, backend.connect_timeout_s,
                                 cfg.backend_tls, backend.channel_binding)


async def _list_databases(cfg: Config) -> list[str]:
    """Every database a client could ask for: those that allow connections and are not templates."""
    failure: PgProxyError | None = None
    for database in ("postgres", "template1"):
        try:
            conn = await _login(cfg, database, cfg.backend.user, cfg.backend_password)
        except PgProxyError as exc:
            failure = failure or exc
            continue
        try:
            return [row[0] for row in await _rows(
                conn, "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
        finally:
            conn.close("check-backend listed the databases")
    raise failure


def _function_findings(rows: list[list[str | None]]) -> list[tuple[str, str]]:
    found = []
    for signature, kind, owner, language, trusted, secdef, search_path, body, roles in rows:
        who = _roles_phrase(roles)
        grantees = ", ".join(["PUBLIC", *roles.split(",")])
        reasons = body_reasons(language, body) or [language_reason(language, trusted == "true")]
        reasons = [r for r in reasons if r]
        if reasons:
            found.append((f"{kind} {signature} (owner {owner}, {language}) may be executed by {who} "
                          f"and {'; '.join(reasons)}",
                          f"REVOKE EXECUTE ON {kind.upper()} {signature} FROM {grantees}"))
        if secdef == "true" and not search_path_pinned(search_path):
            why = ("does not set search_path" if search_path is None else
                   f"has search_path = {search_path}, which does not end with pg_temp")
            found.append((f"SECURITY DEFINER {kind} {signature} (owner {owner}) may be executed by "
                          f"{who} and {why}: it runs with {owner}'s privileges and finds the caller's objects first",
                          f"ALTER {kind.upper()} {signature} SET search_path = pg_catalog, pg_temp"))
    return found


async def _check_database(cfg: Config, conn: BackendConnection, database: str, roles: list[str],
                          report: Report) -> None:
    add = report.findings.append
    for query in _database_queries(roles):
        for problem, fix in await _rows(conn, query):
            add((database, problem, fix))
    quoted_db = (await _rows(conn, "SELECT quote_ident(current_database())"))[0][0]
    for role, quoted in await _rows(conn, _temp_query(roles)):
        if pool_mode_for(cfg, database, role) == "transaction":
            add((database, f"mapped role {role} may create temporary objects in {database}, where it is "
                           "transaction-pooled: temporary objects leak between people sharing a connection",
                 f"REVOKE TEMPORARY ON DATABASE {quoted_db} FROM PUBLIC, {quoted}"))
        else:
            add((database, f"mapped role {role} may create temporary objects in {database}",
                 f"REVOKE TEMPORARY ON DATABASE {quoted_db} FROM {quoted} (and from PUBLIC)"))
    if not roles:
        return
    version = int((await _rows(conn, "SHOW server_version_num"))[0][0])
    for problem, fix in _function_findings(await _rows(conn, _function_query(roles, version))):
        add((database, problem, fix))
    for name, quoted, who in await _rows(conn, _extension_query(roles)):
        if who:
            add((database, f"extension {name} is installed and {_roles_phrase(who)} may execute its functions: "
                           f"it {RISKY_EXTENSIONS[name]}",
                 f"DROP EXTENSION {quoted} (or REVOKE EXECUTE on each of its functions FROM PUBLIC, "
                 f"{who.replace(',', ', ')})"))


async def _check_cluster(cfg: Config, conn: BackendConnection, roles: list[str], existing: list[str],
                         report: Report) -> None:
    for query in _role_queries(cfg.backend.user, existing):
        for problem, fix in await _rows(conn, query):
            report.findings.append((CLUSTER, problem, fix))
    if login_mode(cfg) == "per_role" and existing:
        for problem, fix in await _rows(conn, _membership_query(cfg.backend.user, existing)):
            report.findings.append((CLUSTER, problem, fix))
    missing = [r for r in roles if r not in existing]
    if missing and login_mode(cfg) != "per_role":  # per_role: each is a failed login below
        report.notes.append(f"mapped role {', '.join(missing)} does not exist: people mapped to it cannot log in")


async def _check_logins(cfg: Config, conn: BackendConnection, database: str,
                        roles: list[str]) -> list[tuple[str, str, str]]:
    """per_role: log in as each mapped role; (role, failure, fix) for each that cannot."""
    facts = {row[0]: row[1:] for row in await _rows(conn, (
        "SELECT rolname, quote_ident(rolname), rolcanlogin::text, "
        "has_database_privilege(oid, current_database(), 'CONNECT')::text "
        f"FROM pg_roles WHERE rolname = ANY({_array(roles)})"))}
    quoted_db = (await _rows(conn, "SELECT quote_ident(current_database())"))[0][0]
    passwords = getattr(cfg, "role_passwords", None) or {}
    gate = asyncio.Semaphore(LOGINS_AT_ONCE)

    async def attempt(role: str) -> str | None:
        async with gate:
            try:
                (await _login(cfg, database, role, passwords.get(role))).close("check-backend login test done")
                return None
            except PgProxyError as exc:
                return exc.log_detail or str(exc)

    failed = []
    for role, failure in zip(roles, await asyncio.gather(*(attempt(role) for role in roles))):
        if failure is None:
            continue
        quoted, can_login, can_connect = facts.get(role, (None, None, None))
        if quoted is None:
            fix = f"CREATE ROLE {role} LOGIN (and GRANT it what the people mapped to it may do)"
        elif can_login != "true":
            fix = f"ALTER ROLE {quoted} LOGIN"
        elif can_connect != "true":
            fix = f"GRANT CONNECT ON DATABASE {quoted_db} TO {quoted}"
        elif login_method(cfg) == "password" and role not in passwords:
            fix = f"put {role}'s password in backend.role_secrets_file (and the pg_hba.conf line below)"
        else:
            fix = "add the pg_hba.conf and pg_ident.conf lines below, then SELECT pg_reload_conf()"
        failed.append((role, failure, fix))
    return failed


def _login_findings(failed: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str]]:
    """One finding per role and fix, naming every database it failed in (a NOLOGIN role fails
    the same way in each); the reason is the first database's."""
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for database, role, failure, fix in failed:
        grouped.setdefault((role, fix), []).append((database, failure))
    found = []
    for (role, fix), failures in sorted(grouped.items()):
        where = ", ".join(database for database, _ in failures)
        first, reason = failures[0]
        found.append((where, f"mapped role {role} cannot log in to {where} (backend.login = per_role); "
                             f"{first}: {reason}", fix))
    return found


def _roles_phrase(roles: str) -> str:
    names = [r for r in roles.split(",") if r]
    return f"mapped role{'s' if len(names) > 1 else ''} {', '.join(names)}"


async def check(cfg: Config) -> Report:
    """Everything unsafe in every database clients can reach. Raises PgProxyError only when
    the databases cannot even be listed."""
    backend = cfg.backend
    report = Report()
    roles = mapped_roles(cfg)
    per_role = login_mode(cfg) == "per_role"
    databases = list(backend.databases) or await _list_databases(cfg)
    address = None
    cluster_checked = False
    failed: list[tuple[str, str, str, str]] = []  # per_role: (database, role, failure, fix)
    for database in databases:
        try:
            conn = await _login(cfg, database, backend.user, cfg.backend_password)
        except PgProxyError as exc:
            report.findings.append((database, f"cannot log in to database {database} as pool role {backend.user}, "
                                              f"so it was not checked: {exc.log_detail or exc}",
                                    f"let {backend.user} connect to {database} (GRANT CONNECT, pg_hba.conf), or "
                                    "list only the databases clients use in backend.databases"))
            continue
        try:
            existing = [row[0] for row in await _rows(
                conn, f"SELECT rolname FROM pg_roles WHERE rolname = ANY({_array(roles)}) ORDER BY 1")]
            if not cluster_checked:
                await _check_cluster(cfg, conn, roles, existing, report)
                address = (await _rows(conn, "SELECT host(inet_client_addr())"))[0][0]
                cluster_checked = True
            await _check_database(cfg, conn, database, existing, report)
            if per_role and roles:
                failed += [(database, *f) for f in await _check_logins(cfg, conn, database, roles)]
            report.databases.append(database)
        except PgProxyError as exc:
            report.findings.append((database, f"could not finish checking {database}: {exc.log_detail or exc}",
                                    "run check-backend again; if it keeps failing, report it"))
        finally:
            conn.close("check-backend done")
    report.findings += _login_findings(failed)
    if per_role:
        method = login_method(cfg)
        report.guidance = [f"backend.login = per_role: PostgreSQL must let pgproxy log in as each mapped role "
                           f"({method}); add these lines before any line that would match them first:"]
        report.guidance += login_guidance(method, list(backend.databases), roles, _network(address),
                                          _certificate_cn(backend.sslcert) if backend.sslcert else "",
                                          _os_user(), backend.sslmode != "disable")
        if has_role_templates(cfg):
            report.guidance.append("    (roles from {username} templates cannot be listed: add each to these lines)")
    else:
        report.notes.append(f"backend.login = pool_role: every backend connection logs in as {backend.user}; "
                            "backend.login = per_role logs in as the mapped role itself, so no SET ROLE can reach "
                            "the pool role's other roles")
    return report


def run(cfg: Config) -> int:
    """Exit 0: nothing unsafe; 1: something unsafe (each printed with its fix); 2: cannot check."""
    try:
        report = asyncio.run(check(cfg))
    except PgProxyError as exc:
        print(f"error: cannot check the database: {exc.log_detail or exc}")
        return 2
    if not report.databases:
        for _, problem, _ in report.findings:
            print(f"error: {problem}")
        return 2
    for database, problem, fix in report.findings:
        print(f"UNSAFE [{database}] {problem}\n    fix: {fix}")
    for line in report.guidance:
        print(line)
    checked = ", ".join(report.databases)
    if report.findings:
        print(f"{len(report.findings)} unsafe setting(s) found; databases checked: {checked}")
    else:
        roles = mapped_roles(cfg)
        print(f"ok: no unsafe setting found for pool role {cfg.backend.user} and mapped roles "
              f"{', '.join(roles) or '(none listed)'} in {checked}")
    for note in report.notes:
        print(f"note: {note}")
    return 1 if report.findings else 0
