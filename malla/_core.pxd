# Declarations of malla's compiled core (see _core.pyx for the strategy).

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t


cdef enum:
    # The fixed frame header: type u8, flags u8, reserved u16, length u32,
    # stream id u64, all big-endian (docs/protocol.md).
    HEADER_SIZE = 16
    # Nesting deeper than this is refused by the encoder (cycles end here too).
    MAX_DEPTH = 512
    # Tuples and sets nested deeper than this are refused too: each is
    # decoded by a nested msgpack call (30-40 KiB of C stack; codec.py), and
    # a decoder must fit in a thread's stack (1.5 MiB suffices for this).
    MAX_EXT_NESTING_DEPTH = 32
    # Read buffer: starting size, and the size it shrinks back to when idle.
    READ_BUF_INITIAL = 32768
    # Write buffer: starting size; a larger one is dropped after a flush.
    WRITE_BUF_INITIAL = 4096
    WRITE_BUF_KEEP = 65536
    # Frames allowed before authentication: handshake messages are small.
    PREAUTH_MAX_FRAME = 65536
    # Transport write buffer: past this, writing pauses and new calls wait.
    WRITE_HIGH_WATER = 1048576
    # A message larger than SPLIT_MIN is sent in frames of LARGE_FRAME, one
    # frame of each large message per loop round, so that a small frame
    # queued meanwhile waits behind one such frame at most; a smaller one
    # goes whole, as one frame (no window, no reassembly).
    SPLIT_MIN = 262144
    LARGE_FRAME = 32768
    # A `bytes` value at least this large is not copied: the sender hands the
    # object itself to the transport, the receiver writes it straight into
    # its final bytes object.  Not below SPLIT_MIN (a message holding one is
    # then always sent in frames).
    DETACH_MIN = SPLIT_MIN
    # With CAP_WINDOW, at most this many bytes of large-message frames are
    # unacknowledged by the receiver (in kernel buffers on either side): the
    # bound on what a small frame can find ahead of it.
    LARGE_WINDOW = 131072
    # Messages in progress from one peer (received, or announced by a large
    # `bytes` value) may hold this many times max_message_size in all.
    PARTIAL_BUDGET = 4


cpdef enum FrameType:
    FT_HELLO = 1
    FT_AUTH = 2
    FT_CALL = 3
    FT_CAST = 4
    FT_REPLY = 5
    FT_ERROR = 6
    FT_CANCEL = 7
    FT_HEARTBEAT = 8
    FT_ANNOUNCE = 9
    FT_TABLE = 10
    FT_GOODBYE = 11
    FT_PEERS = 12
    FT_WINDOW = 13


cpdef enum FrameFlag:
    FLAG_MORE = 1        # more frames of this message follow
    FLAG_OPTIONAL = 2    # a receiver that does not know the type skips it
    FLAG_ACK = 4         # HEARTBEAT: answer me (a ping)


cpdef enum ExtCode:
    EXT_TUPLE = 1
    EXT_SET = 2
    EXT_FROZENSET = 3
    EXT_BYTEARRAY = 4
    EXT_BIGINT = 5
    EXT_DATETIME = 6
    EXT_DATE = 7
    EXT_TIME = 8
    EXT_TIMEDELTA = 9
    EXT_DECIMAL = 10
    EXT_UUID = 11
    EXT_COMPLEX = 12
    EXT_USER = 64
    # Receiver-internal: marks where a detached bytes value goes when a
    # large message is decoded.  Never valid on the wire.
    EXT_DETACHED = 127


cdef enum ConnState:
    CS_HANDSHAKE = 0
    CS_READY = 1
    CS_CLOSING = 2
    CS_CLOSED = 3


cdef struct Frame:
    uint8_t ftype
    uint8_t flags
    uint32_t length
    uint64_t sid
    const char* payload


cdef struct TimerEntry:
    double deadline
    uint64_t sid


# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class WriteBuffer:
    cdef char* _buf
    cdef Py_ssize_t _size
    cdef Py_ssize_t _len
    # Detached bytes values: [(offset in _buf where they belong, bytes), ...]
    cdef list _segs
    cdef Py_ssize_t _detached
    cdef Py_ssize_t detach_min      # 0: every value is copied into _buf
    cdef int _ext_depth             # tuples and sets being packed, nested

    cdef int _grow(self, Py_ssize_t extra) except -1
    cdef inline int _reserve(self, Py_ssize_t extra) except -1
    cdef int write_raw(self, const char* data, Py_ssize_t n) except -1
    cdef int pack(self, object o, int depth) except -1
    cdef int _pack_ext_container(self, uint8_t code, object items, int depth) except -1
    cdef int _pack_via_default(self, object o, int depth) except -1
    cdef inline int _put_header(self, uint8_t fix, uint8_t fixmask, Py_ssize_t fixmax,
                                uint8_t c8, uint8_t c16, uint8_t c32, Py_ssize_t n) except -1
    cdef inline int _put_array_header(self, Py_ssize_t n) except -1
    cdef int _put_ext_header(self, uint8_t code, Py_ssize_t n) except -1
    cdef Py_ssize_t begin_frame(self, uint8_t ftype, uint8_t flags, uint64_t sid) except -1
    cdef int end_frame(self, Py_ssize_t start) except -1
    cdef bytes take(self)
    cdef list take_parts(self, Py_ssize_t start, Py_ssize_t payload_at)
    cdef int _detach(self, bytes value) except -1
    cdef void truncate(self, Py_ssize_t n)
    cdef void release_if_large(self)


# sans-IO: final, never subclassed (direct C calls, no vtable lookups)
@cython.final
cdef class FrameReader:
    cdef char* _buf
    cdef Py_ssize_t _size
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _need
    cdef public uint32_t max_frame_size

    cdef int _make_room(self, Py_ssize_t want) except -1
    cdef object get_buffer_view(self)
    cdef int next_frame(self, Frame* out) except -1
    cdef void compact_if_idle(self, bint shrink)


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
