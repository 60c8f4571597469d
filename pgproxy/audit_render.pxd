# Cython declarations for audit_render.py, read only when it is compiled (pgproxy/_build.py);
# pure Python never sees this file, and audit_render.py stays the one source of behaviour.
#
# The renderer's caches and options as C fields, the pieces of a record as typed locals:
# the f-string becomes one join of known str pieces, and the cache lookups direct dict
# calls. Keep in step with audit_render.py: exactly StatementRenderer's __slots__ (the
# build checks that).

cimport cython

cdef object _json_str
cdef dict _verdict_cache
cdef long _second
cdef str _second_text

cdef class StatementRenderer:
    cdef readonly dict _texts, _tags  # (readonly: the tests look at their size)
    cdef Py_ssize_t _statement_limit, _parameter_limit
    cdef str _parameters

    @cython.locals(statement=str, extra=str, command=str, prefix=str, text=str, outcome=str)
    cpdef str render(self, tuple record)
    cdef str _text_json(self, str text)
    cdef str _cache_text(self, str text)
    cdef str _cache_tag(self, raw)
    cdef str _params_json(self, params, param_info)
    @cython.locals(fmt=Py_ssize_t, oid=Py_ssize_t, text=str)
    cdef str _param(self, Py_ssize_t index, value, formats_and_types)

cpdef str verdict_members(verdict)

@cython.locals(second=long, micro=long)
cpdef str iso(double ts)

@cython.locals(value=double, text=str)
cpdef str ms(double seconds)

cpdef tuple commands(list raw_tags)
