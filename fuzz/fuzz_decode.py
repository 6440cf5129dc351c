"""Fuzz target: message decoding (malla.codec.unpackb and the core's paths).

The core decodes a REPLY, CALL/CAST or ERROR payload with msgpack and the
codec's ext_hook, and sorts every failure into one of two outcomes
(malla/_core.pyx, CoreProtocol._on_reply / _on_call / _on_error):

* ``EncodeError``: well-formed, but a value this node cannot rebuild (an
  unregistered user type): that one message fails, the connection stays;
* any other ``Exception``: malformed msgpack: ``ProtocolError``, the
  connection closes.

This target mirrors that split and checks, on arbitrary bytes:

1. ``unpackb`` returns a value or raises one of the "malformed" families
   (``MALFORMED`` below: ValueError incl. msgpack's FormatError/StackError/
   ExtraData and UnicodeDecodeError, TypeError incl. EncodeError,
   ArithmeticError incl. OverflowError and decimal's InvalidOperation,
   RecursionError); anything else (KeyError, AttributeError, NameError,
   AssertionError, SystemError, a BaseException...) is a bug in the codec;
2. a decoded value is made only of wire types (DESIGN.md, "Values on the
   wire") and comes back as it went: ``unpackb(packb(v))`` equals ``v``
   (type for type, float bits, set contents); the only value that may fail
   to re-encode is one nested deeper than the encoder's 512 levels;
3. the same payload fed to a ``malla._core.Protocol`` as a REPLY, a CALL, a
   CAST or an ERROR (in one frame or split over several) gets exactly the
   outcome the codec predicts: a result, a failed message with the
   connection kept, or a ``ProtocolError`` that closes it; never an
   "internal error", never an exception out of ``buffer_updated``; a CALL is
   answered exactly once, a CAST never;
4. the receiver's reassembly of a split message, which writes large bytes
   values straight into their own objects (here: every bin of 4 bytes or
   more), decodes the payload, cut anywhere, to the same value or the same
   kind of failure.

Replayed without atheris by tests/test_fuzz_replay.py (``TestOneInput``).
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import struct
import sys
import uuid

from _instrument import instrumenting

with instrumenting(__name__):
    import malla
    from malla import codec
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
from msgpack import ExtType
from msgpack import packb as msgpack_packb

# What a malformed payload may raise from the codec (see the docstring).
MALFORMED = (ValueError, TypeError, ArithmeticError, RecursionError)


class FuzzPoint:
    """A registered user type: its decoder insists on the documented bytes."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def _decode_point(data: bytes) -> FuzzPoint:
    assert type(data) is bytes, f"user decoder got {type(data).__name__}, not bytes"
    return FuzzPoint(data)


codec.register_type(FuzzPoint, lambda p: p.raw, _decode_point, name="fuzz.FuzzPoint")


# -- a canonical form: equal values, equal bytes --------------------------------------

def canon(v) -> bytes:
    """Bytes that identify a decoded value, type for type (floats by bits,
    sets as sorted multisets, dicts in order)."""
    # msgpack nests up to 1023 levels: more than Python's default recursion
    # limit for this checker (not for the code under test).
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        return _canon(v, 0)
    finally:
        sys.setrecursionlimit(old)


def _canon(v, depth: int) -> bytes:
    canon = _canon
    t = type(v)
    if depth > 2000:
        raise AssertionError("runaway nesting")
    if v is None:
        return b"N"
    if t is bool:
        return b"T" if v else b"F"
    if t is int:
        return b"i" + str(v).encode() + b";"
    if t is float:
        return b"f" + struct.pack(">d", v)
    if t is str:
        return b"s" + _blob(v.encode("utf-8", "surrogatepass"))
    if t is bytes:
        return b"b" + _blob(v)
    if t is bytearray:
        return b"B" + _blob(bytes(v))
    if t is list or t is tuple:
        return (b"l" if t is list else b"t") + _seq([canon(x, depth + 1) for x in v])
    if t is set or t is frozenset:
        return (b"S" if t is set else b"Z") + _seq(sorted(canon(x, depth + 1) for x in v))
    if t is dict:
        return b"d" + _seq([canon(k, depth + 1) + canon(x, depth + 1) for k, x in v.items()])
    if t is complex:
        return b"c" + struct.pack(">dd", v.real, v.imag)
    if t is decimal.Decimal:
        return b"D" + _blob(str(v).encode())
    if t is uuid.UUID:
        return b"U" + v.bytes
    if t is dt.datetime:
        return b"W" + canon([v.year, v.month, v.day, v.hour, v.minute, v.second,
                             v.microsecond, _off(v.utcoffset()), v.fold], depth + 1)
    if t is dt.date:
        return b"Y" + canon([v.year, v.month, v.day], depth + 1)
    if t is dt.time:
        return b"H" + canon([v.hour, v.minute, v.second, v.microsecond,
                             _off(v.utcoffset()), v.fold], depth + 1)
    if t is dt.timedelta:
        return b"L" + canon([v.days, v.seconds, v.microseconds], depth + 1)
    if t is FuzzPoint:
        return b"P" + _blob(v.raw)
    raise AssertionError(f"decoded a {t.__module__}.{t.__qualname__}: not a wire type")


def _off(offset: dt.timedelta | None) -> int | None:
    return None if offset is None else offset // dt.timedelta(microseconds=1)


def _blob(b: bytes) -> bytes:
    return str(len(b)).encode() + b":" + b


def _seq(items: list[bytes]) -> bytes:
    return str(len(items)).encode() + b"[" + b"".join(items) + b"]"


def _nested_too_deep(exc: BaseException) -> bool:
    # (more than 512 levels, or more than core.MAX_EXT_NESTING tuples or sets)
    return isinstance(exc, malla.EncodeError) and "nested more than" in str(exc)


def decode(payload: bytes) -> tuple[str, object]:
    """("value", v) | ("fails", EncodeError) | ("malformed", exc), as the core sorts them."""
    try:
        value = codec.unpackb(payload)
    except malla.EncodeError as exc:
        return "fails", exc
    except MALFORMED as exc:
        return "malformed", exc
    # anything else propagates: a bug
    return "value", value


def check_codec(payload: bytes) -> tuple[str, object]:
    outcome, value = decode(payload)
    if outcome != "value":
        return outcome, value
    c1 = canon(value)
    try:
        again = codec.packb(value)
    except malla.EncodeError as exc:
        assert _nested_too_deep(exc), f"a decoded value does not re-encode: {exc!r}"
        return outcome, value
    outcome2, back = decode(again)
    assert outcome2 == "value", f"re-encoded value does not decode: {back!r}"
    assert canon(back) == c1, "value does not come back as it went"
    return outcome, value


def check_reassembly(payload: bytes, cut: int, expected: tuple[str, object]) -> None:
    part = core.Reassembly(core.FT_REPLY, 0, 4, 1 << 20)
    cut %= len(payload) + 1
    part.add(payload[:cut])
    part.add(payload[cut:])
    try:
        got: tuple[str, object] = ("value", part.decode())
    except malla.EncodeError as exc:
        got = ("fails", exc)
    except MALFORMED as exc:
        got = ("malformed", exc)
    assert got[0] == expected[0], f"reassembly: {got!r}, the codec: {expected!r}"
    if got[0] == "value":
        assert canon(got[1]) == canon(expected[1]), "reassembly decodes another value"


# -- the core's decode paths ------------------------------------------------------------

class Owner(RecordingOwner):
    """The core's owner: after set_ready, only calls' outcomes may reach it."""

    def _on_handshake_frame(self, *args) -> None:
        raise AssertionError("handshake frame after set_ready")

    def _on_control(self, *args) -> None:
        raise AssertionError("unexpected control message")

    def _on_connection_error(self, err) -> None:
        assert isinstance(err, malla.MallaError)
        super()._on_connection_error(err)

    def _on_protocol_error(self, err) -> None:
        assert isinstance(err, malla.ProtocolError)
        super()._on_protocol_error(err)





async def _feed(proto, stream: bytes) -> None:
    deliver(proto, stream)       # inside the loop, as a transport would call it


def _written_frames(transport: FakeTransport) -> list[tuple[int, int, int, bytes]]:
    reader = core.FrameReader(1 << 30)
    frames: list[tuple[int, int, int, bytes]] = []
    for chunk in transport.writes:
        frames.extend(reader.feed(chunk))
    return frames


KINDS = (core.FT_REPLY, core.FT_CALL, core.FT_CAST, core.FT_ERROR)


def check_core(kind: int, payload: bytes, split: int, expected: tuple[str, object]) -> None:
    loop = get_loop()
    owner = Owner()
    proto = core.Protocol(owner, loop, True, {"Echo": RunningService(Echo())}, 1 << 20, 1 << 20)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.set_ready("peer", 1 << 20)
    fut = proto.call("S", "f", [], None, 0, None, None)
    sid = proto.last_sid
    transport.writes.clear()
    if kind == core.FT_CALL or kind == core.FT_CAST:
        sid = 2               # the peer's stream
    if split:
        stream = b"".join(core.split_message(kind, sid, payload, split))
    else:
        stream = core.build_frame(kind, 0, sid, payload)
    loop.run_until_complete(_feed(proto, stream))
    drain(loop)
    drain(loop)
    for err in owner.protocol_errors:
        assert not str(err).startswith("internal error"), f"uncaught error in the core: {err}"
    outcome, value = expected
    sent = [f for f in _written_frames(transport) if f[2] == sid]

    if kind == core.FT_REPLY:
        assert fut.done(), "reply did not resolve its call"
        if outcome == "value":
            assert not proto.closed
            assert canon(fut.result()) == canon(value), "reply value differs from the codec's"
        elif outcome == "fails":
            # the function ran; its result cannot be rebuilt here: RemoteError
            assert not proto.closed, "an undecodable value closed the connection"
            assert isinstance(fut.exception(), malla.RemoteError)
            assert fut.exception().exc_type == "malla.exceptions.EncodeError"
        else:
            assert proto.closed and transport.aborted, "malformed reply kept the connection"
            assert isinstance(fut.exception(), malla.ProtocolError)
        assert proto.in_flight == 0
    elif kind == core.FT_CAST:
        assert not sent, "a cast was answered"
        assert proto.closed == (outcome == "malformed")
    elif kind == core.FT_CALL:
        if outcome == "malformed":
            assert proto.closed and transport.aborted, "malformed call kept the connection"
        else:
            assert not proto.closed
            assert len(sent) == 1, f"a call answered {len(sent)} times"
            ftype, _flags, _sid, body = sent[0]
            if outcome == "fails":
                assert ftype == core.FT_ERROR
                assert codec.unpackb(body)[0] == malla.exceptions.ERR_UNDECODABLE
            elif ftype == core.FT_REPLY:
                # only Echo.echo answers: its result is the call's args/kwargs
                msg = value
                assert type(msg) is list and msg[0] == "Echo" and msg[1] in ("echo", "aecho")
                back = codec.unpackb(body)
                assert canon(back) == canon([msg[2], msg[3] or {}]), "echo differs"
            else:
                assert ftype == core.FT_ERROR
                code = codec.unpackb(body)[0]
                assert code in (1, 2, 3, 4, 6, 7, 10), code
                if code == 4:
                    # the function ran and raised (bad kwargs) or its result,
                    # the call's own arguments, would not encode: only when
                    # nested too deep
                    err = codec.unpackb(body)
                    assert "EncodeError" not in err[1] or "nested more than" in err[2], err
    else:  # ERROR
        if outcome == "fails":
            # a value this node cannot rebuild: that call only
            assert not proto.closed, "an undecodable error reply closed the connection"
            assert isinstance(fut.exception(), malla.RemoteError)
        elif proto.closed:
            assert outcome != "value" or not _is_error_message(value)
        else:
            assert outcome == "value" and _is_error_message(value)
            assert fut.done() and isinstance(fut.exception(), malla.MallaError)
    proto.connection_lost(None)
    assert fut.done() and proto.in_flight == 0
    fut.exception()      # retrieved: the loop must not report it as lost
    drain(loop)


def _is_error_message(value) -> bool:
    try:
        code, _t, _m, _tb = value[:4]
        int(code)
        return True
    except Exception:
        return False


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    cfg, payload = data[0], data[1:]
    expected = check_codec(payload)
    split = (cfg >> 2) * 7 if cfg & 0x80 else 0     # frames of 7..441 bytes
    check_core(KINDS[cfg & 3], payload, split, expected)
    check_reassembly(payload, cfg * 3, expected)


# -- seeds ------------------------------------------------------------------------------

def seeds() -> dict[str, bytes]:
    """Seed inputs (fuzz/corpus/decode): config byte then a payload."""
    p = codec.packb
    values = {
        "none": None, "bools": [True, False], "ints": [0, -1, 127, -33, 2**63, -2**63, 2**64 - 1],
        "bigint": [2**64, -2**100], "floats": [0.0, -0.0, 1.5, math.inf, -math.inf, math.nan],
        "str": "héllo ✓", "bytes": b"\x00\xff", "bytearray": bytearray(b"ba"),
        "tuple": (1, (2, 3)), "set": {1, "a"}, "frozenset": frozenset({b"x"}),
        "dict-any-keys": {1: "a", (1, 2): None, frozenset({3}): 4, None: [], b"k": 1.0},
        "datetime": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        "datetime-tz": dt.datetime(2001, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5,
                                                                              minutes=-30))),
        "date": dt.date(1, 1, 1), "time": dt.time(12, 0, 0, 1, fold=1),
        "time-tz": dt.time(1, 2, tzinfo=dt.timezone.utc),
        "timedelta": dt.timedelta(days=-1, microseconds=5),
        "decimal": decimal.Decimal("-1.500E+3"), "decimal-nan": decimal.Decimal("sNaN"),
        "uuid": uuid.UUID(int=0x1234), "complex": complex(1, -math.inf),
        "user": FuzzPoint(b"raw"), "nested": [[[[[{"a": [(1,)]}]]]]],
    }
    out: dict[str, bytes] = {}
    for i, (name, v) in enumerate(values.items()):
        out[f"value-{name}"] = bytes([i & 0x7F]) + p(v)
    call = ["Echo", "echo", [1, "a", (2, 3), {4}], {"k": dt.date(2020, 1, 1)}, 1000, None, None]
    out["call-echo"] = bytes([1]) + p(call)
    out["call-echo-split"] = bytes([0x80 | 0x04 | 1]) + p(call)
    out["cast-echo"] = bytes([2]) + p(call)
    out["call-unknown-service"] = bytes([1]) + p(["Nope", "f", [], None, 0, None, None])
    out["call-unknown-fun"] = bytes([1]) + p(["Echo", "nope", [], None, 0, None, None])
    out["call-deadline-spent"] = bytes([1]) + p(["Echo", "echo", [], None, 0, 0, None])
    out["call-bad-kwargs"] = bytes([1]) + p(["Echo", "echo", [], {1: 2}, 0, None, None])
    out["call-short"] = bytes([1]) + p(["Echo", "echo"])
    out["call-aecho"] = bytes([1]) + p(["Echo", "aecho", [b"x"], None, 1000, None, {"m": 1}])
    out["call-with-deadline"] = bytes([1]) + p(["Echo", "echo", [1], None, 1000, 500, None])
    out["call-deadline-float"] = bytes([1]) + p(["Echo", "aecho", [], None, 1000, 2.5, None])
    out["call-deadline-str"] = bytes([1]) + p(["Echo", "echo", [], None, 1000, "5", None])
    out["call-deadline-bigint"] = bytes([1]) + p(["Echo", "echo", [], None, 1000, 2**1100, None])
    out["call-deadline-nan"] = bytes([1]) + p(["Echo", "echo", [], None, 1000, math.nan, None])
    out["call-with-trace"] = bytes([1]) + p(["Echo", "echo", [], None, 1000, None, None, [1, 2]])
    out["error-remote"] = bytes([3]) + p([4, "builtins.ValueError", "bad", "Traceback..."])
    out["error-sna"] = bytes([3]) + p([1, "malla.exceptions.ServiceNotAvailable", "x", None])
    out["error-unknown-code"] = bytes([3]) + p([99, "x.Y", "z", None])
    out["error-bad-code"] = bytes([3]) + p(["a", "b", "c", "d"])
    out["reply-split"] = bytes([0x80 | 0x10]) + p(["x" * 100, list(range(50))])
    out["unregistered-user-type"] = bytes([0]) + msgpack_packb(
        ExtType(64, p(["never.Registered", b""])))
    out["unregistered-in-call"] = bytes([1]) + p(["Echo", "echo", [], None, 0, None, None])[:-1] \
        + msgpack_packb(ExtType(64, p(["never.Registered", b""])))
    out["unknown-ext"] = bytes([0]) + msgpack_packb(ExtType(13, b""))
    out["msgpack-timestamp"] = bytes([0]) + b"\xd6\xff\x00\x00\x00\x01"
    out["truncated"] = bytes([0]) + p(call)[:-5]
    out["extra-data"] = bytes([0]) + p(1) + p(2)
    out["bad-utf8"] = bytes([0]) + b"\xa2\xff\xfe"
    out["deep-list"] = bytes([0]) + b"\x91" * 600 + b"\xc0"
    out["deep-tuple"] = bytes([0]) + p(_deep_tuple(core.MAX_EXT_NESTING - 1))  # (+ the ())
    out["ext-tuple-of-int"] = bytes([0]) + msgpack_packb(ExtType(1, p(5)))
    out["ext-decimal-bad"] = bytes([0]) + msgpack_packb(ExtType(10, b"abc"))
    out["ext-datetime-bad-offset"] = bytes([0]) + msgpack_packb(
        ExtType(6, p([2020, 1, 1, 0, 0, 0, 0, 10**15, 0])))
    out["ext-user-not-bytes"] = bytes([0]) + msgpack_packb(ExtType(64, p(["fuzz.FuzzPoint", 5])))
    out["map-unhashable-key"] = bytes([0]) + b"\x81\x91\x01\x02"
    # nested tuples past what a thread's stack holds (a crash once)
    deep = msgpack_packb(None)
    for _ in range(300):
        deep = msgpack_packb(ExtType(1, b"\x91" + deep))
    out["tuples-300-deep"] = bytes([0]) + deep
    return out


def _deep_tuple(n: int):
    v: object = ()
    for _ in range(n):
        v = (v,)
    return v


if __name__ == "__main__":
    import _target

    _target.main(TestOneInput, seeds)
