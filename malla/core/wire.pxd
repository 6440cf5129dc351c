# The byte side of one connection: its states, its buffers and queues.

cdef enum ConnState:
    CS_HANDSHAKE = 0
    CS_READY = 1
    CS_CLOSING = 2
    CS_CLOSED = 3


cdef class Wire:
    cdef object __weakref__         # (the debug build's registry of live protocols)
    cdef object _loop
    cdef object _transport
    cdef public object owner
    cdef ConnState _state
    cdef FrameReader _reader
    cdef Partials _partials
    cdef WriteBuffer _wbuf
    cdef OutQueue _out
    cdef public uint32_t max_frame_size
    # (fixed at construction: the partial messages' limits are made of it)
    cdef readonly uint64_t max_message_size
    cdef public double last_heard
    cdef public double last_sent
    cdef bint _acknowledge          # CAP_WINDOW negotiated: we send WINDOW frames
    cdef bint _in_read
    cdef bint _flush_scheduled
    cdef bint _paused_writing       # the transport is past its high-water mark
    cdef bint _congested            # what callers see: wait before sending
    cdef double _large_at
    cdef bint _idle_check_scheduled
    cdef bint _shrink_after_read

    cdef int _set_state(self, ConnState new) except -1
    cdef int _on_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                         const char* p, Py_ssize_t n, list detached) except -1
    cdef int _on_dropped_message(self, uint8_t ftype, uint64_t sid,
                                 bint over_budget) except -1
    cdef Py_ssize_t _in_flight(self)
    cdef void _debug_check(self)
    cdef _gone(self)
    cdef void _update_congestion(self)
    cdef int _on_frame(self, Frame* f) except -1
    cdef int _on_window(self, const char* p, Py_ssize_t n) except -1
    cdef int _on_chunk(self, Frame* f) except -1
    cdef int _queue_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                            object payload) except -1
    cdef int _queue_encoded(self, Py_ssize_t start) except -1
    cdef int _send_cancel(self, uint64_t sid) except -1
    cdef int _request_flush(self) except -1
    cdef int _schedule_round(self) except -1
    cdef bytes _take_small(self)
    cdef bint _note_large(self)
    cdef void _schedule_idle_check(self)
    cdef int _protocol_violation(self, str message) except -1
