"""A throwaway PostgreSQL cluster: initdb into a temporary directory, start, stop, remove.

Used by ``pgproxy demo``, the tests and the benchmark. PostgreSQL refuses to run as
root, so when we are root the cluster runs as an unprivileged user (``postgres`` if it
exists, else ``nobody``). The superuser ``postgres`` logs in over the Unix socket
without a password; TCP logins on loopback use SCRAM-SHA-256. ``hba``, ``local_hba`` and
``ident`` replace those rules (peer and cert maps, ``backend.login = per_role``), and
``use_tls`` turns on TLS with a given certificate.
"""

from __future__ import annotations

import getpass
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path:
    candidates = []
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        candidates.append(Path(out))
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for path in candidates:
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    raise RuntimeError("PostgreSQL server binaries not found: install Debian's postgresql package")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    def __init__(self, port: int | None = None, settings: dict[str, str] | None = None,
                 hba: list[str] | None = None, local_hba: list[str] | None = None,
                 ident: list[str] | None = None) -> None:
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgproxy-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.settings = settings or {}
        self.hba = hba  # TCP lines of pg_hba.conf in place of initdb's (local logins stay trusted)
        # Unix-socket lines, after the superuser's trust line and before everyone else's (e.g.
        # "local all emea_analyst peer map=pgproxy"), and the lines of pg_ident.conf.
        self.local_hba = local_hba or []
        self.ident = ident or []
        self._user = unprivileged_user()
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self.dir.chmod(0o755)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.update(run_as(self._user))
        return subprocess.run(args, check=True, capture_output=True, text=True, cwd=self.dir, **kwargs)

    def start(self) -> "PgCluster":
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                   "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"])
        self._run(["mkdir", "-p", str(self.socket_dir)])
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.socket_dir}'", "max_connections": "300",
                "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                "logging_collector": "off", "log_connections": "off", **self.settings}
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
        if self.hba is not None or self.local_hba:
            tcp = self.hba if self.hba is not None else ["host all all 127.0.0.1/32 scram-sha-256"]
            lines = ["local all postgres trust", *self.local_hba, "local all all trust", *tcp]
            (self.data / "pg_hba.conf").write_text("\n".join(lines) + "\n")
        if self.ident:
            (self.data / "pg_ident.conf").write_text("\n".join(self.ident) + "\n")
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "postgres.log"),
                   "-w", "-t", "60", "start"])
        return self

    def use_tls(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        """Before start: ssl = on with this certificate; with ``client_ca``, client certificates
        chaining to it are verified (pg_hba ``cert`` logins). Copies the files where the
        server's user owns them (PostgreSQL refuses a key others can read)."""
        settings = {"ssl": "on"}
        for source, name, setting in ((cert, "server.pem", "ssl_cert_file"), (key, "server.key", "ssl_key_file"),
                                      (client_ca, "client-ca.pem", "ssl_ca_file")):
            if source is None:
                continue
            target = self.dir / name
            shutil.copy(source, target)
            target.chmod(0o600)
            self.give(target)
            settings[setting] = f"'{target}'"
        self.settings.update(settings)

    def give(self, path: Path) -> None:
        """Make a file the server's own (a TLS key must belong to the user the server runs as)."""
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def psql(self, sql: str, database: str = "postgres", user: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; return psql's unaligned output."""
        psql = self.bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        out = subprocess.run([str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                              "-p", str(self.port), "-U", user, "-d", database],
                             input=sql, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def this_os_user() -> str:
    """The name PostgreSQL's peer authentication sees for processes of this user (pg_ident.conf)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return getpass.getuser()


def peer_map(roles: list[str], map_name: str = "pgproxy") -> list[str]:
    """pg_ident.conf lines letting this OS user log in as each of ``roles`` (peer ... map=)."""
    user = this_os_user()
    return [f"{map_name} {user} {role}" for role in roles]


def unprivileged_user() -> pwd.struct_passwd | None:
    """Whom to run PostgreSQL or PgBouncer as: None when we are not root (run as ourselves),
    else ``postgres`` if it exists, else ``nobody`` — both refuse to run as root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


def run_as(user: pwd.struct_passwd | None) -> dict:
    """subprocess keyword arguments that drop to ``user`` (nothing when None)."""
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
