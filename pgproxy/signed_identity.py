"""Identity settings that a statement cannot forge.

``pgproxy.user`` and ``pgproxy.groups`` are ordinary settings: a ``set_config`` that gets
past the statement guard rewrites them. So the proxy also sets ``pgproxy.signature``, an
HMAC-SHA256 over what it set and the backend process id, with a key the database roles
cannot read, and policies ask ``pgproxy.person()`` / ``pgproxy.groups()`` instead of
``current_setting``: they answer only when the signature verifies, else NULL.

    message   = user \\x1f groups_literal \\x1f auth_method \\x1f backend_pid   (UTF-8)
    signature = lowercase hex of HMAC-SHA256(key, message)

The pid binds a signature to one backend connection: copied to another, it fails. No
field may contain \\x1f, so a message splits back into its fields one way only.

The database side is SQL an administrator installs (``install_sql``): the key is stored
as HMAC's two padded keys in a table only the functions' owner reads, so the functions
need nothing but the built-in sha256() — no pgcrypto. Everything here is pure except
``load_key``, which reads the key file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat

KEY_BYTES = 32
SETTING = "pgproxy.signature"
SEPARATOR = "\x1f"  # chr(31), the ASCII unit separator
_BLOCK = 64  # SHA-256's block size: HMAC pads the key to it


class KeyFileError(ValueError):
    """The key file is missing, unreadable, malformed or readable by others."""


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    """The key file's content."""
    return key.hex() + "\n"


def load_key(path: str | os.PathLike) -> bytes:
    """The key in ``path`` (64 hex digits); refuses a file that group or others may access."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {str(path)!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # the file read, through any symlink (Kubernetes secrets are)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {str(path)!r} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(f"key file {str(path)!r} is accessible to group or others "
                               f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        text = os.read(fd, 1024)
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"key file {str(path)!r} does not hold {KEY_BYTES} bytes in hex "
                           "(make one with `pgproxy identity-key FILE`)")
    return key


def message(user: str, groups_literal: str, auth_method: str, pid: int) -> bytes:
    fields = (user, groups_literal, auth_method)
    if any(SEPARATOR in f for f in fields):
        raise ValueError("an identity field contains the separator \\x1f; refusing to sign it")
    return SEPARATOR.join((*fields, str(int(pid)))).encode("utf-8")


def sign(key: bytes, user: str, groups_literal: str, auth_method: str, pid: int) -> str:
    """The value of ``pgproxy.signature`` for these settings on backend process ``pid``."""
    return hmac.new(key, message(user, groups_literal, auth_method, pid), hashlib.sha256).hexdigest()


def pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC's inner and outer padded keys: HMAC(k, m) = sha256(outer || sha256(inner || m))."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"the key must be {KEY_BYTES} bytes")
    padded = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in padded), bytes(b ^ 0x5C for b in padded)


def quote_ident(name: str) -> str:
    if not name or "\0" in name:
        raise ValueError("not a role name")
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    # E'' form: correct whatever standard_conforming_strings says.
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


# The settings once, then one CASE whose branches run in order: the signature's form is
# checked before decode() could raise, so a missing or malformed setting is NULL, never
# an error. No key row (not installed in this database) gives no row, also NULL.
_VERIFIED = """
    SELECT CASE
             WHEN s.person IS NULL OR s.groups IS NULL OR s.auth_method IS NULL OR s.signature IS NULL THEN NULL
             WHEN pg_catalog.length(s.signature) <> 64
               OR pg_catalog.ltrim(s.signature, '0123456789abcdef') <> '' THEN NULL
             WHEN pg_catalog.strpos(s.person || s.groups || s.auth_method, pg_catalog.chr(31)) <> 0 THEN NULL
             WHEN pg_catalog.sha256(k.outer_pad || pg_catalog.sha256(k.inner_pad || pg_catalog.convert_to(
                    pg_catalog.concat_ws(pg_catalog.chr(31), s.person, s.groups, s.auth_method,
                                         pg_catalog.pg_backend_pid()::pg_catalog.text), 'UTF8')))
                  = pg_catalog.decode(s.signature, 'hex') THEN {result}
           END
      FROM (SELECT pg_catalog.current_setting('pgproxy.user', true) AS person,
                   pg_catalog.current_setting('pgproxy.groups', true) AS groups,
                   pg_catalog.current_setting('pgproxy.auth_method', true) AS auth_method,
                   pg_catalog.current_setting('pgproxy.signature', true) AS signature) AS s,
           pgproxy.signing_key AS k
"""

# SECURITY DEFINER to read the key table as its owner; the fixed search_path keeps a
# caller's objects (pg_temp last) from standing in for any name, operators included.
# PARALLEL RESTRICTED: pg_backend_pid() must be the leader's, and a parallel-unsafe
# function in a policy would forbid parallel plans for the whole query.
_FUNCTION = """
CREATE OR REPLACE FUNCTION pgproxy.{name}() RETURNS {returns}
    LANGUAGE sql STABLE SECURITY DEFINER PARALLEL RESTRICTED
    SET search_path = pg_catalog, pg_temp
AS $body${verified}$body$;
"""


def install_sql(key: bytes, owner: str | None = None) -> str:
    """SQL an administrator runs in each database (``psql -v ON_ERROR_STOP=1``): creates or
    updates schema ``pgproxy``, its key table and ``person()`` / ``groups()``. Running it
    again with another key rotates the key. ``owner``: the role that owns it all (default:
    the one running it); never a mapped role or the pool role, which could then read the key.
    """
    inner, outer = pads(key)
    target = quote_ident(owner) if owner is not None else "CURRENT_USER"
    # The owner reaches the check below as a setting: a name is never text inside a DO body.
    owner_setting = _quote_literal(owner or "")
    person = _FUNCTION.format(name="person", returns="text", verified=_VERIFIED.format(result="s.person"))
    groups = _FUNCTION.format(name="groups", returns="text[]",
                              verified=_VERIFIED.format(result="s.groups::pg_catalog.text[]"))
    return f"""-- pgproxy signed identity: pgproxy.person() and pgproxy.groups() for row-level security.
-- Generated by `pgproxy identity-sql`; it contains the signing key: do not keep or share it.
BEGIN;
SET LOCAL client_min_messages = warning;  -- no "already exists, skipping" on a re-run

-- Keep the key out of the server log (only a superuser may change these; others skip it).
DO $quiet$
BEGIN
    IF (SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = CURRENT_USER) THEN
        PERFORM pg_catalog.set_config('log_statement', 'none', true);
        PERFORM pg_catalog.set_config('log_min_duration_statement', '-1', true);
        PERFORM pg_catalog.set_config('log_min_error_statement', 'panic', true);
    END IF;
END
$quiet$;

CREATE SCHEMA IF NOT EXISTS pgproxy;
SET LOCAL pgproxy.install_owner = {owner_setting};

-- A schema someone else made may hold their objects (a trigger on the key table would
-- see the key): refuse to install into it.
DO $check$
DECLARE
    found text;
    wanted text := pg_catalog.current_setting('pgproxy.install_owner');  -- '' without --owner
BEGIN
    SELECT pg_catalog.pg_get_userbyid(n.nspowner) INTO found
      FROM pg_catalog.pg_namespace AS n WHERE n.nspname = 'pgproxy';
    IF found NOT IN (CURRENT_USER::pg_catalog.text, wanted) THEN
        RAISE EXCEPTION 'schema pgproxy is owned by %, not by the installing role or --owner',
            pg_catalog.quote_ident(found)
            USING HINT = 'Pass --owner with that role if it is the administrator, or drop the schema.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace AS n, pg_catalog.aclexplode(n.nspacl) AS a
                WHERE n.nspname = 'pgproxy' AND a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner) THEN
        RAISE EXCEPTION 'another role may CREATE in schema pgproxy; revoke that first';
    END IF;
END
$check$;

CREATE TABLE IF NOT EXISTS pgproxy.signing_key (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    inner_pad bytea NOT NULL CHECK (pg_catalog.length(inner_pad) = 64),
    outer_pad bytea NOT NULL CHECK (pg_catalog.length(outer_pad) = 64),
    installed_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO pgproxy.signing_key (only_row, inner_pad, outer_pad, installed_at)
VALUES (true, pg_catalog.decode('{inner.hex()}', 'hex'), pg_catalog.decode('{outer.hex()}', 'hex'),
        pg_catalog.now())
ON CONFLICT (only_row) DO UPDATE
   SET inner_pad = excluded.inner_pad, outer_pad = excluded.outer_pad, installed_at = excluded.installed_at;
{person}{groups}
ALTER SCHEMA pgproxy OWNER TO {target};
ALTER TABLE pgproxy.signing_key OWNER TO {target};
ALTER FUNCTION pgproxy.person() OWNER TO {target};
ALTER FUNCTION pgproxy.groups() OWNER TO {target};

REVOKE ALL ON SCHEMA pgproxy FROM PUBLIC;
GRANT USAGE ON SCHEMA pgproxy TO PUBLIC;
REVOKE ALL ON TABLE pgproxy.signing_key FROM PUBLIC;
REVOKE ALL ON FUNCTION pgproxy.person(), pgproxy.groups() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgproxy.person(), pgproxy.groups() TO PUBLIC;

-- Nobody but the owner may read the key, whatever was granted before.
DO $verify$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c, pg_catalog.aclexplode(c.relacl) AS a
                WHERE c.oid = 'pgproxy.signing_key'::pg_catalog.regclass AND a.grantee <> c.relowner) THEN
        RAISE EXCEPTION 'a role other than its owner holds privileges on pgproxy.signing_key; revoke them';
    END IF;
END
$verify$;

COMMIT;
"""
