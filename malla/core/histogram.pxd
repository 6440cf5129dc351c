# Call durations, recorded in C.

@cython.final
cdef class LatencyHistogram:
    cdef uint64_t _counts[256]
    cdef public uint64_t count
    cdef public uint64_t sum_ns         # the real sum, for Prometheus's _sum
