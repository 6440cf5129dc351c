# cython: language_level=3, embedsignature=True
#
# malla's compiled core: the per-call hot path and nothing else.
#
# Strategy
# --------
# * WriteBuffer: one growable C buffer per connection.  Frames are built in
#   place: the 16-byte header is reserved, the payload is msgpack-encoded
#   straight after it by our own encoder (so tuples, sets and bytearrays can
#   travel as extension types, and nothing is copied), and the length is
#   back-filled.  Every frame queued during one loop callback leaves in one
#   transport.write.
# * FrameReader: the sans-IO reader.  It owns one contiguous C buffer that the
#   asyncio BufferedProtocol interface fills in place (uvloop copies every read
#   otherwise).  The header is checked against max_frame_size before any of
#   the payload is buffered.
# * CoreProtocol: the asyncio protocol of one node-to-node connection.  It
#   matches replies to pending futures by stream id (a C counter), times calls
#   out through one timer per connection over a C heap of deadlines (no timer
#   handle per call), and dispatches incoming calls through the node's table
#   of ServiceEntry objects: plain functions with the default hook are called
#   right here, everything else goes to the Python layer (service.py).
#   Decoding uses msgpack's C unpackb on a memoryview of the frame, with the
#   codec's ext_hook from malla/codec.py.
# * Policy (retries, failover, discovery, handshake logic) stays in Python.

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_Size
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from cpython.tuple cimport PyTuple_GET_SIZE, PyTuple_GET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.object cimport PyObject
from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from libc.string cimport memcpy, memmove
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import asyncio
import logging

from msgpack import unpackb as _msgpack_unpackb, ExtType

from malla import exceptions as mexc

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

cdef extern from *:
    """
    #if defined(__GLIBC__)
    #include <malloc.h>
    static void malla_trim_heap(void) { malloc_trim(0); }
    #else
    static void malla_trim_heap(void) { }
    #endif
    """
    void malla_trim_heap() nogil

cdef object _log = logging.getLogger("malla.core")
cdef object EncodeError = mexc.EncodeError
cdef object ProtocolError = mexc.ProtocolError
cdef object CallTimeout = mexc.CallTimeout
cdef object ConnectionLost = mexc.ConnectionLost
cdef object ServiceNotAvailable = mexc.ServiceNotAvailable
cdef object MessageTooLarge = mexc.MessageTooLarge
cdef object error_from_wire = mexc.error_from_wire
cdef object CancelledError = asyncio.CancelledError

cdef int ERR_SERVICE_NOT_AVAILABLE = mexc.ERR_SERVICE_NOT_AVAILABLE
cdef int ERR_UNKNOWN_FUNCTION = mexc.ERR_UNKNOWN_FUNCTION
cdef int ERR_REMOTE = mexc.ERR_REMOTE
cdef int ERR_MESSAGE_TOO_LARGE = mexc.ERR_MESSAGE_TOO_LARGE
cdef int ERR_DEADLINE = mexc.ERR_DEADLINE
cdef int ERR_BAD_REQUEST = mexc.ERR_BAD_REQUEST
cdef int ERR_OVERLOADED = mexc.ERR_OVERLOADED
cdef int ERR_UNDECODABLE = mexc.ERR_UNDECODABLE
cdef int ERR_BAD_ARGUMENTS = mexc.ERR_BAD_ARGUMENTS
cdef object BadArguments = mexc.BadArguments
cdef object remote_error = mexc.remote_error
cdef object remote_fields = mexc.remote_fields
cdef object type_name = mexc.type_name

# The codec's hooks (malla/codec.py installs them at import): `default(obj)`
# returns an ExtType or a replacement value; `ext_hook(code, data)` rebuilds.
cdef object _default = None
cdef object _ext_hook = None

HEADER = HEADER_SIZE
MAX_EXT_NESTING = MAX_EXT_NESTING_DEPTH
# How large messages travel (see _core.pxd), for tests and docs.
SPLIT = SPLIT_MIN
FRAME_OF_LARGE = LARGE_FRAME
DETACH = DETACH_MIN
WINDOW = LARGE_WINDOW


# Buffers grown for large messages are kept while large messages keep
# coming (regrowing them costs page faults on every message) and given back
# once none has passed for this long, so that an idle connection is small.
cdef double LARGE_IDLE = 0.5


def set_codec(default, ext_hook):
    """Install the codec's hooks for values beyond msgpack's own types."""
    global _default, _ext_hook
    _default = default
    _ext_hook = ext_hook


cdef inline double _now() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The clock the core stamps `last_heard` with (time.monotonic's)."""
    return _now()


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


cdef double BLOCKED_LOOP_WARNING = 0.1


cdef inline void _warn_if_blocked(str service, str fun, double started):
    # A plain def runs on the loop: one that holds it past 100 ms is named.
    cdef double took = _now() - started
    if took > BLOCKED_LOOP_WARNING:
        _log.warning("malla: %s.%s blocked the event loop for %.0f ms (make it "
                     "async def, or @malla.blocking to run it in a thread)",
                     service, fun, took * 1000)


def warn_if_blocked(str service, str fun, double started):
    """Log a function that held the event loop for more than 100 ms."""
    _warn_if_blocked(service, fun, started)


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
        cdef Py_ssize_t new_size = self._size * 2
        cdef char* nb
        if new_size < self._len + extra:
            new_size = self._len + extra
        nb = <char*>PyMem_Realloc(self._buf, new_size)
        if nb is NULL:
            raise MemoryError()
        self._buf = nb
        self._size = new_size
        return 0

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


def unpackb(data):
    """Decode a value encoded by packb (with the codec's extension types)."""
    cdef const unsigned char[:] view = memoryview(data).cast("B")
    if view.shape[0]:
        return _unpack(<const char*>&view[0], view.shape[0])
    return _unpack(b"", 0)


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
        cdef Py_ssize_t new_size
        cdef char* nb
        if self._size - self._end >= want:
            return 0
        if self._start > 0:
            if used:
                memmove(self._buf, self._buf + self._start, used)
            self._start = 0
            self._end = used
            if self._size - self._end >= want:
                return 0
        new_size = self._size * 2
        if new_size < used + want:
            new_size = used + want
        nb = <char*>PyMem_Realloc(self._buf, new_size)
        if nb is NULL:
            raise MemoryError()
        self._buf = nb
        self._size = new_size
        return 0

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


# ---------------------------------------------------------------------------
# ServiceEntry: what dispatch needs to know of one running service
# ---------------------------------------------------------------------------

cdef class ServiceEntry:
    """A running service as the dispatcher sees it (built by malla.service).

    `funcs` maps exported names to bound methods, `kinds` to 0 (plain def),
    1 (async def) or 2 (@blocking).  `fast` is true when the service keeps the
    default service_cb_in: plain functions are then called by the core
    directly; everything else goes through `dispatch()`, which the Python
    subclass implements.
    """

    def __init__(self, str name, dict funcs, dict kinds, bint fast, int max_concurrency,
                 dict checks=None):
        self.name = name
        self.funcs = funcs
        self.kinds = kinds
        # `checks` (malla.arguments.Checker per function) bounds the
        # positional arguments of the common call, checked here in C; the
        # rest (keywords, mismatches) goes to the checker itself
        self.checks = checks if checks is not None else {}
        self.arity = {fun: (c.lo, c.hi) for fun, c in self.checks.items()}
        self.fast = fast
        self.paused = False
        self.running = 0
        self.max_concurrency = max_concurrency

    def dispatch(self, proto, sid, fun, fn, args, kwargs, timeout, deadline, meta, cast,
                 trace):
        raise NotImplementedError


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


cdef bytes _frame_header(uint8_t ftype, uint8_t flags, uint64_t sid, uint32_t length):
    cdef bytes h = PyBytes_FromStringAndSize(NULL, HEADER_SIZE)
    _put_frame_header(PyBytes_AS_STRING(h), ftype, flags, sid, length)
    return h


@cython.final
cdef class _LargeMessage:
    # An encoded message bigger than one frame, sent a frame per round.  Its
    # payload is a list of buffers: our encoding around the detached values.
    cdef uint8_t ftype
    cdef uint8_t flags
    cdef uint64_t sid
    cdef list parts
    cdef Py_ssize_t part_index, part_offset
    cdef Py_ssize_t length, sent
    cdef Py_ssize_t chunk
    cdef bint cancel_after          # send a CANCEL after its last frame

    cdef int take_into(self, list bufs, Py_ssize_t n) except -1:
        # Append the next n payload bytes to bufs as views (no copy).
        cdef object part
        cdef Py_ssize_t size, take
        while n > 0:
            part = self.parts[self.part_index]
            size = len(part)
            take = size - self.part_offset
            if take > n:
                take = n
            if self.part_offset == 0 and take == size:
                bufs.append(part)
            else:
                bufs.append(memoryview(part)[self.part_offset:self.part_offset + take])
            self.part_offset += take
            n -= take
            if self.part_offset == size:
                self.parts[self.part_index] = None      # the transport holds it now
                self.part_index += 1
                self.part_offset = 0
        return 0


# ---------------------------------------------------------------------------
# CoreProtocol
# ---------------------------------------------------------------------------

cdef class CoreProtocol:
    """The protocol of one node-to-node connection (see module docstring).

    The owner (malla.connection.Connection) runs the handshake, control
    messages and policy; the core calls it through a few `_on_*` methods.
    """

    def __init__(self, owner, loop, bint dialer, dict services,
                 uint32_t max_frame_size=1048576, uint64_t max_message_size=67108864):
        self.owner = owner
        self._loop = loop
        self.dialer = dialer
        self.services = services
        self._reader = FrameReader(PREAUTH_MAX_FRAME)
        self._wbuf = WriteBuffer()
        self._wbuf.detach_min = DETACH_MIN
        self._state = CS_HANDSHAKE
        self.peer_name = None
        self._pending = {}
        self._running = {}
        self._partials = {}
        self._partial_bytes = 0
        # Dialler's streams are odd, acceptor's even: ids of the two
        # directions never collide, so one table can key partial messages.
        self._next_sid = 1 if dialer else 2
        self.last_sid = 0
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.last_heard = _now()
        self.last_sent = self.last_heard
        self._in_read = False
        self._flush_scheduled = False
        self._wrote_this_tick = False
        self._busy_tick = False
        self._queued_this_tick = 0
        self._large_at = 0
        self._idle_check_scheduled = False
        self._shrink_after_read = False
        self._paused_writing = False
        self._large = []
        self._heap = NULL
        self._heap_len = 0
        self._heap_size = 0
        self._timer = None
        self._timer_at = 0
        self.calls_in = 0
        self.calls_out = 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    # -- state ----------------------------------------------------------------

    @property
    def ready(self):
        return self._state == CS_READY

    @property
    def closed(self):
        return self._state >= CS_CLOSING

    @property
    def in_flight(self):
        """Calls this side sent and still waits for."""
        return len(self._pending)

    @property
    def running(self):
        """Calls from the peer running here as tasks."""
        return len(self._running)

    @property
    def read_buffer_capacity(self):
        return self._reader._size

    @property
    def write_buffer_capacity(self):
        return self._wbuf._size

    @property
    def queued_large(self):
        """Large messages still being sent, a frame per round."""
        return len(self._large)

    @property
    def receiving_large(self):
        """Messages from the peer still arriving in frames."""
        return len(self._partials)

    @property
    def receiving_bytes(self):
        """What those hold or have reserved (bounded per connection)."""
        return self._partial_bytes

    @property
    def window(self):
        """Bytes of our large messages the peer may have unacknowledged (0:
        not paced)."""
        return self._window

    @property
    def timer_heap_len(self):
        return self._heap_len

    @property
    def transport(self):
        return self._transport

    def set_ready(self, str peer_name, uint32_t max_frame_size, bint windows=False,
                  Py_ssize_t window_size=LARGE_WINDOW):
        """End of handshake: the agreed frame size applies from now on.  With
        `windows` (both sides announced CAP_WINDOW) we acknowledge the frames
        of the peer's large messages, and pace ours by its acknowledgements,
        `window_size` bytes in flight at most (0: not paced)."""
        if self._state != CS_HANDSHAKE:
            raise mexc.InternalError("set_ready outside the handshake")
        self.peer_name = peer_name
        self.max_frame_size = max_frame_size
        self._reader.max_frame_size = max_frame_size
        if 0 < window_size < LARGE_FRAME:
            raise ValueError(f"a window below one frame ({LARGE_FRAME} bytes) never opens")
        self._acknowledge = windows
        self._window = self._credit = window_size if windows else 0
        self._state = CS_READY

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport):
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)
        self.owner._connection_made(self)

    def connection_lost(self, exc):
        cdef object owner = self.owner
        self._state = CS_CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap_len = 0
        peer = self.peer_name or "peer"

        def lost():
            err = ConnectionLost(f"connection to {peer} lost")
            err.__cause__ = exc
            return err

        self._fail_pending(lost)
        # The caller is gone: its calls running here are cancelled.
        running = list(self._running.values())
        self._running.clear()
        for task in running:
            task.cancel()
        self._large = []
        self._large_queued = 0
        self._partials.clear()
        self._partial_bytes = 0
        self._transport = None
        if owner is not None:
            owner._connection_lost(exc)

    def get_buffer(self, Py_ssize_t sizehint):
        return self._reader.get_buffer_view()

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Frame f
        self._reader._end += nbytes
        self.last_heard = _now()
        self._in_read = True
        try:
            while self._state <= CS_READY:
                if not self._reader.next_frame(&f):
                    break
                self._on_frame(&f)
            if self._consumed and self._state == CS_READY:
                self._acknowledge_large()
        except ProtocolError as exc:
            self._protocol_violation(str(exc))
        except Exception as exc:
            _log.exception("malla core: error while handling a frame")
            self._protocol_violation(f"internal error: {exc!r}")
        finally:
            self._in_read = False
        self._reader.compact_if_idle(self._shrink_after_read)
        self._shrink_after_read = False
        if (self._wbuf._len or self._large) and self._state <= CS_READY:
            self.flush()
        if nbytes > READ_BUF_INITIAL or self._reader._end - self._reader._start > READ_BUF_INITIAL:
            self._schedule_idle_check()     # give the grown buffer back once idle

    def eof_received(self):
        return False

    def pause_writing(self):
        # Past the high-water mark: new calls wait (or fail over) until the
        # transport drains below the low-water mark.
        self._paused_writing = True
        self._update_congestion()

    def resume_writing(self):
        self._paused_writing = False
        self._update_congestion()
        # The calls that waited run first (they were woken before this
        # call_soon); the next round of large frames goes after them.
        if self._large and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)

    @property
    def writing_paused(self):
        """Congested: the transport is past its high-water mark, or large
        messages beyond the one streaming wait to be sent."""
        return self._congested

    cdef void _check_drained(self):
        if self._large_congested and (self._large_queued <= WRITE_HIGH_WATER // 4
                                      or PyList_GET_SIZE(self._large) <= 1):
            self._large_congested = False
            self._update_congestion()

    cdef void _update_congestion(self):
        cdef bint congested = self._paused_writing or self._large_congested
        if congested == self._congested:
            return
        self._congested = congested
        if self.owner is not None:
            if congested:
                self.owner._writing_paused()
            else:
                self.owner._writing_resumed()

    # -- receiving --------------------------------------------------------------

    cdef int _on_frame(self, Frame* f) except -1:
        if self._state == CS_HANDSHAKE:
            if f.flags & FLAG_MORE:
                raise ProtocolError("a handshake message cannot be split")
            if f.ftype == FT_HELLO or f.ftype == FT_AUTH or f.ftype == FT_ERROR:
                self.owner._on_handshake_frame(
                    f.ftype, f.flags, f.sid, PyBytes_FromStringAndSize(f.payload, f.length))
            elif not (f.flags & FLAG_OPTIONAL):
                raise ProtocolError(f"frame type {f.ftype} before the handshake ended")
            return 0
        # (a single frame above max_message_size goes there too, to be dropped)
        if (f.flags & FLAG_MORE) or f.length > self.max_message_size:
            return self._on_chunk(f)
        if PyDict_Size(self._partials) and f.sid in self._partials:
            # the last frame of a message arriving in several, or a CANCEL of
            # a call still arriving (anything else is _on_chunk's violation)
            if f.ftype != FT_CANCEL or (<Reassembly>self._partials[f.sid]).ftype != FT_CALL:
                return self._on_chunk(f)
        return self._on_message(f.ftype, f.flags, f.sid, f.payload, f.length, None)

    cdef int _on_chunk(self, Frame* f) except -1:
        cdef Reassembly part
        cdef object key = f.sid
        cdef bint scan, counted
        cdef Py_ssize_t before
        if f.sid == 0:
            raise ProtocolError("a message on stream 0 cannot be split")
        part = self._partials.get(key)
        # the frames the sender counts against its window: every frame of a
        # message sent in several (not a lone frame above max_message_size)
        counted = part is not None or f.flags & FLAG_MORE
        if part is None:
            # values of calls and replies are worth detaching; control
            # messages go to Python whole
            scan = (f.ftype == FT_CALL or f.ftype == FT_CAST or f.ftype == FT_REPLY
                    or f.ftype == FT_ERROR)
            part = Reassembly(f.ftype, f.flags & ~FLAG_MORE, DETACH_MIN if scan else 0,
                              self.max_message_size)
            self._partials[key] = part
        elif part.ftype != f.ftype:
            raise ProtocolError(f"stream {f.sid}: frame type changed inside a message")
        if self._acknowledge and counted:
            self._consumed += f.length
        if not part.dropped:
            if <uint64_t>(part.received + f.length) > self.max_message_size:
                # Too large: drop what we have, keep the connection, and
                # answer once the message's last frame has passed.
                self._drop_partial(part)
            else:
                before = part.footprint()
                part.feed(f.payload, f.length)
                self._partial_bytes += part.footprint() - before
                if <uint64_t>self._partial_bytes > PARTIAL_BUDGET * self.max_message_size:
                    # what one peer may have in progress, values announced
                    # but not yet arrived included, is bounded too
                    self._drop_partial(part)
                    part.over_budget = True
        if f.flags & FLAG_MORE:
            return 0
        del self._partials[key]
        self._shrink_after_read = not self._note_large()
        if part.dropped:
            if part.cancelled:
                return 0
            return self._on_dropped_message(part.ftype, f.sid, part.over_budget)
        self._partial_bytes -= part.footprint()
        part.finish()
        return self._on_message(part.ftype, part.flags, f.sid, part.skeleton._buf,
                                part.skeleton._len, part.detached)

    cdef int _drop_partial(self, Reassembly part) except -1:
        self._partial_bytes -= part.footprint()
        part.drop()
        return 0

    cdef int _on_dropped_message(self, uint8_t ftype, uint64_t sid,
                                 bint over_budget) except -1:
        if over_budget:
            msg = (f"messages in progress from {self.peer_name} past "
                   f"{PARTIAL_BUDGET} x max_message_size {self.max_message_size}")
        else:
            msg = f"message larger than max_message_size {self.max_message_size}"
        if ftype == FT_CALL:
            self._queue_error(sid, ERR_MESSAGE_TOO_LARGE, "malla.exceptions.MessageTooLarge",
                              msg, None)
        elif ftype == FT_REPLY or ftype == FT_ERROR:
            fut = self._pending.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_exception(MessageTooLarge(f"reply {msg}"))
        elif ftype == FT_CAST:
            # (its service and function are in the part never read)
            self.cast_failed("?", "?", "MessageTooLarge", msg)
        else:
            _log.warning("malla: dropped a %d frame from %s: %s", ftype, self.peer_name, msg)
        return 0

    cdef int _on_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                         const char* p, Py_ssize_t n, list detached) except -1:
        if ftype == FT_REPLY:
            return self._on_reply(sid, p, n, detached)
        if ftype == FT_CALL or ftype == FT_CAST:
            return self._on_call(ftype, sid, p, n, detached)
        if ftype == FT_ERROR:
            return self._on_error(sid, p, n, detached)
        if ftype == FT_WINDOW:
            return self._on_window(p, n)
        if ftype == FT_CANCEL:
            return self._on_cancel(sid)
        if ftype == FT_HEARTBEAT:
            if flags & FLAG_ACK:
                self._queue_message(FT_HEARTBEAT, 0, sid, None)
            elif sid != 0:
                self.owner._on_pong(sid)
            return 0
        if ftype == FT_ANNOUNCE or ftype == FT_TABLE or ftype == FT_GOODBYE or ftype == FT_PEERS:
            self.owner._on_control(ftype, flags, sid, PyBytes_FromStringAndSize(p, n))
            return 0
        if ftype == FT_HELLO or ftype == FT_AUTH:
            raise ProtocolError("handshake frame after the handshake")
        if flags & FLAG_OPTIONAL:
            return 0
        raise ProtocolError(f"unknown mandatory frame type {ftype}")

    cdef int _on_reply(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1:
        cdef object key = sid
        cdef PyObject* fp = PyDict_GetItem(self._pending, key)
        cdef object fut
        if fp is NULL:
            return 0          # a late reply to a call that timed out or was cancelled
        fut = <object>fp
        del self._pending[key]
        try:
            value = _unpack_detached(p, n, detached)
        except EncodeError as exc:
            # well-formed, but holds a value this node cannot rebuild (an
            # unregistered user type, a decoder that raised): that call
            # fails (the function did run), the connection stays
            if not fut.done():
                fut.set_exception(remote_error("malla.exceptions.EncodeError",
                                               f"the reply cannot be decoded: {exc}"))
            return 0
        except Exception as exc:
            if not fut.done():
                fut.set_exception(ProtocolError(f"undecodable reply: {exc}"))
            raise ProtocolError(f"undecodable reply on stream {sid}: {exc}") from None
        if not fut.done():
            fut.set_result(value)
        return 0

    cdef int _on_error(self, uint64_t sid, const char* p, Py_ssize_t n,
                       list detached) except -1:
        try:
            code, exc_type, message, tb = _unpack_detached(p, n, detached)[:4]
            err = error_from_wire(int(code), str(exc_type), str(message),
                                  tb if isinstance(tb, str) else None)
        except EncodeError as exc:
            # well-formed, holding a value we cannot rebuild: that call only
            err = remote_error("malla.exceptions.EncodeError",
                               f"the error reply cannot be decoded: {exc}")
        except Exception as exc:
            raise ProtocolError(f"undecodable ERROR frame: {exc}") from None
        if sid == 0:
            self.owner._on_connection_error(err)
            return 0
        fut = self._pending.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_exception(err)
        return 0

    cdef int _on_window(self, const char* p, Py_ssize_t n) except -1:
        # The peer consumed this many bytes of our large frames: send more.
        if not self._acknowledge:
            return 0            # not negotiated: an optional frame we skip
        try:
            consumed = _unpack(p, n)
        except Exception:
            consumed = None
        if type(consumed) is not int or not 0 <= consumed <= (1 << 40):
            raise ProtocolError(f"malformed WINDOW frame: {consumed!r}")
        self._credit += <Py_ssize_t>consumed
        return 0

    cdef int _acknowledge_large(self) except -1:
        # End of a read: tell the peer how much of its large frames we took,
        # so it never has more than LARGE_WINDOW bytes of them in flight.
        self._queue_message(FT_WINDOW, FLAG_OPTIONAL, 0, self._consumed)
        self._consumed = 0
        return 0

    cdef int _on_cancel(self, uint64_t sid) except -1:
        cdef Reassembly part
        task = self._running.pop(sid, None)
        if task is not None:
            task.cancel()
        elif PyDict_Size(self._partials):
            # A call still arriving.  With windows no more of it comes
            # (_send_cancel): forget it.  Without, the rest still comes: it
            # is dropped as it arrives, and the call never runs.
            part = self._partials.get(sid)
            if part is not None and part.ftype == FT_CALL:
                if not part.dropped:
                    self._drop_partial(part)
                part.cancelled = True
                if self._acknowledge:
                    del self._partials[sid]
        return 0

    cdef int _on_call(self, uint8_t ftype, uint64_t sid, const char* p, Py_ssize_t n,
                      list detached) except -1:
        cdef bint cast = ftype == FT_CAST
        cdef ServiceEntry entry
        cdef PyObject* ep
        cdef PyObject* fp
        cdef PyObject* ap
        cdef list msg
        cdef Py_ssize_t nargs
        self.calls_in += 1
        try:
            obj = _unpack_detached(p, n, detached)
        except EncodeError as exc:
            return self._refuse(cast, sid, "?", "?", ERR_UNDECODABLE,
                                "malla.exceptions.EncodeError", str(exc))
        except Exception as exc:
            raise ProtocolError(f"undecodable call on stream {sid}: {exc}") from None
        if type(obj) is not list or PyList_GET_SIZE(obj) < 7:
            return self._refuse(cast, sid, "?", "?", ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        msg = <list>obj
        service = msg[0]
        fun = msg[1]
        args = msg[2]
        kwargs = msg[3]
        if (type(service) is not str or type(fun) is not str or type(args) is not list
                or (kwargs is not None and type(kwargs) is not dict)):
            return self._refuse(cast, sid, "?", "?", ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        ep = PyDict_GetItem(self.services, service)
        if ep is NULL or (<ServiceEntry>ep).paused:
            return self._refuse(cast, sid, service, fun, ERR_SERVICE_NOT_AVAILABLE,
                                "malla.exceptions.ServiceNotAvailable",
                                f"service {service} is not available on this node")
        entry = <ServiceEntry>ep
        fp = PyDict_GetItem(entry.funcs, fun)
        if fp is NULL:
            return self._refuse(cast, sid, service, fun, ERR_UNKNOWN_FUNCTION,
                                "malla.exceptions.UnknownFunction",
                                f"service {service} exports no function {fun!r}")
        # the arguments against the signature (positional ones in C)
        ap = PyDict_GetItem(entry.arity, fun)
        nargs = PyList_GET_SIZE(args)
        if ap is not NULL and (kwargs or not (<Py_ssize_t>(<tuple>ap)[0] <= nargs
                                              <= <Py_ssize_t>(<tuple>ap)[1])):
            try:
                entry.checks[fun].check(args, kwargs)
            except BadArguments as exc:
                return self._refuse(cast, sid, service, fun, ERR_BAD_ARGUMENTS,
                                    "malla.exceptions.BadArguments", str(exc))
        deadline = msg[5]
        # a budget in ms (docs/protocol.md): a number, finite, within 64 bits
        if deadline is not None and ((type(deadline) is not int and type(deadline) is not float)
                                     or not -1e19 < deadline < 1e19):
            return self._refuse(cast, sid, service, fun, ERR_BAD_REQUEST,
                                "malla.exceptions.ProtocolError", "malformed call message")
        if deadline is not None and deadline <= 0:
            # The caller's budget was spent before the call could start.
            return self._refuse(cast, sid, service, fun, ERR_DEADLINE,
                                "malla.exceptions.CallTimeout",
                                "deadline passed before the call started")
        # (with a deadline, the call goes through dispatch: the handler's context
        # gets the remaining budget)
        if (entry.fast and entry.kinds[fun] == 0 and deadline is None
                and entry.running < entry.max_concurrency):
            started = _now()
            try:
                if kwargs:
                    result = (<object>fp)(*args, **kwargs)
                else:
                    result = (<object>fp)(*args)
            except Exception as exc:
                if cast:
                    self.cast_failed(service, fun, "RemoteError", f"{type_name(exc)}: {exc}")
                else:
                    self.reply_exception(sid, exc)
                return 0
            finally:
                _warn_if_blocked(entry.name, fun, started)
            if not cast:
                self.reply(sid, result)
            return 0
        task = entry.dispatch(self, sid, fun, <object>fp, args, kwargs, msg[4], deadline,
                              msg[6], cast, msg[7] if PyList_GET_SIZE(msg) > 7 else None)
        if task is not None and not cast:
            self._running[sid] = task
        return 0

    cdef int _refuse(self, bint cast, uint64_t sid, str service, str fun, int code,
                     str exc_type, str message) except -1:
        # An incoming call that does not run: its caller gets the ERROR; a
        # cast has no caller to tell, so the node logs and counts it.
        if cast:
            self.cast_failed(service, fun, exc_type.rpartition(".")[2], message)
        else:
            self._queue_error(sid, code, exc_type, message, None)
        return 0

    def cast_failed(self, str service, str fun, str kind, str message):
        """A cast from the peer failed here (`kind`: the malla error class
        a caller would have got): the owner logs and counts it."""
        if self.owner is not None:
            self.owner._on_cast_failed(service, fun, kind, message)

    # -- replies (also used by the Python dispatcher) ---------------------------

    def reply(self, uint64_t sid, value):
        """Send the REPLY of call `sid`; an unencodable value becomes an error."""
        cdef Py_ssize_t start
        if self._state != CS_READY:
            return
        start = self._wbuf.begin_frame(FT_REPLY, 0, sid)
        try:
            self._wbuf.pack(value, 0)
        except Exception as exc:
            self._wbuf.truncate(start)
            self._queue_error(sid, ERR_REMOTE, "malla.exceptions.EncodeError",
                              f"the result cannot be encoded: {exc}", None)
            return
        try:
            self._queue_encoded(start)
        except mexc.MessageTooLarge as exc:
            self._queue_error(sid, ERR_REMOTE, "malla.exceptions.MessageTooLarge",
                              f"the result is too large: {exc}", None)

    def reply_exception(self, uint64_t sid, exc):
        """Send the error of call `sid` whose function raised `exc`."""
        exc_type, message, tb = remote_fields(exc)
        self._queue_error(sid, ERR_REMOTE, exc_type, message, tb)

    def task_done(self, uint64_t sid):
        """Forget the task of call `sid`; False when it was cancelled."""
        return self._running.pop(sid, None) is not None

    # -- sending ----------------------------------------------------------------

    cdef int _queue_error(self, uint64_t sid, int code, str exc_type, str message,
                          object tb) except -1:
        return self._queue_message(FT_ERROR, 0, sid, [code, exc_type, message, tb])

    cdef int _queue_message(self, uint8_t ftype, uint8_t flags, uint64_t sid,
                            object payload) except -1:
        cdef Py_ssize_t start
        if self._state > CS_READY or self._transport is None:
            return 0
        start = self._wbuf.begin_frame(ftype, flags, sid)
        if payload is not None:
            try:
                self._wbuf.pack(payload, 0)
            except BaseException:
                self._wbuf.truncate(start)
                raise
        return self._queue_encoded(start)

    cdef int _queue_encoded(self, Py_ssize_t start) except -1:
        # The frame at `start` is encoded; send it as one frame or, when it
        # is larger than a frame, as a message split into frames.
        cdef WriteBuffer wb = self._wbuf
        cdef Py_ssize_t length = wb._len - start - HEADER_SIZE + wb._detached
        cdef Py_ssize_t chunk = LARGE_FRAME
        cdef Py_ssize_t whole = SPLIT_MIN
        cdef _LargeMessage m
        cdef const char* h
        cdef Py_ssize_t frames
        if <uint64_t>length > self.max_message_size:
            wb.truncate(start)
            raise MessageTooLarge(
                f"message of {length} bytes exceeds max_message_size {self.max_message_size}")
        if chunk > self.max_frame_size:
            chunk = self.max_frame_size
        if whole > self.max_frame_size:
            whole = self.max_frame_size
        if length <= whole and not wb._segs:
            wb.end_frame(start)
        else:
            h = wb._buf + start
            m = _LargeMessage.__new__(_LargeMessage)
            m.ftype = <uint8_t>h[0]
            m.flags = <uint8_t>h[1]
            m.sid = _get_u64(h + 8)
            m.length = length
            # frames of equal size: a message just over the limit goes as two
            # halves, not a full frame and a sliver that waits for a drain
            frames = (length + chunk - 1) // chunk
            m.chunk = (length + frames - 1) // frames
            m.parts = wb.take_parts(start, start + HEADER_SIZE)
            self._large_queued += length
            if self._large and self._large_queued > WRITE_HIGH_WATER:
                # One large message streams while small calls go on; more
                # behind it are a backlog the caller must wait for (its
                # memory is ours to bound), as for a full transport.
                self._large_congested = True
                self._update_congestion()
            if not self._note_large():
                self._wbuf.release_if_large()    # a lone large message
            self._large.append(m)
        return self._request_flush()

    cdef int _request_flush(self) except -1:
        # Inside a read, everything queued leaves in one write at its end.
        # Otherwise, on a quiet connection (at most this one call or task in
        # flight, and the last tick queued a single message) the message is
        # written at once: no added latency.  Under load, the tick's
        # messages are coalesced into one write by a call_soon: one syscall
        # per batch instead of per call, and batches are not split (writing
        # the first call of a busy tick at once would make the peer answer
        # it alone, and the batches fragment from there).
        if self._wbuf._len >= WRITE_BUF_KEEP:
            # A caller that never yields (casts in a tight loop) must not
            # grow our buffer: hand it to the transport, whose high-water
            # mark then pauses new calls (flow control).
            self.flush()
            return 0
        if self._in_read:
            return 0
        self._queued_this_tick += 1
        if (not self._wrote_this_tick and not self._busy_tick
                and PyDict_Size(self._pending) + PyDict_Size(self._running) <= 1):
            self._wrote_this_tick = True
            self.flush()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)
        return 0

    cdef bint _note_large(self):
        # True when large messages are streaming (another one passed less
        # than LARGE_IDLE ago): then the grown buffers are worth keeping.
        cdef double now = _now()
        cdef bint streaming = now - self._large_at < LARGE_IDLE
        self._large_at = now
        self._schedule_idle_check()
        return streaming

    cdef void _schedule_idle_check(self):
        if not self._idle_check_scheduled and self._state <= CS_READY:
            self._idle_check_scheduled = True
            self._loop.call_later(LARGE_IDLE, self._idle_check)

    def _idle_check(self):
        cdef double quiet = _now() - self._large_at
        self._idle_check_scheduled = False
        if self._state > CS_READY:
            return
        if quiet < LARGE_IDLE:
            self._idle_check_scheduled = True
            self._loop.call_later(LARGE_IDLE - quiet, self._idle_check)
            return
        self._reader.compact_if_idle(True)
        self._wbuf.release_if_large()
        # glibc keeps freed memory for reuse: hand it back to the system too
        malla_trim_heap()

    def _end_tick(self):
        self._flush_scheduled = False
        self._wrote_this_tick = False
        self._busy_tick = self._queued_this_tick > 1
        self._queued_this_tick = 0
        self.flush()

    def flush(self):
        """Write every queued small frame now, then a round of large frames,
        in one system call."""
        cdef list bufs
        if self._transport is None or self._state >= CS_CLOSING:
            # closing: close() already handed the transport what was queued
            self._wbuf.truncate(0)
            return
        if self._large and not self._paused_writing:
            bufs = []
            if self._wbuf._len:
                bufs.append(self._take_small())
            self._large_round(bufs)
            if bufs:
                self._transport.writelines(bufs)
                self.last_sent = _now()
        elif self._wbuf._len:
            self._transport.write(self._take_small())
            self.last_sent = _now()

    cdef bytes _take_small(self):
        if self._wbuf._len > WRITE_BUF_KEEP:
            self._schedule_idle_check()     # give the grown buffer back once idle
        return self._wbuf.take()

    cdef int _large_round(self, list bufs) except -1:
        # One frame of each large message per round, so that small frames
        # (written as soon as they are queued) never wait behind more than
        # one frame of any large message.  With a window, a frame goes only
        # while the peer has acknowledged enough: what a small frame finds
        # ahead of it in the kernel's buffers is bounded too.  The next round
        # starts on the next loop tick, when the transport has drained
        # (resume_writing) or when the peer acknowledges (_on_window).
        # Round robin: the messages served go to the back, and a round stops
        # at the first message the window has no room for (it goes first
        # next time), so that no message starves behind another's frames.
        cdef _LargeMessage m
        cdef Py_ssize_t chunk
        cdef Py_ssize_t i = 0, n = PyList_GET_SIZE(self._large)
        cdef list served = []
        cdef bint last
        cdef bint windowed = self._window > 0
        while i < n:
            m = <_LargeMessage>self._large[i]
            chunk = m.length - m.sent
            if chunk > m.chunk:
                chunk = m.chunk
            if windowed and self._credit < chunk:
                break
            i += 1
            last = m.sent + chunk >= m.length
            bufs.append(_frame_header(m.ftype, m.flags | (0 if last else FLAG_MORE), m.sid,
                                      <uint32_t>chunk))
            m.take_into(bufs, chunk)
            m.sent += chunk
            self._large_queued -= chunk
            if windowed:
                self._credit -= chunk
            if not last:
                served.append(m)
                continue
            self._note_large()
            if m.cancel_after:
                # a CANCEL for a peer that cannot take one inside a message
                bufs.append(_frame_header(FT_CANCEL, 0, m.sid, 0))
        self._large = self._large[i:] + served
        self._check_drained()
        if (self._large and not self._paused_writing and not self._flush_scheduled
                and (not windowed or self._credit >= (<_LargeMessage>self._large[0]).chunk)):
            self._flush_scheduled = True
            self._loop.call_soon(self._end_tick)
        return 0

    def send_frame(self, int ftype, int flags, uint64_t sid, bytes payload):
        """Queue one frame of raw payload bytes (handshake)."""
        cdef Py_ssize_t start
        if self._transport is None:
            return
        start = self._wbuf.begin_frame(<uint8_t>ftype, <uint8_t>flags, sid)
        self._wbuf.write_raw(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        self._wbuf.end_frame(start)
        self._request_flush()

    def send_message(self, int ftype, payload, int flags=0, uint64_t sid=0):
        """Queue a control message (msgpack payload); split if large."""
        if sid == 0 and ftype != FT_HEARTBEAT and ftype != FT_ERROR:
            sid = self._next_sid
            self._next_sid += 2
        self._queue_message(<uint8_t>ftype, <uint8_t>flags, sid, payload)

    def ping(self):
        """Send a HEARTBEAT asking for an answer; return its stream id."""
        cdef uint64_t sid = self._next_sid
        self._next_sid += 2
        self._queue_message(FT_HEARTBEAT, FLAG_ACK, sid, None)
        return sid

    def call(self, str service, str fun, args, kwargs, double timeout_ms, deadline_ms, meta,
             trace=None):
        """Send a CALL; return the future of its reply.

        Raises ServiceNotAvailable when the connection cannot take it (not
        sent), EncodeError / MessageTooLarge when the request cannot be sent.
        The call's stream id is left in `last_sid` (for `cancel`).
        """
        cdef Py_ssize_t start = self._encode_call(FT_CALL, service, fun, args, kwargs,
                                                  timeout_ms, deadline_ms, meta, trace)
        cdef uint64_t sid = self.last_sid
        fut = self._loop.create_future()
        self._pending[sid] = fut
        try:
            self._queue_encoded(start)
        except BaseException:
            del self._pending[sid]
            raise
        self.calls_out += 1
        if timeout_ms > 0:
            self._heap_push(_now() + timeout_ms * 0.001, sid)
        return fut

    def cast(self, str service, str fun, args, kwargs, meta, trace=None):
        """Send a CAST (no reply)."""
        cdef Py_ssize_t start = self._encode_call(FT_CAST, service, fun, args, kwargs, 0, None,
                                                  meta, trace)
        self.calls_out += 1
        self._queue_encoded(start)

    cdef Py_ssize_t _encode_call(self, uint8_t ftype, str service, str fun, args, kwargs,
                                 double timeout_ms, deadline_ms, meta, trace) except -1:
        # The CALL or CAST frame of a new stream, encoded in the write buffer:
        # returns where it starts (its stream id is in last_sid); nothing is
        # left in the buffer when the arguments cannot be encoded.
        cdef WriteBuffer wb = self._wbuf
        cdef Py_ssize_t start
        if self._state != CS_READY:
            raise ServiceNotAvailable(f"connection to {self.peer_name} is not open")
        start = wb.begin_frame(ftype, 0, self._next_sid)
        try:
            self._pack_call(wb, service, fun, args, kwargs, timeout_ms, deadline_ms, meta,
                            trace)
        except BaseException:
            wb.truncate(start)
            raise
        self.last_sid = self._next_sid
        self._next_sid += 2
        return start

    cdef inline int _pack_call(self, WriteBuffer wb, str service, str fun, args, kwargs,
                               double timeout_ms, deadline_ms, meta, trace) except -1:
        cdef Py_ssize_t i, n
        # the 8th field (trace context) is sent only when there is one
        wb._put_array_header(7 if trace is None else 8)
        wb.pack(service, 0)
        wb.pack(fun, 0)
        # args travel as a plain array, whether given as a list or a tuple
        if type(args) is tuple:
            n = PyTuple_GET_SIZE(args)
            wb._put_array_header(n)
            for i in range(n):
                wb.pack(<object>PyTuple_GET_ITEM(args, i), 1)
        elif type(args) is list:
            wb.pack(args, 0)
        else:
            wb.pack(list(args), 0)
        wb.pack(kwargs if kwargs else None, 0)
        wb.pack(<int64_t>timeout_ms, 0)
        wb.pack(deadline_ms, 0)
        wb.pack(meta, 0)
        if trace is not None:
            wb.pack(trace, 0)
        return 0

    def cancel(self, uint64_t sid):
        """Forget call `sid` and tell the peer to cancel it."""
        if self._pending.pop(sid, None) is None:
            return False
        self._send_cancel(sid)
        return True

    cdef int _send_cancel(self, uint64_t sid) except -1:
        # The call's message, if still queued, is not sent: not at all when
        # none of it has gone; with CAP_WINDOW not the rest of it either (the
        # peer drops what it has: the rest of a 100 MB argument nobody waits
        # for does not cross).  A peer without CAP_WINDOW cannot take a
        # CANCEL inside a message: it gets the rest, then the CANCEL.
        cdef _LargeMessage m
        cdef Py_ssize_t i
        for i in range(PyList_GET_SIZE(self._large)):
            m = <_LargeMessage>self._large[i]
            if m.sid != sid or m.ftype != FT_CALL:
                continue
            if m.sent and not self._acknowledge:
                m.cancel_after = True
                return 0
            del self._large[i]
            self._large_queued -= m.length - m.sent
            self._check_drained()
            break
        return self._queue_message(FT_CANCEL, 0, sid, None)

    def close(self):
        """Flush and close the transport."""
        if self._state >= CS_CLOSING:
            return
        self._state = CS_CLOSING
        if self._transport is not None:
            if self._wbuf._len:
                self._transport.write(self._wbuf.take())
            self._transport.close()

    def abort(self):
        if self._state >= CS_CLOSING and self._transport is None:
            return
        self._state = CS_CLOSING
        if self._transport is not None:
            self._transport.abort()

    cdef int _protocol_violation(self, str message) except -1:
        if self._state >= CS_CLOSING:
            return 0
        if self.owner is not None:
            self.owner._on_protocol_error(ProtocolError(message))
        self._state = CS_CLOSING
        if self._transport is not None:
            self._transport.abort()
        return 0

    cdef int _fail_pending(self, object exc_factory) except -1:
        pending = list(self._pending.values())
        self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc_factory())
        return 0

    # -- per-call timeouts: a min-heap of deadlines, one timer ---------------

    cdef int _heap_push(self, double deadline, uint64_t sid) except -1:
        cdef Py_ssize_t i, parent
        cdef TimerEntry* nh
        cdef TimerEntry tmp
        if self._heap_len > 2 * PyDict_Size(self._pending) + 256:
            self._heap_compact()
        if self._heap_len == self._heap_size:
            nh = <TimerEntry*>PyMem_Realloc(
                self._heap, (self._heap_size * 2 + 64) * sizeof(TimerEntry))
            if nh is NULL:
                raise MemoryError()
            self._heap = nh
            self._heap_size = self._heap_size * 2 + 64
        i = self._heap_len
        self._heap[i].deadline = deadline
        self._heap[i].sid = sid
        self._heap_len += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self._heap[parent].deadline <= self._heap[i].deadline:
                break
            tmp = self._heap[parent]
            self._heap[parent] = self._heap[i]
            self._heap[i] = tmp
            i = parent
        if i == 0:
            self._arm_timer()
        return 0

    cdef void _heap_sift_down(self, Py_ssize_t i):
        # Move entry i down until neither child has an earlier deadline.
        cdef Py_ssize_t child, n = self._heap_len
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

    cdef void _heap_pop(self):
        self._heap_len -= 1
        if self._heap_len:
            self._heap[0] = self._heap[self._heap_len]
            self._heap_sift_down(0)

    cdef int _heap_compact(self) except -1:
        # Entries of calls already answered linger (lazy deletion); drop them
        # and rebuild the heap, so it stays within 2x the calls in flight.
        cdef Py_ssize_t i, j = 0
        for i in range(self._heap_len):
            if self._heap[i].sid in self._pending:
                self._heap[j] = self._heap[i]
                j += 1
        self._heap_len = j
        for i in range(j // 2 - 1, -1, -1):
            self._heap_sift_down(i)
        return 0

    cdef int _arm_timer(self) except -1:
        cdef double top
        if self._heap_len == 0 or self._state == CS_CLOSED:
            return 0
        top = self._heap[0].deadline
        if self._timer is not None:
            if self._timer_at <= top + 0.0005:
                return 0
            self._timer.cancel()
        self._timer_at = top
        self._timer = self._loop.call_later(max(0.0, top - _now()), self._on_timer)
        return 0

    def _on_timer(self):
        cdef double now = _now()
        cdef uint64_t sid
        self._timer = None
        while self._heap_len and self._heap[0].deadline <= now:
            sid = self._heap[0].sid
            self._heap_pop()
            fut = self._pending.pop(sid, None)
            if fut is None:
                continue
            if not fut.done():
                fut.set_exception(CallTimeout(f"no reply from {self.peer_name} in time"))
            # The peer cancels what it still runs for us.
            self._send_cancel(sid)
        while self._heap_len and self._heap[0].sid not in self._pending:
            self._heap_pop()
        self._arm_timer()


@cython.final
cdef class LatencyHistogram:
    """Durations in a log-scale histogram: four buckets per power of two of
    microseconds (about 19% relative error), constant memory, recorded in C
    (metrics must stay cheap on the call path)."""

    cdef uint64_t _counts[256]
    cdef public uint64_t count
    cdef public uint64_t sum_ns         # the real sum, for Prometheus's _sum

    def record_ns(self, int64_t ns):
        cdef uint64_t us = <uint64_t>(ns // 1000) if ns >= 1000 else 1
        cdef int octave = 63 - __builtin_clzll(us)
        cdef int sub = <int>((us >> (octave - 2)) & 3) if octave >= 2 else <int>(us & 3)
        cdef int index = octave * 4 + sub
        if index > 255:
            index = 255
        self._counts[index] += 1
        self.count += 1
        self.sum_ns += <uint64_t>ns if ns > 0 else 0

    @staticmethod
    def _upper_us(int index):
        cdef int octave = index // 4, sub = index % 4
        if octave < 2:
            return float(2 ** octave + sub + 1)
        if sub < 3:
            return float(2 ** octave + (sub + 1) * 2 ** (octave - 2))
        return float(2 ** (octave + 1))

    def count_below_us(self, uint64_t bound_us):
        """How many durations were below `bound_us`, a power of two of
        microseconds (a bucket boundary, so the count is exact)."""
        cdef int octave, i
        cdef uint64_t n = 0
        if bound_us < 1 or bound_us & (bound_us - 1):
            raise ValueError("a bound is a power of two of microseconds")
        octave = 63 - __builtin_clzll(bound_us)
        # every bucket of the octaves below `octave` holds durations < 2**octave
        for i in range(min(octave * 4, 256)):
            n += self._counts[i]
        return n

    def percentile_us(self, double q):
        """The q-quantile (0..1), as its bucket's upper bound in microseconds."""
        cdef double rank = q * self.count
        cdef uint64_t seen = 0
        cdef int i
        if not self.count:
            return 0.0
        for i in range(256):
            seen += self._counts[i]
            if seen >= rank and self._counts[i]:
                return LatencyHistogram._upper_us(i)
        return LatencyHistogram._upper_us(255)


class Protocol(CoreProtocol, asyncio.BufferedProtocol):
    """CoreProtocol with asyncio's BufferedProtocol ABC (never asyncio.Protocol:
    uvloop would then copy every read)."""


# The enums' members as plain module constants, for the Python layers.
for _enum in (FrameType, FrameFlag, ExtCode):
    for _member in _enum:
        globals()[_member.name] = int(_member)
del _enum, _member
