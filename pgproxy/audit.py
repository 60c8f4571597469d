"""The audit trail: one JSON line per event, written off the hot path, fail-closed.

Records are rendered to JSON on the event loop, chained (pgproxy/audit_chain.py: seq,
prev = SHA-256 of the previous line) and queued as the UTF-8 bytes that were hashed; a
writer thread appends what is queued in one write every ``flush_interval_ms``. All
per-record work stays on the loop on purpose: measured, a writer thread that renders
holds the GIL while the loop wants it back after each send() — the GIL convoy — and cost
30 % of select-only throughput; chaining on the writer cost 5 µs per statement in a
micro-benchmark where chaining on the loop costs about 1. A thread that only write()s
releases the GIL in the syscall. The chain state is shared with the writer's own records
(seals, audit_gap) under a lock that the loop takes uncontended.

Statement records, most of the trail, are rendered in batches on the loop (``durability =
"batch"``): ``statement()`` keeps the record's fields and the loop renders and chains all
that are due ``flush_interval_ms / 2`` later, in the order they came. An ``event()`` or a
reload renders what is due first, so the file keeps the order in which things happened;
``close()`` renders what is left. Rendered one at a time, each record ran between two
network wake-ups with the interpreter's caches cold, and cost several times what the same
code costs in a loop (bench.ab: the whole trail was about a quarter of the CPU per
select-only transaction; rendering in batches cut the CPU per transaction by 2-9 %
simple, 6-24 % prepared and 8-15 % transaction-pooled in two runs: the records of prepared
statements, with their parameters, cost the most). ``durability = "before_result"``
renders each record at once: its seq is what the relay waits on.

Cost (``scripts/audit-micro --compare``, this project's 2 shared cores, thread CPU per
``statement()``, best of 15 rounds): 3.6 µs with a new text each time (simple protocol),
3.7–3.9 µs for a prepared statement with one parameter, the chain's SHA-256, lock and
encode (about 1 µs) included — the unchained trail before it (7f34696) took 3.1 and
5.7–6.0 µs, its first chained version 4.9 and 7.4–7.8 µs.
What a session repeats is rendered once (its members, a prepared text, a command tag),
the rest is one f-string of C-escaped pieces, never json.dumps: pgproxy/audit_render.py,
compiled with the hot path (since then 0.5-0.8 µs a record rendered, in a loop). The writer costs about
1 µs of CPU per record, mostly the write() itself; a round writes once (what is queued
during the write waits for the next round: each write hands the GIL to the loop and
taking it back costs the loop a switch), and a checkpoint due goes into the same write.
An idle writer (and no sinks) sleeps until ``_put`` queues a record and wakes it, looking
once a second for rotation and interval checkpoints, instead of waking 50 times a second.

Fail closed (``on_failure = "refuse"``): ``available`` is False while the last write (or
fsync) failed, the queue holds more than ``queue_size`` records, or a sink with
``on_failure = "refuse"`` is unhealthy; the relay then refuses new statements and logins
(58030) and counts them with ``note_refused``. The writer retries with backoff (10 ms
doubling to 1 s, never spinning); once everything is written again it appends an
``audit_gap`` record: from when to when, why, how many statements and logins were refused
and how many records were dropped (only with ``on_failure = "continue"``, which drops
past ``queue_size`` and drops what it cannot write). ``queue_size`` is a soft bound: records
of statements that already ran are always queued (what is in flight bounds them), only
new work is refused. A write that failed partway leaves a torn line; the retry starts on
a new line (a newline first if the file does not end with one) and writes the torn
record again whole, so ``audit verify`` reports the torn line and everything after it
verifies.

Durability: ``statement()`` and ``event()`` return the record's ``seq``.
``when_durable(seq, callback)`` runs ``callback`` on the event loop once that record and
every one before it is written (and fsync'ed, unless ``fsync = "never"`` with
``durability = "batch"``): one ``call_soon_threadsafe`` per batch for all callbacks due
(group commit: one write and one fsync for everything queued). A callback also wakes the
writer at once, so ``durability = "before_result"`` does not wait for the interval.

Files: ``reopen()`` (SIGHUP, SIGUSR1) starts a new file at the configured path when the
open one was moved away; ``reconfigure()`` (SIGHUP) applies a new [audit] section, and a
new ``file`` moves the trail (``audit_file_changed`` in both files). Built-in rotation
(``rotate_size_mb``, ``rotate_interval_h``) renames the file to ``<file>.<UTC time>``
under an flock, so several workers sharing the file rotate it once; the others notice the
rename within a second and follow. Each writer ends its part of a file with a signed
closing seal and starts the next with an opening one, queued together so that nothing
comes between them.

Sinks (``Sink`` below) get every line as written to the file, once per batch, from the
writer thread; the file stays the record of truth.

Producers (``statement``, ``event``, ``note_refused``, ``when_durable``, ``reopen``,
``reconfigure``) run on the event loop thread. No record ever holds a password or a
token: authentication failures carry the user, the reason and the client address only.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import heapq
import itertools
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections import deque
from typing import Callable, Protocol

from pgproxy import __version__, logs
from pgproxy.audit_chain import ZERO_HASH, key_id, load_or_create_key, public_key_text, publish_public_key, \
    render_seal
from pgproxy.config import AuditSection
from pgproxy.audit_render import StatementRenderer
from pgproxy.audit_render import iso as _iso

log = logging.getLogger("pgproxy.audit")

_BATCH = 4096            # lines per write at most
_BACKOFF_S = (0.01, 1.0)  # first retry after a failed write, doubling up to the second
_FOLLOW_CHECK_S = 1.0    # built-in rotation: how often to look whether another worker rotated
_IDLE_WAKE_S = 1.0       # an idle writer still looks this often (rotation, interval checkpoints)
CLOSE_TIMEOUT_S = 10.0   # close(): how long to keep retrying a failing file before giving up
try:  # OpenSSL's, without hashlib's dispatch: 0.2 µs less for each record's link
    from _hashlib import openssl_sha256 as _sha256
except ImportError:
    _sha256 = hashlib.sha256


class Sink(Protocol):
    """Another destination for the trail (pgproxy/audit_sinks.py builds them).

    ``submit`` is called from the audit writer thread once per batch, with the lines
    exactly as written to the file (str, no newline, in file order, each line once). It
    must not block: a sink queues (bounded) and delivers on its own thread; on overflow
    it sets ``healthy`` False. While a sink with ``on_failure = "refuse"`` is unhealthy
    the AuditLog is unavailable. ``close`` is called once, after the last submit."""

    name: str
    on_failure: str  # "refuse" | "continue"
    healthy: bool

    def submit(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class _Switch:
    """Queued right after a closing seal: the lines after it go to ``fd`` (``path``)."""
    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path


class AuditLog:
    def __init__(self, cfg: AuditSection, sinks: list | None = None, worker: int | None = None,
                 signing_key=None) -> None:
        """Opens the file (OSError if it cannot) and loads the signing key
        (audit_chain.AuditKeyError); ``worker``: this process's worker index (default: the
        one logs knows, 0 for a single process)."""
        self._cfg = cfg          # the loop's view (rendering, queue bound)
        self._wcfg = cfg         # the writer's view (file, durability, rotation, checkpoints)
        self.before_result = cfg.durability == "before_result"  # read by the relay per statement
        self._pending: deque = deque()  # final lines (and _Switch markers), in seq order
        self._lock = threading.Lock()   # the chain: _seq, _prev, and appending in that order
        self._seq = 0
        self._prev = ZERO_HASH
        self._seal_seq = 0  # the seq of the last seal queued, until it is written (writer)
        self._queue_full = False
        self.refused = {"statement": 0, "login": 0}  # note_refused, cumulative (loop)
        self.available = True
        self.unavailable_reason = ""
        self.records_written = 0
        self.write_errors = 0
        self.fsyncs = 0
        self.dropped_records = 0  # on_failure = continue: records never written
        self._sinks = list(sinks or [])
        if signing_key is None:
            signing_key = (load_or_create_key(cfg.signing_key_file) if cfg.signing_key_file
                           else _ephemeral_key())
        self._key = signing_key
        self._kid = key_id(signing_key.public_key())
        index = logs.worker_index if worker is None else worker
        self.worker = index or 0
        self.writer_id = f"{self.worker}.{secrets.token_hex(4)}"
        self._link = f', "writer": "{self.writer_id}", "seq": '
        # Statement records waiting to be rendered (loop; see statement()): their fields, in order.
        self._due: list[tuple] = []
        self._due_loop: asyncio.AbstractEventLoop | None = None  # where their render is scheduled
        self._due_thread = 0  # the thread that loop runs in
        self._render_delay = cfg.flush_interval_ms / 2000
        self._renderer = _renderer(cfg)  # statement records' JSON (loop; pgproxy/audit_render.py)
        self._path = cfg.file
        self._fd = _open_trail(cfg.file)
        if cfg.on_failure == "continue" and self.worker == 0:
            log.warning("UNSAFE: audit.on_failure = continue: statements run even when their records cannot be "
                        "written")
        self._publish_key(cfg.file)
        self._append_record(self._open_seal("audit_open", "start", cfg.file))
        # --- writer-thread state ---
        self._batch: list | None = None   # taken from the queue, not yet (wholly) written: [lines, switch]
        self._written = 0                 # seq of the last line written
        self._since_seal = 0
        self._sealed_at = self._opened_at = self._followed_at = time.monotonic()
        self._file_problem = ""
        self._check_line_end = True  # the file may end in a torn line (a crash, a failed write)
        self._fsync_owed = False
        self._backoff = 0.0
        self._gap: dict | None = None
        self._logged_reason = ""
        self._closing_sealed = False
        self._switches_queued = 0
        self._durable = 0        # seq up to which records are written (and fsync'ed)
        # --- requests from the loop ---
        self._new_cfg: AuditSection | None = None
        self._reopen_requested = False
        self._stopping = False
        self._stop_deadline = float("inf")
        self._idle = False                 # the writer sleeps until _put wakes it (see _go_idle)
        self._wake = threading.Event()     # a batch is wanted now (durability, stop, reopen, idle)
        self._control = threading.Event()  # stop, reopen or reconfigure: cuts a retry backoff short
        # --- durability callbacks (loop) ---
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list = []  # heap of (seq, n, callback)
        self._waiter_n = itertools.count()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # --- producers (event loop) -----------------------------------------------------

    @staticmethod
    def session_prefix(fields: dict) -> str:
        """The JSON members every statement record of one session repeats, rendered once."""
        return json.dumps(fields, ensure_ascii=False)[1:-1]

    def event(self, event: str, **fields) -> int:
        """Queue a record; returns its seq (see ``when_durable``)."""
        self._render_due()  # the statements before it come before it
        return self._put(json.dumps({"ts": _iso(time.time()), **fields, "event": event}, ensure_ascii=False,
                                    default=str)[:-1])

    def statement(self, session_prefix: str, text: str, params: list | None, param_info: tuple | None,
                  tags: list[bytes], started: float, duration_s: float, outcome: str,
                  sqlstate: str | None, backend_pid: int | None, verdict=None) -> int:
        """``tags`` are raw CommandComplete bodies, as they came from the server;
        ``verdict``: the guard's classes and relations for the statement.

        With ``durability = "before_result"`` the record is chained and queued at once and
        its seq returned (see ``when_durable``). With ``batch``, on an event loop, the
        record's fields are kept and it is rendered and chained with the others due,
        ``flush_interval_ms / 2`` later (``_render_due``); 0 is returned. Rendered as its
        statement ends, between two network wake-ups, a record finds the code and data it
        needs out of the caches (the module's docstring says what batches save). The
        fields are final: the statement is over (``tags`` gets no more appends)."""
        record = (started, session_prefix, text, params, param_info, tags, duration_s, outcome, sqlstate,
                  backend_pid, verdict)
        if not self.before_result:
            due = self._due
            if due and _thread_id() == self._due_thread and not self._due_loop.is_closed():
                # Their render is scheduled on this thread's loop, which is still there. Asked
                # before the running loop, which costs a system call (getpid: CPython 3.11
                # checks for a fork): once a batch instead of once a statement.
                due.append(record)
                return 0
            loop = _running_loop()
            if loop is not None:
                due.append(record)
                if len(due) == 1 or loop is not self._due_loop:  # (a loop that ended never ran its render)
                    self._due_loop, self._due_thread = loop, _thread_id()
                    loop.call_later(self._render_delay, self._render_due)
                return 0
        self._render_due()
        return self._put_all(self._rendered((record,)))

    def _render_due(self) -> None:
        """Render, chain and queue the statement records due, in the order they came."""
        if not self._due:
            return
        due, self._due = self._due, []
        self._put_all(self._rendered(due))

    def _rendered(self, records) -> list[str]:
        render, bodies = self._renderer.render, []
        for record in records:
            try:
                bodies.append(render(record))
            except Exception:  # never lose the fact that a statement ran
                log.exception("cannot render an audit record")
                bodies.append(json.dumps({"ts": _iso(record[0]), "event": "statement", "statement": record[2],
                                          "outcome": record[7], "render_error": True}, ensure_ascii=False)[:-1])
        return bodies

    def _put(self, body: str) -> int:
        """Chain and queue a record: ``body`` is its JSON object without the closing brace."""
        return self._put_all((body,))

    def _put_all(self, bodies) -> int:
        """Chain and queue records (``_put``), under one taking of the lock; returns the last
        seq. The queue holds each line's UTF-8, as hashed (the writer joins bytes: no encode there)."""
        pending, limit = self._pending, self._cfg.queue_size
        if len(pending) + len(bodies) > limit:  # past queue_size on the way: one by one, as _overflow decides
            kept: list[str] = []
            for body in bodies:
                if not (len(pending) + len(kept) > limit and self._overflow()):
                    kept.append(body)
            bodies = kept
        link, sha256 = self._link, _sha256
        with self._lock:
            seq, prev = self._seq, self._prev
            for body in bodies:
                seq += 1
                line = _utf8(f'{body}{link}{seq}, "prev": "{prev}"}}')
                prev = sha256(line).hexdigest()
                pending.append(line)
            self._seq, self._prev = seq, prev
        if self._idle:  # after the append (see _go_idle): the writer sleeps until a record comes
            self._idle = False
            self._wake.set()
        return seq

    def _overflow(self) -> bool:
        """Past queue_size; True if the line is to be dropped. Never waits: refuse mode turns
        the trail unavailable (new work is refused; what already ran is still queued),
        continue mode drops the line (it never gets a seq: the chain stays whole)."""
        if self._cfg.on_failure == "continue":
            self.dropped_records += 1
            return True
        if not self._queue_full:
            self._queue_full = True
            self.available = False
            self.unavailable_reason = f"audit queue full ({len(self._pending)} records waiting)"
        return False

    def note_refused(self, kind: str) -> None:
        """Count a statement ("statement") or login ("login") refused while unavailable;
        the next audit_gap record reports them."""
        self.refused[kind] = self.refused.get(kind, 0) + 1

    def durable(self, seq: int) -> bool:
        return seq <= self._durable

    def when_durable(self, seq: int, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on this event loop once record ``seq`` and all before it are
        written and fsync'ed — never synchronously, even if that is so already. While the
        trail fails the callback waits (fail closed); at close() unfired callbacks are dropped."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if seq <= self._durable:
            self._loop.call_soon(callback)
            return
        heapq.heappush(self._waiters, (seq, next(self._waiter_n), callback))
        if not self._wake.is_set():  # after the push: the writer then sees the waiter
            self._wake.set()

    def _fire_durable(self) -> None:
        durable, waiters = self._durable, self._waiters
        while waiters and waiters[0][0] <= durable:
            callback = heapq.heappop(waiters)[2]
            try:
                callback()
            except Exception:
                log.exception("audit durability callback failed")

    def reopen(self) -> None:
        """SIGHUP, SIGUSR1: if the file at the configured path is no longer the open one
        (logrotate moved it), close this writer's part of the old one and start the new."""
        self._reopen_requested = True
        self._control.set()
        self._wake.set()

    def check_reconfigure(self, cfg: AuditSection) -> str:
        """Why ``cfg`` cannot be applied ("" if it can): a new file must be openable."""
        if cfg.file != self._wcfg.file:
            try:
                os.close(_open_trail(cfg.file))
            except OSError as exc:
                return f"audit.file: cannot open {cfg.file} for appending: {exc.strerror}"
        return ""

    def reconfigure(self, cfg: AuditSection) -> None:
        """A reloaded [audit] section: rendering options at once, the rest at the writer's next batch."""
        self._render_due()  # records of statements that ran before it: rendered as configured then
        self._cfg = cfg
        self._render_delay = cfg.flush_interval_ms / 2000
        self._renderer = _renderer(cfg)  # (its caches hold texts cut to the old max_statement_length)
        self.before_result = cfg.durability == "before_result"
        self._new_cfg = cfg
        self._control.set()
        self._wake.set()

    @property
    def depth(self) -> int:
        batch = self._batch
        return len(self._due) + len(self._pending) + (len(batch[0]) if batch else 0)

    def statistics(self) -> dict:
        return {"records_written": self.records_written, "write_errors": self.write_errors, "fsyncs": self.fsyncs,
                "depth": self.depth, "available": self.available, "dropped_records": self.dropped_records,
                "refused_statements": self.refused.get("statement", 0),
                "refused_logins": self.refused.get("login", 0)}

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write everything queued and this writer's closing seal; keeps retrying a failing
        file for ``timeout`` seconds, then gives up (and says how much was lost)."""
        self._render_due()
        self._stop_deadline = time.monotonic() + timeout
        self._stopping = True
        self._control.set()
        self._wake.set()
        self._thread.join()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                log.exception("audit sink failed to close", extra={"sink": getattr(sink, "name", "?")})
        os.close(self._fd)

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self._file_problem:
                self._control.wait(self._backoff)
                self._control.clear()
            else:
                self._wake.wait(self._idle_timeout() if self._idle else self._wcfg.flush_interval_ms / 1000)
            self._wake.clear()
            self._idle = False
            stopping = self._stopping
            written = self.records_written
            try:
                self._cycle(stopping)
            except Exception:  # a bug must not silently end the trail
                log.exception("audit writer failed; retrying")
                self._file_problem = self._file_problem or "audit writer error"
                self._backoff = _BACKOFF_S[1]
            done = self._closing_sealed and not self._pending and self._batch is None and not self._fsync_owed
            if stopping and (done or time.monotonic() > self._stop_deadline):
                break
            if self.records_written == written:
                self._go_idle()
        if not done:
            lost = len(self._pending) + (len(self._batch[0]) if self._batch else 0)
            log.error("audit records could not be written before shutdown", extra={"lost": lost,
                                                                                   "reason": self._file_problem})

    def _go_idle(self) -> None:
        """After a round that wrote nothing: sleep until the loop queues a record, not for
        every flush_interval_ms (an idle worker woke 50 times a second). Only when all is
        well: a failing file, a gap to close, a waiter or a request keeps the timed rounds,
        and so do sinks — one can turn unhealthy while delivering in the background, and
        ``available`` must follow within a round, not within a second."""
        if (self._file_problem or self._gap is not None or self._batch is not None or self._fsync_owed
                or self._waiters or self._reopen_requested or self._new_cfg is not None or not self.available
                or self._sinks):
            return
        self._idle = True
        # Set before this look, read by _put after its append (both under the GIL): either the
        # look sees the record, or _put sees _idle and wakes the writer.
        if self._pending:
            self._idle = False

    def _idle_timeout(self) -> float:
        timeout = _IDLE_WAKE_S
        if self._since_seal:  # a checkpoint is due checkpoint_interval_s after the last seal
            timeout = min(timeout, max(0.0, self._sealed_at + self._wcfg.checkpoint_interval_s - time.monotonic()))
        return timeout

    def _cycle(self, stopping: bool) -> None:
        if self._fsync_owed and not self._sync():
            self._after_failure()
            return
        self._apply_requests()
        ok = self._flush()
        gap = self._gap
        self._update_health()
        if ok and gap is not None and self._gap is None:  # the audit_gap record just queued
            ok = self._flush()
        if ok and stopping and not self._closing_sealed:
            self._closing_sealed = True
            self._append_record(self._seal("audit_close", "close", "shutdown"))
            ok = self._flush()
        if not ok:
            self._after_failure()
        elif self._waiters and self._loop is not None and self._waiters[0][0] <= self._durable:
            try:
                self._loop.call_soon_threadsafe(self._fire_durable)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _after_failure(self) -> None:
        self._backoff = min(max(self._backoff * 2, _BACKOFF_S[0]), _BACKOFF_S[1])
        self._update_health()

    def _take(self) -> list | None:
        """The next batch from the queue: up to _BATCH lines, ending early after a switch."""
        pending, lines, switch = self._pending, [], None
        if not self._switches_queued and len(pending) <= _BATCH:  # the usual case: all of it, in two C calls
            with self._lock:  # no append between the copy and the clear
                lines = list(pending)
                pending.clear()
                if (lines and self._since_seal + len(lines) >= self._wcfg.checkpoint_records
                        and not self._seal_seq and not self._closing_sealed):
                    # The checkpoint due after these lines goes in the same write (chained right
                    # after them: the lock is held), not in a write of its own after it.
                    lines.append(self._chained(self._seal("audit_checkpoint", "checkpoint", "records")))
            return [lines, None] if lines else None
        while pending and len(lines) < _BATCH:
            item = pending.popleft()
            if type(item) is _Switch:
                switch = item
                break
            lines.append(item)
        return [lines, switch] if lines or switch else None

    def _flush(self) -> bool:
        """Write what is queued, in batches; False if a write failed (the batch is kept).

        What the loop queues while a batch is written waits for the next round (unless there
        is a backlog, a gap to close, or the trail is stopping): under load that is one write
        a round, not two or three — each write hands the GIL to the loop, and taking it back
        costs the loop a forced switch."""
        cfg = self._wcfg
        more = True
        while True:
            if self._batch is None:
                self._batch = self._take() if more else None
                if self._batch is None:
                    if self._since_seal and time.monotonic() - self._sealed_at >= cfg.checkpoint_interval_s:
                        self._append_record(self._seal("audit_checkpoint", "checkpoint", "interval"))
                        more = True
                        continue
                    return self._sync()  # one fsync for everything this round wrote (group commit)
            lines, switch = self._batch
            count = len(lines)
            if lines and not self._write_lines(lines):
                if cfg.on_failure == "continue":  # give these up: the audit_gap record says how many
                    self.dropped_records += len(lines)
                    self._written += len(lines)
                    self._check_durable()
                    self._batch = None
                    if switch is not None:
                        self._switch_to(switch)
                elif self._switches_queued:  # the trail moves on: what the old file refuses goes to the new one
                    self._carry_over()
                return False
            self._batch = None
            if switch is not None:
                self._switch_to(switch)
            elif self._since_seal >= cfg.checkpoint_records and not self._closing_sealed:
                self._append_record(self._seal("audit_checkpoint", "checkpoint", "records"))
            else:
                more = count >= _BATCH or self._stopping or self._gap is not None

    def _write_lines(self, lines: list[bytes]) -> bool:
        """Append ``lines`` (a torn retry starts on a new line); False if not all were written
        (those that were are dropped from ``lines``)."""
        lead = b"\n" if self._check_line_end and not _ends_with_newline(self._fd) else b""
        # One C call, no per-line work: joining bytes is 20x faster than joining and encoding str.
        data = b"\n".join([*lines, b""])
        if lead:
            data = lead + data
        written, error = _write_all(self._fd, data)
        # Lines hold no raw newline (JSON escapes it): each one in the written part ends a line.
        done = len(lines) if error is None else data.count(b"\n", len(lead), written)
        if done:
            self._committed(lines[:done])
            del lines[:done]
        if error is None:
            self._recovered()
            return True
        self._write_failed(f"cannot write {self._path}: {error.strerror or error}", error)
        return False

    def _committed(self, lines: list[bytes]) -> None:
        self._written += len(lines)
        self.records_written += len(lines)
        self._since_seal += len(lines)
        if self._seal_seq and self._written >= self._seal_seq:  # the last seal queued is in the file
            self._since_seal, self._sealed_at = self._written - self._seal_seq, time.monotonic()
            self._seal_seq = 0
        if self._fsync_wanted():
            self._fsync_owed = True
        else:
            self._check_durable()
        if not self._sinks:
            return
        text = [line.decode() for line in lines]  # sinks take str (the loop queued the bytes it hashed)
        for sink in self._sinks:
            try:
                sink.submit(text)
            except Exception:
                log.exception("audit sink failed to take records", extra={"sink": getattr(sink, "name", "?")})

    def _fsync_wanted(self) -> bool:
        return self._wcfg.durability == "before_result" or self._wcfg.fsync == "batch"

    def _sync(self) -> bool:
        if not self._fsync_owed:
            return True
        try:
            os.fdatasync(self._fd)
            self.fsyncs += 1
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):  # a device or pipe: nothing to sync
                self._write_failed(f"cannot fsync {self._path}: {exc.strerror}", exc)
                return False
        self._fsync_owed = False
        self._check_durable()
        return True

    def _check_durable(self) -> None:
        self._durable = self._written

    def _begin_gap(self) -> None:
        if self._gap is None:
            self._gap = {"from": time.time(), "reasons": [], "refused": dict(self.refused),
                         "dropped": self.dropped_records}

    def _write_failed(self, problem: str, error: OSError) -> None:
        self._begin_gap()  # before anything is dropped for this failure
        self.write_errors += 1
        self._check_line_end = True
        if problem != self._file_problem:
            log.error("audit write failed", extra={"reason": problem, "errno": errno.errorcode.get(error.errno, "")})
        self._file_problem = problem

    def _recovered(self) -> None:
        if self._file_problem:
            log.warning("audit file writable again", extra={"file": self._path})
        self._file_problem = ""
        self._check_line_end = False
        self._backoff = 0.0

    def _update_health(self) -> None:
        cfg = self._wcfg
        refuse = cfg.on_failure == "refuse"
        problems: list[tuple[str, bool]] = []
        if self._file_problem:
            problems.append((self._file_problem, refuse))
        waiting = len(self._pending)
        if self._queue_full and waiting <= self._cfg.queue_size // 2:
            self._queue_full = False
        if self._queue_full or waiting > self._cfg.queue_size:
            self._queue_full = refuse
            problems.append((f"audit queue full ({waiting} records waiting)", refuse))
        for sink in self._sinks:
            if not sink.healthy:
                problems.append((f"audit sink {sink.name} unhealthy", sink.on_failure == "refuse"))
        reason = "; ".join(text for text, _ in problems)
        refusing = any(r for _, r in problems)
        if problems:
            self._begin_gap()
        if self._gap is not None:
            for text, _ in problems:
                if text not in self._gap["reasons"] and len(self._gap["reasons"]) < 10:
                    self._gap["reasons"].append(text)
            if not problems and not self._pending and self._batch is None:
                gap, self._gap = self._gap, None
                self._append_record({
                    "ts": _iso(time.time()), "event": "audit_gap", "from": _iso(gap["from"]), "to": _iso(time.time()),
                    "reason": "; ".join(gap["reasons"]),
                    "refused_statements": self.refused.get("statement", 0) - gap["refused"].get("statement", 0),
                    "refused_logins": self.refused.get("login", 0) - gap["refused"].get("login", 0),
                    "dropped_records": self.dropped_records - gap["dropped"]})
        if reason != self._logged_reason:
            if reason:
                log.error("audit trail unavailable: new statements and logins are refused" if refusing
                          else "audit trail degraded (on_failure = continue)", extra={"reason": reason})
            else:
                log.warning("audit trail available again")
            self._logged_reason = reason
        self.unavailable_reason = reason if refusing else ""
        self.available = not refusing

    # --- files: reopen, reload, rotation (writer thread) --------------------------------

    def _apply_requests(self) -> None:
        if self._new_cfg is not None:
            cfg, self._new_cfg = self._new_cfg, None
            old = self._wcfg
            self._wcfg = cfg
            if cfg.file != old.file:
                self._switch_file(cfg.file, "audit_file_changed", "reload", moved_from=old.file)
        if self._reopen_requested:
            self._reopen_requested = False
            if not self._still_at_path():
                self._switch_file(self._wcfg.file, "audit_reopen", "signal")
        self._rotate_if_due()

    def _still_at_path(self) -> bool:
        try:
            now, ours = os.stat(self._wcfg.file), os.fstat(self._fd)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)

    def _rotate_if_due(self) -> None:
        cfg = self._wcfg
        if not (cfg.rotate_size_mb or cfg.rotate_interval_h) or self._switches_queued:
            return
        now = time.monotonic()
        if now - self._followed_at >= _FOLLOW_CHECK_S:  # another worker may have rotated it
            self._followed_at = now
            if not self._still_at_path():
                self._switch_file(cfg.file, "audit_reopen", "rotate")
                return
        try:
            info = os.fstat(self._fd)
        except OSError:
            return
        if not stat.S_ISREG(info.st_mode):
            return
        due = ((cfg.rotate_size_mb and info.st_size >= cfg.rotate_size_mb * 1024 * 1024)
               or (cfg.rotate_interval_h and now - self._opened_at >= cfg.rotate_interval_h * 3600))
        if not due:
            return
        renamed = ""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # one rotation among the workers sharing the file
            try:
                if self._still_at_path():
                    renamed = _rotated_name(cfg.file)
                    os.rename(cfg.file, renamed)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            log.error("cannot rotate the audit file", extra={"file": cfg.file, "reason": exc.strerror})
            self._opened_at = now  # try again after another interval, not at every batch
            return
        self._switch_file(cfg.file, "audit_reopen", "rotate", rotated_to=renamed)

    def _switch_file(self, path: str, event: str, reason: str, moved_from: str = "", rotated_to: str = "") -> None:
        """Queue this writer's closing seal for the open file, the switch, and its opening
        seal for ``path`` — together, so no line comes between them. If ``path`` cannot be
        opened the old file stays in use."""
        try:
            fd = _open_trail(path)
        except OSError as exc:
            log.error("cannot open the audit file; still writing the old one",
                      extra={"file": path, "reason": exc.strerror})
            return
        if moved_from:
            self._publish_key(path)
        close = {"to": path} if moved_from else {"renamed_to": rotated_to} if rotated_to else {}
        opening = {"from": moved_from} if moved_from else {"previous": rotated_to or self._path}
        closing_seal = self._seal(event if moved_from else "audit_close", "close", reason, **close)
        opening_seal = self._open_seal(event, reason, path, **opening)
        with self._lock:
            self._chain(closing_seal)
            self._pending.append(_Switch(fd, path))
            self._chain(opening_seal)
        self._switches_queued += 1
        self._flush()

    def _switch_to(self, switch: _Switch) -> None:
        self._sync()  # the old file's last records, before its descriptor goes
        self._fsync_owed = False
        os.close(self._fd)
        self._fd, self._path = switch.fd, switch.path
        self._switches_queued -= 1
        self._opened_at = self._followed_at = time.monotonic()
        self._check_line_end = True
        log.info("audit file opened", extra={"file": switch.path})

    def _carry_over(self) -> None:
        """The old file fails and the trail is to move: take every line queued before the
        switch into this batch and move now. ``audit verify`` reports the old file's missing
        closing seal and the new part's lines before its opening seal — as it should."""
        lines, switch = self._batch
        while switch is None:
            more = self._take()
            if more is None:
                return
            lines += more[0]
            switch = more[1]
        log.error("the old audit file cannot be written; its last records go to the new one",
                  extra={"file": self._path, "records": len(lines), "new_file": switch.path})
        self._batch = [lines, None]
        self._switch_to(switch)

    # --- records the writer adds ------------------------------------------------------

    def _append_record(self, fields: dict) -> None:
        with self._lock:
            self._chain(fields)

    def _chain(self, fields: dict) -> None:
        """Queue a record of the writer's own (the lock held)."""
        self._pending.append(self._chained(fields))

    def _chained(self, fields: dict) -> bytes:
        """The next line of the chain (the lock held; the caller queues it): a seal is signed."""
        seq = self._seq = self._seq + 1
        if "seal" in fields:
            line = render_seal(fields, self.writer_id, seq, self._prev, self._key, self._kid).encode()
            self._seal_seq = seq
        else:
            line = _utf8(json.dumps(fields, ensure_ascii=False, default=str)[:-1]
                         + f', "writer": "{self.writer_id}", "seq": {seq}, "prev": "{self._prev}"}}')
        self._prev = _sha256(line).hexdigest()
        return line

    def _seal(self, event: str, seal: str, reason: str, **extra) -> dict:
        return {"ts": _iso(time.time()), "event": event, "seal": seal, "reason": reason, **extra}

    def _open_seal(self, event: str, reason: str, path: str, **extra) -> dict:
        return self._seal(event, "open", reason, file=path, **extra, pid=os.getpid(),
                          host=socket.gethostname(), worker=self.worker, version=__version__,
                          public_key=public_key_text(self._key.public_key()))

    def _publish_key(self, path: str) -> None:
        try:
            publish_public_key(path, self._key)
        except OSError as exc:  # verify can still take the key from --public-key or the trail
            log.error("cannot publish the audit signing key", extra={"file": path + ".pub", "reason": exc.strerror})


def _utf8(line: str) -> bytes:
    """A record's bytes. A lone surrogate has no UTF-8: a token's claim can carry one (JSON's
    "\\udc00" escape decodes to it), and it reaches the record through json.dumps with
    ensure_ascii=False. It is written as that same JSON escape, so the line stays valid JSON
    and UTF-8, and the record is written rather than lost (with the rest of its batch)."""
    try:
        return line.encode()
    except UnicodeEncodeError:
        return line.encode("utf-8", "backslashreplace")


_running_loop = asyncio._get_running_loop  # None off a loop (the C function asyncio itself calls)
_thread_id = threading.get_ident


def _ephemeral_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    return Ed25519PrivateKey.generate()


def _open_trail(path: str) -> int:
    """The trail's descriptor: appending, and readable so a torn last line can be seen."""
    flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, os.O_RDWR | flags, 0o640)
    except PermissionError:  # a file we may append to but not read
        return os.open(path, os.O_WRONLY | flags, 0o640)


def _ends_with_newline(fd: int) -> bool:
    """False if the file's last byte is not a newline (a torn line); True if empty or unknown."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return True
        return os.pread(fd, 1, info.st_size - 1) == b"\n"
    except OSError:
        return True


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Bytes written, and the error that stopped the write (None when all went)."""
    view, done = memoryview(data), 0
    while done < len(data):
        try:
            n = os.write(fd, view[done:])
        except OSError as exc:
            return done, exc
        if n == 0:
            return done, OSError(errno.EIO, "write wrote nothing")
        done += n
    return done, None


def _rotated_name(path: str) -> str:
    base = f"{path}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    name, n = base, 0
    while os.path.lexists(name) or os.path.lexists(name + ".gz"):
        n += 1
        name = f"{base}-{n}"
    return name


def _renderer(cfg: AuditSection) -> StatementRenderer:
    return StatementRenderer(cfg.max_statement_length, cfg.max_parameter_length, cfg.parameters)
