"""psql, psycopg 3 and asyncpg with default settings: queries, COPY both ways, cancel."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest


@pytest.fixture
def alice_token(issuer):
    return issuer.mint("alice", ["sales_emea"])


def _psql(proxy, token, *args, stdin=None):
    return subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args, proxy.dsn("alice")],
                          input=stdin, capture_output=True, text=True, env=proxy.env(token), timeout=60)


def test_psql_copy_in_and_out(proxy, alice_token):
    rows = "".join(f"{i}\tname-{i}\n" for i in range(5000, 5500))
    load = _psql(proxy, alice_token, "-c", r"\copy items FROM STDIN", stdin=rows)
    assert load.returncode == 0, load.stderr
    out = _psql(proxy, alice_token, "-c", "COPY (SELECT id, name FROM items WHERE id >= 5000 AND id < 5500 ORDER BY id) TO STDOUT")
    assert out.stdout == rows
    def is_copy_in(record):  # psql's \copy sends its own spacing: "COPY  items FROM STDIN "
        return " ".join(record.get("statement", "").split()) == "COPY items FROM STDIN"

    copy_in = [r for r in proxy.audit(is_copy_in) if is_copy_in(r)][-1]
    assert (copy_in["user"], copy_in["command"], copy_in["rows"]) == ("alice", "COPY", 500)


def test_psql_cancel_with_statement_timeout_style_interrupt(proxy, alice_token):
    # psql sends a CancelRequest on SIGINT; the proxy must route it to the right backend.
    process = subprocess.Popen(["psql", "-X", "-c", "SELECT pg_sleep(30)", proxy.dsn("alice")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proxy.env(alice_token))
    time.sleep(1.0)
    started = time.monotonic()
    process.send_signal(2)
    _, err = process.communicate(timeout=15)
    assert "canceling statement due to user request" in err
    assert time.monotonic() - started < 10


def test_psycopg_queries_copy_and_cancel(proxy, alice_token):
    with psycopg.connect(proxy.dsn("alice"), password=alice_token, autocommit=True) as conn:
        assert conn.execute("SELECT %s::int + %s::int", (2, 3)).fetchone() == (5,)
        with conn.cursor() as cur:
            with cur.copy("COPY items (id, name) FROM STDIN") as copy:
                for i in range(6000, 6200):
                    copy.write_row((i, f"psycopg-{i}"))
            with cur.copy("COPY (SELECT id, name FROM items WHERE id >= 6000 AND id < 6200 ORDER BY id) TO STDOUT") as copy:
                got = list(copy.rows())
        assert len(got) == 200 and got[0] == ("6000", "psycopg-6000")
        threading.Timer(0.5, conn.cancel).start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert conn.execute("SELECT current_user").fetchone() == ("emea_analyst",)


def test_asyncpg_queries_copy_and_cancel(proxy, alice_token):
    async def scenario():
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice", database="demo",
                                     password=alice_token)
        try:
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
            for _ in range(3):  # asyncpg's statement cache: named prepared statements, reused
                assert await conn.fetchval("SELECT count(*) FROM orders WHERE amount > $1", 500) == 2
            await conn.copy_records_to_table("items", records=[(i, f"asyncpg-{i}") for i in range(7000, 7100)],
                                             columns=["id", "name"])
            assert await conn.fetchval("SELECT count(*) FROM items WHERE id >= 7000 AND id < 7100") == 100
            chunks = []

            async def sink(data: bytes) -> None:
                chunks.append(data)

            await conn.copy_from_query("SELECT id, name FROM items WHERE id >= 7000 AND id < 7003 ORDER BY id",
                                       output=sink)
            assert b"".join(chunks) == b"7000\tasyncpg-7000\n7001\tasyncpg-7001\n7002\tasyncpg-7002\n"
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(20)", timeout=0.5)  # asyncpg cancels on timeout
            started = time.monotonic()
            assert await conn.fetchval("SELECT current_setting('pgproxy.user')") == "alice"
            assert time.monotonic() - started < 5
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_notifications_reach_the_listening_client(proxy, issuer, alice_token):
    with psycopg.connect(proxy.dsn("alice"), password=alice_token, autocommit=True) as listener, \
            psycopg.connect(proxy.dsn("bob"), password=issuer.mint("bob", ["sales_amer"]), autocommit=True) as sender:
        listener.execute("LISTEN orders_changed")
        sender.execute("NOTIFY orders_changed, 'order 42'")
        received = next(listener.notifies(timeout=5))
        assert (received.channel, received.payload) == ("orders_changed", "order 42")
