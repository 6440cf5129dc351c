# Wire: the byte side of one connection -- frames in (the reader, messages
# arriving in several frames), frames out (the write buffer, the out-queue,
# one write per loop tick), flow control, memory, and the connection's
# states.  CoreProtocol (protocol.pyx) builds the calls on top of it.

# The connection's states and the one table of transitions between them
# (h11's style): every change goes through _set_state, which refuses any
# other.  HANDSHAKE -> READY at the end of the handshake; CLOSING once we
# close, abort or give up on the peer; CLOSED when the transport is gone
# (from any state: the peer may hang up at any time).
cdef bint _TRANSITIONS[4][4]
for _from, _to in ((CS_HANDSHAKE, CS_READY), (CS_HANDSHAKE, CS_CLOSING),
                   (CS_HANDSHAKE, CS_CLOSED), (CS_READY, CS_CLOSING), (CS_READY, CS_CLOSED),
                   (CS_CLOSING, CS_CLOSED)):
    _TRANSITIONS[<int>_from][<int>_to] = True
del _from, _to

STATE_NAMES = ("handshake", "ready", "closing", "closed")
TRANSITIONS = frozenset((STATE_NAMES[a], STATE_NAMES[b])
                        for a in range(4) for b in range(4) if _TRANSITIONS[a][b])


cdef class Wire:
    """Frames to and from one transport, and the state of the connection.

    Whole messages go to `_on_message` (CoreProtocol's), so this class never
    decodes a call: it is the part of the asyncio protocol that only moves
    bytes.  (It is never used alone: the tests drive it, with bytes, through
    a CoreProtocol on a fake transport.)
    """

    def __cinit__(self):
        if MALLA_DEBUG_BUILD:
            _live.add(self)

    def __init__(self, owner, loop, uint32_t max_frame_size, uint64_t max_message_size):
        self.owner = owner
        self._loop = loop
        self._reader = FrameReader(PREAUTH_MAX_FRAME)
        self._wbuf = WriteBuffer()
        self._wbuf.detach_min = DETACH_MIN
        self._out = OutQueue()
        self._partials = Partials(max_message_size)
        self._state = CS_HANDSHAKE
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.last_heard = _now()
        self.last_sent = self.last_heard

    # -- what the protocol above implements ---------------------------------------

    cdef int _on_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                         const char* p, Py_ssize_t n, list detached) except -1:
        raise NotImplementedError

    cdef int _on_dropped_message(self, uint8_t ftype, uint64_t sid,
                                 bint over_budget) except -1:
        raise NotImplementedError

    cdef Py_ssize_t _in_flight(self):
        # calls in flight either way (a quiet connection writes at once)
        return 0

    def debug_held(self):
        """(calls pending, calls running, large messages queued, messages
        half arrived, streams open): what this connection still holds (the
        debug build's leak counters sum them)."""
        return (0, 0, len(self._out), len(self._partials), 0)

    cdef void _debug_check(self):
        # The debug build's invariants, after every read and every write.
        cdef Py_ssize_t queued = 0
        cdef _LargeMessage m
        for m in self._out.large:
            queued += m.length - m.sent
        if queued != self._out.queued:
            _debug_violation(f"out-queue counts {self._out.queued} bytes, holds {queued}")
        if not 0 <= self._reader._start <= self._reader._end <= self._reader._size:
            _debug_violation("read buffer positions out of order")
        if self._partials.bytes < 0 or (not len(self._partials) and self._partials.bytes):
            _debug_violation(f"partial messages count {self._partials.bytes} bytes")
        if self._state == CS_CLOSED and (self._transport is not None or len(self._out)):
            _debug_violation("a closed connection still holds its transport or queue")

    cdef int _set_state(self, ConnState new) except -1:
        if not _TRANSITIONS[<int>self._state][<int>new]:
            raise mexc.InternalError(f"connection state {STATE_NAMES[self._state]} -> "
                                     f"{STATE_NAMES[new]} is not a transition")
        self._state = new
        return 0

    @property
    def state(self):
        return STATE_NAMES[self._state]

    @property
    def ready(self):
        return self._state == CS_READY

    @property
    def closed(self):
        return self._state >= CS_CLOSING

    @property
    def read_buffer_capacity(self):
        return self._reader._size

    @property
    def write_buffer_capacity(self):
        return self._wbuf._size

    @property
    def queued_large(self):
        """Large messages still being sent, a frame per round."""
        return len(self._out)

    @property
    def receiving_large(self):
        """Messages from the peer still arriving in frames."""
        return len(self._partials)

    @property
    def receiving_bytes(self):
        """What those hold or have reserved (bounded per connection)."""
        return self._partials.bytes

    @property
    def window(self):
        """Bytes of our large messages the peer may have unacknowledged (0:
        not paced)."""
        return self._out.window

    @property
    def transport(self):
        return self._transport

    def connection_made(self, transport):
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)
        self.owner._connection_made(self)

    def get_buffer(self, Py_ssize_t sizehint):
        return self._reader.get_buffer_view()

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Frame f
        self._reader._end += nbytes
        self.last_heard = _now()
        self._in_read = True
        try:
            while self._state <= CS_READY:
                if not self._reader.next_frame(&f):
                    break
                self._on_frame(&f)
            if self._partials.consumed and self._state == CS_READY:
                # tell the peer how much of its large frames we took, so it
                # never has more than its window of them in flight
                self._queue_message(FT_WINDOW, FLAG_OPTIONAL, 0, self._partials.consumed)
                self._partials.consumed = 0
        except ProtocolError as exc:
            self._protocol_violation(str(exc))
        except Exception as exc:
            _log.exception("malla core: error while handling a frame")
            self._protocol_violation(f"internal error: {exc!r}")
        finally:
            self._in_read = False
        self._reader.compact_if_idle(self._shrink_after_read)
        self._shrink_after_read = False
        if (self._wbuf._len or PyList_GET_SIZE(self._out.large)) and self._state <= CS_READY:
            self.flush()
        if nbytes > READ_BUF_INITIAL or self._reader._end - self._reader._start > READ_BUF_INITIAL:
            self._schedule_idle_check()     # give the grown buffer back once idle
        if MALLA_DEBUG_BUILD:
            self._debug_check()

    def eof_received(self):
        return False

    def pause_writing(self):
        # Past the high-water mark: new calls wait (or fail over) until the
        # transport drains below the low-water mark.
        self._paused_writing = True
        self._update_congestion()

    def resume_writing(self):
        self._paused_writing = False
        self._update_congestion()
        # The calls that waited run first (they were woken before this
        # call_soon); the next round of large frames goes after them.
        if PyList_GET_SIZE(self._out.large) and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)

    @property
    def writing_paused(self):
        """Congested: the transport is past its high-water mark, or large
        messages beyond the one streaming wait to be sent."""
        return self._congested

    cdef void _update_congestion(self):
        cdef bint congested = self._paused_writing or self._out.backlog
        if congested == self._congested:
            return
        self._congested = congested
        if self.owner is not None:
            if congested:
                self.owner._writing_paused()
            else:
                self.owner._writing_resumed()

    # -- receiving --------------------------------------------------------------

    cdef int _on_frame(self, Frame* f) except -1:
        if self._state == CS_HANDSHAKE:
            if f.flags & FLAG_MORE:
                raise ProtocolError("a handshake message cannot be split")
            if f.ftype == FT_HELLO or f.ftype == FT_AUTH or f.ftype == FT_ERROR:
                self.owner._on_handshake_frame(
                    f.ftype, f.flags, f.sid, PyBytes_FromStringAndSize(f.payload, f.length))
            elif not (f.flags & FLAG_OPTIONAL):
                raise ProtocolError(f"frame type {f.ftype} before the handshake ended")
            return 0
        # (a single frame above max_message_size goes there too, to be dropped)
        if (f.flags & FLAG_MORE) or f.length > self.max_message_size or self._partials.continues(f):
            return self._on_chunk(f)
        return self._on_message(f.ftype, f.flags, f.sid, f.payload, f.length, None)

    cdef int _on_chunk(self, Frame* f) except -1:
        cdef Reassembly part = self._partials.feed(f, self._acknowledge)
        if part is None:
            return 0                # more frames of it to come
        self._shrink_after_read = not self._note_large()
        if part.dropped:
            if part.cancelled:
                return 0
            return self._on_dropped_message(part.ftype, f.sid, part.over_budget)
        return self._on_message(part.ftype, part.flags, f.sid, part.skeleton._buf,
                                part.skeleton._len, part.detached)

    cdef int _on_window(self, const char* p, Py_ssize_t n) except -1:
        # The peer consumed this many bytes of our large frames: send more.
        if not self._acknowledge:
            return 0            # not negotiated: an optional frame we skip
        try:
            consumed = _unpack(p, n)
        except Exception:
            consumed = None
        if type(consumed) is not int or not 0 <= consumed <= (1 << 40):
            raise ProtocolError(f"malformed WINDOW frame: {consumed!r}")
        self._out.credit += <Py_ssize_t>consumed
        return 0

    cdef int _queue_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                            object payload) except -1:
        cdef Py_ssize_t start
        if self._state > CS_READY or self._transport is None:
            return 0
        start = self._wbuf.begin_frame(ftype, flags, sid)
        if payload is not None:
            try:
                self._wbuf.pack(payload, 0)
            except BaseException:
                self._wbuf.truncate(start)
                raise
        return self._queue_encoded(start)

    cdef int _queue_encoded(self, Py_ssize_t start) except -1:
        # The frame at `start` is encoded; send it as one frame or, when it
        # is larger than a frame, as a message split into frames.
        cdef WriteBuffer wb = self._wbuf
        cdef Py_ssize_t length = wb._len - start - HEADER_SIZE + wb._detached
        cdef Py_ssize_t whole = SPLIT_MIN
        if whole > self.max_frame_size:
            whole = self.max_frame_size
        if <uint64_t>length > self.max_message_size:
            wb.truncate(start)
            raise MessageTooLarge(
                f"message of {length} bytes exceeds max_message_size {self.max_message_size}")
        if length <= whole and not wb._segs:
            wb.end_frame(start)
        else:
            if self._out.add_large(wb, start, length, self.max_frame_size):
                self._update_congestion()
            if not self._note_large():
                wb.release_if_large()    # a lone large message
        return self._request_flush()

    cdef int _send_cancel(self, uint64_t sid) except -1:
        # What of the call's message is still queued is not sent (the
        # out-queue's rules); the CANCEL goes now or after its last frame.
        cdef bint now = self._out.cancel(sid, self._acknowledge)
        if self._out.drained():
            self._update_congestion()
        if now:
            return self._queue_message(FT_CANCEL, 0, sid, None)
        return 0

    cdef int _request_flush(self) except -1:
        # Inside a read, everything queued leaves in one write at its end;
        # otherwise the out-queue says whether to write now or at the end
        # of the loop tick (coalescing).
        if self._wbuf._len >= WRITE_BUF_KEEP:
            # A caller that never yields (casts in a tight loop) must not
            # grow our buffer: hand it to the transport, whose high-water
            # mark then pauses new calls (flow control).
            self.flush()
            return 0
        if self._in_read:
            return 0
        if self._out.write_now(self._in_flight()):
            self.flush()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)
        return 0

    cdef _gone(self):
        # uvloop's transport closed under us (the peer reset it) before
        # connection_lost, which is on its way, told this side: what was
        # queued has nowhere to go (asyncio's transports drop it silently;
        # uvloop raises, and a task sending a table then died of it)
        self._wbuf.truncate(0)
        return None

    def _end_tick(self):
        self._flush_scheduled = False
        self._out.end_tick()
        self.flush()

    def flush(self):
        """Write every queued small frame now, then a round of large frames,
        in one system call."""
        cdef list bufs
        if self._transport is None or self._state >= CS_CLOSING:
            # closing: close() already handed the transport what was queued
            self._wbuf.truncate(0)
            return
        if PyList_GET_SIZE(self._out.large) and not self._paused_writing:
            bufs = []
            if self._wbuf._len:
                bufs.append(self._take_small())
            if self._out.round(bufs):
                self._note_large()
            if self._out.drained():
                self._update_congestion()
            self._schedule_round()
            if bufs:
                try:
                    self._transport.writelines(bufs)
                except RuntimeError:
                    return self._gone()
                self.last_sent = _now()
        elif self._wbuf._len:
            try:
                self._transport.write(self._take_small())
            except RuntimeError:
                return self._gone()
            self.last_sent = _now()
        if MALLA_DEBUG_BUILD:
            self._debug_check()

    cdef int _schedule_round(self) except -1:
        # The next round of large frames goes on the next loop tick, when the
        # transport has drained (else resume_writing starts it) and the
        # window has room (else the peer's WINDOW frame does).
        if self._out.can_send() and not self._paused_writing and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)
        return 0

    cdef bytes _take_small(self):
        if self._wbuf._len > WRITE_BUF_KEEP:
            self._schedule_idle_check()     # give the grown buffer back once idle
        return self._wbuf.take()

    def send_frame(self, int ftype, int flags, uint64_t sid, bytes payload):
        """Queue one frame of raw payload bytes (handshake)."""
        cdef Py_ssize_t start
        if self._transport is None:
            return
        start = self._wbuf.begin_frame(<uint8_t>ftype, <uint8_t>flags, sid)
        self._wbuf.write_raw(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        self._wbuf.end_frame(start)
        self._request_flush()

    cdef bint _note_large(self):
        # True when large messages are streaming (another one passed less
        # than LARGE_IDLE ago): then the grown buffers are worth keeping.
        cdef double now = _now()
        cdef bint streaming = now - self._large_at < LARGE_IDLE
        self._large_at = now
        self._schedule_idle_check()
        return streaming

    cdef void _schedule_idle_check(self):
        if not self._idle_check_scheduled and self._state <= CS_READY:
            self._idle_check_scheduled = True
            self._loop.call_later(LARGE_IDLE, self._idle_check)

    def _idle_check(self):
        cdef double quiet = _now() - self._large_at
        self._idle_check_scheduled = False
        if self._state > CS_READY:
            return
        if quiet < LARGE_IDLE:
            self._idle_check_scheduled = True
            self._loop.call_later(LARGE_IDLE - quiet, self._idle_check)
            return
        self._reader.compact_if_idle(True)
        self._wbuf.release_if_large()
        _trim_process_heap()

    # -- closing ------------------------------------------------------------------

    def close(self):
        """Flush and close the transport."""
        if self._state >= CS_CLOSING:
            return
        self._set_state(CS_CLOSING)
        if self._transport is not None:
            if self._wbuf._len:
                self._transport.write(self._wbuf.take())
            self._transport.close()

    def abort(self):
        if self._state < CS_CLOSING:
            self._set_state(CS_CLOSING)
        if self._transport is not None:
            self._transport.abort()

    cdef int _protocol_violation(self, str message) except -1:
        if self._state >= CS_CLOSING:
            return 0
        if self.owner is not None:
            self.owner._on_protocol_error(ProtocolError(message))
        if self._state < CS_CLOSING:        # (the owner may have closed it)
            self._set_state(CS_CLOSING)
        if self._transport is not None:
            self._transport.abort()
        return 0
