# Pending: the calls this side sent and still waits for (sans-IO).

cdef class Pending:
    """Stream id -> the future of each call in flight, and each call's
    deadline in one min-heap of C structs: the protocol arms a single loop
    timer at `next_deadline()` (no timer handle per call) and asks for the
    `expired()` calls when it fires.  A call answered before its deadline
    leaves its heap entry behind (lazy deletion), dropped when it surfaces or
    when the heap outgrows twice the calls in flight.  Pings (a HEARTBEAT
    asking for an answer) wait here too, without a deadline of their own: the
    connection bounds its wait.
    """

    def __cinit__(self):
        self.calls = {}
        self.pings = {}
        self._heap = NULL
        self._len = 0
        self._size = 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    def __len__(self):
        return PyDict_Size(self.calls)

    @property
    def heap_len(self):
        """Deadlines in the heap, stale ones included (bounded: tests)."""
        return self._len

    cdef int add_deadline(self, uint64_t sid, double deadline) except -1:
        # The deadline of call `sid` (in `calls`, and sent): 1 when it is now
        # the earliest, so that the timer must move.
        return self._push(deadline, sid)

    cdef object pop(self, uint64_t sid):
        """The future of call `sid`, forgotten; None when it is not pending."""
        cdef object key = sid
        cdef PyObject* fp = PyDict_GetItem(self.calls, key)
        if fp is NULL:
            return None
        fut = <object>fp
        del self.calls[key]
        return fut

    cdef double next_deadline(self):
        """The earliest deadline of a call still pending; 0 when none."""
        while self._len and self._heap[0].sid not in self.calls:
            self._pop_top()
        return self._heap[0].deadline if self._len else 0

    cdef uint64_t next_expired(self, double now):
        """A call still pending whose deadline has passed (its future stays
        in `calls` for the caller to pop), or 0 when there is none."""
        cdef uint64_t sid
        while self._len and self._heap[0].deadline <= now:
            sid = self._heap[0].sid
            self._pop_top()
            if sid in self.calls:
                return sid
        return 0

    cdef int fail_all(self, object exc_factory) except -1:
        """Fail every call and ping with a fresh exc_factory() (the
        connection is gone); nothing is pending afterwards."""
        waiting = list(self.calls.values()) + list(self.pings.values())
        self.calls.clear()
        self.pings.clear()
        self._len = 0
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc_factory())
        return 0

    # -- the heap ---------------------------------------------------------------

    cdef int _push(self, double deadline, uint64_t sid) except -1:
        cdef Py_ssize_t i, parent
        cdef TimerEntry* grown
        cdef TimerEntry tmp
        if self._len > 2 * PyDict_Size(self.calls) + 256:
            self._compact()
        if self._len == self._size:
            grown = <TimerEntry*>PyMem_Realloc(
                self._heap, (self._size * 2 + 64) * sizeof(TimerEntry))
            if grown is NULL:
                raise MemoryError()
            self._heap = grown
            self._size = self._size * 2 + 64
        i = self._len
        self._heap[i].deadline = deadline
        self._heap[i].sid = sid
        self._len += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self._heap[parent].deadline <= self._heap[i].deadline:
                break
            tmp = self._heap[parent]
            self._heap[parent] = self._heap[i]
            self._heap[i] = tmp
            i = parent
        return i == 0

    cdef void _sift_down(self, Py_ssize_t i):
        # Move entry i down until neither child has an earlier deadline.
        cdef Py_ssize_t child, n = self._len
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

    cdef void _pop_top(self):
        self._len -= 1
        if self._len:
            self._heap[0] = self._heap[self._len]
            self._sift_down(0)

    cdef int _compact(self) except -1:
        # Drop the entries of calls already answered and rebuild the heap,
        # so that it stays within 2x the calls in flight.
        cdef Py_ssize_t i, j = 0
        for i in range(self._len):
            if self._heap[i].sid in self.calls:
                self._heap[j] = self._heap[i]
                j += 1
        self._len = j
        for i in range(j // 2 - 1, -1, -1):
            self._sift_down(i)
        return 0
