"""One worker's part of time-boxed elevation (the model and rules are in grants.py).

* Mapping: ``ProxyServer.role_for`` asks ``of(person)`` for the person's grants and
  remembers (``attach``) a session that logged in under a granted role.
* The janitor's ``tick`` (once a second) re-reads the store when it changed and ends
  every attached session whose grant is no longer in force (FATAL 28000); worker 0
  also marks grants that reached their end and requests that lapsed, and audits them.
* Operations (the admin API and people's own access requests, routed here by
  http_api.py) go to the store as one atomic update each, are audited and counted, POST
  the optional webhook, and are pushed to every worker (``ProxyServer.gather`` op
  ``grants_sync``), which re-reads and ends sessions at once.

People authenticate the /access routes with their own IdP token (the [auth.jwt]
validator, as at login); the HTTP port has no TLS, so only from server.plaintext_networks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request

from pgproxy import grants as g
from pgproxy.errors import ClientError, PgProxyError, credential_ended

log = logging.getLogger("pgproxy.grants")

WEBHOOK_MAX_ANSWER = 64 * 1024


def grant_ended(grant: g.Grant, why: str) -> ClientError:
    return credential_ended(f'your temporary access to role "{grant.role}" has ended',
                            f"grant {grant.id} of role {grant.role} {why}")


def iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def view_grant(grant: g.Grant, now: float) -> dict:
    return {"id": grant.id, "user": grant.person, "role": grant.role, "start": iso(grant.start),
            "end": iso(grant.end), "remaining_s": max(0, round(grant.over_at - now)) if grant.in_force(now) else 0,
            "in_force": grant.in_force(now), "reason": grant.reason, "requester": grant.requester,
            "approver": grant.approver, "source": grant.source, "request": grant.request,
            "ended_at": iso(grant.ended_at), "ended_by": grant.ended_by}


def view_request(request: g.AccessRequest) -> dict:
    return {"id": request.id, "requester": request.requester, "role": request.role,
            "duration_s": request.duration_s, "reason": request.reason, "filed_at": iso(request.filed_at),
            "state": request.state, "decided_by": request.decided_by, "decided_at": iso(request.decided_at),
            "decision_reason": request.decision_reason, "grant": request.grant}


class GrantService:
    def __init__(self, server) -> None:
        self.server = server
        self.store = g.open_store(server.cfg)
        try:
            self.state = self.store.read()  # a state file we cannot read stops the start
        except g.StateFileError as exc:
            from pgproxy.config import ConfigError
            raise ConfigError([str(exc)]) from None
        self._version = self.store.version()
        self._sessions: dict[object, str] = {}  # session -> the grant it logged in under
        self._tasks: set[asyncio.Task] = set()
        self._noting = False

    # --- mapping and sessions -----------------------------------------------------------

    def of(self, person: str) -> list[g.Grant]:
        return [grant for grant in self.state.grants.values() if grant.person == person]

    def attach(self, session, grant: g.Grant) -> None:
        self._sessions[session] = grant.id

    def detach(self, session) -> None:
        self._sessions.pop(session, None)

    def describe(self, session) -> dict:
        grant = self.state.grants.get(self._sessions.get(session, ""))
        return {"grant": grant.id, "grant_ends": iso(grant.over_at)} if grant else {}

    def tick(self, now: float) -> None:
        self._refresh()
        self._end_sessions(now)
        if self.server.worker_index == 0 and not self._noting and g.lapsed(self.state, now, self.rules):
            self._noting = True
            self._spawn(self._note_lapses())

    def _refresh(self, force: bool = False) -> None:
        try:
            version = self.store.version()
            if force or version != self._version:
                self.state, self._version = self.store.read(), version
        except g.StateFileError as exc:  # keep what we have: grants still end on time
            log.error("cannot read the grants state; keeping the last one read", extra={"reason": str(exc)})

    def _end_sessions(self, now: float) -> int:
        ended = 0
        for session, grant_id in list(self._sessions.items()):
            grant = self.state.grants.get(grant_id)
            if grant is not None and grant.in_force(now):
                continue
            del self._sessions[session]
            if grant is not None and session.role != grant.role:
                continue  # its [[access]] conditions lowered it to a fallback role: the grant gave it nothing
            why = "was ended by an operator" if grant is not None and grant.ended_at is not None else "expired"
            session.end(grant_ended(grant, why) if grant is not None else
                        credential_ended("your temporary access has ended", f"grant {grant_id} is no longer known"))
            ended += 1
        if ended:
            self.server.metrics.count("pgproxy_grant_sessions_ended", n=ended)
        return ended

    def sync(self, records: list) -> dict:
        """The control op ``grants_sync``: another worker (or this one) changed the store."""
        try:
            self.store.merge(g.from_json(item) for item in records)
        except ValueError as exc:
            log.warning("bad grants_sync records", extra={"reason": str(exc)})
        self._refresh(force=True)
        return {"ended": self._end_sessions(time.time())}

    # --- introspection ------------------------------------------------------------------

    @property
    def rules(self) -> g.Rules:
        return g.Rules.of(self.server.cfg)

    def gauges(self, now: float) -> list:
        attached = [["pgproxy_grant_sessions", [], len(self._sessions)]]
        if self.server.worker_index != 0:  # the store's counts once, not once per worker
            return attached
        active = sum(grant.in_force(now) for grant in self.state.grants.values())
        pending = sum(r.state == "pending" and r.filed_at + self.rules.request_timeout_s > now
                      for r in self.state.requests.values())
        return attached + [["pgproxy_grants_active", [], active], ["pgproxy_access_requests_pending", [], pending]]

    def view(self, everything: bool = False) -> dict:
        now = time.time()
        grants = sorted(self.state.grants.values(), key=lambda x: x.start)
        requests = sorted(self.state.requests.values(), key=lambda x: x.filed_at)
        rules = self.rules
        return {"grants": [view_grant(x, now) for x in grants if everything or x.in_force(now)],
                "requests": [view_request(r) for r in requests
                             if everything or (r.state == "pending" and r.filed_at + rules.request_timeout_s > now)]}

    # --- operations ---------------------------------------------------------------------

    async def _apply(self, change) -> tuple[list, dict]:
        """One atomic change of the store, then pushed to every worker: (records, what the
        push did: sessions ended, workers that did not answer)."""
        if not self.server.audit.available:  # nothing the trail cannot record (as for logins)
            raise g.Refused(503, "the audit trail is unavailable")
        try:
            _state, records = await self.store.update(change)
        except g.StateFileError as exc:
            log.error("cannot write the grants state", extra={"reason": str(exc)})
            raise g.Refused(503, "the grants state cannot be written") from None
        answers = await self.server.gather({"op": "grants_sync", "records": [g.to_json(r) for r in records]})
        return records, {"sessions_ended": sum(a["ended"] for a in answers if a),
                         "workers_unreachable": sum(a is None for a in answers)}

    async def grant(self, person: str, role: str, duration_s: float, reason: str, approver: str,
                    client: str) -> tuple[g.Grant, dict]:
        rules, now = self.rules, time.time()
        (grant,), pushed = await self._apply(lambda state: [g.new_grant(person, role, duration_s, reason, rules, now,
                                                                approver=approver)])
        self._audit_grant("granted", grant, client)
        self.server.metrics.count("pgproxy_grants", "granted")
        self._notify("grant.granted", f"{grant.person} was granted {grant.role} until {iso(grant.end)} by "
                                      f"{grant.approver}: {grant.reason}", grant=view_grant(grant, now))
        return grant, pushed

    async def end(self, grant_id: str, client: str) -> tuple[g.Grant, dict]:
        (grant,), pushed = await self._apply(lambda state: [g.end_grant(state, grant_id, "admin", time.time())])
        self._audit_grant("ended", grant, client, sessions_ended=pushed["sessions_ended"])
        self.server.metrics.count("pgproxy_grants", "ended")
        self._notify("grant.ended", f"the grant of {grant.role} to {grant.person} was ended early",
                     grant=view_grant(grant, time.time()))
        return grant, pushed

    async def file(self, identity, role: str, duration_s: float, reason: str,
                   client: str) -> tuple[g.AccessRequest, dict]:
        rules, now = self.rules, time.time()
        try:
            (request,), pushed = await self._apply(lambda state: [g.file_request(
                state, identity.username, identity.subject, role, duration_s, reason, rules, now)])
        except g.Refused as exc:
            self.refused(identity.username, "file", exc.message, client)
            raise
        self._audit_request("filed", request, client)
        self.server.metrics.count("pgproxy_access_requests", "filed")
        self._notify("access_request.filed", f"{request.requester} asks for role {request.role} for "
                                             f"{request.duration_s:g} s: {request.reason} (request {request.id})",
                     request=view_request(request))
        return request, pushed

    async def decide(self, identity, request_id: str, approve: bool, reason: str,
                     client: str) -> tuple[g.AccessRequest, g.Grant | None, dict]:
        rules, now = self.rules, time.time()
        try:
            records, pushed = await self._apply(lambda state: [r for r in g.decide(
                state, request_id, identity.username, identity.subject, identity.groups, approve, reason, rules, now)
                if r is not None])
        except g.Refused as exc:
            self.refused(identity.username, "approve" if approve else "deny", exc.message, client,
                         request=request_id)
            raise
        request = next(r for r in records if isinstance(r, g.AccessRequest))
        grant = next((r for r in records if isinstance(r, g.Grant)), None)
        self._audit_request(request.state, request, client, grant=grant)
        self.server.metrics.count("pgproxy_access_requests", request.state)
        if grant is not None:
            self._audit_grant("granted", grant, client)
            self.server.metrics.count("pgproxy_grants", "granted")
        self._notify(f"access_request.{request.state}",
                     f"{request.decided_by} {request.state} {request.requester}'s request for role {request.role}"
                     + (f" (until {iso(grant.end)})" if grant else "") + (f": {reason}" if reason else ""),
                     request=view_request(request), grant=view_grant(grant, now) if grant else None)
        return request, grant, pushed

    def refused(self, actor: str, action: str, why: str, client: str, **extra) -> None:
        """A person's request to file or decide that broke a rule: audited, counted, logged."""
        self.server.metrics.count("pgproxy_access_requests", "refused")
        self.server.audit.event("access_request", action="refused", actor=actor, attempted=action, reason=why,
                                client=client, **extra)
        log.warning("access request refused", extra={"actor": actor, "attempted": action, "reason": why,
                                                      "client": client})

    async def _note_lapses(self) -> None:
        """Worker 0: mark and audit grants that reached their end and requests that lapsed."""
        try:
            rules = self.rules
            _state, records = await self.store.update(lambda state: g.lapsed(state, time.time(), rules))
            self._refresh(force=True)
            for record in records:
                if isinstance(record, g.Grant):
                    self._audit_grant("expired", record, "")
                    self.server.metrics.count("pgproxy_grants", "expired")
                else:
                    self._audit_request("lapsed", record, "")
                    self.server.metrics.count("pgproxy_access_requests", "lapsed")
                    self._notify("access_request.lapsed", f"{record.requester}'s request for role {record.role} "
                                                          "lapsed undecided", request=view_request(record))
        except g.StateFileError as exc:
            log.error("cannot note expired grants", extra={"reason": str(exc)})
        finally:
            self._noting = False

    # --- audit and webhook --------------------------------------------------------------

    def _audit_grant(self, action: str, grant: g.Grant, client: str, **extra) -> None:
        fields = {"grant": grant.id, "user": grant.person, "role": grant.role, "start": iso(grant.start),
                  "end": iso(grant.end), "duration_s": round(grant.end - grant.start, 3), "reason": grant.reason,
                  "requester": grant.requester, "approver": grant.approver, "source": grant.source,
                  **({"request": grant.request} if grant.request else {}),
                  **({"ended_at": iso(grant.ended_at), "ended_by": grant.ended_by} if grant.ended_at else {}),
                  **({"client": client} if client else {}), **extra}
        self.server.audit.event("grant", action=action, **fields)
        log.warning(f"grant {action}", extra={k: v for k, v in fields.items() if k != "reason"})

    def _audit_request(self, action: str, request: g.AccessRequest, client: str, grant: g.Grant | None = None) -> None:
        fields = {"request": request.id, "requester": request.requester, "role": request.role,
                  "duration_s": request.duration_s, "reason": request.reason, "filed_at": iso(request.filed_at)}
        if request.state != "pending":
            fields.update(approver=request.decided_by, decided_at=iso(request.decided_at),
                          decision_reason=request.decision_reason)
        if grant is not None:
            fields.update(grant=grant.id, start=iso(grant.start), end=iso(grant.end))
        if client:
            fields["client"] = client
        self.server.audit.event("access_request", action=action, **fields)
        log.info(f"access request {action}", extra={k: v for k, v in fields.items() if k != "reason"})

    def _notify(self, event: str, text: str, **payload) -> None:
        """POST the webhook (grants.webhook_url) in the background: bounded, failures logged,
        never in the way. ``text`` makes Slack- and Mattermost-style incoming webhooks work."""
        url = self.server.cfg.grants.webhook_url
        if not url:
            return
        body = json.dumps({"event": event, "text": text, **{k: v for k, v in payload.items() if v is not None}},
                          default=str).encode()
        self._spawn(asyncio.to_thread(_post, url, body, self.server.cfg.grants.webhook_timeout_s), event)

    def _spawn(self, coro, webhook_event: str = "") -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                if webhook_event:
                    log.warning("grants webhook failed", extra={"event": webhook_event, "reason": repr(t.exception())})
                else:
                    log.error("grants task failed", exc_info=t.exception())

        task.add_done_callback(done)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _post(url: str, body: bytes, timeout: float) -> None:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "pgproxy"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        answer.read(WEBHOOK_MAX_ANSWER)


# --- HTTP routes (http_api.py hands these paths here) ------------------------------------

def _duration(query: dict) -> float:
    try:
        return g.parse_duration(query.get("for", ""))
    except ValueError as exc:
        raise g.Refused(400, f"for: {exc}") from None


async def admin_route(server, method: str, path: str, query: dict, client: str) -> tuple[int, dict] | None:
    """/admin/grants (the admin token is checked already); None: not a grants path."""
    grants = server.grants
    if path == "/admin/grants" and method == "GET":
        return 200, grants.view(everything=query.get("all", "") in ("1", "true", "yes"))
    if path == "/admin/grants" and method == "POST":
        grant, pushed = await grants.grant(query.get("user", ""), query.get("role", ""), _duration(query),
                                           query.get("reason", ""), query.get("approver", ""), client)
        return _answer({"grant": view_grant(grant, time.time())}, pushed)
    if path == "/admin/grants/end" and method == "POST":
        grant, pushed = await grants.end(query.get("id", ""), client)
        return _answer({"grant": view_grant(grant, time.time())}, pushed)
    if path in ("/admin/grants", "/admin/grants/end"):
        return 405, {"error": f"{method} is not allowed here"}
    return None


async def access_route(server, method: str, path: str, query: dict, headers: dict,
                       client: str) -> tuple[int, dict]:
    """/access/requests...: a person with their own IdP token files, lists and decides requests."""
    routes = {("POST", "/access/requests"), ("GET", "/access/requests"),
              ("POST", "/access/requests/approve"), ("POST", "/access/requests/deny")}
    if (method, path) not in routes:
        known = {p for _, p in routes}
        return (405, {"error": f"{method} is not allowed here"}) if path in known else (404, {"error": "not found"})
    identity = await _person(server, headers, query, client)
    grants = server.grants
    if method == "GET":
        view = grants.view()
        rules = grants.rules
        if not g.may_approve(identity.groups, rules):  # a person sees their own requests only
            view = {"requests": [r for r in grants.view(everything=True)["requests"]
                                 if r["requester"] == identity.username],
                    "grants": [x for x in view["grants"] if x["user"] == identity.username]}
        return 200, view
    if path == "/access/requests":
        request, pushed = await grants.file(identity, query.get("role", ""), _duration(query),
                                            query.get("reason", ""), client)
        return _answer({"request": view_request(request)}, pushed)
    request, grant, pushed = await grants.decide(identity, query.get("id", ""), path.endswith("/approve"),
                                         query.get("reason", ""), client)
    answer = {"request": view_request(request)}
    if grant is not None:
        answer["grant"] = view_grant(grant, time.time())
    return _answer(answer, pushed)


def _answer(body: dict, pushed: dict) -> tuple[int, dict]:
    """Done and kept: a worker that did not hear of it reads the state file within a second."""
    body.update(pushed)
    return 200, body


async def _person(server, headers: dict, query: dict, client: str):
    """The identity behind ``Authorization: Bearer <IdP token>``, validated as at login."""
    from pgproxy.tls import plaintext_allowed
    if not plaintext_allowed(client, server.cfg.server.plaintext_networks):
        raise g.Refused(403, "this port has no TLS: send tokens only from server.plaintext_networks")
    if server.jwt is None:
        raise g.Refused(403, "access requests need [auth.jwt]: sign in with your IdP token")
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise g.Refused(401, "send your IdP token as Authorization: Bearer <token>")
    user = query.get("user", "") or _claimed_user(token, server.cfg.auth.jwt.username_claim)
    try:
        identity = await server.jwt.authenticate(user, token)
    except PgProxyError as exc:
        log.warning("access request: authentication failed", extra={"client": client, "reason": exc.log_detail})
        raise g.Refused(401, "authentication failed") from None
    if server.is_blocked(identity.username):
        raise g.Refused(403, "you are blocked by an operator")
    return identity


def _claimed_user(token: str, claim: str) -> str:
    """The user name the token claims (unverified: authenticate() checks it matches)."""
    import jwt as pyjwt
    if len(token) > 16_384:
        return ""
    try:
        value = pyjwt.decode(token, options={"verify_signature": False}).get(claim)
    except pyjwt.PyJWTError:
        return ""
    return value if isinstance(value, str) else ""
