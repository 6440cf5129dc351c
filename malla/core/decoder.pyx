# The decoder: msgpack's C unpacker, a fast path for scalars, detached values.

cdef object _NOT_SCALAR = object()


cdef object _unpack_scalar(const unsigned char* p, Py_ssize_t n):
    # A reply is very often one scalar (a number, a string, bytes, None):
    # build it here, without a call into msgpack.  Anything else, or a
    # scalar that does not span the payload exactly, is msgpack's to decode.
    cdef unsigned char c
    cdef Py_ssize_t size, head
    cdef uint64_t bits
    cdef double d
    if n == 0:
        return _NOT_SCALAR
    c = p[0]
    if n == 1:
        if c <= 0x7f:
            return <long>c
        if c >= 0xe0:
            return <long>(<signed char>c)
        if c == 0xc0:
            return None
        if c == 0xc2:
            return False
        if c == 0xc3:
            return True
        if c == 0xa0:
            return ""
        return _NOT_SCALAR
    if c == 0xcb and n == 9:
        bits = _get_u64(<const char*>p + 1)
        memcpy(&d, &bits, 8)
        return d
    if c == 0xcc and n == 2:
        return <long>p[1]
    if c == 0xcd and n == 3:
        return <long>((<unsigned int>p[1] << 8) | p[2])
    if c == 0xce and n == 5:
        return <unsigned long long>_get_u32(<const char*>p + 1)
    if c == 0xcf and n == 9:
        return <unsigned long long>_get_u64(<const char*>p + 1)
    if c == 0xd0 and n == 2:
        return <long>(<signed char>p[1])
    if c == 0xd1 and n == 3:
        return <long>(<short>((<unsigned int>p[1] << 8) | p[2]))
    if c == 0xd2 and n == 5:
        return <long long>(<int>_get_u32(<const char*>p + 1))
    if c == 0xd3 and n == 9:
        return <long long>(<int64_t>_get_u64(<const char*>p + 1))
    if 0xa0 <= c <= 0xbf:
        size, head = c & 0x1f, 1
    elif c == 0xd9 or c == 0xc4:
        size, head = p[1], 2
    elif (c == 0xda or c == 0xc5) and n >= 3:
        size, head = (<Py_ssize_t>p[1] << 8) | p[2], 3
    elif (c == 0xdb or c == 0xc6) and n >= 5:
        size, head = _get_u32(<const char*>p + 1), 5
    else:
        return _NOT_SCALAR
    if head + size != n:
        return _NOT_SCALAR
    if c == 0xc4 or c == 0xc5 or c == 0xc6:
        return PyBytes_FromStringAndSize(<const char*>p + head, size)
    return PyUnicode_DecodeUTF8(<const char*>p + head, size, NULL)


cdef inline object _unpack(const char* p, Py_ssize_t n):
    cdef object value = _unpack_scalar(<const unsigned char*>p, n)
    if value is not _NOT_SCALAR:
        return value
    # msgpack copies what it keeps, so a view into our buffer is safe here.
    # Its own timestamp (ext -1) never reaches ext_hook: timestamp=3 reads it
    # as an aware UTC datetime, a wire type (a msgpack Timestamp is not).
    return _msgpack_decode(p, n, _ext_hook)


cdef inline object _msgpack_decode(const char* p, Py_ssize_t n, object ext_hook):
    return _msgpack_unpackb(PyMemoryView_FromMemory(<char*>p, n, PyBUF_READ),
                            ext_hook=ext_hook, raw=False, strict_map_key=False,
                            use_list=True, timestamp=3)


@cython.final
cdef class _DetachedHook:
    # msgpack's ext_hook while a skeleton is decoded: markers (tag 0) become
    # their detached values; code 127 sent by the peer (tag 1) and every
    # other code go to the codec.
    cdef list values

    def __call__(self, int code, bytes data):
        if code == EXT_DETACHED:
            if PyBytes_GET_SIZE(data) == 5 and data[0] == 0:
                return self.values[_get_u32(PyBytes_AS_STRING(data) + 1)]
            return _ext_hook(code, data[1:])
        return _ext_hook(code, data)


cdef object _unpack_detached(const char* p, Py_ssize_t n, list detached):
    # Decode a message that may have detached bytes values (Reassembly).
    cdef _DetachedHook hook
    if detached is None:
        return _unpack(p, n)
    if n == 8 and PyList_GET_SIZE(detached) == 1:
        return detached[0]          # the whole message is one bytes value (a REPLY)
    hook = _DetachedHook.__new__(_DetachedHook)
    hook.values = detached
    return _msgpack_decode(p, n, hook)


def unpackb(data):
    """Decode a value encoded by packb (with the codec's extension types)."""
    cdef const unsigned char[:] view = memoryview(data).cast("B")
    if view.shape[0]:
        return _unpack(<const char*>&view[0], view.shape[0])
    return _unpack(b"", 0)
