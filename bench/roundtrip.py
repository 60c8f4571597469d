"""python -m bench.roundtrip — the Python a select-only round trip costs, without sockets.

pgbench numbers swing by ±15 % between rounds on a shared machine; this measures the part
of a transaction that is pgproxy's own Python, in one process and by its CPU clock, so a
change to the hot path shows in microseconds within a minute. It is not the benchmark
(``python -m bench`` is): no kernel, no uvloop, no other process.

What runs is the real code of a logged-in session from the client's bytes to the client's
reply — ``ClientSession._relay_client`` (the token's end, framing), the ``Relay`` and its
``Engine`` (guard, session-state check, pipeline), the audit record (``AuditLog``, writing
to a file in /dev/shm on its own thread) and the metrics — over a stand-in connection and
client transport that only keep the bytes written to them. The server's reply is the one
PostgreSQL sends to pgbench -S. Scenarios: ``simple`` (a new literal every time),
``prepared`` (Bind/Execute/Sync of a prepared statement), each in session and transaction
pooling.

    python -m bench.roundtrip                 # all scenarios, best of 5 rounds
    python -m bench.roundtrip --rounds 9 --number 20000 --only simple-session
    PGPROXY_PURE=1 python -m bench.roundtrip  # the same without the compiled modules
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time

from pgproxy import compiled
from pgproxy.audit import AuditLog
from pgproxy.backend.identity import ConnectionIdentity
from pgproxy.config import AuditSection
from pgproxy.frontend.engine import POOL_MODES, Engine
from pgproxy.frontend.relay import Relay
from pgproxy.frontend.session import ClientSession
from pgproxy.metrics import Metrics
from pgproxy.policy.guard import RolePolicy
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader

SCENARIOS = ("simple-session", "prepared-session", "simple-transaction", "prepared-transaction")
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = "
ROW = msg.message(b"D", struct.pack("!hi", 1, 4) + b"1234")
SIMPLE_REPLY = (msg.message(b"T", struct.pack("!h", 1) + b"abalance\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
                + ROW + msg.command_complete("SELECT 1") + msg.ready_for_query(b"I"))
PREPARED_REPLY = msg.message(b"2") + ROW + msg.command_complete("SELECT 1") + msg.ready_for_query(b"I")


class _Sink:
    """A transport or connection that keeps nothing but a count of what was written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False


class _Backend(_Sink):
    """What the engine and the relay use of a BackendConnection."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = 4242
        self.identity = ConnectionIdentity()
        self.params: dict[str, str] = {}
        self.txn_status = b"I"

    def attach(self, relay) -> bytes:
        return b""


class _Pool:
    def __init__(self, backend: _Backend) -> None:
        self.backend = backend

    def try_take(self, key):
        return self.backend

    def give_back(self, backend) -> None:
        pass


class _Server:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.metrics = Metrics()


class _Session:
    """The parts of ClientSession a logged-in round trip reads; its methods are ClientSession's."""

    _relay_client = ClientSession._relay_client

    def __init__(self, server: _Server, mode: str) -> None:
        self.server = server
        self.transport = _Sink()
        self.credential_ends_at = time.time() + 3600
        self._reader = MessageReader(1 << 20)
        self.audit_prefix = server.audit.session_prefix(
            {"session": "0123456789abcdef", "user": "alice", "role": "analyst", "auth_method": "jwt",
             "application_name": "pgbench"})
        person = ("analyst", "alice", ("staff",), "jwt", "alice-subject")
        engine = Engine(POOL_MODES[mode], "analyst", person, {"application_name": "alice via pgbench"},
                        policy=RolePolicy(), trail=server.audit)
        self.backend = _Backend()
        self.backend.identity.became(person, engine.key)
        self.relay = Relay(self, _Pool(self.backend), engine)
        if mode == "session":
            self.relay.hold(self.backend)

    def client_transport_bytes(self) -> int:
        return self.transport.written


def round_trips(scenario: str, number: int, audit: AuditLog) -> float:
    """CPU µs per round trip over ``number`` of them (after a warm-up)."""
    protocol, mode = scenario.split("-")
    session = _Session(_Server(audit), mode)
    if protocol == "prepared":
        setup = (msg.parse_message("P_1", SELECT + "$1", (23,)) + msg.describe_message("S", "P_1") + msg.SYNC)
        session._relay_client(setup)
        session.relay.server_data(msg.message(b"1") + msg.message(b"t", struct.pack("!hi", 1, 23))
                                  + msg.message(b"n") + msg.ready_for_query(b"I"))
        requests = [msg.bind_message("", "P_1", [str(i).encode()]) + msg.execute_message() + msg.SYNC
                    for i in range(1, 1001)]
        reply = PREPARED_REPLY
    else:
        requests = [msg.query(f"{SELECT}{i};") for i in range(1, 1001)]
        reply = SIMPLE_REPLY
    client, server_data = session._relay_client, session.relay.server_data

    def run(n: int) -> None:
        for i in range(n):
            client(requests[i % 1000])
            server_data(reply)

    run(2000)
    counters = session.server.metrics.counters
    ok = ("pgproxy_statements", "READ", "ok")
    before, sent = counters.get(ok, 0), session.client_transport_bytes()
    start = time.thread_time()
    run(number)
    spent = time.thread_time() - start
    if counters.get(ok, 0) - before != number or session.client_transport_bytes() == sent:
        raise SystemExit(f"{scenario}: {counters.get(ok, 0) - before} statements recorded for {number} round trips")
    return spent / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roundtrip", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario; the best is reported")
    parser.add_argument("--number", type=int, default=20_000, help="round trips per round")
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    scenarios = args.only.split(",") if args.only else SCENARIOS
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        audit = AuditLog(AuditSection(file=os.path.join(tmp, "audit.jsonl"), queue_size=10_000_000))
        try:
            loaded = compiled.loaded()
            print(f"compiled: {', '.join(loaded) or 'none'}; Python {sys.version.split()[0]}")
            for scenario in scenarios:
                times = sorted(round_trips(scenario, args.number, audit) for _ in range(args.rounds))
                print(f"{scenario:22} {times[0]:6.2f} µs per round trip (median {times[len(times) // 2]:.2f})",
                      flush=True)
        finally:
            audit.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
