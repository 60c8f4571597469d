"""The proxy process: listeners, the sessions they accept, pools, cancel keys, shutdown.

Lifecycle (as uvicorn does it): ``start`` binds every listener and starts the janitor;
``shutdown`` stops accepting, gives sessions ``server.shutdown_timeout_s`` to finish,
ends the rest with 57P01, closes the pools and flushes the audit trail.

The janitor is the one place for periodic work: once a second it lets every pool close
idle connections past their idle timeout or lifetime, and (single process under a
systemd watchdog) tells systemd the loop is alive.

Introspection (metrics, /readyz, the admin API) goes through ``control``: one request,
one answer. ``gather`` asks every worker — this one directly, the others over the
control channel — so any worker can answer for the whole proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import time

from pgproxy import control
from pgproxy.policy.guard import READ_ONLY_SETTINGS, RolePolicy
from pgproxy.audit import AuditLog
from pgproxy.audit_sinks import build_sinks
from pgproxy.auth.jwt import JwtAuthenticator, looks_like_jwt
from pgproxy.backend.connection import open_connection, send_cancel
from pgproxy.backend.pool import Pool
from pgproxy.config import HMAC_ALGORITHMS, Config, parse_listen, restart_only_changes
from pgproxy.errors import AuthUnavailable, PgProxyError, auth_failed, shutting_down, terminated_by_operator
from pgproxy.errors import backend_unavailable
from pgproxy import signed_identity
from pgproxy.frontend.session import ClientSession
from pgproxy.frontend.startup import text_array
from pgproxy.grants import in_force_for
from pgproxy.metrics import Metrics
from pgproxy.notify import sd_notify
from pgproxy.protocol.messages import MAX_CANCEL_KEY, MIN_CANCEL_KEY
from pgproxy.control_plane import ControlPlane
from pgproxy.peering import Peering, cancel_owner, cancel_pid
from pgproxy.roles import map_role
from pgproxy.supervisor import StartupError, bind_failure, cancel_socket_name

log = logging.getLogger("pgproxy.server")

JANITOR_INTERVAL_S = 1.0
READY_CACHE_S = 5.0  # /readyz logs in to PostgreSQL at most this often


LONG_CANCEL_KEY = 32     # bytes of secret for protocol 3.2 clients (3.0 clients: 4)
# The Unix-socket listener, bound by the supervisor before it forks (workers inherit it).
inherited_unix_socket: socket.socket | None = None


def unix_socket_path(cfg: Config) -> str:
    port = parse_listen(cfg.server.listen[0])[1] if cfg.server.listen else 5432
    return os.path.join(cfg.server.unix_socket_dir, f".s.PGSQL.{port}")


def bind_unix_socket(cfg: Config) -> socket.socket:
    """<unix_socket_dir>/.s.PGSQL.<port>, as PostgreSQL names it, so psql -h <dir> finds it.

    Once per start (the supervisor binds it for its workers). A socket file that accepts
    connections belongs to a live process, which keeps it; one that refuses them was left
    by a process that did not stop cleanly, and is replaced."""
    path = unix_socket_path(cfg)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if _unix_socket_answers(path):
                raise StartupError(f"another process already listens on {path}; stop it or choose another "
                                   "server.unix_socket_dir")
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o777)  # like PostgreSQL's unix_socket_permissions: authentication decides
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}; fix server.unix_socket_dir") from None
    sock.setblocking(False)
    return sock


def _unix_socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)  # the owner sees a connection that ends before its startup packet
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, socket.timeout):
            return True  # alive, with a full backlog
        except OSError as exc:  # cannot tell: leave it alone
            raise StartupError(f"cannot tell whether another process listens on {path}: {exc.strerror}; "
                               "remove it or choose another server.unix_socket_dir") from None
    return True


class ProxyServer:
    def __init__(self, cfg: Config, worker_index: int = 0, group: int = 0) -> None:
        self.cfg = cfg
        self.worker_index = worker_index
        self.group = group  # the supervisor's pid; 0 when this is the only process
        self._cancel_inbox: socket.socket | None = None
        self.audit = AuditLog(cfg.audit, sinks=build_sinks(cfg))  # each worker its own sink connections
        self.metrics = Metrics()
        self.jwt = self.ldap = self.service_accounts = None
        self._set_authenticators(cfg)
        self._pools: dict[tuple[str, str | None], Pool] = {}  # (database, role; None with login = pool_role)
        self._sessions: set[ClientSession] = set()
        self._cancel_keys: dict[int, ClientSession] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._janitor: asyncio.Task | None = None
        self._services: list[asyncio.AbstractServer] = []  # control channel and HTTP port
        self.addresses: list[tuple[str, int]] = []
        # Revocations and blocks (this worker's copy, shared through [control]) and cancel peering.
        self.control_plane = ControlPlane(self)
        self.peering = Peering(self)
        self._backend_ok_at = float("-inf")
        self._owns_unix_socket = False
        self._policies: dict[str, tuple] = {}  # role -> policy_for(role), for this configuration
        from pgproxy.grants_service import GrantService
        self.grants = GrantService(self)  # time-boxed elevation (grants.py)
        from pgproxy.revalidation import Revalidator
        self.revalidator = Revalidator(self)  # sessions end when their credential does
        _warn_if_unguarded(cfg)

    # --- what sessions ask of the server ---------------------------------------------

    def admit(self, session: ClientSession) -> bool:
        if len(self._sessions) >= self.cfg.server.max_clients:
            return False
        self._sessions.add(session)
        return True

    def sessions(self):
        return iter(self._sessions)

    def forget(self, session: ClientSession) -> None:
        self._sessions.discard(session)
        self.grants.detach(session)
        if session.cancel_key is not None:
            self._cancel_keys.pop(session.cancel_key[0], None)

    def _set_authenticators(self, cfg: Config, old: Config | None = None) -> None:
        """(Re)build the authenticators whose configuration changed."""
        if old is None or cfg.auth.jwt != old.auth.jwt or cfg.jwt_shared_secret != old.jwt_shared_secret:
            self.jwt = JwtAuthenticator(cfg.auth.jwt, cfg.jwt_shared_secret) if cfg.auth.jwt else None
        if old is None or cfg.auth.ldap != old.auth.ldap or cfg.ldap_bind_password != old.ldap_bind_password:
            if self.ldap is not None:
                self.ldap.close()
            from pgproxy.auth.ldap import LdapAuthenticator
            self.ldap = LdapAuthenticator(cfg.auth.ldap, cfg.ldap_bind_password, self.metrics) \
                if cfg.auth.ldap else None
        from pgproxy.auth.service import ServiceAccounts
        self.service_accounts = ServiceAccounts(cfg.service_accounts) if cfg.service_accounts is not None else None

    def authenticator_for(self, user: str, secret: str, database: str):
        """Who checks this credential: a known service account name first, then the
        credential's shape (JWT-shaped: the IdP; anything else: the directory), each
        only for the databases it serves (documented in the README)."""
        auth = self.cfg.auth

        def serves(section) -> bool:
            return section is not None and (not section.databases or database in section.databases)

        if self.service_accounts is not None and serves(auth.service_accounts) and self.service_accounts.knows(user):
            return self.service_accounts
        if self.jwt is not None and serves(auth.jwt) and looks_like_jwt(secret):
            return self.jwt
        if self.ldap is not None and serves(auth.ldap):
            return self.ldap
        if self.jwt is not None and serves(auth.jwt):
            return self.jwt  # which refuses it: not a JWT
        return None

    async def authenticate(self, user: str, secret: str, database: str = ""):
        authenticator = self.authenticator_for(user, secret, database)
        method = authenticator.method if authenticator is not None else "none"
        try:
            if not secret:
                raise auth_failed(user, "empty password")
            if authenticator is None:
                raise auth_failed(user, f'no authenticator serves database "{database}" for this credential')
            identity = await authenticator.authenticate(user, secret)
            refusal = self.control_plane.login_refusal(user, identity)  # blocks, revocations (control_plane.py)
            if refusal is not None:
                raise refusal
        except PgProxyError as exc:
            result = "unavailable" if isinstance(exc, AuthUnavailable) else \
                {"28P01": "failed", "28000": "refused"}.get(exc.sqlstate, "unavailable")
            self.metrics.count("pgproxy_auth_attempts", method, result)
            raise
        self.metrics.count("pgproxy_auth_attempts", method, "ok")
        return identity

    def role_for(self, identity, session=None) -> str | None:
        """The role ``identity`` maps to: a grant in force for the person, else [[roles]]
        (roles.map_role). A session that takes a granted role is remembered, so that it
        ends when the grant does (grants_service.py)."""
        now = time.time()
        grants = self.grants.of(identity.username)
        role = map_role(identity, self.cfg.roles, self.cfg.auth.default_role, grants, now)
        granted = in_force_for(grants, identity.username, now) if not identity.role else None
        if granted is not None and session is not None and role == granted.role:
            self.grants.attach(session, granted)
        return role

    def is_blocked(self, user: str) -> bool:
        """Blocked or revoked: an active entry names this user name (control_plane.py)."""
        return self.control_plane.blocked(user)

    def pool_for(self, database: str, role: str) -> Pool:
        """The pool a session of ``role`` takes its connections from. login = pool_role: one
        per database, logged in as backend.user. per_role: one per database and role, logged
        in as the role itself (its password, if any, from backend.role_secrets_file)."""
        backend = self.cfg.backend
        per_role = backend.login == "per_role"
        key = (database, role if per_role else None)
        pool = self._pools.get(key)
        if pool is None:
            password = self.cfg.role_passwords.get(role) if per_role else self.cfg.backend_password
            pool = self._pools[key] = Pool(backend, database, password, self.cfg.backend_tls,
                                           role=role if per_role else None)
        if pool.login_role != (role if per_role else backend.user):  # never another role's connections
            raise backend_unavailable(f'the pool for role "{role}" logs in as "{pool.login_role}"')
        return pool

    def policy_for(self, role: str) -> tuple[RolePolicy | None, dict[str, str]]:
        """The guard's rules for a mapped role (None: the guard is off) and the settings
        the policy fixes in the database. One object per role and configuration, shared by
        its sessions (thousands of idle sessions each hold one)."""
        cached = self._policies.get(role)
        if cached is None:
            cached = self._policies[role] = self._build_policy(role)
        return cached

    def _build_policy(self, role: str) -> tuple[RolePolicy | None, dict[str, str]]:
        if self.cfg.guard.unsafe_disable:
            return None, {}
        rule = next((p for p in self.cfg.policies if p.role == role), None)
        allowed = frozenset(self.cfg.guard.allowed_functions)  # names as PostgreSQL stores them: not lowercased
        if rule is None:
            return RolePolicy(allowed_functions=allowed), {}
        settings = {}
        if rule.read_only:
            settings["default_transaction_read_only"] = "on"
        if rule.statement_timeout_ms:
            settings["statement_timeout"] = str(rule.statement_timeout_ms)
        locked = set(settings) | (set(READ_ONLY_SETTINGS) if rule.read_only else set())
        return RolePolicy(read_only=rule.read_only, allow_functions=rule.allow_functions,
                          allowed_classes=frozenset(rule.allowed_classes),
                          denied_functions=frozenset(f.lower() for f in rule.denied_functions),
                          denied_relations=frozenset(rule.denied_relations),
                          locked_settings=frozenset(locked),
                          allowed_functions=allowed | frozenset(rule.allowed_functions)), settings

    def identity_signer(self, identity):
        """pid -> the signed-identity settings for one backend connection (signed_identity.py),
        or None when no signing key is configured. The pid is signed too, so a signature
        copied to another backend connection does not verify."""
        key = self.cfg.identity_key
        if key is None:
            return None
        groups = text_array(identity.groups)
        username, method = identity.username, identity.auth_method
        return lambda pid: {signed_identity.SETTING: signed_identity.sign(key, username, groups, method, pid)}

    def pool_mode_for(self, database: str, role: str) -> str:
        backend = self.cfg.backend
        return backend.role_pool_modes.get(role) or backend.database_pool_modes.get(database) or backend.pool_mode

    @property
    def multi_worker(self) -> bool:
        return self.cfg.server.workers > 1

    def register_cancel(self, session: ClientSession) -> tuple[int, bytes]:
        """A new cancel key for a session: (process id, secret). The process id finds the
        session (with several workers its top bits name the worker that owns it); the secret
        is 4 random bytes for protocol 3.0 clients and 32 for 3.2 clients, which accept keys
        of up to 256 bytes."""
        # With control.peer_id its top bits also name this instance (peering.py).
        pid = cancel_pid(self.cfg.control.peer_id, self.worker_index, self.multi_worker, self._cancel_keys)
        self._cancel_keys[pid] = session
        long_keys = getattr(session, "protocol_minor", 0) >= 2
        return pid, secrets.token_bytes(LONG_CANCEL_KEY if long_keys else 4)

    def cancel(self, pid: int, key: bytes, peer: str, from_peer: bool = False) -> None:
        """A CancelRequest (any key length, 4 to 256 bytes): forwarded to PostgreSQL for the
        session it names if the key matches; unknown keys are ignored, as PostgreSQL does.
        A key of another instance goes to that instance (peering.py), never onwards again
        when it came from a peer (``from_peer``)."""
        instance, owner = cancel_owner(pid, self.cfg.control.peer_id)
        if instance != self.cfg.control.peer_id:
            if not from_peer and instance > 0:
                self.peering.forward(instance, pid, key)
            return
        if self.multi_worker and owner != self.worker_index:
            if 0 <= owner < self.cfg.server.workers:
                self._forward_cancel(owner, pid, key)
            return
        session = self._cancel_keys.get(pid)
        # compare_digest: constant time for equal lengths, and False for a key of another length
        ok = session is not None and session.cancel_key is not None and hmac.compare_digest(
            session.cancel_key[1], key)
        if not ok or session.backend is None:
            log.info("cancel request ignored", extra={"client": peer, "reason": "unknown key" if not ok else "idle"})
            return
        backend = session.backend
        log.info("forwarding cancel request", extra={"session": session.session_id, "backend_pid": backend.pid})
        task = asyncio.get_running_loop().create_task(
            send_cancel(self.cfg.backend.host, self.cfg.backend.port, backend.pid, backend.secret))
        task.add_done_callback(_log_cancel_failure)

    def _forward_cancel(self, owner: int, pid: int, key: bytes) -> None:
        """Hand a cancel key to the worker that owns it (it checks the key): one datagram,
        the process id then the key."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
                out.setblocking(False)
                out.sendto(struct.pack("!i", pid) + key, cancel_socket_name(self.group, owner))
            log.debug("cancel request passed to its worker", extra={"owner": owner})
        except OSError as exc:
            log.warning("cannot pass a cancel request to its worker", extra={"owner": owner, "reason": str(exc)})

    def _cancel_inbox_readable(self) -> None:
        while True:
            try:
                data = self._cancel_inbox.recv(4 + MAX_CANCEL_KEY + 1)
            except (BlockingIOError, InterruptedError):
                return
            if 4 + MIN_CANCEL_KEY <= len(data) <= 4 + MAX_CANCEL_KEY:
                (pid,) = struct.unpack_from("!i", data)
                if cancel_owner(pid, self.cfg.control.peer_id) == (self.cfg.control.peer_id, self.worker_index):
                    # (never bounce a key onwards)
                    self.cancel(pid, data[4:], "another worker")

    def reload(self, new: Config) -> list[str]:
        """Apply a new configuration to new sessions; running sessions keep what they have.

        Returns the restart-only options that differ (then nothing is applied); raises
        ConfigError if a new audit file cannot be opened (nothing applied either)."""
        blocked = restart_only_changes(self.cfg, new)
        if blocked:
            return blocked
        audit_problem = self.audit.check_reconfigure(new.audit)
        if audit_problem:
            from pgproxy.config import ConfigError
            raise ConfigError([audit_problem])
        if new.audit != self.cfg.audit:
            self.audit.reconfigure(new.audit)  # a new file: audit_file_changed in both
        self._set_authenticators(new, self.cfg)
        _warn_if_unguarded(new)
        self._policies = {}
        if (new.backend != self.cfg.backend or new.backend_password != self.cfg.backend_password
                or new.role_passwords != self.cfg.role_passwords or new.identity_key != self.cfg.identity_key):
            # (a new signing key: idle connections still carry signatures made with the old one)
            for pool in self._pools.values():
                pool.retire()  # idle connections close now, busy ones when returned
            self._pools = {}
        self.cfg = new
        return []

    # --- introspection and operator actions --------------------------------------------

    async def gather(self, request: dict) -> list[dict | None]:
        """Every worker's answer to a control request (None for a worker that did not answer)."""
        if not self.multi_worker:
            return [await self.control(request)]

        async def one(index: int) -> dict | None:
            if index == self.worker_index:
                return await self.control(request)
            try:
                return await control.ask(control.control_socket_name(self.group, index), request)
            except (OSError, ValueError, asyncio.TimeoutError) as exc:
                log.warning("a worker did not answer", extra={"worker": index, "op": request.get("op"),
                                                               "reason": repr(exc)})
                return None

        return list(await asyncio.gather(*(one(i) for i in range(self.cfg.server.workers))))

    async def control(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "stats":
            return self._metrics_snapshot()
        if op == "ready":
            return {"problems": await self._readiness_problems()}
        if op == "sessions":
            user = request.get("user") or None
            return {"sessions": [self._describe(s) for s in self._sessions if user is None or s.user == user]}
        if op == "pools":
            return {"pools": [{"worker": self.worker_index, **p.statistics()} for p in self._pools.values()]}
        if op == "terminate":
            return {"ended": self.terminate(str(request["user"]), float(request.get("block_s", 0)),
                                            request.get("block"), bool(request.get("pending")))}
        if op in ControlPlane.OPS:  # revoke, unrevoke
            return await self.control_plane.control(request)
        if op == "grants_sync":
            return self.grants.sync(request.get("records") or [])
        if op == "unblock":
            lifted = self.control_plane.revocations.lift("block", str(request["user"]))
            return {"ended": 0, "unblocked": bool(lifted)}
        return {"error": f"unknown op {op!r}"}

    def terminate(self, user: str, block_s: float = 0.0, block: dict | None = None, pending: bool = False) -> int:
        """End every session of ``user`` now (57P01); refuse their logins for ``block_s``
        (``block``: that block as the admin API made it, the same on every worker)."""
        if block is not None or block_s > 0:
            self.control_plane.block_here(user, block_s, block, pending)
        victims = [s for s in self._sessions if s.user == user]
        for session in victims:
            session.end(terminated_by_operator())
        self.metrics.count("pgproxy_admin_terminations", n=len(victims))
        return len(victims)

    def _describe(self, session: ClientSession) -> dict:
        return {"worker": self.worker_index, "session": session.session_id, "user": session.user,
                "role": session.role, "client": session.peer, "database": session.database,
                "application": session.application_name, "auth_method": getattr(session.identity, "auth_method", ""),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session.connected_at)),
                "state": session.activity, "backend_pid": session.backend.pid if session.backend else None,
                "pool_mode": "transaction" if session.relay else "session",
                # when the credential ends the session (a token's exp + leeway); None: it does not expire
                "credential_ends": _iso(session.credential_ends_at),
                **self.grants.describe(session),  # grant, grant_ends: a session under a granted role
                "pinned": session.relay.pinned if session.relay else ""}

    def _metrics_snapshot(self) -> dict:
        clients: dict[str, int] = {}
        for session in self._sessions:
            clients[session.activity] = clients.get(session.activity, 0) + 1
        gauges = [["pgproxy_client_connections", [state], n] for state, n in clients.items()]
        gauges.append(["pgproxy_audit_queue_depth", [], self.audit.depth])
        gauges += _credential_ends(self._sessions, time.time())
        gauges += self.grants.gauges(time.time())
        gauges += self.control_plane.gauges()
        counters = [["pgproxy_audit_records", [], self.audit.records_written],
                    ["pgproxy_audit_write_errors", [], self.audit.write_errors]]
        histograms = []
        for pool in self._pools.values():
            stats, db = pool.statistics(), [pool.database]
            gauges += [["pgproxy_backend_connections", [*db, "idle"], stats["idle"]],
                       ["pgproxy_backend_connections", [*db, "in_use"], stats["size"] - stats["idle"]],
                       ["pgproxy_pool_waiting_clients", db, stats["waiting"]]]
            counters += [["pgproxy_backend_connects", db, stats["connections_opened"]],
                         ["pgproxy_pool_acquire_timeouts", db, stats["acquire_timeouts"]]]
            histograms.append(["pgproxy_pool_wait_seconds", db, *pool.wait_histogram.snapshot()])
        if self.jwt is not None:
            counters += [["pgproxy_jwks_refreshes", ["ok"], self.jwt.keys.refreshes],
                         ["pgproxy_jwks_refreshes", ["error"], self.jwt.keys.refresh_failures]]
        snapshot = self.metrics.snapshot(gauges, histograms)
        snapshot["counters"] += counters
        return snapshot

    async def _readiness_problems(self) -> list[str]:
        problems = []
        jwt_cfg = self.cfg.auth.jwt
        needs_keys = jwt_cfg is not None and not set(jwt_cfg.algorithms) <= HMAC_ALGORITHMS
        if needs_keys and not await self.jwt.keys.ensure_loaded():
            problems.append("the IdP's signing keys are not loaded")
        if time.monotonic() - self._backend_ok_at > READY_CACHE_S:
            # As backend.user in both login modes: with per_role it is a role granted nothing
            # that proves PostgreSQL answers and lets us log in (the mapped roles may be templates).
            cfg = self.cfg.backend
            database = cfg.databases[0] if cfg.databases else "postgres"
            try:
                conn = await open_connection(cfg.host, cfg.port, database, cfg.user, self.cfg.backend_password,
                                             cfg.connect_timeout_s, self.cfg.backend_tls, cfg.channel_binding)
                conn.close("readiness check done")
                self._backend_ok_at = time.monotonic()
            except PgProxyError as exc:
                log.warning("readiness: cannot log in to PostgreSQL", extra={"role": cfg.user,
                                                                             "reason": exc.log_detail})
                problems.append("cannot log in to PostgreSQL")
        problems += self.control_plane.readiness_problems()
        return problems

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.control_plane.start()  # known revocations hold before the first login
        for entry in self.cfg.server.listen:
            host, port = parse_listen(entry)
            # SO_REUSEADDR: a restart need not wait for the last run's TIME_WAIT connections.
            # SO_REUSEPORT (several workers) would let anyone bind beside us: check_startup
            # made sure nobody listens here before the first worker started.
            try:
                listener = await loop.create_server(lambda: ClientSession(self), host, port, reuse_address=True,
                                                    reuse_port=self.multi_worker or None, backlog=1024)
            except OSError as exc:  # check_startup said it was free: someone was quicker
                raise StartupError(bind_failure("server.listen", entry, exc)) from None
            self._listeners.append(listener)
            for sock in listener.sockets:
                self.addresses.append(sock.getsockname()[:2])
        if self.cfg.server.unix_socket_dir:
            sock = inherited_unix_socket or bind_unix_socket(self.cfg)
            self._owns_unix_socket = inherited_unix_socket is None
            self._listeners.append(await loop.create_unix_server(lambda: ClientSession(self), sock=sock))
        if self.multi_worker:
            self._services.append(await control.serve(control.control_socket_name(self.group, self.worker_index),
                                                      self.control))
        if self.cfg.http.listen:
            from pgproxy import http_api
            self._services.append(await http_api.start(self))
        peer_port = await self.peering.serve()  # control.peer_listen: cancels forwarded by other instances
        if peer_port is not None:
            self._services.append(peer_port)
        if self.jwt is not None:  # warm the key cache so the first login and /readyz need not wait
            loop.create_task(self.jwt.keys.ensure_loaded())
        if self.multi_worker:
            inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            inbox.bind(cancel_socket_name(self.group, self.worker_index))
            inbox.setblocking(False)
            self._cancel_inbox = inbox
            loop.add_reader(inbox.fileno(), self._cancel_inbox_readable)
        self._janitor = loop.create_task(self._janitor_loop())
        log.info("listening", extra={"addresses": ",".join(f"{h}:{p}" for h, p in self.addresses)})

    async def _janitor_loop(self) -> None:
        watchdog = self.group == 0 and bool(os.environ.get("WATCHDOG_USEC"))  # workers: the supervisor pings
        while True:
            await asyncio.sleep(JANITOR_INTERVAL_S)
            if watchdog:
                sd_notify("WATCHDOG=1")
            for pool in list(self._pools.values()):
                try:
                    pool.janitor_tick()
                except Exception:
                    log.exception("janitor failed on a pool", extra={"database": pool.database})
            try:
                self.revalidator.tick(time.monotonic())
            except Exception:
                log.exception("janitor failed on credential expiry")
            try:
                self.grants.tick(time.time())  # sessions under a grant that ended end now
            except Exception:
                log.exception("janitor failed on grants")
            try:
                self.control_plane.janitor_tick()  # expired revocations and blocks
            except Exception:
                log.exception("janitor failed on revocations")
            idle_in_transaction_s = self.cfg.backend.idle_in_transaction_timeout_s
            if idle_in_transaction_s:
                now = time.monotonic()
                for session in list(self._sessions):
                    session.janitor_tick(now, idle_in_transaction_s)

    async def shutdown(self) -> None:
        log.info("shutting down", extra={"sessions": len(self._sessions)})
        for listener in self._listeners + self._services:
            listener.close()
        if self._owns_unix_socket:
            with contextlib.suppress(OSError):
                os.unlink(unix_socket_path(self.cfg))
        for session in list(self._sessions):
            if not session.logged_in:  # nothing to finish: no statement can be running
                session.end(shutting_down())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.server.shutdown_timeout_s
        while self._sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self._sessions):
            session.end(shutting_down())
        await asyncio.sleep(0)  # let connection_lost run for what we just closed
        if self._janitor:
            self._janitor.cancel()
        self.revalidator.stop()
        await self.grants.close()
        await self.control_plane.stop()
        if self._cancel_inbox is not None:
            loop.remove_reader(self._cancel_inbox.fileno())
            self._cancel_inbox.close()
        for pool in self._pools.values():
            await pool.close()
        if self.ldap is not None:
            self.ldap.close()
        self.audit.close()
        log.info("stopped")


def _iso(t: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t != float("inf") else None


CREDENTIAL_HORIZONS = ((300, "5m"), (3600, "1h"), (86_400, "24h"))


def _credential_ends(sessions, now: float) -> list:
    """Logged-in sessions by when their credential ends them: within 5m, 1h, 24h, later, or never."""
    counts = dict.fromkeys([label for _, label in CREDENTIAL_HORIZONS] + ["later", "never"], 0)
    for session in sessions:
        if session.logged_in:
            left = session.credential_ends_at - now
            label = "never" if left == float("inf") else next(
                (name for horizon, name in CREDENTIAL_HORIZONS if left <= horizon), "later")
            counts[label] += 1
    return [["pgproxy_sessions_by_credential_end", [label], n] for label, n in counts.items()]


def _warn_if_unguarded(cfg: Config) -> None:
    if cfg.guard.unsafe_disable:
        log.error("UNSAFE: the statement guard is off (guard.unsafe_disable = true): clients can SET ROLE to "
                  "any role the pool role was granted and rewrite their identity settings")


def _log_cancel_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("cancel request could not be forwarded", extra={"reason": str(task.exception())})

