"""The three things measured, all in front of one throwaway PostgreSQL:

* direct    — PostgreSQL itself, SCRAM-SHA-256 over TCP;
* pgbouncer — Debian's PgBouncer, SCRAM to clients and to the server, session pooling;
* pgproxy   — its real production path: a JWT from a local issuer as the password,
              role switch, identity settings, audit to a file.

Each pooler also has a transaction-pooling target: ``pgbouncer_tx`` (database bench_tx,
pool_mode=transaction) and ``pgproxy_tx`` (an identity whose role is transaction-pooled
through ``role_pool_modes``). And every target has a TLS twin (``direct_tls``,
``pgbouncer_tls``, ``pgproxy_tls``): the same server, with sslmode=require from pgbench
and a certificate from a CA made for the run.

With ``workers`` set, a second pgproxy runs beside the first (which always has one worker
process): ``pgproxy_workers`` and its twins ``pgproxy_workers_tx``, ``_tls`` and
``_noguard``, with ``server.workers`` = that number (0 = one per CPU, the default).

Every target gets the same pool size and the same backend (pgproxy's pools are per worker,
so with N workers PostgreSQL may see up to N × pool size connections from it). Each
pooler's target knows the pid at the top of its processes (``Target.pid``), so a run can
measure their CPU (bench/cpu.py); ``direct`` has none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pgproxy.auth.devissuer import DevIssuer
from pgproxy.pgcluster import PgCluster, free_port, run_as, unprivileged_user
from tests.support.proxy import ProxyProcess, merge, wait_for_port

BENCH_LOGIN, BENCH_PASSWORD = "bench_login", "bench-password"
POOL_ROLE, POOL_PASSWORD = "pgproxy_pool", "pool-password"
BENCH_ROLE = "bench_role"
BENCH_TX_ROLE = "bench_tx_role"
POOL_SIZE = 20

SETUP_SQL = f"""
CREATE ROLE {BENCH_LOGIN} LOGIN PASSWORD '{BENCH_PASSWORD}';
CREATE ROLE {POOL_ROLE} LOGIN NOINHERIT PASSWORD '{POOL_PASSWORD}';
CREATE ROLE {BENCH_ROLE} NOLOGIN;
GRANT {BENCH_ROLE} TO {POOL_ROLE};
CREATE ROLE {BENCH_TX_ROLE} NOLOGIN;
GRANT {BENCH_TX_ROLE} TO {POOL_ROLE};
CREATE DATABASE bench OWNER {BENCH_LOGIN};
"""


@dataclass
class Target:
    name: str
    port: int
    user: str
    password: str
    extra_env: dict = field(default_factory=dict)
    database: str = "bench"
    pid: int | None = None  # the proxy's top process (its CPU is measured); None for direct

    def env(self) -> dict:
        return {**os.environ, "PGPASSWORD": self.password, "PGSSLMODE": "disable", **self.extra_env}

    def pgbench_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database]


class Bench:
    """Starts and stops everything a run needs."""

    def __init__(self, scale: int, pgproxy_overrides: dict | None = None, pool_size: int = POOL_SIZE,
                 workers: int | None = None) -> None:
        self.scale = scale
        self.pool_size = pool_size
        self.pgproxy_overrides = pgproxy_overrides or {}
        self.workers = workers  # None: no pgproxy_workers targets; 0: one worker per CPU
        self.workers_started = 0  # worker processes the pgproxy_workers proxy really runs
        self.dir = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
        self.dir.chmod(0o755)
        self.cluster: PgCluster | None = None
        self.issuer: DevIssuer | None = None
        self.proxy: ProxyProcess | None = None
        self.unguarded: ProxyProcess | None = None
        self.multi: ProxyProcess | None = None
        self.multi_unguarded: ProxyProcess | None = None
        self.bouncer: subprocess.Popen | None = None
        self.targets: dict[str, Target] = {}

    def start(self) -> "Bench":
        """Everything, or nothing: what did start is stopped again if a part fails."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "Bench":
        from tests.support.certs import TestCA
        ca = TestCA(self.dir)
        self.cert, self.key = ca.issue("localhost", ["localhost", "127.0.0.1"], stem="server")
        self.cluster = PgCluster(settings={"max_connections": str(max(700, 2 * self.pool_size + 50)),
                                           "shared_buffers": "'256MB'"})
        cert, key = self.cluster.dir / "server.pem", self.cluster.dir / "server.key"
        for source, target in ((self.cert, cert), (self.key, key)):
            shutil.copy(source, target)
            self.cluster.give(target)
        self.cluster.settings.update({"ssl": "on", "ssl_cert_file": f"'{cert}'", "ssl_key_file": f"'{key}'"})
        self.cluster.start()
        self.cluster.psql(SETUP_SQL)
        direct = Target("direct", self.cluster.port, BENCH_LOGIN, BENCH_PASSWORD)
        subprocess.run([pgbench(), "-i", "-q", "-s", str(self.scale), *direct.pgbench_args()],
                       env=direct.env(), check=True, capture_output=True)
        self.cluster.psql(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {BENCH_ROLE}, "
                          f"{BENCH_TX_ROLE};", database="bench")
        self.targets["direct"] = direct
        self.targets["pgbouncer"] = self._start_pgbouncer()
        self.targets["pgbouncer_tx"] = Target("pgbouncer_tx", self.targets["pgbouncer"].port, BENCH_LOGIN,
                                              BENCH_PASSWORD, database="bench_tx", pid=self.bouncer.pid)
        self.targets["pgproxy"] = self._start_pgproxy()
        token = self.issuer.mint("benchtx", ["bench_tx"], ttl_s=4 * 3600)
        self.targets["pgproxy_tx"] = Target("pgproxy_tx", self.proxy.port, "benchtx", token,
                                            pid=self.proxy.process.pid)
        plain_names = ["direct", "pgbouncer", "pgproxy"]
        if self.workers is not None:
            self._start_pgproxy_workers(token)
            plain_names.append("pgproxy_workers")
        for name in plain_names:
            plain = self.targets[name]
            self.targets[f"{name}_tls"] = Target(f"{name}_tls", plain.port, plain.user, plain.password,
                                                 {"PGSSLMODE": "require"}, pid=plain.pid)
        return self

    def _start_pgbouncer(self) -> Target:
        secret = self.cluster.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{BENCH_LOGIN}'")
        port = free_port()
        (self.dir / "userlist.txt").write_text(f'"{BENCH_LOGIN}" "{secret}"\n')
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
bench = host=127.0.0.1 port={self.cluster.port} dbname=bench
bench_tx = host=127.0.0.1 port={self.cluster.port} dbname=bench pool_mode=transaction

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir}/userlist.txt
pool_mode = session
default_pool_size = {self.pool_size}
max_client_conn = 20000
logfile = {self.dir}/pgbouncer.log
log_connections = 0
log_disconnections = 0
client_tls_sslmode = allow
client_tls_cert_file = {self.dir}/server.pem
client_tls_key_file = {self.dir}/server.key
""")
        user = unprivileged_user()  # PgBouncer refuses to run as root
        if user is not None:
            for name in ("userlist.txt", "pgbouncer.ini"):
                (self.dir / name).chmod(0o644)
            os.chown(self.dir / "server.key", user.pw_uid, user.pw_gid)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.bouncer = subprocess.Popen([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer",
                                         str(self.dir / "pgbouncer.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **run_as(user))
        wait_for_port(port, self.bouncer)
        return Target("pgbouncer", port, BENCH_LOGIN, BENCH_PASSWORD, pid=self.bouncer.pid)

    def _start_pgproxy(self) -> Target:
        self.issuer = DevIssuer().start()
        self.proxy = ProxyProcess(self.pgproxy_config())
        token = self.issuer.mint("benchuser", ["bench"], ttl_s=4 * 3600)
        # The same proxy with the statement guard off, only to measure what the guard costs.
        self.unguarded = ProxyProcess(merge(self.pgproxy_config(), {"guard": {"unsafe_disable": True}}))
        self.targets["pgproxy_noguard"] = Target("pgproxy_noguard", self.unguarded.port, "benchuser", token,
                                                 pid=self.unguarded.process.pid)
        return Target("pgproxy", self.proxy.port, "benchuser", token, pid=self.proxy.process.pid)

    def _start_pgproxy_workers(self, tx_token: str) -> None:
        """The same proxy with ``server.workers = self.workers``, and its guard-off twin."""
        from bench.cpu import descendants
        workers = {"server": {"workers": self.workers}}
        self.multi = ProxyProcess(merge(self.pgproxy_config(), workers))
        self.multi_unguarded = ProxyProcess(merge(self.pgproxy_config(), {**workers,
                                                                          "guard": {"unsafe_disable": True}}))
        # a supervisor and its workers, or (one worker) a single process
        self.workers_started = len(descendants(self.multi.process.pid)) or 1
        token = self.targets["pgproxy"].password
        for name, proxy, user, password in (
                ("pgproxy_workers", self.multi, "benchuser", token),
                ("pgproxy_workers_tx", self.multi, "benchtx", tx_token),
                ("pgproxy_workers_noguard", self.multi_unguarded, "benchuser", token)):
            self.targets[name] = Target(name, proxy.port, user, password, pid=proxy.process.pid)

    def pgproxy_config(self) -> dict:
        password_file = self.dir / "pool-password"
        password_file.write_text(POOL_PASSWORD + "\n")
        return merge({
            "backend": {"host": "127.0.0.1", "port": self.cluster.port, "user": POOL_ROLE,
                        "password_file": str(password_file), "pool_size": self.pool_size,
                        "role_pool_modes": {BENCH_TX_ROLE: "transaction"}},
            "auth": {"jwt": {"issuer": self.issuer.url, "audience": "pgproxy"}},
            "roles": [{"group": "bench", "role": BENCH_ROLE}, {"group": "bench_tx", "role": BENCH_TX_ROLE}],
            "log": {"level": "warning"},
            # one process unless the run asks for more (--workers)
            "server": {"workers": 1, "tls_cert_file": str(self.cert), "tls_key_file": str(self.key)},
        }, self.pgproxy_overrides)

    def pids(self) -> dict[str, int]:
        return {"pgbouncer": self.bouncer.pid, "pgproxy": self.proxy.process.pid}

    def versions(self) -> dict:
        bouncer = subprocess.run([shutil.which("pgbouncer") or "pgbouncer", "--version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        return {"postgresql": self.cluster.psql("SHOW server_version"), "pgbouncer": bouncer,
                "pgbench": subprocess.run([pgbench(), "--version"], capture_output=True, text=True).stdout.strip()}

    def stop(self) -> None:
        for proxy in (self.proxy, self.unguarded, self.multi, self.multi_unguarded):
            if proxy:
                proxy.stop()
        if self.bouncer:
            self.bouncer.terminate()
            self.bouncer.wait(10)
        if self.issuer:
            self.issuer.stop()
        if self.cluster:
            self.cluster.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    from pgproxy.pgcluster import find_bindir
    return str(find_bindir() / "pgbench")
