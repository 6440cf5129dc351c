# The frame header: big-endian integers in place (docs/protocol.md).

cdef inline void _put_u16(char* p, uint16_t v) noexcept:
    p[0] = <char>(v >> 8)
    p[1] = <char>v


cdef inline void _put_u32(char* p, uint32_t v) noexcept:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline void _put_u64(char* p, uint64_t v) noexcept:
    _put_u32(p, <uint32_t>(v >> 32))
    _put_u32(p + 4, <uint32_t>v)


cdef inline uint32_t _get_u32(const char* p) noexcept:
    cdef const unsigned char* u = <const unsigned char*>p
    return ((<uint32_t>u[0]) << 24) | ((<uint32_t>u[1]) << 16) | ((<uint32_t>u[2]) << 8) | u[3]


cdef inline uint64_t _get_u64(const char* p) noexcept:
    return ((<uint64_t>_get_u32(p)) << 32) | _get_u32(p + 4)


cdef inline void _put_frame_header(char* p, uint8_t ftype, uint8_t flags, uint64_t sid,
                                   uint32_t length) noexcept:
    # docs/protocol.md "Frame": type, flags, reserved, length, stream id
    p[0] = <char>ftype
    p[1] = <char>flags
    p[2] = 0
    p[3] = 0
    _put_u32(p + 4, length)
    _put_u64(p + 8, sid)


cdef bytes _frame_header(uint8_t ftype, uint8_t flags, uint64_t sid, uint32_t length):
    cdef bytes h = PyBytes_FromStringAndSize(NULL, HEADER_SIZE)
    _put_frame_header(PyBytes_AS_STRING(h), ftype, flags, sid, length)
    return h


cdef int _grow_buffer(char** buf, Py_ssize_t* size, Py_ssize_t need) except -1:
    # A buffer doubled (at least to `need` bytes), its contents kept: the
    # write buffer's and the reader's one way to grow.
    cdef Py_ssize_t new_size = size[0] * 2
    cdef char* grown
    if new_size < need:
        new_size = need
    grown = <char*>PyMem_Realloc(buf[0], new_size)
    if grown is NULL:
        raise MemoryError()
    buf[0] = grown
    size[0] = new_size
    return 0
