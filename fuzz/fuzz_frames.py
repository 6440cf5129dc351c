"""Fuzz target: the sans-IO frame reader and the core protocol's read path.

Arbitrary bytes, cut into arbitrary chunks, go into

1. ``malla._core.FrameReader`` (through ``feed()`` or through the
   BufferedProtocol path ``get_buffer()`` + ``buffer_updated()``), checked
   against a reference parser written from docs/protocol.md ("Frame"): the
   frames it yields are exactly the reference's, a header announcing more than
   ``max_frame_size`` or frame type 0 raises ``malla.ProtocolError`` as soon
   as its 16 bytes are in, and nothing else may happen but waiting for more;
2. a ``malla._core.Protocol`` on a fake transport, before or after the
   handshake: ``buffer_updated`` never raises, a violation aborts the
   transport with a ``ProtocolError`` that is not an "internal error", and
   the owner only ever sees handshake frames before ``set_ready``.

Run under atheris: ``python fuzz/fuzz_frames.py [libFuzzer flags] [corpus]``
(see fuzz/README.md; ``make fuzz`` does it).  Replayed without atheris by
tests/test_fuzz_replay.py through ``TestOneInput``.
"""

from __future__ import annotations

import asyncio
import random
import struct

from _instrument import instrumenting

with instrumenting(__name__):
    import malla
    from malla._ext import core
    from malla.service import RunningService

from _target import (  # after malla's instrumented import
    Echo,
    FakeTransport,
    RecordingOwner,
    deliver,
    drain,
    get_loop,
)

HEADER = 16
# FrameReader limits tried: 0 (only empty frames), tiny, the pre-auth limit,
# the minimum agreed limit, the default.
LIMITS = (0, 1, 100, 1024, 65536, 1 << 20)


# -- the reference parser (docs/protocol.md, "Frame") ---------------------------

def reference(stream: bytes, limit: int) -> tuple[list[tuple[int, int, int, bytes]], int | None]:
    """The frames of `stream`, and the offset where the header of a bad frame
    ends (None: no violation; the reader must then wait for more)."""
    frames = []
    pos = 0
    while len(stream) - pos >= HEADER:
        ftype, flags, _reserved, length, sid = struct.unpack_from(">BBHIQ", stream, pos)
        if length > limit or ftype == 0:
            return frames, pos + HEADER
        if len(stream) - pos < HEADER + length:
            break
        frames.append((ftype, flags, sid, stream[pos + HEADER:pos + HEADER + length]))
        pos += HEADER + length
    return frames, None


def _chunks(stream: bytes, mode: int, seed: int) -> list[bytes]:
    if mode == 0:
        return [stream]
    if mode == 1:
        return [stream[i:i + 1] for i in range(len(stream))]
    rng = random.Random(seed)
    top = 16 if mode == 2 else 4096
    out, pos = [], 0
    while pos < len(stream):
        n = rng.randint(0, top)           # empty chunks too
        out.append(stream[pos:pos + n])
        pos += n
    return out


def _feed(reader, chunk: bytes, via_buffer: bool) -> list:
    if not via_buffer:
        return reader.feed(chunk)
    # The BufferedProtocol path: write into the reader's own buffer.
    pos = 0
    while pos < len(chunk):
        view = reader.get_buffer(-1)
        n = min(len(view), len(chunk) - pos)
        assert n > 0, "get_buffer returned an empty buffer"
        view[:n] = chunk[pos:pos + n]
        view.release()
        reader.buffer_updated(n)
        pos += n
    return reader.feed(b"")


def check_reader(stream: bytes, limit: int, mode: int, seed: int, via_buffer: bool) -> None:
    frames, bad_end = reference(stream, limit)
    reader = core.FrameReader(limit)
    got: list[tuple[int, int, int, bytes]] = []
    fed = 0
    for chunk in _chunks(stream, mode, seed):
        fed += len(chunk)
        try:
            got.extend(_feed(reader, chunk, via_buffer))
        except malla.ProtocolError:
            assert bad_end is not None, "ProtocolError on a valid stream"
            assert fed >= bad_end, "ProtocolError before the bad header was complete"
            # the frames handed out before the error are the reference's
            assert got == frames[:len(got)], "wrong frames before the violation"
            return
        # a bad header is refused in the feed that completes it
        assert bad_end is None or fed < bad_end, "bad header not refused"
        assert got == frames[:len(got)], "frames differ from the reference"
    assert bad_end is None
    assert got == frames, "complete frames not all yielded"
    consumed = sum(HEADER + len(f[3]) for f in frames)
    assert reader.buffered == len(stream) - consumed, "buffered count wrong"


# -- the protocol's read path ------------------------------------------------------

class Owner(RecordingOwner):
    """The core's owner, checking what the core hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = False

    def _on_handshake_frame(self, ftype, flags, sid, payload) -> None:
        assert not self.ready, "handshake frame handed to the owner after set_ready"
        assert ftype in (core.FT_HELLO, core.FT_AUTH, core.FT_ERROR), ftype
        assert not flags & core.FLAG_MORE
        assert type(payload) is bytes
        super()._on_handshake_frame(ftype, flags, sid, payload)

    def _on_control(self, ftype, flags, sid, payload) -> None:
        assert self.ready, "control message before the handshake ended"
        assert ftype in (core.FT_ANNOUNCE, core.FT_TABLE, core.FT_GOODBYE, core.FT_PEERS)

    def _on_connection_error(self, err) -> None:
        assert isinstance(err, malla.MallaError), err

    def _on_protocol_error(self, err) -> None:
        assert isinstance(err, malla.ProtocolError), err
        super()._on_protocol_error(err)


async def _feed_protocol(proto, chunks: list[bytes]) -> None:
    # inside the loop, as a transport would call it
    for chunk in chunks:
        deliver(proto, chunk)
        if proto.closed:
            break
        await asyncio.sleep(0)


def check_protocol(stream: bytes, ready: bool, limit: int, mode: int, seed: int) -> None:
    loop = get_loop()
    owner = Owner()
    # a small max_message_size exercises dropping; a large one, detaching
    proto = core.Protocol(owner, loop, bool(seed & 1), {"Echo": RunningService(Echo())},
                          max(limit, 1024), 1 << 16 if seed & 4 else 1 << 20)
    transport = FakeTransport()
    proto.connection_made(transport)
    if ready:
        proto.set_ready("peer", max(limit, 1024), bool(seed & 2))    # CAP_WINDOW
        owner.ready = True
    loop.run_until_complete(_feed_protocol(proto, _chunks(stream, mode, seed)))
    drain(loop)
    for err in owner.protocol_errors:
        assert not str(err).startswith("internal error"), f"uncaught error in the core: {err}"
    if owner.protocol_errors:
        assert proto.closed and transport.aborted, "violation without closing"
    if transport.aborted:
        assert owner.protocol_errors, "aborted without a ProtocolError"
    if not ready:
        # before the handshake only HELLO/AUTH/ERROR (or optional frames) pass
        frames, _ = reference(stream, 65536)
        for ftype, flags, _sid, _payload in frames:
            if flags & core.FLAG_MORE:
                assert proto.closed, "a split handshake message was accepted"
                break
            if ftype not in (core.FT_HELLO, core.FT_AUTH, core.FT_ERROR) and not (
                    flags & core.FLAG_OPTIONAL):
                assert proto.closed, "a non-handshake frame was accepted before the handshake"
                break
    proto.connection_lost(None)
    assert owner.lost == 1
    assert proto.in_flight == 0
    drain(loop)


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    cfg, seed = data[0], data[1]
    stream = data[2:]
    limit = LIMITS[(cfg & 0x0F) % len(LIMITS)]
    mode = (cfg >> 4) & 3
    via_buffer = bool(cfg & 0x40)
    check_reader(stream, limit, mode, seed, via_buffer)
    check_protocol(stream, bool(cfg & 0x80), limit, mode, seed)


# -- seeds ------------------------------------------------------------------------------

def seeds() -> dict[str, bytes]:
    """Seed inputs (fuzz/corpus/frames): config byte, chunking seed, stream."""
    f = core.build_frame
    call = core.packb(["Echo", "echo", [1, "a", (2,)], {"k": b"v"}, 1000, None, None])
    valid = [
        f(core.FT_HELLO, 0, 0, b"\x80"),
        f(core.FT_AUTH, 0, 0, b"p" * 32),
        f(core.FT_CALL, 0, 1, call),
        f(core.FT_CAST, 0, 3, call),
        f(core.FT_REPLY, 0, 5, core.packb([1, 2.5, None])),
        f(core.FT_ERROR, 0, 0, core.packb([7, "x", "y", None])),
        f(core.FT_CANCEL, 0, 9, b""),
        f(core.FT_HEARTBEAT, core.FLAG_ACK, 11, b""),
        f(core.FT_HEARTBEAT, 0, 0, b""),
        f(core.FT_TABLE, 0, 13, core.packb({})),
        f(200, core.FLAG_OPTIONAL, 0, b"skip me"),
        f(200, 0, 0, b""),
    ]
    out: dict[str, bytes] = {}
    for i, frame in enumerate(valid):
        out[f"one-{i:02d}"] = bytes([0x03, i]) + frame
        out[f"one-{i:02d}-ready-bytewise"] = bytes([0x80 | 0x10 | 0x03, i]) + frame
    stream = b"".join(valid)
    out["all-at-once"] = bytes([0x05, 0]) + stream
    out["all-random-chunks"] = bytes([0x20 | 0x03, 7]) + stream
    out["all-via-buffer-ready"] = bytes([0x80 | 0x40 | 0x30 | 0x04, 9]) + stream
    parts = core.split_message(core.FT_REPLY, 5, core.packb(["x" * 3000]), 1024)
    out["split-reply-ready"] = bytes([0x80 | 0x03, 1]) + b"".join(parts)
    out["split-call-ready"] = bytes([0x80 | 0x20 | 0x03, 2]) + b"".join(
        core.split_message(core.FT_CALL, 7, call, 16))
    out["oversized-header"] = bytes([0x03, 0]) + struct.pack(">BBHIQ", 3, 0, 0, 5000, 1)
    out["type-zero"] = bytes([0x05, 0]) + struct.pack(">BBHIQ", 0, 0, 0, 0, 0)
    out["truncated-header"] = bytes([0x05, 0]) + valid[2][:9]
    out["truncated-payload"] = bytes([0x15, 0]) + valid[2][:-3]
    out["more-on-stream-0-ready"] = bytes([0x83, 0]) + f(core.FT_REPLY, core.FLAG_MORE, 0, b"a")
    out["hello-after-ready"] = bytes([0x83, 0]) + valid[0]
    out["more-in-handshake"] = bytes([0x03, 0]) + f(core.FT_HELLO, core.FLAG_MORE, 0, b"")
    window = f(core.FT_WINDOW, core.FLAG_OPTIONAL, 0, core.packb(4096))
    out["window-ack-ready"] = bytes([0x83, 2]) + window
    out["window-malformed-ready"] = bytes([0x83, 2]) + f(core.FT_WINDOW, core.FLAG_OPTIONAL, 0,
                                                         core.packb(-1))
    # a split CALL announcing a bin too large to detach here... and one that
    # is detached but ends after 20 of its 300,000 bytes
    for name, size in (("bin-cut", 300_000), ("bin-huge", 1 << 31)):
        head = core.packb(["Echo", "echo", [None], None, 0, None, None])
        cut = head[:-5] + b"\xc6" + struct.pack(">I", size) + b"b" * 20
        out[f"split-call-{name}-ready"] = bytes([0x80 | 0x20 | 0x03, 2]) + b"".join(
            core.split_message(core.FT_CALL, 7, cut, 16))
    return out


if __name__ == "__main__":
    import _target

    _target.main(TestOneInput, seeds)
