# The frame: sizes and limits, frame types and flags, a decoded header.

cdef enum:
    # The fixed frame header: type u8, flags u8, reserved u16, length u32,
    # stream id u64, all big-endian (docs/protocol.md).
    HEADER_SIZE = 16
    # Nesting deeper than this is refused by the encoder (cycles end here too).
    MAX_DEPTH = 512
    # Tuples and sets nested deeper than this are refused too: each is
    # decoded by a nested msgpack call (30-40 KiB of C stack; codec.py), and
    # a decoder must fit in a thread's stack (1.5 MiB suffices for this).
    MAX_EXT_NESTING_DEPTH = 32
    # Read buffer: starting size, and the size it shrinks back to when idle.
    READ_BUF_INITIAL = 32768
    # Write buffer: starting size; a larger one is dropped after a flush.
    WRITE_BUF_INITIAL = 4096
    WRITE_BUF_KEEP = 65536
    # Frames allowed before authentication: handshake messages are small.
    PREAUTH_MAX_FRAME = 65536
    # Transport write buffer: past this, writing pauses and new calls wait.
    WRITE_HIGH_WATER = 1048576
    # A message larger than SPLIT_MIN is sent in frames of LARGE_FRAME, one
    # frame of each large message per loop round, so that a small frame
    # queued meanwhile waits behind one such frame at most; a smaller one
    # goes whole, as one frame (no window, no reassembly).
    SPLIT_MIN = 262144
    LARGE_FRAME = 32768
    # A `bytes` value at least this large is not copied: the sender hands the
    # object itself to the transport, the receiver writes it straight into
    # its final bytes object.  Not below SPLIT_MIN (a message holding one is
    # then always sent in frames).
    DETACH_MIN = SPLIT_MIN
    # With CAP_WINDOW, at most this many bytes of large-message frames are
    # unacknowledged by the receiver (in kernel buffers on either side): the
    # bound on what a small frame can find ahead of it.
    LARGE_WINDOW = 131072
    # Messages in progress from one peer (received, or announced by a large
    # `bytes` value) may hold this many times max_message_size in all.
    PARTIAL_BUDGET = 4
    # The most items a stream's consumer may grant at once (its window too).
    MAX_STREAM_WINDOW = 1048576


cpdef enum FrameType:
    FT_HELLO = 1
    FT_AUTH = 2
    FT_CALL = 3
    FT_CAST = 4
    FT_REPLY = 5
    FT_ERROR = 6
    FT_CANCEL = 7
    FT_HEARTBEAT = 8
    FT_ANNOUNCE = 9
    FT_TABLE = 10
    FT_GOODBYE = 11
    FT_PEERS = 12
    FT_WINDOW = 13
    FT_STREAM = 14       # a CALL whose answer is items (CAP_STREAM)
    FT_ITEM = 15
    FT_CREDIT = 16


cpdef enum FrameFlag:
    FLAG_MORE = 1        # more frames of this message follow
    FLAG_OPTIONAL = 2    # a receiver that does not know the type skips it
    FLAG_ACK = 4         # HEARTBEAT: answer me (a ping)


cdef struct Frame:
    uint8_t ftype
    uint8_t flags
    uint32_t length
    uint64_t sid
    const char* payload
