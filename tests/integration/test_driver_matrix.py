"""The driver matrix, in both pool modes, with default driver settings.

Transaction pooling runs with a pool of 2 while another identity (bob) keeps querying,
so every driver's statements move between backend connections and across identity
switches: named prepared statements must survive that, and each statement must still
run as alice.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import asyncpg
import psycopg
import pytest
import sqlalchemy

from tests.support.proxy import ProxyProcess, merge

ROOT = Path(__file__).resolve().parents[2]
PGJDBC = "/usr/share/java/postgresql.jar"
ALICE = ("emea_analyst", "alice")


@pytest.fixture(scope="module", params=["session", "transaction"])
def mode_proxy(request, base_config):
    mode = request.param
    size = 2 if mode == "transaction" else 6
    process = ProxyProcess(merge(base_config, {"backend": {"pool_mode": mode, "pool_size": size}}))
    process.mode = mode
    yield process
    assert process.stop() == 0


@pytest.fixture
def alice_token(issuer):
    return issuer.mint("alice", ["sales_emea"])


@pytest.fixture
def bob_traffic(mode_proxy, issuer):
    """bob queries all along; every answer must be bob's own."""
    stop, seen, errors = threading.Event(), [], []

    def run():
        try:
            with psycopg.connect(mode_proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]),
                                 autocommit=True) as conn:
                while not stop.is_set():
                    seen.append(conn.execute("SELECT current_user, current_setting('pgproxy.user'), %s::int",
                                             (len(seen),)).fetchone()[:2])
        except Exception as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join(10)
    assert not errors, errors
    assert seen and set(seen) == {("amer_analyst", "bob")}


def _base(mode_proxy, offset: int) -> int:
    return 100_000 + offset * 1000 + (0 if mode_proxy.mode == "session" else 500)


def test_psql_queries_copy_and_cancel(mode_proxy, alice_token, bob_traffic):
    env = mode_proxy.env(alice_token)
    base = _base(mode_proxy, 1)
    rows = "".join(f"{i}\tpsql-{i}\n" for i in range(base, base + 100))
    script = (f"\\copy items FROM pstdin\nSELECT count(*) FROM items WHERE id >= {base} AND id < {base + 100};\n"
              f"SELECT current_user, current_setting('pgproxy.user');\n"
              f"DELETE FROM items WHERE id >= {base} AND id < {base + 100};\n")
    script_file = Path(mode_proxy.dir) / "matrix.sql"
    script_file.write_text(script)
    done = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", str(script_file),
                           mode_proxy.dsn("alice")], input=rows, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["COPY", "100", "100", "emea_analyst|alice", "DELETE", "100"]
    sleeper = subprocess.Popen(["psql", "-X", "-c", "SELECT pg_sleep(30)", mode_proxy.dsn("alice")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    threading.Event().wait(1.0)
    sleeper.send_signal(2)
    _, err = sleeper.communicate(timeout=15)
    assert "canceling statement due to user request" in err


@pytest.mark.parametrize("prepare_threshold", ["default", 0])
def test_psycopg_prepared_pipeline_executemany_and_server_cursors(mode_proxy, alice_token, bob_traffic,
                                                                   prepare_threshold):
    options = {} if prepare_threshold == "default" else {"prepare_threshold": prepare_threshold}
    base = _base(mode_proxy, 2) + (0 if prepare_threshold == "default" else 200)
    with psycopg.connect(mode_proxy.dsn("alice"), password=alice_token, autocommit=True, **options) as conn:
        for i in range(12):  # past psycopg's threshold of 5: a named prepared statement from then on
            assert conn.execute("SELECT current_user, current_setting('pgproxy.user'), %s::int",
                                (i,)).fetchone() == (*ALICE, i)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items (id, name) VALUES (%s, %s)",
                            [(base + i, f"psycopg-{i}") for i in range(60)])
        with conn.pipeline():
            cursors = [conn.execute("SELECT count(*) FROM items WHERE id >= %s AND id < %s", (base, base + n))
                       for n in (10, 20, 60)]
            who = conn.execute("SELECT current_setting('pgproxy.user')")
        assert [c.fetchone()[0] for c in cursors] == [10, 20, 60]
        assert who.fetchone() == ("alice",)
        with conn.transaction():
            with conn.cursor(name="matrix_cursor") as named:  # DECLARE ... in the transaction
                named.itersize = 7
                named.execute("SELECT id FROM items WHERE id >= %s AND id < %s ORDER BY id", (base, base + 60))
                assert [row[0] for row in named] == list(range(base, base + 60))
        conn.execute("DELETE FROM items WHERE id >= %s AND id < %s", (base, base + 60))
        assert conn.execute("SELECT current_user, current_setting('pgproxy.user')").fetchone() == ALICE


def test_psycopg_statement_cache_evicting_and_deallocate_all_in_and_out_of_pipeline_mode(mode_proxy, alice_token,
                                                                                          bob_traffic):
    # A cache of two with five texts in turn: psycopg closes the oldest statement (a protocol
    # Close with libpq 17+) and prepares it again later; DEALLOCATE ALL goes through the
    # extended protocol in pipeline mode and as a simple query outside it.
    texts = [f"SELECT current_user, current_setting('pgproxy.user'), %s::int + {k}" for k in range(5)]
    with psycopg.connect(mode_proxy.dsn("alice"), password=alice_token, autocommit=True,
                         prepare_threshold=0) as conn:
        conn.prepared_max = 2
        for round_ in range(3):
            for k, text in enumerate(texts):
                assert conn.execute(text, (round_,)).fetchone() == (*ALICE, round_ + k)
            with conn.pipeline():  # (psycopg would still Bind a cached name after DEALLOCATE ALL here: last)
                cursors = [conn.execute(text, (round_,)) for text in reversed(texts)]
                conn.execute("DEALLOCATE ALL")
            assert [c.fetchone() for c in cursors] == [(*ALICE, round_ + k) for k in reversed(range(5))]
            assert conn.execute(texts[0], (round_,)).fetchone() == (*ALICE, round_)
            conn.execute("DEALLOCATE ALL")
            assert conn.execute(texts[1], (round_,)).fetchone() == (*ALICE, round_ + 1)


def test_asyncpg_cache_executemany_cursors_and_copy(mode_proxy, alice_token, bob_traffic):
    base = _base(mode_proxy, 3)

    async def scenario():
        conn = await asyncpg.connect(host="127.0.0.1", port=mode_proxy.port, user="alice", database="demo",
                                     password=alice_token)  # statement cache on (the default)
        try:
            for i in range(12):
                row = await conn.fetchrow("SELECT current_user, current_setting('pgproxy.user'), $1::int", i)
                assert tuple(row) == (*ALICE, i)
            await conn.executemany("INSERT INTO items (id, name) VALUES ($1, $2)",
                                   [(base + i, f"asyncpg-{i}") for i in range(40)])
            await conn.copy_records_to_table("items", records=[(base + 100 + i, "copy") for i in range(30)],
                                             columns=["id", "name"])
            async with conn.transaction():
                seen = [r["id"] async for r in conn.cursor(
                    "SELECT id FROM items WHERE id >= $1 AND id < $2 ORDER BY id", base, base + 200, prefetch=9)]
            assert seen == list(range(base, base + 40)) + list(range(base + 100, base + 130))
            assert await conn.execute("DELETE FROM items WHERE id >= $1 AND id < $2", base, base + 200) == "DELETE 70"
            assert await conn.fetchval("SELECT current_setting('pgproxy.user')") == "alice"
        finally:
            await conn.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory):
    if not (shutil.which("javac") and os.path.exists(PGJDBC)):
        pytest.fail("javac and Debian's libpostgresql-jdbc-java are required (scripts/install-deps --test)")
    classes = tmp_path_factory.mktemp("jdbc")
    subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests/jdbc/Matrix.java")], check=True, timeout=120)
    return classes


def test_pgjdbc_prepared_past_threshold_batch_autocommit_off_and_fetch_size(mode_proxy, alice_token, bob_traffic,
                                                                             jdbc_classes):
    base = _base(mode_proxy, 4)
    url = f"jdbc:postgresql://127.0.0.1:{mode_proxy.port}/demo"
    done = subprocess.run(["java", "-cp", f"{jdbc_classes}:{PGJDBC}", "Matrix", url, "alice", str(base)],
                          capture_output=True, text=True, env=mode_proxy.env(alice_token), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split()
    assert [line for line in lines if line.startswith("prepared|")] == [f"prepared|emea_analyst|alice|{i}"
                                                                        for i in range(12)]
    assert "batch|50" in lines
    assert f"cursor|50|{sum(range(50))}" in lines
    assert lines[-1] == "end|emea_analyst|alice"


def test_node_postgres_named_queries_and_cursor(mode_proxy, alice_token, bob_traffic):
    done = subprocess.run(["node", str(ROOT / "tests/node/client.mjs"), str(mode_proxy.port), "alice"],
                          capture_output=True, text=True, env=mode_proxy.env(alice_token), timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["named"] == [f"emea_analyst|alice|{i}" for i in range(12)]
    assert result["cursor"] == {"total": sum(range(1, 251)), "batches": 3}


def test_sqlalchemy_over_psycopg(mode_proxy, alice_token, bob_traffic):
    base = _base(mode_proxy, 5)
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://alice@127.0.0.1:{mode_proxy.port}/demo",
                                      connect_args={"password": alice_token}, pool_size=2)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO items (id, name) VALUES (:id, :name)"),
                         [{"id": base + i, "name": f"sa-{i}"} for i in range(25)])
        for _ in range(8):
            with engine.connect() as conn:
                count = conn.execute(sqlalchemy.text("SELECT count(*) FROM items WHERE id >= :a AND id < :b"),
                                     {"a": base, "b": base + 25}).scalar_one()
                who = conn.execute(sqlalchemy.text("SELECT current_user, current_setting('pgproxy.user')")).one()
                assert (count, tuple(who)) == (25, ALICE)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DELETE FROM items WHERE id >= :a AND id < :b"), {"a": base, "b": base + 25})
    finally:
        engine.dispose()


def test_pgbench_prepared(mode_proxy, alice_token, bob_traffic, database):
    pgbench = shutil.which("pgbench") or next(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), None)
    script = Path(mode_proxy.dir) / "who.sql"
    script.write_text("\\set n random(1, 1000)\n"
                      "SELECT 1 / (current_user = 'emea_analyst' AND current_setting('pgproxy.user') = 'alice')::int, :n;\n")
    done = subprocess.run([str(pgbench), "-n", "-M", "prepared", "-c", "4", "-j", "2", "-t", "200", "-f", str(script),
                           "-h", "127.0.0.1", "-p", str(mode_proxy.port), "-U", "alice", "demo"],
                          capture_output=True, text=True, env=mode_proxy.env(alice_token), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "number of transactions actually processed: 800/800" in done.stdout
    assert "number of failed transactions: 0" in done.stdout
