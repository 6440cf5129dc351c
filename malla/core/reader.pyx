# FrameReader: the sans-IO frame decoder.

# ---------------------------------------------------------------------------
# FrameReader: the sans-IO frame decoder
# ---------------------------------------------------------------------------

cdef class FrameReader:
    """Decodes frames from bytes written into its buffer, one header at a time.

    The protocol writes into `get_buffer_view()` (the BufferedProtocol path);
    tests and fuzzers use `feed()`.  A header announcing more than
    `max_frame_size` bytes raises ProtocolError before the payload arrives.
    """

    def __cinit__(self, uint32_t max_frame_size=1048576):
        self._buf = <char*>PyMem_Malloc(READ_BUF_INITIAL)
        if self._buf is NULL:
            raise MemoryError()
        self._size = READ_BUF_INITIAL
        self._start = self._end = 0
        self._need = HEADER_SIZE
        self.max_frame_size = max_frame_size

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def buffered(self):
        """Bytes received and not yet consumed as frames."""
        return self._end - self._start

    @property
    def capacity(self):
        return self._size

    cdef int _make_room(self, Py_ssize_t want) except -1:
        cdef Py_ssize_t used = self._end - self._start
        if self._size - self._end >= want:
            return 0
        if self._start > 0:
            if used:
                memmove(self._buf, self._buf + self._start, used)
            self._start = 0
            self._end = used
            if self._size - self._end >= want:
                return 0
        return _grow_buffer(&self._buf, &self._size, used + want)

    cdef object get_buffer_view(self):
        # Room for the rest of the frame in progress (so it arrives in one
        # contiguous piece), and never less than a few KiB per read.
        cdef Py_ssize_t want = self._need - (self._end - self._start)
        if want < 4096:
            want = 4096
        self._make_room(want)
        return PyMemoryView_FromMemory(self._buf + self._end, self._size - self._end,
                                       PyBUF_WRITE)

    def get_buffer(self, sizehint=-1):
        return self.get_buffer_view()

    def buffer_updated(self, Py_ssize_t nbytes):
        if nbytes < 0 or self._end + nbytes > self._size:
            raise ValueError("buffer_updated beyond the buffer")
        self._end += nbytes

    cdef int next_frame(self, Frame* out) except -1:
        # 1: a whole frame is in *out (payload valid until the next read);
        # 0: more bytes are needed.
        cdef Py_ssize_t avail = self._end - self._start
        cdef const char* p
        cdef uint32_t length
        if avail < HEADER_SIZE:
            self._need = HEADER_SIZE
            return 0
        p = self._buf + self._start
        length = _get_u32(p + 4)
        if length > self.max_frame_size:
            raise ProtocolError(
                f"frame of {length} bytes exceeds max_frame_size {self.max_frame_size}")
        if <uint8_t>p[0] == 0:
            raise ProtocolError("frame type 0 is not a frame")
        if avail < HEADER_SIZE + <Py_ssize_t>length:
            self._need = HEADER_SIZE + length
            return 0
        out.ftype = <uint8_t>p[0]
        out.flags = <uint8_t>p[1]
        out.length = length
        out.sid = _get_u64(p + 8)
        out.payload = p + HEADER_SIZE
        self._start += HEADER_SIZE + length
        self._need = HEADER_SIZE
        return 1

    cdef void compact_if_idle(self, bint shrink):
        cdef char* nb
        if self._start == self._end:
            self._start = self._end = 0
            if shrink and self._size > READ_BUF_INITIAL * 2:
                nb = <char*>PyMem_Realloc(self._buf, READ_BUF_INITIAL)
                if nb is not NULL:
                    self._buf = nb
                    self._size = READ_BUF_INITIAL

    def feed(self, data):
        """Append bytes; return the complete frames as
        (type, flags, stream id, payload bytes) tuples."""
        cdef const unsigned char[:] view = memoryview(data).cast("B")
        cdef Py_ssize_t n = view.shape[0]
        cdef Frame f
        cdef list frames = []
        if n:
            self._make_room(n)
            memcpy(self._buf + self._end, &view[0], n)
            self._end += n
        while self.next_frame(&f):
            frames.append((f.ftype, f.flags, f.sid,
                           PyBytes_FromStringAndSize(f.payload, f.length)))
        self.compact_if_idle(True)
        return frames
