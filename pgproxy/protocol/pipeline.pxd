# Cython declarations for pipeline.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file, and pipeline.py stays the one source of behaviour.
#
# As C types, an entry's and the pipeline's own field reads are pointer loads instead of
# the generic attribute lookup a compiled __slots__ class gets (slower there than in
# CPython 3.11's interpreter, which caches it). Other modules still read and set every
# field (``public``), except the queue's own bookkeeping. Keep in step with pipeline.py:
# exactly each class's __slots__ (the build checks that).

cdef class Expected:
    cdef public object kind, action, statement, reply, key, holder, text, name, own, client_statement

# The queue and the two counters are the pipeline's own (no other module reads them): as
# a C list and C integers, the per-message bookkeeping skips the object protocol.
cdef class Pipeline:
    cdef list _queue
    cdef Py_ssize_t _head, _special
    cdef public object _held, events
