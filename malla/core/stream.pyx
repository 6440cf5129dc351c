# Streaming calls (docs/protocol.md "Streams of items"): a STREAM opens one
# as a CALL does, the producer sends ITEMs, never more than the consumer's
# credit (its window at first, then what each CREDIT gives back), and ends
# it with a REPLY (nil) or an ERROR; the consumer's CANCEL stops it.  The
# book of one connection holds both directions; the policy (failover,
# timeouts, running the generator) is Python's (malla/streams.py,
# malla/stream_serve.py).

from collections import deque

STREAM_WINDOW_MAX = MAX_STREAM_WINDOW
# (take() when nothing is buffered)
STREAM_EMPTY = object()
cdef object _EMPTY = STREAM_EMPTY
cdef object _deque = deque


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
            self.give_back(1)
            return self._items.popleft()
        if self._end is not None:
            end = self._end
            raise end() if end is StopAsyncIteration else end
        return _EMPTY

    def take_ready(self):
        """Every item that has arrived, not counted as taken: the consumer
        gives them back (`give_back`) once it has used them."""
        items = list(self._items)
        self._items.clear()
        return items

    def give_back(self, Py_ssize_t n):
        """`n` items of take_ready() have been used: the producer may send
        as many more (the credit goes with the next half window)."""
        self._taken += n
        if self._taken * 2 >= self.window and self._end is None and self._taken:
            self._wire._queue_message(FT_CREDIT, 0, self.sid, self._taken)
            self._taken = 0

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
