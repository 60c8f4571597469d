"""``pgproxy demo``: a throwaway PostgreSQL, the dev token issuer and the proxy, in one command.

The schema shows identity passthrough: two people in different IdP groups query the
same ``orders`` table and row-level security shows each only their region; ``notes``
is filtered by ``current_setting('pgproxy.user')``, the person rather than the role.
Ctrl-C stops everything and removes the temporary data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from pgproxy.auth.devissuer import DevIssuer
from pgproxy.cli import DEMO_STATE, run_event_loop, serve_until_signalled
from pgproxy.config import load_config
from pgproxy.logs import setup_logging
from pgproxy.pgcluster import PgCluster

POOL_ROLE = "pgproxy_pool"

SCHEMA = """
CREATE ROLE {pool} LOGIN NOINHERIT PASSWORD '{password}';
CREATE ROLE emea_analyst NOLOGIN;
CREATE ROLE amer_analyst NOLOGIN;
GRANT emea_analyst, amer_analyst TO {pool};
CREATE DATABASE demo;
\\c demo
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE TEMPORARY ON DATABASE demo FROM PUBLIC;
CREATE TABLE orders (id serial PRIMARY KEY, region text NOT NULL, customer text NOT NULL, amount numeric NOT NULL);
INSERT INTO orders (region, customer, amount) VALUES
  ('EMEA', 'Bosch', 1200), ('EMEA', 'Siemens', 800), ('EMEA', 'Nokia', 430),
  ('AMER', 'Walmart', 2500), ('AMER', 'Target', 900);
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY emea_rows ON orders FOR SELECT TO emea_analyst USING (region = 'EMEA');
CREATE POLICY amer_rows ON orders FOR SELECT TO amer_analyst USING (region = 'AMER');
GRANT SELECT ON orders TO emea_analyst, amer_analyst;
CREATE TABLE notes (id serial PRIMARY KEY, author text NOT NULL DEFAULT current_setting('pgproxy.user'), body text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes USING (author = current_setting('pgproxy.user', true))
  WITH CHECK (author = current_setting('pgproxy.user', true));
GRANT SELECT, INSERT ON notes TO emea_analyst, amer_analyst;
GRANT USAGE ON SEQUENCE notes_id_seq TO emea_analyst, amer_analyst;
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]

[backend]
host = "127.0.0.1"
port = {pg_port}
user = "{pool}"
password_file = "{password_file}"
pool_size = 10

[auth.jwt]
issuer = "{issuer}"
audience = "pgproxy"
username_claim = "preferred_username"
groups_claim = "groups"

[[roles]]
group = "sales_emea"
role = "emea_analyst"

[[roles]]
group = "sales_amer"
role = "amer_analyst"

[audit]
file = "{audit}"
"""


def run_demo(port: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="pgproxy-demo-"))
    cluster = issuer = None
    try:
        print("starting a throwaway PostgreSQL ...", file=sys.stderr)
        cluster = PgCluster().start()
        password = secrets.token_urlsafe(18)
        cluster.psql(SCHEMA.format(pool=POOL_ROLE, password=password))
        issuer = DevIssuer().start()
        password_file = work / "pool-password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        audit = work / "audit.jsonl"
        config_path = work / "pgproxy.toml"
        config_path.write_text(CONFIG.format(port=port, pg_port=cluster.port, pool=POOL_ROLE,
                                             password_file=password_file, issuer=issuer.url, audit=audit))
        DEMO_STATE.write_text(json.dumps({"issuer": issuer.url, "pid": os.getpid()}))
        cfg = load_config(config_path)
        setup_logging("warning")

        def ready(_server) -> None:
            print(_instructions(port, audit, config_path), flush=True)

        run_event_loop(serve_until_signalled(cfg, on_ready=ready))
        return 0
    finally:
        print("stopping the demo and removing its data ...", file=sys.stderr)
        if issuer:
            issuer.stop()
        if cluster:
            cluster.stop()
        DEMO_STATE.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _pgproxy_command() -> str:
    """How to call pgproxy from a shell: by name when that resolves to this installation."""
    found = shutil.which("pgproxy")
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return "pgproxy"
    local = Path(sys.executable).parent / "pgproxy"
    return str(local) if local.exists() else f"{sys.executable} -m pgproxy"


def _instructions(port: int, audit: Path, config: Path) -> str:
    dsn = f'"host=127.0.0.1 port={port} dbname=demo user={{user}}"'
    pgproxy = _pgproxy_command()
    alice = dsn.format(user="alice")
    bob = dsn.format(user="bob")
    return f"""
pgproxy demo is running (config: {config}).

alice is in group sales_emea, bob in sales_amer; both query the same table:

  PGPASSWORD=$({pgproxy} dev-token alice --groups sales_emea) psql {alice} -c "SELECT * FROM orders"
  PGPASSWORD=$({pgproxy} dev-token bob --groups sales_amer) psql {bob} -c "SELECT * FROM orders"
  PGPASSWORD=$({pgproxy} dev-token alice --groups sales_emea) psql {alice} -c "SELECT current_user, current_setting('pgproxy.user')"

Every statement is audited under the person:  tail -f {audit}
Press Ctrl-C to stop and remove everything.
"""
