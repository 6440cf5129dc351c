# What the core knows of a running service.

cdef class ServiceEntry:
    cdef public str name
    cdef public dict funcs
    cdef public dict kinds
    cdef public dict arity          # fun -> (least, most) positional arguments
    cdef public dict checks         # fun -> malla.arguments.Checker
    cdef public bint paused
    cdef public bint fast
    cdef public int running
    cdef public int max_concurrency
