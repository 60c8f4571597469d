"""pgproxy: an identity-aware PostgreSQL wire-protocol proxy."""

__version__ = "0.1.0"

# Before any submodule is imported: the hot-path modules load from their Cython build
# when one exists for their current source (see pgproxy/compiled.py; PGPROXY_PURE=1 = off).
from pgproxy import compiled as _compiled  # noqa: E402

_compiled.install()
