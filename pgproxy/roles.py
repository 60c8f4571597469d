"""Identity -> database role: a grant in force for the person (grants.py) wins, then the
first matching [[roles]] rule, else the default; then the [[access]] conditions of that
role (``admit_role``), which may lower it to a rule's ``fallback_role`` instead of refusing.

Pure policy, no I/O. A result of None means the identity may not connect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pgproxy.auth import Identity
from pgproxy.config import RoleRule
from pgproxy.grants import Grant, in_force_for
from pgproxy.policy.access import MAX_FALLBACKS, Context, Unmet, evaluate


def map_role(identity: Identity, rules: list[RoleRule], default_role: str,
             grants: Iterable[Grant] = (), now: float = 0.0) -> str | None:
    """``grants``: the person's time-boxed grants; one in force at ``now`` replaces the
    mapping (the one granted last, if several), for that person alone."""
    if identity.role:  # service accounts name their role themselves
        return identity.role
    granted = in_force_for(grants, identity.username, now)
    if granted is not None:
        return granted.role
    groups = set(identity.groups)
    for rule in rules:
        if rule.any or (rule.user and rule.user == identity.username) or (rule.group and rule.group in groups):
            return rule.role.replace("{username}", identity.username)
    if default_role:
        return default_role.replace("{username}", identity.username)
    return None


@dataclass(frozen=True, slots=True)
class Admission:
    """What the [[access]] conditions make of a mapped role: the role the session takes
    (None: refused) and each lowering on the way, (from role, its unmet conditions, to role);
    ``unmet`` are the conditions of the last role tried when refused."""
    role: str | None
    lowered: tuple[tuple[str, tuple[Unmet, ...], str], ...] = ()
    unmet: tuple[Unmet, ...] = ()


def admit_role(identity: Identity, role: str, rules: list, context: Context, now: float) -> Admission:
    """Check ``role`` against the access rules; where a failing rule names a
    ``fallback_role``, try that role instead (its own rules apply), at most MAX_FALLBACKS
    times and never a role twice. Pure: ``now`` is the caller's clock."""
    lowered = []
    tried = {role}
    while True:
        unmet, fallback = evaluate(rules, identity, role, context, now)
        if not unmet:
            return Admission(role, tuple(lowered))
        if not fallback or fallback in tried or len(lowered) >= MAX_FALLBACKS:
            return Admission(None, tuple(lowered), tuple(unmet))
        lowered.append((role, tuple(unmet), fallback))
        tried.add(fallback)
        role = fallback
