# Declarations of malla's compiled core (see _core.pyx for the strategy).

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from cpython.object cimport PyObject

include "core/debug.pxd"
include "core/frame.pxd"
include "core/encoder.pxd"
include "core/reader.pxd"
include "core/reassembly.pxd"
include "core/dispatch.pxd"
include "core/outqueue.pxd"
include "core/pending.pxd"
include "core/latency.pxd"
include "core/wire.pxd"
include "core/stream.pxd"
include "core/protocol.pxd"
include "core/histogram.pxd"
