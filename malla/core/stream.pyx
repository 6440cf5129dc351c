# Streaming calls (docs/protocol.md "Streams of items"): a STREAM opens one
# as a CALL does, the producer sends ITEMs, never more than the consumer's
# credit (its window at first, then what each CREDIT gives back), and ends
# it with a REPLY (nil) or an ERROR; the consumer's CANCEL stops it.  The
# book of one connection holds both directions; the policy (failover,
# timeouts, running the generator) is Python's (malla/streams.py,
# malla/stream_serve.py).

import types as _types
from collections import deque

from cpython.ref cimport Py_INCREF, Py_XDECREF

cdef extern from "Python.h":
    # (3.10+: one step of a coroutine or an iterator, its return value not
    # raised as StopIteration: PYGEN_RETURN 0, PYGEN_NEXT 1, PYGEN_ERROR -1)
    int PyIter_Send(object iter, object arg, PyObject **presult) except -1
    bint PyIter_Check(object o)
    ctypedef int (*sendfunc)(PyObject* iter, PyObject* arg, PyObject** presult) noexcept
    ctypedef struct _AsyncSlots "PyAsyncMethods":
        sendfunc am_send
    ctypedef struct _TypeSlots "PyTypeObject":
        _AsyncSlots* tp_as_async

STREAM_WINDOW_MAX = MAX_STREAM_WINDOW
# (take() when nothing is buffered)
STREAM_EMPTY = object()
cdef object _EMPTY = STREAM_EMPTY
cdef object _deque = deque
# A producer's batch: the items a generator yields without waiting leave
# together in one ITEM, at most this many, and about this many bytes of
# bytes and str (docs/protocol.md "Streams of items")
STREAM_BATCH_ITEMS = 256
STREAM_BATCH_BYTES = 64 * 1024
cdef Py_ssize_t _BATCH_ITEMS = STREAM_BATCH_ITEMS
cdef Py_ssize_t _BATCH_BYTES = STREAM_BATCH_BYTES


@cython.final
@cython.freelist(16)
cdef class _Ready:
    """An awaitable already done with `value` (a consumer's buffered item:
    no coroutine, no future, no loop iteration to take it)."""

    cdef object _value

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        raise StopIteration(self._value)

    def send(self, value):
        raise StopIteration(self._value)

    def throw(self, typ, val=None, tb=None):
        raise typ if val is None else val

    def close(self):
        pass


cdef int _ready_send(PyObject* ready, PyObject* arg, PyObject** presult) noexcept:
    # _Ready's am_send: its value returned (PYGEN_RETURN), not raised as a
    # StopIteration, to the `await` (3.10+'s SEND calls it through PyIter_Send)
    cdef object value = (<_Ready>ready)._value
    Py_INCREF(value)
    presult[0] = <PyObject*>value
    return 0


if (<_TypeSlots*>_Ready).tp_as_async != NULL:
    (<_TypeSlots*>_Ready).tp_as_async.am_send = _ready_send


@cython.final
cdef class StreamIter:
    """What `async for` iterates over a malla.streams.Stream: an item that
    has arrived is handed as an awaitable already done, in C (no Python
    frame, coroutine or future per item); anything else (the opening, the
    waits, the end, a deadline to check) is the stream's `_next()`.  The
    stream's `_fast` is its StreamIn once open over TCP without a deadline."""

    cdef object _stream
    cdef object _st

    def __cinit__(self, object stream):
        self._stream = stream

    def __aiter__(self):
        return self

    def __anext__(self):
        cdef _Ready ready
        cdef StreamIn st
        if self._st is None:
            self._st = self._stream._fast
            if self._st is None:
                return self._stream._next()
        st = <StreamIn>self._st
        if not st._items:
            return self._stream._next()
        st._credit(1)
        ready = _Ready.__new__(_Ready)
        ready._value = st._items.popleft()
        return ready


@cython.final
cdef class _Waiting:
    """The rest of a generator's step that waits (StreamOut.pump): awaited,
    it first hands the task what the step is waiting on, then passes what
    the task sends or throws on to the step; its result is the item."""

    cdef object _step
    cdef object _pending
    cdef bint _handed

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        return self.send(None)

    def send(self, value):
        if not self._handed:
            self._handed = True
            pending, self._pending = self._pending, None
            return pending
        return self._step.send(value)

    def throw(self, *exc):
        self._handed = True
        self._pending = None
        return self._step.throw(*exc)

    def close(self):
        self._step.close()


cdef inline void _wake_up(object waiter):
    # the consumer's or the producer's waiter, when one waits
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


@cython.final
cdef class StreamIn:
    """The consumer's side of one stream: the items that arrived and were
    not taken yet (at most its window), and how it ended."""

    def __cinit__(self, uint64_t sid, Wire wire, dict table, Py_ssize_t window):
        self.sid = sid
        self._wire = wire
        self._table = table
        self._items = _deque()
        self.window = window

    cdef int push(self, object items) except -1:
        # an ITEM frame's items: never beyond the credit this side gave
        if type(items) is not list or not PyList_GET_SIZE(items):
            raise ProtocolError(f"stream {self.sid}: an ITEM is a non-empty array of items")
        if len(self._items) + PyList_GET_SIZE(items) > self.window:
            raise ProtocolError(f"stream {self.sid}: items beyond the window of {self.window}")
        self._items.extend(items)
        self.started = True
        self._wake()
        return 0

    cdef int finish(self, object end) except -1:
        # the REPLY, ERROR or lost connection that ends it: raised once the
        # items before it are taken
        if self._end is None:
            self._end = end
        self.started = True
        self._table.pop(self.sid, None)
        self._wake()
        return 0

    cdef void _wake(self):
        waiter, self._waiter = self._waiter, None
        _wake_up(waiter)

    @property
    def buffered(self):
        """Items received and not taken yet."""
        return len(self._items)

    @property
    def ended(self):
        return self._end is not None

    def take(self):
        """The next item; STREAM_EMPTY when none has arrived yet; raises
        StopAsyncIteration, or the error, once the stream has ended and its
        items are taken.  Half a window taken, the producer gets it back."""
        if self._items:
            self._credit(1)
            return self._items.popleft()
        if self._end is not None:
            end = self._end
            raise end() if end is StopAsyncIteration else end
        return _EMPTY

    def ready(self):
        """An awaitable already done with the next item, or None when none
        has arrived (or it has ended: take() says how); counted as take()."""
        cdef _Ready ready
        if not self._items:
            return None
        self._credit(1)
        ready = _Ready.__new__(_Ready)
        ready._value = self._items.popleft()
        return ready

    def take_ready(self):
        """Every item that has arrived, not counted as taken: the consumer
        gives them back (`give_back`) once it has used them."""
        items = list(self._items)
        self._items.clear()
        return items

    def give_back(self, Py_ssize_t n):
        """`n` items of take_ready() have been used: the producer may send
        as many more (the credit goes with the next half window)."""
        self._credit(n)

    cdef int _credit(self, Py_ssize_t n) except -1:
        # (a CREDIT each half window taken: docs/protocol.md; a quarter
        # measured no faster, in more frames)
        self._taken += n
        if self._taken * 2 >= self.window and self._end is None and self._taken:
            self._wire._queue_message(FT_CREDIT, 0, self.sid, self._taken)
            self._taken = 0
        return 0

    def wait(self, loop):
        """The future that is done when the next item or the end arrives."""
        fut = self._waiter = loop.create_future()
        return fut

    def fail(self, error):
        """End the stream here with `error` (the consumer gave up: timeout,
        deadline, an item it cannot decode) and tell the producer to stop."""
        if self._end is None:
            self._end = error
        self._leave()

    def close(self):
        """Stop consuming: the producer is sent CANCEL (unless it ended)."""
        if self._end is None:
            self._end = StopAsyncIteration
        self._leave()

    cdef int _leave(self) except -1:
        if self._table.pop(self.sid, None) is not None:
            self._wire._send_cancel(self.sid)
        self._items.clear()
        self._wake()
        return 0


cdef object _coroutine = _types.CoroutineType


cdef int _abandon(object step, object pending) except -1:
    # A step that waits and will never be awaited (what it made before
    # could not be sent: the stream ends with that error): cancelled where
    # it waits, as a cancelled task's would be, so the generator's
    # `finally` runs now and it is not left running (its aclose() works)
    if hasattr(pending, "cancel"):
        pending.cancel()
    try:
        step.throw(CancelledError)
    except BaseException as exc:
        # (it ended, as it should; what it raised instead is logged: the
        # stream's error is the one that ends it)
        if not isinstance(exc, (CancelledError, StopIteration, StopAsyncIteration)):
            _log.warning("malla: a stream's generator raised as it was closed", exc_info=True)
    return 0


cdef inline Py_ssize_t _size_of(object item):
    # what an item counts toward a batch's bytes
    if type(item) is bytes:
        return PyBytes_GET_SIZE(item)
    if type(item) is str or type(item) is bytearray:
        return len(item)
    return 0


@cython.final
cdef class StreamOut:
    """The producer's side of one stream: the consumer's credit."""

    def __cinit__(self, uint64_t sid, Wire wire, Py_ssize_t credit):
        self.sid = sid
        self._wire = wire
        self.credit = self.window = credit

    def send(self, list items):
        """Queue one ITEM frame of `items` (EncodeError, MessageTooLarge:
        nothing queued)."""
        self._wire._queue_message(FT_ITEM, 0, self.sid, items)
        self.credit -= PyList_GET_SIZE(items)

    def wait(self, loop):
        """A future done when credit comes (or the connection goes)."""
        fut = self._waiter = loop.create_future()
        return fut

    def pump(self, object gen, object item=_EMPTY):
        """Step the async iterator `gen` (after `item`, what its last step
        that waited gave) while it yields without waiting, then send what
        it made as one ITEM (within the credit, the batch's bounds).
        Returns None when that left because the batch was full or took the
        last credit; a `_Waiting` to await (its result: the next item) when
        the generator waits for anything, what it made gone first; raises
        StopAsyncIteration at its end and its exception, the items before
        sent first.  (The producer's loop per item, in C: malla/stream_serve.py.)"""
        cdef list batch = []
        cdef Py_ssize_t size = 0
        cdef Py_ssize_t limit
        cdef PyObject* result
        cdef int sent
        cdef _Waiting waiting
        anext = gen.__anext__
        if item is not _EMPTY:
            size = _size_of(item)
            batch.append(item)
        while True:
            limit = self.credit if self.credit < _BATCH_ITEMS else _BATCH_ITEMS
            if PyList_GET_SIZE(batch) >= limit or size >= _BATCH_BYTES:
                self._flush(batch)
                return None
            step = anext()
            if not PyIter_Check(step) and type(step) is not _coroutine:
                step = step.__await__()
            try:
                sent = PyIter_Send(step, None, &result)
            except BaseException:
                self._flush(batch)      # (the items before the end or the error go first)
                raise
            value = <object>result
            Py_XDECREF(result)
            if sent == 0:               # yielded without waiting: the step's value
                size += _size_of(value)
                batch.append(value)
                continue
            try:
                self._flush(batch)      # it waits: what it made goes now
            except BaseException:
                _abandon(step, value)
                raise
            waiting = _Waiting.__new__(_Waiting)
            waiting._step = step
            waiting._pending = value
            return waiting

    cdef int _flush(self, list items) except -1:
        # One ITEM of `items`; one each when they cannot go together (a
        # batch too large, an item that cannot be encoded: those before it
        # still go, then its error is raised)
        if not PyList_GET_SIZE(items):
            return 0
        try:
            self._wire._queue_message(FT_ITEM, 0, self.sid, items)
        except (MessageTooLarge, EncodeError):
            if PyList_GET_SIZE(items) == 1:
                raise
            for item in items:
                self._wire._queue_message(FT_ITEM, 0, self.sid, [item])
                self.credit -= 1
            return 0
        self.credit -= PyList_GET_SIZE(items)
        return 0

    cdef void _wake(self):
        waiter, self._waiter = self._waiter, None
        _wake_up(waiter)


@cython.final
cdef class StreamBook:
    """The streams of one connection, both ways."""

    # (no reference to its connection's Wire: the protocol holds the book,
    # and a cycle would keep a dropped protocol, and what the debug build
    # counts of it, until the cyclic collector ran)
    def __cinit__(self):
        self.consumers = {}
        self.producers = {}

    def __len__(self):
        return len(self.consumers) + len(self.producers)

    def consumer(self, Wire wire, uint64_t sid, Py_ssize_t window):
        """A stream we opened over `wire` (its STREAM frame queued as `sid`)."""
        cdef StreamIn st = StreamIn(sid, wire, self.consumers, window)
        self.consumers[sid] = st
        return st

    def producer(self, Wire wire, uint64_t sid, Py_ssize_t window):
        """A stream the peer opened over `wire`, whose items we produce."""
        cdef StreamOut out = StreamOut(sid, wire, window)
        self.producers[sid] = out
        return out

    def forget_producer(self, uint64_t sid):
        self.producers.pop(sid, None)

    cdef int on_item(self, uint64_t sid, const char* p, Py_ssize_t n, list detached) except -1:
        cdef object st = self.consumers.get(sid)
        if st is None:
            return 0                # a late item of a stream we left
        try:
            item = _unpack_detached(p, n, detached)
        except EncodeError as exc:
            # well-formed, but a value this node cannot rebuild: that
            # stream fails (as a reply would), the connection stays
            return self.fail(sid, remote_error("malla.exceptions.EncodeError",
                                               f"an item cannot be decoded: {exc}"))
        except Exception as exc:
            raise ProtocolError(f"undecodable item on stream {sid}: {exc}") from None
        (<StreamIn>st).push(item)
        return 0

    cdef int on_credit(self, uint64_t sid, const char* p, Py_ssize_t n) except -1:
        cdef object out = self.producers.get(sid)
        try:
            more = _unpack(p, n)
        except Exception:
            more = None
        if type(more) is not int or not 0 < more <= MAX_STREAM_WINDOW:
            raise ProtocolError(f"malformed CREDIT frame: {more!r}")
        if out is not None:         # (else a stream that has ended)
            if (<StreamOut>out).credit + <Py_ssize_t>more > (<StreamOut>out).window:
                # (an honest consumer gives back only items it received: a
                # hostile one would make the producer queue without bound)
                raise ProtocolError(f"CREDIT of {more} beyond stream {sid}'s window")
            (<StreamOut>out).credit += <Py_ssize_t>more
            (<StreamOut>out)._wake()
        return 0

    cdef bint on_end(self, uint64_t sid, object end) except -1:
        # A REPLY or ERROR of no pending call: True when it ended a stream.
        cdef object st = self.consumers.get(sid)
        if st is None:
            return False
        (<StreamIn>st).finish(end)
        return True

    cdef int lost(self, object error) except -1:
        cdef StreamIn st
        cdef StreamOut out
        for st in list(self.consumers.values()):
            st.finish(error)
        self.consumers.clear()
        for out in list(self.producers.values()):
            out._wake()         # (their tasks are cancelled with the connection)
        self.producers.clear()
        return 0

    cdef int fail(self, uint64_t sid, object error) except -1:
        # This side cannot take stream `sid` on (an item it cannot decode
        # or keep): it ends with `error`, and the producer is cancelled.
        cdef object st = self.consumers.get(sid)
        if st is not None:
            (<StreamIn>st).fail(error)
        return 0
