# The calls this side waits for, their deadlines, and the pings.

cdef struct TimerEntry:
    double deadline
    uint64_t sid


# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class Pending:
    cdef dict calls                 # stream id -> future of the reply
    cdef dict pings                 # stream id -> future of the answering HEARTBEAT
    # the calls' deadlines: a binary min-heap of (deadline, sid) in C memory
    cdef TimerEntry* _heap
    cdef Py_ssize_t _len
    cdef Py_ssize_t _size

    cdef int add_deadline(self, uint64_t sid, double deadline) except -1
    cdef object pop(self, uint64_t sid)
    cdef double next_deadline(self)
    cdef uint64_t next_expired(self, double now)
    cdef int fail_all(self, object exc_factory) except -1
    cdef int _push(self, double deadline, uint64_t sid) except -1
    cdef void _sift_down(self, Py_ssize_t i)
    cdef void _pop_top(self)
    cdef int _compact(self) except -1
