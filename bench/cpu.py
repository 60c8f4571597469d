"""CPU time of a process and everything under it, from /proc.

A proxy's cost per transaction is the CPU its own processes spend (user and system, as
the kernel accounts them in /proc/<pid>/stat) divided by the transactions carried in the
same interval. PgBouncer is one process; pgproxy is one process with ``workers = 1`` and a
supervisor plus its forked workers otherwise — so the tree under the root pid is summed.

``cutime``/``cstime`` (the CPU of children that exited and were waited for) are added too:
a worker that dies and is restarted within the interval keeps its share, and CPU that
reaped children spent before the interval is in both snapshots and cancels out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after the command name (which may hold spaces and parentheses), or None
    once the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, their children, ...), by ppid."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


@dataclass(frozen=True)
class Ticks:
    """Clock ticks (1/SC_CLK_TCK s) of user and system CPU, summed over a process tree."""
    user: int
    system: int

    def __sub__(self, other: "Ticks") -> "Ticks":
        return Ticks(self.user - other.user, self.system - other.system)


def tree_ticks(root: int) -> Ticks:
    user = system = 0
    for pid in (root, *descendants(root)):
        fields = _stat_fields(pid)
        if fields is None:  # exited between the scan and now: its parent's cutime has it once reaped
            continue
        # stat(5) fields 14-17: utime stime cutime cstime; here counted from field 3 (state)
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        user += utime + cutime
        system += stime + cstime
    return Ticks(user, system)


def per_transaction(spent: Ticks, transactions: int) -> dict:
    """Microseconds of CPU per transaction: user, system and their sum."""
    if transactions <= 0:
        return {}
    scale = 1e6 / CLK_TCK / transactions
    user, system = spent.user * scale, spent.system * scale
    return {"cpu_user_us": round(user, 2), "cpu_system_us": round(system, 2), "cpu_us": round(user + system, 2)}
