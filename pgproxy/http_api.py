"""The operations port: /metrics, /healthz, /readyz and the /admin API.

A deliberately small HTTP/1.1 server (one request per connection, bounded head, no
body) on ``http.listen``. With several workers each binds the port with SO_REUSEPORT;
whichever worker gets a request gathers the answer from all of them.

    GET  /metrics                      Prometheus text format, summed over workers
    GET  /healthz                      200 while the process answers
    GET  /readyz                       200 when every worker has the IdP's keys and can log in
                                       to PostgreSQL; 503 with the failing checks otherwise
    GET  /admin/sessions[?user=U]      every client session: person, role, address, ...
    GET  /admin/pools                  every backend pool, per worker
    POST /admin/terminate?user=U[&block_s=N]
                                       end every session of U now (57P01), optionally
                                       refusing U's logins for N seconds; audited
    POST /admin/unblock?user=U         lift such a block
    POST /admin/revoke?person=P|subject=S|jti=J&for=10m[&reason=...]
                                       end the matching sessions and refuse their logins
                                       until then, on every instance (control_admin.py)
    GET  /admin/revocations            active revocations and blocks, control database state
    POST /admin/unrevoke?id=ID|person=P|subject=S|jti=J
                                       lift a revocation early
    GET  /admin/grants[?all=1]         grants in force and requests waiting (grants_service.py)
    POST /admin/grants?user=U&role=R&for=1h&reason=...[&approver=A]
                                       grant R to U alone for that long; audited
    POST /admin/grants/end?id=G        end a grant early (its sessions end); audited
    GET  /access/requests              a person's own requests (an approver's: all waiting)
    POST /access/requests?role=R&for=1h&reason=...
                                       a person asks for R; an approver decides with
    POST /access/requests/approve?id=X   or /deny?id=X[&reason=...]

/admin needs ``Authorization: Bearer <http.admin_token>`` and, unless
``http.admin_remote``, a loopback client. Without a configured token /admin is off.
/access needs the person's own IdP token (``Authorization: Bearer <token>``, validated by
[auth.jwt]) from an address in server.plaintext_networks: this port has no TLS.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import urllib.parse

from pgproxy import metrics
from pgproxy.config import parse_listen

log = logging.getLogger("pgproxy.http")

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
MAX_BLOCK_S = 7 * 24 * 3600
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 503: "Service Unavailable"}


async def start(server) -> asyncio.AbstractServer:
    host, port = parse_listen(server.cfg.http.listen)
    api = HttpApi(server)
    return await asyncio.start_server(api.handle, host, port, reuse_address=True,
                                      reuse_port=server.multi_worker or None, limit=MAX_HEAD_BYTES)


class HttpApi:
    def __init__(self, server) -> None:
        self.server = server

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else "unix"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, content_type, body = await self._route(head.decode("latin-1"), client)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except Exception:
            log.exception("HTTP request failed", extra={"client": client})
            status, content_type, body = 503, "text/plain", b"internal error\n"
        try:
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _route(self, head: str, client: str) -> tuple[int, str, bytes]:
        request_line, *header_lines = head.split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        path = url.path
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/metrics":
            snapshots = [a for a in await self.server.gather({"op": "stats"}) if a is not None]
            return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render(snapshots)
        if path == "/readyz":
            answers = await self.server.gather({"op": "ready"})
            problems = [p for a in answers for p in (a["problems"] if a else ["a worker did not answer"])]
            return (503 if problems else 200), "application/json", _json({"ready": not problems,
                                                                          "problems": problems})
        if path.startswith("/admin/"):
            refusal = self._admin_refusal(headers, client)
            if refusal:
                log.warning("admin request refused", extra={"client": client, "path": path, "reason": refusal[1]})
                return refusal[0], "application/json", _json({"error": refusal[1]})
            return await self._admin(method, path, query, client)
        if path == "/access/requests" or path.startswith("/access/requests/"):
            # People, with their own IdP token (not the admin token): grants_service.py
            from pgproxy.grants import Refused
            from pgproxy.grants_service import access_route
            try:
                status, answer = await access_route(self.server, method, path, query, headers, client)
            except Refused as exc:
                status, answer = exc.status, {"error": exc.message}
            return status, "application/json", _json(answer)
        return 404, "text/plain", b"not found\n"

    def _admin_refusal(self, headers: dict, client: str) -> tuple[int, str] | None:
        token = self.server.cfg.admin_token
        if not token:
            return 403, "the admin API is off: set http.admin_token_file or http.admin_token_env"
        if not self.server.cfg.http.admin_remote and not _is_loopback(client):
            return 403, "the admin API answers loopback clients only (http.admin_remote)"
        scheme, _, offered = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered.encode(), token.encode()):
            return 401, "missing or wrong bearer token"
        return None

    async def _admin(self, method: str, path: str, query: dict, client: str) -> tuple[int, str, bytes]:
        server = self.server
        if path == "/admin/grants" or path.startswith("/admin/grants/"):  # grants_service.py
            from pgproxy.grants import Refused
            from pgproxy.grants_service import admin_route
            try:
                routed = await admin_route(server, method, path, query, client)
            except Refused as exc:
                routed = exc.status, {"error": exc.message}
            if routed is not None:
                return routed[0], "application/json", _json(routed[1])
        if method == "GET" and path == "/admin/sessions":
            answers = await server.gather({"op": "sessions", "user": query.get("user", "")})
            return 200, "application/json", _json([s for a in answers if a for s in a["sessions"]])
        if method == "GET" and path == "/admin/pools":
            answers = await server.gather({"op": "pools"})
            return 200, "application/json", _json([p for a in answers if a for p in a["pools"]])
        if method == "POST" and path in ("/admin/terminate", "/admin/unblock"):
            user = query.get("user", "")
            try:
                block_s = float(query.get("block_s", "0"))
            except ValueError:
                block_s = -1
            if not user or not 0 <= block_s <= MAX_BLOCK_S:
                return 400, "application/json", _json({"error": f"give user=NAME and 0 <= block_s <= {MAX_BLOCK_S}"})
            op = "terminate" if path == "/admin/terminate" else "unblock"
            # On every worker and, with [control] database, every instance; audited (control_admin.py).
            from pgproxy.control_admin import admin_terminate
            return await admin_terminate(server, op, user, block_s, client)
        from pgproxy import control_admin
        if path in control_admin.ROUTES:  # /admin/revoke, /admin/unrevoke, /admin/revocations
            return await control_admin.handle_admin(server, method, path, query, client)
        if path in ("/admin/sessions", "/admin/pools", "/admin/terminate", "/admin/unblock"):
            return 405, "application/json", _json({"error": f"{method} is not allowed here"})
        return 404, "application/json", _json({"error": "no such admin resource"})


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _json(value) -> bytes:
    return json.dumps(value, indent=1).encode() + b"\n"
