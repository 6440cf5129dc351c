# The protocol of one connection: its states, its timer heap, its fields.

cdef enum ConnState:
    CS_HANDSHAKE = 0
    CS_READY = 1
    CS_CLOSING = 2
    CS_CLOSED = 3


cdef struct TimerEntry:
    double deadline
    uint64_t sid


cdef class CoreProtocol:
    cdef object _loop
    cdef object _transport
    cdef public object owner
    cdef FrameReader _reader
    cdef WriteBuffer _wbuf
    cdef ConnState _state
    cdef public bint dialer
    cdef public str peer_name
    cdef public dict services
    cdef dict _pending
    cdef dict _running
    cdef dict _partials
    cdef Py_ssize_t _partial_bytes
    cdef uint64_t _next_sid
    cdef public uint64_t last_sid
    cdef public uint32_t max_frame_size
    cdef public uint64_t max_message_size
    cdef public double last_heard
    cdef public double last_sent
    cdef bint _in_read
    cdef bint _flush_scheduled
    cdef bint _wrote_this_tick
    cdef bint _busy_tick
    cdef double _large_at
    cdef bint _idle_check_scheduled
    cdef bint _shrink_after_read
    cdef int _queued_this_tick
    cdef bint _paused_writing
    cdef bint _large_congested      # large messages queued behind the streaming one
    cdef bint _congested            # what callers see: wait before sending
    cdef Py_ssize_t _large_queued   # bytes of large messages not yet written
    cdef list _large
    # per-call timeouts: a binary min-heap of (deadline, sid) in C memory
    cdef TimerEntry* _heap
    cdef Py_ssize_t _heap_len
    cdef Py_ssize_t _heap_size
    cdef object _timer
    cdef double _timer_at
    cdef public uint64_t calls_in
    cdef public uint64_t calls_out

    # Large-message flow control (CAP_WINDOW)
    cdef bint _acknowledge           # negotiated: we send WINDOW frames
    cdef Py_ssize_t _window          # our window (0: not paced)
    cdef Py_ssize_t _credit          # bytes of large frames we may still send
    cdef Py_ssize_t _consumed        # bytes of large frames read, not yet acknowledged

    cdef int _on_frame(self, Frame* f) except -1
    cdef int _on_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                         const char* p, Py_ssize_t n, list detached) except -1
    cdef int _on_chunk(self, Frame* f) except -1
    cdef int _drop_partial(self, Reassembly part) except -1
    cdef int _on_dropped_message(self, uint8_t ftype, uint64_t sid,
                                 bint over_budget) except -1
    cdef int _on_reply(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1
    cdef int _on_error(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1
    cdef int _on_call(self, uint8_t ftype, uint64_t sid, const char* p, Py_ssize_t n,
                      list detached) except -1
    cdef int _on_window(self, const char* p, Py_ssize_t n) except -1
    cdef int _acknowledge_large(self) except -1
    cdef int _on_cancel(self, uint64_t sid) except -1
    cdef int _send_cancel(self, uint64_t sid) except -1
    cdef int _queue_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                            object payload) except -1
    cdef int _queue_encoded(self, Py_ssize_t start) except -1
    cdef int _refuse(self, bint cast, uint64_t sid, str service, str fun, int code,
                     str exc_type, str message) except -1
    cdef int _queue_error(self, uint64_t sid, int code, str exc_type, str message,
                          object tb) except -1
    cdef int _request_flush(self) except -1
    cdef bint _note_large(self)
    cdef void _schedule_idle_check(self)
    cdef Py_ssize_t _encode_call(self, uint8_t ftype, str service, str fun, args, kwargs,
                                 double timeout_ms, deadline_ms, meta, trace) except -1
    cdef inline int _pack_call(self, WriteBuffer wb, str service, str fun, args, kwargs,
                               double timeout_ms, deadline_ms, meta, trace) except -1
    cdef void _update_congestion(self)
    cdef void _check_drained(self)
    cdef bytes _take_small(self)
    cdef int _large_round(self, list bufs) except -1
    cdef int _heap_push(self, double deadline, uint64_t sid) except -1
    cdef void _heap_sift_down(self, Py_ssize_t i)
    cdef void _heap_pop(self)
    cdef int _heap_compact(self) except -1
    cdef int _arm_timer(self) except -1
    cdef int _fail_pending(self, object exc_factory) except -1
    cdef int _protocol_violation(self, str message) except -1
