"""Time-boxed elevation: a role granted to one person until a time, and the access
requests that lead to one. The model, its rules (pure functions) and where it is kept.

Model. A ``Grant`` maps one person (an identity's canonical user name) to one database
role from ``start`` to ``end``, in wall-clock seconds since 1970, so it means the same on
every worker and after a restart. While it is in force it replaces the person's
[[roles]] mapping (``roles.map_role``); with several in force, the one granted last wins.
It ends at ``end``, or earlier when an operator ends it (``ended_at``). An
``AccessRequest`` is filed by a person (pending) and decided by someone else with an
approver group: approved (a grant from that moment for the requested duration), denied,
or it lapses after ``grants.request_timeout_s``. Service accounts name their own role
and take no grants.

What the end means — the session ends, the transaction does not carry on under another
role: a session that logged in under a granted role is ended with FATAL 28000 within a
second of the grant's end (grants_service.py; its open transaction is rolled back), and
the person's next login maps as before. A session that logged in before the grant keeps
its role: the person reconnects to use the grant. Switching a live session's role would
change who runs a transaction-pooled client's next statement behind its back.

Pure functions decide (``new_grant``, ``file_request``, ``decide``, ``end_grant``,
``lapsed``); each returns new versions of records (``rev`` + 1) and raises ``Refused``
(with an HTTP status) for a request that breaks a rule. A store keeps the records:
``read()`` the state, ``version()`` a cheap token that changes with it, ``update(change)``
an atomic read-modify-write (``change`` is one of the pure functions, run on the current
state; what it returns is merged and kept) and ``merge(records)`` for records another
worker made. ``FileStore`` is a JSON state file every worker reads and writes under an
flock (grants.state_file, so grants survive restarts); ``MemoryStore`` is the same in
one process, for tests. A store on the shared control schema (``pgproxy_control.grants``,
control_plane.py) implements the same four methods: ``update`` as one transaction with
the rows locked, ``version`` bumped by its notifications.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Union

MAX_NAME = 256            # a person's or approver's name
MAX_ROLE = 63             # PostgreSQL's NAMEDATALEN - 1
MAX_REASON = 1000
MAX_PENDING_PER_PERSON = 5
MAX_PENDING = 1000        # requests waiting in all: filing more is refused
KEEP_S = 86_400.0         # ended grants and decided requests stay visible this long, then go
MAX_STATE_BYTES = 16 << 20
STATE_FORMAT = 1


class Refused(Exception):
    """A grant, request or decision that breaks a rule: ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Grant:
    id: str
    person: str
    role: str
    start: float
    end: float
    reason: str
    requester: str          # who asked: the person (a request) or "admin" (the admin API)
    approver: str           # who approved: the approving identity, or the admin's --approver
    source: str             # "admin" or "request"
    request: str = ""       # the request's id, for source = request
    ended_at: float | None = None   # ended early by an operator
    ended_by: str = ""
    expiry_noted: bool = False      # its end has been audited
    rev: int = 1

    def in_force(self, now: float) -> bool:
        return self.start <= now < self.end and self.ended_at is None

    @property
    def over_at(self) -> float:
        return self.ended_at if self.ended_at is not None else self.end


@dataclass(frozen=True)
class AccessRequest:
    id: str
    requester: str
    subject: str            # the requester's IdP subject: the same person under another name cannot approve
    role: str
    duration_s: float
    reason: str
    filed_at: float
    state: str = "pending"  # pending, approved, denied or lapsed
    decided_by: str = ""
    decided_at: float | None = None
    decision_reason: str = ""
    grant: str = ""         # the grant an approval made
    rev: int = 1


Record = Union[Grant, AccessRequest]


@dataclass
class State:
    grants: dict[str, Grant] = dataclasses.field(default_factory=dict)
    requests: dict[str, AccessRequest] = dataclasses.field(default_factory=dict)

    def merge(self, records: Iterable[Record]) -> list[Record]:
        """Take records that are newer (higher ``rev``) than ours; returns those taken."""
        taken = []
        for record in records:
            table = self.grants if isinstance(record, Grant) else self.requests
            known = table.get(record.id)
            if known is None or record.rev > known.rev:
                table[record.id] = record
                taken.append(record)
        return taken

    def prune(self, now: float) -> None:
        """Forget what has been over for KEEP_S (the audit trail keeps the history)."""
        self.grants = {k: g for k, g in self.grants.items()
                       if not (g.over_at + KEEP_S < now and (g.expiry_noted or g.ended_at is not None))}
        self.requests = {k: r for k, r in self.requests.items()
                         if r.state == "pending" or (r.decided_at or r.filed_at) + KEEP_S >= now}

    def copy(self) -> "State":
        return State(dict(self.grants), dict(self.requests))


@dataclass(frozen=True)
class Rules:
    """What [grants] and the backend allow (built from the configuration)."""
    roles: tuple[str, ...] = ()          # grantable roles; empty: any but the pool role
    pool_role: str = ""
    max_duration_s: float = 28_800.0
    approver_groups: tuple[str, ...] = ()
    request_timeout_s: float = 86_400.0

    @classmethod
    def of(cls, cfg) -> "Rules":
        g = cfg.grants
        return cls(tuple(g.roles), cfg.backend.user, g.max_duration_s, tuple(g.approver_groups),
                   g.request_timeout_s)


# --- pure rules -----------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``1h30m`` or ``2d``; ValueError otherwise."""
    text = str(text).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"not a duration: {text[:40]!r} (use e.g. 3600, 90s, 15m, 1h30m, 2d)") from None
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if not 0 < seconds < 1e9:
        raise ValueError("a duration must be greater than zero")
    return seconds


def in_force_for(grants: Iterable[Grant], person: str, now: float) -> Grant | None:
    """The grant that maps ``person`` now: the one granted last among those in force."""
    best = None
    for grant in grants:
        if grant.person == person and grant.in_force(now) and (best is None or grant.start >= best.start):
            best = grant
    return best


def _text(value: str, what: str, limit: int, required: bool = True) -> str:
    value = (value or "").strip()
    if required and not value:
        raise Refused(400, f"give {what}")
    if len(value) > limit or not value.isprintable():
        raise Refused(400, f"{what}: at most {limit} printable characters")
    return value


def check_role(role: str, rules: Rules) -> str:
    role = _text(role, "a role", MAX_ROLE)
    if role == rules.pool_role:
        raise Refused(400, "the pool role itself cannot be granted")
    if rules.roles and role not in rules.roles:
        raise Refused(400, f'role "{role}" is not in grants.roles')
    return role


def _check_duration(duration_s: float, rules: Rules) -> float:
    if not 0 < duration_s <= rules.max_duration_s:
        raise Refused(400, f"the duration must be more than 0 and at most grants.max_duration_s "
                           f"({rules.max_duration_s:g} s)")
    return duration_s


def _check_person(person: str) -> str:
    person = _text(person, "a person (user name)", MAX_NAME)
    if person.startswith("svc:"):
        raise Refused(400, "service accounts name their own role; grants are for people")
    return person


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def new_grant(person: str, role: str, duration_s: float, reason: str, rules: Rules, now: float, *,
              approver: str = "", requester: str = "admin", source: str = "admin", request: str = "") -> Grant:
    """An operator's grant (or an approved request's): in force from ``now``."""
    return Grant(id=new_id("g"), person=_check_person(person), role=check_role(role, rules), start=now,
                 end=now + _check_duration(duration_s, rules), reason=_text(reason, "a reason", MAX_REASON),
                 requester=requester, approver=_text(approver, "an approver", MAX_NAME, required=False) or requester,
                 source=source, request=request)


def file_request(state: State, requester: str, subject: str, role: str, duration_s: float, reason: str,
                 rules: Rules, now: float) -> AccessRequest:
    if not rules.approver_groups:
        raise Refused(403, "access requests are off: set grants.approver_groups")
    requester = _check_person(requester)
    pending = [r for r in state.requests.values() if r.state == "pending" and not _lapsed(r, now, rules)]
    if sum(r.requester == requester for r in pending) >= MAX_PENDING_PER_PERSON:
        raise Refused(409, f"you have {MAX_PENDING_PER_PERSON} requests waiting already")
    if len(pending) >= MAX_PENDING:
        raise Refused(503, "too many requests are waiting; try later")
    return AccessRequest(id=new_id("r"), requester=requester, subject=subject, role=check_role(role, rules),
                         duration_s=_check_duration(duration_s, rules),
                         reason=_text(reason, "a reason", MAX_REASON), filed_at=now)


def may_approve(groups: Iterable[str], rules: Rules) -> bool:
    return bool(set(groups) & set(rules.approver_groups))


def decide(state: State, request_id: str, approver: str, approver_subject: str, approver_groups: Iterable[str],
           approve: bool, reason: str, rules: Rules, now: float) -> tuple[AccessRequest, Grant | None]:
    """An approver's decision on someone else's pending request."""
    request = state.requests.get(request_id)
    if request is None:
        raise Refused(404, "no such request")
    if not may_approve(approver_groups, rules):
        raise Refused(403, "you are not an approver (grants.approver_groups)")
    if approver == request.requester or (approver_subject and approver_subject == request.subject):
        raise Refused(403, "you cannot decide your own request")
    if request.state != "pending" or _lapsed(request, now, rules):
        raise Refused(409, f"the request is {request.state if request.state != 'pending' else 'lapsed'} already")
    reason = _text(reason, "a reason", MAX_REASON, required=False)
    grant = None
    if approve:
        grant = new_grant(request.requester, request.role, request.duration_s, request.reason, rules, now,
                          approver=approver, requester=request.requester, source="request", request=request.id)
    decided = dataclasses.replace(request, state="approved" if approve else "denied", decided_by=approver,
                                  decided_at=now, decision_reason=reason, grant=grant.id if grant else "",
                                  rev=request.rev + 1)
    return decided, grant


def end_grant(state: State, grant_id: str, by: str, now: float) -> Grant:
    grant = state.grants.get(grant_id)
    if grant is None:
        raise Refused(404, "no such grant")
    if not grant.in_force(now):
        raise Refused(409, "the grant is over already")
    return dataclasses.replace(grant, ended_at=now, ended_by=by, expiry_noted=True, rev=grant.rev + 1)


def _lapsed(request: AccessRequest, now: float, rules: Rules) -> bool:
    return request.state == "pending" and request.filed_at + rules.request_timeout_s <= now


def lapsed(state: State, now: float, rules: Rules) -> list[Record]:
    """What ran out and is not yet marked so: grants past their end (to audit their expiry)
    and pending requests past grants.request_timeout_s."""
    out: list[Record] = [dataclasses.replace(g, expiry_noted=True, rev=g.rev + 1) for g in state.grants.values()
                         if not g.expiry_noted and g.ended_at is None and g.end <= now]
    out += [dataclasses.replace(r, state="lapsed", decided_at=r.filed_at + rules.request_timeout_s,
                                rev=r.rev + 1) for r in state.requests.values() if _lapsed(r, now, rules)]
    return out


# --- serialization --------------------------------------------------------------------

def to_json(record: Record) -> dict:
    return {"kind": "grant" if isinstance(record, Grant) else "request", **dataclasses.asdict(record)}


def from_json(item: dict) -> Record:
    """A record from the state file or the control channel; ValueError if malformed."""
    if not isinstance(item, dict):
        raise ValueError("a record is not an object")
    kind = item.get("kind")
    cls = {"grant": Grant, "request": AccessRequest}.get(kind)
    if cls is None:
        raise ValueError(f"unknown record kind {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        record = cls(**{k: v for k, v in item.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"malformed {kind} record: {exc}") from None
    if not isinstance(record.id, str) or not isinstance(record.rev, int):
        raise ValueError(f"malformed {kind} record")
    if isinstance(record, Grant) and not (isinstance(record.person, str) and isinstance(record.role, str)
                                          and isinstance(record.start, (int, float))
                                          and isinstance(record.end, (int, float))):
        raise ValueError("malformed grant record")
    return record


def encode_state(state: State) -> bytes:
    return json.dumps({"format": STATE_FORMAT, "grants": [to_json(g) for g in state.grants.values()],
                       "requests": [to_json(r) for r in state.requests.values()]}, indent=1).encode() + b"\n"


def decode_state(data: bytes) -> State:
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
    table = json.loads(data)
    if not isinstance(table, dict) or table.get("format") != STATE_FORMAT:
        raise ValueError(f"not a pgproxy grants state file (format {STATE_FORMAT})")
    state = State()
    state.merge(from_json(item) for item in [*table.get("grants", []), *table.get("requests", [])])
    return state


# --- stores ---------------------------------------------------------------------------

Change = Callable[[State], Iterable[Record]]


class StateFileError(Exception):
    """The state file cannot be read or written (the message names it, never its contents)."""


class MemoryStore:
    """One process's grants; gone at restart (grants.state_file empty)."""

    def __init__(self) -> None:
        self._state = State()
        self._version = 0

    def read(self) -> State:
        return self._state.copy()

    def version(self) -> object:
        return self._version

    async def update(self, change: Change) -> tuple[State, list[Record]]:
        state = self._state.copy()
        records = list(change(state))  # Refused: nothing is changed
        state.merge(records)
        state.prune(time.time())
        self._state, self._version = state, self._version + 1
        return state.copy(), records

    def merge(self, records: Iterable[Record]) -> None:
        """Records another worker made (over the control channel)."""
        if self._state.merge(records):
            self._version += 1


class FileStore:
    """A JSON state file shared by every worker: read when its identity (inode, size,
    mtime) changes; written whole under an exclusive flock of ``<file>.lock``, to a
    temporary file that replaces it, so a reader sees the old state or the new one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_path = path + ".lock"
        self._cached: tuple[object, State] | None = None

    def version(self) -> object:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"grants.state_file {self.path}: {exc.strerror}") from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self) -> State:
        version = self.version()
        if self._cached is not None and self._cached[0] == version:
            return self._cached[1].copy()
        state = self._read_file()
        self._cached = (version, state)
        return state.copy()

    def _read_file(self) -> State:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateFileError(f"grants.state_file {self.path}: cannot read: {exc.strerror}") from None
        try:
            return decode_state(data)
        except ValueError as exc:  # json.JSONDecodeError too
            raise StateFileError(f"grants.state_file {self.path}: not readable: {exc}") from None

    async def update(self, change: Change) -> tuple[State, list[Record]]:
        # In a thread: the flock may wait for another worker's write.
        return await asyncio.to_thread(self._update_locked, change)

    def _update_locked(self, change: Change) -> tuple[State, list[Record]]:
        try:
            lock = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateFileError(f"grants.state_file {self._lock_path}: cannot open: {exc.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read_file()
            records = list(change(state))  # Refused: nothing is written
            state.merge(records)
            state.prune(time.time())
            self._write(encode_state(state))
            self._cached = (self.version(), state)
            return state.copy(), records
        finally:
            os.close(lock)  # releases the flock

    def _write(self, data: bytes) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        temporary = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a crash
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise StateFileError(f"grants.state_file {self.path}: cannot write: {exc.strerror}") from None

    def merge(self, records: Iterable[Record]) -> None:
        """Another worker wrote the file already: read it again at the next ``read()`` (the
        file's identity alone could miss two writes within one clock tick)."""
        self._cached = None


def state_file_of(cfg) -> str:
    """grants.state_file, or pgproxy-grants.json beside the audit file."""
    return cfg.grants.state_file or os.path.join(os.path.dirname(os.path.abspath(cfg.audit.file)),
                                                 "pgproxy-grants.json")


def open_store(cfg):
    return FileStore(state_file_of(cfg))
