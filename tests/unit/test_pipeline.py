"""Pipeline: the server's replies matched to what the client is owed, bytes in, bytes out."""

from __future__ import annotations

import random
import struct

from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import ServerStreamScanner
from pgproxy.protocol.pipeline import (BIND, CLOSE, EXECUTE, FORWARD, GUARD, PARSE, QUERY, QUIET, SWALLOW, SWITCH,
                                       SYNC, SYNTH, WANTED, Expected, Pipeline)


class Owner:
    def __init__(self) -> None:
        self.events = []

    def parameter(self, body):
        self.events.append(("parameter", body.split(b"\0")[0]))

    def ready(self, status, idle):
        self.events.append(("ready", status, idle))

    def statement_done(self, statement, outcome):
        self.events.append(("done", statement, outcome))

    def statement_error(self, statement, body):
        self.events.append(("statement_error", statement))

    def failed(self, entry, body, statement):
        self.events.append(("failed", entry.kind))

    def skipped(self, entry):
        self.events.append(("skipped", entry.kind))

    def skipped_quietly(self, entry):
        self.events.append(("skipped_quietly", entry.kind))

    def switch_confirmed(self):
        self.events.append(("confirmed",))

    def switch_failed(self, body):
        self.events.append(("switch_failed",))


class Statement:
    def __init__(self):
        self.tags, self.sqlstate = [], None


def m(kind: bytes, body: bytes = b"") -> bytes:
    return msg.message(kind, body)


PARSE_OK, BIND_OK, CLOSE_OK = m(b"1"), m(b"2"), m(b"3")
ROW = m(b"D", struct.pack("!hi", 1, 1) + b"1")
SELECT_1 = m(b"C", b"SELECT 1\0")
READY = msg.ready_for_query(b"I")
ERROR = m(b"E", b"SERROR\0C42P01\0Mrelation does not exist\0\0")


def run(pipeline: Pipeline, stream: bytes, cuts: list[int] | None = None) -> bytes:
    """Feed ``stream`` cut at ``cuts``; return what the client would receive."""
    scanner = ServerStreamScanner(WANTED, 1 << 20)
    out = b"".join(pipeline.synthesized())
    bounds = [0, *(cuts or []), len(stream)]
    for start, end in zip(bounds, bounds[1:]):
        chunk = stream[start:end]
        out += b"".join(pipeline.server(chunk, scanner.feed(chunk)))
    return out


def test_everything_forwarded_is_passed_through_whole_and_audited():
    owner, statement = Owner(), Statement()
    pipeline = Pipeline(owner)
    for entry in (Expected(PARSE), Expected(BIND), Expected(EXECUTE, statement=statement), Expected(SYNC)):
        pipeline.expect(entry)
    stream = PARSE_OK + BIND_OK + ROW + SELECT_1 + READY
    assert run(pipeline, stream) == stream
    assert ("done", statement, "ok") in owner.events and owner.events[-1] == ("ready", b"I", True)
    assert statement.tags == [b"SELECT 1\0"] and not len(pipeline)


def test_a_skipped_parse_gets_its_parse_complete_in_order_however_the_stream_is_cut():
    stream = BIND_OK + ROW + SELECT_1 + READY
    expected = PARSE_OK + stream
    rng = random.Random(3)
    for _ in range(200):
        pipeline = Pipeline(Owner())
        pipeline.expect(Expected(PARSE, SYNTH, payload=msg.PARSE_COMPLETE))
        for entry in (Expected(BIND), Expected(EXECUTE), Expected(SYNC)):
            pipeline.expect(entry)
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 6)))
        assert run(pipeline, stream, cuts) == expected


def test_a_local_close_complete_waits_for_the_replies_before_it():
    pipeline = Pipeline(Owner())
    for entry in (Expected(BIND), Expected(EXECUTE), Expected(CLOSE, SYNTH, payload=msg.CLOSE_COMPLETE),
                  Expected(SYNC)):
        pipeline.expect(entry)
    assert pipeline.synthesized() == []  # not its turn yet
    assert run(pipeline, BIND_OK + SELECT_1 + READY) == BIND_OK + SELECT_1 + CLOSE_OK + READY


def test_an_injected_parse_is_silent_on_success_and_its_error_reaches_the_client():
    for cuts in ([], [2], [5, 7]):
        pipeline = Pipeline(Owner())
        for entry in (Expected(PARSE, QUIET), Expected(BIND), Expected(EXECUTE), Expected(SYNC)):
            pipeline.expect(entry)
        assert run(pipeline, PARSE_OK + BIND_OK + SELECT_1 + READY, cuts) == BIND_OK + SELECT_1 + READY
    owner = Owner()
    pipeline = Pipeline(owner)
    for entry in (Expected(PARSE, QUIET), Expected(BIND), Expected(EXECUTE, statement=Statement()), Expected(SYNC)):
        pipeline.expect(entry)
    assert run(pipeline, ERROR + READY) == ERROR + READY  # the server skipped Bind and Execute
    # The Execute the client ran carries the error; the Bind in between is skipped.
    assert [e[0] for e in owner.events] == ["failed", "skipped", "skipped_quietly", "ready"]


def test_an_error_drops_the_owed_replies_up_to_sync_including_synthesized_ones():
    pipeline = Pipeline(Owner())
    for entry in (Expected(BIND), Expected(EXECUTE), Expected(PARSE, SYNTH, payload=msg.PARSE_COMPLETE),
                  Expected(BIND), Expected(SYNC)):
        pipeline.expect(entry)
    assert run(pipeline, BIND_OK + ERROR + READY) == BIND_OK + ERROR + READY


def test_the_switch_and_its_guard_are_swallowed_and_confirm():
    owner = Owner()
    pipeline = Pipeline(owner)
    switch_reply = (m(b"C", b"SET\0") + m(b"S", b"application_name\0alice via psql\0") + m(b"C", b"RESET\0")
                    + m(b"T", b"\0\0") + ROW + SELECT_1 + READY)
    guard_reply = PARSE_OK + BIND_OK + ROW + SELECT_1
    client_reply = m(b"T", b"\0\0") + ROW + SELECT_1 + READY
    for entry in (Expected(QUERY, SWITCH), Expected(PARSE, SWITCH), Expected(BIND, SWITCH), Expected(EXECUTE, GUARD),
                  Expected(QUERY), Expected(SYNC, SWALLOW)):
        pipeline.expect(entry)
    stream = switch_reply + guard_reply + client_reply + READY
    for cut in range(1, len(stream), 3):
        owner.events.clear()
        fresh = Pipeline(owner)
        for entry in (Expected(QUERY, SWITCH), Expected(PARSE, SWITCH), Expected(BIND, SWITCH),
                      Expected(EXECUTE, GUARD), Expected(QUERY), Expected(SYNC, SWALLOW)):
            fresh.expect(entry)
        assert run(fresh, stream, [cut]) == client_reply
        assert ("confirmed",) in owner.events and ("parameter", b"application_name") in owner.events
    assert run(pipeline, stream) == client_reply


def test_a_failed_switch_reports_and_passes_nothing_on():
    owner = Owner()
    pipeline = Pipeline(owner)
    for entry in (Expected(QUERY, SWITCH), Expected(PARSE, SWITCH), Expected(BIND, SWITCH), Expected(EXECUTE, GUARD),
                  Expected(QUERY), Expected(SYNC, SWALLOW)):
        pipeline.expect(entry)
    assert run(pipeline, ERROR + READY + ERROR + READY) == b""
    assert ("switch_failed",) in owner.events and ("confirmed",) not in owner.events


def test_forwarded_parse_error_is_forwarded_and_reported():
    owner = Owner()
    pipeline = Pipeline(owner)
    for entry in (Expected(PARSE, FORWARD, payload=("conn", ("SELECT nope", ()))), Expected(BIND), Expected(SYNC)):
        pipeline.expect(entry)
    assert run(pipeline, ERROR + READY) == ERROR + READY
    assert owner.events[:2] == [("failed", PARSE), ("skipped", BIND)]
