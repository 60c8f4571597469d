"""The admin API and CLI of revocations and blocks (the state itself: control_plane.py).

    POST /admin/revoke?person=P|subject=S|jti=J&for=10m[&reason=...]
    GET  /admin/revocations
    POST /admin/unrevoke?id=ID|person=P|subject=S|jti=J
    POST /admin/terminate?user=U[&block_s=N], POST /admin/unblock?user=U

A revocation is applied on this instance's workers first (their sessions end at once),
then written to the control database, whose trigger tells every other instance. A lift
goes the other way round: the control database first (else the entry would come back at
the next read), then the workers. Each is audited once, by the instance that was asked.
Status: 200 done everywhere; 202 done here and to be shared when the control database
answers again; 503 some worker did not answer, or a lift could not reach the database.
"""

from __future__ import annotations

import asyncio
import json
import logging

from pgproxy.control_plane import SCHEMA, SCHEMA_SQL, ControlLink, ControlUnavailable, connect, control_tls
from pgproxy.errors import PgProxyError
from pgproxy.protocol import messages as msg
from pgproxy.revocations import new_revocation, parse_duration

log = logging.getLogger("pgproxy.control_plane")


# --- the admin API (http_api.py routes /admin/revoke, /admin/unrevoke, /admin/revocations) ------

ROUTES = ("/admin/revoke", "/admin/unrevoke", "/admin/revocations")


def _answer(status: int, value) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value, indent=1).encode() + b"\n"


def _target(query: dict) -> tuple[str, str] | None:
    chosen = [(k, query[k]) for k in ("person", "subject", "jti") if query.get(k)]
    return chosen[0] if len(chosen) == 1 else None


async def handle_admin(server, method: str, path: str, query: dict, client: str) -> tuple[int, str, bytes]:
    plane = server.control_plane
    if path == "/admin/revocations":
        if method != "GET":
            return _answer(405, {"error": f"{method} is not allowed here"})
        return _answer(200, {**plane.status(), "revocations": [
            {**r.public(), "pending": r.id in plane.revocations.pending} for r in plane.revocations.active()]})
    if method != "POST":
        return _answer(405, {"error": f"{method} is not allowed here"})
    if path == "/admin/revoke":
        return await _revoke(server, query, client)
    return await _unrevoke(server, query, client)


async def _revoke(server, query: dict, client: str) -> tuple[int, str, bytes]:
    plane = server.control_plane
    target = _target(query)
    if target is None:
        return _answer(400, {"error": "give exactly one of person=NAME, subject=SUB or jti=ID"})
    try:
        rev = new_revocation(target[0], target[1], parse_duration(query.get("for", "")), query.get("reason", ""),
                             origin=plane.instance, by=client)
    except ValueError as exc:
        return _answer(400, {"error": f"{exc} (for=10m, reason=...)"})
    if not server.audit.available:  # nothing the trail cannot record
        return _answer(503, {"error": "audit trail unavailable"})
    # This instance's workers first (their sessions end now), then the other instances.
    answers = await server.gather({"op": "revoke", "revocation": rev.to_json(), "pending": plane.configured})
    shared = await plane.publish(rev)
    if not plane.configured or not shared:
        plane.save()
    result = {"revocation": rev.public(), "sessions_ended": sum(a.get("ended", 0) for a in answers if a),
              "workers": len(answers), "workers_unreachable": sum(a is None for a in answers),
              "instance": plane.instance,
              "shared": shared if plane.configured else None}
    errors = [a["error"] for a in answers if a and a.get("error")]
    if errors:
        return _answer(503, {**result, "error": errors[0]})
    server.audit.event("revoke", revocation=rev.id, kind=rev.kind, target=rev.value, reason=rev.reason,
                       expires=rev.public()["expires"], client=client, instance=plane.instance,
                       sessions_ended=result["sessions_ended"], shared=result["shared"])
    log.warning("admin revoke", extra={"revocation": rev.id, "kind": rev.kind, "target": rev.value,
                                       "client": client, "ended": result["sessions_ended"]})
    if result["workers_unreachable"]:
        return _answer(503, result)
    if plane.configured and not shared:
        result["warning"] = ("the control database is unreachable: applied on this instance, and written there "
                             "(so shared with the other instances) once it answers")
        return _answer(202, result)
    return _answer(200, result)


async def _unrevoke(server, query: dict, client: str) -> tuple[int, str, bytes]:
    target = _target(query)
    rev_id = query.get("id", "")
    if bool(target) == bool(rev_id):
        return _answer(400, {"error": "give id=ID, or one of person=NAME, subject=SUB or jti=ID"})
    kind, value = target or ("", "")
    return await lift(server, kind, value, rev_id, client, "unrevoke")


async def lift(server, kind: str, value: str, rev_id: str, client: str, event: str) -> tuple[int, str, bytes]:
    """Unrevoke and unblock: the control database first (else the entry would come back at
    the next read), then every worker of this instance."""
    plane = server.control_plane
    if plane.configured:
        try:
            await plane.lift_shared(kind, value, rev_id, client)
        except ControlUnavailable as exc:
            return _answer(503, {"error": "the control database is unreachable: nothing was lifted (a lift made "
                                          "here alone would come back at the next read); try again",
                                 "reason": str(exc)})
    answers = await server.gather({"op": "unrevoke", "id": rev_id, "kind": kind, "value": value})
    lifted = sorted({i for a in answers if a for i in a.get("lifted", ())})
    plane.save()
    result = {"lifted": lifted, "workers": len(answers), "workers_unreachable": sum(a is None for a in answers),
              "instance": plane.instance}
    target = {"target_user": value} if kind == "block" else {"revocation": rev_id or None, "kind": kind or None,
                                                              "target": value or None}
    server.audit.event(event, **target, lifted=lifted, client=client, instance=plane.instance)
    log.warning(f"admin {event}", extra={"kind": kind, "target": value, "revocation": rev_id, "client": client,
                                         "lifted": len(lifted)})
    return _answer(503 if result["workers_unreachable"] else 200, result)


async def admin_terminate(server, op: str, user: str, block_s: float, client: str) -> tuple[int, str, bytes]:
    """POST /admin/terminate and /admin/unblock, on every worker of every instance."""
    plane = server.control_plane
    if op == "unblock":
        status, content_type, body = await lift(server, "block", user, "", client, "admin_unblock")
        answer = json.loads(body)
        answer.update(user=user, unblocked=bool(answer.get("lifted")), sessions_ended=0)
        return status, content_type, json.dumps(answer, indent=1).encode() + b"\n"
    block = None
    if block_s > 0:
        try:
            block = new_revocation("block", user, block_s, "terminate --block", origin=plane.instance, by=client)
        except ValueError as exc:
            return _answer(400, {"error": str(exc)})
    answers = await server.gather({"op": "terminate", "user": user, "block_s": block_s,
                                   "block": block.to_json() if block else None, "pending": plane.configured})
    shared = None
    if plane.configured:
        shared = (await plane.publish(block) if block else True) and await plane.broadcast_terminate(user)
    if block and not shared:
        plane.save()  # (a pending block too: it holds across a restart while it waits)
    result = {"user": user, "sessions_ended": sum(a["ended"] for a in answers if a), "workers": len(answers),
              "workers_unreachable": sum(a is None for a in answers), "blocked_s": block_s,
              "instance": plane.instance, "shared": shared}
    server.audit.event("admin_terminate", target_user=user, client=client,
                       **{k: v for k, v in result.items() if k != "user"})
    log.warning("admin terminate", extra={"target_user": user, "client": client, **result})
    if result["workers_unreachable"]:
        return _answer(503, result)
    return _answer(202 if shared is False else 200, result)


# --- the CLI (pgproxy admin revoke/revocations/unrevoke, pgproxy control init/sql) -------------

def admin_request(args) -> tuple[str, dict]:
    """(method, query) of the admin API request for ``pgproxy admin revoke|unrevoke|revocations``;
    ValueError with the usage problem."""
    if args.action == "revocations":
        return "GET", {}
    targets = [(k, v) for k, v in (("person", args.user), ("subject", args.subject), ("jti", args.jti)) if v]
    if args.action == "revoke":
        if len(targets) != 1 or not args.duration:
            raise ValueError("revoke needs one of PERSON, --subject S or --jti J, and --for DURATION (e.g. 10m)")
        query = {targets[0][0]: targets[0][1], "for": args.duration}
        if args.reason:
            query["reason"] = args.reason
        return "POST", query
    if bool(targets) == bool(args.id) or len(targets) > 1:
        raise ValueError("unrevoke needs one of PERSON, --subject S, --jti J or --id ID")
    return "POST", ({"id": args.id} if args.id else dict(targets))


def cmd_control(args, cfg) -> int:
    import sys
    if args.control_command == "sql":
        sys.stdout.write(SCHEMA_SQL)
        return 0
    if not cfg.control.database:
        print("error: control.database is not set", file=sys.stderr)
        return 1

    async def init() -> None:
        link = await connect(cfg, cfg.control_password, control_tls(cfg), lambda *_: None, lambda: None)
        try:
            await asyncio.wait_for(_simple(link, SCHEMA_SQL), cfg.control.connect_timeout_s * 4)
        finally:
            link.close()

    try:
        asyncio.run(init())
    except (PgProxyError, ControlUnavailable, OSError, asyncio.TimeoutError) as exc:
        print(f"error: {exc.log_detail if isinstance(exc, PgProxyError) else exc}", file=sys.stderr)
        return 1
    print(f"schema {SCHEMA} is ready in database {cfg.control.database}", file=sys.stderr)
    return 0


async def _simple(link: ControlLink, sql: str) -> None:
    """A simple-protocol script (several statements) on a link."""
    async with link._lock:
        link.transport.write(msg.query(sql))
        error = None
        while True:
            while not link._replies:
                if link.lost:
                    raise ControlUnavailable("connection lost")
                link._waiter = asyncio.get_running_loop().create_future()
                await link._waiter
                link._waiter = None
            kind, raw = link._replies.popleft()
            if kind == 0x45:
                error = error or msg.parse_error_fields(raw[5:])
            elif kind == 0x5A:
                break
        if error:
            raise ControlUnavailable(f"{error.get('C')} {error.get('M')}")
