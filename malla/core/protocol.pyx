# CoreProtocol: the asyncio protocol of one connection.

# ---------------------------------------------------------------------------
# CoreProtocol
# ---------------------------------------------------------------------------

cdef class CoreProtocol:
    """The protocol of one node-to-node connection (see module docstring).

    The owner (malla.connection.Connection) runs the handshake, control
    messages and policy; the core calls it through a few `_on_*` methods.
    """

    def __init__(self, owner, loop, bint dialer, dict services,
                 uint32_t max_frame_size=1048576, uint64_t max_message_size=67108864):
        self.owner = owner
        self._loop = loop
        self.dialer = dialer
        self.services = services
        self._reader = FrameReader(PREAUTH_MAX_FRAME)
        self._wbuf = WriteBuffer()
        self._wbuf.detach_min = DETACH_MIN
        self._state = CS_HANDSHAKE
        self.peer_name = None
        self._pending = {}
        self._running = {}
        self._partials = {}
        self._partial_bytes = 0
        # Dialler's streams are odd, acceptor's even: ids of the two
        # directions never collide, so one table can key partial messages.
        self._next_sid = 1 if dialer else 2
        self.last_sid = 0
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.last_heard = _now()
        self.last_sent = self.last_heard
        self._in_read = False
        self._flush_scheduled = False
        self._wrote_this_tick = False
        self._busy_tick = False
        self._queued_this_tick = 0
        self._large_at = 0
        self._idle_check_scheduled = False
        self._shrink_after_read = False
        self._paused_writing = False
        self._large = []
        self._heap = NULL
        self._heap_len = 0
        self._heap_size = 0
        self._timer = None
        self._timer_at = 0
        self.calls_in = 0
        self.calls_out = 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    # -- state ----------------------------------------------------------------

    @property
    def ready(self):
        return self._state == CS_READY

    @property
    def closed(self):
        return self._state >= CS_CLOSING

    @property
    def in_flight(self):
        """Calls this side sent and still waits for."""
        return len(self._pending)

    @property
    def running(self):
        """Calls from the peer running here as tasks."""
        return len(self._running)

    @property
    def read_buffer_capacity(self):
        return self._reader._size

    @property
    def write_buffer_capacity(self):
        return self._wbuf._size

    @property
    def queued_large(self):
        """Large messages still being sent, a frame per round."""
        return len(self._large)

    @property
    def receiving_large(self):
        """Messages from the peer still arriving in frames."""
        return len(self._partials)

    @property
    def receiving_bytes(self):
        """What those hold or have reserved (bounded per connection)."""
        return self._partial_bytes

    @property
    def window(self):
        """Bytes of our large messages the peer may have unacknowledged (0:
        not paced)."""
        return self._window

    @property
    def timer_heap_len(self):
        return self._heap_len

    @property
    def transport(self):
        return self._transport

    def set_ready(self, str peer_name, uint32_t max_frame_size, bint windows=False,
                  Py_ssize_t window_size=LARGE_WINDOW):
        """End of handshake: the agreed frame size applies from now on.  With
        `windows` (both sides announced CAP_WINDOW) we acknowledge the frames
        of the peer's large messages, and pace ours by its acknowledgements,
        `window_size` bytes in flight at most (0: not paced)."""
        if self._state != CS_HANDSHAKE:
            raise mexc.InternalError("set_ready outside the handshake")
        self.peer_name = peer_name
        self.max_frame_size = max_frame_size
        self._reader.max_frame_size = max_frame_size
        if 0 < window_size < LARGE_FRAME:
            raise ValueError(f"a window below one frame ({LARGE_FRAME} bytes) never opens")
        self._acknowledge = windows
        self._window = self._credit = window_size if windows else 0
        self._state = CS_READY

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport):
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)
        self.owner._connection_made(self)

    def connection_lost(self, exc):
        cdef object owner = self.owner
        self._state = CS_CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap_len = 0
        peer = self.peer_name or "peer"

        def lost():
            err = ConnectionLost(f"connection to {peer} lost")
            err.__cause__ = exc
            return err

        self._fail_pending(lost)
        # The caller is gone: its calls running here are cancelled.
        running = list(self._running.values())
        self._running.clear()
        for task in running:
            task.cancel()
        self._large = []
        self._large_queued = 0
        self._partials.clear()
        self._partial_bytes = 0
        self._transport = None
        if owner is not None:
            owner._connection_lost(exc)

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
            if self._consumed and self._state == CS_READY:
                self._acknowledge_large()
        except ProtocolError as exc:
            self._protocol_violation(str(exc))
        except Exception as exc:
            _log.exception("malla core: error while handling a frame")
            self._protocol_violation(f"internal error: {exc!r}")
        finally:
            self._in_read = False
        self._reader.compact_if_idle(self._shrink_after_read)
        self._shrink_after_read = False
        if (self._wbuf._len or self._large) and self._state <= CS_READY:
            self.flush()
        if nbytes > READ_BUF_INITIAL or self._reader._end - self._reader._start > READ_BUF_INITIAL:
            self._schedule_idle_check()     # give the grown buffer back once idle

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
        if self._large and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)

    @property
    def writing_paused(self):
        """Congested: the transport is past its high-water mark, or large
        messages beyond the one streaming wait to be sent."""
        return self._congested

    cdef void _check_drained(self):
        if self._large_congested and (self._large_queued <= WRITE_HIGH_WATER // 4
                                      or PyList_GET_SIZE(self._large) <= 1):
            self._large_congested = False
            self._update_congestion()

    cdef void _update_congestion(self):
        cdef bint congested = self._paused_writing or self._large_congested
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
        if (f.flags & FLAG_MORE) or f.length > self.max_message_size:
            return self._on_chunk(f)
        if PyDict_Size(self._partials) and f.sid in self._partials:
            # the last frame of a message arriving in several, or a CANCEL of
            # a call still arriving (anything else is _on_chunk's violation)
            if f.ftype != FT_CANCEL or (<Reassembly>self._partials[f.sid]).ftype != FT_CALL:
                return self._on_chunk(f)
        return self._on_message(f.ftype, f.flags, f.sid, f.payload, f.length, None)

    cdef int _on_chunk(self, Frame* f) except -1:
        cdef Reassembly part
        cdef object key = f.sid
        cdef bint scan, counted
        cdef Py_ssize_t before
        if f.sid == 0:
            raise ProtocolError("a message on stream 0 cannot be split")
        part = self._partials.get(key)
        # the frames the sender counts against its window: every frame of a
        # message sent in several (not a lone frame above max_message_size)
        counted = part is not None or f.flags & FLAG_MORE
        if part is None:
            # values of calls and replies are worth detaching; control
            # messages go to Python whole
            scan = (f.ftype == FT_CALL or f.ftype == FT_CAST or f.ftype == FT_REPLY
                    or f.ftype == FT_ERROR)
            part = Reassembly(f.ftype, f.flags & ~FLAG_MORE, DETACH_MIN if scan else 0,
                              self.max_message_size)
            self._partials[key] = part
        elif part.ftype != f.ftype:
            raise ProtocolError(f"stream {f.sid}: frame type changed inside a message")
        if self._acknowledge and counted:
            self._consumed += f.length
        if not part.dropped:
            if <uint64_t>(part.received + f.length) > self.max_message_size:
                # Too large: drop what we have, keep the connection, and
                # answer once the message's last frame has passed.
                self._drop_partial(part)
            else:
                before = part.footprint()
                part.feed(f.payload, f.length)
                self._partial_bytes += part.footprint() - before
                if <uint64_t>self._partial_bytes > PARTIAL_BUDGET * self.max_message_size:
                    # what one peer may have in progress, values announced
                    # but not yet arrived included, is bounded too
                    self._drop_partial(part)
                    part.over_budget = True
        if f.flags & FLAG_MORE:
            return 0
        del self._partials[key]
        self._shrink_after_read = not self._note_large()
        if part.dropped:
            if part.cancelled:
                return 0
            return self._on_dropped_message(part.ftype, f.sid, part.over_budget)
        self._partial_bytes -= part.footprint()
        part.finish()
        return self._on_message(part.ftype, part.flags, f.sid, part.skeleton._buf,
                                part.skeleton._len, part.detached)

    cdef int _drop_partial(self, Reassembly part) except -1:
        self._partial_bytes -= part.footprint()
        part.drop()
        return 0

    cdef int _on_dropped_message(self, uint8_t ftype, uint64_t sid,
                                 bint over_budget) except -1:
        if over_budget:
            msg = (f"messages in progress from {self.peer_name} past "
                   f"{PARTIAL_BUDGET} x max_message_size {self.max_message_size}")
        else:
            msg = f"message larger than max_message_size {self.max_message_size}"
        if ftype == FT_CALL:
            self._queue_error(sid, ERR_MESSAGE_TOO_LARGE, "malla.exceptions.MessageTooLarge",
                              msg, None)
        elif ftype == FT_REPLY or ftype == FT_ERROR:
            fut = self._pending.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_exception(MessageTooLarge(f"reply {msg}"))
        elif ftype == FT_CAST:
            # (its service and function are in the part never read)
            self.cast_failed("?", "?", "MessageTooLarge", msg)
        else:
            _log.warning("malla: dropped a %d frame from %s: %s", ftype, self.peer_name, msg)
        return 0

    cdef int _on_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                         const char* p, Py_ssize_t n, list detached) except -1:
        if ftype == FT_REPLY:
            return self._on_reply(sid, p, n, detached)
        if ftype == FT_CALL or ftype == FT_CAST:
            return self._on_call(ftype, sid, p, n, detached)
        if ftype == FT_ERROR:
            return self._on_error(sid, p, n, detached)
        if ftype == FT_WINDOW:
            return self._on_window(p, n)
        if ftype == FT_CANCEL:
            return self._on_cancel(sid)
        if ftype == FT_HEARTBEAT:
            if flags & FLAG_ACK:
                self._queue_message(FT_HEARTBEAT, 0, sid, None)
            elif sid != 0:
                self.owner._on_pong(sid)
            return 0
        if ftype == FT_ANNOUNCE or ftype == FT_TABLE or ftype == FT_GOODBYE or ftype == FT_PEERS:
            self.owner._on_control(ftype, flags, sid, PyBytes_FromStringAndSize(p, n))
            return 0
        if ftype == FT_HELLO or ftype == FT_AUTH:
            raise ProtocolError("handshake frame after the handshake")
        if flags & FLAG_OPTIONAL:
            return 0
        raise ProtocolError(f"unknown mandatory frame type {ftype}")

    cdef int _on_reply(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1:
        cdef object key = sid
        cdef PyObject* fp = PyDict_GetItem(self._pending, key)
        cdef object fut
        if fp is NULL:
            return 0          # a late reply to a call that timed out or was cancelled
        fut = <object>fp
        del self._pending[key]
        try:
            value = _unpack_detached(p, n, detached)
        except EncodeError as exc:
            # well-formed, but holds a value this node cannot rebuild (an
            # unregistered user type, a decoder that raised): that call
            # fails (the function did run), the connection stays
            if not fut.done():
                fut.set_exception(remote_error("malla.exceptions.EncodeError",
                                               f"the reply cannot be decoded: {exc}"))
            return 0
        except Exception as exc:
            if not fut.done():
                fut.set_exception(ProtocolError(f"undecodable reply: {exc}"))
            raise ProtocolError(f"undecodable reply on stream {sid}: {exc}") from None
        if not fut.done():
            fut.set_result(value)
        return 0

    cdef int _on_error(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1:
        try:
            code, exc_type, message, tb = _unpack_detached(p, n, detached)[:4]
            err = error_from_wire(int(code), str(exc_type), str(message),
                                  tb if isinstance(tb, str) else None)
        except EncodeError as exc:
            # well-formed, holding a value we cannot rebuild: that call only
            err = remote_error("malla.exceptions.EncodeError",
                               f"the error reply cannot be decoded: {exc}")
        except Exception as exc:
            raise ProtocolError(f"undecodable ERROR frame: {exc}") from None
        if sid == 0:
            self.owner._on_connection_error(err)
            return 0
        fut = self._pending.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_exception(err)
        return 0

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
        self._credit += <Py_ssize_t>consumed
        return 0

    cdef int _acknowledge_large(self) except -1:
        # End of a read: tell the peer how much of its large frames we took,
        # so it never has more than LARGE_WINDOW bytes of them in flight.
        self._queue_message(FT_WINDOW, FLAG_OPTIONAL, 0, self._consumed)
        self._consumed = 0
        return 0

    cdef int _on_cancel(self, uint64_t sid) except -1:
        cdef Reassembly part
        task = self._running.pop(sid, None)
        if task is not None:
            task.cancel()
        elif PyDict_Size(self._partials):
            # A call still arriving.  With windows no more of it comes
            # (_send_cancel): forget it.  Without, the rest still comes: it
            # is dropped as it arrives, and the call never runs.
            part = self._partials.get(sid)
            if part is not None and part.ftype == FT_CALL:
                if not part.dropped:
                    self._drop_partial(part)
                part.cancelled = True
                if self._acknowledge:
                    del self._partials[sid]
        return 0

    cdef int _on_call(self, uint8_t ftype, uint64_t sid, const char* p, Py_ssize_t n,
                      list detached) except -1:
        cdef bint cast = ftype == FT_CAST
        cdef ServiceEntry entry
        cdef PyObject* ep
        cdef PyObject* fp
        cdef PyObject* ap
        cdef list msg
        cdef Py_ssize_t nargs
        self.calls_in += 1
        try:
            obj = _unpack_detached(p, n, detached)
        except EncodeError as exc:
            return self._refuse(cast, sid, "?", "?", ERR_UNDECODABLE,
                                "malla.exceptions.EncodeError", str(exc))
        except Exception as exc:
            raise ProtocolError(f"undecodable call on stream {sid}: {exc}") from None
        if type(obj) is not list or PyList_GET_SIZE(obj) < 7:
            return self._refuse(cast, sid, "?", "?", ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        msg = <list>obj
        service = msg[0]
        fun = msg[1]
        args = msg[2]
        kwargs = msg[3]
        if (type(service) is not str or type(fun) is not str or type(args) is not list
                or (kwargs is not None and type(kwargs) is not dict)):
            return self._refuse(cast, sid, "?", "?", ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        ep = PyDict_GetItem(self.services, service)
        if ep is NULL or (<ServiceEntry>ep).paused:
            return self._refuse(cast, sid, service, fun, ERR_SERVICE_NOT_AVAILABLE,
                                "malla.exceptions.ServiceNotAvailable",
                                f"service {service} is not available on this node")
        entry = <ServiceEntry>ep
        fp = PyDict_GetItem(entry.funcs, fun)
        if fp is NULL:
            return self._refuse(cast, sid, service, fun, ERR_UNKNOWN_FUNCTION,
                                "malla.exceptions.UnknownFunction",
                                f"service {service} exports no function {fun!r}")
        # the arguments against the signature (positional ones in C)
        ap = PyDict_GetItem(entry.arity, fun)
        nargs = PyList_GET_SIZE(args)
        if ap is not NULL and (kwargs or not (<Py_ssize_t>(<tuple>ap)[0] <= nargs
                                              <= <Py_ssize_t>(<tuple>ap)[1])):
            try:
                entry.checks[fun].check(args, kwargs)
            except BadArguments as exc:
                return self._refuse(cast, sid, service, fun, ERR_BAD_ARGUMENTS,
                                    "malla.exceptions.BadArguments", str(exc))
        deadline = msg[5]
        # a budget in ms (docs/protocol.md): a number, finite, within 64 bits
        if deadline is not None and ((type(deadline) is not int and type(deadline) is not float)
                                     or not -1e19 < deadline < 1e19):
            return self._refuse(cast, sid, service, fun, ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        if deadline is not None and deadline <= 0:
            # The caller's budget was spent before the call could start.
            return self._refuse(cast, sid, service, fun, ERR_DEADLINE,
                                "malla.exceptions.CallTimeout",
                                "deadline passed before the call started")
        # (with a deadline, the call goes through dispatch: the handler's context
        # gets the remaining budget)
        if (entry.fast and entry.kinds[fun] == 0 and deadline is None
                and entry.running < entry.max_concurrency):
            started = _now()
            try:
                if kwargs:
                    result = (<object>fp)(*args, **kwargs)
                else:
                    result = (<object>fp)(*args)
            except Exception as exc:
                if cast:
                    self.cast_failed(service, fun, "RemoteError", f"{type_name(exc)}: {exc}")
                else:
                    self.reply_exception(sid, exc)
                return 0
            finally:
                _warn_if_blocked(entry.name, fun, started)
            if not cast:
                self.reply(sid, result)
            return 0
        task = entry.dispatch(self, sid, fun, <object>fp, args, kwargs, msg[4], deadline,
                              msg[6], cast, msg[7] if PyList_GET_SIZE(msg) > 7 else None)
        if task is not None and not cast:
            self._running[sid] = task
        return 0

    cdef int _refuse(self, bint cast, uint64_t sid, str service, str fun, int code,
                     str exc_type, str message) except -1:
        # An incoming call that does not run: its caller gets the ERROR; a
        # cast has no caller to tell, so the node logs and counts it.
        if cast:
            self.cast_failed(service, fun, exc_type.rpartition(".")[2], message)
        else:
            self._queue_error(sid, code, exc_type, message, None)
        return 0

    def cast_failed(self, str service, str fun, str kind, str message):
        """A cast from the peer failed here (`kind`: the malla error class
        a caller would have got): the owner logs and counts it."""
        if self.owner is not None:
            self.owner._on_cast_failed(service, fun, kind, message)

    # -- replies (also used by the Python dispatcher) ---------------------------

    def reply(self, uint64_t sid, value):
        """Send the REPLY of call `sid`; an unencodable value becomes an error."""
        cdef Py_ssize_t start
        if self._state != CS_READY:
            return
        start = self._wbuf.begin_frame(FT_REPLY, 0, sid)
        try:
            self._wbuf.pack(value, 0)
        except Exception as exc:
            self._wbuf.truncate(start)
            self._queue_error(sid, ERR_REMOTE, "malla.exceptions.EncodeError",
                              f"the result cannot be encoded: {exc}", None)
            return
        try:
            self._queue_encoded(start)
        except mexc.MessageTooLarge as exc:
            self._queue_error(sid, ERR_REMOTE, "malla.exceptions.MessageTooLarge",
                              f"the result is too large: {exc}", None)

    def reply_exception(self, uint64_t sid, exc):
        """Send the error of call `sid` whose function raised `exc`."""
        exc_type, message, tb = remote_fields(exc)
        self._queue_error(sid, ERR_REMOTE, exc_type, message, tb)

    def task_done(self, uint64_t sid):
        """Forget the task of call `sid`; False when it was cancelled."""
        return self._running.pop(sid, None) is not None

    # -- sending ----------------------------------------------------------------

    cdef int _queue_error(self, uint64_t sid, int code, str exc_type, str message,
                          object tb) except -1:
        return self._queue_message(FT_ERROR, 0, sid, [code, exc_type, message, tb])

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
        cdef Py_ssize_t chunk = LARGE_FRAME
        cdef Py_ssize_t whole = SPLIT_MIN
        cdef _LargeMessage m
        cdef const char* h
        cdef Py_ssize_t frames
        if <uint64_t>length > self.max_message_size:
            wb.truncate(start)
            raise MessageTooLarge(
                f"message of {length} bytes exceeds max_message_size {self.max_message_size}")
        if chunk > self.max_frame_size:
            chunk = self.max_frame_size
        if whole > self.max_frame_size:
            whole = self.max_frame_size
        if length <= whole and not wb._segs:
            wb.end_frame(start)
        else:
            h = wb._buf + start
            m = _LargeMessage.__new__(_LargeMessage)
            m.ftype = <uint8_t>h[0]
            m.flags = <uint8_t>h[1]
            m.sid = _get_u64(h + 8)
            m.length = length
            # frames of equal size: a message just over the limit goes as two
            # halves, not a full frame and a sliver that waits for a drain
            frames = (length + chunk - 1) // chunk
            m.chunk = (length + frames - 1) // frames
            m.parts = wb.take_parts(start, start + HEADER_SIZE)
            self._large_queued += length
            if self._large and self._large_queued > WRITE_HIGH_WATER:
                # One large message streams while small calls go on; more
                # behind it are a backlog the caller must wait for (its
                # memory is ours to bound), as for a full transport.
                self._large_congested = True
                self._update_congestion()
            if not self._note_large():
                self._wbuf.release_if_large()    # a lone large message
            self._large.append(m)
        return self._request_flush()

    cdef int _request_flush(self) except -1:
        # Inside a read, everything queued leaves in one write at its end.
        # Otherwise, on a quiet connection (at most this one call or task in
        # flight, and the last tick queued a single message) the message is
        # written at once: no added latency.  Under load, the tick's
        # messages are coalesced into one write by a call_soon: one syscall
        # per batch instead of per call, and batches are not split (writing
        # the first call of a busy tick at once would make the peer answer
        # it alone, and the batches fragment from there).
        if self._wbuf._len >= WRITE_BUF_KEEP:
            # A caller that never yields (casts in a tight loop) must not
            # grow our buffer: hand it to the transport, whose high-water
            # mark then pauses new calls (flow control).
            self.flush()
            return 0
        if self._in_read:
            return 0
        self._queued_this_tick += 1
        if (not self._wrote_this_tick and not self._busy_tick
                and PyDict_Size(self._pending) + PyDict_Size(self._running) <= 1):
            self._wrote_this_tick = True
            self.flush()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)
        return 0

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
        # glibc keeps freed memory for reuse: hand it back to the system too
        malla_trim_heap()

    def _end_tick(self):
        self._flush_scheduled = False
        self._wrote_this_tick = False
        self._busy_tick = self._queued_this_tick > 1
        self._queued_this_tick = 0
        self.flush()

    def flush(self):
        """Write every queued small frame now, then a round of large frames,
        in one system call."""
        cdef list bufs
        if self._transport is None or self._state >= CS_CLOSING:
            # closing: close() already handed the transport what was queued
            self._wbuf.truncate(0)
            return
        if self._large and not self._paused_writing:
            bufs = []
            if self._wbuf._len:
                bufs.append(self._take_small())
            self._large_round(bufs)
            if bufs:
                self._transport.writelines(bufs)
                self.last_sent = _now()
        elif self._wbuf._len:
            self._transport.write(self._take_small())
            self.last_sent = _now()

    cdef bytes _take_small(self):
        if self._wbuf._len > WRITE_BUF_KEEP:
            self._schedule_idle_check()     # give the grown buffer back once idle
        return self._wbuf.take()

    cdef int _large_round(self, list bufs) except -1:
        # One frame of each large message per round, so that small frames
        # (written as soon as they are queued) never wait behind more than
        # one frame of any large message.  With a window, a frame goes only
        # while the peer has acknowledged enough: what a small frame finds
        # ahead of it in the kernel's buffers is bounded too.  The next round
        # starts on the next loop tick, when the transport has drained
        # (resume_writing) or when the peer acknowledges (_on_window).
        # Round robin: the messages served go to the back, and a round stops
        # at the first message the window has no room for (it goes first
        # next time), so that no message starves behind another's frames.
        cdef _LargeMessage m
        cdef Py_ssize_t chunk
        cdef Py_ssize_t i = 0, n = PyList_GET_SIZE(self._large)
        cdef list served = []
        cdef bint last
        cdef bint windowed = self._window > 0
        while i < n:
            m = <_LargeMessage>self._large[i]
            chunk = m.length - m.sent
            if chunk > m.chunk:
                chunk = m.chunk
            if windowed and self._credit < chunk:
                break
            i += 1
            last = m.sent + chunk >= m.length
            bufs.append(_frame_header(m.ftype, m.flags | (0 if last else FLAG_MORE), m.sid,
                                      <uint32_t>chunk))
            m.take_into(bufs, chunk)
            m.sent += chunk
            self._large_queued -= chunk
            if windowed:
                self._credit -= chunk
            if not last:
                served.append(m)
                continue
            self._note_large()
            if m.cancel_after:
                # a CANCEL for a peer that cannot take one inside a message
                bufs.append(_frame_header(FT_CANCEL, 0, m.sid, 0))
        self._large = self._large[i:] + served
        self._check_drained()
        if (self._large and not self._paused_writing and not self._flush_scheduled
                and (not windowed or self._credit >= (<_LargeMessage>self._large[0]).chunk)):
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)
        return 0

    def send_frame(self, int ftype, int flags, uint64_t sid, bytes payload):
        """Queue one frame of raw payload bytes (handshake)."""
        cdef Py_ssize_t start
        if self._transport is None:
            return
        start = self._wbuf.begin_frame(<uint8_t>ftype, <uint8_t>flags, sid)
        self._wbuf.write_raw(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        self._wbuf.end_frame(start)
        self._request_flush()

    def send_message(self, int ftype, payload, int flags=0, uint64_t sid=0):
        """Queue a control message (msgpack payload); split if large."""
        if sid == 0 and ftype != FT_HEARTBEAT and ftype != FT_ERROR:
            sid = self._next_sid
            self._next_sid += 2
        self._queue_message(<uint8_t>ftype, <uint8_t>flags, sid, payload)

    def ping(self):
        """Send a HEARTBEAT asking for an answer; return its stream id."""
        cdef uint64_t sid = self._next_sid
        self._next_sid += 2
        self._queue_message(FT_HEARTBEAT, FLAG_ACK, sid, None)
        return sid

    def call(self, str service, str fun, args, kwargs, double timeout_ms, deadline_ms, meta,
             trace=None):
        """Send a CALL; return the future of its reply.

        Raises ServiceNotAvailable when the connection cannot take it (not
        sent), EncodeError / MessageTooLarge when the request cannot be sent.
        The call's stream id is left in `last_sid` (for `cancel`).
        """
        cdef Py_ssize_t start = self._encode_call(FT_CALL, service, fun, args, kwargs,
                                                  timeout_ms, deadline_ms, meta, trace)
        cdef uint64_t sid = self.last_sid
        fut = self._loop.create_future()
        self._pending[sid] = fut
        try:
            self._queue_encoded(start)
        except BaseException:
            del self._pending[sid]
            raise
        self.calls_out += 1
        if timeout_ms > 0:
            self._heap_push(_now() + timeout_ms * 0.001, sid)
        return fut

    def cast(self, str service, str fun, args, kwargs, meta, trace=None):
        """Send a CAST (no reply)."""
        cdef Py_ssize_t start = self._encode_call(FT_CAST, service, fun, args, kwargs, 0, None,
                                                  meta, trace)
        self.calls_out += 1
        self._queue_encoded(start)

    cdef Py_ssize_t _encode_call(self, uint8_t ftype, str service, str fun, args, kwargs,
                                 double timeout_ms, deadline_ms, meta, trace) except -1:
        # The CALL or CAST frame of a new stream, encoded in the write buffer:
        # returns where it starts (its stream id is in last_sid); nothing is
        # left in the buffer when the arguments cannot be encoded.
        cdef WriteBuffer wb = self._wbuf
        cdef Py_ssize_t start
        if self._state != CS_READY:
            raise ServiceNotAvailable(f"connection to {self.peer_name} is not open")
        start = wb.begin_frame(ftype, 0, self._next_sid)
        try:
            self._pack_call(wb, service, fun, args, kwargs, timeout_ms, deadline_ms, meta,
                            trace)
        except BaseException:
            wb.truncate(start)
            raise
        self.last_sid = self._next_sid
        self._next_sid += 2
        return start

    cdef inline int _pack_call(self, WriteBuffer wb, str service, str fun, args, kwargs,
                               double timeout_ms, deadline_ms, meta, trace) except -1:
        cdef Py_ssize_t i, n
        # the 8th field (trace context) is sent only when there is one
        wb._put_array_header(7 if trace is None else 8)
        wb.pack(service, 0)
        wb.pack(fun, 0)
        # args travel as a plain array, whether given as a list or a tuple
        if type(args) is tuple:
            n = PyTuple_GET_SIZE(args)
            wb._put_array_header(n)
            for i in range(n):
                wb.pack(<object>PyTuple_GET_ITEM(args, i), 1)
        elif type(args) is list:
            wb.pack(args, 0)
        else:
            wb.pack(list(args), 0)
        wb.pack(kwargs if kwargs else None, 0)
        wb.pack(<int64_t>timeout_ms, 0)
        wb.pack(deadline_ms, 0)
        wb.pack(meta, 0)
        if trace is not None:
            wb.pack(trace, 0)
        return 0

    def cancel(self, uint64_t sid):
        """Forget call `sid` and tell the peer to cancel it."""
        if self._pending.pop(sid, None) is None:
            return False
        self._send_cancel(sid)
        return True

    cdef int _send_cancel(self, uint64_t sid) except -1:
        # The call's message, if still queued, is not sent: not at all when
        # none of it has gone; with CAP_WINDOW not the rest of it either (the
        # peer drops what it has: the rest of a 100 MB argument nobody waits
        # for does not cross).  A peer without CAP_WINDOW cannot take a
        # CANCEL inside a message: it gets the rest, then the CANCEL.
        cdef _LargeMessage m
        cdef Py_ssize_t i
        for i in range(PyList_GET_SIZE(self._large)):
            m = <_LargeMessage>self._large[i]
            if m.sid != sid or m.ftype != FT_CALL:
                continue
            if m.sent and not self._acknowledge:
                m.cancel_after = True
                return 0
            del self._large[i]
            self._large_queued -= m.length - m.sent
            self._check_drained()
            break
        return self._queue_message(FT_CANCEL, 0, sid, None)

    def close(self):
        """Flush and close the transport."""
        if self._state >= CS_CLOSING:
            return
        self._state = CS_CLOSING
        if self._transport is not None:
            if self._wbuf._len:
                self._transport.write(self._wbuf.take())
            self._transport.close()

    def abort(self):
        if self._state >= CS_CLOSING and self._transport is None:
            return
        self._state = CS_CLOSING
        if self._transport is not None:
            self._transport.abort()

    cdef int _protocol_violation(self, str message) except -1:
        if self._state >= CS_CLOSING:
            return 0
        if self.owner is not None:
            self.owner._on_protocol_error(ProtocolError(message))
        self._state = CS_CLOSING
        if self._transport is not None:
            self._transport.abort()
        return 0

    cdef int _fail_pending(self, object exc_factory) except -1:
        pending = list(self._pending.values())
        self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc_factory())
        return 0

    # -- per-call timeouts: a min-heap of deadlines, one timer ---------------

    cdef int _heap_push(self, double deadline, uint64_t sid) except -1:
        cdef Py_ssize_t i, parent
        cdef TimerEntry* nh
        cdef TimerEntry tmp
        if self._heap_len > 2 * PyDict_Size(self._pending) + 256:
            self._heap_compact()
        if self._heap_len == self._heap_size:
            nh = <TimerEntry*>PyMem_Realloc(
                self._heap, (self._heap_size * 2 + 64) * sizeof(TimerEntry))
            if nh is NULL:
                raise MemoryError()
            self._heap = nh
            self._heap_size = self._heap_size * 2 + 64
        i = self._heap_len
        self._heap[i].deadline = deadline
        self._heap[i].sid = sid
        self._heap_len += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self._heap[parent].deadline <= self._heap[i].deadline:
                break
            tmp = self._heap[parent]
            self._heap[parent] = self._heap[i]
            self._heap[i] = tmp
            i = parent
        if i == 0:
            self._arm_timer()
        return 0

    cdef void _heap_sift_down(self, Py_ssize_t i):
        # Move entry i down until neither child has an earlier deadline.
        cdef Py_ssize_t child, n = self._heap_len
        cdef TimerEntry tmp
        while True:
            child = 2 * i + 1
            if child >= n:
                return
            if child + 1 < n and self._heap[child + 1].deadline < self._heap[child].deadline:
                child += 1
            if self._heap[i].deadline <= self._heap[child].deadline:
                return
            tmp = self._heap[child]
            self._heap[child] = self._heap[i]
            self._heap[i] = tmp
            i = child

    cdef void _heap_pop(self):
        self._heap_len -= 1
        if self._heap_len:
            self._heap[0] = self._heap[self._heap_len]
            self._heap_sift_down(0)

    cdef int _heap_compact(self) except -1:
        # Entries of calls already answered linger (lazy deletion); drop them
        # and rebuild the heap, so it stays within 2x the calls in flight.
        cdef Py_ssize_t i, j = 0
        for i in range(self._heap_len):
            if self._heap[i].sid in self._pending:
                self._heap[j] = self._heap[i]
                j += 1
        self._heap_len = j
        for i in range(j // 2 - 1, -1, -1):
            self._heap_sift_down(i)
        return 0

    cdef int _arm_timer(self) except -1:
        cdef double top
        if self._heap_len == 0 or self._state == CS_CLOSED:
            return 0
        top = self._heap[0].deadline
        if self._timer is not None:
            if self._timer_at <= top + 0.0005:
                return 0
            self._timer.cancel()
        self._timer_at = top
        self._timer = self._loop.call_later(max(0.0, top - _now()), self._on_timer)
        return 0

    def _on_timer(self):
        cdef double now = _now()
        cdef uint64_t sid
        self._timer = None
        while self._heap_len and self._heap[0].deadline <= now:
            sid = self._heap[0].sid
            self._heap_pop()
            fut = self._pending.pop(sid, None)
            if fut is None:
                continue
            if not fut.done():
                fut.set_exception(CallTimeout(f"no reply from {self.peer_name} in time"))
            # The peer cancels what it still runs for us.
            self._send_cancel(sid)
        while self._heap_len and self._heap[0].sid not in self._pending:
            self._heap_pop()
        self._arm_timer()


class Protocol(CoreProtocol, asyncio.BufferedProtocol):
    """CoreProtocol with asyncio's BufferedProtocol ABC (never asyncio.Protocol:
    uvloop would then copy every read)."""
