# Dispatch: an incoming call, the one rule set it must pass, and what the
# core knows of a running service.

@cython.final
cdef class IncomingCall:
    cdef readonly uint64_t sid
    cdef readonly bint cast
    cdef readonly str service
    cdef readonly str fun
    cdef readonly list args
    cdef readonly dict kwargs       # None when there are none
    cdef readonly object timeout    # the caller's timeout in ms (0: a cast)
    cdef readonly object deadline   # the caller's remaining budget in ms, or None
    cdef readonly object meta
    cdef readonly object trace      # the trace context, or None
    cdef readonly Py_ssize_t window  # a STREAM's window of items (0: a CALL or CAST)


@cython.final
cdef class CallContext:
    cdef readonly str caller
    cdef readonly str service
    cdef readonly str function
    cdef readonly object meta
    cdef readonly object timeout
    cdef readonly object deadline_at    # time.monotonic() seconds, or None
    cdef readonly bint in_process
    cdef readonly bint cast


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
    cdef public object allow        # malla.authz.Policy, or None: anyone may call
    cdef dict _verdicts             # caller -> fun -> bool: allow's verdicts, cached
    cdef public double mean_time    # s: the recent mean time of its handlers (0: none yet)

    cdef tuple _refusal(self, str fun, object args, dict kwargs, object deadline, str caller)
    cdef str _denial(self, str fun, str caller)
    cdef object _retry_after_ms(self)
