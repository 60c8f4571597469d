"""``pgproxy audit verify FILE...``: check an audit trail's chains and signatures.

Files are read in the order given (oldest first; ``.gz`` is read as gzip, by content), as
the writers wrote them: each writer's lines form one chain across all files
(pgproxy/audit_chain.py). What is reported, with the file and line:

* a line that is not JSON (a torn write, or damage); a line of no chain (inserted);
* a record whose hash does not match the next record's ``prev`` (altered);
* missing sequence numbers (deleted), a number seen twice (inserted or duplicated), a
  record before one it follows (reordered);
* a seal whose signature fails, or that is signed by a key not trusted (altered, forged);
* a writer's part of a file that does not start with an ``open`` seal (lines removed
  from the start) or does not end with a ``close`` seal (truncated, or the writer was
  killed) — unless it is the last file and that writer is still running on this host;
  then its lines after the last seal are reported as not yet sealed.

Keys: ``--public-key`` files if given, else every ``<name>.pub`` beside the files whose
name starts the file's name (``audit.jsonl.pub`` for ``audit.jsonl.3.gz``); with neither,
the keys the trail names itself — which proves the chain intact but not who wrote it.
Pure apart from reading the files and asking whether a writer's process is alive.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pgproxy.audit_chain import ZERO_HASH, key_id, line_hash, public_from_text, read_public_keys, seal_signature_ok

_RECORD_START = b'{"ts": "'


class Record:
    """One chained line; only a seal keeps its bytes and fields (memory: a few hundred
    bytes per record, whatever its length)."""
    __slots__ = ("file", "line", "hash", "writer", "seq", "prev", "seal", "raw", "obj")

    def __init__(self, file: int, line: int, raw: bytes, obj: dict, writer: str, seq: int, prev: str) -> None:
        self.file, self.line, self.hash = file, line, line_hash(raw)
        self.writer, self.seq, self.prev = writer, seq, prev
        seal = obj.get("seal")
        self.seal = seal if isinstance(seal, str) else None
        self.raw, self.obj = (raw, obj) if self.seal else (None, None)


@dataclass
class Report:
    files: list[str]
    problems: list[tuple[int, int, str]] = field(default_factory=list)  # (file index, line, text)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    seals: int = 0
    writers: int = 0

    def problem(self, file: int, line: int, text: str) -> None:
        self.problems.append((file, line, text))

    def where(self, file: int, line: int) -> str:
        return f"{self.files[file]}:{line}" if file >= 0 else "-"

    def lines(self) -> list[str]:
        out = [f"{self.where(f, n)}: {text}" for f, n, text in sorted(self.problems)]
        out += [f"note: {text}" for text in self.notes]
        verdict = (f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}" if self.problems
                   else "no damage found")
        out.append(f"{', '.join(self.files)}: {self.records} records from {self.writers} writer"
                   f"{'s' if self.writers != 1 else ''}, {self.seals} signed seals verified; {verdict}")
        return out


def verify(paths: list[str], public_key_files: list[str] | None = None, alive=None) -> Report:
    """``alive(host, pid) -> bool``: whether a writer still runs (default: a process with
    that pid on this host)."""
    report = Report(files=[str(p) for p in paths])
    alive = alive or _alive
    trusted, trusted_named = {}, False
    for path in public_key_files or _pub_files(paths):
        trusted.update(read_public_keys(path))
        trusted_named = True
    chains: dict[str, list[Record]] = {}
    for index, path in enumerate(paths):
        _read(index, path, report, chains)
    report.writers = len(chains)
    named_keys: dict[str, object] = {}
    for records in chains.values():
        for rec in records:
            if rec.seal == "open" and isinstance(rec.obj.get("public_key"), str):
                try:
                    key = public_from_text(rec.obj["public_key"])
                except ValueError:
                    continue
                named_keys[key_id(key)] = key
    if not trusted_named:
        trusted = named_keys
        if chains:
            report.notes.append("no public key file (.pub or --public-key): signatures were checked against the "
                                "keys the trail names itself — the chain is intact, but not proven to be pgproxy's")
    for writer, records in chains.items():
        _check_chain(writer, records, trusted, len(paths) - 1, alive, report)
    return report


def _pub_files(paths: list[str]) -> list[str]:
    found = []
    for path in paths:
        p = Path(path)
        try:
            siblings = sorted(p.parent.glob("*.pub"))
        except OSError:
            continue
        for pub in siblings:
            if p.name.startswith(pub.name[:-4]) and str(pub) not in found:
                found.append(str(pub))
    return found


def _open(path: str):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read(index: int, path: str, report: Report, chains: dict[str, list[Record]]) -> None:
    held: tuple[int, bytes] | None = None  # a line that is not JSON, until the next one is known
    number = 0
    with _open(path) as fh:
        for number, raw in enumerate(fh, 1):
            raw = raw.rstrip(b"\n")
            if held is not None:
                _damaged(index, *held, raw, report, chains)
                held = None
            if not raw.strip():
                continue
            rec = _parse(index, number, raw)
            if rec is None:
                held = (number, raw)
            elif isinstance(rec, Record):
                _add(rec, report, chains)
            else:
                report.problem(index, number, rec)
    if held is not None:
        _damaged(index, *held, b"", report, chains)


def _add(rec: Record, report: Report, chains: dict[str, list[Record]]) -> None:
    report.records += 1
    chains.setdefault(rec.writer, []).append(rec)


def _parse(index: int, number: int, raw: bytes) -> Record | str | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return "not an audit record (inserted?)"
    writer, seq, prev = obj.get("writer"), obj.get("seq"), obj.get("prev")
    if not isinstance(writer, str) or type(seq) is not int or not isinstance(prev, str):
        return "a record outside any chain: inserted, or written by a pgproxy without the chain"
    return Record(index, number, raw, obj, writer, seq, prev)


def _damaged(index: int, number: int, raw: bytes, following: bytes, report: Report,
             chains: dict[str, list[Record]]) -> None:
    """A line that is not JSON. A write that failed partway leaves a piece of a record the
    writer wrote again whole on the next line; another writer's record may follow the
    piece on the same line (two workers share the file) — that one is recovered."""
    if following.startswith(raw) and raw.startswith(_RECORD_START):
        report.problem(index, number, "torn line: a write that failed partway (the record follows whole on "
                                      "the next line)")
        return
    start = raw.rfind(_RECORD_START)
    if start > 0:
        rec = _parse(index, number, raw[start:])
        if isinstance(rec, Record):
            report.problem(index, number, f"torn line: {start} bytes of a record cut off (a write that failed "
                                          "partway), joined to the next record")
            _add(rec, report, chains)
            return
    report.problem(index, number, "not a JSON record (damaged, or cut off)")


def _check_chain(writer: str, records: list[Record], trusted: dict, last_file: int, alive, report: Report) -> None:
    where = report.where
    order = {id(rec): position for position, rec in enumerate(records)}
    valid_seals: set[int] = set()
    for rec in records:
        if rec.seal is None:
            continue
        kid = rec.obj.get("key_id")
        key = trusted.get(kid)
        if key is None:
            report.problem(rec.file, rec.line, f"seal of writer {writer} seq {rec.seq} is signed by key {kid}, "
                                               "which is not trusted (forged?)")
        elif not seal_signature_ok(rec.raw, key):
            report.problem(rec.file, rec.line, f"seal of writer {writer} seq {rec.seq}: bad signature "
                                               "(the seal, or records before it, were altered)")
        else:
            valid_seals.add(id(rec))
            report.seals += 1
        if rec.seal == "open" and isinstance(rec.obj.get("public_key"), str) and kid is not None:
            try:
                if key_id(public_from_text(rec.obj["public_key"])) != kid:
                    report.problem(rec.file, rec.line, f"open seal of writer {writer} names a public key that "
                                                       "is not its key_id")
            except ValueError:
                report.problem(rec.file, rec.line, f"open seal of writer {writer}: malformed public_key")

    # One record per sequence number: the one the chain confirms; the others were inserted.
    by_seq: dict[int, list[Record]] = {}
    for rec in records:
        by_seq.setdefault(rec.seq, []).append(rec)
    chosen: dict[int, Record] = {}
    for seq in sorted(by_seq):
        candidates = by_seq[seq]
        if len(candidates) == 1:
            chosen[seq] = candidates[0]
            continue
        successors = {r.prev for r in by_seq.get(seq + 1, ())}
        before = chosen.get(seq - 1)

        def fits(rec: Record) -> int:
            return (rec.hash in successors) * 2 + (before is not None and rec.prev == before.hash)
        best = max(candidates, key=fits)
        chosen[seq] = best
        for rec in candidates:
            if rec is best:
                continue
            if rec.hash == best.hash:
                report.problem(rec.file, rec.line, f"record of writer {writer} seq {seq} appears twice (also "
                                                   f"{where(best.file, best.line)}): duplicated")
            else:
                report.problem(rec.file, rec.line, f"a second record claims writer {writer} seq {seq} "
                                                   f"({where(best.file, best.line)} fits the chain): inserted")

    seqs = sorted(chosen)
    first = chosen[seqs[0]]
    if first.seq == 1 and first.prev != ZERO_HASH:
        report.problem(first.file, first.line, f"writer {writer} seq 1 does not start a chain (altered)")
    if first.seq > 1 and first.file == 0:
        report.notes.append(f"writer {writer} starts at seq {first.seq} in {report.files[0]}: its earlier "
                            "records are in files not given")
    for a_seq, b_seq in zip(seqs, seqs[1:]):
        a, b = chosen[a_seq], chosen[b_seq]
        if b_seq != a_seq + 1:
            missing = b_seq - a_seq - 1
            report.problem(b.file, b.line, f"{missing} record{'s' if missing != 1 else ''} of writer {writer} "
                                           f"missing before this one (seq {a_seq + 1}"
                                           f"{f'-{b_seq - 1}' if missing > 1 else ''}; the previous is at "
                                           f"{where(a.file, a.line)}): deleted")
        elif b.prev != a.hash:
            report.problem(a.file, a.line, f"record of writer {writer} seq {a_seq} was altered (its hash is not "
                                           f"the prev of seq {b_seq} at {where(b.file, b.line)})")
        if order[id(b)] < order[id(a)]:
            report.problem(b.file, b.line, f"records out of order: writer {writer} seq {b_seq} comes before seq "
                                           f"{a_seq} ({where(a.file, a.line)}): reordered")
        if a.seal == "close" and b.seal != "open":
            report.problem(b.file, b.line, f"writer {writer} seq {b_seq} follows the writer's closing seal "
                                           f"({where(a.file, a.line)}): inserted")

    # Each writer's part of each file: opened by a seal, closed by one.
    parts: dict[int, list[Record]] = {}
    for seq in seqs:
        parts.setdefault(chosen[seq].file, []).append(chosen[seq])
    for file, part in parts.items():
        part.sort(key=lambda r: r.line)
        head, tail = part[0], part[-1]
        if head.seal != "open":
            report.problem(head.file, head.line, f"writer {writer}'s part of this file does not start with its "
                                                 f"open seal: records before seq {head.seq} were removed")
        if tail.seal == "close":
            continue
        opened = next((r for r in reversed(part) if r.seal == "open"), head)
        host, pid = (opened.obj or {}).get("host"), (opened.obj or {}).get("pid")
        sealed = next((r for r in reversed(part) if r.seal and id(r) in valid_seals), None)
        after = f" after seq {sealed.seq} ({where(sealed.file, sealed.line)})" if sealed else ""
        unsealed = sum(1 for r in part if sealed is None or r.seq > sealed.seq)
        if file == last_file and isinstance(pid, int) and alive(host, pid):
            report.notes.append(f"writer {writer} (pid {pid}) is still running: its {unsealed} record"
                                f"{'s' if unsealed != 1 else ''}{after} are not sealed yet")
        else:
            report.problem(tail.file, tail.line, f"writer {writer}'s part of this file ends without its closing "
                                                 f"seal: truncated after this line, or pgproxy was killed; "
                                                 f"{unsealed} record{'s' if unsealed != 1 else ''}{after} "
                                                 "are not sealed")


def _alive(host, pid: int) -> bool:
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a pid reused by something else is not our writer
        return b"pgproxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
