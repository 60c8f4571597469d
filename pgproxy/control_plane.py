"""Shared control state: revocations and blocks for one instance or many, through PostgreSQL.

Theory of operation
-------------------
Every worker keeps the active revocations and blocks (``revocations.RevocationSet``) in
memory; logins are checked against it (``login_refusal``, called where blocks always were:
``ProxyServer.authenticate``), and whenever it gains an entry every session it now matches
is ended (57P01). Where the entries come from:

* Without a control database (``control.database`` empty): the admin API of this
  instance, fanned out to every worker over the workers' control channel (control.py),
  and the state file (``control.state_file``) so they hold across a restart.
* With one: the schema ``pgproxy_control`` (``pgproxy control init``). **Each worker holds
  one connection of its own** to it, separate from the pools, and LISTENs on the channel
  ``pgproxy_control``. A trigger NOTIFYs in the same transaction as every write to the
  tables, so a change made anywhere — any instance's admin API, or an operator's own
  INSERT — reaches every worker of every instance as soon as it commits; the worker then
  re-reads the table. It also re-reads at every (re)connect and every
  ``control.sync_interval_s``, so a lost notification delays a change at most that long.
  ``terminate`` (an action, not state) is a NOTIFY of its own that each worker acts on.

Why one connection per worker rather than one per instance fanned out by worker 0: no
election and no second hop; a worker that dies or is restarted takes nobody else's view
with it and rebuilds its own in one query; every worker learns of a change in one
network round trip. The price is ``instances × workers`` idle connections on the control
database (size its ``max_connections`` for it); with the default 10 s sync each costs
one small query per interval. Worker 0 of each instance additionally writes the
instance's heartbeat (``instances`` table: name, host, pid, cancel peer address,
started, last seen), keeps the state file current, and audits expiries.

When the control database is unreachable, nothing known is forgotten: revocations and
blocks already known keep holding (memory, and the state file across a restart). For up
to ``control.max_staleness_s`` after the last successful read, logins are decided on
what is known; after that ``control.on_unavailable`` decides: ``refuse`` (default: fail
closed — an instance cut off from the control database cannot tell whether someone was
revoked elsewhere meanwhile) or ``allow`` (logins go on, checked against what is known).
A revocation made through this instance meanwhile takes effect here at once, is kept as
*pending*, and is written to the control database when it answers again (idempotent by
its id). Lifting one (unrevoke, unblock) needs the control database: it would otherwise
come back at the next read. On reconnect everything is read again.

The connection: ``open_connection`` (backend/connection.py) logs in (TLS, SCRAM); its
transport is then handed to ``ControlLink``, a small protocol of our own that runs
parameterised queries one at a time and receives NotificationResponse ('A') whenever it
comes. pgproxy itself needs no driver for this. The admin API and CLI on top of it are in
control_admin.py; cancel forwarding between instances in peering.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque

from pgproxy.config import check_postgres_login, parse_listen
from pgproxy.errors import PgProxyError, auth_unavailable
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader
from pgproxy.revocations import (KINDS, MAX_REVOCATIONS, Revocation, RevocationSet, load_state, new_revocation,
                                 revoked_login, revoked_session, save_state)

log = logging.getLogger("pgproxy.control_plane")

SCHEMA = "pgproxy_control"
CHANNEL = "pgproxy_control"
LINK_MAX_MESSAGE = 8 * 1024 * 1024  # a full read of revocations is one message per row
MAX_NOTIFICATIONS = 10_000          # queued and not yet handled; past it, one full re-read instead
RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
HEARTBEAT_LIVE_FACTOR = 3           # an instance is live while seen within 3 sync intervals
OPS = ("revoke", "unrevoke")

SCHEMA_SQL = f"""\
-- pgproxy control schema (pgproxy control init). Idempotent: safe to run again.
CREATE SCHEMA IF NOT EXISTS {SCHEMA};

-- Revocations and blocks: logins matching an active row are refused (28000) and sessions
-- matching it are ended (57P01). kind: block (a user name, from terminate --block),
-- person (the identity's user name), subject (the IdP's sub or a DN), jti (a token id).
-- Rows stay as history: lifted ones have lifted_at, expired ones expires_at in the past.
CREATE TABLE IF NOT EXISTS {SCHEMA}.revocations (
    id          text        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('block', 'person', 'subject', 'jti')),
    value       text        NOT NULL CHECK (length(value) BETWEEN 1 AND 512),
    reason      text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    origin      text        NOT NULL DEFAULT '',  -- the instance (or person) that made it
    created_by  text        NOT NULL DEFAULT '',  -- the admin client's address
    lifted_at   timestamptz,
    lifted_by   text
);
CREATE INDEX IF NOT EXISTS revocations_active ON {SCHEMA}.revocations (expires_at) WHERE lifted_at IS NULL;

-- Time-boxed grants of a role to one person (issue 17); read by the grants feature.
CREATE TABLE IF NOT EXISTS {SCHEMA}.grants (
    id          text        PRIMARY KEY,
    person      text        NOT NULL,
    role        text        NOT NULL,
    reason      text        NOT NULL DEFAULT '',
    requester   text        NOT NULL DEFAULT '',
    approver    text        NOT NULL DEFAULT '',
    starts_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    ended_by    text,
    record      jsonb       NOT NULL DEFAULT '{{}}'
);

-- One row per running instance, written by its worker 0 every sync interval.
CREATE TABLE IF NOT EXISTS {SCHEMA}.instances (
    instance      text        PRIMARY KEY,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    peer_id       integer,
    peer_address  text        NOT NULL DEFAULT '',  -- where peers forward cancel requests
    started_at    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL
);

-- Every write to revocations or grants is announced in its own transaction, so a change
-- made with plain SQL reaches the instances as one made through the admin API does.
CREATE OR REPLACE FUNCTION {SCHEMA}.notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object('op', 'sync', 'table', TG_TABLE_NAME)::text);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER notify_change AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {SCHEMA}.revocations
    FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_change();
CREATE OR REPLACE TRIGGER notify_change AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {SCHEMA}.grants
    FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_change();
"""

_SELECT_ACTIVE = (f"SELECT id, kind, value, reason, extract(epoch FROM created_at)::float8, "
                  f"extract(epoch FROM expires_at)::float8, origin, created_by FROM {SCHEMA}.revocations "
                  f"WHERE lifted_at IS NULL AND expires_at > now() ORDER BY created_at LIMIT {MAX_REVOCATIONS + 1}")
_INSERT = (f"INSERT INTO {SCHEMA}.revocations (id, kind, value, reason, created_at, expires_at, origin, created_by) "
           f"VALUES ($1, $2, $3, $4, to_timestamp($5::float8), to_timestamp($6::float8), $7, $8) "
           f"ON CONFLICT (id) DO NOTHING")
_LIFT = (f"UPDATE {SCHEMA}.revocations SET lifted_at = now(), lifted_by = $4 WHERE lifted_at IS NULL "
         f"AND expires_at > now() AND (id = $1 OR (kind = $2 AND value = $3)) RETURNING id")
_HEARTBEAT = (f"INSERT INTO {SCHEMA}.instances (instance, host, pid, peer_id, peer_address, started_at, last_seen) "
              f"VALUES ($1, $2, $3::int, NULLIF($4, '0')::int, $5, to_timestamp($6::float8), now()) "
              f"ON CONFLICT (instance) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, "
              f"peer_id = EXCLUDED.peer_id, peer_address = EXCLUDED.peer_address, "
              f"started_at = EXCLUDED.started_at, last_seen = now()")
_PEERS = (f"SELECT peer_id, peer_address, instance FROM {SCHEMA}.instances WHERE peer_id IS NOT NULL "
          f"AND peer_address <> '' AND last_seen > now() - make_interval(secs => $1::float8) ORDER BY last_seen")
_GONE = f"DELETE FROM {SCHEMA}.instances WHERE instance = $1 AND pid = $2::int"


class ControlUnavailable(Exception):
    """The control database cannot be reached (or answered with an error)."""


def instance_name(cfg) -> str:
    """control.instance, or <host name>:<port of the first listen address>."""
    if cfg.control.instance:
        return cfg.control.instance
    port = parse_listen(cfg.server.listen[0])[1] if cfg.server.listen else 5432
    return f"{socket.gethostname()}:{port}"


def state_path(cfg) -> str:
    """control.state_file, or one beside the audit file named after the listen port (two
    instances on one host must not share it)."""
    if cfg.control.state_file:
        return cfg.control.state_file
    port = parse_listen(cfg.server.listen[0])[1] if cfg.server.listen else 5432
    return os.path.join(os.path.dirname(os.path.abspath(cfg.audit.file)), f"pgproxy-control-state-{port}.json")


# --- the connection ---------------------------------------------------------------------

class ControlLink(asyncio.Protocol):
    """The protocol on a logged-in control connection: one query at a time (extended
    protocol, text parameters and results), NotificationResponse whenever it arrives."""

    def __init__(self, on_notification, on_lost) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = MessageReader(LINK_MAX_MESSAGE)
        self._replies: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future | None = None
        self._lock = asyncio.Lock()
        self._on_notification = on_notification
        self._on_lost = on_lost
        self.lost = False

    def data_received(self, data: bytes) -> None:
        try:
            found = self._reader.feed(data)
        except PgProxyError as exc:
            log.warning("unreadable data from the control database", extra={"reason": exc.log_detail})
            self.close()
            return
        for kind, raw in found:
            if kind == 0x41:  # 'A' NotificationResponse: pid, channel, payload
                channel, _, rest = raw[9:].partition(b"\0")
                self._on_notification(channel.decode("utf-8", "replace"),
                                      rest.rstrip(b"\0").decode("utf-8", "replace"))
            elif kind not in (0x4E, 0x53):  # NoticeResponse, ParameterStatus: nothing to do
                self._replies.append((kind, raw))
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        self._on_lost()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(msg.TERMINATE)
            self.transport.close()
        self.lost = True
        self._wake()

    async def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows as tuples of text (None for NULL). ControlUnavailable on any error."""
        async with self._lock:
            if self.lost:
                raise ControlUnavailable("connection lost")
            self.transport.write(msg.parse_message("", sql) + msg.bind_message("", "", [str(p).encode()
                                                                                       for p in params])
                                 + msg.execute_message() + msg.SYNC)
            rows, error = [], None
            while True:
                while not self._replies:
                    if self.lost:
                        raise ControlUnavailable("connection lost during a query")
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
                    self._waiter = None
                kind, raw = self._replies.popleft()
                if kind == 0x44:  # 'D'
                    rows.append(tuple(msg.parse_data_row(raw[5:])))
                elif kind == 0x45:  # 'E'
                    error = error or msg.parse_error_fields(raw[5:])
                elif kind == 0x5A:  # 'Z'
                    break
            if error:
                raise ControlUnavailable(f"{error.get('C')} {error.get('M')}")
            return rows


async def connect(cfg, password: str | None, tls, on_notification, on_lost) -> ControlLink:
    """Log in with pgproxy's own backend login code, then take the transport over."""
    from pgproxy.backend.connection import open_connection
    control = cfg.control
    conn = await open_connection(control.host or cfg.backend.host, control.port or cfg.backend.port,
                                 control.database, control.user, password, control.connect_timeout_s, tls)
    link = ControlLink(on_notification, on_lost)
    link.transport = conn.transport
    conn.transport.set_protocol(link)
    return link


def control_tls(cfg):
    control = cfg.control
    if control.sslmode == "disable":
        return None
    from pgproxy.tls import postgres_context
    problems: list[str] = []
    ctx = postgres_context(control.sslmode, control.sslrootcert, "control", problems)
    if problems:
        from pgproxy.config import ConfigError
        raise ConfigError(problems)
    return ctx


# --- one worker's part ------------------------------------------------------------------

class ControlPlane:
    OPS = OPS  # the workers' control ops handled here (ProxyServer.control)

    def __init__(self, server) -> None:
        self.server = server
        self.configured = bool(server.cfg.control.database)
        self.instance = instance_name(server.cfg)
        self.state_file = state_path(server.cfg)
        self.revocations = RevocationSet()
        self.synced_at: float | None = None  # wall clock of the last successful read
        self.connected = False
        self.listeners: dict[str, list] = {}  # table -> callbacks(table) on its change notifications
        self._link: ControlLink | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._notes: asyncio.Queue | None = None
        self._first_sync: asyncio.Event | None = None
        self._peers: dict[int, str] = {}
        self._clashes: set[tuple] = set()  # (peer_id, name, name) already logged
        self._started_at = time.time()
        self._saved_at = 0.0
        self._tls = control_tls(server.cfg) if self.configured else None
        self.syncs = self.sync_failures = 0

    @property
    def cfg(self):
        """[control] as now configured (SIGHUP may change on_unavailable and max_staleness_s)."""
        return self.server.cfg.control

    @property
    def primary(self) -> bool:
        """Worker 0 writes the heartbeat and the state file and audits expiries."""
        return self.server.worker_index == 0

    # --- lifecycle ---

    async def start(self) -> None:
        try:
            self.revocations, self.synced_at = load_state(self.state_file)
            if len(self.revocations):
                log.info("revocations loaded from the state file", extra={"file": self.state_file,
                                                                          "active": len(self.revocations)})
        except (OSError, ValueError) as exc:
            # Fail closed: a state file we cannot read may hold revocations.
            from pgproxy.supervisor import StartupError
            raise StartupError(f"cannot read control.state_file {self.state_file}: {exc}; fix or remove it") \
                from None
        if not self.configured:
            return
        self._first_sync = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())
        with contextlib.suppress(asyncio.TimeoutError):  # then: what the file knows, and on_unavailable
            await asyncio.wait_for(self._first_sync.wait(), self.cfg.connect_timeout_s + 1)

    async def stop(self) -> None:
        self._stopping = True  # no heartbeat may follow the delete below and bring the row back
        link = self._link
        if link is not None and not link.lost and self.primary:  # peers stop forwarding to us
            with contextlib.suppress(ControlUnavailable, asyncio.TimeoutError):
                await asyncio.wait_for(link.query(_GONE, (self.instance, os.getpid())), 1.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._link is not None:
            self._link.close()

    async def _run(self) -> None:
        attempt = 0
        while True:
            # A queue per connection: a closed link's last callbacks cannot reach its successor.
            notes = self._notes = asyncio.Queue()
            try:
                self._link = await connect(self.server.cfg, self.server.cfg.control_password, self._tls,
                                           lambda channel, payload: self._notified(notes, channel, payload),
                                           lambda: notes.put_nowait(None))
                await self._query(f"LISTEN {CHANNEL}")
                await self._sync()
                if not self.connected:
                    log.info("control database connected", extra={"database": self.cfg.database})
                self.connected, attempt = True, 0
                await self._listen()
            except asyncio.CancelledError:
                raise
            except (PgProxyError, ControlUnavailable, OSError, asyncio.TimeoutError) as exc:
                self.sync_failures += 1
                reason = exc.log_detail if isinstance(exc, PgProxyError) else str(exc) or type(exc).__name__
                log.warning("control database unreachable", extra={"reason": reason, "known": len(self.revocations),
                                                                    "last_sync_s_ago": self._age()})
            except Exception:
                log.exception("control plane failed; reconnecting")
            finally:
                self.connected = False
                if self._link is not None:
                    self._link.close()
                    self._link = None
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
            attempt += 1

    async def _listen(self) -> None:
        """Until the link is lost: notifications as they come, a full read every sync interval."""
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + self.cfg.sync_interval_s
        while True:
            try:
                note = await asyncio.wait_for(self._notes.get(), max(0.0, next_sync - loop.time()))
            except asyncio.TimeoutError:
                await self._sync()
                next_sync = loop.time() + self.cfg.sync_interval_s
                continue
            notes = [note]
            while not self._notes.empty():
                notes.append(self._notes.get_nowait())
            if any(n is None for n in notes):
                raise ControlUnavailable("connection lost")
            tables = set()
            for payload in notes:
                tables |= self._handle(payload)
            if "revocations" in tables:
                await self._sync()
                next_sync = loop.time() + self.cfg.sync_interval_s
            for table in tables - {"revocations"}:
                for callback in self.listeners.get(table, ()):
                    try:
                        callback(table)
                    except Exception:  # another feature's bug must not cost us the connection
                        log.exception("control notification handler failed", extra={"table": table})

    def _handle(self, payload: str) -> set[str]:
        """One notification; returns the tables it says changed."""
        try:
            note = json.loads(payload)
        except ValueError:
            note = None
        if not isinstance(note, dict):
            return {"revocations"}  # not ours, or cut short: read everything
        if note.get("op") == "terminate" and isinstance(note.get("user"), str):
            if note.get("origin") != self.instance:  # our own workers were asked directly
                ended = self.server.terminate(note["user"])
                if ended:
                    log.warning("sessions terminated at another instance's request",
                                extra={"target_user": note["user"], "origin": note.get("origin"), "ended": ended})
            return set()
        if note.get("op") == "sync" and isinstance(note.get("table"), str):
            return {note["table"]}
        return {"revocations"}

    @staticmethod
    def _notified(notes: asyncio.Queue, channel: str, payload: str) -> None:
        if channel == CHANNEL:
            # Past the bound one unparseable note stands for the rest: a full re-read.
            if notes.qsize() < MAX_NOTIFICATIONS:
                notes.put_nowait(payload)
            elif notes.qsize() == MAX_NOTIFICATIONS:
                notes.put_nowait("")

    async def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        link = self._link
        if link is None or link.lost:
            raise ControlUnavailable("not connected")
        try:
            return await asyncio.wait_for(link.query(sql, params), self.cfg.connect_timeout_s)
        except asyncio.TimeoutError:
            link.close()  # the conversation is out of step: start again
            raise ControlUnavailable("query timed out") from None

    async def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """For other features (grants): one parameterised query on this worker's control
        connection. ControlUnavailable if it is down."""
        return await self._query(sql, params)

    def _peer_addresses(self, rows: list[tuple]) -> dict[int, str]:
        """peer_id -> address from live heartbeats (oldest first, so the newest wins). Two
        live instances with one peer_id would misroute each other's cancel requests: say so,
        once per pair of names."""
        peers, names = {}, {}
        for peer_id, address, name in rows:
            peer_id = int(peer_id)
            if names.get(peer_id, name) != name and (peer_id, names[peer_id], name) not in self._clashes:
                self._clashes.add((peer_id, names[peer_id], name))
                log.error("two live instances claim one control.peer_id; cancel requests may go astray",
                          extra={"peer_id": peer_id, "instances": f"{names[peer_id]},{name}"})
            peers[peer_id], names[peer_id] = address, name
        return peers

    async def _sync(self) -> None:
        """Write what is pending, read everything, heartbeat: the full re-read."""
        for rev_id in list(self.revocations.pending):
            rev = self.revocations.get(rev_id)
            if rev is not None:
                await self._query(_INSERT, _insert_params(rev))
            self.revocations.pending.discard(rev_id)  # there now (or lifted there already)
        rows = await self._query(_SELECT_ACTIVE)
        known = []
        for row in rows:
            try:
                known.append(Revocation.from_json(dict(zip(
                    ("id", "kind", "value", "reason", "created_at", "expires_at", "origin", "by"), row))))
            except ValueError as exc:
                log.error("control database row ignored", extra={"id": row[0], "reason": str(exc)})
        if self.primary and not self._stopping:
            advertised = self.advertised()
            await self._query(_HEARTBEAT, (self.instance, socket.gethostname(), os.getpid(),
                                           self.server.cfg.control.peer_id, advertised, self._started_at))
        peers = await self._query(_PEERS, (self.cfg.sync_interval_s * HEARTBEAT_LIVE_FACTOR,))
        self._peers = self._peer_addresses(peers)
        had_pending = bool(self.revocations.pending)
        added, removed = self.revocations.replace(known)
        self.synced_at = time.time()
        self.syncs += 1
        if self._first_sync is not None:
            self._first_sync.set()
        if added:
            self.enforce()
        for rev in removed:
            log.info("revocation lifted", extra={"revocation": rev.id, "kind": rev.kind, "target": rev.value})
        if self.primary and (added or removed or had_pending or self.synced_at - self._saved_at
                             > self.cfg.max_staleness_s / 2):
            self.save()

    def advertised(self) -> str:
        from pgproxy.peering import advertised_address
        return advertised_address(self.server.cfg)

    def peer_address(self, peer_id: int) -> str | None:
        return self._peers.get(peer_id)

    def _age(self) -> float | None:
        return None if self.synced_at is None else round(time.time() - self.synced_at, 1)

    @property
    def stale(self) -> bool:
        """With a control database: the last read is older than max_staleness_s."""
        return self.configured and (self.synced_at is None or
                                    time.time() - self.synced_at > self.cfg.max_staleness_s)

    def save(self) -> None:
        try:
            save_state(self.state_file, self.revocations, self.synced_at, self.instance)
            self._saved_at = time.time()
        except OSError as exc:
            log.error("cannot write control.state_file", extra={"file": self.state_file, "reason": str(exc)})

    # --- what logins and sessions ask ---

    def login_refusal(self, user: str, identity) -> PgProxyError | None:
        rev = self.revocations.match_identity(identity, user)
        if rev is not None:
            return revoked_login(user, rev)
        if self.stale and self.cfg.on_unavailable == "refuse":
            age = self._age()
            return auth_unavailable(f"the control database has not answered for "
                                    f"{'ever' if age is None else f'{age} s'} (control.max_staleness_s = "
                                    f"{self.cfg.max_staleness_s}, on_unavailable = refuse)")
        return None

    def gauges(self) -> list:
        """Worker 0 only: every worker holds the same entries, and gauges are summed."""
        if not self.primary:
            return []
        counts = dict.fromkeys(KINDS, 0)
        for rev in self.revocations.active():
            counts[rev.kind] += 1
        return [["pgproxy_revocations_active", [kind], n] for kind, n in counts.items()]

    def readiness_problems(self) -> list[str]:
        """For /readyz: an instance that refuses every login should get no new ones."""
        if self.stale and self.cfg.on_unavailable == "refuse":
            return ["the control database is unreachable (control.on_unavailable = refuse: logins are refused)"]
        return []

    def blocked(self, user: str) -> bool:
        return self.revocations.match(user) is not None

    def enforce(self) -> int:
        """End every session an active entry matches; how many."""
        ended = 0
        for session in list(self.server.sessions()):
            if session.identity is None:
                continue  # not authenticated yet: login_refusal sees it
            rev = self.revocations.match_identity(session.identity, session.user)
            if rev is not None:
                session.end(revoked_session(rev))
                ended += 1
        if ended:
            self.server.metrics.count("pgproxy_admin_terminations", n=ended)
        return ended

    def janitor_tick(self) -> None:
        for rev in self.revocations.prune():
            if self.primary:
                fields = {"revocation": rev.id, "kind": rev.kind, "target": rev.value, "instance": self.instance}
                self.server.audit.event("revoke_expired" if rev.kind != "block" else "block_expired", **fields)
                log.info("revocation expired", extra=fields)

    # --- the workers' control ops (ProxyServer.control) ---

    async def control(self, request: dict) -> dict:
        op = request.get("op")
        if op == "revoke":
            rev = Revocation.from_json(request["revocation"])
            try:
                self.revocations.add(rev, pending=bool(request.get("pending")))
            except ValueError as exc:
                return {"ended": 0, "error": str(exc)}
            return {"ended": self.enforce()}
        if op == "unrevoke":
            lifted = [r.id for r in self._lift(request)]
            return {"ended": 0, "lifted": lifted}
        return {"error": f"unknown op {op!r}"}

    def block_here(self, user: str, block_s: float, block: dict | None, pending: bool) -> None:
        """terminate --block on this worker: the block the admin API made (one id on every
        worker), or a new one (a caller that gave only block_s)."""
        try:
            rev = Revocation.from_json(block) if block else new_revocation(
                "block", user, block_s, "terminate --block", origin=self.instance)
            self.revocations.add(rev, pending=pending)
        except ValueError as exc:
            log.error("block not applied", extra={"target_user": user, "reason": str(exc)})

    def _lift(self, request: dict) -> list[Revocation]:
        if request.get("id"):
            rev = self.revocations.remove(str(request["id"]))
            return [rev] if rev else []
        return self.revocations.lift(str(request.get("kind")), str(request.get("value")))

    # --- writes to the control database (the worker that took the admin request) ---

    async def publish(self, rev: Revocation) -> bool:
        """Write a new entry; False if the control database is unreachable (it stays pending)."""
        if not self.configured:
            return False
        try:
            await self._query(_INSERT, _insert_params(rev))
            return True
        except ControlUnavailable as exc:
            log.warning("revocation kept pending: the control database is unreachable",
                        extra={"revocation": rev.id, "reason": str(exc)})
            return False

    async def lift_shared(self, kind: str, value: str, rev_id: str, by: str) -> list[str]:
        """Lift in the control database (ControlUnavailable if it cannot be reached)."""
        rows = await self._query(_LIFT, (rev_id, kind, value, by))
        return [r[0] for r in rows]

    async def broadcast_terminate(self, user: str) -> bool:
        if not self.configured:
            return False
        payload = json.dumps({"op": "terminate", "user": user, "origin": self.instance})
        try:
            await self._query("SELECT pg_notify($1, $2)", (CHANNEL, payload))
            return True
        except ControlUnavailable as exc:
            log.warning("terminate not passed to other instances: the control database is unreachable",
                        extra={"target_user": user, "reason": str(exc)})
            return False

    def status(self) -> dict:
        return {"instance": self.instance, "control_database": self.configured, "connected": self.connected,
                "last_sync_s_ago": self._age(), "stale": self.stale, "on_unavailable": self.cfg.on_unavailable,
                "pending": len(self.revocations.pending)}


def _insert_params(rev: Revocation) -> tuple:
    return (rev.id, rev.kind, rev.value, rev.reason, repr(rev.created_at), repr(rev.expires_at), rev.origin, rev.by)


# --- configuration rules ----------------------------------------------------------------

def check_rules(cfg, problems: list[str]) -> None:
    control = cfg.control
    where = "control"
    if control.database and not control.user:
        problems.append(f"{where}.user: required with control.database")
    if not control.database and (control.user or control.password_file or control.password_env):
        problems.append(f"{where}.database: set it too (user and password are for the control database)")
    check_postgres_login(where, control, problems)
    if not 0 <= control.port < 65536:
        problems.append(f"{where}.port: must be 0-65535")
    if control.connect_timeout_s <= 0:
        problems.append(f"{where}.connect_timeout_s: must be greater than zero")
    if not 0.2 <= control.sync_interval_s <= 3600:
        problems.append(f"{where}.sync_interval_s: must be between 0.2 and 3600")
    if control.max_staleness_s <= control.sync_interval_s:
        problems.append(f"{where}.max_staleness_s: must be greater than sync_interval_s")
    if control.on_unavailable not in ("refuse", "allow"):
        problems.append(f"{where}.on_unavailable: must be refuse or allow")
    if not 0 <= control.peer_id <= 127:
        problems.append(f"{where}.peer_id: must be 0-127")
    for key in ("peer_listen", "peer_advertise"):
        if getattr(control, key):
            try:
                parse_listen(getattr(control, key))
            except ValueError as exc:
                problems.append(f"{where}.{key}: {exc}")
    if (control.peer_listen or control.peers) and not control.peer_id:
        problems.append(f"{where}.peer_id: required with peer_listen or peers")
    if control.peer_id and not control.peer_secret_file:
        problems.append(f"{where}.peer_secret_file: required with peer_id (it authenticates forwarded cancels)")
    for name, address in control.peers.items():
        if not (name.isdigit() and 1 <= int(name) <= 127):
            problems.append(f"{where}.peers.{name}: the key is a peer_id, 1-127 (\"2\")")
        try:
            parse_listen(address)
        except ValueError as exc:
            problems.append(f"{where}.peers.{name}: {exc}")
    if control.instance and (len(control.instance) > 200 or not control.instance.isprintable()):
        problems.append(f"{where}.instance: at most 200 printable characters")
