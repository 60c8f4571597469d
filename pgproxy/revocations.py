"""Revocations and blocks: who may not log in, and whose sessions end, until when.

Pure state, no I/O but the state file. One ``Revocation`` names its target by kind:

    kind     matches a login or session whose ...
    block    user name (startup or the identity's) is value   (``terminate --block``)
    person   identity's user name (or startup user name) is value
    subject  identity's subject ('sub', a directory DN) is value
    jti      token's id ('jti') is value

Each holds until ``expires_at`` (seconds since 1970: the instances of one deployment
compare it, so their clocks must agree within a second or so) unless lifted earlier.
Every worker keeps a ``RevocationSet``; the control plane (control_plane.py) fills it
from the control database, the admin API and the state file. ``pending`` marks what this
instance made while the control database could not be written: it is written there
when the database answers again (the id makes the write idempotent).

The state file (JSON, mode 0600, replaced atomically) keeps what is known across a
restart: {"version": 1, "synced_at": <time of the last read from the control database
or null>, "revocations": [...]}. It is bounded (``MAX_STATE_BYTES``) and read strictly:
an entry that does not parse is dropped with a log line, never half-applied.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

from pgproxy.errors import ClientError, ProxyFailure, not_allowed, terminated_by_operator

log = logging.getLogger("pgproxy.revocations")

KINDS = ("block", "person", "subject", "jti")
MAX_VALUE = 512          # characters of a target (user names, subjects, DNs, token ids)
MAX_REASON = 500
MAX_DURATION_S = 366 * 24 * 3600
MAX_REVOCATIONS = 100_000  # active at once; more is refused, so memory and the file stay bounded
MAX_STATE_BYTES = 64 * 1024 * 1024
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


@dataclass(frozen=True, slots=True)
class Revocation:
    id: str
    kind: str
    value: str
    expires_at: float
    created_at: float
    reason: str = ""
    origin: str = ""  # the instance that made it
    by: str = ""      # the admin client's address

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data) -> "Revocation":
        """Strict: ValueError for anything but a well-formed entry."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        try:
            rev = cls(id=data["id"], kind=data["kind"], value=data["value"], expires_at=float(data["expires_at"]),
                      created_at=float(data["created_at"]), reason=data.get("reason", ""),
                      origin=data.get("origin", ""), by=data.get("by", ""))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or mistyped field: {exc}") from None
        rev.check()
        return rev

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        for name in ("id", "value", "reason", "origin", "by"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} is not a string")
        if not self.value or len(self.value) > MAX_VALUE or not self.value.isprintable():
            raise ValueError(f"the target must be 1-{MAX_VALUE} printable characters")
        if not self.id or len(self.id) > 64 or len(self.reason) > MAX_REASON:
            raise ValueError("id or reason too long")
        if not (self.expires_at == self.expires_at and self.expires_at < 1e13):  # NaN, infinities
            raise ValueError("expires_at is not a time")

    def describe(self) -> str:
        return f"{self.kind} {self.value!r} until {_iso(self.expires_at)} (revocation {self.id})"

    def public(self) -> dict:
        """The admin API's view: times as ISO 8601 too."""
        return {**self.to_json(), "expires": _iso(self.expires_at), "created": _iso(self.created_at)}


def new_revocation(kind: str, value: str, duration_s: float, reason: str = "", origin: str = "", by: str = "",
                   now: float | None = None) -> Revocation:
    """A checked new entry (ValueError names what is wrong, for a 400)."""
    if not 1 <= duration_s <= MAX_DURATION_S:
        raise ValueError(f"the duration must be between 1 s and {MAX_DURATION_S // 86400} days")
    if not isinstance(reason, str) or len(reason) > MAX_REASON or not (reason.isprintable() or not reason):
        raise ValueError(f"the reason must be at most {MAX_REASON} printable characters")
    now = time.time() if now is None else now
    rev = Revocation(id=uuid.uuid4().hex, kind=kind, value=value, expires_at=now + duration_s, created_at=now,
                     reason=reason, origin=origin, by=by)
    rev.check()
    return rev


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '7d' -> seconds; ValueError otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h, 7d)")
    return float(match[1]) * _UNITS[match[2]]


class RevocationSet:
    """The active revocations and blocks one worker knows, indexed by (kind, value)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Revocation] = {}
        self._index: dict[tuple[str, str], set[str]] = {}
        self.pending: set[str] = set()  # ids made here and not yet in the control database

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def get(self, rev_id: str) -> Revocation | None:
        return self._by_id.get(rev_id)

    def add(self, rev: Revocation, pending: bool = False) -> bool:
        """True if it was new. Refuses (ValueError) past MAX_REVOCATIONS."""
        if rev.id in self._by_id:
            return False
        if len(self._by_id) >= MAX_REVOCATIONS:
            raise ValueError(f"too many active revocations (at most {MAX_REVOCATIONS})")
        self._by_id[rev.id] = rev
        self._index.setdefault((rev.kind, rev.value), set()).add(rev.id)
        if pending:
            self.pending.add(rev.id)
        return True

    def remove(self, rev_id: str) -> Revocation | None:
        rev = self._by_id.pop(rev_id, None)
        if rev is not None:
            ids = self._index.get((rev.kind, rev.value))
            if ids is not None:
                ids.discard(rev_id)
                if not ids:
                    del self._index[(rev.kind, rev.value)]
            self.pending.discard(rev_id)
        return rev

    def lift(self, kind: str, value: str) -> list[Revocation]:
        """Remove every entry for (kind, value); the removed ones."""
        return [r for r in (self.remove(i) for i in list(self._index.get((kind, value), ()))) if r]

    def replace(self, known: list[Revocation], now: float | None = None) -> tuple[list[Revocation], list[Revocation]]:
        """The control database's full list replaces ours; entries still pending stay (they
        are not there yet). Returns (added, removed before their expiry)."""
        now = time.time() if now is None else now
        incoming = {r.id: r for r in known if r.expires_at > now}
        removed = [r for i, r in list(self._by_id.items())
                   if i not in incoming and i not in self.pending and r.expires_at > now]
        for rev in removed:
            self.remove(rev.id)
        added = []
        for rev in incoming.values():
            self.pending.discard(rev.id)  # it made it there
            try:
                if self.add(rev):
                    added.append(rev)
            except ValueError:
                log.error("too many active revocations: some from the control database are not applied",
                          extra={"limit": MAX_REVOCATIONS})
                break
        return added, removed

    def prune(self, now: float | None = None) -> list[Revocation]:
        """Drop what has expired; the dropped entries (for the audit)."""
        now = time.time() if now is None else now
        return [r for r in (self.remove(i) for i, rev in list(self._by_id.items()) if rev.expires_at <= now) if r]

    def match(self, username: str, subject: str = "", token_id: str = "", startup_user: str = "",
              now: float | None = None) -> Revocation | None:
        """The entry (any) that refuses this identity, or None."""
        now = time.time() if now is None else now
        keys = [("block", username), ("person", username)]
        if startup_user and startup_user != username:
            keys += [("block", startup_user), ("person", startup_user)]
        if subject:
            keys.append(("subject", subject))
        if token_id:
            keys.append(("jti", token_id))
        for key in keys:
            for rev_id in self._index.get(key, ()):
                rev = self._by_id[rev_id]
                if rev.expires_at > now:
                    return rev
        return None

    def match_identity(self, identity, startup_user: str = "", now: float | None = None) -> Revocation | None:
        if identity is None:
            return self.match(startup_user, now=now) if startup_user else None
        return self.match(identity.username, identity.subject, getattr(identity, "token_id", ""), startup_user, now)

    def active(self, now: float | None = None) -> list[Revocation]:
        now = time.time() if now is None else now
        return sorted((r for r in self._by_id.values() if r.expires_at > now), key=lambda r: r.created_at)


# --- errors ---------------------------------------------------------------------------

def revoked_login(user: str, rev: Revocation) -> ClientError:
    """28000, as for a block: the client learns only that it may not connect."""
    if rev.kind == "block":
        return not_allowed(user, f"blocked by an operator (admin API): {rev.describe()}", "blocked")
    return not_allowed(user, f"revoked by an operator: {rev.describe()}", "revoked")


def revoked_session(rev: Revocation) -> ProxyFailure:
    return terminated_by_operator(f"revoked by an operator: {rev.describe()}")


# --- the state file ---------------------------------------------------------------------

def save_state(path: str, revocations: RevocationSet, synced_at: float | None, instance: str = "") -> None:
    """Replace the file atomically (a reader sees the old or the new one, never half)."""
    data = {"version": 1, "instance": instance, "synced_at": synced_at,
            "revocations": [dict(r.to_json(), pending=r.id in revocations.pending) for r in revocations.active()]}
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".pgproxy-state-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def load_state(path: str, now: float | None = None) -> tuple[RevocationSet, float | None]:
    """(what the file knows, when it was last synced with the control database); an empty
    set if there is no file. OSError/ValueError if it cannot be read or is not ours."""
    revs = RevocationSet()
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return revs, None
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("revocations"), list):
        raise ValueError("not a pgproxy state file (version 1)")
    now = time.time() if now is None else now
    for i, entry in enumerate(data["revocations"]):
        try:
            rev = Revocation.from_json({k: v for k, v in entry.items() if k != "pending"}
                                       if isinstance(entry, dict) else entry)
        except ValueError as exc:
            log.error("state file entry ignored", extra={"file": path, "entry": i, "reason": str(exc)})
            continue
        if rev.expires_at > now:
            try:
                revs.add(rev, pending=bool(entry.get("pending")))
            except ValueError:
                break
    synced_at = data.get("synced_at")
    return revs, float(synced_at) if isinstance(synced_at, (int, float)) and not isinstance(synced_at, bool) else None


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
