"""The core's sans-IO frame reader and writer (docs/protocol.md, "Frame")."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import malla
from malla._core import (
    FLAG_ACK,
    FLAG_MORE,
    FLAG_OPTIONAL,
    FT_AUTH,
    FT_CALL,
    FT_CANCEL,
    FT_CAST,
    FT_ERROR,
    FT_HEARTBEAT,
    FT_HELLO,
    FT_REPLY,
    HEADER,
    FrameReader,
    WriteBuffer,
    build_frame,
    split_message,
)

U64_MAX = 2**64 - 1

# -- strategies ---------------------------------------------------------------

frame_st = st.tuples(
    st.integers(1, 255),          # type (0 is never a frame)
    st.integers(0, 255),          # flags
    st.integers(0, U64_MAX),      # stream id
    st.binary(max_size=300),      # payload
)
frames_st = st.lists(frame_st, max_size=12)


def stream_of(frames) -> bytes:
    return b"".join(build_frame(t, f, sid, p) for t, f, sid, p in frames)


def chunks_of(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


def feed_all(reader: FrameReader, pieces) -> list[tuple]:
    out: list[tuple] = []
    for piece in pieces:
        out.extend(reader.feed(piece))
    return out


# -- the header ---------------------------------------------------------------

def test_header_is_16_bytes():
    assert HEADER == 16
    assert len(build_frame(FT_CALL, 0, 1)) == 16


def test_header_layout_exact_bytes():
    frame = build_frame(FT_CALL, FLAG_MORE | FLAG_OPTIONAL, 0x0102030405060708, b"abc")
    assert frame == (
        bytes([3])                      # type
        + bytes([3])                    # flags: MORE | OPTIONAL
        + b"\x00\x00"                   # reserved
        + b"\x00\x00\x00\x03"           # length, big-endian u32
        + bytes([1, 2, 3, 4, 5, 6, 7, 8])  # stream id, big-endian u64
        + b"abc"
    )
    # and the same layout through struct, for a few more values
    for ftype, flags, sid, payload in [
        (FT_HEARTBEAT, FLAG_ACK, U64_MAX, b""),
        (FT_REPLY, 0, 2**63 + 5, b"\xff" * 300),
        (FT_HELLO, 0, 0, b"x" * 70000),
    ]:
        got = build_frame(ftype, flags, sid, payload)
        assert got[:HEADER] == struct.pack(">BBHIQ", ftype, flags, 0, len(payload), sid)
        assert got[HEADER:] == payload


def test_frame_type_and_flag_numbers_are_the_protocols():
    # docs/protocol.md freezes these numbers.
    assert (FT_HELLO, FT_AUTH, FT_CALL, FT_CAST, FT_REPLY, FT_ERROR, FT_CANCEL,
            FT_HEARTBEAT) == (1, 2, 3, 4, 5, 6, 7, 8)
    assert (FLAG_MORE, FLAG_OPTIONAL, FLAG_ACK) == (1, 2, 4)


def test_writebuffer_frame_matches_build_frame():
    wb = WriteBuffer()
    wb.frame(FT_CALL, 0, 7, b"hello")
    wb.frame(FT_HEARTBEAT, FLAG_ACK, 8, b"")
    wb.frame(FT_REPLY, FLAG_MORE, 9, bytearray(b"\x00\x01"))
    wb.frame(FT_REPLY, 0, 9, memoryview(b"xyz"))
    expected = (build_frame(FT_CALL, 0, 7, b"hello") + build_frame(FT_HEARTBEAT, FLAG_ACK, 8)
                + build_frame(FT_REPLY, FLAG_MORE, 9, b"\x00\x01")
                + build_frame(FT_REPLY, 0, 9, b"xyz"))
    assert len(wb) == len(expected)
    assert wb.getvalue() == expected
    assert len(wb) == 0 and wb.getvalue() == b""


# -- reading ------------------------------------------------------------------

FIXED_FRAMES = [
    (FT_HELLO, 0, 0, b"\x81\xa1a\x01"),
    (FT_CALL, FLAG_MORE, 1, b"p" * 1000),
    (FT_CALL, 0, 1, b"q" * 17),
    (FT_HEARTBEAT, FLAG_ACK, 0, b""),
    (FT_REPLY, 0, U64_MAX, b"\x00" * 16),   # a payload that looks like a header
    (FT_ERROR, FLAG_OPTIONAL, 2**63, b"e"),
    (255, 255, 42, b""),
]


def test_reader_yields_tuples_of_a_whole_stream():
    reader = FrameReader()
    assert reader.feed(stream_of(FIXED_FRAMES)) == FIXED_FRAMES
    assert reader.buffered == 0


def test_byte_at_a_time_equals_all_at_once():
    data = stream_of(FIXED_FRAMES)
    reader = FrameReader()
    got = []
    boundaries = set()
    for i in range(len(data)):
        new = reader.feed(data[i:i + 1])
        got.extend(new)
        if new:
            boundaries.add(i + 1)
        assert reader.buffered == (i + 1) - max(boundaries, default=0)
    assert got == FIXED_FRAMES
    # a frame is reported exactly when its last byte arrives, never earlier
    ends, pos = set(), 0
    for _t, _f, _sid, p in FIXED_FRAMES:
        pos += HEADER + len(p)
        ends.add(pos)
    assert boundaries == ends


def test_empty_feed_and_partial_header_wait():
    reader = FrameReader()
    assert reader.feed(b"") == []
    frame = build_frame(FT_CAST, 0, 3, b"abc")
    assert reader.feed(frame[:HEADER - 1]) == []
    assert reader.feed(frame[HEADER - 1:HEADER + 1]) == []
    assert reader.buffered == HEADER + 1
    assert reader.feed(frame[HEADER + 1:]) == [(FT_CAST, 0, 3, b"abc")]
    assert reader.buffered == 0


def test_empty_payload_frames():
    frames = [(FT_HEARTBEAT, 0, 0, b""), (FT_CANCEL, 0, 5, b""), (FT_HEARTBEAT, FLAG_ACK, 9, b"")]
    data = stream_of(frames)
    assert len(data) == 3 * HEADER
    assert FrameReader().feed(data) == frames
    reader = FrameReader()
    assert feed_all(reader, [data[i:i + 1] for i in range(len(data))]) == frames
    # a reader limited to 0-byte frames still takes them
    assert FrameReader(max_frame_size=0).feed(data) == frames


def test_feed_accepts_bytearray_and_memoryview():
    data = stream_of(FIXED_FRAMES)
    assert FrameReader().feed(bytearray(data)) == FIXED_FRAMES
    assert FrameReader().feed(memoryview(data)) == FIXED_FRAMES


@settings(max_examples=150, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_arbitrary_splits_yield_the_same_frames(frames, cuts):
    data = stream_of(frames)
    reader = FrameReader()
    got = feed_all(reader, chunks_of(data, cuts))
    assert got == frames
    assert reader.buffered == 0


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(frame_st, min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 10**6), max_size=10),
       tail=st.integers(1, HEADER + 299))
def test_incomplete_trailing_frame_is_held_back(frames, cuts, tail):
    data = stream_of(frames)
    last = build_frame(*frames[-1])
    tail = min(tail, len(last) - 1)
    truncated = data[:len(data) - tail]
    reader = FrameReader()
    got = feed_all(reader, chunks_of(truncated, cuts))
    assert got == frames[:-1]
    assert reader.buffered == len(last) - tail
    assert reader.feed(data[len(data) - tail:]) == frames[-1:]


# -- violations ---------------------------------------------------------------

def header(ftype: int, flags: int, length: int, sid: int) -> bytes:
    return struct.pack(">BBHIQ", ftype, flags, 0, length, sid)


@pytest.mark.parametrize("limit,length", [(1024, 1025), (1 << 20, (1 << 20) + 1),
                                          (1 << 20, 0xFFFFFFFF), (0, 1)])
def test_oversized_header_is_refused_before_the_payload(limit, length):
    reader = FrameReader(max_frame_size=limit)
    hdr = header(FT_CALL, 0, length, 1)
    cap = reader.capacity
    assert reader.feed(hdr[:HEADER - 1]) == []
    with pytest.raises(malla.ProtocolError):
        reader.feed(hdr[HEADER - 1:])       # the 16th byte: no payload sent at all
    assert reader.capacity == cap           # nothing was reserved for the payload


def test_oversized_header_in_one_piece_with_a_valid_frame_before_it():
    reader = FrameReader(max_frame_size=100)
    ok = build_frame(FT_CALL, 0, 1, b"x" * 100)   # exactly the limit: fine
    assert reader.feed(ok) == [(FT_CALL, 0, 1, b"x" * 100)]
    with pytest.raises(malla.ProtocolError):
        reader.feed(header(FT_REPLY, 0, 101, 1))


def test_default_max_frame_size_is_1_mib():
    reader = FrameReader()
    assert reader.max_frame_size == 1 << 20
    with pytest.raises(malla.ProtocolError):
        reader.feed(header(FT_CALL, 0, (1 << 20) + 1, 1))


def test_max_frame_size_can_be_changed_after_the_handshake():
    reader = FrameReader(max_frame_size=65536)
    with pytest.raises(malla.ProtocolError):
        reader.feed(header(FT_CALL, 0, 65537, 1))
    reader = FrameReader(max_frame_size=65536)
    reader.max_frame_size = 1 << 20
    payload = b"z" * 65537
    assert reader.feed(build_frame(FT_CALL, 0, 1, payload)) == [(FT_CALL, 0, 1, payload)]


@pytest.mark.parametrize("length", [0, 5])
def test_frame_type_zero_is_rejected(length):
    reader = FrameReader()
    with pytest.raises(malla.ProtocolError):
        reader.feed(header(0, 0, length, 1) + b"x" * length)
    reader = FrameReader()
    good = build_frame(FT_HEARTBEAT, 0, 0)
    with pytest.raises(malla.ProtocolError):
        reader.feed(good + header(0, 0, 0, 0))


def test_protocol_error_is_a_malla_error():
    reader = FrameReader()
    with pytest.raises(malla.MallaError):
        reader.feed(b"\x00" * HEADER)


garbage_st = st.one_of(
    st.binary(max_size=400),
    # a valid stream with some bytes overwritten: gets past more headers
    st.tuples(frames_st, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                  max_size=6)).map(
        lambda fm: _mutate(stream_of(fm[0]), fm[1])),
)


def _mutate(data: bytes, edits) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=garbage_st, cuts=st.lists(st.integers(0, 10**6), max_size=20),
       limit=st.one_of(st.integers(0, 600), st.just(1 << 20), st.just(0xFFFFFFFF)))
def test_arbitrary_bytes_raise_protocol_error_or_yield_frames(data, cuts, limit):
    reader = FrameReader(max_frame_size=limit)
    fed = consumed = 0
    for piece in chunks_of(data, cuts):
        try:
            frames = reader.feed(piece)
        except malla.ProtocolError:
            return           # the connection is closed: nothing more is fed
        fed += len(piece)
        for ftype, flags, sid, payload in frames:
            assert 1 <= ftype <= 255 and 0 <= flags <= 255 and 0 <= sid <= U64_MAX
            assert type(payload) is bytes and len(payload) <= limit
            consumed += HEADER + len(payload)
        assert consumed + reader.buffered == fed


# -- split_message ------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=3000), limit=st.integers(1, 400),
       ftype=st.sampled_from([FT_CALL, FT_REPLY, FT_CAST]),
       flags=st.sampled_from([0, FLAG_OPTIONAL]), sid=st.integers(1, U64_MAX))
def test_split_message(payload, limit, ftype, flags, sid):
    frames = split_message(ftype, sid, payload, limit, flags)
    expected_count = max(1, -(-len(payload) // limit))
    assert len(frames) == expected_count
    reader = FrameReader(max_frame_size=limit)
    parsed = []
    for raw in frames:
        got = reader.feed(raw)
        assert len(got) == 1
        parsed.extend(got)
    for i, (t, f, s, p) in enumerate(parsed):
        assert t == ftype and s == sid
        assert len(p) <= limit
        last = i == len(parsed) - 1
        assert f == (flags if last else flags | FLAG_MORE)
        assert bool(f & FLAG_MORE) is (not last)
        if not last:
            assert len(p) == limit   # chunks are as full as allowed
    assert b"".join(p for _, _, _, p in parsed) == payload


def test_split_message_small_and_empty():
    assert split_message(FT_REPLY, 3, b"abc", 1024) == [build_frame(FT_REPLY, 0, 3, b"abc")]
    assert split_message(FT_REPLY, 3, b"", 1024) == [build_frame(FT_REPLY, 0, 3, b"")]
    assert split_message(FT_REPLY, 3, b"abcd", 2) == [
        build_frame(FT_REPLY, FLAG_MORE, 3, b"ab"), build_frame(FT_REPLY, 0, 3, b"cd")]
    with pytest.raises(ValueError):
        split_message(FT_REPLY, 3, b"abc", 0)


# -- memory -------------------------------------------------------------------

def test_read_buffer_shrinks_back_after_a_large_frame():
    reader = FrameReader(max_frame_size=4 << 20)
    initial = reader.capacity
    payload = bytes(range(256)) * (3 << 12)     # 3 MiB
    data = build_frame(FT_REPLY, 0, 1, payload)
    got = []
    for off in range(0, len(data), 65536):
        got.extend(reader.feed(data[off:off + 65536]))
        if not got:
            grown = reader.capacity
    assert got == [(FT_REPLY, 0, 1, payload)]
    assert grown >= len(payload)                 # the frame did need a big buffer
    assert reader.capacity <= 2 * initial        # ... and it was given back
    assert reader.buffered == 0
    # the reader still works afterwards
    assert reader.feed(build_frame(FT_CALL, 0, 3, b"ok")) == [(FT_CALL, 0, 3, b"ok")]


def test_read_buffer_shrinks_once_the_trailing_partial_frame_completes():
    reader = FrameReader(max_frame_size=4 << 20)
    initial = reader.capacity
    big = build_frame(FT_REPLY, 0, 1, b"b" * (2 << 20))
    small = build_frame(FT_CALL, 0, 3, b"small")
    # the large frame and half of a small one in one read
    assert reader.feed(big + small[:5]) == [(FT_REPLY, 0, 1, b"b" * (2 << 20))]
    assert reader.buffered == 5
    assert reader.feed(small[5:]) == [(FT_CALL, 0, 3, b"small")]
    assert reader.capacity <= 2 * initial
