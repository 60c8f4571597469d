"""The red team's pool-isolation corpus (issue 12): what one person leaves on a backend
connection must never reach the next person on it, and no client can hold the pool.

* Session state that hides from the proxy's session-state check (objects in pg_temp made
  without the word TEMP, search_path tricks that shadow tables and catalogs, sequence
  state, advisory locks and LISTEN inside functions, ...): alice makes it, leaves, and bob —
  on the same single backend connection — must see only what a fresh connection shows
  (the rows of orders RLS gives his role, lastval() failing with 55000, no locks).
* The extended protocol without Sync: an error or an uncommitted write followed by Flush
  must neither pin a connection forever nor hand alice's implicit transaction to bob.
* Clients that never read a big result and then vanish: their backends are freed and the
  proxy never holds more than pool_size connections.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import threading
import time

import psycopg
import pytest

from pgproxy.protocol import messages as msg
from tests.support.attacks import (FLUSH, SYNC, WHO, Client, Superuser, bind, data_rows, describe, errors, execute,
                                   identity_leaks, output_leaks, parse, pbe, query, sqlstates, state_leaks, wait_until,
                                   who_leaks)
from tests.support.proxy import ProxyProcess, merge
from tests.support.redteam import MODES, fresh, su, target  # noqa: F401 (fixtures)
from tests.support.redteam import redteam_config as _config

PROTOCOLS = ["simple", "extended"]


def _login(proxy, issuer, user: str, params=None) -> Client:
    client = Client.connect(proxy.port, issuer, user, params)
    assert client.logged_in, describe([r for r in client.login_replies if r])
    return client


def _reads(client: Client, data: bytes) -> list:
    """Send raw protocol bytes; read a ReadyForQuery for each Query and Sync in them."""
    count, pos = 0, 0
    while pos < len(data):
        count += data[pos:pos + 1] in (b"Q", b"S")
        pos += 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
    client.send(data)
    return client.replies(count=count)


# --- 4: session state that crosses to the next person -------------------------------------
# (id, startup parameters, steps). A step is one statement (sent as a simple Query, or as
# Parse/Bind/Execute/Sync) or raw protocol bytes. "{temp}" is alice's pg_temp_N, learnt
# first from a session that makes a temporary table the ordinary way.

SHADOW = ["BEGIN", "SET LOCAL search_path = pg_temp"]
ISOLATION = [
    ("set-local-search-path-view", [], SHADOW + ["CREATE VIEW orders AS SELECT * FROM public.orders",
                                                 "GRANT SELECT ON orders TO PUBLIC", "COMMIT"]),
    ("set_config-local-search-path-view", [], ["BEGIN", "SELECT set_config('search_path', 'pg_temp', true)",
                                               "CREATE VIEW orders AS SELECT * FROM public.orders",
                                               "GRANT SELECT ON orders TO PUBLIC", "COMMIT"]),
    ("startup-search-path-view", [("search_path", "pg_temp")],
     ["CREATE VIEW orders AS SELECT * FROM public.orders", "GRANT SELECT ON orders TO PUBLIC"]),
    ("startup-options-search-path-view", [("options", "-c search_path=pg_temp")],
     ["CREATE VIEW orders AS SELECT * FROM public.orders", "GRANT SELECT ON orders TO PUBLIC"]),
    ("temp-schema-by-name-view", [], ["CREATE VIEW {temp}.orders AS SELECT * FROM public.orders",
                                      "GRANT SELECT ON {temp}.orders TO PUBLIC"]),
    ("temp-schema-by-name-quoted-table", [], ['CREATE TABLE "{temp}".items (id int, name text)',
                                              'INSERT INTO "{temp}".items VALUES (1, \'alice\')',
                                              'GRANT ALL ON "{temp}".items TO PUBLIC']),
    ("temp-schema-unicode-name", [], ['CREATE VIEW U&"pg\\005ftemp".orders AS SELECT * FROM public.orders',
                                      'GRANT SELECT ON U&"pg\\005ftemp".orders TO PUBLIC']),
    ("shadow-pg_settings", [], SHADOW + ["CREATE VIEW pg_settings AS SELECT * FROM pg_catalog.pg_settings "
                                         "WHERE name <> 'search_path'", "GRANT SELECT ON pg_settings TO PUBLIC",
                                         "COMMIT"]),
    ("shadow-pg_roles", [], SHADOW + ["CREATE VIEW pg_roles AS SELECT * FROM pg_catalog.pg_roles WHERE false",
                                      "GRANT SELECT ON pg_roles TO PUBLIC", "COMMIT"]),
    ("shadow-items-with-a-table", [], SHADOW + ["CREATE TABLE items (id int, name text)",
                                                "INSERT INTO items VALUES (1, 'alice')",
                                                "GRANT ALL ON items TO PUBLIC", "COMMIT"]),
    ("select-into-orders", [], SHADOW + ["SELECT * INTO orders FROM public.orders",
                                         "GRANT SELECT ON orders TO PUBLIC", "COMMIT"]),
    ("create-table-as-orders", [], SHADOW + ["CREATE TABLE orders AS SELECT * FROM public.orders",
                                             "GRANT SELECT ON orders TO PUBLIC", "COMMIT"]),
    ("sequence-in-pg_temp", [], SHADOW + ["CREATE SEQUENCE alice_seq", "COMMIT"]),
    ("composite-type-in-pg_temp", [], SHADOW + ["CREATE TYPE alice_type AS (a int)", "COMMIT"]),
    ("domain-in-pg_temp", [], SHADOW + ["CREATE DOMAIN alice_domain AS int", "COMMIT"]),
    ("function-in-pg_temp", [], SHADOW + ["CREATE FUNCTION upper(text) RETURNS text LANGUAGE sql "
                                          "AS 'SELECT ''alice'''", "COMMIT"]),
    ("on-commit-delete-rows-in-pg_temp", [], SHADOW + ["CREATE TABLE alice_rows (a int) ON COMMIT DELETE ROWS",
                                                       "COMMIT"]),
    ("pg_settings-search-path-then-view", [], ["UPDATE pg_settings SET setting = 'pg_temp' WHERE name = 'search_path'",
                                               "CREATE VIEW orders AS SELECT * FROM public.orders",
                                               "GRANT SELECT ON orders TO PUBLIC"]),
    ("ts_rewrite-search-path-then-view", [], ["SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery "
                                              "FROM (SELECT set_config(''search_path'', ''pg_temp'', false)) s')",
                                              "CREATE VIEW orders AS SELECT * FROM public.orders",
                                              "GRANT SELECT ON orders TO PUBLIC"]),
    ("explicit-temp-view", [], ["CREATE TEMP VIEW orders AS SELECT * FROM public.orders",
                                "GRANT SELECT ON orders TO PUBLIC"]),
    ("explicit-temp-table", [], ["CREATE TEMP TABLE alice_scratch (x int)"]),
    ("select-into-temp", [], ["SELECT 1 AS x INTO TEMP alice_scratch"]),
    ("nextval", [], ["SELECT nextval('public.shared_seq')"]),
    ("setval", [], ["SELECT setval('public.shared_seq', 1000)"]),
    ("nextval-in-from", [], ["SELECT * FROM nextval('public.shared_seq')"]),
    ("serial-column-insert", [], ["INSERT INTO notes (body) VALUES ('alice was here')"]),
    ("advisory-lock-in-function", [], ["SELECT public.take_lock()"]),
    ("advisory-lock-in-subquery", [], ["SELECT * FROM (SELECT pg_advisory_lock(42)) s"]),
    ("advisory-lock-shared", [], ["SELECT pg_advisory_lock_shared(42)"]),
    ("advisory-try-lock", [], ["SELECT pg_try_advisory_lock(42)"]),
    ("advisory-lock-two-keys", [], ["SELECT pg_advisory_lock(1, 2)"]),
    ("advisory-lock-qualified", [], ["SELECT pg_catalog.pg_advisory_lock(42)"]),
    ("advisory-lock-quoted", [], ['SELECT "pg_advisory_lock"(42)']),
    ("advisory-lock-lateral", [], ["SELECT l FROM generate_series(1, 1) g, LATERAL pg_advisory_lock(42) l"]),
    ("advisory-xact-lock", [], ["BEGIN", "SELECT pg_advisory_xact_lock(42)", "COMMIT"]),
    ("listen", [], ["LISTEN alice_channel"]),
    ("listen-in-function", [], ["SELECT public.listen_fn()"]),
    ("prepare-in-function", [], ["SELECT public.prepare_fn()"]),
    ("set_config-in-function", [], ["SELECT public.set_x()"]),
    ("sql-prepare", [], ["PREPARE alice_stmt AS SELECT 'alice-secret'"]),
    ("protocol-named-statement", [], [parse("SELECT 'alice-secret'", "alice_stmt") + SYNC]),
    ("with-hold-cursor", [], ["BEGIN", "DECLARE alice_cursor CURSOR WITH HOLD FOR SELECT * FROM public.orders",
                              "COMMIT"]),
    ("with-hold-binary-cursor", [], ["BEGIN", "DECLARE alice_cursor BINARY NO SCROLL CURSOR WITH HOLD FOR SELECT 1",
                                     "COMMIT"]),
    ("custom-setting", [], ["SET myapp.x = 'alice'"]),
    ("custom-setting-set_config", [], ["SELECT set_config('myapp.x', 'alice', false)"]),
    ("custom-setting-local", [], ["BEGIN", "SET LOCAL myapp.x = 'alice'", "COMMIT"]),
    ("custom-setting-startup", [("myapp.x", "alice")], ["SELECT 1"]),
    ("statement-timeout-pg_settings", [], ["UPDATE pg_settings SET setting = '4321s' "
                                           "WHERE name = 'statement_timeout'"]),
    ("isolation-pg_settings", [], ["UPDATE pg_settings SET setting = 'serializable' "
                                   "WHERE name = 'default_transaction_isolation'"]),
    ("session-characteristics", [], ["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"]),
    ("row-security-pg_settings", [], ["UPDATE pg_settings SET setting = 'off' WHERE name = 'row_security'"]),
    ("load", [], ["LOAD 'plpgsql'"]),
    ("prepare-transaction", [], ["BEGIN", "PREPARE TRANSACTION 'alice'"]),
]

_CASES = [pytest.param(params, steps, protocol, id=f"{name}-{protocol}") for name, params, steps in ISOLATION
          for protocol in PROTOCOLS if protocol == "simple" or all(isinstance(s, str) for s in steps)]


def test_the_isolation_corpus_is_as_promised():
    assert len({name for name, _, _ in ISOLATION}) == len(ISOLATION) >= 40


def _temp_schema(proxy, issuer) -> str:
    """alice's pg_temp_N on the only backend connection, from an ordinary TEMP table."""
    probe = _login(proxy, issuer, "alice")
    rows = data_rows(probe.simple("CREATE TEMP TABLE probe (x int); "
                                  "SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()"))
    probe.close()
    return rows[0][0] if rows else "pg_temp_1"  # temporary tables refused: a guess


def _step(client: Client, step, protocol: str) -> list:
    if isinstance(step, bytes):
        return _reads(client, step)
    return client.simple(step) if protocol == "simple" else client.extended(step)


@pytest.mark.parametrize("params, steps, protocol", _CASES)
def test_nothing_alice_leaves_on_the_connection_reaches_bob(target, issuer, fresh, params, steps, protocol):
    temp = _temp_schema(target, issuer) if any("{temp}" in s for s in steps if isinstance(s, str)) else ""
    # Under transaction pooling bob is logged in throughout: his sessions and alice's take
    # turns on the one connection. (Session pooling gives it to one session at a time.)
    bob = _login(target, issuer, "bob") if target.mode == "transaction" else None
    alice = _login(target, issuer, "alice", params)
    replies: list = []
    for step in steps:
        replies += _step(alice, step.replace("{temp}", temp) if isinstance(step, str) else step, protocol)
    if replies and replies[-1][0] == "Z" and replies[-1][1] != b"I":
        replies += alice.simple("ROLLBACK")
    problems = output_leaks(replies, "alice") + identity_leaks(alice, "alice")
    alice.close()
    if bob is None:
        bob = _login(target, issuer, "bob")
    problems += [f"bob: {leak}" for leak in state_leaks(bob, "bob")]
    bob.close()
    for key in ((42,), (1, 2)):
        if not fresh.lock_is_free(*key):
            problems.append(f"advisory lock {key} is still held after alice left (a session on another "
                            "backend cannot take it)")
    fresh.conn.execute("DELETE FROM notes WHERE body = 'alice was here'")
    assert not problems, (f"{steps} [{target.mode} pooling, {protocol}] -> {describe(replies)[:600]}\n  "
                          + "\n  ".join(problems))


def test_bob_never_sees_alices_sequence_values_while_both_are_connected(base_config, issuer, su):
    """Turn by turn on one transaction-pooled connection: alice's nextval, then bob's
    lastval/currval."""
    target = ProxyProcess(_config(base_config, su, "transaction"))
    try:
        problems = _sequence_problems(target, issuer)
    finally:
        code = target.stop()
    assert not problems, "\n".join(problems)
    assert code == 0, "pgproxy did not shut down cleanly"


def _sequence_problems(target, issuer) -> list[str]:
    bob = _login(target, issuer, "bob")
    alice = _login(target, issuer, "alice")
    problems = []
    for turn in range(3):
        value = alice.value("SELECT nextval('public.shared_seq')")
        for sql in ("SELECT lastval()", "SELECT currval('public.shared_seq')"):
            got = bob.simple(sql)
            if sqlstates(got) != ["55000"]:
                problems.append(f"turn {turn}: alice's nextval gave {value}; bob's {sql} -> {describe(got)}")
        problems += [f"alice: {leak}" for leak in identity_leaks(alice, "alice")]
        problems += [f"bob: {leak}" for leak in identity_leaks(bob, "bob")]
    alice.close()
    bob.close()
    return problems


@pytest.mark.parametrize("mode", MODES)
def test_a_backend_that_dies_as_its_session_leaves_does_not_cost_a_pool_slot(base_config, issuer, su, mode):
    """The backend is terminated just as its client leaves, so the proxy may find it gone
    when it resets or returns it; with pool_size = 1 a slot not given back would make
    every later login wait and fail with 53300."""
    proxy = ProxyProcess(_config(base_config, su, mode, acquire_timeout_s=2))
    problems: list[str] = []
    try:
        for turn in range(60):
            bob = Client.connect(proxy.port, issuer, "bob", baseline=False)
            if not bob.logged_in:
                problems.append(f"turn {turn}: {describe([r for r in bob.login_replies if r])}")
                break
            pid = int(bob.value("SELECT pg_backend_pid()"))
            su.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if turn % 3:
                time.sleep(0.001 * (turn % 3))
            bob.close()
    finally:
        code = proxy.stop()
    assert not problems, "a login after backends died as their sessions left: " + "; ".join(problems)
    assert code == 0, "pgproxy did not shut down cleanly"


# --- 5: the extended protocol without Sync ---------------------------------------------------

def _read_until_kind(client: Client, kinds: str, timeout: float) -> list:
    """Messages until one of ``kinds`` arrives (or ``timeout`` passes, or the close)."""
    client.wire.sock.settimeout(timeout)
    out: list = []
    try:
        while True:
            message = client.wire.read_message()
            if message is None:
                break
            out.append(message)
            if message[0] in kinds:
                break
    except TimeoutError:
        pass
    finally:
        client.wire.sock.settimeout(15)
    return out


def _ask(client: Client, data: bytes, owed: int, what: str, problems: list, timeout: float = 3) -> list:
    """Send, and read ``owed`` ReadyForQuery; no answer in ``timeout`` is a problem, not a hang."""
    client.wire.sock.settimeout(timeout)
    try:
        client.send(data)
        return client.replies(count=owed)
    except TimeoutError:
        problems.append(f"{what}: no answer within {timeout:.0f}s")
        return []
    finally:
        client.wire.sock.settimeout(15)


def _flush_without_sync_problems(proxy, issuer, pool_size: int, then: str) -> list[str]:
    attackers, problems = [], []
    for i in range(pool_size + 1):
        client = Client.connect(proxy.port, issuer, "alice", timeout=5)
        if not client.logged_in:
            problems.append(f"attacker {i} could not log in: {describe([r for r in client.login_replies if r])}")
            continue
        client.send(parse("select 1/0") + bind() + execute() + FLUSH)
        got = _read_until_kind(client, "E", 2)
        if "22012" not in sqlstates(got):
            problems.append(f"attacker {i} did not get its error at Flush: {describe(got)}")
        attackers.append(client)
    if then != "stay-idle":
        for client in attackers:
            client.close(abort=then == "abort")
    started = time.monotonic()
    try:
        bob = Client.connect(proxy.port, issuer, "bob", timeout=3)
    except TimeoutError:
        return problems + ["bob's login got no answer within 3s"]
    if not bob.logged_in:
        return problems + [f"bob could not log in: {describe([r for r in bob.login_replies if r])}"]
    got = _ask(bob, query(WHO), 1, "bob's first query", problems)
    elapsed = time.monotonic() - started
    if got and (errors(got) or len(data_rows(got)) != 1 or who_leaks(data_rows(got)[0], "bob")):
        problems.append(f"bob's query: {describe(got)}")
    elif got and elapsed > 1.5:
        problems.append(f"bob waited {elapsed:.1f}s for a connection")
    bob.close()
    if then == "stay-idle":  # the attackers' sessions still answer their Sync, as themselves
        for i, client in enumerate(attackers):
            got = _ask(client, SYNC + query(WHO), 2, f"attacker {i}'s Sync", problems)
            rows = data_rows(got)
            if rows and rows[-1][0] != "emea_analyst":
                problems.append(f"attacker {i} after Sync: {describe(got)}")
            client.close()
    return problems


@pytest.mark.parametrize("then", ["stay-idle", "close", "abort"])
def test_errors_flushed_without_sync_do_not_hold_the_pool(base_config, issuer, su, then):
    """pool_size + 1 clients each get an error with Flush and never Sync; everyone else must
    still log in and query at once."""
    pool_size = 2
    # The default health check: a connection given back is reused at once, as in production.
    proxy = ProxyProcess(_config(base_config, su, "transaction", pool_size=pool_size, acquire_timeout_s=2,
                                 health_check_after_s=30))
    try:
        problems = _flush_without_sync_problems(proxy, issuer, pool_size, then)
    finally:
        code = proxy.stop()
    assert not problems, "\n".join(problems)
    assert code == 0, "pgproxy did not shut down cleanly"


def _uncommitted_insert_problems(proxy, issuer, su, leave: str) -> list[str]:
    bob = _login(proxy, issuer, "bob")
    alice = _login(proxy, issuer, "alice")
    alice.send(pbe("INSERT INTO items VALUES (9801, 'flushed, never synced')") + FLUSH)
    got = _read_until_kind(alice, "CE", 2)
    problems = [] if [k for k, _ in got][-1:] == ["C"] else [f"alice's insert at Flush: {describe(got)}"]
    answer = _ask(bob, query("SELECT count(*) FROM items WHERE id = 9801") + query(WHO), 2, "bob's query", problems)
    rows = data_rows(answer)
    if errors(answer):
        if sqlstates(answer)[:1] != ["53300"]:  # waiting for alice's connection and giving up is fine
            problems.append(f"bob's query: {describe(answer)}")
    elif answer and (rows[:1] != [("0",)] or (len(rows) > 1 and rows[1][0] != "amer_analyst")):
        problems.append(f"bob ran inside alice's implicit transaction: {describe(answer)}")
    if leave == "terminate":
        alice.send(msg.TERMINATE)
    alice.close(abort=leave == "abort")
    time.sleep(0.3)
    if su.value("SELECT count(*) FROM items WHERE id = 9801"):
        problems.append("alice's insert was committed (checked as superuser)")
    bob.close()
    try:
        bob = Client.connect(proxy.port, issuer, "bob", timeout=3)
        problems += [f"bob afterwards: {leak}" for leak in state_leaks(bob, "bob")]
    except TimeoutError:
        problems.append("bob afterwards: no answer within 3s")
    bob.close()
    return problems


@pytest.mark.parametrize("leave", ["close", "abort", "terminate"])
@pytest.mark.parametrize("mode", MODES)
def test_an_insert_flushed_without_sync_is_never_committed(base_config, issuer, su, mode, leave):
    """alice inserts with Flush and no Sync; bob queries on the shared connection; alice
    leaves without Sync: the insert must not be committed, and bob must never run inside
    alice's implicit transaction."""
    su.conn.execute("DELETE FROM items WHERE id = 9801")
    proxy = ProxyProcess(_config(base_config, su, mode, pool_size=1 if mode == "transaction" else 2,
                                 acquire_timeout_s=1.5, health_check_after_s=30))
    try:
        problems = _uncommitted_insert_problems(proxy, issuer, su, leave)
    finally:
        code = proxy.stop()
        su.conn.execute("DELETE FROM items WHERE id = 9801")
    assert not problems, "\n".join(problems)
    assert code == 0, "pgproxy did not shut down cleanly"


# --- 6: clients that never read a big result, then vanish ----------------------------------

BIG = "SELECT repeat('x', 10000) FROM generate_series(1, 100000)"


ISOLATED_POOL_ROLE = "pgproxy_isolation"


@pytest.fixture
def own_pool_role(su, tmp_path):
    """A pool role of its own, so pg_stat_activity counts this proxy's connections only."""
    password = secrets.token_urlsafe(12)
    if not su.value("SELECT count(*) FROM pg_roles WHERE rolname = %s", ISOLATED_POOL_ROLE):
        su.conn.execute(f"CREATE ROLE {ISOLATED_POOL_ROLE} LOGIN NOINHERIT")
    su.conn.execute(f"ALTER ROLE {ISOLATED_POOL_ROLE} PASSWORD '{password}'")
    su.conn.execute(f"GRANT emea_analyst, amer_analyst TO {ISOLATED_POOL_ROLE}")
    path = tmp_path / "isolation-pool-password"
    path.write_text(password + "\n")
    return {"user": ISOLATED_POOL_ROLE, "password_file": str(path)}


@pytest.mark.parametrize("mode", MODES)
def test_clients_that_never_read_free_their_backends(base_config, issuer, database, su, own_pool_role, mode):
    pool_size, clients = 4, 50
    proxy = ProxyProcess(_config(base_config, su, mode, pool_size=pool_size, acquire_timeout_s=2, **own_pool_role))
    sampler_conn = psycopg.connect(f"{database.superuser_dsn} dbname=demo", autocommit=True)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(sampler_conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                                (ISOLATED_POOL_ROLE,)).fetchone()[0])
            time.sleep(0.05)

    def running() -> int:
        return sampler_conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state = 'active' "
                                    "AND query LIKE 'SELECT repeat(%%'", (ISOLATED_POOL_ROLE,)).fetchone()[0]

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
            logged = list(pool.map(lambda _: Client.connect(proxy.port, issuer, "alice", timeout=10, baseline=False),
                                   range(clients)))
        readers = [c for c in logged if c.logged_in]
        assert readers, "nobody could log in"
        for client in readers:
            client.send(query(BIG))  # and never read a byte of the answer
        time.sleep(1.5)
        busy_while_open = running()
        for i, client in enumerate(logged):
            client.close(abort=i % 2 == 0)
        freed = wait_until(lambda: running() == 0, timeout=10, interval=0.2)
        stop.set()
        sampler.join(5)
        problems = []
        if not busy_while_open:
            problems.append("the big query never ran (the test proves nothing)")
        if not freed:
            problems.append(f"{running()} backends still run the query 10 s after every client left")
        if max(samples, default=0) > pool_size:
            problems.append(f"up to {max(samples)} backend connections of the pool role (pool_size = {pool_size})")
        started = time.monotonic()
        bob = Client.connect(proxy.port, issuer, "bob", timeout=10)
        if not bob.logged_in or data_rows(bob.simple("SELECT current_user")) != [("amer_analyst",)]:
            problems.append(f"bob afterwards: {describe([r for r in bob.login_replies if r])}")
        elif time.monotonic() - started > 3:
            problems.append(f"bob waited {time.monotonic() - started:.1f}s afterwards")
        bob.close()
        assert not problems, f"{len(readers)} of {clients} clients logged in [{mode}]:\n  " + "\n  ".join(problems)
    finally:
        stop.set()
        sampler.join(5)
        sampler_conn.close()
        assert proxy.stop() == 0, proxy.log()[-3000:]


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_queries_of_a_departed_client_are_all_cancelled(base_config, issuer, database, su, own_pool_role,
                                                                   mode):
    """Three long queries sent at once, then the client leaves: a single cancel would stop
    the first and the next would run (and hold the only slot) for its full 30 s."""
    proxy = ProxyProcess(_config(base_config, su, mode, pool_size=1, acquire_timeout_s=3, **own_pool_role))
    watcher = psycopg.connect(f"{database.superuser_dsn} dbname=demo", autocommit=True)

    def sleeping() -> int:
        return watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state = 'active' "
                               "AND query LIKE 'SELECT pg_sleep(30)%%'", (ISOLATED_POOL_ROLE,)).fetchone()[0]
    try:
        alice = Client.connect(proxy.port, issuer, "alice", timeout=10, baseline=False)
        assert alice.logged_in
        alice.send(query("SELECT pg_sleep(30)") * 3)
        assert wait_until(lambda: sleeping() == 1, timeout=5, interval=0.05), "the first query never ran"
        alice.close()
        assert wait_until(lambda: sleeping() == 0, timeout=5, interval=0.1), \
            "a pipelined query of the departed client still runs"
        started = time.monotonic()
        bob = Client.connect(proxy.port, issuer, "bob", timeout=10)
        assert bob.logged_in, describe([r for r in bob.login_replies if r])
        assert data_rows(bob.simple("SELECT current_user")) == [("amer_analyst",)]
        assert time.monotonic() - started < 3, "bob waited for the departed client's queries"
        bob.close()
        assert sleeping() == 0
    finally:
        watcher.close()
        assert proxy.stop() == 0, proxy.log()[-3000:]
