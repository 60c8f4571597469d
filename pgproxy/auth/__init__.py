"""Authenticators turn a (user, secret) pair into an Identity, or refuse."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    username: str            # the startup user name, as the credential proved it
    subject: str             # the IdP's stable subject ('sub'), or the DN for a directory
    issuer: str
    groups: tuple[str, ...]
    auth_method: str         # "jwt", later "ldap" or "service"
    expires_at: float | None = None
