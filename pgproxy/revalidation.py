"""Sessions end when their credential does: token expiry and directory re-validation.

Driven by the server's janitor (``tick``, once a second), off the hot path:

* **Tokens.** A JWT or OAUTHBEARER session ends at its token's ``exp`` plus
  ``auth.jwt.leeway_s`` (``ClientSession.credential_ends_at``). The session itself checks
  before it passes on a client's messages; the janitor ends the idle ones, so an expired
  session does not sit open until its client speaks (``ClientSession.credential_tick``).
* **Directory sessions.** Every ``auth.ldap.revalidate_s`` one sweep reads, as the
  service account, the entry of every person with an open LDAP session on this worker
  (one read per person, at most half of ``auth.ldap.max_concurrency`` at once, so logins
  keep their threads). A session ends (28000) when its entry is gone, renamed, disabled,
  locked (ppolicy), matches ``deny_filter``, or has lost a group the session carries
  (``pgproxy.groups`` and the role mapping came from them). When the directory cannot be
  asked, a session keeps running until ``revalidate_grace_s`` after its last good check,
  then ends: fail closed. A sweep still running when the next is due delays it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pgproxy.errors import PgProxyError
from pgproxy.policy.access import sign_in_revoked

log = logging.getLogger("pgproxy.revalidation")


class Revalidator:
    """One per worker: the periodic directory re-checks of its sessions."""

    def __init__(self, server) -> None:
        self.server = server
        self._task: asyncio.Task | None = None
        self._due = 0.0  # monotonic time of the next sweep

    def tick(self, now: float) -> None:
        """From the janitor: the sessions whose token ended, then a sweep if one is due."""
        wall = time.time()
        for session in list(self.server.sessions()):
            session.credential_tick(wall)
        ldap_cfg = self.server.cfg.auth.ldap
        if self.server.ldap is None or ldap_cfg is None or not ldap_cfg.revalidate_s:
            return
        if self._task is not None or now < self._due:
            return
        self._due = now + ldap_cfg.revalidate_s
        self._task = asyncio.get_running_loop().create_task(self.sweep())
        self._task.add_done_callback(self._swept)

    def _swept(self, task: asyncio.Task) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("directory re-validation failed", exc_info=task.exception())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def sweep(self) -> None:
        people: dict[str, list] = {}
        for session in self.server.sessions():
            if session.logged_in and session.identity is not None and session.identity.auth_method == "ldap":
                people.setdefault(session.identity.subject, []).append(session)
        if not people:
            return
        limit = asyncio.Semaphore(max(1, self.server.cfg.auth.ldap.max_concurrency // 2))
        await asyncio.gather(*(self._check(sessions, limit) for sessions in people.values()))

    async def _check(self, sessions: list, limit: asyncio.Semaphore) -> None:
        server = self.server
        identity = sessions[0].identity
        async with limit:
            try:
                standing = await server.ldap.revalidate(identity)
            except PgProxyError as exc:
                self._unavailable(sessions, exc.log_detail)
                return
        now = time.monotonic()
        if standing.state != "ok":
            server.ldap.forget(identity.subject)
            server.metrics.count("pgproxy_directory_revalidations", standing.state)
            for session in sessions:
                session.end_credential(sign_in_revoked(f"directory re-validation: {standing.detail}"),
                                       f"account_{standing.state}")
            return
        server.metrics.count("pgproxy_directory_revalidations", "ok")
        for session in sessions:
            lost = sorted(set(session.identity.groups) - set(standing.groups))
            if lost:
                server.ldap.forget(identity.subject)
                session.end_credential(sign_in_revoked(
                    f"directory re-validation: {identity.subject} is no longer in {', '.join(lost)}"), "group_removed")
            else:
                session.revalidated_at = now

    def _unavailable(self, sessions: list, reason: str) -> None:
        server = self.server
        grace = server.cfg.auth.ldap.revalidate_grace_s
        server.metrics.count("pgproxy_directory_revalidations", "unavailable")
        now = time.monotonic()
        for session in sessions:
            if now - session.revalidated_at >= grace:
                session.end_credential(sign_in_revoked(
                    f"directory re-validation impossible past auth.ldap.revalidate_grace_s ({grace:g} s): {reason}"),
                    "directory_unavailable")
            else:
                log.warning("directory re-validation impossible; the session continues within the grace",
                            extra={"session": session.session_id, "user": session.user, "reason": reason})
