# Messages arriving in several frames.

cdef enum ScanState:
    SCAN_TOKEN = 0      # at the first byte of a msgpack token
    SCAN_HEAD = 1       # inside a token's header
    SCAN_COPY = 2       # inside a payload kept in the skeleton
    SCAN_DETACH = 3     # inside a bin payload going to its own bytes object


# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class Reassembly:
    cdef uint8_t ftype
    cdef uint8_t flags
    cdef bint dropped
    cdef bint cancelled             # a CANCEL came while it arrived: never run
    cdef bint over_budget           # dropped: too much in progress from the peer
    cdef WriteBuffer skeleton
    cdef list detached
    cdef Py_ssize_t detach_min
    cdef Py_ssize_t limit
    cdef Py_ssize_t received
    cdef Py_ssize_t unfilled        # reserved in detached values, not yet written
    # the token scanner
    cdef ScanState state
    cdef unsigned char head[9]
    cdef Py_ssize_t head_len
    cdef Py_ssize_t head_need
    cdef Py_ssize_t left
    cdef char* dst

    cdef int feed(self, const char* p, Py_ssize_t n) except -1
    cdef inline Py_ssize_t footprint(self)
    cdef void drop(self)
    cdef int _token(self) except -1
    cdef int finish(self) except -1


# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class Partials:
    cdef dict parts                 # stream id -> Reassembly
    cdef Py_ssize_t bytes           # what they hold or have reserved, in all
    cdef Py_ssize_t consumed        # bytes of counted frames read, not yet acknowledged
    cdef uint64_t max_message_size

    cdef bint continues(self, Frame* f)
    cdef Reassembly feed(self, Frame* f, bint acknowledge)
    cdef int _drop(self, Reassembly part) except -1
    cdef int cancel(self, uint64_t sid, bint forget) except -1
    cdef void clear(self)
