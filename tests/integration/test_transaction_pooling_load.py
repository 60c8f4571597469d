"""1,000 clients of 50 identities through 20 backend connections (transaction pooling).

Every transaction checks inside the database that it runs as its own person — role and
identity setting — with prepared statements (asyncpg's cache), simple queries and
writes mixed. ``PGPROXY_LOAD_SECONDS`` sets how long the load runs (default 15; the
acceptance run uses 180).
"""

from __future__ import annotations

import asyncio
import os
import random

import asyncpg

from tests.support.proxy import ProxyProcess, merge

CLIENTS = 1000
IDENTITIES = 50
POOL = 20
SECONDS = float(os.environ.get("PGPROXY_LOAD_SECONDS", "15"))
ROLE_OF_GROUP = {"sales_emea": "emea_analyst", "sales_amer": "amer_analyst"}


def test_thousand_clients_fifty_identities_pool_of_twenty(base_config, issuer, database):
    proxy = ProxyProcess(merge(base_config, {"backend": {"pool_mode": "transaction", "pool_size": POOL,
                                                         "acquire_timeout_s": 60},
                                             "audit": {"parameters": "off"}}))
    people = [(f"person{i:02d}", "sales_emea" if i % 2 else "sales_amer") for i in range(IDENTITIES)]
    tokens = {name: issuer.mint(name, [group], ttl_s=3600) for name, group in people}
    try:
        stats = asyncio.run(_load(proxy.port, people, tokens, lambda: _connections_to(proxy.process.pid,
                                                                                     database.port)))
    finally:
        assert proxy.stop() == 0
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["mismatches"] == 0
    assert stats["connected"] == CLIENTS
    assert stats["transactions"] > CLIENTS  # every client ran several
    assert stats["inserted"] == stats["counted"]
    assert 0 < stats["most_backends"] <= POOL
    print(f"\n{stats['transactions']} transactions in {SECONDS:.0f} s by {CLIENTS} clients, "
          f"{stats['transactions'] / SECONDS:.0f}/s; at most {stats['most_backends']} backend connections")


def _connections_to(pid: int, port: int) -> int:
    """Established TCP connections from process ``pid`` to ``port`` (its backend connections)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
                count += 1
    return count


async def _load(port: int, people, tokens, count_backends) -> dict:
    stats = {"errors": [], "mismatches": 0, "transactions": 0, "connected": 0, "inserted": 0, "counted": 0,
             "most_backends": 0}
    stop = asyncio.Event()
    start = asyncio.Event()

    async def client(index: int) -> None:
        name, group = people[index % IDENTITIES]
        role = ROLE_OF_GROUP[group]
        rng = random.Random(index)
        base = 10_000_000 + index * 100_000
        written = 0
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=name, database="demo",
                                         password=tokens[name], timeout=120)
        except Exception as exc:
            stats["errors"].append(f"connect {name}: {exc!r}")
            return
        stats["connected"] += 1
        await start.wait()
        try:
            while not stop.is_set():
                choice = rng.random()
                if choice < 0.5:  # prepared, inside a transaction, with a write
                    async with conn.transaction():
                        row = await conn.fetchrow(
                            "SELECT current_user, current_setting('pgproxy.user'), "
                            "1 / (current_user = $1 AND current_setting('pgproxy.user') = $2)::int", role, name)
                        if (row[0], row[1]) != (role, name):
                            stats["mismatches"] += 1
                        if rng.random() < 0.3:
                            await conn.execute("INSERT INTO items (id, name) VALUES ($1, $2)", base + written, name)
                            written += 1
                elif choice < 0.8:  # a lone prepared statement (autocommit)
                    got = await conn.fetchval("SELECT current_setting('pgproxy.user') || '/' || current_user "
                                              "|| '/' || $1::text", str(index))
                    if got != f"{name}/{role}/{index}":
                        stats["mismatches"] += 1
                else:  # the simple protocol, two statements in one query
                    await conn.execute(f"SELECT 1 / (current_user = '{role}')::int; "
                                       f"SELECT 1 / (current_setting('pgproxy.user') = '{name}')::int")
                stats["transactions"] += 1
            count = await conn.fetchval("SELECT count(*) FROM items WHERE id >= $1 AND id < $2 AND name = $3",
                                        base, base + 100_000, name)
            stats["inserted"] += written
            stats["counted"] += count
            await conn.execute("DELETE FROM items WHERE id >= $1 AND id < $2", base, base + 100_000)
        except Exception as exc:
            stats["errors"].append(f"{name} (client {index}): {exc!r}")
        finally:
            await conn.close()

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    while stats["connected"] + len(stats["errors"]) < CLIENTS:
        await asyncio.sleep(0.1)
    start.set()
    deadline = asyncio.get_running_loop().time() + SECONDS
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(1)
        stats["most_backends"] = max(stats["most_backends"], count_backends())
    stop.set()
    await asyncio.gather(*tasks)
    return stats
