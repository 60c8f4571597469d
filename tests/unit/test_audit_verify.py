"""``pgproxy audit verify``: every kind of tampering is reported with its file and line."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import time

import pytest

from pgproxy.audit import AuditLog
from pgproxy.audit_chain import ZERO_HASH
from pgproxy.audit_verify import verify
from pgproxy.cli import main
from pgproxy.config import AuditSection

PREFIX = AuditLog.session_prefix({"session": "s1", "user": "alice", "role": "r", "auth_method": "jwt"})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A closed trail: open seal, 3 batches of 10 statements each followed by a checkpoint, close seal."""
    path = tmp_path_factory.mktemp("trail") / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5, checkpoint_records=10))
    for batch in range(3):
        for i in range(10):
            log.statement(PREFIX, f"SELECT {batch * 10 + i}", None, None, [b"SELECT 1\0"], time.time(), 0.001,
                          "ok", None, 42)
        deadline = time.monotonic() + 5
        while log.records_written < (batch + 1) * 11 + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    log.close()
    return path


@pytest.fixture
def trail(pristine, tmp_path):
    path = tmp_path / "audit.jsonl"
    shutil.copy(pristine, path)
    shutil.copy(str(pristine) + ".pub", str(path) + ".pub")
    return path


def lines(path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write(path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def statement_line(trail_lines: list[bytes], text: str) -> int:
    """0-based index of the statement record with this text."""
    return next(i for i, line in enumerate(trail_lines) if json.loads(line).get("statement") == text)


def problems(*paths, **kwargs) -> list[tuple[int, str]]:
    report = verify([str(p) for p in paths], **kwargs)
    return sorted((line, text) for _, line, text in report.problems)


def test_the_pristine_trail_has_seals_where_expected(pristine):
    events = [json.loads(line)["event"] for line in lines(pristine)]
    assert events[0] == "audit_open" and events[-1] == "audit_close"
    assert events.count("audit_checkpoint") >= 2 and events.count("statement") == 30


def test_an_untouched_trail_verifies_with_exit_0_and_a_summary(trail, capsys):
    assert main(["audit", "verify", str(trail)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"audit.jsonl: \d+ records from 1 writer, [5-9] signed seals verified; no damage found", out)


def test_one_edited_field_is_reported_at_its_line(trail, capsys):
    rows = lines(trail)
    i = statement_line(rows, "SELECT 12")
    rows[i] = rows[i].replace(b'"rows": 1', b'"rows": 0')
    write(trail, rows)
    found = problems(trail)
    assert len(found) == 1 and found[0][0] == i + 1 and "altered" in found[0][1]
    assert main(["audit", "verify", str(trail)]) == 1
    assert f"{trail}:{i + 1}: record of writer" in capsys.readouterr().out


def test_an_edit_with_the_chain_recomputed_breaks_the_next_signed_checkpoint(trail):
    rows = lines(trail)
    i = statement_line(rows, "SELECT 12")
    rows[i] = rows[i].replace(b'"SELECT 12"', b'"SELECT 99"')
    for j in range(i + 1, len(rows)):  # the forger fixes every later prev, but cannot re-sign
        prev = hashlib.sha256(rows[j - 1]).hexdigest().encode()
        rows[j] = re.sub(rb'"prev": "[0-9a-f]{64}"', b'"prev": "' + prev + b'"', rows[j])
    write(trail, rows)
    found = problems(trail)
    assert found and all("bad signature" in text for _, text in found)
    first_seal = next(j for j in range(i, len(rows)) if b'"seal"' in rows[j])
    assert found[0][0] == first_seal + 1


def test_a_deleted_record_is_reported(trail):
    rows = lines(trail)
    i = statement_line(rows, "SELECT 5")
    del rows[i]
    write(trail, rows)
    found = problems(trail)
    assert len(found) == 1 and found[0][0] == i + 1 and "1 record of writer" in found[0][1] \
        and "deleted" in found[0][1]


def test_two_swapped_records_are_reported(trail):
    rows = lines(trail)
    i = statement_line(rows, "SELECT 20")
    rows[i], rows[i + 1] = rows[i + 1], rows[i]
    write(trail, rows)
    found = problems(trail)
    assert len(found) == 1 and found[0][0] == i + 1 and "reordered" in found[0][1]


def test_inserted_records_are_reported(trail):
    rows = lines(trail)
    i = statement_line(rows, "SELECT 7")
    forged_copy = rows[i].replace(b'"SELECT 7"', b'"SELECT pg_sleep(0)"')  # claims the same seq
    plain = json.dumps({"ts": "2026-01-01T00:00:00+00:00", "event": "statement", "user": "mallory",
                        "statement": "SELECT 1"}).encode()  # no chain at all
    rows[i + 1:i + 1] = [forged_copy, plain]
    write(trail, rows)
    found = problems(trail)
    assert [line for line, _ in found] == [i + 2, i + 3]
    assert "inserted" in found[0][1] and "outside any chain" in found[1][1]


def test_a_record_with_a_new_writer_of_its_own_is_reported(trail):
    rows = lines(trail)
    fake = json.loads(rows[5])
    fake.update(writer="9.deadbeef", seq=1, prev=ZERO_HASH, statement="SELECT forged")
    rows.insert(6, json.dumps(fake).encode())
    write(trail, rows)
    found = problems(trail)
    assert {line for line, _ in found} == {7}
    assert any("does not start with its open seal" in text for _, text in found)


def test_truncation_at_the_end_is_reported_as_a_missing_closing_seal(trail):
    rows = lines(trail)
    write(trail, rows[:-3])
    found = problems(trail)
    assert len(found) == 1 and found[0][0] == len(rows) - 3 and "ends without its closing seal" in found[0][1]


def test_truncation_in_the_middle_of_a_line_is_reported(trail):
    data = trail.read_bytes()
    trail.write_bytes(data[:-40])
    found = problems(trail)
    last = len(data[:-40].split(b"\n"))
    assert (last, "not a JSON record (damaged, or cut off)") in found
    assert any("ends without its closing seal" in text for _, text in found)


def test_lines_removed_from_the_start_are_reported(trail):
    write(trail, lines(trail)[4:])
    found = problems(trail)
    assert found and found[0][0] == 1 and "does not start with its open seal" in found[0][1]


def test_a_trail_signed_by_another_key_is_not_trusted(trail, tmp_path):
    other = tmp_path / "other" / "audit.jsonl"
    other.parent.mkdir()
    log = AuditLog(AuditSection(file=str(other)))
    log.close()
    found = problems(trail, public_key_files=[str(other) + ".pub"])
    assert found and all("not trusted" in text for _, text in found)


def test_files_are_read_in_order_and_gzip_is_accepted(trail, tmp_path):
    rows = lines(trail)
    cut = statement_line(rows, "SELECT 15")
    first, second = tmp_path / "audit.jsonl.1.gz", tmp_path / "audit.jsonl"
    with gzip.open(first, "wb") as fh:
        fh.write(b"".join(line + b"\n" for line in rows[:cut]))
    write(second, rows[cut:])
    # Cut in the middle of a writer's part: the seals say where each part starts and ends.
    report = verify([str(first), str(second)])
    found = sorted((file, line, text) for file, line, text in report.problems)
    assert [(file, line) for file, line, _ in found] == [(0, cut), (1, 1)]
    assert "ends without its closing seal" in found[0][2] and "does not start with its open seal" in found[1][2]
    assert report.records == len(rows)


def test_a_running_writer_s_unsealed_tail_is_a_note_not_a_problem(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditSection(file=str(path), flush_interval_ms=5))
    log.statement(PREFIX, "SELECT 1", None, None, [b"SELECT 1\0"], time.time(), 0.001, "ok", None, 42)
    deadline = time.monotonic() + 5
    while log.records_written < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        report = verify([str(path)], alive=lambda host, pid: True)
        assert report.problems == [] and any("still running" in note for note in report.notes)
        dead = verify([str(path)], alive=lambda host, pid: False)
        assert [text for _, _, text in dead.problems][0].startswith(f"writer {log.writer_id}'s part of this file "
                                                                    "ends without its closing seal")
    finally:
        log.close()


def test_an_unreadable_file_exits_2(tmp_path, capsys):
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
