# Streaming calls: the items of a stream this side consumes, the credit of
# a stream this side produces, and the book of both for one connection.

@cython.final
cdef class StreamIn:
    cdef readonly uint64_t sid
    cdef Wire _wire
    cdef dict _table                # the book's consumers (to leave it when closed)
    cdef object _items              # collections.deque: received, not taken yet
    cdef readonly Py_ssize_t window
    cdef Py_ssize_t _taken          # taken since the last CREDIT
    cdef object _end                # None while open; StopAsyncIteration or the error
    cdef object _waiter             # the future the consumer waits on, or None
    cdef readonly bint started      # an item, the end or an error arrived

    cdef int push(self, object items) except -1
    cdef int _credit(self, Py_ssize_t n) except -1
    cdef int finish(self, object end) except -1
    cdef void _wake(self)
    cdef int _leave(self) except -1


@cython.final
cdef class StreamOut:
    cdef readonly uint64_t sid
    cdef Wire _wire
    cdef public Py_ssize_t credit   # items the consumer may still receive
    cdef readonly Py_ssize_t window  # the most credit it may hold
    cdef object _waiter

    cdef void _wake(self)
    cdef int _flush(self, list items) except -1


@cython.final
cdef class StreamBook:
    cdef readonly dict consumers    # sid -> StreamIn
    cdef readonly dict producers    # sid -> StreamOut

    cdef int on_item(self, uint64_t sid, const char* p, Py_ssize_t n, list detached) except -1
    cdef int on_credit(self, uint64_t sid, const char* p, Py_ssize_t n) except -1
    cdef bint on_end(self, uint64_t sid, object end) except -1
    cdef int lost(self, object error) except -1
    cdef int fail(self, uint64_t sid, object error) except -1
