# What this side learns of a peer from its own calls: latency per service.

cdef struct SentCall:
    uint64_t sid
    double sent
    PyObject* lat       # borrowed: a Latency its book's dict holds


cdef struct Seen:
    double base         # seconds, floored at 1 us; -1 for a node not connected
    double typical      # its median estimate, or its base before one
    double cost
    double sent         # when this side last sent the node a call of the service
    Py_ssize_t in_flight    # this side's calls waiting on the node (0 if not connected)


@cython.final
cdef class ServiceMean:
    cdef double value
    cdef bint sampled


@cython.final
cdef class Latency:
    cdef double avg
    cdef double at
    cdef double sent_at     # when this side last sent it a call of the service
    cdef double low         # the fastest reply of this window (latency.pyx: base)
    cdef double low_prev    # ... and of the window before
    cdef int low_n          # replies in this window
    cdef double med         # a running estimate of its median reply (latency.pyx)
    cdef bint sampled
    cdef ServiceMean mean
    cdef int sample(self, double seconds, bint failed, double now,
                    bint base=*) except -1
    cdef int at_least(self, double seconds, double now) except -1
    cdef inline void _low(self, double seconds) noexcept
    cdef inline double base(self) noexcept
    cdef double read(self, double now) noexcept
    cdef inline double _decayed(self, double now) noexcept


@cython.final
cdef class LatencyBook:
    cdef dict by_service
    cdef SentCall* _ring
    cdef Pending _pending           # the connection's calls in flight
    cdef Latency of(self, str service)
    cdef double sent(self, uint64_t sid, str service) except -1
    cdef int ended(self, uint64_t sid, int outcome) except -1
    cdef int refused(self, uint64_t sid, object err) except -1
    cdef double cost_of(self, str service, Py_ssize_t in_flight, double now)
    cdef int seen(self, str service, Py_ssize_t in_flight, double now, Seen* out) except -1
