"""A raw-protocol attacker for the escape and pool-isolation corpora: hand-built startup
packets (raw bytes, any encoding), simple and extended protocol in one write or many, and
the checks every attempt ends with — inside the database, through the proxy — of whose
role and identity a session carries and of what one person's session state another sees.

Everything reports *what* leaked in words, so a failing test says which invariant broke.
"""

from __future__ import annotations

import secrets
import socket
import struct
import time

from pgproxy.protocol import messages as msg
from tests.support.wire import Wire

# The corpora's proxies log in as a pool role of their own (made like the demo's, with
# other_role granted as to pgproxy_pool), so that ending "the pool's" backends between
# attempts touches no other test's proxy.
POOL_ROLE = "pgproxy_redteam"
PEOPLE = {"alice": ("sales_emea", "emea_analyst"), "bob": ("sales_amer", "amer_analyst")}
# What each analyst sees of the demo's orders through RLS on a fresh connection.
ORDERS_SEEN = {"emea_analyst": "Bosch,Nokia,Siemens", "amer_analyst": "Target,Walmart"}


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


def startup_packet(params: list[tuple[str | bytes, str | bytes]]) -> bytes:
    """int32 length, int32 196608 (protocol 3.0), then key\\0value\\0 ... \\0 — values as
    raw bytes, so a test can send what no driver would (another encoding, invalid UTF-8)."""
    body = struct.pack("!i", 196608) + b"".join(_b(k) + b"\0" + _b(v) + b"\0" for k, v in params) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query(sql: str | bytes) -> bytes:
    return msg.message(b"Q", _b(sql) + b"\0")


def parse(sql: str | bytes, name: str = "") -> bytes:
    return msg.message(b"P", name.encode() + b"\0" + _b(sql) + b"\0" + struct.pack("!h", 0))


def bind(portal: str = "", statement: str = "", params: list[bytes] | tuple = ()) -> bytes:
    """Bind with text parameters; results in text."""
    values = b"".join(struct.pack("!i", len(p)) + p for p in params)
    return msg.message(b"B", portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hh", 0, len(params))
                       + values + struct.pack("!h", 0))


def execute(portal: str = "") -> bytes:
    return msg.execute_message(portal)


def pbe(sql: str | bytes) -> bytes:
    """Parse/Bind/Execute of the unnamed statement, without Sync."""
    return parse(sql) + bind() + execute()


SYNC, FLUSH = msg.SYNC, msg.message(b"H")


def data_rows(replies: list) -> list[tuple]:
    """The DataRows among ``replies`` as tuples of str (None for NULL)."""
    return [tuple(msg.parse_data_row(body)) for kind, body in replies if kind == "D"]


def errors(replies: list) -> list[dict[str, str]]:
    return [msg.parse_error_fields(body) for kind, body in replies if kind == "E"]


def sqlstates(replies: list) -> list[str]:
    return [e.get("C", "?") for e in errors(replies)]


def describe(replies: list) -> str:
    """A short account of replies for failure messages: kinds, errors with their text."""
    parts = []
    for kind, body in replies:
        if kind == "E":
            fields = msg.parse_error_fields(body)
            parts.append(f"E[{fields.get('C')} {fields.get('M', '')[:120]}]")
        elif kind == "D":
            parts.append(f"D{data_rows([(kind, body)])[0]}")
        elif kind not in "TCN12":
            parts.append(kind)
    return " ".join(parts)


class Client:
    """One client on a raw socket: logged in by ``connect``."""

    def __init__(self, port: int, timeout: float = 15) -> None:
        self.wire = Wire(port, timeout=timeout)
        self.login_replies: list = []
        self.user = ""
        self.baseline: tuple | None = None  # WHO at login

    @classmethod
    def connect(cls, port: int, issuer, user: str, params: list | None = None, database: str = "demo",
                timeout: float = 15, groups: list[str] | None = None, baseline: bool = True) -> "Client":
        """Start up (``user``/``database`` first, then ``params`` in order, raw) and send a
        token; ``login_replies`` holds every reply up to Z or E (or None: closed). With
        ``baseline``, note who the session is right after login."""
        client = cls(port, timeout)
        client.user = user
        client.wire.send(startup_packet([("user", user), ("database", database), *(params or [])]))
        first = client.wire.read_message()
        if first is None or first[0] == "E":
            client.login_replies = [first]
            return client
        if first[0] == "v":  # NegotiateProtocolVersion, then the password request
            first = client.wire.read_message()
        assert first == ("R", struct.pack("!i", 3)), first
        token = issuer.mint(user, groups if groups is not None else [PEOPLE[user][0]])
        client.wire.send(msg.password_message(token.encode() + b"\0"))
        client.login_replies = client.wire.read_until("ZE")
        if baseline and client.logged_in:
            rows = data_rows(client.simple(WHO))
            client.baseline = rows[0] if len(rows) == 1 else None
        return client

    @property
    def logged_in(self) -> bool:
        return bool(self.login_replies) and self.login_replies[-1] is not None and self.login_replies[-1][0] == "Z"

    @property
    def login_error(self) -> dict[str, str] | None:
        last = self.login_replies[-1] if self.login_replies else None
        return msg.parse_error_fields(last[1]) if last is not None and last[0] == "E" else None

    def send(self, data: bytes) -> None:
        self.wire.send(data)

    def replies(self, until: str = "Z", count: int = 1) -> list:
        """Replies up to the ``count``-th message of a kind in ``until`` (or the close)."""
        out: list = []
        for _ in range(count):
            got = self.wire.read_until(until)
            out += got
            if not got or got[-1][0] not in until:
                break
        return out

    def simple(self, sql: str | bytes) -> list:
        self.send(query(sql))
        return self.replies()

    def extended(self, sql: str | bytes) -> list:
        self.send(pbe(sql) + SYNC)
        return self.replies()

    def run(self, protocol: str, sql: str | bytes) -> list:
        return self.simple(sql) if protocol == "simple" else self.extended(sql)

    def rows(self, sql: str | bytes) -> list[tuple]:
        replies = self.simple(sql)
        assert not errors(replies) and replies and replies[-1][0] == "Z", f"{sql!r}: {describe(replies)}"
        return data_rows(replies)

    def value(self, sql: str | bytes):
        return self.rows(sql)[0][0]

    def close(self, abort: bool = False) -> None:
        """Leave without Terminate; ``abort``: with a RST (SO_LINGER 0), as a killed client."""
        if abort:
            try:
                self.wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.wire.close()


# --- what must hold after every attempt ----------------------------------------------------

_SETTING = "coalesce(current_setting('{}', true), '<unset>')"
_CHOSEN_BY_PROXY = ("pgproxy.auth_method", "pgproxy.subject", "pgproxy.session_id")
# Who a session is: the roles, the identity settings RLS reads, whether it is a superuser,
# and the identity settings whose values the proxy chooses.
WHO = ("SELECT current_user, session_user, current_setting('role'), "
       + ", ".join(_SETTING.format(name) for name in ("pgproxy.user", "pgproxy.groups"))
       + ", current_setting('is_superuser'), " + ", ".join(_SETTING.format(name) for name in _CHOSEN_BY_PROXY))
WHO_COLUMNS = 9
# Values an attempt's own output must never contain: the role it tries to become, the
# person it tries to be.
FOREIGN = ("other_role", "mallory")


def who_leaks(row: tuple, user: str, role: str | None = None, baseline: tuple | None = None) -> list[str]:
    """What is wrong with one row of ``WHO``, in words. ``baseline``: the session's own row
    at login, for the settings whose values the proxy chooses (auth method, subject, session id)."""
    role = role or PEOPLE[user][1]
    groups = '{"%s"}' % PEOPLE[user][0]
    current, session, role_setting, person, person_groups, superuser = row[:6]
    leaks = []
    if current != role:
        leaks.append(f"current_user is {current!r}, not {role!r}")
    if session not in (POOL_ROLE, role):
        leaks.append(f"session_user is {session!r}, not {POOL_ROLE!r}")
    if role_setting != role:
        leaks.append(f"the role setting is {role_setting!r}, not {role!r}")
    if person != user:
        leaks.append(f"pgproxy.user is {person!r}, not {user!r}")
    if person_groups != groups:
        leaks.append(f"pgproxy.groups is {person_groups!r}, not {groups!r}")
    if superuser != "off":
        leaks.append("is_superuser is on")
    if baseline is not None:
        for name, got, want in zip(_CHOSEN_BY_PROXY, row[6:], baseline[6:]):
            if got != want:
                leaks.append(f"{name} is {got!r}, it was {want!r} at login")
    return leaks


def output_leaks(replies: list, user: str) -> list[str]:
    """Rows an attempt returned that show it ran as someone else: a ``WHO`` row that is
    wrong, or a value naming the role or person it tried to become."""
    leaks = []
    for row in data_rows(replies):
        if len(row) == WHO_COLUMNS and row[5] in ("on", "off") and row[1] is not None:
            leaks += [f"a statement in the attempt ran with {leak}" for leak in who_leaks(row, user)]
        elif any(v is not None and v.strip("'") in FOREIGN for v in row):  # set_config's result, or a tsquery's
            leaks.append(f"the attempt's output shows it took effect: {row}")
    return leaks


def identity_leaks(client: Client, user: str, role: str | None = None) -> list[str]:
    """What is wrong with the session's identity, in words; [] when it is intact. A session
    the proxy ended is intact: nothing more runs in it as anyone."""
    try:
        replies = client.simple(WHO)
    except TimeoutError:
        return ["the session did not answer the identity query"]
    except OSError:
        return []
    if not replies or replies[-1][0] != "Z":
        return []  # closed by the proxy (an ErrorResponse, FATAL, then EOF)
    if sqlstates(replies) == ["25P02"]:  # an aborted transaction: roll it back and look again
        client.simple("ROLLBACK")
        return identity_leaks(client, user, role)
    rows = data_rows(replies)
    if errors(replies) or len(rows) != 1:
        return [f"the identity query failed: {describe(replies)}"]
    return who_leaks(rows[0], user, role, client.baseline)


# What one person's session must never show another: each a scalar query and what a fresh
# connection shows (None: the rows of orders that person's role may see).
STATE_CHECKS = {
    "temporary relations": ("SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()", "0"),
    "temporary functions": ("SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()", "0"),
    "temporary types": ("SELECT count(*) FROM pg_type WHERE typnamespace = pg_my_temp_schema()", "0"),
    "prepared statements": ("SELECT count(*) FROM pg_prepared_statements", "0"),
    "cursors": ("SELECT count(*) FROM pg_cursors", "0"),
    "LISTEN channels": ("SELECT count(*) FROM pg_listening_channels()", "0"),
    "session advisory locks": ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                               "0"),
    "custom setting myapp.x": ("SELECT coalesce(current_setting('myapp.x', true), '')", ""),
    "search_path": ("SELECT current_setting('search_path')", '"$user", public'),
    "statement_timeout": ("SELECT current_setting('statement_timeout')", "0"),
    "client_encoding": ("SELECT current_setting('client_encoding')", "UTF8"),
    "standard_conforming_strings": ("SELECT current_setting('standard_conforming_strings')", "on"),
    "backslash_quote": ("SELECT current_setting('backslash_quote')", "safe_encoding"),
    "default_transaction_read_only": ("SELECT current_setting('default_transaction_read_only')", "off"),
    "default_transaction_isolation": ("SELECT current_setting('default_transaction_isolation')", "read committed"),
    "row_security": ("SELECT current_setting('row_security')", "on"),
    "orders through the search path": ("SELECT string_agg(customer, ',' ORDER BY customer) FROM orders", None),
    "orders is public.orders": ("SELECT to_regclass('orders') = 'public.orders'::regclass", "t"),
    "items is public.items": ("SELECT to_regclass('items') = 'public.items'::regclass", "t"),
    "pg_settings is the catalog's": ("SELECT to_regclass('pg_settings') = 'pg_catalog.pg_settings'::regclass", "t"),
    "pg_roles is the catalog's": ("SELECT to_regclass('pg_roles') = 'pg_catalog.pg_roles'::regclass", "t"),
}
_ALL_STATE = "SELECT " + ", ".join(f"({sql})" for sql, _ in STATE_CHECKS.values())


def state_leaks(client: Client, user: str, role: str | None = None) -> list[str]:
    """Someone else's session state that ``client`` (logged in as ``user``) can see, and
    what is wrong with its identity; [] when it sees only what a fresh connection shows."""
    role = role or PEOPLE[user][1]
    if not client.logged_in:
        return [f"{user} could not log in: {describe([r for r in client.login_replies if r])}"]
    leaks = identity_leaks(client, user, role)
    expected = [ORDERS_SEEN[role] if want is None else want for _, want in STATE_CHECKS.values()]
    replies = client.simple(_ALL_STATE)
    rows = data_rows(replies)
    if errors(replies) or len(rows) != 1:  # one of them fails: ask one by one to say which
        if replies and replies[-1][0] == "Z" and replies[-1][1] != b"I":
            client.simple("ROLLBACK")
        for (what, (sql, _)), want in zip(STATE_CHECKS.items(), expected):
            got = client.simple(sql)
            values = data_rows(got)
            if errors(got) or not values or values[0][0] != want:
                leaks.append(f"{what}: {describe(got)}, a fresh connection shows {want!r}")
                if got and got[-1][0] == "Z" and got[-1][1] != b"I":
                    client.simple("ROLLBACK")
    else:
        for what, got, want in zip(STATE_CHECKS, rows[0], expected):
            if got != want:
                leaks.append(f"{what}: {got!r}, a fresh connection shows {want!r}")
    for sql in ("SELECT lastval()", "SELECT currval('public.shared_seq')"):
        got = client.simple(sql)
        if sqlstates(got) != ["55000"]:
            leaks.append(f"{sql} must fail with 55000 in a fresh session, got {describe(got)}")
    return leaks


# --- the database side -----------------------------------------------------------------

# Objects the corpora use, made by the superuser: a sequence both analysts may use, and
# functions an application's DBA might provide that hide session state from the proxy.
FIXTURES = """
CREATE SEQUENCE IF NOT EXISTS public.shared_seq;
GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.shared_seq TO emea_analyst, amer_analyst;
CREATE OR REPLACE FUNCTION public.take_lock() RETURNS int LANGUAGE sql
    AS 'SELECT 1 FROM (SELECT pg_advisory_lock(42)) s';
CREATE OR REPLACE FUNCTION public.listen_fn() RETURNS int LANGUAGE sql AS 'LISTEN alice_channel; SELECT 1';
CREATE OR REPLACE FUNCTION public.prepare_fn() RETURNS int LANGUAGE sql
    AS 'PREPARE alice_fn_stmt AS SELECT 1; SELECT 1';
CREATE OR REPLACE FUNCTION public.set_x() RETURNS text LANGUAGE sql AS $$SELECT set_config('myapp.x', 'alice', false)$$;
CREATE OR REPLACE FUNCTION public.escape_write(i int) RETURNS int LANGUAGE sql
    AS 'INSERT INTO items VALUES (i, ''written past read-only'') RETURNING id';
GRANT EXECUTE ON FUNCTION public.take_lock(), public.listen_fn(), public.prepare_fn(), public.set_x(),
    public.escape_write(int) TO emea_analyst, amer_analyst;
"""


class Superuser:
    """A superuser connection to demo, outside the proxy: the truth about the database.
    Makes the corpora's objects and their pool role; ``backend`` is the [backend] part of a
    configuration that logs in as that role (its password in a file under ``secrets``)."""

    def __init__(self, database, secrets_dir) -> None:
        import psycopg
        self.conn = psycopg.connect(f"{database.superuser_dsn} dbname=demo", autocommit=True)
        self.conn.execute(FIXTURES)
        password = secrets.token_urlsafe(12)
        if not self.value("SELECT count(*) FROM pg_roles WHERE rolname = %s", POOL_ROLE):
            self.conn.execute(f"CREATE ROLE {POOL_ROLE} LOGIN NOINHERIT")
        self.conn.execute(f"ALTER ROLE {POOL_ROLE} PASSWORD '{password}'")
        self.conn.execute(f"GRANT emea_analyst, amer_analyst, other_role TO {POOL_ROLE}")
        path = secrets_dir / f"{POOL_ROLE}-password"
        path.write_text(password + "\n")
        self.backend = {"user": POOL_ROLE, "password_file": str(path)}

    def value(self, sql: str, *args):
        row = self.conn.execute(sql, args or None).fetchone()
        return row[0] if row else None

    def pool_backends(self) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = 'demo'", (POOL_ROLE,)).fetchall()]

    def fresh_pool(self) -> None:
        """End every backend connection of the pool role, so the next attempt starts on a
        new one (the proxies run with health_check_after_s = 0 and notice at once). First
        wait until they have all been idle a moment: one ended while the proxy resets it
        for the pool is a different test (test_pool_isolation's backend-dies-as-it-leaves)."""
        wait_until(lambda: not self.value(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = 'demo' "
            "AND (state <> 'idle' OR clock_timestamp() - state_change < interval '20 ms')", POOL_ROLE), 5, 0.01)
        pids = self.pool_backends()
        for pid in pids:
            self.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_until(lambda: not set(pids) & set(self.pool_backends()), 10), "pool backends did not end"

    def lock_is_free(self, *key: int) -> bool:
        """Can a session on another backend take the advisory lock? (and let it go)"""
        args = ", ".join(str(k) for k in key)
        taken = self.value(f"SELECT pg_try_advisory_lock({args})")
        if taken:
            self.conn.execute(f"SELECT pg_advisory_unlock({args})")
        return bool(taken)

    def close(self) -> None:
        self.conn.close()


def wait_until(predicate, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
