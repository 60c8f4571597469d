"""Authenticators turn a (user, secret) pair into an Identity, or refuse."""

from __future__ import annotations

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
