"""The pure parts of shared control state: revocation sets and their matching, the state
file, durations, cancel key layouts, authenticated peer frames, the control link's message
handling, the [control] configuration rules and the CLI's request mapping."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct

import pytest

from pgproxy.auth import Identity
from pgproxy.config import ConfigError, parse_config
from pgproxy.control_admin import admin_request
from pgproxy.control_plane import ControlLink, ControlPlane, ControlUnavailable, instance_name, state_path
from pgproxy.protocol.messages import parse_data_row
from pgproxy.peering import (HEAD_SIZE, MAX_FRAME, FrameChecker, FrameError, cancel_owner, cancel_pid, encode_frame,
                             frame_length)
from pgproxy.protocol import messages as msg
from pgproxy.revocations import (MAX_DURATION_S, Revocation, RevocationSet, load_state, new_revocation,
                                 parse_duration, revoked_login, revoked_session, save_state)

NOW = 1_800_000_000.0
MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "a"}},
           "audit": {"file": "/tmp/pgproxy-unit-audit.jsonl"}}


def identity(username="alice", subject="sub-1", token_id="") -> Identity:
    return Identity(username=username, subject=subject, issuer="https://idp", groups=(), auth_method="jwt",
                    token_id=token_id)


def rev(kind="person", value="alice", for_s=60.0, now=NOW, reason="why") -> Revocation:
    return new_revocation(kind, value, for_s, reason, origin="A", by="127.0.0.1", now=now)


# --- durations and new entries ---

@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("7d", 604800),
                                           (" 1.5m ", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "-5m", "1h30", "m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("kind, value, for_s, reason", [
    ("person", "alice", 0.5, ""), ("person", "alice", MAX_DURATION_S + 1, ""), ("nobody", "alice", 60, ""),
    ("person", "", 60, ""), ("person", "x" * 513, 60, ""), ("person", "al\nice", 60, ""),
    ("person", "alice", 60, "r" * 501), ("person", "alice", 60, "two\nlines")])
def test_new_revocations_are_checked(kind, value, for_s, reason):
    with pytest.raises(ValueError):
        new_revocation(kind, value, for_s, reason)


def test_json_round_trip_is_strict():
    entry = rev()
    assert Revocation.from_json(json.loads(json.dumps(entry.to_json()))) == entry
    for broken in ({**entry.to_json(), "kind": "root"}, {**entry.to_json(), "expires_at": "soon"},
                   {k: v for k, v in entry.to_json().items() if k != "value"}, [], "x",
                   {**entry.to_json(), "expires_at": float("nan")}):
        with pytest.raises(ValueError):
            Revocation.from_json(broken)


# --- matching ---

def test_each_kind_matches_what_it_names_only():
    revs = RevocationSet()
    revs.add(rev("person", "alice"))
    revs.add(rev("subject", "sub-bob"))
    revs.add(rev("jti", "tok-1"))
    revs.add(rev("block", "ALICE"))
    assert revs.match_identity(identity("alice"), now=NOW).kind == "person"
    assert revs.match_identity(identity("bob", "sub-bob"), now=NOW).kind == "subject"
    assert revs.match_identity(identity("carol", "sub-c", "tok-1"), now=NOW).kind == "jti"
    assert revs.match_identity(identity("carol", "sub-c", "tok-2"), now=NOW) is None
    # a block names a user name: the startup spelling or the identity's
    assert revs.match_identity(identity("alice2"), startup_user="ALICE", now=NOW).kind == "block"
    assert revs.match_identity(None, startup_user="ALICE", now=NOW).kind == "block"
    assert revs.match_identity(identity("dave", "alice", "alice"), now=NOW) is None  # values are per kind


def test_expired_entries_do_not_match_and_are_pruned():
    revs = RevocationSet()
    short, long = rev(for_s=10), rev("person", "bob", for_s=100)
    revs.add(short)
    revs.add(long)
    assert revs.match("alice", now=NOW + 9) is short
    assert revs.match("alice", now=NOW + 10) is None
    assert revs.prune(now=NOW + 10) == [short]
    assert revs.prune(now=NOW + 10) == []
    assert [r.value for r in revs] == ["bob"]


def test_replace_keeps_pending_reports_added_and_removed():
    revs = RevocationSet()
    local, shared, gone = rev("person", "a"), rev("person", "b"), rev("person", "c")
    revs.add(local, pending=True)
    revs.add(shared, pending=True)
    revs.add(gone)
    arrived = rev("jti", "t")
    added, removed = revs.replace([shared, arrived], now=NOW)
    assert added == [arrived] and removed == [gone]
    assert revs.pending == {local.id}  # shared reached the database; local has not yet
    assert {r.value for r in revs} == {"a", "b", "t"}
    assert revs.add(arrived) is False  # ids are unique


def test_lift_removes_every_entry_for_a_target():
    revs = RevocationSet()
    one, two, other = rev("block", "alice"), rev("block", "alice"), rev("person", "alice")
    for entry in (one, two, other):
        revs.add(entry, pending=True)
    assert {r.id for r in revs.lift("block", "alice")} == {one.id, two.id}
    assert revs.match("alice", now=NOW) is other and revs.pending == {other.id}
    assert revs.remove("nope") is None


def test_errors_are_28000_and_57p01_and_vague_to_the_client():
    entry = rev(reason="a secret reason")
    login = revoked_login("alice", entry)
    assert (login.sqlstate, login.severity, login.denial) == ("28000", "FATAL", "revoked")
    assert "secret reason" not in login.message and entry.id in login.log_detail
    assert revoked_login("alice", rev("block")).denial == "blocked"
    assert revoked_session(entry).sqlstate == "57P01"


# --- the state file ---

def test_state_file_round_trip_keeps_pending_and_drops_expired(tmp_path):
    path = str(tmp_path / "state.json")
    revs = RevocationSet()
    live, pending, old = rev(now=NOW), rev("jti", "t", now=NOW), rev("person", "x", for_s=5, now=NOW - 100)
    revs.add(live)
    revs.add(pending, pending=True)
    revs.add(old)
    save_state(path, revs, synced_at=NOW - 3, instance="A")
    assert os.stat(path).st_mode & 0o077 == 0
    loaded, synced_at = load_state(path, now=NOW)
    assert synced_at == NOW - 3 and {r.id for r in loaded} == {live.id, pending.id}
    assert loaded.pending == {pending.id}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".pgproxy-state-")] == []  # no leftovers


def test_state_file_missing_is_empty_broken_is_an_error_bad_entries_are_skipped(tmp_path):
    path = tmp_path / "state.json"
    revs, synced_at = load_state(str(path))
    assert len(revs) == 0 and synced_at is None
    path.write_text("{not json")
    with pytest.raises(ValueError):
        load_state(str(path))
    path.write_text(json.dumps({"version": 2, "revocations": []}))
    with pytest.raises(ValueError):
        load_state(str(path))
    good = rev(now=NOW)
    path.write_text(json.dumps({"version": 1, "synced_at": True, "revocations": [
        {"id": "x", "kind": "root", "value": "y", "expires_at": NOW + 60, "created_at": NOW}, 7, good.to_json()]}))
    revs, synced_at = load_state(str(path), now=NOW)
    assert [r.id for r in revs] == [good.id] and synced_at is None


# --- cancel keys ---

@pytest.mark.parametrize("peer_id, worker, several", [(0, 0, False), (0, 0, True), (0, 63, True), (1, 0, False),
                                                      (5, 3, True), (127, 63, True)])
def test_cancel_pids_name_their_instance_and_worker(peer_id, worker, several):
    taken = set()
    for _ in range(200):
        pid = cancel_pid(peer_id, worker, several, taken)
        assert 0 < pid < 2**31 and pid not in taken
        taken.add(pid)
        instance, owner = cancel_owner(pid, peer_id)
        assert instance == peer_id
        if several or peer_id:
            assert owner == worker


def test_cancel_owner_of_nonsense():
    assert cancel_owner(-5, 3) == (-1, -1)
    assert cancel_owner(9 << 24, 3) == (9, 0)  # another instance's key


# --- peer frames ---

SECRET = b"s" * 32


def test_a_good_frame_is_accepted_once():
    checker = FrameChecker(SECRET, peer_id=2)
    frame = encode_frame(SECRET, 2, 12345, b"\x01\x02\x03\x04", now=NOW)
    assert len(frame) <= MAX_FRAME and frame_length(frame[:HEAD_SIZE]) == len(frame)
    assert checker.check(frame, now=NOW + 1) == (12345, b"\x01\x02\x03\x04")
    with pytest.raises(FrameError, match="replayed"):
        checker.check(frame, now=NOW + 2)


def flip(frame: bytes, at: int) -> bytes:
    changed = bytearray(frame)
    changed[at] ^= 1
    return bytes(changed)


@pytest.mark.parametrize("why, make", [
    ("bad MAC", lambda: encode_frame(b"t" * 32, 2, 1, b"k" * 4, now=NOW)),
    ("off", lambda: encode_frame(SECRET, 2, 1, b"k" * 4, now=NOW - 31)),
    ("for peer 3", lambda: encode_frame(SECRET, 3, 1, b"k" * 4, now=NOW)),
    ("bad MAC", lambda: flip(encode_frame(SECRET, 2, 1, b"k" * 8, now=NOW), -40)),  # a key byte changed
    ("length", lambda: encode_frame(SECRET, 2, 1, b"k" * 4, now=NOW)[:-1]),
    ("not a pgproxy", lambda: b"GET / HTTP/1.1\r\n" + b"x" * 60),
])
def test_bad_frames_are_refused(why, make):
    with pytest.raises(FrameError, match=why):
        FrameChecker(SECRET, peer_id=2).check(make(), now=NOW)


def test_frame_key_length_is_bounded_before_reading():
    head = struct.pack("!8sq16shih", b"PGPXCNL1", 0, b"n" * 16, 1, 1, 10_000)
    with pytest.raises(FrameError, match="out of range"):
        frame_length(head)
    with pytest.raises(ValueError):
        encode_frame(SECRET, 1, 1, b"k" * 3)


# --- the control link ---

class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def data_row(*values) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg.message(b"D", body)


def notification(channel: str, payload: str) -> bytes:
    return msg.message(b"A", struct.pack("!i", 42) + msg.cstr(channel) + msg.cstr(payload))


def test_link_answers_queries_and_hands_on_notifications_in_between():
    async def run():
        notes, lost = [], []
        link = ControlLink(lambda c, p: notes.append((c, p)), lambda: lost.append(True))
        link.transport = FakeTransport()
        task = asyncio.ensure_future(link.query("SELECT $1", ("x",)))
        await asyncio.sleep(0)
        assert b"SELECT $1" in link.transport.written and msg.SYNC in link.transport.written
        reply = (msg.message(b"1") + msg.message(b"2") + notification("pgproxy_control", '{"op":"sync"}')
                 + data_row(b"a", None) + data_row("é".encode(), b"") + msg.command_complete("SELECT 2")
                 + msg.ready_for_query())
        for i in range(0, len(reply), 7):  # in pieces, as a network delivers it
            link.data_received(reply[i:i + 7])
        assert await task == [("a", None), ("é", "")]
        assert notes == [("pgproxy_control", '{"op":"sync"}')]
        task = asyncio.ensure_future(link.query("SELECT 1/0"))
        await asyncio.sleep(0)
        link.data_received(msg.statement_error("22012", "division by zero") + msg.ready_for_query())
        with pytest.raises(ControlUnavailable, match="22012"):
            await task
        task = asyncio.ensure_future(link.query("SELECT 1"))
        await asyncio.sleep(0)
        link.connection_lost(None)
        with pytest.raises(ControlUnavailable):
            await task
        assert lost == [True]
        with pytest.raises(ControlUnavailable):
            await link.query("SELECT 1")

    asyncio.run(run())


def test_link_closes_on_an_oversized_message():
    link = ControlLink(lambda c, p: None, lambda: None)
    link.transport = FakeTransport()
    link.data_received(b"D" + struct.pack("!I", 1 << 30))
    assert link.transport.closed and link.lost


def test_peer_addresses_newest_heartbeat_wins_and_a_clash_is_logged_once(caplog):
    plane = ControlPlane(argparse.Namespace(cfg=parse_config(MINIMAL)))
    rows = [("1", "10.0.0.1:7000", "A"), ("2", "10.0.0.2:7000", "B"), ("1", "10.0.0.9:7000", "A")]
    assert plane._peer_addresses(rows) == {1: "10.0.0.9:7000", 2: "10.0.0.2:7000"}
    assert not caplog.records  # one instance that moved: no clash
    clash = [("1", "10.0.0.1:7000", "A"), ("1", "10.0.0.3:7000", "orphan")]
    assert plane._peer_addresses(clash) == {1: "10.0.0.3:7000"}
    assert plane._peer_addresses(clash) == {1: "10.0.0.3:7000"}
    logged = [r for r in caplog.records if "claim one control.peer_id" in r.getMessage()]
    assert len(logged) == 1 and logged[0].instances == "A,orphan"


def test_data_row_parses_nulls_and_empties():
    assert tuple(parse_data_row(struct.pack("!h", 3) + struct.pack("!i", -1) + struct.pack("!i", 0)
                                + struct.pack("!i", 2) + b"hi")) == (None, "", "hi")


# --- configuration ---

def problems_of(control: dict, **extra) -> list[str]:
    try:
        parse_config({**MINIMAL, "control": control, **extra})
    except ConfigError as exc:
        return exc.problems
    return []


def test_control_defaults_and_a_good_configuration():
    cfg = parse_config(MINIMAL)
    assert (cfg.control.database, cfg.control.on_unavailable, cfg.control.peer_id) == ("", "refuse", 0)
    assert instance_name(cfg).endswith(":6432")
    assert state_path(cfg) == "/tmp/pgproxy-control-state-6432.json"  # beside audit.file, per port
    assert problems_of({"database": "control", "user": "ctl", "peer_id": 2, "peer_listen": "127.0.0.1:6500",
                        "peer_secret_file": "/s", "peers": {"1": "10.0.0.1:6500"}, "instance": "A"}) == []


@pytest.mark.parametrize("control, key", [
    ({"database": "control"}, "control.user"),
    ({"user": "ctl"}, "control.database"),
    ({"on_unavailable": "maybe"}, "control.on_unavailable"),
    ({"sync_interval_s": 10, "max_staleness_s": 5}, "control.max_staleness_s"),
    ({"sync_interval_s": 0}, "control.sync_interval_s"),
    ({"peer_id": 128, "peer_secret_file": "/s"}, "control.peer_id"),
    ({"peer_id": 2}, "control.peer_secret_file"),
    ({"peer_listen": "127.0.0.1:6500"}, "control.peer_id"),
    ({"peer_id": 2, "peer_secret_file": "/s", "peer_listen": "nowhere"}, "control.peer_listen"),
    ({"peer_id": 2, "peer_secret_file": "/s", "peers": {"x": "10.0.0.1:1"}}, "control.peers.x"),
    ({"peer_id": 2, "peer_secret_file": "/s", "peers": {"3": "10.0.0.1"}}, "control.peers.3"),
    ({"database": "c", "user": "u", "sslmode": "verify-full"}, "control.sslrootcert"),
    ({"bogus": 1}, "control.bogus"),
])
def test_control_configuration_problems_name_their_key(control, key):
    assert any(p.startswith(key) for p in problems_of(control)), problems_of(control)


def test_short_peer_secret_is_refused(tmp_path):
    from pgproxy.config import load_config
    secret = tmp_path / "peer"
    secret.write_text("short\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[backend]\nuser = "pool"\n[auth.jwt]\nissuer = "https://idp"\naudience = "a"\n'
                      f'[audit]\nfile = "{tmp_path}/a.jsonl"\n[control]\npeer_id = 1\n'
                      f'peer_secret_file = "{secret}"\n')
    with pytest.raises(ConfigError, match="at least 32"):
        load_config(config)


def test_cli_requests():
    def args(action, user="", **kw):
        base = {"subject": "", "jti": "", "id": "", "duration": "", "reason": ""}
        return argparse.Namespace(action=action, user=user, **{**base, **kw})

    assert admin_request(args("revoke", "alice", duration="10m", reason="r")) == \
        ("POST", {"person": "alice", "for": "10m", "reason": "r"})
    assert admin_request(args("revoke", jti="t", duration="1h")) == ("POST", {"jti": "t", "for": "1h"})
    assert admin_request(args("unrevoke", id="abc")) == ("POST", {"id": "abc"})
    assert admin_request(args("unrevoke", subject="s")) == ("POST", {"subject": "s"})
    assert admin_request(args("revocations")) == ("GET", {})
    for bad in (args("revoke", "alice"), args("revoke", "alice", subject="s", duration="1m"),
                args("unrevoke"), args("unrevoke", "alice", id="x")):
        with pytest.raises(ValueError):
            admin_request(bad)
