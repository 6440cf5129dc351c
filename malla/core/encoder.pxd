# The encoder's extension codes and its write buffer.

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
