"""The hot-path modules run compiled when a build of their current source exists, as
pure Python otherwise or with PGPROXY_PURE=1, and the two behave the same.

Each check imports pgproxy in a fresh interpreter: which file a module comes from is
decided once, at its first import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgproxy import _build, compiled

ROOT = Path(__file__).resolve().parents[2]
WHY_NOT = _build.toolchain_missing()
needs_build = pytest.mark.skipif(WHY_NOT is not None, reason=f"cannot compile here: {WHY_NOT}")

# Prints where each listed module was loaded from, and what compiled.loaded() says.
PROBE = r"""
import importlib, json, sys
import pgproxy, pgproxy.compiled
names = sys.argv[1:]
files = {name: importlib.import_module(name).__file__ for name in names}
print(json.dumps({"pgproxy": pgproxy.__file__, "files": files, "loaded": list(pgproxy.compiled.loaded()),
                  "log": pgproxy.compiled.log_fields()}))
"""


def _run(code: str, args=(), *, tree: Path, pure: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter that imports pgproxy from ``tree``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGPROXY_PURE", "PYTHONPATH")}
    if pure:
        env["PGPROXY_PURE"] = "1"
    env["PYTHONPATH"] = str(tree)
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _key(tree: Path, name: str) -> str:
    return compiled.build_key(*compiled.read_sources(compiled.source_path(name, tree)))


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source / "pgproxy", target / "pgproxy", ignore=shutil.ignore_patterns("__pycache__"))
    if (source / ".build").is_dir():
        shutil.copytree(source / ".build", target / ".build")
    return target


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A snapshot of the package with a current build of it: others may be editing the
    checkout's modules while the tests run. Builds the checkout already has are reused."""
    snapshot = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "pgproxy", snapshot / "pgproxy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in _build.present_modules(snapshot):
        made = ROOT / ".build" / "compiled" / _key(snapshot, name)
        if made.is_dir():
            shutil.copytree(made, snapshot / ".build" / "compiled" / made.name)
    _build.build(snapshot, log=lambda text: None)
    assert _build.stale_modules(snapshot) == []
    return snapshot


def test_the_list_names_the_protocol_modules_and_pgproxy_installs_the_finder_first():
    assert {"pgproxy.protocol.framing", "pgproxy.protocol.pipeline",
            "pgproxy.protocol.messages"} <= set(_build.present_modules(ROOT))
    if not compiled.pure_requested():
        assert isinstance(sys.meta_path[0], compiled.CompiledFinder)


@needs_build
def test_with_the_build_present_the_listed_modules_load_from_their_extensions(tree):
    present = _build.present_modules(tree)
    seen = _run(PROBE, present, tree=tree)
    assert Path(seen["pgproxy"]).is_relative_to(tree)  # the snapshot is imported, not the checkout
    for name, file in seen["files"].items():
        assert Path(file) == tree / ".build" / "compiled" / _key(tree, name) / (
            name.rpartition(".")[2] + compiled.EXT_SUFFIX), name
    assert seen["loaded"] == present and seen["log"] == {"compiled": ",".join(present)}


@needs_build
def test_pgproxy_pure_loads_every_listed_module_from_its_py(tree):
    present = _build.present_modules(tree)
    seen = _run(PROBE, present, tree=tree, pure=True)
    assert seen["files"] == {name: str(compiled.source_path(name, tree)) for name in present}
    assert seen["loaded"] == [] and seen["log"] == {"compiled": "none (PGPROXY_PURE is set)"}


@needs_build
def test_an_edited_source_runs_as_pure_python_and_never_loads_its_stale_build(tree, tmp_path):
    names = ["pgproxy.protocol.framing", "pgproxy.protocol.pipeline"]
    copy = _copy(tree, tmp_path)
    assert set(names) <= set(_run(PROBE, names, tree=copy)["loaded"])  # the copy uses its own builds
    framing = copy / "pgproxy" / "protocol" / "framing.py"
    framing.write_text(framing.read_text() + "\nEDITED = True\n")
    seen = _run(PROBE, names, tree=copy)
    assert seen["files"]["pgproxy.protocol.framing"] == str(framing)
    assert "pgproxy.protocol.framing" not in seen["loaded"]
    assert "pgproxy.protocol.pipeline" in seen["loaded"]  # the unedited module still runs compiled
    assert seen["log"]["pure"] == "pgproxy.protocol.framing"  # and the startup log line says so


@needs_build
def test_an_edited_pxd_makes_the_build_stale_too(tree, tmp_path):
    copy = _copy(tree, tmp_path)
    pxd = copy / "pgproxy" / "protocol" / "framing.pxd"
    pxd.write_text(pxd.read_text() + "\n# edited\n")
    seen = _run(PROBE, ["pgproxy.protocol.framing"], tree=copy)
    assert seen["files"]["pgproxy.protocol.framing"] == str(pxd.with_suffix(".py"))
    assert "pgproxy.protocol.framing" not in seen["loaded"] and "pgproxy.protocol.messages" in seen["loaded"]


def test_the_build_key_follows_the_source_the_declarations_and_the_recipe(monkeypatch):
    key = compiled.build_key(b"x = 1\n")
    assert len(key) == 16 and key == compiled.build_key(b"x = 1\n")
    assert compiled.build_key(b"x = 2\n") != key
    assert compiled.build_key(b"x = 1\n", b"cdef int x\n") != key
    monkeypatch.setattr(compiled, "BUILD_RECIPE", compiled.BUILD_RECIPE + b" changed")
    assert compiled.build_key(b"x = 1\n") != key


def test_the_finder_only_answers_for_listed_modules_that_have_a_matching_build(tmp_path):
    package = tmp_path / "pgproxy" / "protocol"
    package.mkdir(parents=True)
    (package / "framing.py").write_text("X = 1\n")
    (package / "other.py").write_text("X = 1\n")
    finder = compiled.CompiledFinder()
    assert finder.find_spec("pgproxy.protocol.framing", [str(package)]) is None  # no build
    target = compiled.extension_path("pgproxy.protocol.framing", compiled.read_sources(package / "framing.py"),
                                     tmp_path / ".build" / "compiled")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")  # its presence is what the finder looks at; loading is the loader's
    spec = finder.find_spec("pgproxy.protocol.framing", [str(package)])
    assert spec is not None and spec.origin == str(target)
    assert finder.find_spec("pgproxy.protocol.other", [str(package)]) is None  # not listed
    (package / "framing.py").write_text("X = 2\n")
    assert finder.find_spec("pgproxy.protocol.framing", [str(package)]) is None  # edited: stale


def test_the_build_refuses_declarations_that_differ_from_the_slots():
    declared = [name for name in compiled.COMPILED_MODULES
                if compiled.read_sources(compiled.source_path(name, ROOT))[1] is not None]
    assert {"pgproxy.protocol.framing", "pgproxy.frontend.engine", "pgproxy.protocol.pipeline"} <= set(declared)
    for name in declared:
        _build.check_declarations(name, *compiled.read_sources(compiled.source_path(name, ROOT)))
    source, pxd = compiled.read_sources(compiled.source_path("pgproxy.protocol.framing", ROOT))
    widened = source.replace(b'__slots__ = ("_buf", "_max")', b'__slots__ = ("_buf", "_max", "_extra")')
    assert widened != source
    with pytest.raises(RuntimeError, match=r"MessageReader's attributes as \['_buf', '_max'\] but its __slots__"):
        _build.check_declarations("pgproxy.protocol.framing", widened, pxd)


@needs_build
def test_building_again_is_a_no_op_and_old_builds_are_dropped(tree, tmp_path):
    copy = _copy(tree, tmp_path)
    old = copy / ".build" / "compiled" / "0123456789abcdef"
    old.mkdir()
    assert _build.build(copy, log=lambda text: None) == []
    assert not old.exists()
    assert sorted(p.name for p in (copy / ".build" / "compiled").iterdir()) == sorted(
        _key(copy, name) for name in _build.present_modules(copy))


# The same inputs through the compiled and the pure modules, compared byte for byte:
# a stream of server replies cut at random points, client messages likewise, and the
# pipeline's output and events for a mix of forwarded and swallowed replies.
SAME = r"""
import json, random, struct, sys
import pgproxy.compiled
from pgproxy.errors import PgProxyError
from pgproxy.protocol import messages as msg
from pgproxy.protocol.framing import MessageReader, ServerStreamScanner
from pgproxy.protocol import pipeline as pl

rng = random.Random(15)
def m(kind, body=b""): return msg.message(kind, body)
row = m(b"D", struct.pack("!hi", 1, 3) + b"abc")
replies = [m(b"1"), m(b"2"), row, row, msg.command_complete("SELECT 2"), msg.ready_for_query(b"I"),
           m(b"E", b"SERROR\0C42P01\0Mno\0\0"), msg.parameter_status("TimeZone", "UTC"), m(b"n"),
           m(b"s"), m(b"I"), m(b"3"), m(b"A", b"x" * 300)]
stream = b"".join(rng.choice(replies) for _ in range(400))
out = []
for max_body in (1 << 20, 100):
    scanner = ServerStreamScanner(pl.WANTED, max_body)
    pos = 0
    try:
        while pos < len(stream):
            step = rng.choice((1, 2, 5, 7, 64, 4096))
            out.append([list(t) for t in [(k, b.hex(), e) for k, b, e in scanner.feed(stream[pos:pos + step])]])
            pos += step
    except PgProxyError as exc:
        out.append(["error", exc.sqlstate, exc.message])
    out.append(scanner.at_boundary)
client = b"".join([msg.bind_message("", "s", [b"1", b"22"]), msg.execute_message(), msg.SYNC, msg.query("SELECT 1"),
                   msg.parse_message("s", "SELECT $1", (23,))] * 30) + b"Q\0\0\0\x03"
for max_size in (1 << 20, 40):
    reader = MessageReader(max_size)
    pos = 0
    try:
        while pos < len(client):
            step = rng.choice((1, 3, 5, 9, 100))
            chunk = client[pos:pos + step]
            out.append([[k, raw.hex()] for k, raw in reader.feed(bytearray(chunk) if step == 3 else chunk)])
            pos += step
    except PgProxyError as exc:
        out.append(["error", exc.sqlstate, exc.message, reader.buffered])
for body in (client[5:client.index(b"E", 5)], b"\0", b"p\0s\0\0\0\0\1\0\0\0\xff"):
    try:
        bind = msg.parse_bind(body)
        out.append([bind.portal, bind.statement, bind.param_formats, [p and p.hex() for p in bind.params], bind.tail])
    except PgProxyError as exc:
        out.append(["error", exc.sqlstate, exc.message])
out.append([list(msg.parse_command_tag(t)) for t in (b"SELECT 3\0", b"INSERT 0 1\0", b"BEGIN\0", b"")])

class Statement:
    def __init__(self): self.tags, self.sqlstate = [], None
def plain(value):  # events hold objects: compare what they say, not where they live
    if isinstance(value, (bytes, bytearray)): return value.hex()
    if isinstance(value, pl.Expected): return ["entry", value.kind, value.action]
    if isinstance(value, Statement): return ["statement", [t.hex() for t in value.tags], value.sqlstate]
    if isinstance(value, (tuple, list)): return [plain(v) for v in value]
    return value if value is None or isinstance(value, (int, str, bool)) else type(value).__name__
class Owner:  # for the pipeline before the sans-IO engine: its events as calls
    def __getattr__(self, name): return lambda *args: out.append([name, plain(args)])
try:
    pipeline = pl.Pipeline()
except TypeError:
    pipeline = pl.Pipeline(Owner())
scanner = ServerStreamScanner(pl.WANTED, 1 << 20)
sent = []
for _ in range(60):
    statement = Statement()
    actions = [pl.FORWARD, pl.QUIET, pl.SWALLOW]
    result = row + msg.command_complete("SELECT 1") if rng.random() < 0.8 else m(b"E", b"SERROR\0C22012\0Mx\0\0")
    for kind, reply in ((pl.PARSE, m(b"1")), (pl.BIND, m(b"2")), (pl.EXECUTE, result)):
        pipeline.expect(pl.Expected(kind, rng.choice(actions), statement=statement if kind == pl.EXECUTE else None))
        sent.append(reply)
    pipeline.expect(pl.Expected(pl.SYNC))
    sent.append(msg.ready_for_query(b"I"))
stream = b"".join(sent)
pos = 0
while pos < len(stream):
    step = rng.choice((1, 6, 13, 200))
    chunk = stream[pos:pos + step]
    out.append([b.hex() for b in pipeline.server(chunk, scanner.feed(chunk))])
    out.append(plain(getattr(pipeline, "events", [])))
    getattr(pipeline, "events", []).clear()
    pos += step
print(json.dumps({"loaded": list(pgproxy.compiled.loaded()), "out": out}))
"""


@needs_build
def test_compiled_and_pure_give_the_same_results_on_the_same_input(tree):
    runs = {pure: _run(SAME, tree=tree, pure=pure) for pure in (False, True)}
    assert runs[False]["loaded"] == [n for n in _build.present_modules(tree) if n.startswith("pgproxy.protocol.")]
    assert runs[True]["loaded"] == []
    assert runs[False]["out"] == runs[True]["out"]
    assert any(isinstance(item, list) and item[:1] == ["error"] for item in runs[True]["out"])  # errors compared too



# For each class a .pxd declares: whether its __slots__ are still slots (member
# descriptors, as in pure Python) or fields of a C type, which the .pxd asks for.
TYPES = r"""
import importlib, json, re, types
import pgproxy.compiled as compiled
out = {}
for name in compiled.COMPILED_MODULES:
    pxd = compiled.read_sources(compiled.source_path(name))[1]
    if pxd is None:
        continue
    module = importlib.import_module(name)
    for cls_name in re.findall(r"^cdef class (\w+)", pxd.decode(), re.M):
        cls = getattr(module, cls_name)
        out[f"{name}.{cls_name}"] = any(isinstance(vars(cls).get(slot), types.MemberDescriptorType)
                                        for slot in cls.__slots__)
print(json.dumps({"loaded": list(compiled.loaded()), "slots": out}))
"""


@needs_build
def test_the_declared_classes_are_c_types_when_compiled(tree):
    """The engine's, the relay's, the pipeline's and the identity's fields are C fields in the compiled
    build (what makes it faster: python -m bench.ab), slots in the pure one."""
    compiled_run, pure_run = (_run(TYPES, tree=tree, pure=pure) for pure in (False, True))
    assert {"pgproxy.frontend.engine.Engine", "pgproxy.frontend.engine.Statement", "pgproxy.protocol.pipeline.Pipeline",
            "pgproxy.protocol.pipeline.Expected", "pgproxy.backend.identity.ConnectionIdentity",
            "pgproxy.frontend.relay.Relay"} <= set(pure_run["slots"])
    assert all(pure_run["slots"].values()) and pure_run["loaded"] == []
    assert not any(compiled_run["slots"].values()), compiled_run
    assert set(compiled_run["loaded"]) == set(compiled.COMPILED_MODULES)
