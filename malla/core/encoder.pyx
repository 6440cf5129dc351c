# WriteBuffer: the write buffer and malla's msgpack encoder, frames built in place.

# ---------------------------------------------------------------------------
# WriteBuffer: frames and msgpack, encoded in place
# ---------------------------------------------------------------------------

cdef class WriteBuffer:
    """A growable byte buffer with malla's msgpack encoder and frame builder."""

    def __cinit__(self):
        self._buf = <char*>PyMem_Malloc(WRITE_BUF_INITIAL)
        if self._buf is NULL:
            raise MemoryError()
        self._size = WRITE_BUF_INITIAL
        self._len = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)

    def __len__(self):
        return self._len

    cdef int _grow(self, Py_ssize_t extra) except -1:
        return _grow_buffer(&self._buf, &self._size, self._len + extra)

    cdef inline int _reserve(self, Py_ssize_t extra) except -1:
        if self._len + extra > self._size:
            self._grow(extra)
        return 0

    cdef int write_raw(self, const char* data, Py_ssize_t n) except -1:
        self._reserve(n)
        memcpy(self._buf + self._len, data, n)
        self._len += n
        return 0

    cdef void truncate(self, Py_ssize_t n):
        cdef Py_ssize_t last
        self._len = n
        if self._segs:
            # (the module is compiled without wraparound: no [-1])
            last = PyList_GET_SIZE(self._segs) - 1
            while last >= 0 and <Py_ssize_t>(<tuple>self._segs[last])[0] >= n:
                self._detached -= PyBytes_GET_SIZE((<tuple>self._segs.pop())[1])
                last -= 1

    cdef bytes take(self):
        # (frames holding detached values never come here: take_parts)
        cdef bytes out = PyBytes_FromStringAndSize(self._buf, self._len)
        self._len = 0
        return out

    cdef list take_parts(self, Py_ssize_t start, Py_ssize_t payload_at):
        # The bytes from payload_at on, as a list of buffers: copies of our
        # own bytes around the detached values, which are not copied.  The
        # buffer is then cut back to `start`.
        cdef list parts = []
        cdef Py_ssize_t at = payload_at, pos
        if self._segs:
            for pos, value in self._segs:
                if pos > at:
                    parts.append(PyBytes_FromStringAndSize(self._buf + at, pos - at))
                parts.append(value)
                at = pos
        if self._len > at:
            parts.append(PyBytes_FromStringAndSize(self._buf + at, self._len - at))
        self.truncate(start)
        return parts

    cdef int _detach(self, bytes value) except -1:
        if self._segs is None:
            self._segs = []
        self._segs.append((self._len, value))
        self._detached += PyBytes_GET_SIZE(value)
        return 0

    cdef void release_if_large(self):
        # After a large message, give the memory back: an idle connection
        # must stay small.
        cdef char* nb
        if self._len == 0 and self._size > WRITE_BUF_KEEP:
            nb = <char*>PyMem_Realloc(self._buf, WRITE_BUF_INITIAL)
            if nb is not NULL:
                self._buf = nb
                self._size = WRITE_BUF_INITIAL

    cdef Py_ssize_t begin_frame(self, uint8_t ftype, uint8_t flags, uint64_t sid) except -1:
        # (the length is filled in by end_frame)
        cdef Py_ssize_t start = self._len
        self._reserve(HEADER_SIZE)
        _put_frame_header(self._buf + start, ftype, flags, sid, 0)
        self._len += HEADER_SIZE
        return start

    cdef int end_frame(self, Py_ssize_t start) except -1:
        _put_u32(self._buf + start + 4, <uint32_t>(self._len - start - HEADER_SIZE))
        return 0

    cdef inline int _put_header(self, uint8_t fix, uint8_t fixmask, Py_ssize_t fixmax,
                                uint8_t c8, uint8_t c16, uint8_t c32, Py_ssize_t n) except -1:
        # Shared length-prefixed header for str/bin/array/map (c8 = 0: none).
        cdef char* p
        self._reserve(5)
        p = self._buf + self._len
        if fixmask and n < fixmax:
            p[0] = <char>(fix | n)
            self._len += 1
        elif c8 and n < 256:
            p[0] = <char>c8
            p[1] = <char>n
            self._len += 2
        elif n < 65536:
            p[0] = <char>c16
            _put_u16(p + 1, <uint16_t>n)
            self._len += 3
        elif n <= 0xFFFFFFFF:
            p[0] = <char>c32
            _put_u32(p + 1, <uint32_t>n)
            self._len += 5
        else:
            raise EncodeError("value too large for msgpack (more than 2**32-1 items or bytes)")
        return 0

    cdef inline int _put_array_header(self, Py_ssize_t n) except -1:
        return self._put_header(0x90, 1, 16, 0, 0xdc, 0xdd, n)

    cdef int _put_ext_header(self, uint8_t code, Py_ssize_t n) except -1:
        cdef char* p
        self._reserve(6)
        p = self._buf + self._len
        if n == 1 or n == 2 or n == 4 or n == 8 or n == 16:
            p[0] = <char>(0xd4 if n == 1 else 0xd5 if n == 2 else 0xd6 if n == 4
                          else 0xd7 if n == 8 else 0xd8)
            p[1] = <char>code
            self._len += 2
        elif n < 256:
            p[0] = <char>0xc7
            p[1] = <char>n
            p[2] = <char>code
            self._len += 3
        elif n < 65536:
            p[0] = <char>0xc8
            _put_u16(p + 1, <uint16_t>n)
            p[3] = <char>code
            self._len += 4
        elif n <= 0xFFFFFFFF:
            p[0] = <char>0xc9
            _put_u32(p + 1, <uint32_t>n)
            p[5] = <char>code
            self._len += 6
        else:
            raise EncodeError("extension value too large for msgpack")
        return 0

    cdef int pack(self, object o, int depth) except -1:
        cdef type t = type(o)
        cdef char* p
        cdef long long v
        cdef unsigned long long uv
        cdef int overflow = 0
        cdef double d
        cdef uint64_t bits
        cdef Py_ssize_t n, i, pos
        cdef const char* s
        cdef PyObject* key
        cdef PyObject* val

        if depth > MAX_DEPTH:
            raise EncodeError("value nested more than 512 levels deep (a cycle?)")
        if o is None:
            self._reserve(1)
            self._buf[self._len] = <char>0xc0
            self._len += 1
        elif t is bool:
            self._reserve(1)
            self._buf[self._len] = <char>(0xc3 if o is True else 0xc2)
            self._len += 1
        elif t is int:
            v = PyLong_AsLongLongAndOverflow(o, &overflow)
            self._reserve(9)
            p = self._buf + self._len
            if overflow == 0:
                if v >= 0:
                    if v < 128:
                        p[0] = <char>v
                        self._len += 1
                    elif v < 256:
                        p[0] = <char>0xcc
                        p[1] = <char>v
                        self._len += 2
                    elif v < 65536:
                        p[0] = <char>0xcd
                        _put_u16(p + 1, <uint16_t>v)
                        self._len += 3
                    elif v <= 0xFFFFFFFF:
                        p[0] = <char>0xce
                        _put_u32(p + 1, <uint32_t>v)
                        self._len += 5
                    else:
                        p[0] = <char>0xcf
                        _put_u64(p + 1, <uint64_t>v)
                        self._len += 9
                elif v >= -32:
                    p[0] = <char>v
                    self._len += 1
                elif v >= -128:
                    p[0] = <char>0xd0
                    p[1] = <char>v
                    self._len += 2
                elif v >= -32768:
                    p[0] = <char>0xd1
                    _put_u16(p + 1, <uint16_t>v)
                    self._len += 3
                elif v >= -2147483648:
                    p[0] = <char>0xd2
                    _put_u32(p + 1, <uint32_t>v)
                    self._len += 5
                else:
                    p[0] = <char>0xd3
                    _put_u64(p + 1, <uint64_t>v)
                    self._len += 9
            elif overflow > 0 and o <= 0xFFFFFFFFFFFFFFFF:
                uv = PyLong_AsUnsignedLongLong(o)
                p[0] = <char>0xcf
                _put_u64(p + 1, uv)
                self._len += 9
            else:
                self._pack_via_default(o, depth)
        elif t is float:
            d = PyFloat_AS_DOUBLE(o)
            memcpy(&bits, &d, 8)
            self._reserve(9)
            p = self._buf + self._len
            p[0] = <char>0xcb
            _put_u64(p + 1, bits)
            self._len += 9
        elif t is str:
            try:
                s = PyUnicode_AsUTF8AndSize(o, &n)
            except UnicodeEncodeError as exc:
                raise EncodeError(f"str is not valid UTF-8 ({exc.reason})") from None
            self._put_header(0xa0, 1, 32, 0xd9, 0xda, 0xdb, n)
            self.write_raw(s, n)
        elif t is bytes:
            n = PyBytes_GET_SIZE(o)
            self._put_header(0, 0, 0, 0xc4, 0xc5, 0xc6, n)
            if self.detach_min and n >= self.detach_min:
                self._detach(o)
            else:
                self.write_raw(PyBytes_AS_STRING(o), n)
        elif t is list:
            n = PyList_GET_SIZE(o)
            self._put_array_header(n)
            for i in range(n):
                self.pack(<object>PyList_GET_ITEM(o, i), depth + 1)
        elif t is dict:
            n = PyDict_Size(o)
            self._put_header(0x80, 1, 16, 0, 0xde, 0xdf, n)
            pos = 0
            while PyDict_Next(o, &pos, &key, &val):
                self.pack(<object>key, depth + 1)
                self.pack(<object>val, depth + 1)
        elif t is tuple:
            self._pack_ext_container(EXT_TUPLE, o, depth)
        elif t is set:
            self._pack_ext_container(EXT_SET, o, depth)
        elif t is frozenset:
            self._pack_ext_container(EXT_FROZENSET, o, depth)
        elif t is bytearray:
            n = PyByteArray_GET_SIZE(o)
            self._put_ext_header(EXT_BYTEARRAY, n)
            self.write_raw(PyByteArray_AS_STRING(o), n)
        else:
            self._pack_via_default(o, depth)
        return 0

    cdef int _pack_ext_container(self, uint8_t code, object items, int depth) except -1:
        # ext32 header reserved, items packed as an array after it, length
        # back-filled: the nested value is encoded in place, with no copy.
        cdef Py_ssize_t start = self._len
        cdef Py_ssize_t n = len(items)
        cdef Py_ssize_t detach_min = self.detach_min
        cdef char* p
        if self._ext_depth >= MAX_EXT_NESTING_DEPTH:
            raise EncodeError(f"value nested more than {MAX_EXT_NESTING_DEPTH} tuples or sets "
                              "deep (each is decoded by a nested msgpack call)")
        self._reserve(6)
        self._len += 6
        self._put_array_header(n)
        # the ext's length is counted in our buffer: nothing inside detaches
        self.detach_min = 0
        self._ext_depth += 1
        try:
            if type(items) is tuple:
                for i in range(n):
                    self.pack(<object>PyTuple_GET_ITEM(items, i), depth + 1)
            else:
                for item in items:
                    self.pack(item, depth + 1)
        finally:
            self.detach_min = detach_min
            self._ext_depth -= 1
        p = self._buf + start
        p[0] = <char>0xc9
        _put_u32(p + 1, <uint32_t>(self._len - start - 6))
        p[5] = <char>code
        return 0

    cdef int _pack_via_default(self, object o, int depth) except -1:
        cdef object r
        cdef bytes data
        if _default is None:
            raise EncodeError(f"cannot encode a {type(o).__qualname__} value")
        r = _default(o)
        if type(r) is ExtType:
            data = r.data
            self._put_ext_header(<uint8_t>r.code, PyBytes_GET_SIZE(data))
            self.write_raw(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        else:
            # A replacement value (a subclass travelling as its base type).
            self.pack(r, depth + 1)
        return 0

    # -- Python-visible helpers (tests, codec, handshake) ---------------------

    def encode(self, obj):
        """Append the msgpack encoding of obj."""
        self.pack(obj, 0)

    def frame(self, int ftype, int flags, uint64_t sid, payload):
        """Append one frame whose payload is the bytes given (sans-IO writer)."""
        cdef Py_ssize_t start = self.begin_frame(<uint8_t>ftype, <uint8_t>flags, sid)
        cdef const unsigned char[:] view = memoryview(payload).cast("B")
        if view.shape[0]:
            self.write_raw(<const char*>&view[0], view.shape[0])
        self.end_frame(start)

    def getvalue(self):
        """Take everything written so far as bytes and empty the buffer."""
        return self.take()


def packb(obj):
    """Encode obj with malla's msgpack encoder (the wire's value encoding)."""
    cdef WriteBuffer wb = WriteBuffer.__new__(WriteBuffer)
    wb.pack(obj, 0)
    return wb.take()


def build_frame(int ftype, int flags, uint64_t sid, payload=b""):
    """One frame's bytes: header then payload (sans-IO writer)."""
    cdef WriteBuffer wb = WriteBuffer.__new__(WriteBuffer)
    wb.frame(ftype, flags, sid, payload)
    return wb.take()


def split_message(int ftype, uint64_t sid, payload, Py_ssize_t max_frame_size,
                  int flags=0):
    """The frames of one message: chunks of at most max_frame_size, every
    frame but the last flagged "more follows" (sans-IO writer)."""
    cdef list frames = []
    cdef Py_ssize_t n = len(payload), off = 0, chunk
    if max_frame_size <= 0:
        raise ValueError("max_frame_size must be positive")
    while True:
        chunk = min(max_frame_size, n - off)
        last = off + chunk >= n
        frames.append(build_frame(ftype, flags | (0 if last else FLAG_MORE), sid,
                                  payload[off:off + chunk]))
        off += chunk
        if last:
            return frames
