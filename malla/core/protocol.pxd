# The protocol of one connection: calls on top of the Wire.

cdef class CoreProtocol(Wire):
    cdef Pending _pending
    cdef public LatencyBook latency     # what our calls to the peer took, per service
    cdef dict _running              # stream id -> task of a call from the peer
    cdef readonly StreamBook streams    # the streaming calls, both ways
    cdef public bint dialer
    cdef public str peer_name
    cdef public dict services
    cdef uint64_t _next_sid
    cdef public uint64_t last_sid
    cdef public uint64_t calls_in
    cdef public uint64_t calls_out
    cdef public bint retry_hints    # the peer speaks version 2: Overloaded carries retry_after_ms
    cdef object _timer              # the one timer of the calls' deadlines
    cdef double _timer_at

    cdef int _on_reply(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1
    cdef int _on_error(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1
    cdef int _on_call(self, uint8_t ftype, uint64_t sid, const char* p, Py_ssize_t n,
                      list detached) except -1
    cdef int _run_inline(self, ServiceEntry entry, IncomingCall call, object fn) except -1
    cdef int _on_heartbeat(self, uint8_t flags, uint64_t sid) except -1
    cdef int _on_cancel(self, uint64_t sid) except -1
    cdef int _refuse(self, bint cast, uint64_t sid, str service, str fun, int code,
                     str exc_type, str message, object hint=*) except -1
    cdef int _queue_error(self, uint64_t sid, int code, str exc_type, str message,
                          object tb, object hint=*) except -1
    cdef Py_ssize_t _encode_call(self, uint8_t ftype, str service, str fun, args, kwargs,
                                 double timeout_ms, deadline_ms, meta, trace,
                                 Py_ssize_t window=*) except -1
    cdef object _call(self, str service, str fun, args, kwargs, double timeout_ms, deadline_ms,
                      meta, trace)
    cdef int _arm_timer(self) except -1
