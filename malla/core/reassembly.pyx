# Reassembly: one message arriving in several frames (sans-IO).

# The bytes a msgpack token's header has after its first byte (lengths, an
# ext's type), by first byte; 0 for the rest.
cdef uint8_t[256] _TOKEN_HEAD
for _first, _head in {
        0xc4: 1, 0xc5: 2, 0xc6: 4,                  # bin 8/16/32: length
        0xc7: 2, 0xc8: 3, 0xc9: 5,                  # ext 8/16/32: length, type
        0xca: 4, 0xcb: 8,                           # float 32/64
        0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,         # uint 8..64
        0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8,         # int 8..64
        0xd4: 1, 0xd5: 1, 0xd6: 1, 0xd7: 1, 0xd8: 1,   # fixext 1..16: type
        0xd9: 1, 0xda: 2, 0xdb: 4,                  # str 8/16/32: length
        0xdc: 2, 0xdd: 4, 0xde: 2, 0xdf: 4,         # array, map 16/32: count
        }.items():
    _TOKEN_HEAD[_first] = _head
del _first, _head


cdef class Reassembly:
    """One message arriving in several frames (sans-IO).

    With `detach_min` > 0 the bytes are read as a stream of msgpack tokens
    (no parsing of the structure: tokens are self-delimiting), and the
    payload of every `bin` of at least `detach_min` bytes is written straight
    into its final bytes object, a marker taking its place in the skeleton:
    a 100 MB argument is copied once, a frame at a time, instead of a last
    100 MB copy that would hold the event loop.  `limit` bounds the sizes
    such a bin may announce.
    """

    def __cinit__(self, int ftype=0, int flags=0, Py_ssize_t detach_min=0,
                  Py_ssize_t limit=0):
        self.ftype = <uint8_t>ftype
        self.flags = <uint8_t>flags
        self.skeleton = WriteBuffer()
        self.detach_min = detach_min
        self.limit = limit

    @property
    def received(self):
        return self.received

    cdef int feed(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t m
        self.received += n
        if self.detach_min == 0:
            return self.skeleton.write_raw(p, n)
        while n > 0:
            if self.state == SCAN_COPY or self.state == SCAN_DETACH:
                m = n if n < self.left else self.left
                if self.state == SCAN_COPY:
                    self.skeleton.write_raw(p, m)
                else:
                    memcpy(self.dst, p, m)
                    self.dst += m
                    self.unfilled -= m
                self.left -= m
                if self.left == 0:
                    self.state = SCAN_TOKEN
            elif self.state == SCAN_TOKEN:
                self.head[0] = <unsigned char>p[0]
                self.head_len = 1
                self.head_need = 1 + _TOKEN_HEAD[<unsigned char>p[0]]
                m = 1
                if self.head_need == 1:
                    self._token()
                else:
                    self.state = SCAN_HEAD
            else:
                m = self.head_need - self.head_len
                if m > n:
                    m = n
                memcpy(self.head + self.head_len, p, m)
                self.head_len += m
                if self.head_len == self.head_need:
                    self._token()
            p += m
            n -= m
        return 0

    cdef int _token(self) except -1:
        # A whole token header is in self.head: keep it, or detach its bin.
        cdef unsigned char c = self.head[0]
        cdef const char* h = <const char*>self.head
        cdef Py_ssize_t size = 0
        cdef char marker[9]
        if 0xa0 <= c <= 0xbf:
            size = c & 0x1f
        elif c == 0xc4 or c == 0xc7 or c == 0xd9:
            size = self.head[1]
        elif c == 0xc5 or c == 0xc8 or c == 0xda:
            size = (self.head[1] << 8) | self.head[2]
        elif c == 0xc6 or c == 0xc9 or c == 0xdb:
            size = _get_u32(h + 1)
        elif 0xd4 <= c <= 0xd8:
            size = 1 << (c - 0xd4)
        if 0xc4 <= c <= 0xc6 and self.detach_min <= size <= self.limit:
            # the marker: ext 127, tag 0, the value's index
            value = PyBytes_FromStringAndSize(NULL, size)
            if self.detached is None:
                self.detached = []
            marker[0] = <char>0xc7
            marker[1] = 5
            marker[2] = <char>EXT_DETACHED
            marker[3] = 0
            _put_u32(marker + 4, <uint32_t>PyList_GET_SIZE(self.detached))
            self.skeleton.write_raw(marker, 8)
            self.detached.append(value)
            self.dst = PyBytes_AS_STRING(value)
            self.unfilled += size
            self.left = size
            self.state = SCAN_DETACH
            return 0
        if ((0xc7 <= c <= 0xc9 or 0xd4 <= c <= 0xd8) and size < 0xFFFFFFFF
                and <uint8_t>self.head[self.head_len - 1] == EXT_DETACHED):
            # The peer sent code 127 itself: it keeps its place, tagged 1, so
            # that decoding fails there as for any extension code we do not
            # know, and no marker can be forged.  (Untagged, the largest ext32
            # cannot be a marker either: a marker's payload is 5 bytes.)
            marker[0] = <char>0xc9
            _put_u32(marker + 1, <uint32_t>(size + 1))
            marker[5] = <char>EXT_DETACHED
            marker[6] = 1
            self.skeleton.write_raw(marker, 7)
            if self.detached is None:
                self.detached = []
        else:
            self.skeleton.write_raw(h, self.head_len)
        self.left = size
        self.state = SCAN_COPY if size else SCAN_TOKEN
        return 0

    cdef inline Py_ssize_t footprint(self):
        # what it holds or has reserved: what it will hold once complete
        return self.received + self.unfilled

    cdef void drop(self):
        self.dropped = True
        self.skeleton = None
        self.detached = None
        self.unfilled = 0

    cdef int finish(self) except -1:
        # The message ended.  Inside a token, the skeleton must fail to decode
        # as the message itself would: a cut header or payload is cut in the
        # skeleton too; a half-filled detached value gets a byte after its
        # marker that no msgpack value starts with.
        if self.state == SCAN_HEAD:
            self.skeleton.write_raw(<const char*>self.head, self.head_len)
        elif self.state == SCAN_DETACH:
            self.skeleton.write_raw(b"\xc1", 1)
        return 0

    def add(self, data):
        """Feed bytes (tests and fuzzers)."""
        cdef const unsigned char[:] view = memoryview(data).cast("B")
        if view.shape[0]:
            self.feed(<const char*>&view[0], view.shape[0])

    def decode(self):
        """End the message and decode it (tests and fuzzers)."""
        self.finish()
        return _unpack_detached(self.skeleton._buf, self.skeleton._len, self.detached)

    def skeleton_bytes(self):
        return PyBytes_FromStringAndSize(self.skeleton._buf, self.skeleton._len)

    @property
    def detached_values(self):
        return list(self.detached or ())


cdef class Partials:
    """The messages from the peer arriving in several frames, by stream id,
    and the bound on what they may hold in all (PARTIAL_BUDGET times
    max_message_size, values announced but not yet arrived included)."""

    def __cinit__(self, uint64_t max_message_size):
        self.parts = {}
        self.max_message_size = max_message_size

    def __len__(self):
        return PyDict_Size(self.parts)

    cdef bint continues(self, Frame* f):
        # An unflagged frame on a stream with a message in progress: its
        # last frame -- unless it is a CANCEL of a call still arriving.
        cdef object part
        if not PyDict_Size(self.parts):
            return False
        part = self.parts.get(f.sid)
        return part is not None and (f.ftype != FT_CANCEL
                                     or (<Reassembly>part).ftype != FT_CALL)

    cdef Reassembly feed(self, Frame* f, bint acknowledge):
        """Take one frame of a message sent in several (or a lone frame above
        max_message_size, to be dropped): the finished Reassembly after its
        last frame, None before.  A message that grows too large, or past
        the budget, is dropped as it arrives (the connection stays)."""
        cdef Reassembly part
        cdef object key = f.sid
        cdef bint scan
        cdef Py_ssize_t before
        if f.sid == 0:
            raise ProtocolError("a message on stream 0 cannot be split")
        part = self.parts.get(key)
        # the frames the sender counts against its window: every frame of a
        # message sent in several (not a lone frame above max_message_size)
        if acknowledge and (part is not None or f.flags & FLAG_MORE):
            self.consumed += f.length
        if part is None:
            # values of calls and replies are worth detaching; control
            # messages go to Python whole
            scan = (f.ftype == FT_CALL or f.ftype == FT_CAST or f.ftype == FT_REPLY
                    or f.ftype == FT_ERROR)
            part = Reassembly(f.ftype, f.flags & ~FLAG_MORE, DETACH_MIN if scan else 0,
                              self.max_message_size)
            self.parts[key] = part
        elif part.ftype != f.ftype:
            raise ProtocolError(f"stream {f.sid}: frame type changed inside a message")
        if not part.dropped:
            if <uint64_t>(part.received + f.length) > self.max_message_size:
                # Too large: drop what we have, keep the connection, and
                # answer once the message's last frame has passed.
                self._drop(part)
            else:
                before = part.footprint()
                part.feed(f.payload, f.length)
                self.bytes += part.footprint() - before
                if <uint64_t>self.bytes > PARTIAL_BUDGET * self.max_message_size:
                    self._drop(part)
                    part.over_budget = True
        if f.flags & FLAG_MORE:
            return None
        del self.parts[key]
        if not part.dropped:
            self.bytes -= part.footprint()
            part.finish()
        return part

    cdef int _drop(self, Reassembly part) except -1:
        self.bytes -= part.footprint()
        part.drop()
        return 0

    cdef int cancel(self, uint64_t sid, bint forget) except -1:
        # A CANCEL of a call still arriving: it never runs.  With `forget`
        # (windows: the sender sends no more of it) it is forgotten now;
        # otherwise the rest still comes and is dropped as it arrives.
        cdef Reassembly part
        if not PyDict_Size(self.parts):
            return 0
        part = self.parts.get(sid)
        if part is not None and part.ftype == FT_CALL:
            if not part.dropped:
                self._drop(part)
            part.cancelled = True
            if forget:
                del self.parts[sid]
        return 0

    cdef void clear(self):
        self.parts.clear()
        self.bytes = 0
