"""Pipeline: the server's replies matched to what the client is owed, bytes in, bytes out."""

from __future__ import annotations

import random
import struct

from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import ServerStreamScanner
from pgproxy.protocol.pipeline import (BIND, CLOSE, CONFIRMED, DESCRIBED, DONE, EXECUTE, FAILED, FORWARD, GUARD,
                                       PARAMETER, PARSE, QUERY, QUIET, READY, SKIPPED, SKIPPED_QUIETLY, SWALLOW,
                                       SWITCH, SWITCH_FAILED, SYNC, SYNTH, WANTED, Expected, Pipeline)


_NAMES = {PARAMETER: "parameter", READY: "ready", DESCRIBED: "described", DONE: "done", FAILED: "failed",
          SKIPPED: "skipped", SKIPPED_QUIETLY: "skipped_quietly", CONFIRMED: "confirmed",
          SWITCH_FAILED: "switch_failed"}


def events(pipeline: Pipeline) -> list[tuple]:
    """The pipeline's events so far, readable: ("done", statement, outcome), ("failed", kind), ..."""
    out = []
    for event in pipeline.events:
        name = _NAMES[event[0]]
        if name == "parameter":
            out.append((name, event[1].split(b"\0")[0]))
        elif name in ("failed", "skipped", "skipped_quietly"):
            out.append((name, event[1].kind))
        elif name in ("done", "ready"):
            out.append((name, *event[1:]))
        else:
            out.append((name,))
    return out


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
    statement = Statement()
    pipeline = Pipeline()
    for entry in (Expected(PARSE), Expected(BIND), Expected(EXECUTE, statement=statement), Expected(SYNC)):
        pipeline.expect(entry)
    stream = PARSE_OK + BIND_OK + ROW + SELECT_1 + READY
    assert run(pipeline, stream) == stream
    assert ("done", statement, "ok") in events(pipeline) and events(pipeline)[-1] == ("ready", b"I")
    assert statement.tags == [b"SELECT 1\0"] and not len(pipeline)


def test_a_skipped_parse_gets_its_parse_complete_in_order_however_the_stream_is_cut():
    stream = BIND_OK + ROW + SELECT_1 + READY
    expected = PARSE_OK + stream
    rng = random.Random(3)
    for _ in range(200):
        pipeline = Pipeline()
        pipeline.expect(Expected(PARSE, SYNTH, reply=msg.PARSE_COMPLETE))
        for entry in (Expected(BIND), Expected(EXECUTE), Expected(SYNC)):
            pipeline.expect(entry)
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 6)))
        assert run(pipeline, stream, cuts) == expected


def test_a_local_close_complete_waits_for_the_replies_before_it():
    pipeline = Pipeline()
    for entry in (Expected(BIND), Expected(EXECUTE), Expected(CLOSE, SYNTH, reply=msg.CLOSE_COMPLETE),
                  Expected(SYNC)):
        pipeline.expect(entry)
    assert pipeline.synthesized() == []  # not its turn yet
    assert run(pipeline, BIND_OK + SELECT_1 + READY) == BIND_OK + SELECT_1 + CLOSE_OK + READY


def test_an_injected_parse_is_silent_on_success_and_its_error_reaches_the_client():
    for cuts in ([], [2], [5, 7]):
        pipeline = Pipeline()
        for entry in (Expected(PARSE, QUIET), Expected(BIND), Expected(EXECUTE), Expected(SYNC)):
            pipeline.expect(entry)
        assert run(pipeline, PARSE_OK + BIND_OK + SELECT_1 + READY, cuts) == BIND_OK + SELECT_1 + READY
    pipeline = Pipeline()
    for entry in (Expected(PARSE, QUIET), Expected(BIND), Expected(EXECUTE, statement=Statement()), Expected(SYNC)):
        pipeline.expect(entry)
    assert run(pipeline, ERROR + READY) == ERROR + READY  # the server skipped Bind and Execute
    # The Execute the client ran carries the error; the Bind in between is skipped.
    assert [e[0] for e in events(pipeline)] == ["failed", "skipped", "skipped_quietly", "ready"]


def test_an_error_drops_the_owed_replies_up_to_sync_including_synthesized_ones():
    pipeline = Pipeline()
    for entry in (Expected(BIND), Expected(EXECUTE), Expected(PARSE, SYNTH, reply=msg.PARSE_COMPLETE),
                  Expected(BIND), Expected(SYNC)):
        pipeline.expect(entry)
    assert run(pipeline, BIND_OK + ERROR + READY) == BIND_OK + ERROR + READY


def test_the_switch_and_its_guard_are_swallowed_and_confirm():
    pipeline = Pipeline()
    switch_reply = (m(b"C", b"SET\0") + m(b"S", b"application_name\0alice via psql\0") + m(b"C", b"RESET\0")
                    + m(b"T", b"\0\0") + ROW + SELECT_1 + READY)
    guard_reply = PARSE_OK + BIND_OK + ROW + SELECT_1
    client_reply = m(b"T", b"\0\0") + ROW + SELECT_1 + READY
    for entry in (Expected(QUERY, SWITCH), Expected(PARSE, SWITCH), Expected(BIND, SWITCH), Expected(EXECUTE, GUARD),
                  Expected(QUERY), Expected(SYNC, SWALLOW)):
        pipeline.expect(entry)
    stream = switch_reply + guard_reply + client_reply + READY
    for cut in range(1, len(stream), 3):
        fresh = Pipeline()
        for entry in (Expected(QUERY, SWITCH), Expected(PARSE, SWITCH), Expected(BIND, SWITCH),
                      Expected(EXECUTE, GUARD), Expected(QUERY), Expected(SYNC, SWALLOW)):
            fresh.expect(entry)
        assert run(fresh, stream, [cut]) == client_reply
        assert ("confirmed",) in events(fresh) and ("parameter", b"application_name") in events(fresh)
    assert run(pipeline, stream) == client_reply


def test_a_failed_switch_reports_and_passes_nothing_on():
    pipeline = Pipeline()
    for entry in (Expected(QUERY, SWITCH), Expected(PARSE, SWITCH), Expected(BIND, SWITCH), Expected(EXECUTE, GUARD),
                  Expected(QUERY), Expected(SYNC, SWALLOW)):
        pipeline.expect(entry)
    assert run(pipeline, ERROR + READY + ERROR + READY) == b""
    assert ("switch_failed",) in events(pipeline) and ("confirmed",) not in events(pipeline)


def test_forwarded_parse_error_is_forwarded_and_reported():
    pipeline = Pipeline()
    for entry in (Expected(PARSE, FORWARD, key=("SELECT nope", ())), Expected(BIND), Expected(SYNC)):
        pipeline.expect(entry)
    assert run(pipeline, ERROR + READY) == ERROR + READY
    assert events(pipeline)[:2] == [("failed", PARSE), ("skipped", BIND)]
