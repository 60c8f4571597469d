"""The workers' control channel: one JSON request, one JSON answer, then close.

With several workers, whichever worker receives an HTTP request for metrics or the
admin API asks the others over this channel (``ProxyServer.gather``); the supervisor's
watchdog pings the workers through it. Each worker listens on an abstract-namespace
Unix stream socket (nothing on disk) named after the supervisor's pid and the worker's
index. Abstract sockets have no file permissions, so a peer is answered only when
SO_PEERCRED shows it runs as our own user. Requests and answers are bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct

log = logging.getLogger("pgproxy.control")

MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 2.0


def control_socket_name(group: int, index: int) -> str:
    return f"\0pgproxy-{group}-control-{index}"


async def serve(name: str, handler) -> asyncio.AbstractServer:
    """Answer requests on ``name`` with ``await handler(request) -> dict``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(name)
    sock.listen(64)
    sock.setblocking(False)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer_uid = struct.unpack("3i", writer.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
            if peer_uid != os.getuid():
                log.warning("control request from another user refused", extra={"uid": peer_uid})
                return
            request = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT_S))
            writer.write(json.dumps(await handler(request)).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError, asyncio.TimeoutError) as exc:  # ValueError: too long or not JSON
            log.warning("bad control request", extra={"reason": repr(exc)})
        finally:
            writer.close()

    return await asyncio.start_server(answer, sock=sock, limit=MAX_REQUEST_BYTES)


async def ask(name: str, request: dict, timeout: float = TIMEOUT_S) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, name), timeout)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_ANSWER_BYTES)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        return json.loads(await asyncio.wait_for(reader.readline(), timeout))
    finally:
        writer.close()


def ask_blocking(name: str, request: dict, timeout: float = TIMEOUT_S) -> dict:
    """For the supervisor, which has no event loop."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(name)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk or len(data) > MAX_ANSWER_BYTES:
                raise OSError("control answer cut short")
            data += chunk
        return json.loads(data)
