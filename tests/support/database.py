"""The PostgreSQL the integration tests use, from the first source that works:

1. ``PGPROXY_TEST_DSN`` — an external server; the DSN must name a superuser.
2. testcontainers' PostgresContainer, when a Docker engine answers.
3. A throwaway cluster made with initdb (``pgproxy.pgcluster``), the usual case here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass
class TestDatabase:
    host: str
    port: int
    superuser_dsn: str  # libpq key=value DSN without dbname
    _stop: object = field(default=None, repr=False)
    local_processes: bool = False  # backends are processes on this machine (signals reach them)

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run([shutil.which("psql") or "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                              f"{self.superuser_dsn} dbname={database}"],
                             input=sql, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    def backend_gone(self, pid: int, timeout: float = 10) -> bool:
        """Wait until backend ``pid`` has left pg_stat_activity; False if it is still there."""
        import time
        deadline = time.monotonic() + timeout
        while self.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != "0":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self) -> None:
        if self._stop:
            self._stop()


def _docker_available() -> bool:
    try:
        import docker
        client = docker.from_env(timeout=2)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def start_database() -> TestDatabase:
    external = os.environ.get("PGPROXY_TEST_DSN")
    if external:
        import psycopg
        info = psycopg.conninfo.conninfo_to_dict(external)
        info.pop("dbname", None)
        dsn = " ".join(f"{k}={v}" for k, v in info.items())
        return TestDatabase(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)), dsn)
    if _docker_available():
        from testcontainers.postgres import PostgresContainer
        container = PostgresContainer("postgres:16", username="postgres", password="postgres").start()
        host, port = container.get_container_host_ip(), int(container.get_exposed_port(5432))
        return TestDatabase(host, port, f"host={host} port={port} user=postgres password=postgres",
                            _stop=container.stop)
    from pgproxy.pgcluster import PgCluster
    cluster = PgCluster().start()
    return TestDatabase(cluster.host, cluster.port,
                        f"host={cluster.socket_dir} port={cluster.port} user=postgres", _stop=cluster.stop,
                        local_processes=True)
