"""Authenticators turn a (user, secret) pair into an Identity, or refuse."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    username: str            # who is audited: the startup user name, or svc:<name> for a service account
    subject: str             # the IdP's stable subject ('sub'), or the DN for a directory
    issuer: str
    groups: tuple[str, ...]
    auth_method: str         # "jwt", "ldap" or "service"
    expires_at: float | None = None
    role: str = ""           # a service account's own role; others are mapped by [[roles]]


def remember(cache: OrderedDict, key, value, limit: int) -> None:
    """Put ``key`` in a bounded cache of authentication results, dropping the oldest."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
