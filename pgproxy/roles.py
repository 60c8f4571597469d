"""Identity -> database role: the first matching [[roles]] rule wins, else the default.

Pure policy, no I/O. A result of None means the identity may not connect.
"""

from __future__ import annotations

from pgproxy.auth import Identity
from pgproxy.config import RoleRule


def map_role(identity: Identity, rules: list[RoleRule], default_role: str) -> str | None:
    if identity.role:  # service accounts name their role themselves
        return identity.role
    groups = set(identity.groups)
    for rule in rules:
        if rule.any or (rule.user and rule.user == identity.username) or (rule.group and rule.group in groups):
            return rule.role.replace("{username}", identity.username)
    if default_role:
        return default_role.replace("{username}", identity.username)
    return None
