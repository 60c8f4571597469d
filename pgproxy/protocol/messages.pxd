# Cython declarations for messages.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file, and messages.py stays the one source of behaviour.
#
# Only the two decoders run for every statement are declared. Compiled without these
# declarations they are slower than pure Python (0.86x: CPython 3.11's specialising
# interpreter calls bytes and str methods faster than Cython's generic calls); knowing
# the body is bytes, Cython calls those methods directly: 1.5x (python -m pgproxy._build
# --bench). The one difference this makes: compiled, a body that is not bytes (or None)
# is a TypeError at the call instead of working or failing inside. Every caller passes a
# body cut by framing.py, which is always bytes.

cimport cython

@cython.locals(portal_end=Py_ssize_t, statement_end=Py_ssize_t, pos=Py_ssize_t, n_formats=Py_ssize_t,
               n_params=Py_ssize_t, end=Py_ssize_t, size=Py_ssize_t)
cpdef parse_bind(bytes body)

@cython.locals(tag=str, head=str, last=str)
cpdef tuple parse_command_tag(bytes body)
