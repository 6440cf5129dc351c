# What waits to be written: small frames coalesced per loop tick, large
# messages a frame per round, the window of the peer's credit.

@cython.final
cdef class _LargeMessage:
    cdef uint8_t ftype
    cdef uint8_t flags
    cdef uint64_t sid
    cdef list parts
    cdef Py_ssize_t part_index, part_offset
    cdef Py_ssize_t length, sent
    cdef Py_ssize_t chunk
    cdef bint cancel_after          # send a CANCEL after its last frame

    cdef int take_into(self, list bufs, Py_ssize_t n) except -1


# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class OutQueue:
    cdef list large                 # _LargeMessage, in the order of the next round
    cdef Py_ssize_t queued          # bytes of large messages not yet written
    cdef bint backlog               # large messages queued behind the streaming one
    cdef Py_ssize_t window          # bytes the peer may have unacknowledged (0: not paced)
    cdef Py_ssize_t credit          # bytes of large frames we may still send
    # coalescing of small frames, per loop tick
    cdef bint _wrote_this_tick
    cdef bint _busy_tick
    cdef int _queued_this_tick

    cdef int add_large(self, WriteBuffer wb, Py_ssize_t start, Py_ssize_t length,
                       Py_ssize_t max_frame_size) except -1
    cdef int round(self, list bufs) except -1
    cdef bint can_send(self)
    cdef bint drained(self)
    cdef bint cancel(self, uint64_t sid, bint cancel_inside) except -1
    cdef bint write_now(self, Py_ssize_t in_flight)
    cdef void end_tick(self)
    cdef void clear(self)
