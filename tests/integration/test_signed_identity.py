"""Signed identity: pgproxy.person() and pgproxy.groups() answer only for the settings the
proxy signed for this backend connection; a forged or copied setting gives NULL, and the
row-level security built on them shows nothing.

The direct tests (no proxy) set the settings with a signature computed here, on a real
connection as a mapped role; the proxy tests log in through pgproxy with
``[identity] signing_key_file`` in both pool modes.
"""

from __future__ import annotations

import re
import signal
import time

import psycopg
import pytest

from pgproxy import signed_identity as si
from pgproxy.demo import POOL_ROLE
from pgproxy.pgcluster import PgCluster

ALICE_GROUPS = ["sales_emea", "staff"]
ALICE_LITERAL = '{"sales_emea","staff"}'

# A table of the kind the README shows: a person's own rows, and rows for one of their groups.
TABLE = """
CREATE TABLE signed_notes (id serial PRIMARY KEY, author text NOT NULL, audience text, body text NOT NULL);
ALTER TABLE signed_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY by_person ON signed_notes FOR SELECT
  USING (author = (SELECT pgproxy.person()) OR audience = ANY ((SELECT pgproxy.groups())::text[]));
GRANT SELECT ON signed_notes TO emea_analyst, amer_analyst;
INSERT INTO signed_notes (author, audience, body) VALUES
  ('alice', NULL, 'alice private'), ('bob', NULL, 'bob private'), ('carol', 'staff', 'for staff');
"""


@pytest.fixture(scope="module")
def signing_key(database, tmp_path_factory):
    """The key, installed in database demo, and its key file; removed again afterwards."""
    key = si.generate_key()
    path = tmp_path_factory.mktemp("identity") / "identity.key"
    path.touch(0o600)
    path.write_text(si.encode_key(key))
    database.psql(si.install_sql(key) + TABLE, database="demo")
    yield key, path
    database.psql("DROP TABLE signed_notes; DROP SCHEMA pgproxy CASCADE;", database="demo")


@pytest.fixture
def as_analyst(database, signing_key):
    """A direct connection (no proxy) as the pool role after SET ROLE emea_analyst: neither
    is a superuser, as through the proxy."""
    conns = []

    def connect(role: str = "emea_analyst") -> psycopg.Connection:
        conn = psycopg.connect(host=database.host, port=database.port, dbname="demo", user=POOL_ROLE,
                               password=database.pool_password, autocommit=True)
        conns.append(conn)
        if role:
            conn.execute(f"SET ROLE {role}")
        return conn

    yield connect
    for conn in conns:
        conn.close()


def _set(conn, user: str, groups: str, method: str, signature: str) -> None:
    conn.execute("SELECT set_config('pgproxy.user', %s, false), set_config('pgproxy.groups', %s, false), "
                 "set_config('pgproxy.auth_method', %s, false), set_config('pgproxy.signature', %s, false)",
                 (user, groups, method, signature))


def _person(conn):
    """(person(), groups(), the notes that RLS shows), in one statement."""
    return conn.execute("SELECT pgproxy.person(), pgproxy.groups(), "
                        "ARRAY(SELECT body FROM signed_notes ORDER BY id)").fetchone()


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


# --- directly in the database -------------------------------------------------------------

def test_a_signature_made_for_this_connection_verifies(as_analyst, signing_key):
    key, _ = signing_key
    conn = as_analyst()
    assert conn.execute("SELECT current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = session_user)"
                        ).fetchone() == ("emea_analyst", False)
    assert _person(conn) == (None, None, [])  # nothing set yet
    _set(conn, "alice", ALICE_LITERAL, "jwt", si.sign(key, "alice", ALICE_LITERAL, "jwt", _pid(conn)))
    assert _person(conn) == ("alice", ALICE_GROUPS, ["alice private", "for staff"])
    _set(conn, "jürgen", "{}", "ldap", si.sign(key, "jürgen", "{}", "ldap", _pid(conn)))
    assert _person(conn) == ("jürgen", [], [])  # UTF-8 on both sides; an empty group list


def _changed(key, pid, field):
    """The settings alice would have, with exactly one thing changed."""
    user, groups, method = "alice", ALICE_LITERAL, "jwt"
    good = si.sign(key, user, groups, method, pid)
    return {
        "user": ("bob", groups, method, good),
        "groups": (user, '{"sales_emea","staff","admins"}', method, good),
        "auth_method": (user, groups, "ldap", good),
        "pid": (user, groups, method, si.sign(key, user, groups, method, pid + 1)),
        "other_key": (user, groups, method, si.sign(si.generate_key(), user, groups, method, pid)),
        "one_digit": (user, groups, method, good[:-1] + ("0" if good[-1] != "0" else "1")),
        "uppercase": (user, groups, method, good.upper()),
        "too_short": (user, groups, method, good[:-2]),
        "too_long": (user, groups, method, good + "00"),
        "not_hex": (user, groups, method, "g" * 64),
        "empty": (user, groups, method, ""),
        "spaces": (user, groups, method, " " + good[1:]),
    }[field]


@pytest.mark.parametrize("field", ["user", "groups", "auth_method", "pid", "other_key", "one_digit", "uppercase",
                                   "too_short", "too_long", "not_hex", "empty", "spaces"])
def test_any_single_change_gives_null_and_no_rows(as_analyst, signing_key, field):
    key, _ = signing_key
    conn = as_analyst()
    pid = _pid(conn)
    _set(conn, "alice", ALICE_LITERAL, "jwt", si.sign(key, "alice", ALICE_LITERAL, "jwt", pid))
    assert _person(conn)[0] == "alice"  # so the NULL below is the change's doing
    _set(conn, *_changed(key, pid, field))
    assert _person(conn) == (None, None, [])  # NULL, never an error


def test_a_missing_setting_gives_null(as_analyst, signing_key):
    key, _ = signing_key
    conn = as_analyst()
    conn.execute("SELECT set_config('pgproxy.signature', %s, false)",
                 (si.sign(key, "alice", ALICE_LITERAL, "jwt", _pid(conn)),))
    assert _person(conn) == (None, None, [])
    conn.execute("SELECT set_config('pgproxy.user', 'alice', false), set_config('pgproxy.groups', %s, false)",
                 (ALICE_LITERAL,))
    assert _person(conn) == (None, None, [])  # auth_method still missing


def test_the_key_is_readable_by_no_mapped_role_nor_the_pool_role(as_analyst, signing_key, database):
    key, _ = signing_key
    for role in ("emea_analyst", "amer_analyst", "other_role", ""):  # "": the pool role itself
        conn = as_analyst(role)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM pgproxy.signing_key")
    roles = ", ".join(f"'{r}'" for r in ("emea_analyst", "amer_analyst", "other_role", POOL_ROLE))
    assert database.psql(
        f"SELECT count(*) FROM unnest(ARRAY[{roles}]) AS r, unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', "
        "'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p WHERE has_table_privilege(r, 'pgproxy.signing_key', p)",
        database="demo") == "0"
    inner, outer = si.pads(key)
    source = database.psql("SELECT string_agg(prosrc, ' ') FROM pg_proc WHERE pronamespace = 'pgproxy'::regnamespace",
                           database="demo")
    assert "signing_key" in source and inner.hex() not in source and outer.hex() not in source
    # What PUBLIC may do in schema pgproxy: use it and call the two functions, nothing more.
    assert database.psql("""
        SELECT string_agg(name || ':' || privilege, ',' ORDER BY name) FROM (
          SELECT n.nspname AS name, a.privilege_type AS privilege FROM pg_namespace n, aclexplode(n.nspacl) a
           WHERE n.nspname = 'pgproxy' AND a.grantee = 0
          UNION ALL
          SELECT c.relname, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a
           WHERE c.relnamespace = 'pgproxy'::regnamespace AND a.grantee = 0
          UNION ALL
          SELECT p.proname, a.privilege_type FROM pg_proc p, aclexplode(p.proacl) a
           WHERE p.pronamespace = 'pgproxy'::regnamespace AND a.grantee = 0) AS public_grants""",
        database="demo") == "groups:EXECUTE,person:EXECUTE,pgproxy:USAGE"


def test_reinstalling_rotates_the_key(as_analyst, signing_key, database):
    key, _ = signing_key
    conn = as_analyst()
    pid = _pid(conn)
    new = si.generate_key()
    try:
        database.psql(si.install_sql(new), database="demo")
        _set(conn, "alice", ALICE_LITERAL, "jwt", si.sign(key, "alice", ALICE_LITERAL, "jwt", pid))
        assert _person(conn)[0] is None  # the old key's signature no longer verifies
        _set(conn, "alice", ALICE_LITERAL, "jwt", si.sign(new, "alice", ALICE_LITERAL, "jwt", pid))
        assert _person(conn)[0] == "alice"
        assert database.psql("SELECT count(*) FROM pgproxy.signing_key", database="demo") == "1"
    finally:
        database.psql(si.install_sql(key), database="demo")


def test_an_owner_owns_it_all_and_a_schema_of_another_owner_is_refused(as_analyst, signing_key, database):
    key, _ = signing_key
    admin = 'pgproxy "admin" $check$ \\'  # quoting, a dollar quote and a backslash survive
    database.psql(f"DO $$ BEGIN CREATE ROLE {si.quote_ident(admin)} NOLOGIN; "
                  "EXCEPTION WHEN duplicate_object THEN END $$", database="demo")
    try:
        database.psql(si.install_sql(key, admin), database="demo")
        assert database.psql("""
            SELECT string_agg(DISTINCT owner, ',') FROM (
              SELECT pg_get_userbyid(nspowner) AS owner FROM pg_namespace WHERE nspname = 'pgproxy'
              UNION ALL SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = 'pgproxy'::regnamespace
                AND relkind = 'r'
              UNION ALL SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE pronamespace = 'pgproxy'::regnamespace
            ) AS owners""", database="demo") == admin
        conn = as_analyst()
        _set(conn, "alice", ALICE_LITERAL, "jwt", si.sign(key, "alice", ALICE_LITERAL, "jwt", _pid(conn)))
        assert _person(conn)[0] == "alice"  # the owner reads its key table
        database.psql(si.install_sql(key, admin), database="demo")  # again, with the same owner: fine
        with pytest.raises(RuntimeError, match=re.escape(f"schema pgproxy is owned by {si.quote_ident(admin)}")):
            database.psql(si.install_sql(key), database="demo")  # someone else's schema: refused
    finally:
        database.psql("ALTER SCHEMA pgproxy OWNER TO CURRENT_USER", database="demo")
        database.psql(si.install_sql(key), database="demo")


def test_a_schema_others_may_create_in_is_refused(signing_key, database):
    key, _ = signing_key
    database.psql("GRANT CREATE ON SCHEMA pgproxy TO emea_analyst", database="demo")
    try:
        with pytest.raises(RuntimeError, match="another role may CREATE in schema pgproxy"):
            database.psql(si.install_sql(key), database="demo")
    finally:
        database.psql("REVOKE CREATE ON SCHEMA pgproxy FROM emea_analyst", database="demo")


def test_the_install_keeps_the_key_out_of_a_logging_server():
    key = si.generate_key()
    with PgCluster(settings={"log_statement": "'all'", "log_min_duration_statement": "0"}) as cluster:
        cluster.psql(si.install_sql(key))
        cluster.psql("SELECT 'after the install'")
        log = (cluster.dir / "postgres.log").read_text()
    assert "after the install" in log and "DO $quiet$" in log  # it does log statements
    assert all(pad.hex() not in log for pad in si.pads(key))


# --- through the proxy ---------------------------------------------------------------------

MODES = ["session", "transaction"]


def _signed_proxy(make_proxy, signing_key, mode, **overrides):
    return make_proxy(identity={"signing_key_file": str(signing_key[1])}, backend={"pool_mode": mode}, **overrides)


def _alice(proxy, issuer):
    return psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ALICE_GROUPS), autocommit=True)


@pytest.mark.parametrize("mode", MODES)
def test_the_proxy_signs_what_it_sets(make_proxy, signing_key, issuer, mode):
    key, _ = signing_key
    proxy = _signed_proxy(make_proxy, signing_key, mode)
    with _alice(proxy, issuer) as alice:
        for _ in range(3):  # in transaction mode, each statement may be switched anew
            row = alice.execute("SELECT pgproxy.person(), pgproxy.groups(), current_setting('pgproxy.signature', "
                                "true), pg_backend_pid()").fetchone()
            assert row[:2] == ("alice", ALICE_GROUPS)
            assert row[2] == si.sign(key, "alice", ALICE_LITERAL, "jwt", row[3])
        assert alice.execute("SELECT body FROM signed_notes ORDER BY id").fetchall() == [("alice private",),
                                                                                        ("for staff",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            alice.execute("SELECT * FROM pgproxy.signing_key")
    with psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), autocommit=True) as bob:
        assert bob.execute("SELECT pgproxy.person(), pgproxy.groups()").fetchone() == ("bob", ["sales_amer"])
        assert bob.execute("SELECT body FROM signed_notes").fetchall() == [("bob private",)]


@pytest.mark.parametrize("mode", MODES)
def test_a_forged_user_past_the_guard_is_nobody(make_proxy, signing_key, issuer, mode):
    proxy = _signed_proxy(make_proxy, signing_key, mode, guard={"unsafe_disable": True})
    with _alice(proxy, issuer) as alice:
        assert alice.execute("SELECT pgproxy.person()").fetchone() == ("alice",)
        alice.execute("SELECT set_config('pgproxy.user', 'bob', false)")
        assert alice.execute("SELECT current_setting('pgproxy.user'), pgproxy.person(), pgproxy.groups()"
                             ).fetchone() == ("bob", None, None)  # the forge took, and is worth nothing
        assert alice.execute("SELECT count(*) FROM signed_notes").fetchone() == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_a_signature_copied_to_another_connection_does_not_verify(make_proxy, signing_key, issuer, as_analyst,
                                                                   mode):
    key, _ = signing_key
    proxy = _signed_proxy(make_proxy, signing_key, mode)
    with _alice(proxy, issuer) as alice:
        user, groups, method, signature, pid = alice.execute(
            "SELECT current_setting('pgproxy.user'), current_setting('pgproxy.groups'), "
            "current_setting('pgproxy.auth_method'), current_setting('pgproxy.signature'), pg_backend_pid()"
        ).fetchone()
    assert signature == si.sign(key, user, groups, method, pid)  # valid where it was made
    other = as_analyst()
    assert _pid(other) != pid
    _set(other, user, groups, method, signature)
    assert _person(other) == (None, None, [])
    _set(other, user, groups, method, si.sign(key, user, groups, method, _pid(other)))
    assert _person(other)[0] == "alice"  # the same settings, signed for this connection


@pytest.mark.parametrize("mode", MODES)
def test_a_rotated_key_is_taken_on_sighup(make_proxy, signing_key, issuer, database, tmp_path, mode):
    key, _ = signing_key
    key_file = tmp_path / "rotating.key"
    key_file.touch(0o600)
    key_file.write_text(si.encode_key(key))
    proxy = make_proxy(identity={"signing_key_file": str(key_file)}, backend={"pool_mode": mode, "pool_size": 1})
    with _alice(proxy, issuer) as alice:  # leaves a pooled backend connection signed with the old key
        assert alice.execute("SELECT pgproxy.person()").fetchone() == ("alice",)
    new = si.generate_key()
    try:
        key_file.write_text(si.encode_key(new))
        database.psql(si.install_sql(new), database="demo")
        reloaded = proxy.log().count("configuration reloaded")
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while proxy.log().count("configuration reloaded") <= reloaded:
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.05)
        with _alice(proxy, issuer) as alice:
            row = alice.execute("SELECT pgproxy.person(), current_setting('pgproxy.signature'), pg_backend_pid()"
                                ).fetchone()
            assert row[0] == "alice" and row[1] == si.sign(new, "alice", ALICE_LITERAL, "jwt", row[2])
    finally:
        database.psql(si.install_sql(key), database="demo")
