"""Run the hot-path modules compiled by Cython when a build of their current source exists.

The modules in ``COMPILED_MODULES`` are plain Python and stay the one source: Cython
compiles them unchanged (pure-Python mode), and without a build they run as they are.
A build is never placed next to its ``.py``, so it can never go stale: each module is
built into

    .build/compiled/<key>/<module>.cpython-311-x86_64-linux-gnu.so

where ``key`` is the first 16 hex digits of the SHA-256 of the module's source (with its
.pxd, if it has one, and the build recipe, so a change of compiler options is a new key). ``install()`` puts
a finder first on ``sys.meta_path`` that, for the listed modules only, hashes the
``.py`` about to be imported and loads the extension built from exactly those bytes if
there is one; otherwise it steps aside and the ``.py`` is imported as usual. An edited
source is therefore simply pure Python until ``scripts/build-compiled`` runs again.

``PGPROXY_PURE=1`` turns the finder off (everything pure). ``loaded()`` says which
listed modules are running compiled. Builds are made by ``pgproxy._build``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

# The one list of modules compiled. A listed module whose .py does not exist is skipped.
COMPILED_MODULES = (
    "pgproxy.protocol.framing",
    "pgproxy.protocol.pipeline",
    "pgproxy.protocol.messages",
    "pgproxy.frontend.engine",
    "pgproxy.frontend.relay",
    "pgproxy.backend.identity",
    "pgproxy.audit_render",
)

# Part of every build key: bump when pgproxy._build changes how it compiles, so builds
# made the old way are no longer found.
BUILD_RECIPE = b"cython3 annotation_typing=False 1"

BUILD_DIR = Path(__file__).resolve().parent.parent / ".build" / "compiled"
EXT_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # .cpython-311-x86_64-linux-gnu.so


def pure_requested() -> bool:
    return os.environ.get("PGPROXY_PURE", "") not in ("", "0")


def source_path(name: str, root: Path | None = None) -> Path:
    """The .py of a listed module, under ``root`` (the directory holding ``pgproxy/``)."""
    root = Path(__file__).resolve().parent.parent if root is None else root
    return root.joinpath(*name.split(".")).with_suffix(".py")


def read_sources(py: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """A module's .py and, when there is one beside it, its .pxd (Cython declarations
    for the compiled build only): both are part of what a build is made from."""
    with open(py, "rb") as f:
        source = f.read()
    try:
        with open(os.path.splitext(py)[0] + ".pxd", "rb") as f:
            return source, f.read()
    except FileNotFoundError:
        return source, None


def build_key(source: bytes, pxd: bytes | None = None) -> str:
    digest = hashlib.sha256(BUILD_RECIPE + b"\0" + source)
    if pxd is not None:
        digest.update(b"\0pxd\0" + pxd)
    return digest.hexdigest()[:16]


def extension_path(name: str, sources: tuple[bytes, bytes | None], build_dir: Path = BUILD_DIR) -> Path:
    """Where the build of exactly these sources lives (whether or not it exists)."""
    return build_dir / build_key(*sources) / (name.rpartition(".")[2] + EXT_SUFFIX)


class CompiledFinder:
    """A meta-path finder for the listed modules: their build if it matches the source, else None."""

    def __init__(self, names=COMPILED_MODULES, build_dir: Path | None = None) -> None:
        self.names = frozenset(names)
        self.build_dir = build_dir  # None: the .build/compiled beside the tree the source is in

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            try:
                sources = read_sources(source)
            except OSError:
                continue
            # The build dir sits beside the package tree the source was found in, so a
            # copy of the tree uses its own builds (and none if it has none). Anything odd
            # about the path means pure Python, never a failed import.
            try:
                build_dir = Path(entry).parents[fullname.count(".") - 1] / ".build" / "compiled" \
                    if self.build_dir is None else self.build_dir
                extension = extension_path(fullname, sources, build_dir)
                if not extension.is_file():
                    return None
            except (OSError, ValueError, IndexError):
                return None
            loader = importlib.machinery.ExtensionFileLoader(fullname, str(extension))
            return importlib.util.spec_from_file_location(fullname, extension, loader=loader)
        return None

    def invalidate_caches(self) -> None:
        pass


_finder: CompiledFinder | None = None


def install() -> None:
    """Put the finder first on sys.meta_path (once), unless PGPROXY_PURE is set."""
    global _finder
    if _finder is not None or pure_requested():
        return
    _finder = CompiledFinder()
    sys.meta_path.insert(0, _finder)


def is_compiled(module) -> bool:
    spec = getattr(module, "__spec__", None)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def loaded() -> tuple[str, ...]:
    """The listed modules imported so far that are running compiled."""
    return tuple(name for name in COMPILED_MODULES if name in sys.modules and is_compiled(sys.modules[name]))


def log_fields() -> dict[str, str]:
    """For the startup log line: which present listed modules run compiled, which pure."""
    if pure_requested():
        return {"compiled": "none (PGPROXY_PURE is set)"}
    present = [name for name in COMPILED_MODULES if name in sys.modules]
    compiled = loaded()
    pure = [name for name in present if name not in compiled]
    fields = {"compiled": ",".join(compiled) or "none"}
    if pure:
        fields["pure"] = ",".join(pure)  # no build of their current source (scripts/build-compiled)
    return fields
