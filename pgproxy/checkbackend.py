"""``pgproxy check-backend``: the database setups that would let a person leave their identity.

Connects as the pool role (the configuration's backend section, TLS included) to each
database in ``backend.databases`` (or ``postgres``) and reports every unsafe setting with
its fix. The guard refuses statements; these are the holes it cannot see:

* the pool role is superuser, BYPASSRLS or CREATEROLE, or INHERITs the mapped roles
  (then it holds their privileges without SET ROLE);
* a mapped role is superuser, BYPASSRLS or CREATEROLE;
* TEMP is granted to PUBLIC or a mapped role (temporary functions are an escape path);
* a mapped role may CREATE in a schema (functions with dynamic SQL, SECURITY DEFINER);
* row-level security is enabled but not forced on a table a mapped role owns (owners
  bypass policies that are not forced).
"""

from __future__ import annotations

import asyncio

from pgproxy.backend.connection import open_connection
from pgproxy.config import Config
from pgproxy.errors import PgProxyError
from pgproxy.frontend.startup import quote_literal


def mapped_roles(cfg: Config) -> list[str]:
    """Every role the configuration can switch to (templates with {username} cannot be listed)."""
    roles = {rule.role for rule in cfg.roles if "{username}" not in rule.role}
    if cfg.auth.default_role and "{username}" not in cfg.auth.default_role:
        roles.add(cfg.auth.default_role)
    roles.update(account.role for account in (cfg.service_accounts or {}).values() if getattr(account, "role", ""))
    roles.update(policy.role for policy in cfg.policies)
    return sorted(roles)


def _checks(pool_role: str, roles: list[str]) -> list[tuple[str, str]]:
    """(query returning one row per problem as text, fix) pairs."""
    mapped = "ARRAY[" + ", ".join(quote_literal(r) for r in roles) + "]::text[]" if roles else "ARRAY[]::text[]"
    pool = quote_literal(pool_role)
    return [
        (f"SELECT 'pool role ' || rolname || ' is a superuser' FROM pg_roles WHERE rolname = {pool} AND rolsuper",
         f"ALTER ROLE {pool_role} NOSUPERUSER"),
        (f"SELECT 'pool role ' || rolname || ' has BYPASSRLS' FROM pg_roles WHERE rolname = {pool} AND rolbypassrls",
         f"ALTER ROLE {pool_role} NOBYPASSRLS"),
        (f"SELECT 'pool role ' || rolname || ' has CREATEROLE' FROM pg_roles WHERE rolname = {pool} "
         "AND rolcreaterole", f"ALTER ROLE {pool_role} NOCREATEROLE"),
        (f"SELECT 'pool role ' || rolname || ' INHERITs the roles it is granted' FROM pg_roles "
         f"WHERE rolname = {pool} AND rolinherit", f"ALTER ROLE {pool_role} NOINHERIT"),
        (f"SELECT 'mapped role ' || rolname || ' is a superuser' FROM pg_roles WHERE rolname = ANY({mapped}) "
         "AND rolsuper", "ALTER ROLE <role> NOSUPERUSER"),
        (f"SELECT 'mapped role ' || rolname || ' has BYPASSRLS' FROM pg_roles WHERE rolname = ANY({mapped}) "
         "AND rolbypassrls", "ALTER ROLE <role> NOBYPASSRLS"),
        (f"SELECT 'mapped role ' || rolname || ' has CREATEROLE' FROM pg_roles WHERE rolname = ANY({mapped}) "
         "AND rolcreaterole", "ALTER ROLE <role> NOCREATEROLE"),
        ("SELECT 'TEMP on database ' || current_database() || ' is granted to PUBLIC' FROM pg_database "
         "WHERE datname = current_database() AND (datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(datacl) a "
         "WHERE a.grantee = 0 AND a.privilege_type = 'TEMPORARY'))",
         "REVOKE TEMPORARY ON DATABASE <database> FROM PUBLIC"),
        (f"SELECT 'mapped role ' || r || ' may create temporary objects in ' || current_database() "
         f"FROM unnest({mapped}) AS r WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) "
         "AND has_database_privilege(r, current_database(), 'TEMPORARY')",
         "REVOKE TEMPORARY ON DATABASE <database> FROM <role> (and from PUBLIC)"),
        (f"SELECT 'mapped role ' || r || ' may CREATE in schema ' || n.nspname FROM unnest({mapped}) AS r, "
         "pg_namespace n WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) "
         "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
         "AND n.nspname NOT LIKE 'pg_temp%' AND has_schema_privilege(r, n.oid, 'CREATE')",
         "REVOKE CREATE ON SCHEMA <schema> FROM <role> (and from PUBLIC)"),
        (f"SELECT 'table ' || c.oid::regclass || ' has row-level security that its owner ' || "
         "pg_get_userbyid(c.relowner) || ', a mapped role, bypasses (not FORCEd)' FROM pg_class c "
         f"WHERE c.relrowsecurity AND NOT c.relforcerowsecurity AND EXISTS (SELECT 1 FROM unnest({mapped}) r "
         "JOIN pg_roles ON rolname = r WHERE pg_has_role(r, c.relowner, 'MEMBER'))",
         "ALTER TABLE <table> FORCE ROW LEVEL SECURITY (or give it an owner that no mapped role is)"),
    ]


async def check(cfg: Config) -> list[tuple[str, str, str]]:
    """(database, problem, fix) for every unsafe setting found."""
    backend = cfg.backend
    found = []
    for database in backend.databases or ["postgres"]:
        conn = await open_connection(backend.host, backend.port, database, backend.user, cfg.backend_password,
                                     backend.connect_timeout_s, cfg.backend_tls, backend.channel_binding)
        try:
            for query, fix in _checks(backend.user, mapped_roles(cfg)):
                for kind, raw in await conn.run(query):
                    if kind == ord("D"):
                        found.append((database, _first_text(raw), fix.replace("<database>", database)))
        finally:
            conn.close("check-backend done")
    return found


def _first_text(raw: bytes) -> str:
    """The first column of a DataRow (type, int32 length, int16 count, int32 size, bytes)."""
    length = int.from_bytes(raw[7:11], "big", signed=True)
    return raw[11:11 + length].decode("utf-8", "replace") if length >= 0 else ""


def run(cfg: Config) -> int:
    try:
        found = asyncio.run(check(cfg))
    except PgProxyError as exc:
        print(f"error: cannot check the database: {exc.log_detail or exc}")
        return 2
    for database, problem, fix in found:
        print(f"UNSAFE [{database}] {problem}\n    fix: {fix}")
    roles = mapped_roles(cfg)
    if not found:
        print(f"ok: no unsafe setting found for pool role {cfg.backend.user} and mapped roles "
              f"{', '.join(roles) or '(none listed)'}")
    return 1 if found else 0

