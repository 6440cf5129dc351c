"""Values on the wire: malla's msgpack extension types and user types.

The core's encoder handles None, bool, int, float, str, bytes, list, dict,
tuple, set, frozenset and bytearray itself; for anything else it calls
`_default` here, which returns an ExtType (or, for a subclass of a wire
type, the value as its base type).  Decoding is msgpack's C unpackb with
`_ext_hook` below.  Nothing here imports, evals or unpickles wire data: a
user type is found by its registered name in a dict.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import threading
import uuid
from collections.abc import Callable
from typing import Any

from msgpack import ExtType

from malla._ext import core
from malla.exceptions import EncodeError

__all__ = ["bad_value_path", "packb", "register_type", "unpackb"]

_encoders: dict[type, tuple[str, Callable[[Any], bytes]]] = {}
_decoders: dict[str, Callable[[bytes], Any]] = {}

packb = core.packb
unpackb = core.unpackb


def register_type(cls: type, encode: Callable[[Any], bytes],
                  decode: Callable[[bytes], Any], name: str | None = None) -> None:
    """Let values of `cls` travel: `encode(obj) -> bytes`, `decode(bytes) -> obj`.

    The type is identified on the wire by `name` (default: the class's
    qualified name, ``cls.__qualname__``; pass a name to
    tell apart two classes of the same qualified name in different modules),
    so registration order does not matter; register the same on every node.
    """
    if not isinstance(cls, type):
        raise TypeError("register_type needs a class")
    wire_name = name or cls.__qualname__
    _encoders[cls] = (wire_name, encode)
    _decoders[wire_name] = decode


def _offset_us(tz_offset: _dt.timedelta | None) -> int | None:
    if tz_offset is None:
        return None
    return (tz_offset.days * 86400 + tz_offset.seconds) * 1_000_000 + tz_offset.microseconds


def _tz(offset_us: int | None) -> _dt.tzinfo | None:
    if offset_us is None:
        return None
    return _dt.timezone(_dt.timedelta(microseconds=offset_us))


def _ext(code: int, value: Any) -> ExtType:
    return ExtType(code, core.packb(value))


def _default(obj: Any) -> Any:
    t = type(obj)
    user = _encoders.get(t)
    if user is not None:
        wire_name, encode = user
        data = encode(obj)
        if not isinstance(data, (bytes, bytearray)):
            raise EncodeError(f"register_type encoder for {wire_name} returned "
                              f"{type(data).__qualname__}, not bytes")
        return _ext(core.EXT_USER, [wire_name, bytes(data)])
    if t is int:  # beyond 64 bits
        size = (obj.bit_length() + 8) // 8
        return ExtType(core.EXT_BIGINT, obj.to_bytes(size, "big", signed=True))
    if isinstance(obj, _dt.datetime):
        return _ext(core.EXT_DATETIME, [obj.year, obj.month, obj.day, obj.hour, obj.minute,
                                        obj.second, obj.microsecond,
                                        _offset_us(obj.utcoffset()), obj.fold])
    if isinstance(obj, _dt.date):
        return _ext(core.EXT_DATE, [obj.year, obj.month, obj.day])
    if isinstance(obj, _dt.time):
        return _ext(core.EXT_TIME, [obj.hour, obj.minute, obj.second, obj.microsecond,
                                    _offset_us(obj.utcoffset()), obj.fold])
    if isinstance(obj, _dt.timedelta):
        return _ext(core.EXT_TIMEDELTA, [obj.days, obj.seconds, obj.microseconds])
    if isinstance(obj, decimal.Decimal):
        return ExtType(core.EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, uuid.UUID):
        return ExtType(core.EXT_UUID, obj.bytes)
    if isinstance(obj, complex):
        return _ext(core.EXT_COMPLEX, [obj.real, obj.imag])
    return _as_base_type(obj)


# Subclasses of wire types (IntEnum, namedtuple, OrderedDict, ...) travel as
# their base type; the order matters only for bool, which is not subclassable.
_BASES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (int, int.__int__),
    (float, float.__float__),
    (str, str.__str__),
    (bytes, lambda o: bytes(memoryview(o))),
    (bytearray, bytearray),
    (list, list),
    (tuple, tuple),
    (dict, dict),
    (frozenset, frozenset),
    (set, set),
)


def _as_base_type(obj: Any) -> Any:
    for base, convert in _BASES:
        if isinstance(obj, base):
            return convert(obj)
    raise EncodeError(f"cannot encode a {type(obj).__module__}.{type(obj).__qualname__} "
                      "value (register it with malla.register_type)")


def _datetime(v: list[Any]) -> _dt.datetime:
    y, mo, d, h, mi, s, us, off, fold = v
    return _dt.datetime(y, mo, d, h, mi, s, us, tzinfo=_tz(off), fold=fold)


def _time(v: list[Any]) -> _dt.time:
    h, mi, s, us, off, fold = v
    return _dt.time(h, mi, s, us, tzinfo=_tz(off), fold=fold)


def _user(v: list[Any]) -> Any:
    wire_name, data = v
    if type(wire_name) is not str or type(data) is not bytes:
        # docs/protocol.md: [name, bytes]; a decoder only ever gets bytes
        raise ValueError("malformed user-type value (not [str, bytes])")
    decode = _decoders.get(wire_name)
    if decode is None:
        raise EncodeError(f"received a value of unregistered type {wire_name!r}: "
                          "register it with malla.register_type on every node")
    try:
        return decode(data)
    except Exception as exc:
        raise EncodeError(f"the decoder registered for {wire_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from None


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    core.EXT_TUPLE: lambda b: tuple(unpackb(b)),
    core.EXT_SET: lambda b: set(unpackb(b)),
    core.EXT_FROZENSET: lambda b: frozenset(unpackb(b)),
    core.EXT_BYTEARRAY: bytearray,
    core.EXT_BIGINT: lambda b: int.from_bytes(b, "big", signed=True),
    core.EXT_DATETIME: lambda b: _datetime(unpackb(b)),
    core.EXT_DATE: lambda b: _dt.date(*unpackb(b)),
    core.EXT_TIME: lambda b: _time(unpackb(b)),
    core.EXT_TIMEDELTA: lambda b: _dt.timedelta(*unpackb(b)),
    core.EXT_DECIMAL: lambda b: decimal.Decimal(b.decode()),
    core.EXT_UUID: lambda b: uuid.UUID(bytes=b),
    core.EXT_COMPLEX: lambda b: complex(*unpackb(b)),
    core.EXT_USER: lambda b: _user(unpackb(b)),
}


# Each extension value whose data is itself msgpack is decoded by a nested
# msgpack call, and each such call takes ~40 KiB of C stack: 200 nested
# tuples would overflow the thread's stack and kill the process.  The
# encoder refuses values with more than core.MAX_EXT_NESTING nested tuples
# or sets; the decoder refuses more than that (and a leaf extension inside).
_MAX_EXT_DEPTH = core.MAX_EXT_NESTING + 2
_nesting = threading.local()


def _ext_hook(code: int, data: bytes) -> Any:
    decode = _DECODERS.get(code)
    if decode is None:
        # a type of a later version (docs/protocol.md reserves 13-63): that
        # one message fails, the connection stays
        raise EncodeError(f"received a value of unknown extension type {code} "
                          "(sent by a newer malla?)")
    depth = getattr(_nesting, "depth", 0)
    if depth >= _MAX_EXT_DEPTH:
        raise EncodeError(f"received a value with more than {_MAX_EXT_DEPTH} nested "
                          "extension values (tuples, sets...)")
    _nesting.depth = depth + 1
    try:
        return decode(data)
    except EncodeError:
        raise
    except Exception as exc:
        # a registered decoder that raised, or a built-in extension with bad
        # contents: that one message fails, never the connection
        raise EncodeError(f"cannot rebuild a value of extension type {code}: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        _nesting.depth = depth


def bad_value_path(value: Any, root: str = "value") -> str | None:
    """Where in `value` the first unencodable item sits, as a Python path
    (``args[1]['key']``), or None when the whole value encodes."""
    try:
        core.packb(value)
        return None
    except (EncodeError, OverflowError, RecursionError):
        pass
    return _find(value, root, 0)


def _find(value: Any, path: str, depth: int) -> str:
    if depth > 600:
        return path
    if isinstance(value, dict):
        for k, v in value.items():
            for sub, p in ((k, f"{path}<key {k!r}>"), (v, f"{path}[{k!r}]")):
                if _fails(sub):
                    return _find(sub, p, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if _fails(v):
                return _find(v, f"{path}[{i}]", depth + 1)
    elif isinstance(value, (set, frozenset)):
        for v in value:
            if _fails(v):
                return _find(v, f"{path}<item {v!r}>", depth + 1)
    return path


def _fails(value: Any) -> bool:
    try:
        core.packb(value)
        return False
    except Exception:
        return True


core.set_codec(_default, _ext_hook)
