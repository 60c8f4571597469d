# Cython declarations for engine.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file, and engine.py stays the one source of behaviour.
#
# Compiled without these declarations the engine ran no faster than pure Python: every
# ``self.x`` of a __slots__ class went through the generic attribute lookup (type
# dictionary, member descriptor), where CPython 3.11's interpreter has an inline cache.
# As C types, the engine's own reads and writes of its fields are pointer loads; other
# modules (the relay, the session, tests) still read and set every field, as ``public``.
#
# Keep in step with engine.py: the attributes declared here must be exactly each class's
# __slots__ (the build checks that and fails naming the difference).

cdef class Statement:
    cdef public object text, params, formats, started, t0, tags, sqlstate, verdict, changes

cdef class Engine:
    cdef public object mode, policy, trail, role, person, key, startup, signer, refuse_state
    cdef public object prepared_limit, state, backend, pipeline, scanner, actions, statements, portals
    cdef public object unnamed, unnamed_gen, pinned, waiting, txn_status, idle_since, skipping, attaching
    cdef public object sync_owed, changes_due, local_sync, described_types

    # The engine's own steps, called only from its own methods (never from another module
    # or a test): as cdef methods each call is a C call, not a method lookup, several times
    # per message (callgrind of bench.roundtrip: 2-3 % fewer instructions per round trip).
    cdef _send(self, frames)
    cdef _wait(self, frames)
    cdef _send_waiting(self)
    cdef _skip_to_sync(self, frames)
    cdef _query(self, raw, out)
    cdef _verdict(self, text, kind, out)
    cdef _parse(self, raw, out)
    cdef _bind(self, raw, out)
    cdef _execute(self, raw, out, next_kind)
    cdef _describe(self, raw, out)
    cdef _close(self, raw, out)
    cdef _carry(self, effects, statement, kind, out)
    cdef _prepare(self, key, out, quiet, client_statement=*)
    cdef _statement_on_backend(self, name, out)
    cdef _events(self)
    cdef _releasable(self)
    cdef _release(self)
