"""BI drivers multiplex in transaction pooling: 50 PgJDBC and 50 psqlODBC connections with
their default settings, opened and left idle, share a pool of 4 backend connections; a
newcomer still gets in and queries at once; and each of the 100 sees its own settings
(the ones its driver SET at connect) from inside the database, with nobody pinned.

Drivers SET their settings at connect (PgJDBC: extra_float_digits = 3; psqlODBC:
DateStyle = 'ISO', extra_float_digits = 2) outside a transaction: pgproxy records them
as the client's own and re-applies them on whichever backend connection it lands on.
alice and bob alternate, so two identities share the four connections.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.pgcluster import free_port
from tests.support.ops import scrape

ROOT = Path(__file__).resolve().parents[2]
PGJDBC = "/usr/share/java/postgresql.jar"
ODBC_DRIVER = "PostgreSQL Unicode"  # Debian's odbc-postgresql, in /etc/odbcinst.ini
FLEET = 50
POOL_SIZE = 4
USERS = [("alice", "sales_emea", "emea_analyst"), ("bob", "sales_amer", "amer_analyst")]
SETTINGS = ("SELECT current_user, current_setting('pgproxy.user'), current_setting('extra_float_digits'), "
            "current_setting('DateStyle'), current_setting('application_name')")


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory):
    if not (shutil.which("javac") and os.path.exists(PGJDBC)):
        pytest.fail("javac and Debian's libpostgresql-jdbc-java are required (scripts/install-deps --test)")
    classes = tmp_path_factory.mktemp("jdbc-fleet")
    subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests/jdbc/IdleFleet.java")], check=True, timeout=120)
    return classes


@pytest.fixture(scope="module")
def pyodbc():
    try:
        import pyodbc
    except ImportError:
        pytest.fail("pyodbc is required (pip install -e '.[test]')")
    if ODBC_DRIVER not in pyodbc.drivers():
        pytest.fail(f"the psqlODBC driver {ODBC_DRIVER!r} is required: Debian's odbc-postgresql "
                    "(scripts/install-deps --test)")
    return pyodbc


class Fleet:
    """The JVM holding the JDBC connections, one command per line."""

    def __init__(self, classes: Path, port: int, tokens: dict[str, str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        env = {**os.environ, "PASSWORD_A": tokens["alice"], "PASSWORD_B": tokens["bob"]}
        self.process = subprocess.Popen(
            ["java", "-Xss512k", "-XX:TieredStopAtLevel=1", "-cp", f"{classes}:{PGJDBC}", "IdleFleet",
             f"jdbc:postgresql://127.0.0.1:{port}/demo", str(FLEET), "alice", "bob"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, command: str, until: str, timeout: float = 60) -> list[str]:
        """Send ``command``; the lines it printed, up to the one starting with ``until``."""
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        out, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {until!r} from the JVM after {timeout}s: {out[-5:]}") from None
            if line is None:
                self.process.wait(10)
                raise AssertionError(f"the JVM exited ({self.process.returncode}): {self.process.stderr.read()}")
            out.append(line)
            if line.startswith(until):
                return out

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("close", "closed", timeout=20)
            except (AssertionError, OSError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def total(http_port: int, name: str) -> float:
    """``name`` summed over its labels (and the workers)."""
    return sum(v for (sample, _), v in scrape(http_port).items() if sample == name)


def test_fifty_jdbc_and_fifty_odbc_connections_share_four_backends_each_with_its_own_settings(
        make_proxy, issuer, jdbc_classes, pyodbc):
    http_port = free_port()
    proxy = make_proxy(backend={"pool_mode": "transaction", "pool_size": POOL_SIZE},
                       http={"listen": f"127.0.0.1:{http_port}"})
    tokens = {user: issuer.mint(user, [group]) for user, group, _ in USERS}
    roles = {user: role for user, _, role in USERS}
    pins_before = total(http_port, "pgproxy_pins_total")
    fleet = Fleet(jdbc_classes, proxy.port, tokens)
    odbc = []
    try:
        assert fleet.send("open", "opened|", timeout=90)[-1] == f"opened|{FLEET}"
        for i in range(FLEET):
            user = USERS[i % 2][0]
            # autocommit: the ODBC default (pyodbc's own default is off, which would hold a
            # transaction, and so a backend connection, from the first query on)
            odbc.append((user, pyodbc.connect(f"DRIVER={{{ODBC_DRIVER}}};SERVER=127.0.0.1;PORT={proxy.port};"
                                              f"DATABASE=demo;UID={user};PWD={{{tokens[user]}}}",
                                              autocommit=True, timeout=30)))
        assert total(http_port, "pgproxy_client_connections") == 2 * FLEET
        assert total(http_port, "pgproxy_backend_connects_total") <= POOL_SIZE

        # A newcomer with settings of its own gets in and queries at once.
        started = time.monotonic()
        with psycopg.connect(proxy.dsn("alice"), password=tokens["alice"], autocommit=True,
                             connect_timeout=10) as newcomer:
            newcomer.execute("SET DateStyle = 'German, DMY'")
            newcomer.execute("SET extra_float_digits = 1")
            assert newcomer.execute(SETTINGS).fetchone()[:4] == ("emea_analyst", "alice", "1", "German, DMY")
        assert time.monotonic() - started < 5

        # Both fleets query at the same time, so clients land on several backend connections
        # and each one moves between clients with different settings.
        odbc_rows, odbc_errors = [], []

        def query_odbc() -> None:
            try:
                odbc_rows.extend((user, conn.cursor().execute(SETTINGS).fetchone()) for user, conn in odbc)
            except Exception as exc:  # reported below, not lost in the thread
                odbc_errors.append(exc)

        odbc_queries = threading.Thread(target=query_odbc, daemon=True)
        odbc_queries.start()
        jdbc_rows = [line.split("|")[1:] for line in fleet.send("query", "queried|", timeout=90)
                     if line.startswith("row|")]
        odbc_queries.join(90)
        assert not odbc_queries.is_alive() and not odbc_errors, odbc_errors

        assert len(jdbc_rows) == FLEET
        for i, user, current_user, person, digits, datestyle, app in jdbc_rows:
            assert (current_user, person) == (roles[user], user), f"JDBC connection {i}"
            assert (digits, datestyle) == ("3", "ISO, MDY"), f"JDBC connection {i}"
            assert app == f"{user} via PostgreSQL JDBC Driver", f"JDBC connection {i}"
        assert len(odbc_rows) == FLEET
        for i, (user, (current_user, person, digits, datestyle, app)) in enumerate(odbc_rows):
            assert (current_user, person) == (roles[user], user), f"ODBC connection {i}"
            assert (digits, datestyle) == ("2", "ISO, MDY"), f"ODBC connection {i}"
            assert app == f"{user} via unknown", f"ODBC connection {i}"  # psqlODBC sends no application_name

        assert total(http_port, "pgproxy_backend_connects_total") <= POOL_SIZE  # none opened beyond the pool
        assert total(http_port, "pgproxy_pins_total") == pins_before
        assert [r for r in proxy.audit() if r.get("event") == "pin"] == []
    finally:
        for _, conn in odbc:
            conn.close()
        fleet.stop()
