"""Authenticators turn a (user, secret) pair into an Identity, or refuse.

The identity's user name is canonical: the authority's own spelling of it (the
directory entry's user-name attribute, the token's user-name claim), never the
startup packet's. Blocks, terminations, [[roles]] user rules, the audit trail and
``pgproxy.user`` all compare user names exactly, so a second spelling of one person
(``ALICE``, ``alice ``) must never become a second identity: it is refused, or — where
the operator opted into case-insensitive names — replaced by the canonical spelling.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pgproxy.errors import auth_failed


@dataclass(frozen=True, slots=True)
class Identity:
    username: str            # who is audited: the authority's spelling (see canonical_username), or svc:<name>
    subject: str             # the IdP's stable subject ('sub'), or the DN for a directory
    issuer: str
    groups: tuple[str, ...]
    auth_method: str         # "jwt", "oauthbearer", "ldap" or "service"
    expires_at: float | None = None
    role: str = ""           # a service account's own role; others are mapped by [[roles]]
    # Who acts, for the audit (a person, or an agent on a person's behalf): the OAuth client
    # the token was issued to ('azp' or 'client_id'), and RFC 8693's 'act' (delegation) chain
    # as the subjects that act, outermost first.
    client_id: str = ""
    actors: tuple[str, ...] = ()
    # How strongly the person signed in, for [[access]] conditions (policy/access.py): the
    # token's 'amr' (RFC 8176 methods), 'acr' and 'auth_time' (seconds since 1970). A
    # directory or service-account login has none of them.
    amr: tuple[str, ...] = ()
    acr: str = ""
    auth_time: float | None = None
    token_id: str = ""       # the token's 'jti', for revocation by token id (revocations.py)


def canonical_username(startup: str, canonical: object, case_insensitive: bool, source: str) -> str:
    """The user name an identity carries: ``canonical`` (the authority's value, from ``source``).

    ``startup`` must equal it exactly, or up to case with ``case_insensitive``. Leading or
    trailing whitespace never matches: directories ignore it when they compare, which is
    how `` alice`` bound as alice. A refusal is 28P01 like any failed login; the log says
    which spelling met which."""
    if not isinstance(canonical, str) or not canonical:
        raise auth_failed(startup, f"{source} is missing or not a non-empty string")
    if startup != startup.strip() or canonical != canonical.strip():
        raise auth_failed(startup, f"leading or trailing whitespace in the user name {startup!r} or in "
                                   f"{source} ({canonical!r})")
    if startup == canonical:
        return canonical
    if case_insensitive and startup.casefold() == canonical.casefold():
        return canonical
    raise auth_failed(startup, f"{source} names another user ({canonical!r}, not {startup!r}, "
                               f"{'even ignoring case' if case_insensitive else 'compared exactly'})")


def remember(cache: OrderedDict, key, value, limit: int) -> None:
    """Put ``key`` in a bounded cache of authentication results, dropping the oldest."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
