"""Shared fixtures: a real PostgreSQL with the demo schema, the dev issuer, and pgproxy processes."""

from __future__ import annotations

import secrets
import shutil

import pytest

from pgproxy.auth.devissuer import DevIssuer
from pgproxy.demo import POOL_ROLE, SCHEMA
from tests.support.database import start_database
from tests.support.proxy import ProxyProcess, merge
from tests.support.wire import Wire

# Extra grants the tests need beyond the demo: temp tables (to prove they do not leak
# between sessions) and a writable table.
TEST_GRANTS = """
\\c demo
GRANT TEMPORARY ON DATABASE demo TO emea_analyst, amer_analyst;
CREATE TABLE items (id int PRIMARY KEY, name text);
GRANT SELECT, INSERT, UPDATE, DELETE ON items TO emea_analyst, amer_analyst;
CREATE ROLE other_role NOLOGIN;
GRANT other_role TO pgproxy_pool;
"""


@pytest.fixture(scope="session")
def database():
    if not shutil.which("psql"):
        pytest.fail("psql is required: install Debian's postgresql-client (.ci/run does)")
    db = start_database()
    password = secrets.token_urlsafe(12)
    db.psql(SCHEMA.format(pool=POOL_ROLE, password=password))
    db.psql(TEST_GRANTS)
    db.pool_password = password
    yield db
    db.stop()


@pytest.fixture(scope="session")
def issuer():
    dev = DevIssuer().start()
    yield dev
    dev.stop()


@pytest.fixture(scope="session")
def base_config(database, issuer, tmp_path_factory):
    password_file = tmp_path_factory.mktemp("secrets") / "pool-password"
    password_file.write_text(database.pool_password + "\n")
    return {
        "server": {"workers": 1},  # tests that want several workers say so
        "backend": {"host": database.host, "port": database.port, "user": POOL_ROLE,
                    "password_file": str(password_file), "pool_size": 5},
        "auth": {"jwt": {"issuer": issuer.url, "audience": "pgproxy", "jwks_refresh_min_interval_s": 0.5}},
        "roles": [{"group": "sales_emea", "role": "emea_analyst"}, {"group": "sales_amer", "role": "amer_analyst"}],
    }


@pytest.fixture(scope="session")
def proxy(base_config):
    """One shared pgproxy with the default test config."""
    process = ProxyProcess(base_config)
    yield process
    process.stop()


@pytest.fixture
def make_proxy(base_config):
    """Start a pgproxy with config overrides for one test."""
    started = []

    def start(**overrides) -> ProxyProcess:
        process = ProxyProcess(merge(base_config, overrides))
        started.append(process)
        return process

    yield start
    close_all_wires()  # the test's raw sockets go first, as a client would leave
    for process in started:
        assert process.stop() == 0, f"pgproxy did not shut down cleanly: {process.log()[-2000:]}"


def close_all_wires() -> None:
    while Wire.opened:
        Wire.opened.pop().close()


@pytest.fixture(autouse=True)
def close_wires():
    yield
    close_all_wires()
