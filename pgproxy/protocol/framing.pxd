# Cython declarations for framing.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file, and framing.py stays the one source of behaviour.
#
# Measured (python -m pgproxy._build --bench): compiled without these declarations the
# scanner gains 1.2x; with them, 1.8x on a select-only reply and 2.7x on a 50-row one,
# because the counters become C integers and attribute reads C field reads.
#
# Keep in step with framing.py: a class declared here has exactly the attributes declared
# here (one set anyway is an AttributeError, in the compiled build only), so they must be
# its __slots__; the build checks that and fails naming the difference. The attributes are
# then private to the module, as they are meant to be.
# The counters are Py_ssize_t: message lengths are at most 2**32 - 1, so they fit.

cimport cython

@cython.locals(i=Py_ssize_t)
cpdef Py_ssize_t first_outside(list frames, frozenset kinds)

cdef class MessageReader:
    cdef object _buf  # b"" or, while it holds part of a message, a bytearray
    cdef Py_ssize_t _max

    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, max_size=Py_ssize_t, length=Py_ssize_t, stop=Py_ssize_t)
    cpdef list _split(self, data)

cdef class ServerStreamScanner:
    cdef frozenset _wanted
    cdef Py_ssize_t _max, _skip, _kind, _need
    cdef bytes _head, _body

    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, take=Py_ssize_t, length=Py_ssize_t, size=Py_ssize_t)
    cpdef list feed(self, data)
