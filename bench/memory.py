"""Scenario 7: resident memory of a proxy holding many idle, authenticated client connections.

Clients are raw protocol connections that log in and then stay idle. Bytes per client =
(RSS holding N clients − RSS after a warm-up) / N. In session pooling every logged-in
client holds a backend connection, for PgBouncer and pgproxy alike, so both run with a
pool of N.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from pgproxy.protocol import messages as msg


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _login(port: int, user: str, password: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(msg.startup_message({"user": user, "database": "bench"}))
    while True:
        kind, length = struct.unpack("!cI", await reader.readexactly(5))
        body = await reader.readexactly(length - 4)
        if kind == b"R":
            code = struct.unpack_from("!i", body)[0]
            if code == 3:
                writer.write(msg.password_message(password.encode() + b"\0"))
            elif code == 10:  # PgBouncer asks for SCRAM
                await _scram(reader, writer, password)
        elif kind == b"E":
            raise RuntimeError(f"login failed: {msg.parse_error_fields(body)}")
        elif kind == b"Z":
            return writer


async def _scram(reader, writer, password: str) -> None:
    from pgproxy.protocol.scram import ScramClient
    scram = ScramClient(password)
    writer.write(msg.sasl_initial_response(ScramClient.MECHANISM, scram.client_first()))
    for expected in (11, 12):
        kind, length = struct.unpack("!cI", await reader.readexactly(5))
        body = await reader.readexactly(length - 4)
        code = struct.unpack_from("!i", body)[0]
        if kind != b"R" or code != expected:
            raise RuntimeError(f"unexpected SCRAM reply {kind!r} {code}")
        if code == 11:
            writer.write(msg.password_message(scram.client_final(body[4:])))
        else:
            scram.verify_server_final(body[4:])


async def _hold(port: int, user: str, password: str, count: int, pid: int) -> tuple[int, int]:
    warm = [await _login(port, user, password) for _ in range(10)]
    for w in warm:
        w.close()
    await asyncio.sleep(0.5)
    before = rss_bytes(pid)
    writers = []
    for start in range(0, count, 50):
        writers += await asyncio.gather(*(_login(port, user, password) for _ in range(min(50, count - start))))
    await asyncio.sleep(0.5)
    after = rss_bytes(pid)
    for w in writers:
        w.close()
    await asyncio.sleep(0.5)
    return before, after


def measure(target, pid: int, count: int) -> dict:
    before, after = asyncio.run(_hold(target.port, target.user, target.password, count, pid))
    return {"clients": count, "rss_before": before, "rss_after": after,
            "bytes_per_client": round((after - before) / count)}
