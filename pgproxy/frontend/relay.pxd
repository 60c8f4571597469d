# Cython declarations for relay.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file. As in engine.pxd: a C type, so the relay's reads of
# its own fields on every message are pointer loads, not generic attribute lookups.
#
# Keep in step with relay.py: exactly Relay's __slots__ (the build checks that).

cdef class Relay:
    cdef public object session, pool, engine, audit, metrics, acquiring, durable_due, held, client_paused, _running
