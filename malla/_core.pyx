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
from cpython.mem cimport PyMem_Malloc, PyMem_Calloc, PyMem_Realloc, PyMem_Free
from cpython.object cimport PyObject
from cpython.contextvars cimport PyContextVar_Set, PyContextVar_Reset
from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from libc.string cimport memcpy, memmove
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import asyncio
import os
import contextvars
import logging

from msgpack import unpackb as _msgpack_unpackb, ExtType

from malla import exceptions as mexc

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

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
cdef int ERR_FORBIDDEN = mexc.ERR_FORBIDDEN
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


# The fragments, in dependency order (each with its .pxd, included by _core.pxd).
include "core/debug.pyx"
include "core/frame.pyx"
include "core/decoder.pyx"
include "core/encoder.pyx"
include "core/reader.pyx"
include "core/reassembly.pyx"
include "core/dispatch.pyx"
include "core/errors.pyx"
include "core/outqueue.pyx"
include "core/pending.pyx"
include "core/latency.pyx"
include "core/memory.pyx"
include "core/wire.pyx"
include "core/stream.pyx"
include "core/protocol.pyx"
include "core/histogram.pyx"


# The enums' members as plain module constants, for the Python layers.
for _enum in (FrameType, FrameFlag, ExtCode):
    for _member in _enum:
        globals()[_member.name] = int(_member)
del _enum, _member
