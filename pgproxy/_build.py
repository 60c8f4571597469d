"""Build the Cython extensions of the hot-path modules (see pgproxy/compiled.py).

    python -m pgproxy._build            build what is missing for the current sources, drop the rest
    python -m pgproxy._build --check    exit 1 if a listed module has no build of its current source
    python -m pgproxy._build --status   each listed module: compiled, pure (and why), or absent
    python -m pgproxy._build --bench    per-call times of the hot paths, compiled against pure

Each module is compiled from a snapshot of its source taken once: the bytes hashed for
the build key are the bytes compiled, so a file edited during a build can never end up
behind the key of another version. A build is written under a temporary name and renamed
into place, so an importer never sees half an extension.

Cython compiles the modules as they are, with ``annotation_typing=False``: annotations
stay hints, as in CPython (with it on, ``data: bytes`` would refuse a bytearray and an
``int`` argument would be type-checked), so compiled and pure behave the same.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pgproxy.compiled import COMPILED_MODULES, build_key, extension_path, read_sources, source_path

ROOT = Path(__file__).resolve().parent.parent

DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,  # see the module docstring; part of compiled.BUILD_RECIPE
}


def toolchain_missing() -> str | None:
    """Why extensions cannot be built here, or None when they can."""
    try:
        import Cython  # noqa: F401
    except ImportError:
        return "Cython is not installed (pip install 'cython>=3')"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(compiler):
        return f"no C compiler ({compiler})"
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python headers (Python.h in {include}; Debian: python3-dev)"
    return None


def present_modules(root: Path = ROOT) -> list[str]:
    """The listed modules whose .py exists (some are listed before they are written)."""
    return [name for name in COMPILED_MODULES if source_path(name, root).is_file()]


def stale_modules(root: Path = ROOT) -> list[str]:
    """Listed modules with no build of their current source."""
    build_dir = root / ".build" / "compiled"
    return [name for name in present_modules(root)
            if not extension_path(name, read_sources(source_path(name, root)), build_dir).is_file()]


def build(root: Path = ROOT, *, force: bool = False, jobs: int = 2, log=print) -> list[str]:
    """Build every listed module lacking a build of its current source; return those built."""
    build_dir = root / ".build" / "compiled"
    todo = []
    for name in present_modules(root):
        sources = read_sources(source_path(name, root))
        target = extension_path(name, sources, build_dir)
        if force or not target.is_file():
            todo.append((name, sources, target))
    if todo:
        why = toolchain_missing()
        if why:
            raise RuntimeError(f"cannot compile: {why}")
        build_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # Threads suffice: the C compiler runs as a child process.
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [(job[0], pool.submit(_build_one, *job, build_dir)) for job in todo]
        failed = [(name, future.exception()) for name, future in futures if future.exception() is not None]
        built = [name for name, future in futures if future.exception() is None]
        if built:
            log(f"compiled {len(built)} module(s) in {time.monotonic() - started:.1f}s: {', '.join(built)}")
        if failed:  # the others are built all the same: only these run as pure Python
            _prune(root, build_dir)
            raise RuntimeError("\n\n".join(str(exc) for _, exc in failed))
    _prune(root, build_dir)
    return [name for name, _, _ in todo]


def check_declarations(name: str, source: bytes, pxd: bytes) -> None:
    """A class the .pxd makes a C type keeps only the attributes declared there, so they
    must be exactly its __slots__: one added to the .py alone would be an AttributeError
    in the compiled build only. Raises RuntimeError naming the difference."""
    declared: dict[str, set[str]] = {}
    current = None
    for line in pxd.decode().splitlines():
        if match := re.match(r"cdef class (\w+)", line):
            current = declared.setdefault(match[1], set())
        elif line and not line[0].isspace():
            current = None
        elif current is not None and "(" not in line.split("#")[0] and (  # (a method declaration is no attribute)
                match := re.match(r"\s+cdef\s+(?:public\s+|readonly\s+)?\w+\s+(.+)", line)):
            current.update(part.strip() for part in match[1].split("#")[0].split(","))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name in declared:
            slots = next((ast.literal_eval(stmt.value) for stmt in node.body if isinstance(stmt, ast.Assign)
                          and any(getattr(t, "id", None) == "__slots__" for t in stmt.targets)), ())
            slots = {slots} if isinstance(slots, str) else set(slots)
            if slots != declared[node.name]:
                raise RuntimeError(
                    f"{name}: the .pxd declares {node.name}'s attributes as {sorted(declared[node.name])} but its "
                    f"__slots__ are {sorted(slots)}; make them the same")


def _build_one(name: str, sources: tuple[bytes, bytes | None], target: Path, build_dir: Path) -> None:
    if sources[1] is not None:
        check_declarations(name, *sources)
    leaf = name.rpartition(".")[2]
    with tempfile.TemporaryDirectory(prefix=f".{leaf}-", dir=build_dir) as tmp:
        # The snapshot keeps the module's path below the package root: tracebacks through
        # compiled code then name pgproxy/protocol/framing.py, as pure Python does.
        relative = Path(*name.split(".")).with_suffix(".py")
        snapshot = Path(tmp) / "src" / relative
        snapshot.parent.mkdir(parents=True)
        snapshot.write_bytes(sources[0])
        if sources[1] is not None:
            snapshot.with_suffix(".pxd").write_bytes(sources[1])
        # Cython and the C compiler in a child process: chdir for the relative source name,
        # and setuptools' global state stays out of the caller.
        code = (
            "import json, sys; from setuptools import Distribution, Extension; from Cython.Build import cythonize\n"
            "name, rel, tmp, directives = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
            # No debug info, and -O2 rather than Python's -O3: half the compile time, same speed.
            "ext = Extension(name, [rel], extra_compile_args=['-g0', '-O2'])\n"
            "dist = Distribution({'ext_modules': cythonize([ext], compiler_directives=directives, quiet=True,"
            " build_dir=tmp + '/c')})\n"
            "cmd = dist.get_command_obj('build_ext'); cmd.build_lib = tmp + '/lib'; cmd.build_temp = tmp + '/obj'\n"
            "cmd.ensure_finalized(); cmd.run(); print(cmd.get_ext_fullpath(name))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, name, str(relative), tmp, json.dumps(DIRECTIVES)],
            cwd=snapshot.parents[len(relative.parts) - 1], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {name} failed:\n{result.stdout}{result.stderr}")
        built = Path(result.stdout.strip().splitlines()[-1])
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copyfile(built, partial)
        os.replace(partial, target)


def _prune(root: Path, build_dir: Path) -> None:
    """Drop builds of sources that no longer exist, so .build holds one per module."""
    if not build_dir.is_dir():
        return
    current = {build_key(*read_sources(source_path(name, root))) for name in present_modules(root)}
    for entry in build_dir.iterdir():
        if _is_key(entry.name) and entry.is_dir() and entry.name not in current:
            shutil.rmtree(entry, ignore_errors=True)


def _is_key(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def status_lines(root: Path = ROOT) -> list[str]:
    build_dir = root / ".build" / "compiled"
    lines = []
    for name in COMPILED_MODULES:
        path = source_path(name, root)
        if not path.is_file():
            lines.append(f"{name}: no source yet")
            continue
        target = extension_path(name, read_sources(path), build_dir)
        state = "built" if target.is_file() else "pure (no build of the current source)"
        lines.append(f"{name}: {state}" + (f"  {target.relative_to(root)}" if target.is_file() else ""))
    return lines


# --- the micro-benchmark ------------------------------------------------------------

_BENCH = r'''
import json, struct, sys, time, timeit
import pgproxy.compiled
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader, ServerStreamScanner
from pgproxy.protocol.pipeline import EXECUTE, SYNC, WANTED, Expected, Pipeline

class Owner:
    def parameter(self, body): pass
    def ready(self, status, idle): pass
    def statement_done(self, statement, outcome): pass
    def statement_error(self, statement, body): pass
    def described(self, payload, body): pass

class Statement:
    __slots__ = ("tags", "sqlstate")
    def __init__(self): self.tags, self.sqlstate = [], None

# A typical select-only reply (pgbench -S over the extended protocol): BindComplete,
# one DataRow, CommandComplete, ReadyForQuery, in one read.
row = msg.message(b"D", struct.pack("!hi", 1, 5) + b"12345")
reply = (msg.message(b"2") + row + msg.command_complete("SELECT 1") + msg.ready_for_query(b"I"))
# A larger reply: RowDescription and 50 rows of 3 columns, in one read.
desc = msg.message(b"T", struct.pack("!h", 3) + b"".join(
    name + b"\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0) for name in (b"a", b"b", b"c")))
wide_row = msg.message(b"D", struct.pack("!h", 3) + b"".join(struct.pack("!i", 8) + b"%08d" % i for i in range(3)))
big = desc + wide_row * 50 + msg.command_complete("SELECT 50") + msg.ready_for_query(b"I")
# What the client sends for that select: Bind, Execute, Sync in one write; and a simple Query.
client = (msg.bind_message("", "S_1", [b"12345"]) + msg.execute_message() + msg.SYNC)
simple = msg.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345")
bind_body = msg.bind_message("", "S_1", [b"12345"])[5:]
parse_body = msg.parse_message("S_1", "SELECT abalance FROM pgbench_accounts WHERE aid = $1", (23,))[5:]

def per_call(fn):
    # CPU time of this process, not wall time: the machine is shared, and time spent
    # descheduled is not the code's. Best of several repeats.
    number = 20000
    best = min(timeit.repeat(fn, timer=time.process_time, number=number, repeat=5))
    return best / number * 1e9

scanner = ServerStreamScanner(WANTED, 1 << 20)
reader = MessageReader(1 << 20)
owner, statement = Owner(), Statement()
try:
    pipeline = Pipeline()  # events appended to pipeline.events
except TypeError:
    pipeline = Pipeline(owner)  # events as calls on an owner (before the sans-IO engine)
events = getattr(pipeline, "events", [])
found = scanner.feed(reply)

def pipeline_server():
    pipeline.expect(Expected(EXECUTE, statement=statement))
    pipeline.expect(Expected(SYNC))
    statement.tags.clear()
    pipeline.server(reply, found)
    events.clear()

def pipeline_both():
    pipeline.expect(Expected(EXECUTE, statement=statement))
    pipeline.expect(Expected(SYNC))
    statement.tags.clear()
    pipeline.server(reply, scanner.feed(reply))
    events.clear()

results = {
    "compiled": list(pgproxy.compiled.loaded()),
    "ServerStreamScanner.feed, select-only reply (4 messages)": per_call(lambda: scanner.feed(reply)),
    "ServerStreamScanner.feed, 50-row reply": per_call(lambda: scanner.feed(big)),
    "MessageReader.feed, Bind+Execute+Sync": per_call(lambda: reader.feed(client)),
    "MessageReader.feed, simple Query": per_call(lambda: reader.feed(simple)),
    "Pipeline.server, select-only reply (expect + server)": per_call(pipeline_server),
    "scan + Pipeline.server, select-only reply": per_call(pipeline_both),
    "messages.parse_bind, one text parameter": per_call(lambda: msg.parse_bind(bind_body)),
    "messages.parse_parse": per_call(lambda: msg.parse_parse(parse_body)),
    "messages.parse_command_tag": per_call(lambda: msg.parse_command_tag(b"SELECT 1\0")),
}
try:  # the audit record of pgbench -S: simple (a new text each time) and prepared (one parameter)
    from pgproxy.audit_render import StatementRenderer
    renderer = StatementRenderer(4096, 1024, "full")
    prefix = '"session": "0123456789abcdef", "user": "alice", "role": "analyst", "auth_method": "jwt"'
    simple_record = (1765000000.123456, prefix, "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", None,
                     None, [b"SELECT 1"], 0.000123, "ok", None, 4242, None)
    prepared_record = (1765000000.123456, prefix, "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                       [b"12345"], ([0], (23,)), [b"SELECT 1"], 0.000123, "ok", None, 4242, None)
    results["StatementRenderer.render, simple"] = per_call(lambda: renderer.render(simple_record))
    results["StatementRenderer.render, prepared, one parameter"] = per_call(lambda: renderer.render(prepared_record))
except ImportError:  # a tree from before the renderer
    pass
json.dump(results, sys.stdout)
'''


def bench(root: Path = ROOT, rounds: int = 3) -> int:
    """Run the micro-benchmark in two fresh interpreters, compiled and pure; print a table."""
    runs: dict[str, dict] = {"compiled": {}, "pure": {}}
    for _ in range(rounds):  # alternated, best of each: other load on the machine comes and goes
        for label, pure in (("compiled", "0"), ("pure", "1")):
            env = dict(os.environ, PGPROXY_PURE=pure)
            out = subprocess.run([sys.executable, "-c", _BENCH], env=env, cwd=root, capture_output=True,
                                 text=True, check=True).stdout
            for name, value in json.loads(out).items():
                best = runs[label].get(name)
                runs[label][name] = value if best is None or name == "compiled" else min(best, value)
    compiled, pure = runs["compiled"], runs["pure"]
    print(f"running compiled: {', '.join(compiled.pop('compiled')) or 'nothing (build first)'}")
    pure.pop("compiled")
    width = max(map(len, pure))
    print(f"{'per call':<{width}}  {'pure':>9}  {'compiled':>9}  speedup")
    for name, pure_ns in pure.items():
        ns = compiled[name]
        print(f"{name:<{width}}  {pure_ns:>7.0f}ns  {ns:>7.0f}ns  {pure_ns / ns:5.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgproxy._build", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if a build is missing or stale")
    group.add_argument("--status", action="store_true", help="say what each listed module runs as")
    group.add_argument("--bench", action="store_true", help="time the hot paths, compiled against pure")
    parser.add_argument("--force", action="store_true", help="rebuild even what is current")
    parser.add_argument("--if-possible", action="store_true",
                        help="without Cython or a C compiler, or when a module fails to compile, say so and "
                             "exit 0 (those modules run as pure Python)")
    args = parser.parse_args(argv)
    if args.status:
        print("\n".join(status_lines()))
        return 0
    if args.check:
        stale = stale_modules()
        for name in stale:
            print(f"{name}: no build of the current source", file=sys.stderr)
        return 1 if stale else 0
    if args.bench:
        return bench()
    if stale_modules() or args.force:
        why = toolchain_missing()
        if why:
            print(f"not compiling the hot-path modules: {why}; pgproxy runs them as pure Python",
                  file=sys.stderr)
            return 0 if args.if_possible else 2
    try:
        build(force=args.force, log=lambda text: print(text, file=sys.stderr))
    except RuntimeError as exc:  # a module Cython cannot compile: say which and why, no traceback
        print(exc, file=sys.stderr)
        if args.if_possible:
            print("those modules run as pure Python until they compile", file=sys.stderr)
            return 0
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
