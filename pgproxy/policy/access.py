"""Access conditions: may this sign-in, from here, now, use this role? ([[access]] rules)

Pure: an identity, the connection's context and a clock in, the unmet conditions out; no
I/O, no reading of the time (``now`` is an argument, so tests choose it). The session
(frontend/session.py) evaluates them at login and whenever it takes a new mapped role,
through ``roles.admit_role``, which follows a failing rule's ``fallback_role``.

A rule applies to a session when its ``role`` equals the mapped role, its ``group`` is one
of the identity's groups, or both when both are given. Every applicable rule must be met,
each of its conditions: a condition left empty (or false, or 0) asks nothing. A claim the
condition needs and the credential lacks (an LDAP login has no ``amr``) is not met: fail
closed.

Each unmet condition carries a general message for the client ("this role requires
multi-factor sign-in": what to do, not the rule) and a precise one for the log (which
rule, which value). Conditions are listed in a fixed order; the client is told the first.

Rules are validated when the configuration loads (``check_rules``: networks, days, hours,
time zone, fallback cycles) and compiled once per configuration (``compiled``).
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgproxy.errors import ClientError, credential_ended, not_allowed

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_FALLBACKS = 8  # a chain of lowerings is at most this long (cycles are refused at load)

# condition -> what the client is told (the log says precisely what was unmet)
MESSAGES = {
    "tls": "this role requires an encrypted connection (TLS)",
    "client_certificate": "this role requires a client certificate",
    "network": "this role is not available from this network",
    "amr": "this role requires multi-factor sign-in",
    "acr": "this role requires a stronger sign-in",
    "auth_age": "this role requires a recent sign-in; sign in again",
    "time": "this role is not available at this time",
    "application": "this role is not available to this application",
    "client_id": "this role is not available to this client",
}


@dataclass(frozen=True, slots=True)
class Context:
    """What the connection says about where a sign-in comes from."""
    peer_ip: str                     # the client's address ("unix" for a Unix socket); behind a balancer, PROXY's
    tls: bool = False
    client_certificate: bool = False
    application_name: str = ""


@dataclass(frozen=True, slots=True)
class Unmet:
    condition: str  # a key of MESSAGES: the metric label and the audit's condition
    detail: str     # precise, for the log and the audit (never a secret)

    @property
    def message(self) -> str:
        return MESSAGES[self.condition]


@dataclass(frozen=True, slots=True)
class _Rule:
    index: int
    role: str
    group: str
    amr: frozenset[str]
    acr: frozenset[str]
    max_auth_age_s: float
    networks: tuple
    unix: bool
    tls: bool
    client_certificate: bool
    days: frozenset[int]     # weekday numbers (0 = Monday); empty: every day
    hours: tuple             # ((start minute, end minute), ...); empty: all day
    zone: ZoneInfo | None    # None when neither days nor hours are given
    applications: tuple[str, ...]
    client_ids: tuple[str, ...]
    fallback_role: str

    def where(self) -> str:
        who = " and ".join(f"{k} {v!r}" for k, v in (("role", self.role), ("group", self.group)) if v)
        return f"access[{self.index}] ({who})"


# --- evaluation ---------------------------------------------------------------------

def evaluate(rules, identity, role: str, context: Context, now: float) -> tuple[list[Unmet], str]:
    """The conditions of ``rules`` (config.AccessRule) that ``identity`` with ``context`` does
    not meet for ``role`` at ``now`` (seconds since 1970), and the fallback role of the first
    failing rule that names one ("" if none)."""
    unmet: list[Unmet] = []
    fallback = ""
    groups = set(identity.groups)
    for rule in compiled(rules):
        if rule.role and rule.role.replace("{username}", identity.username) != role:
            continue
        if rule.group and rule.group not in groups:
            continue
        found = _unmet(rule, identity, context, now)
        if found and rule.fallback_role and not fallback:
            fallback = rule.fallback_role.replace("{username}", identity.username)
        unmet += found
    order = list(MESSAGES)
    unmet.sort(key=lambda u: order.index(u.condition))  # stable: rule order within a condition
    return unmet, fallback


def _unmet(rule: _Rule, identity, ctx: Context, now: float) -> list[Unmet]:
    out = []
    where = rule.where()
    if rule.tls and not ctx.tls:
        out.append(Unmet("tls", f"{where}: the connection has no TLS"))
    if rule.client_certificate and not ctx.client_certificate:
        out.append(Unmet("client_certificate", f"{where}: no client certificate was presented"))
    if (rule.networks or rule.unix) and not in_networks(ctx.peer_ip, rule.networks, rule.unix):
        out.append(Unmet("network", f"{where}: client address {ctx.peer_ip} is in none of "
                                    f"{', '.join(map(str, rule.networks)) or '-'}{', unix' if rule.unix else ''}"))
    if rule.amr and not rule.amr & set(identity.amr):
        out.append(Unmet("amr", f"{where}: the sign-in's amr {list(identity.amr)} contains none of "
                                f"{sorted(rule.amr)} ({identity.auth_method} login)"))
    if rule.acr and identity.acr not in rule.acr:
        out.append(Unmet("acr", f"{where}: the sign-in's acr {identity.acr!r} is not one of {sorted(rule.acr)}"))
    if rule.max_auth_age_s:
        if identity.auth_time is None:
            out.append(Unmet("auth_age", f"{where}: the credential has no auth_time, and max_auth_age_s is "
                                         f"{rule.max_auth_age_s:g}"))
        elif now - identity.auth_time > rule.max_auth_age_s:
            out.append(Unmet("auth_age", f"{where}: signed in {now - identity.auth_time:.0f} s ago, more than "
                                         f"max_auth_age_s {rule.max_auth_age_s:g}"))
    if rule.zone is not None and not in_window(now, rule.days, rule.hours, rule.zone):
        local = datetime.datetime.fromtimestamp(now, rule.zone)
        out.append(Unmet("time", f"{where}: {local:%a %Y-%m-%d %H:%M} {rule.zone.key} is outside its days and "
                                 "hours"))
    if rule.applications and not _matches(ctx.application_name, rule.applications):
        out.append(Unmet("application", f"{where}: application_name {ctx.application_name[:128]!r} matches none "
                                        f"of {list(rule.applications)}"))
    if rule.client_ids and not _matches(identity.client_id, rule.client_ids):
        out.append(Unmet("client_id", f"{where}: client {identity.client_id[:128]!r} matches none of "
                                      f"{list(rule.client_ids)}"))
    return out


def in_networks(address: str, networks: tuple, unix: bool) -> bool:
    if address == "unix":
        return unix
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


def in_window(now: float, days: frozenset[int], hours: tuple, zone: ZoneInfo) -> bool:
    """Is ``now`` on one of ``days`` (the local day of that moment) and inside one of
    ``hours`` (minute ranges; a range whose end is before its start passes midnight)?"""
    local = datetime.datetime.fromtimestamp(now, zone)
    if days and local.weekday() not in days:
        return False
    if not hours:
        return True
    minute = local.hour * 60 + local.minute
    return any(start <= minute < end if start < end else (minute >= start or minute < end) for start, end in hours)


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


# --- errors the client meets --------------------------------------------------------

def access_refused(user: str, unmet: list[Unmet]) -> ClientError:
    """28000 naming the first unmet condition in general terms; every detail goes to the log."""
    return not_allowed(user, "; ".join(u.detail for u in unmet), "access_condition", why=unmet[0].message)


def token_expired(detail: str) -> ClientError:
    return credential_ended("token expired, sign in again", detail)


def sign_in_revoked(detail: str) -> ClientError:
    """A directory session that failed its re-check (locked, disabled, removed, or the
    directory could not be asked past the grace): the client hears only that it must sign in
    again."""
    return credential_ended("your sign-in is no longer valid, sign in again", detail)


# --- configuration ------------------------------------------------------------------

_cache: dict[int, tuple[list, tuple[_Rule, ...]]] = {}


def compiled(rules: list) -> tuple[_Rule, ...]:
    """The rules of one configuration, parsed once (the list object is the key: a reload
    brings a new list)."""
    hit = _cache.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit[1]
    result = tuple(_compile(i, r) for i, r in enumerate(rules))
    if len(_cache) >= 8:  # configurations of past reloads
        _cache.clear()
    _cache[id(rules)] = (rules, result)
    return result


def _compile(index: int, rule) -> _Rule:
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in rule.networks if n != "unix")
    zone = ZoneInfo(rule.timezone) if rule.days or rule.hours else None
    return _Rule(index=index, role=rule.role, group=rule.group, amr=frozenset(rule.require_amr),
                 acr=frozenset(rule.require_acr), max_auth_age_s=rule.max_auth_age_s, networks=networks,
                 unix="unix" in rule.networks, tls=rule.require_tls or rule.require_client_certificate,
                 client_certificate=rule.require_client_certificate, days=frozenset(parse_days(rule.days)),
                 hours=tuple(parse_hours(h) for h in rule.hours), zone=zone,
                 applications=tuple(rule.application_names), client_ids=tuple(rule.client_ids),
                 fallback_role=rule.fallback_role)


def parse_days(entries: list[str]) -> set[int]:
    """"mon", "mon-fri", "fri-mon" (wrapping) -> weekday numbers; ValueError names the entry."""
    out: set[int] = set()
    for entry in entries:
        first, _, last = entry.strip().lower().partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"{entry!r} is not a day (mon ... sun) or a range of days (mon-fri)")
        a, b = DAYS.index(first), DAYS.index(last or first)
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return out


def parse_hours(entry: str) -> tuple[int, int]:
    """"08:00-18:30" -> (480, 1110) minutes; the end may be 24:00; ValueError names the entry."""
    try:
        start, end = (_minute(part) for part in entry.split("-"))
    except ValueError:
        raise ValueError(f"{entry!r} is not HH:MM-HH:MM") from None
    if start == end or start == 24 * 60:
        raise ValueError(f"{entry!r} is an empty window")
    return start, end


def _minute(text: str) -> int:
    hours, minutes = text.strip().split(":")
    if len(minutes) != 2 or not (hours.isdigit() and minutes.isdigit()):
        raise ValueError(text)
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > 24 * 60:
        raise ValueError(text)
    return value


def check_rules(rules: list, pool_role: str, problems: list[str]) -> None:
    """Everything about [[access]] that types cannot say, each problem with its key."""
    fallbacks: dict[str, set[str]] = {}  # role -> the roles its rules may lower it to
    for i, rule in enumerate(rules):
        where = f"access[{i}]"
        if not (rule.role or rule.group):
            problems.append(f"{where}: give role, group or both")
        for j, network in enumerate(rule.networks):
            if network != "unix":
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError:
                    problems.append(f"{where}.networks[{j}]: not an address, network or \"unix\": {network!r}")
        try:
            parse_days(rule.days)
        except ValueError as exc:
            problems.append(f"{where}.days: {exc}")
        for j, hours in enumerate(rule.hours):
            try:
                parse_hours(hours)
            except ValueError as exc:
                problems.append(f"{where}.hours[{j}]: {exc}")
        try:
            ZoneInfo(rule.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where}.timezone: unknown time zone {rule.timezone!r}")
        if rule.max_auth_age_s < 0:
            problems.append(f"{where}.max_auth_age_s: must not be negative")
        for key in ("require_amr", "require_acr", "application_names", "client_ids"):
            if any(not v for v in getattr(rule, key)):
                problems.append(f"{where}.{key}: empty entries match nothing useful; remove them")
        if rule.fallback_role:
            if not rule.role:
                problems.append(f"{where}.fallback_role: needs role (a group's conditions follow the person to "
                                "any role)")
            elif rule.fallback_role == rule.role:
                problems.append(f"{where}.fallback_role: is the rule's own role")
            elif rule.fallback_role == pool_role:
                problems.append(f"{where}.fallback_role: is the pool role itself")
            else:
                fallbacks.setdefault(rule.role, set()).add(rule.fallback_role)
            leftover = rule.fallback_role.replace("{username}", "")
            if "{" in leftover or "}" in leftover:
                problems.append(f"{where}.fallback_role: the only placeholder is {{username}}")
    chain = _fallback_problem(fallbacks)
    if chain:
        problems.append(f"access: {chain}")


def _fallback_problem(fallbacks: dict[str, set[str]]) -> str:
    """A cycle or a chain longer than MAX_FALLBACKS among the fallback roles, or ""."""
    def walk(role: str, path: list[str]) -> str:
        if role in path:
            return f"fallback roles form a cycle ({' -> '.join([*path, role])})"
        if len(path) > MAX_FALLBACKS:
            return f"fallback roles chain more than {MAX_FALLBACKS} deep ({' -> '.join(path)})"
        for lower in sorted(fallbacks.get(role, ())):
            found = walk(lower, [*path, role])
            if found:
                return found
        return ""

    for start in sorted(fallbacks):
        found = walk(start, [])
        if found:
            return found
    return ""
