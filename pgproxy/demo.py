"""``pgproxy demo``: a throwaway PostgreSQL, the dev token issuer and the proxy, in one command.

The schema shows identity passthrough: two people in different IdP groups query the
same ``orders`` table and row-level security shows each only their region; ``notes``
is filtered by the person rather than the role: ``pgproxy.person()``, the signed
``pgproxy.user`` (see pgproxy/signed_identity.py), which a forged setting cannot pass.
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
from pgproxy.pgcluster import PgCluster, peer_map
from pgproxy.signed_identity import encode_key, generate_key, install_sql

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

# After install_sql() in database demo: it needs the key, so it is a step of its own
# (tests/conftest.py runs SCHEMA only). (SELECT ...) evaluates the function once per
# statement, not once per row.
SIGNED_SCHEMA = """
ALTER TABLE notes ALTER COLUMN author SET DEFAULT pgproxy.person();
ALTER POLICY own_notes ON notes USING (author = (SELECT pgproxy.person()))
  WITH CHECK (author = (SELECT pgproxy.person()));
"""

# backend.login = per_role: each backend connection logs in as the mapped role itself, by
# peer authentication over the cluster's Unix socket (pg_ident.conf maps the OS user running
# the demo to each role). The roles log in without a password, so only through that map; the
# pool role (only /readyz would use it) is granted nothing.
MAPPED_ROLES = ["emea_analyst", "amer_analyst"]
PER_ROLE_SQL = """
ALTER ROLE emea_analyst LOGIN;
ALTER ROLE amer_analyst LOGIN;
REVOKE emea_analyst, amer_analyst FROM {pool};
"""


def demo_cluster() -> PgCluster:
    logins = ",".join([POOL_ROLE, *MAPPED_ROLES])
    return PgCluster(local_hba=[f"local all {logins} peer map=pgproxy"], ident=peer_map([POOL_ROLE, *MAPPED_ROLES]))


CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]

[backend]
host = "{pg_socket_dir}"
port = {pg_port}
user = "{pool}"
login = "per_role"
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

[identity]
signing_key_file = "{key_file}"

[audit]
file = "{audit}"
"""


def run_demo(port: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="pgproxy-demo-"))
    cluster = issuer = None
    try:
        print("starting a throwaway PostgreSQL ...", file=sys.stderr)
        cluster = demo_cluster().start()
        password = secrets.token_urlsafe(18)  # never used: the pool role logs in by peer too
        cluster.psql(SCHEMA.format(pool=POOL_ROLE, password=password))
        cluster.psql(PER_ROLE_SQL.format(pool=POOL_ROLE))
        key = generate_key()
        cluster.psql(install_sql(key) + SIGNED_SCHEMA, database="demo")
        key_file = work / "identity.key"
        key_file.touch(0o600)
        key_file.write_text(encode_key(key))
        issuer = DevIssuer().start()
        audit = work / "audit.jsonl"
        config_path = work / "pgproxy.toml"
        config_path.write_text(CONFIG.format(port=port, pg_port=cluster.port, pg_socket_dir=cluster.socket_dir,
                                             pool=POOL_ROLE, issuer=issuer.url, audit=audit,
                                             key_file=key_file))
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

The notes table is private to each person: its policy reads pgproxy.person(), the
signed pgproxy.user, so a forged set_config('pgproxy.user', ...) sees nothing.

Every statement is audited under the person:  tail -f {audit}
Press Ctrl-C to stop and remove everything.
"""
