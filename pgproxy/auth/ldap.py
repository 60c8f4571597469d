"""LDAP and Active Directory passwords, checked live against the directory (ldap3).

Pass-through: nothing is stored. A login binds as the user — found by a DN template
(simple bind) or by a search under a service account (search then bind) — on a fresh
connection to the first server that answers (``urls`` in order). Then the user's entry
is read for its user name (``username_attribute``), groups (``memberOf``, or a group
search, optionally nested) and the account state: AD ``userAccountControl``
ACCOUNTDISABLE, OpenLDAP ppolicy ``pwdAccountLockedTime`` and the optional
``deny_filter`` refuse the login.

The identity is the entry's own user name and DN, not what the client typed: directories
match ``ALICE`` and `` alice`` to alice's entry, so the startup name must equal the
attribute's value (up to case with ``username_case_insensitive``, and then the session
is the directory's spelling) — see ``pgproxy.auth.canonical_username``.

Fail closed: an empty password is refused before any bind (an empty simple bind is an
anonymous bind that many servers accept); user names are escaped for filters and DNs,
and templates filled in one pass; no server reachable means "authentication service
unavailable". The client hears only that authentication failed; the reason goes to the
log, the password nowhere.

Open sessions are re-validated (``revalidate``, every ``revalidate_s``, driven by
pgproxy/revalidation.py): the service account reads the session's entry again, which must
still exist, name the same user, be neither disabled, locked nor denied, and its groups
are read anew; the caller ends the sessions that fail.

ldap3 blocks, so directory work runs in a bounded thread pool. Successful logins are
cached ``cache_ttl_s`` (≤ 60 s) under an HMAC of the startup user name and password with a
per-process key, only once that spelling passed the user-name check (which runs again on
every hit); failures for ``failure_cache_s``. Searches reuse pooled service-account
connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import ssl
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPSocketOpenError, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from pgproxy.auth import Identity, canonical_username, remember
from pgproxy.config import LdapSection
from pgproxy.errors import AuthUnavailable, PgProxyError, auth_failed, auth_unavailable, not_authorized

log = logging.getLogger("pgproxy.auth.ldap")

MAX_USERNAME_LENGTH = 256
MAX_PASSWORD_LENGTH = 1024
CACHE_SIZE = 10_000
NESTING_DEPTH = 8
ACCOUNTDISABLE = 0x2
INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
_STATE_ATTRIBUTES = ["memberOf", "userAccountControl", "pwdAccountLockedTime"]
_PLACEHOLDER = re.compile(r"\{(username|dn)\}")
NO_MATCH = r"\00"  # an escaped NUL byte: a filter value no user name or DN equals


class DirectoryDown(Exception):
    """No configured server could be used."""


@dataclass(frozen=True, slots=True)
class Standing:
    """A re-validated account: state "ok" (with its groups now), or "removed", "locked",
    "disabled" or "denied" with the reason (for the log)."""
    state: str
    detail: str = ""
    groups: tuple[str, ...] = ()


class LdapAuthenticator:
    method = "ldap"

    def __init__(self, cfg: LdapSection, bind_password: str | None, metrics=None) -> None:
        self._cfg = cfg
        self._bind_password = bind_password
        self._metrics = metrics
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                        ca_certs_file=cfg.ca_file or None)
        self._servers = [ldap3.Server(url, connect_timeout=cfg.timeout_s, get_info=ldap3.NONE,
                                      tls=tls if url.startswith("ldaps://") or cfg.start_tls else None)
                         for url in cfg.urls]
        self._executor = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="ldap")
        self._idle_service: list[ldap3.Connection] = []  # pooled search connections
        self._service_lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._ok: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self._failed: OrderedDict[bytes, float] = OrderedDict()

    async def authenticate(self, user: str, password: str) -> Identity:
        if not password:
            raise auth_failed(user, "empty password (an empty LDAP bind would be anonymous)")
        if len(user) > MAX_USERNAME_LENGTH or len(password) > MAX_PASSWORD_LENGTH \
                or any(ord(c) < 32 for c in user):
            raise auth_failed(user, "user name or password too long, or control characters in the user name")
        if not user or user != user.strip():
            raise auth_failed(user, f"leading or trailing whitespace in the user name {user!r}")
        key = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        hit = self._ok.get(key)
        if hit and now < hit[0]:
            self._check_name(user, hit[1])
            return hit[1]
        failed_until = self._failed.get(key)
        if failed_until and now < failed_until:
            raise auth_failed(user, "the same user and password failed a moment ago (failure cache)")
        started = time.perf_counter()
        result = "ok"
        try:
            identity = await asyncio.get_running_loop().run_in_executor(self._executor, self._verify, user, password)
            self._check_name(user, identity)
        except PgProxyError as exc:
            result = "unavailable" if isinstance(exc, AuthUnavailable) else "refused"
            if result == "refused":  # an outage is not the user's failure
                remember(self._failed, key, time.monotonic() + self._cfg.failure_cache_s, CACHE_SIZE)
            if exc.sqlstate == "28P01":
                raise auth_failed(user, exc.log_detail) from None
            raise
        finally:
            if self._metrics is not None:
                self._metrics.observe("pgproxy_directory_request_seconds", time.perf_counter() - started, result)
        if self._cfg.cache_ttl_s > 0:
            remember(self._ok, key, (time.monotonic() + self._cfg.cache_ttl_s, identity), CACHE_SIZE)
        return identity

    def _check_name(self, user: str, identity: Identity) -> None:
        canonical_username(user, identity.username, self._cfg.username_case_insensitive,
                           f"the directory's {self._cfg.username_attribute} of {identity.subject}")

    # --- in a worker thread --------------------------------------------------------

    def _verify(self, user: str, password: str) -> Identity:
        cfg = self._cfg
        try:
            if cfg.user_dn_template:
                dn = fill(cfg.user_dn_template, username=escape_rdn(user))
            else:
                dn = self._find_user(user)
            conn, server_url = self._open(dn, password)
            try:
                reader = conn if cfg.user_dn_template else None
                dn, entry = self._read_entry(reader, dn)  # from here on, the entry's own DN
                username = entry_username(entry, cfg.username_attribute, user)
                self._check_account(reader, user, dn, entry)
                groups = self._groups(reader, username, dn, entry)
            finally:
                _unbind(conn)
        except DirectoryDown as exc:
            raise auth_unavailable(f"LDAP: {exc}") from None
        except (LDAPException, OSError, ValueError, struct.error) as exc:  # whatever breaks: refuse
            raise auth_unavailable(f"LDAP operation failed: {type(exc).__name__}: {exc}") from None
        return Identity(username=username, subject=dn, issuer=server_url, groups=tuple(groups),
                        auth_method=self.method)

    def _open(self, dn: str, password: str) -> tuple[ldap3.Connection, str]:
        """Bind as ``dn`` on the first server that answers; wrong credentials are 28P01."""
        problems = []
        for server in self._servers:
            conn = ldap3.Connection(server, user=dn, password=password, read_only=True, raise_exceptions=False,
                                    receive_timeout=math.ceil(self._cfg.timeout_s),  # ldap3 wants whole seconds
                                    auto_referrals=False)
            try:
                conn.open()
                if self._cfg.start_tls and not conn.start_tls():
                    raise LDAPStartTLSError(conn.result.get("description", "StartTLS refused"))
                if conn.bind():
                    return conn, server.name
            except (LDAPSocketOpenError, LDAPStartTLSError, LDAPException, OSError) as exc:
                problems.append(f"{server.name}: {type(exc).__name__}: {exc}")
                _unbind(conn)
                continue
            code, description = conn.result.get("result"), conn.result.get("description", "")
            _unbind(conn)
            if code == INVALID_CREDENTIALS:
                raise auth_failed("", f"directory refused the bind for {dn} (wrong password, locked or "
                                      "no such user)")
            if code in (51, 52, 53):  # busy, unavailable, unwilling to perform: try the next one
                problems.append(f"{server.name}: bind answered {description}")
                continue
            raise auth_failed("", f"directory refused the bind for {dn}: {description} ({code})")
        raise DirectoryDown("no directory server usable: " + "; ".join(problems))

    def _find_user(self, user: str) -> str:
        cfg = self._cfg
        search = fill(cfg.search_filter, username=escape_filter_chars(user))
        with self._service() as conn:
            if not conn.search(cfg.search_base, search, ldap3.SUBTREE, attributes=[], size_limit=2):
                if conn.result.get("result") not in (0, 32):  # 32: no such object
                    raise DirectoryDown(f"user search failed: {conn.result.get('description')}")
            found = [e.entry_dn for e in conn.entries]
        if len(found) != 1:
            raise auth_failed(user, f"the user search found {len(found)} entries (need exactly one)")
        return found[0]

    def _read_entry(self, conn: ldap3.Connection | None, dn: str) -> tuple[str, dict]:
        """The entry's DN as the directory spells it, and its attributes (each a list)."""
        attributes = [*_STATE_ATTRIBUTES, self._cfg.username_attribute]
        with self._service(conn) as reader:
            if not reader.search(dn, "(objectClass=*)", ldap3.BASE, attributes=attributes):
                raise DirectoryDown(f"cannot read {dn}: {reader.result.get('description')}")
            found = [r for r in reader.response or [] if r.get("type") == "searchResEntry"]
            if len(found) != 1:
                raise DirectoryDown(f"reading {dn} returned {len(found)} entries")
            values = {k: [v] if isinstance(v, (str, bytes)) else list(v) for k, v in found[0]["attributes"].items()}
            return str(found[0].get("dn") or dn), values

    def _check_account(self, conn: ldap3.Connection | None, user: str, dn: str, entry: dict) -> None:
        problem = self._account_problem(conn, dn, entry)
        if problem is not None:
            raise not_authorized(user, problem[1])

    def _account_problem(self, conn: ldap3.Connection | None, dn: str, entry: dict) -> tuple[str, str] | None:
        """Why the account may not be used — ("disabled" | "locked" | "denied", the reason) —
        or None."""
        control = entry.get("userAccountControl") or [0]
        if int(control[0]) & ACCOUNTDISABLE:
            return "disabled", "the directory account is disabled (userAccountControl)"
        if entry.get("pwdAccountLockedTime"):
            return "locked", "the directory account is locked (pwdAccountLockedTime)"
        if self._cfg.deny_filter:
            with self._service(conn) as reader:
                reader.search(dn, self._cfg.deny_filter, ldap3.BASE, attributes=[])
                if reader.entries:
                    return "denied", "the directory account matches auth.ldap.deny_filter"
        return None

    # --- re-validation of open sessions (auth.ldap.revalidate_s) -------------------

    async def revalidate(self, identity: Identity) -> Standing:
        """How a directory session's account stands now, read as the service account
        (bind_dn; the user's password is not kept). Raises AuthUnavailable when the
        directory cannot be asked; the caller decides (revalidate_grace_s)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._standing, identity)

    def _standing(self, identity: Identity) -> Standing:
        cfg, dn = self._cfg, identity.subject
        try:
            with self._service() as reader:
                attributes = [*_STATE_ATTRIBUTES, cfg.username_attribute]
                if not reader.search(dn, "(objectClass=*)", ldap3.BASE, attributes=attributes):
                    if reader.result.get("result") == NO_SUCH_OBJECT:
                        return Standing("removed", f"the directory entry {dn} no longer exists")
                    raise DirectoryDown(f"cannot read {dn}: {reader.result.get('description')}")
                found = [r for r in reader.response or [] if r.get("type") == "searchResEntry"]
                if len(found) != 1:
                    raise DirectoryDown(f"reading {dn} returned {len(found)} entries")
                entry = {k: [v] if isinstance(v, (str, bytes)) else list(v)
                         for k, v in found[0]["attributes"].items()}
            try:
                username = entry_username(entry, cfg.username_attribute, identity.username)
            except PgProxyError as exc:
                return Standing("removed", exc.log_detail)
            if username != identity.username:
                return Standing("removed", f"the entry {dn} now names {username!r}, not {identity.username!r}")
            problem = self._account_problem(None, dn, entry)
            if problem is not None:
                return Standing(*problem)
            return Standing("ok", "", tuple(self._groups(None, username, dn, entry)))
        except DirectoryDown as exc:
            raise auth_unavailable(f"LDAP re-validation of {dn}: {exc}") from None
        except (LDAPException, OSError, ValueError, struct.error) as exc:
            raise auth_unavailable(f"LDAP re-validation of {dn} failed: {type(exc).__name__}: {exc}") from None

    def forget(self, subject: str) -> None:
        """Drop the cached logins of one directory entry (it failed its re-validation), so the
        login cache cannot let that person straight back in."""
        for key in [k for k, (_, identity) in self._ok.items() if identity.subject == subject]:
            del self._ok[key]

    def _groups(self, conn: ldap3.Connection | None, username: str, dn: str, entry: dict) -> list[str]:
        cfg = self._cfg
        if cfg.groups == "memberof":
            dns = [str(v) for v in entry.get("memberOf", [])]
        else:
            dns, frontier, seen = [], [dn], {dn.lower()}
            with self._service(conn) as reader:
                for depth in range(NESTING_DEPTH if cfg.nested_groups else 1):
                    next_frontier = []
                    for member in frontier:
                        search = fill(cfg.group_filter, dn=escape_filter_chars(member),
                                      username=escape_filter_chars(username) if depth == 0 else NO_MATCH)
                        reader.search(cfg.group_search_base, search, ldap3.SUBTREE, attributes=[])
                        for group in (e.entry_dn for e in reader.entries):
                            if group.lower() not in seen:
                                seen.add(group.lower())
                                dns.append(group)
                                next_frontier.append(group)
                    frontier = next_frontier
                    if not frontier:
                        break
        return [_group_name(g, cfg.group_name) for g in dns]

    def _service(self, user_conn: ldap3.Connection | None = None):
        """A connection to search with: the user's own (simple-bind mode) or a pooled
        service-account connection (search-then-bind mode)."""
        return _Borrowed(self, user_conn)

    def _take_service(self) -> ldap3.Connection:
        with self._service_lock:
            if self._idle_service:
                return self._idle_service.pop()
        conn, _ = self._open(self._cfg.bind_dn, self._bind_password or "")
        return conn

    def _give_back(self, conn: ldap3.Connection, healthy: bool) -> None:
        if healthy and not conn.closed:
            with self._service_lock:
                self._idle_service.append(conn)
                return
        _unbind(conn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._service_lock:
            while self._idle_service:
                _unbind(self._idle_service.pop())


class _Borrowed:
    def __init__(self, owner: LdapAuthenticator, user_conn: ldap3.Connection | None) -> None:
        self._owner, self._user_conn, self._conn = owner, user_conn, None

    def __enter__(self) -> ldap3.Connection:
        if self._user_conn is not None:
            return self._user_conn
        try:
            self._conn = self._owner._take_service()
        except PgProxyError as exc:  # the service account itself was refused: a setup problem
            raise DirectoryDown(f"the service account cannot bind: {exc.log_detail}") from None
        return self._conn

    def __exit__(self, exc_type, exc, _tb) -> None:
        if self._conn is not None:
            healthy = exc_type is None or issubclass(exc_type, PgProxyError)
            self._owner._give_back(self._conn, healthy and self._conn.result.get("result", 0) in (0, 32))


def fill(template: str, **values: str) -> str:
    """Put (already escaped) values into a filter or DN template in one pass, so a value
    that itself contains "{dn}" or "{username}" is never substituted again."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)


def entry_username(entry: dict, attribute: str, user: str) -> str:
    """The user name the directory holds in ``attribute`` (matched without regard to case, as
    LDAP names attributes); exactly one value, or the login is refused."""
    values = next((v for k, v in entry.items() if k.lower() == attribute.lower()), [])
    if len(values) != 1:
        raise auth_failed(user, f"the entry has {len(values)} values of {attribute} (readable by the proxy), "
                                "need exactly one to name the user")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise auth_failed(user, f"the entry's {attribute} is not UTF-8") from None
    return str(value)


def _group_name(dn: str, style: str) -> str:
    if style == "dn":
        return dn
    try:
        return parse_dn(dn)[0][1]
    except (LDAPException, IndexError, ValueError):
        return dn


def _unbind(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass
