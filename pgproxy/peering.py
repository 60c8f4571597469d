"""Cancel requests across instances: keys that name their instance, and forwarding between peers.

Behind a TCP load balancer a client's CancelRequest is a new connection and may land on
any instance. As PgBouncer's peering does, each instance has a number (``control.peer_id``,
1-127) that its cancel keys carry, and an instance that receives a key of another passes
it on. The process id of a cancel key (31 bits) is laid out as

    peer_id = 0, one worker       random (1 .. 2**31-1)                 (as before)
    peer_id = 0, several workers  worker << 24 | random 24 bits          (as before)
    peer_id > 0                   peer_id << 24 | worker << 18 | random 18 bits

The secret half of the key (4 bytes, 32 for protocol 3.2 clients) is what authorises a
cancel, as in PostgreSQL; the process id only finds the session.

A plain CancelRequest has no room for authentication, so instances do not send each other
CancelRequests: they talk on their own port (``control.peer_listen``) in one fixed frame,

    "PGPXCNL1" | time (ms, int64) | nonce (16) | target peer_id (int16) | pid (int32)
               | key length (int16) | key (4-256) | HMAC-SHA256(peer secret, all before)

one frame per TCP connection, read with a deadline and a size bound before anything is
allocated. A frame is acted on only if its MAC verifies with the shared
``control.peer_secret_file``, its time is within ``MAX_SKEW_S`` of ours, its nonce was not
seen in that window, and it names this instance; then the key goes to the owning worker
exactly as a local CancelRequest would (an instance never forwards a forwarded key, so a
misconfiguration cannot loop). The peer port thus lets only holders of the peer secret
make this instance act, and a captured frame cannot be replayed later. The cancel key
still crosses the network between instances in the clear, as it does between client and
proxy: keep the peer port on the private network of the instances.

Peer addresses: ``control.peers`` (static, by peer_id) or the heartbeats in the control
schema (control_plane.py). Forwarding is fire and forget, bounded in time (``TIMEOUT_S``)
and in number (``MAX_IN_FLIGHT``); what cannot be delivered is logged and dropped, which
the client sees as a cancel that had no effect — PostgreSQL's own contract.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import time

from pgproxy.config import parse_listen
from pgproxy.protocol.messages import MAX_CANCEL_KEY, MIN_CANCEL_KEY

log = logging.getLogger("pgproxy.peering")

MAX_PEER_ID = 127
PEER_SHIFT = 24
WORKER_SHIFT_PEERED = 18
WORKER_SHIFT_LOCAL = 24  # peer_id = 0 and several workers: the layout from before peering

MAGIC = b"PGPXCNL1"
_HEAD = struct.Struct("!8sq16shih")  # magic, time ms, nonce, target, pid, key length
HEAD_SIZE = _HEAD.size  # 40 bytes
MAC_BYTES = 32
MAX_FRAME = HEAD_SIZE + MAX_CANCEL_KEY + MAC_BYTES
MAX_SKEW_S = 30.0
TIMEOUT_S = 2.0
MAX_IN_FLIGHT = 64
MAX_INCOMING = 256  # peer connections read at once; more are closed unread
MAX_NONCES = 100_000


# --- cancel key process ids ---------------------------------------------------------

def cancel_pid(peer_id: int, worker: int, several_workers: bool, taken=()) -> int:
    """A fresh process id for a cancel key (see the layout above), not in ``taken``."""
    while True:
        if peer_id:
            pid = (peer_id << PEER_SHIFT) | (worker << WORKER_SHIFT_PEERED) | \
                (secrets.randbelow((1 << WORKER_SHIFT_PEERED) - 1) + 1)
        elif several_workers:
            pid = (worker << WORKER_SHIFT_LOCAL) | (secrets.randbelow((1 << WORKER_SHIFT_LOCAL) - 1) + 1)
        else:
            pid = secrets.randbelow(2**31 - 1) + 1
        if pid not in taken:
            return pid


def cancel_owner(pid: int, peer_id: int) -> tuple[int, int]:
    """(the peer_id, the worker index) a process id names, in this instance's layout
    (peer_id 0: the peer is always 0)."""
    if pid < 0:
        return -1, -1
    if peer_id:
        return pid >> PEER_SHIFT, (pid >> WORKER_SHIFT_PEERED) & ((1 << (PEER_SHIFT - WORKER_SHIFT_PEERED)) - 1)
    return 0, pid >> WORKER_SHIFT_LOCAL


# --- frames ---------------------------------------------------------------------------

def encode_frame(secret: bytes, target: int, pid: int, key: bytes, now: float | None = None,
                 nonce: bytes | None = None) -> bytes:
    if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
        raise ValueError("cancel key length out of range")
    now = time.time() if now is None else now
    body = _HEAD.pack(MAGIC, int(now * 1000), nonce or secrets.token_bytes(16), target, pid, len(key)) + key
    return body + hmac.new(secret, body, hashlib.sha256).digest()


class FrameError(ValueError):
    """A frame that is refused; the message says why (for the log)."""


def frame_length(head: bytes) -> int:
    """The whole frame's length from its first ``_HEAD.size`` bytes (FrameError if not ours)."""
    magic, _, _, _, _, key_length = _HEAD.unpack(head)
    if magic != MAGIC:
        raise FrameError("not a pgproxy peer frame")
    if not MIN_CANCEL_KEY <= key_length <= MAX_CANCEL_KEY:
        raise FrameError(f"cancel key length {key_length} out of range")
    return _HEAD.size + key_length + MAC_BYTES


class FrameChecker:
    """Verifies frames for one instance: MAC, time window, replay, target."""

    def __init__(self, secret: bytes, peer_id: int) -> None:
        self._secret = secret
        self.peer_id = peer_id
        self._nonces: dict[bytes, float] = {}  # nonce -> its frame's time, within the window
        self._pruned_at = 0.0

    def check(self, frame: bytes, now: float | None = None) -> tuple[int, bytes]:
        """(pid, key) of a frame to act on; FrameError otherwise."""
        if len(frame) < _HEAD.size + MAC_BYTES or len(frame) != frame_length(frame[:_HEAD.size]):
            raise FrameError("frame length does not match its header")
        body, mac = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
        if not hmac.compare_digest(hmac.new(self._secret, body, hashlib.sha256).digest(), mac):
            raise FrameError("bad MAC (another peer secret?)")
        _, millis, nonce, target, pid, _ = _HEAD.unpack_from(body)
        now = time.time() if now is None else now
        sent = millis / 1000
        if abs(now - sent) > MAX_SKEW_S:
            raise FrameError(f"frame time is {now - sent:.0f} s off (clocks out of step, or a replay)")
        self._forget_old(now)
        if nonce in self._nonces:
            raise FrameError("replayed frame")
        if target != self.peer_id:
            raise FrameError(f"frame is for peer {target}, this is peer {self.peer_id}")
        if len(self._nonces) >= MAX_NONCES:
            raise FrameError("too many frames in the replay window")
        self._nonces[nonce] = sent
        return pid, body[_HEAD.size:]

    def _forget_old(self, now: float) -> None:
        if len(self._nonces) >= 1024 and now - self._pruned_at >= 1.0:  # at most once a second
            self._pruned_at = now
            self._nonces = {n: t for n, t in self._nonces.items() if abs(now - t) <= MAX_SKEW_S}


# --- the peer port and the forwarder ------------------------------------------------

class Peering:
    """One per worker: the listener on control.peer_listen and the forwarder."""

    def __init__(self, server) -> None:
        cfg = server.cfg.control
        self.server = server
        self.peer_id = cfg.peer_id
        self.static = {int(k): v for k, v in cfg.peers.items()}
        self._secret = server.cfg.peer_secret or b""
        self._checker = FrameChecker(self._secret, self.peer_id) if self._secret else None
        self._in_flight = 0
        self._incoming = 0
        self.forwarded = self.received = self.refused = 0

    async def serve(self) -> asyncio.AbstractServer | None:
        listen = self.server.cfg.control.peer_listen
        if not listen or self._checker is None:
            return None
        host, port = parse_listen(listen)
        return await asyncio.start_server(self._handle, host, port, reuse_address=True,
                                          reuse_port=self.server.multi_worker or None, limit=MAX_FRAME)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        if self._incoming >= MAX_INCOMING:
            self.refused += 1
            writer.close()
            return
        self._incoming += 1
        try:
            head = await asyncio.wait_for(reader.readexactly(_HEAD.size), TIMEOUT_S)
            rest = await asyncio.wait_for(reader.readexactly(frame_length(head) - _HEAD.size), TIMEOUT_S)
            pid, key = self._checker.check(head + rest)
        except FrameError as exc:
            self.refused += 1
            log.warning("peer cancel frame refused", extra={"client": client, "reason": str(exc)})
            return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as exc:
            self.refused += 1
            log.info("peer cancel frame incomplete", extra={"client": client, "reason": type(exc).__name__})
            return
        finally:
            self._incoming -= 1
            writer.close()
        self.received += 1
        self.server.cancel(pid, key, f"peer {client}", from_peer=True)

    def address_of(self, peer_id: int) -> str | None:
        address = self.static.get(peer_id)
        if address is None:
            address = self.server.control_plane.peer_address(peer_id)
        return address

    def forward(self, target: int, pid: int, key: bytes) -> None:
        """Pass a cancel key to the instance it names (fire and forget, bounded)."""
        if not self._secret:
            log.warning("cancel request for another instance dropped: control.peer_secret_file is not set",
                        extra={"peer": target})
            return
        address = self.address_of(target)
        if address is None:
            log.warning("cancel request for an unknown instance dropped", extra={"peer": target})
            return
        if self._in_flight >= MAX_IN_FLIGHT:
            log.warning("too many cancel requests in flight to peers; dropped", extra={"peer": target})
            return
        self._in_flight += 1
        frame = encode_frame(self._secret, target, pid, key)
        task = asyncio.get_running_loop().create_task(self._send(address, frame, target))
        task.add_done_callback(lambda _t: self._done())

    def _done(self) -> None:
        self._in_flight -= 1

    async def _send(self, address: str, frame: bytes, target: int) -> None:
        try:
            host, port = parse_listen(address)
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT_S)
            try:
                writer.write(frame)
                await asyncio.wait_for(writer.drain(), TIMEOUT_S)
            finally:
                writer.close()
            self.forwarded += 1
            log.info("cancel request forwarded to its instance", extra={"peer": target, "address": address})
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log.warning("cannot forward a cancel request to its instance",
                        extra={"peer": target, "address": address, "reason": repr(exc)})


def advertised_address(cfg) -> str:
    """Where other instances reach this one's peer port."""
    control = cfg.control
    if control.peer_advertise:
        return control.peer_advertise
    if not control.peer_listen:
        return ""
    host, port = parse_listen(control.peer_listen)
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
