"""pg_dump and pg_restore through pgproxy, in both pool modes, as a person under row-level
security: the dump holds exactly the rows the person's role may see, and a restore as that
person lands in tables the role owns.

alice maps to emea_analyst, whose policy on the demo's orders table shows only EMEA rows.
pg_dump needs --enable-row-security for such a table (else it stops rather than dump a
subset), and SELECT on the sequences the dumped table owns (orders_id_seq: pg_dump reads
its state); the fixture grants that, as a DBA would.
"""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.support.proxy import ProxyProcess, merge

COLUMNS = "id::text, region, customer, amount::text"
_targets = itertools.count()


@pytest.fixture(scope="module")
def pg_bin(database) -> Path:
    """The client programs of the server's major version, else the newest installed (pg_dump
    refuses a server newer than itself)."""
    major = int(database.psql("SHOW server_version_num")) // 10000
    matching = Path(f"/usr/lib/postgresql/{major}/bin")
    if (matching / "pg_dump").exists():
        return matching
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.fail("pg_dump is required: install Debian's postgresql-client")
    return found[-1].parent


@pytest.fixture(scope="module")
def sequence_grant(database):
    database.psql("GRANT SELECT ON SEQUENCE orders_id_seq TO emea_analyst", database="demo")
    yield
    database.psql("REVOKE SELECT ON SEQUENCE orders_id_seq FROM emea_analyst", database="demo")


@pytest.fixture(scope="module", params=["session", "transaction"])
def dump_proxy(request, base_config, sequence_grant):
    # pg_dump -j 2 holds three connections at once (the leader's snapshot-exporting
    # transaction and one per worker); one more so nothing waits for a pool slot.
    process = ProxyProcess(merge(base_config, {"backend": {"pool_mode": request.param, "pool_size": 4}}))
    process.mode = request.param
    yield process
    assert process.stop() == 0, process.log()[-2000:]


@pytest.fixture
def alice_env(dump_proxy, issuer):
    return dump_proxy.env(issuer.mint("alice", ["sales_emea"]))


@pytest.fixture
def target_database(database, dump_proxy):
    """A fresh database to restore into, its public schema owned by emea_analyst."""
    name = f"restore_{dump_proxy.mode}_{next(_targets)}"
    database.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    database.psql(f"CREATE DATABASE {name}")
    database.psql("ALTER SCHEMA public OWNER TO emea_analyst", database=name)
    yield name
    database.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"{args[0]} failed ({done.returncode}): {done.stderr}"
    return done


def alice_rows(proxy: ProxyProcess, env: dict) -> set[tuple]:
    with psycopg.connect(proxy.dsn("alice"), password=env["PGPASSWORD"], autocommit=True) as conn:
        return set(conn.execute(f"SELECT {COLUMNS} FROM orders").fetchall())


def superuser_rows(database, name: str = "demo") -> set[tuple]:
    out = database.psql(f"SELECT {COLUMNS} FROM orders", database=name)
    return {tuple(line.split("|")) for line in out.splitlines() if line}


def copy_rows(script: str, table: str = "public.orders") -> set[tuple]:
    """The rows of ``table``'s COPY block in a plain-format dump."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"COPY {table} "))
    end = lines.index("\\.", start)
    return {tuple(line.split("\t")) for line in lines[start + 1:end]}


def no_denials(proxy: ProxyProcess) -> None:
    denied = [r for r in proxy.audit() if r.get("event") == "denied"]
    assert denied == [], denied


def test_plain_dump_holds_exactly_the_rows_alices_role_may_see(dump_proxy, alice_env, database, pg_bin):
    done = run([str(pg_bin / "pg_dump"), "-t", "orders", "--enable-row-security", dump_proxy.dsn("alice")], alice_env)
    dumped = copy_rows(done.stdout)
    assert dumped == alice_rows(dump_proxy, alice_env)
    everything = superuser_rows(database)
    assert dumped < everything  # a strict subset: the AMER rows are not in alice's dump
    assert dumped and {row[1] for row in dumped} == {"EMEA"}
    assert "CREATE TABLE public.orders" in done.stdout
    assert "CREATE POLICY emea_rows ON public.orders" in done.stdout
    no_denials(dump_proxy)


def test_dump_without_enable_row_security_stops_rather_than_dump_a_subset(dump_proxy, alice_env, pg_bin):
    done = subprocess.run([str(pg_bin / "pg_dump"), "-t", "orders", dump_proxy.dsn("alice")], capture_output=True,
                          text=True, env=alice_env, timeout=120)
    assert done.returncode != 0
    assert "query would be affected by row-level security policy" in done.stderr


def test_custom_format_dump_restores_into_a_schema_alices_role_owns(dump_proxy, alice_env, database, pg_bin,
                                                                      target_database, tmp_path):
    archive = tmp_path / "orders.dump"
    run([str(pg_bin / "pg_dump"), "-Fc", "-f", str(archive), "-t", "orders", "--enable-row-security",
         dump_proxy.dsn("alice")], alice_env)
    listing = run([str(pg_bin / "pg_restore"), "-l", str(archive)], alice_env).stdout
    assert "TABLE DATA public orders" in listing
    run([str(pg_bin / "pg_restore"), "--no-owner", "--exit-on-error", "-d", dump_proxy.dsn("alice", target_database),
         str(archive)], alice_env)
    assert superuser_rows(database, target_database) == alice_rows(dump_proxy, alice_env)
    assert database.psql("SELECT tableowner, rowsecurity FROM pg_tables WHERE tablename = 'orders'",
                         database=target_database) == "emea_analyst|t"
    assert database.psql("SELECT string_agg(polname, ',' ORDER BY polname) FROM pg_policy",
                         database=target_database) == "amer_rows,emea_rows"
    no_denials(dump_proxy)


def test_directory_format_parallel_dump_restores_data_only_into_a_table_alices_role_owns(
        dump_proxy, alice_env, database, pg_bin, target_database, tmp_path):
    out = tmp_path / "orders.dir"
    run([str(pg_bin / "pg_dump"), "-Fd", "-j", "2", "-f", str(out), "-t", "orders", "--enable-row-security",
         dump_proxy.dsn("alice")], alice_env)
    database.psql("CREATE TABLE public.orders (id int PRIMARY KEY, region text NOT NULL, customer text NOT NULL, "
                  "amount numeric NOT NULL); ALTER TABLE public.orders OWNER TO emea_analyst",
                  database=target_database)
    run([str(pg_bin / "pg_restore"), "--data-only", "-t", "orders", "-j", "2", "--exit-on-error",
         "-d", dump_proxy.dsn("alice", target_database), str(out)], alice_env)
    restored = superuser_rows(database, target_database)
    assert restored == alice_rows(dump_proxy, alice_env)
    assert restored < superuser_rows(database)
    no_denials(dump_proxy)
