# CoreProtocol: the asyncio protocol of one connection -- calls on top of
# the Wire's frames: the calls this side waits for (pending, their timer),
# the calls from the peer (the rule set of dispatch.pyx), replies, errors,
# pings and cancellation.

cdef inline int _pack_call(WriteBuffer wb, str service, str fun, args, kwargs,
                           double timeout_ms, deadline_ms, meta, trace,
                           Py_ssize_t window) except -1:
    # A CALL, CAST or STREAM message (docs/protocol.md); a STREAM's 9th
    # field is its window, after the trace context (nil when none).
    cdef Py_ssize_t i, n
    # the 8th field (trace context) is sent only when there is one
    wb._put_array_header(9 if window else 7 if trace is None else 8)
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
    if trace is not None or window:
        wb.pack(trace, 0)
    if window:
        wb.pack(window, 0)
    return 0


cdef class CoreProtocol(Wire):
    """The protocol of one node-to-node connection (see module docstring).

    The owner (malla.connection.Connection) runs the handshake, control
    messages and policy; the core calls it through a few `_on_*` methods
    (malla.interfaces.CoreOwner).
    """

    def __init__(self, owner, loop, bint dialer, dict services,
                 uint32_t max_frame_size=1048576, uint64_t max_message_size=67108864):
        Wire.__init__(self, owner, loop, max_frame_size, max_message_size)
        self.dialer = dialer
        self.services = services
        self._pending = Pending()
        self.latency = LatencyBook(self._pending)
        self._running = {}
        self.streams = StreamBook()
        self.peer_name = None
        # Dialler's streams are odd, acceptor's even: ids of the two
        # directions never collide, so one table can key partial messages.
        self._next_sid = 1 if dialer else 2

    cdef Py_ssize_t _in_flight(self):
        return PyDict_Size(self._pending.calls) + PyDict_Size(self._running)

    def debug_held(self):
        return (len(self._pending) + len(self._pending.pings), len(self._running),
                len(self._out), len(self._partials), len(self.streams))

    # -- state ----------------------------------------------------------------

    @property
    def in_flight(self):
        """Calls this side sent and still waits for."""
        return len(self._pending)

    @property
    def running(self):
        """Calls from the peer running here as tasks."""
        return len(self._running)

    @property
    def timer_heap_len(self):
        return self._pending.heap_len

    def set_ready(self, str peer_name, uint32_t max_frame_size, bint windows=False,
                  Py_ssize_t window_size=LARGE_WINDOW):
        """End of handshake: the agreed frame size applies from now on.  With
        `windows` (both sides announced CAP_WINDOW) we acknowledge the frames
        of the peer's large messages, and pace ours by its acknowledgements,
        `window_size` bytes in flight at most (0: not paced)."""
        if self._state != CS_HANDSHAKE:
            raise mexc.InternalError("set_ready outside the handshake")
        if window_size < 0 or 0 < window_size < LARGE_FRAME:
            raise ValueError(f"a window is 0 (not paced) or at least one frame "
                             f"({LARGE_FRAME} bytes), not {window_size}")
        self.peer_name = peer_name
        self.max_frame_size = max_frame_size
        self._reader.max_frame_size = max_frame_size
        self._acknowledge = windows
        self._out.window = self._out.credit = window_size if windows else 0
        self._set_state(CS_READY)

    # -- asyncio callbacks ----------------------------------------------------

    def connection_lost(self, exc):
        cdef object owner = self.owner
        self._set_state(CS_CLOSED)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        peer = self.peer_name or "peer"

        def lost():
            err = ConnectionLost(f"connection to {peer} lost")
            err.__cause__ = exc
            return err

        self._pending.fail_all(lost)
        self.streams.lost(lost())
        # The caller is gone: its calls running here are cancelled.
        running = list(self._running.values())
        self._running.clear()
        for task in running:
            task.cancel()
        self._out.clear()
        self._partials.clear()
        self._transport = None
        if owner is not None:
            owner._connection_lost(exc)

    cdef int _on_dropped_message(self, uint8_t ftype, uint64_t sid,
                                 bint over_budget) except -1:
        if over_budget:
            msg = (f"messages in progress from {self.peer_name} past "
                   f"{PARTIAL_BUDGET} x max_message_size {self.max_message_size}")
        else:
            msg = f"message larger than max_message_size {self.max_message_size}"
        if ftype == FT_CALL or ftype == FT_STREAM:
            self._queue_error(sid, ERR_MESSAGE_TOO_LARGE, "malla.exceptions.MessageTooLarge",
                              msg, None)
        elif ftype == FT_REPLY or ftype == FT_ERROR:
            fut = self._pending.pop(sid)
            if fut is not None and not fut.done():
                fut.set_exception(MessageTooLarge(f"reply {msg}"))
        elif ftype == FT_ITEM:
            self.streams.fail(sid, MessageTooLarge(f"item {msg}"))
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
        if ftype == FT_CALL or ftype == FT_CAST or ftype == FT_STREAM:
            return self._on_call(ftype, sid, p, n, detached)
        if ftype == FT_ITEM:
            return self.streams.on_item(sid, p, n, detached)
        if ftype == FT_CREDIT:
            return self.streams.on_credit(sid, p, n)
        if ftype == FT_ERROR:
            return self._on_error(sid, p, n, detached)
        if ftype == FT_WINDOW:
            return self._on_window(p, n)
        if ftype == FT_CANCEL:
            return self._on_cancel(sid)
        if ftype == FT_HEARTBEAT:
            return self._on_heartbeat(flags, sid)
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
        cdef object fut = self._pending.pop(sid)
        if fut is None:     # a stream's end, or a late reply (timed out, cancelled)
            self.streams.on_end(sid, StopAsyncIteration)
            return 0
        self.latency.ended(sid, OUTCOME_OK)
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
            err = _error_of(_unpack_detached(p, n, detached))
        except EncodeError as exc:
            # well-formed, holding a value we cannot rebuild: that call only
            err = remote_error("malla.exceptions.EncodeError",
                               f"the error reply cannot be decoded: {exc}")
        except Exception as exc:
            raise ProtocolError(f"undecodable ERROR frame: {exc}") from None
        if sid == 0:
            self.owner._on_connection_error(err)
            return 0
        fut = self._pending.pop(sid)
        if fut is not None:
            self.latency.refused(sid, err)
            if not fut.done():
                fut.set_exception(err)
        else:
            self.streams.on_end(sid, err)
        return 0

    cdef int _on_heartbeat(self, uint8_t flags, uint64_t sid) except -1:
        if flags & FLAG_ACK:
            return self._queue_message(FT_HEARTBEAT, 0, sid, None)     # a ping: answer it
        if sid != 0:
            fut = self._pending.pings.pop(sid, None)        # the answer to our ping
            if fut is not None and not fut.done():
                fut.set_result(None)
        return 0

    cdef int _on_cancel(self, uint64_t sid) except -1:
        task = self._running.pop(sid, None)
        if task is not None:
            task.cancel()
        else:
            # a call still arriving: with windows no more of it comes
            # (_send_cancel), so it is forgotten; without, the rest is
            # dropped as it arrives
            self._partials.cancel(sid, self._acknowledge)
        return 0

    cdef int _on_call(self, uint8_t ftype, uint64_t sid, const char* p, Py_ssize_t n,
                      list detached) except -1:
        cdef bint cast = ftype == FT_CAST
        cdef IncomingCall call
        cdef PyObject* ep
        cdef ServiceEntry entry
        cdef tuple why
        self.calls_in += 1
        if not cast and (sid in self._running or sid in self.streams.producers):
            # (ids never repeat on a connection: a second call under a running
            # one's id would orphan the first, beyond the reach of CANCEL)
            raise ProtocolError(f"a call under id {sid}, which a running call holds")
        try:
            obj = _unpack_detached(p, n, detached)
        except EncodeError as exc:
            return self._refuse(cast, sid, "?", "?", ERR_UNDECODABLE,
                                "malla.exceptions.EncodeError", str(exc))
        except Exception as exc:
            raise ProtocolError(f"undecodable call on stream {sid}: {exc}") from None
        call = _incoming_call(obj, sid, ftype)
        if call is None:
            return self._refuse(cast, sid, "?", "?", ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        ep = PyDict_GetItem(self.services, call.service)
        if ep is NULL:
            return self._refuse(cast, sid, call.service, call.fun, ERR_SERVICE_NOT_AVAILABLE,
                                "malla.exceptions.ServiceNotAvailable",
                                f"service {call.service} is not available on this node")
        entry = <ServiceEntry>ep
        why = entry._refusal(call.fun, call.args, call.kwargs, call.deadline, self.peer_name)
        if why is not None:
            return self._refuse(cast, sid, call.service, call.fun, why[0], why[1], why[2],
                                _hint(why))
        # a plain def with the default hook runs right here; with a deadline
        # it goes through dispatch (the handler's context gets the budget)
        if entry.fast and call.deadline is None and not call.window and entry.kinds[call.fun] == 0:
            return self._run_inline(entry, call, entry.funcs[call.fun])
        task = entry.dispatch(self, call)
        if task is not None and not cast:
            self._running[sid] = task
        return 0

    cdef int _run_inline(self, ServiceEntry entry, IncomingCall call, object fn) except -1:
        global malla_inline_call, malla_inline_caller
        cdef double started = _now()
        # the handler sees its call (malla.current_call()), only while it runs
        cdef PyObject* outer_call = malla_inline_call
        cdef PyObject* outer_caller = malla_inline_caller
        malla_inline_call = <PyObject*>call
        malla_inline_caller = <PyObject*>self.peer_name
        try:
            if call.kwargs:
                result = fn(*call.args, **call.kwargs)
            else:
                result = fn(*call.args)
        except Exception as exc:
            if call.cast:
                self.cast_failed(entry.name, call.fun, "RemoteError", f"{type_name(exc)}: {exc}")
            else:
                self.reply_exception(call.sid, exc)
            return 0
        finally:
            malla_inline_call = outer_call
            malla_inline_caller = outer_caller
            _warn_if_blocked(entry.name, call.fun, started)
        if not call.cast:
            self.reply(call.sid, result)
        return 0

    cdef int _refuse(self, bint cast, uint64_t sid, str service, str fun, int code,
                     str exc_type, str message, object hint=None) except -1:
        # An incoming call that does not run: its caller gets the ERROR; a
        # cast has no caller to tell, so the node logs and counts it.
        if cast:
            self.cast_failed(service, fun, exc_type.rpartition(".")[2], message)
        else:
            self._queue_error(sid, code, exc_type, message, None, hint)
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
                          object tb, object hint=None) except -1:
        return self._queue_message(FT_ERROR, 0, sid, _error_body(code, exc_type, message, tb,
                                                                 hint, self.retry_hints))

    def send_message(self, int ftype, payload, int flags=0, uint64_t sid=0):
        """Queue a control message (msgpack payload); split if large."""
        if sid == 0 and ftype != FT_HEARTBEAT and ftype != FT_ERROR:
            sid = self._next_sid
            self._next_sid += 2
        self._queue_message(<uint8_t>ftype, <uint8_t>flags, sid, payload)

    def ping(self):
        """Send a HEARTBEAT asking for an answer; the future of the answer
        (ConnectionLost if the connection goes first)."""
        cdef uint64_t sid = self._next_sid
        fut = self._loop.create_future()
        self._next_sid += 2
        if self._state != CS_READY:
            fut.set_exception(ConnectionLost(f"connection to {self.peer_name} is not open"))
            return fut
        self._pending.pings[sid] = fut
        self._queue_message(FT_HEARTBEAT, FLAG_ACK, sid, None)
        return fut

    def forget_ping(self, fut):
        """The caller stopped waiting for a ping's answer."""
        for sid, other in list(self._pending.pings.items()):
            if other is fut:
                del self._pending.pings[sid]
                return

    def call(self, str service, str fun, args, kwargs, double timeout_ms, deadline_ms, meta,
             trace=None):
        """Send a CALL; return the future of its reply.

        Raises ServiceNotAvailable when the connection cannot take it (not
        sent), EncodeError / MessageTooLarge when the request cannot be sent.
        The call's stream id is left in `last_sid` (for `cancel`).
        """
        return self._call(service, fun, args, kwargs, timeout_ms, deadline_ms, meta, trace)

    cdef object _call(self, str service, str fun, args, kwargs, double timeout_ms, deadline_ms,
                      meta, trace):
        cdef Py_ssize_t start = self._encode_call(FT_CALL, service, fun, args, kwargs,
                                                  timeout_ms, deadline_ms, meta, trace)
        cdef uint64_t sid = self.last_sid
        cdef object fut
        try:
            fut = self._loop.create_future()
        except BaseException:
            self._wbuf.truncate(start)
            raise
        # pending before it is queued (a quiet connection writes a call at
        # once when it is the only one in flight), its deadline once sent
        self._pending.calls[sid] = fut
        try:
            self._queue_encoded(start)
        except BaseException:
            del self._pending.calls[sid]
            raise
        self.calls_out += 1
        cdef double now = self.latency.sent(sid, service)
        if timeout_ms > 0 and self._pending.add_deadline(sid, now + timeout_ms * 0.001):
            self._arm_timer()
        return fut

    def try_call(self, dict checks, str node, str service, str fun, args, kwargs,
                 double timeout_ms, meta):
        """The common call in one C call: the future of its reply, or None
        when it is not the common case and the caller's full path must take
        it (the connection not ready or congested, a cast, arguments that
        are not positional within the announced range).  `checks` is the
        registry's table service -> node -> Checker (arguments.py)."""
        cdef PyObject* nodes
        cdef PyObject* funs
        cdef PyObject* checker
        cdef Py_ssize_t nargs
        if self._state != CS_READY or self._congested or timeout_ms <= 0 or kwargs:
            return None
        nodes = PyDict_GetItem(checks, service)
        if nodes is not NULL:
            funs = PyDict_GetItem(<object>nodes, node)
            if funs is not NULL:
                checker = PyDict_GetItem(<object>funs, fun)
                if checker is NULL:
                    return None         # (an unknown function: the full path says so)
                nargs = len(args)
                if not (<object>checker).lo <= nargs <= (<object>checker).hi:
                    return None
        return self._call(service, fun, args, None, timeout_ms, None, meta, None)

    def cast(self, str service, str fun, args, kwargs, meta, trace=None):
        """Send a CAST (no reply)."""
        cdef Py_ssize_t start = self._encode_call(FT_CAST, service, fun, args, kwargs, 0, None,
                                                  meta, trace)
        self.calls_out += 1
        self._queue_encoded(start)

    def open_stream(self, str service, str fun, args, kwargs, double timeout_ms, deadline_ms,
                    meta, trace, Py_ssize_t window):
        """Send a STREAM (a call answered by items); its StreamIn (raises as call())."""
        cdef Py_ssize_t start = self._encode_call(FT_STREAM, service, fun, args, kwargs,
                                                  timeout_ms, deadline_ms, meta, trace, window)
        cdef StreamIn st = self.streams.consumer(self, self.last_sid, window)
        try:
            self._queue_encoded(start)
        except BaseException:
            del self.streams.consumers[st.sid]
            raise
        self.calls_out += 1
        return st

    cdef Py_ssize_t _encode_call(self, uint8_t ftype, str service, str fun, args, kwargs,
                                 double timeout_ms, deadline_ms, meta, trace,
                                 Py_ssize_t window=0) except -1:
        # The CALL or CAST frame of a new stream, encoded in the write buffer:
        # returns where it starts (its stream id is in last_sid); nothing is
        # left in the buffer when the arguments cannot be encoded.
        cdef WriteBuffer wb = self._wbuf
        cdef Py_ssize_t start
        if self._state != CS_READY:
            raise ServiceNotAvailable(f"connection to {self.peer_name} is not open")
        start = wb.begin_frame(ftype, 0, self._next_sid)
        try:
            _pack_call(wb, service, fun, args, kwargs, timeout_ms, deadline_ms, meta, trace,
                       window)
        except BaseException:
            wb.truncate(start)
            raise
        self.last_sid = self._next_sid
        self._next_sid += 2
        return start

    def cancel(self, uint64_t sid):
        """Forget call `sid` and tell the peer to cancel it."""
        if self._pending.pop(sid) is None:
            return False
        self._send_cancel(sid)
        return True

    # -- the calls' deadlines: one timer for all ----------------------------------

    cdef int _arm_timer(self) except -1:
        cdef double top = self._pending.next_deadline()
        if top == 0 or self._state == CS_CLOSED:
            return 0
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
        while True:
            sid = self._pending.next_expired(now)
            if sid == 0:
                break
            fut = self._pending.pop(sid)
            self.latency.ended(sid, OUTCOME_FAILED)
            if not fut.done():
                fut.set_exception(CallTimeout(f"no reply from {self.peer_name} in time"))
            # The peer cancels what it still runs for us.
            self._send_cancel(sid)
        self._arm_timer()


class Protocol(CoreProtocol, asyncio.BufferedProtocol):
    """CoreProtocol with asyncio's BufferedProtocol ABC (never asyncio.Protocol:
    uvloop would then copy every read)."""
