# Cython declarations for identity.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file, and identity.py stays the one source of behaviour.
#
# As a C type, the identity's own field reads are pointer loads instead of the generic
# attribute lookup a compiled __slots__ class gets. Other modules still read and set every
# field (``public``). Keep in step with identity.py: exactly its __slots__ (the build checks).

cdef class ConnectionIdentity:
    cdef public object key, person, prepared, pending, syncs, counter, unnamed_owner, unnamed_gen
