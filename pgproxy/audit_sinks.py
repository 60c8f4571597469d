"""Audit sinks: the audit trail, also delivered where security teams look.

The JSON-lines file stays the record of truth (pgproxy/audit.py); each ``[[audit_sinks]]``
entry adds a copy to syslog (RFC 5424 over UDP, TCP, TLS or a local socket) or to a
PostgreSQL table shared by many pgproxy instances.

Contract with the audit writer (``AuditLog(cfg, sinks=...)``):

* ``submit(lines)`` is called from the audit writer thread once per batch, with the JSON
  lines as written to the file. It never blocks: the lines go to the sink's own bounded
  queue, and the sink's own thread delivers them.
* ``healthy`` turns False when the queue overflows (the lines that do not fit are
  dropped, for this sink only, and counted) or when delivery fails twice in a row; it
  turns True again once a delivery succeeds with the queue below half full.
  ``on_failure`` ("refuse" or "continue") tells the audit writer what to do meanwhile.
* ``close()`` delivers what is queued for at most ``timeout_s`` more, then stops.

A batch that failed is sent again whole after reconnecting (with backoff), so a receiver
may see a record twice after a connection broke. PostgreSQL confirms each COPY, so there
delivery is at least once; syslog has no acknowledgement, so what the kernel had accepted
when a TCP receiver went away, or a UDP datagram, can be lost unnoticed. Nothing here logs
a record's content: statements and parameters go to the sinks, not to the diagnostic log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import deque
from pathlib import Path

from pgproxy import audit_formats as fmt
from pgproxy.backend.connection import open_connection
from pgproxy.config import AuditSinkRule, ConfigError, check_postgres_login, parse_listen
from pgproxy.errors import PgProxyError
from pgproxy.protocol import messages as msg
from pgproxy.tls import postgres_context

log = logging.getLogger("pgproxy.audit.sinks")

BATCH = 1000              # records per delivery (one COPY, one write)
_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0)  # after the 1st, 2nd, ... failure in a row
_UDP_MAX = 65_507


class QueuedSink:
    """A bounded queue and a delivery thread; subclasses say how to encode and deliver."""

    kind = "sink"

    def __init__(self, rule: AuditSinkRule, name: str, instance: str) -> None:
        self.name = name
        self.on_failure = rule.on_failure
        self.healthy = True
        self.instance = instance
        self.format = rule.format
        self.timeout_s = rule.timeout_s
        self._limit = rule.queue_size
        self._queue: deque[str] = deque()
        self._in_flight = 0       # taken from the queue, not delivered yet
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._context = fmt.SessionContext()
        self.delivered = self.dropped = self.failures = self.truncated = self.rejected = 0
        self._failing = 0         # deliveries failed in a row
        self._thread = threading.Thread(target=self._run, name=f"audit-sink-{name}", daemon=True)

    def start(self) -> "QueuedSink":
        self._thread.start()
        return self

    # --- the audit writer's side ------------------------------------------------------

    def submit(self, lines: list[str]) -> None:
        with self._lock:
            room = self._limit - len(self._queue) - self._in_flight
            if room < len(lines):
                lost = len(lines) - max(room, 0)
                lines = lines[:max(room, 0)]
                self.dropped += lost
                if self.healthy:
                    log.error("audit sink queue is full: records dropped for this sink",
                              extra={"sink": self.name, "dropped": lost, "queue_size": self._limit})
                self.healthy = False
            self._queue.extend(lines)
        self._wake.set()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._deadline = time.monotonic() + self.timeout_s
        self._stopping.set()
        self._wake.set()
        self._thread.join(self.timeout_s + 2)
        left = len(self._queue) + self._in_flight
        if left:
            log.error("audit sink closed with records undelivered", extra={"sink": self.name, "records": left})

    def statistics(self) -> dict:
        return {"queued": len(self._queue) + self._in_flight, "delivered": self.delivered,
                "dropped": self.dropped, "failures": self.failures, "truncated": self.truncated,
                "rejected": self.rejected, "healthy": self.healthy}

    # --- the sink's thread ------------------------------------------------------------

    def _run(self) -> None:
        batch: list = []
        try:
            while True:
                if not batch:
                    batch = self._take()
                    if not batch:
                        if self._stopping.is_set():
                            return
                        self._wake.wait(1.0)
                        self._wake.clear()
                        continue
                if self._stopping.is_set() and time.monotonic() > self._deadline:
                    return
                try:
                    self._deliver(batch)
                except Exception as exc:  # the receiver failed: keep the batch, reconnect later
                    self._failed(exc)
                    continue
                with self._lock:
                    self.delivered += len(batch)
                    self._in_flight = 0
                    batch = []
                    recovered = not self.healthy and len(self._queue) < self._limit // 2
                    if recovered:
                        self.healthy = True
                if self._failing or recovered:
                    log.warning("audit sink delivers again", extra={"sink": self.name})
                self._failing = 0
        except Exception:  # a bug: say so, and fail closed where on_failure asks for it
            self.healthy = False
            log.exception("audit sink stopped", extra={"sink": self.name})
        finally:
            self._finish()

    def _take(self) -> list:
        with self._lock:
            lines = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            self._in_flight = len(lines)
        # Encoded once: a retried batch is sent as it was, and the session context sees
        # each record once.
        out = []
        for line in lines:
            record = self._record(line)
            try:
                out.append(self._encode(record, self._context.enrich(record), line))
            except Exception:  # a bug in a format must cost one record, not the sink
                self.rejected += 1
                log.exception("audit sink cannot encode a record; dropped",
                              extra={"sink": self.name, "event": record.get("event")})
        with self._lock:
            self._in_flight = len(out)
        return out

    def _record(self, line: str) -> dict:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            record = {"event": "unreadable_record", "line_length": len(line)}
        record["instance"] = self.instance
        return record

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._failing += 1
        self._disconnect()
        reason = getattr(exc, "log_detail", "") or str(exc) or type(exc).__name__
        if self._failing == 2:
            self.healthy = False
            log.error("audit sink cannot deliver", extra={"sink": self.name, "reason": reason})
        else:
            log.info("audit sink delivery failed", extra={"sink": self.name, "reason": reason,
                                                           "attempt": self._failing})
        pause = _BACKOFF_S[min(self._failing - 1, len(_BACKOFF_S) - 1)]
        if self._stopping.is_set():
            time.sleep(max(0.0, min(pause, self._deadline - time.monotonic())))
        else:
            self._stopping.wait(pause)

    # --- what a sink type provides ------------------------------------------------------

    def _encode(self, record: dict, enriched: dict, line: str):
        """What ``_deliver`` sends for one record; ``enriched`` adds what its session_start said."""
        raise NotImplementedError

    def _deliver(self, batch: list) -> None:
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Drop the connection (a failed delivery reconnects)."""

    def _finish(self) -> None:
        self._disconnect()

    def _message(self, enriched: dict, line: str) -> str:
        """The record in this sink's format: json is the audit file's line as it is."""
        if self.format == "json":
            return line
        if self.format == "ocsf":
            return json.dumps(fmt.to_ocsf(enriched), ensure_ascii=False, default=str)
        return fmt.to_cef(enriched)


# --- syslog --------------------------------------------------------------------------------

class SyslogSink(QueuedSink):
    """RFC 5424 messages over UDP, TCP or TLS (RFC 6587 / 5425 octet counting), or a local
    datagram socket. The record's key members go into the structured data as well, so a
    receiver can filter on them without parsing MSG."""

    kind = "syslog"
    SD_MEMBERS = ("instance", "event", "session", "user", "role", "outcome", "sqlstate", "client", "database")

    def __init__(self, rule: AuditSinkRule, name: str, instance: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(rule, name, instance)
        self.transport = rule.transport
        self.address = rule.address or ("/dev/log" if rule.transport == "unix" else "")
        self.facility = fmt.FACILITIES[rule.facility]
        self.severity = fmt.SEVERITIES[rule.severity]
        self.failure_severity = fmt.SEVERITIES[rule.failure_severity]
        self.app_name, self.sd_id = rule.app_name, rule.sd_id
        self.max_size = min(rule.max_message_size, _UDP_MAX) if rule.transport == "udp" else rule.max_message_size
        self.hostname = socket.gethostname()
        self._tls = tls
        self._sock: socket.socket | None = None

    def _encode(self, record: dict, enriched: dict, line: str) -> bytes:
        message = self._message(enriched, line)
        params = [(k, enriched.get(k)) for k in self.SD_MEMBERS
                  if enriched.get(k) is not None and not isinstance(enriched.get(k), (list, dict))]
        severity = self.severity if fmt.level(record) == fmt.INFORMATIONAL else self.failure_severity
        data, cut = fmt.rfc5424(self.facility, severity, record.get("ts"), self.hostname, self.app_name,
                                os.getpid(), record.get("event"), params, self.sd_id, message, self.max_size)
        if cut:
            self.truncated += 1
        return data if self.transport in ("udp", "unix") else fmt.octet_counted(data)

    def _connect(self) -> socket.socket:
        if self.transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            return sock
        host, port = parse_listen(self.address)
        if self.transport == "udp":
            family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.timeout_s)
            sock.connect(where)  # connected: a receiver that is not there shows as ECONNREFUSED
            return sock
        sock = socket.create_connection((host, port), timeout=self.timeout_s)
        if self.transport == "tls":
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError):
                sock.close()
                raise
        return sock

    def _deliver(self, batch: list[bytes]) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.transport in ("udp", "unix"):
            for datagram in batch:
                self._sock.send(datagram)
        else:
            self._sock.sendall(b"".join(batch))

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


# --- PostgreSQL -------------------------------------------------------------------------

CREATE_TABLE = """\
CREATE TABLE pgproxy_audit (
    ts        timestamptz NOT NULL,   -- the record's ts
    instance  text        NOT NULL,   -- which pgproxy wrote it
    event     text        NOT NULL,   -- statement, session_start, auth_failure, denied, ...
    "user"    text,                   -- the person (NULL for admin records)
    session   text,
    record    jsonb       NOT NULL    -- the whole record (format = ocsf: the OCSF event)
);
CREATE INDEX pgproxy_audit_ts ON pgproxy_audit USING brin (ts);  -- rows arrive in time order
CREATE INDEX pgproxy_audit_user_ts ON pgproxy_audit ("user", ts);
CREATE INDEX pgproxy_audit_event_ts ON pgproxy_audit (event, ts);
CREATE INDEX pgproxy_audit_instance_ts ON pgproxy_audit (instance, ts);
CREATE INDEX pgproxy_audit_session ON pgproxy_audit (session);
"""
COLUMNS = ("ts", "instance", "event", '"user"', "session", "record")


class PostgresSink(QueuedSink):
    """Batches of records copied (``COPY ... FROM STDIN``, text format) into a table, over
    the sink's own connection: pgproxy's backend login code (SCRAM, md5, TLS) on a small
    event loop of the sink's thread, never the proxy's pools."""

    kind = "postgresql"

    def __init__(self, rule: AuditSinkRule, name: str, instance: str, password: str | None,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(rule, name, instance)
        self.host, self.port, self.database, self.user = rule.host, rule.port, rule.database, rule.user
        self.table = rule.table
        self._password = password
        self._tls = tls
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._copy = f"COPY {rule.table} ({', '.join(COLUMNS)}) FROM STDIN"

    def _encode(self, record: dict, enriched: dict, line: str) -> bytes:
        # json: the record as in the file, plus instance; ocsf: the OCSF event.
        stored = fmt.without_nul(record if self.format == "json" else fmt.to_ocsf(enriched))
        return fmt.copy_row([_text(record.get("ts")) or _now_iso(), self.instance,
                             _text(record.get("event")) or "unknown", _text(record.get("user")),
                             _text(record.get("session")), json.dumps(stored, ensure_ascii=False, default=str)])

    def _deliver(self, batch: list[bytes]) -> None:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._copy_rows(batch), self.timeout_s))
        except PgProxyError as exc:
            if not exc.sqlstate.startswith("22"):
                raise
            # A data error (a record the table refuses) must not hold up the records behind
            # it: copy them one by one and drop only the refused ones.
            if len(batch) == 1:
                self._reject(exc)
                return
            for row in batch:
                try:
                    self._loop.run_until_complete(asyncio.wait_for(self._copy_rows([row]), self.timeout_s))
                except PgProxyError as one:
                    if not one.sqlstate.startswith("22"):
                        raise
                    self._reject(one)
        except asyncio.TimeoutError:
            raise TimeoutError(f"COPY into {self.table} took longer than {self.timeout_s}s") from None

    def _reject(self, exc: PgProxyError) -> None:
        self.rejected += 1
        log.error("audit sink: the table refused a record; dropped", extra={
            "sink": self.name, "sqlstate": exc.sqlstate, "reason": exc.log_detail})

    async def _copy_rows(self, rows: list[bytes]) -> None:
        if self._conn is None or self._conn.broken:
            self._conn = await open_connection(self.host, self.port, self.database, self.user, self._password,
                                               self.timeout_s, self._tls)
        data = msg.query(self._copy) + b"".join(msg.message(b"d", row) for row in rows) + msg.message(b"c")
        replies = await self._conn.exchange(data, 1)
        tags = [raw[5:].rstrip(b"\0") for kind, raw in replies if kind == ord("C")]
        if tags != [b"COPY %d" % len(rows)]:
            raise RuntimeError(f"unexpected answer to COPY: {tags!r}")

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close("audit sink reconnects")
            self._conn = None
            self._loop.run_until_complete(asyncio.sleep(0))  # lets the transport close

    def _finish(self) -> None:
        if self._loop is not None:
            self._disconnect()
            self._loop.close()
            self._loop = None


def _text(value) -> str | None:
    return None if value is None else fmt.without_nul(str(value))


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


# --- configuration ----------------------------------------------------------------------

_COMMON = {"type", "name", "format", "on_failure", "queue_size", "instance", "timeout_s"}
_SYSLOG = {"transport", "address", "facility", "severity", "failure_severity", "app_name", "sd_id",
           "max_message_size", "ca_file", "cert_file", "key_file"}
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


def check_rules(rules: list[AuditSinkRule], problems: list[str]) -> None:
    """The rules beyond types for ``[[audit_sinks]]``; every problem names its key."""
    defaults = {f.name: f.default for f in dataclasses.fields(AuditSinkRule) if f.metadata}
    names = set()
    for i, rule in enumerate(rules):
        at = f"audit_sinks[{i}]"
        if rule.type not in ("syslog", "postgresql"):
            problems.append(f"{at}.type: must be syslog or postgresql")
            continue
        own = _SYSLOG if rule.type == "syslog" else set(defaults) - _SYSLOG - _COMMON
        for key in sorted(set(defaults) - _COMMON - own):
            if getattr(rule, key) != defaults[key]:
                problems.append(f"{at}.{key}: not an option of type = {rule.type}")
        name = sink_name(rule, i)
        if name in names:
            problems.append(f"{at}.name: {name!r} names another sink already")
        names.add(name)
        formats = ("json", "ocsf", "cef") if rule.type == "syslog" else ("json", "ocsf")
        if rule.format not in formats:
            problems.append(f"{at}.format: must be {', '.join(formats[:-1])} or {formats[-1]}"
                            + (" (a table holds JSON)" if rule.type == "postgresql" else ""))
        if rule.on_failure not in ("refuse", "continue"):
            problems.append(f"{at}.on_failure: must be refuse or continue")
        if rule.queue_size <= 0:
            problems.append(f"{at}.queue_size: must be greater than zero")
        if not 0 < rule.timeout_s <= 300:
            problems.append(f"{at}.timeout_s: must be greater than zero and at most 300")
        if rule.type == "syslog":
            _check_syslog(rule, at, problems)
        else:
            _check_postgresql(rule, at, problems)


def _check_syslog(rule: AuditSinkRule, at: str, problems: list[str]) -> None:
    if rule.transport not in ("udp", "tcp", "tls", "unix"):
        problems.append(f"{at}.transport: must be udp, tcp, tls or unix")
    elif rule.transport != "unix":
        try:
            parse_listen(rule.address)
        except ValueError as exc:
            problems.append(f"{at}.address: {exc}" if rule.address else f"{at}.address: required with "
                            f"transport = {rule.transport} (host:port)")
    elif rule.address and not rule.address.startswith("/"):
        problems.append(f"{at}.address: transport = unix takes an absolute socket path")
    if rule.facility not in fmt.FACILITIES:
        problems.append(f"{at}.facility: must be one of {', '.join(fmt.FACILITIES)}")
    for key in ("severity", "failure_severity"):
        if getattr(rule, key) not in fmt.SEVERITIES:
            problems.append(f"{at}.{key}: must be one of {', '.join(fmt.SEVERITIES)}")
    if not re.fullmatch(r"[!-~]{1,48}", rule.app_name):
        problems.append(f"{at}.app_name: 1-48 printable ASCII characters, no spaces")
    if not re.fullmatch(r"[!-~]{1,32}", rule.sd_id) or any(c in rule.sd_id for c in '= ]"') \
            or not re.fullmatch(r"[^@]+@[0-9]+(\.[0-9]+)*", rule.sd_id):
        problems.append(f"{at}.sd_id: must be name@enterprise-number (at most 32 characters, no = ] \" or space)")
    limit = _UDP_MAX if rule.transport == "udp" else 1 << 24
    if not 480 <= rule.max_message_size <= limit:
        problems.append(f"{at}.max_message_size: must be between 480 and {limit}")
    if rule.transport != "tls":
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(rule, key):
                problems.append(f"{at}.{key}: only used with transport = tls")
    elif bool(rule.cert_file) != bool(rule.key_file):
        problems.append(f"{at}.cert_file, {at}.key_file: give both or neither")


def _check_postgresql(rule: AuditSinkRule, at: str, problems: list[str]) -> None:
    for key in ("host", "database", "user"):
        if not getattr(rule, key):
            problems.append(f"{at}.{key}: required with type = postgresql")
    if not 0 < rule.port < 65536:
        problems.append(f"{at}.port: must be 1-65535")
    if not _TABLE.fullmatch(rule.table):
        problems.append(f"{at}.table: must be a plain table name or schema.table")
    check_postgres_login(at, rule, problems)


def sink_name(rule: AuditSinkRule, index: int) -> str:
    return rule.name or f"{rule.type}-{index}"


def build_sinks(cfg) -> list[QueuedSink]:
    """The load step for ``cfg.audit_sinks``: secrets, TLS contexts, then one started sink
    per entry. Raises ConfigError naming the key of anything it cannot load."""
    problems: list[str] = []
    prepared = []
    for i, rule in enumerate(cfg.audit_sinks):
        at = f"audit_sinks[{i}]"
        instance = rule.instance or _instance_name(cfg)
        if rule.type == "syslog":
            tls = _syslog_tls(rule, at, problems) if rule.transport == "tls" else None
            prepared.append(lambda rule=rule, i=i, instance=instance, tls=tls:
                            SyslogSink(rule, sink_name(rule, i), instance, tls))
        else:
            password = _password(rule, at, problems)
            tls = postgres_context(rule.sslmode, rule.sslrootcert, at, problems)
            prepared.append(lambda rule=rule, i=i, instance=instance, password=password, tls=tls:
                            PostgresSink(rule, sink_name(rule, i), instance, password, tls))
    if problems:
        raise ConfigError(problems)
    return [make().start() for make in prepared]


def _instance_name(cfg) -> str:
    """The instance's own name (control.instance, or <host>:<port>): several instances on one
    host stay apart in a shared table."""
    from pgproxy.control_plane import instance_name
    return instance_name(cfg)


def _password(rule: AuditSinkRule, at: str, problems: list[str]) -> str | None:
    if rule.password_file:
        try:
            lines = Path(rule.password_file).read_text().splitlines()
        except OSError as exc:
            problems.append(f"{at}.password_file: cannot read {rule.password_file!r}: {exc.strerror}")
            return None
        return lines[0] if lines else ""
    if rule.password_env:
        if rule.password_env not in os.environ:
            problems.append(f"{at}.password_env: environment variable {rule.password_env} is not set")
        return os.environ.get(rule.password_env)
    return None


def _syslog_tls(rule: AuditSinkRule, at: str, problems: list[str]) -> ssl.SSLContext | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if rule.ca_file:
            ctx.load_verify_locations(rule.ca_file)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"{at}.ca_file: {exc}")
        return None
    if rule.cert_file:
        try:
            ctx.load_cert_chain(rule.cert_file, rule.key_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{at}.cert_file: cannot load certificate and key: {exc}")
            return None
    return ctx


    ctx.check_hostname = rule.sslmode == "verify-full"
    try:
        ctx.load_verify_locations(rule.sslrootcert)
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"{at}.sslrootcert: {exc}")
        return None
    return ctx
