"""The floor: the least an RPC over TCP can do in plain Python on uvloop.

Every other system's figures are divided by this one's, so its shape is
fixed and deliberately plain -- neither a strawman nor tuned:

* A frame is a 4-byte big-endian length followed by that many bytes of
  msgpack.
* A request is ``[request_id, method_name, arg]``; a reply is
  ``[request_id, result]``.  The id lets replies be matched to callers, so
  any number of calls can be in flight on one connection.
* Client: one future per call, kept in a dict ``id -> future``; the request is
  ``msgpack.packb``'d and written at once with ONE ``transport.write`` per
  call.  No timers, no tasks, no batching of its own.
* Server: ``data_received`` appends to a bytearray, parses every complete
  frame, ``msgpack.unpackb``'s it, looks the method up and calls it (echo),
  ``msgpack.packb``'s the reply, and writes all replies of that batch with one
  ``transport.write``.

No error handling beyond what the benchmark needs: a real library would add
it, and that is part of what the ratio to the floor shows.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, cast

import msgpack

from bench.procs import HOST

KIND = "async"
UVLOOP = True

_HEADER = struct.Struct(">I")


def _frame(obj: Any) -> bytes:
    """Length-prefix the msgpack encoding of ``obj``."""
    body: bytes = msgpack.packb(obj)
    return _HEADER.pack(len(body)) + body


def _take_frames(buf: bytearray) -> list[Any]:
    """Decode and remove every complete frame at the start of ``buf``."""
    messages = []
    pos = 0
    end = len(buf)
    with memoryview(buf) as view:  # released before ``del`` resizes buf
        while end - pos >= 4:
            (size,) = _HEADER.unpack_from(view, pos)
            if end - pos - 4 < size:
                break  # the rest of this frame has not arrived yet
            messages.append(msgpack.unpackb(view[pos + 4 : pos + 4 + size]))
            pos += 4 + size
    if pos:
        del buf[:pos]  # one shift per batch, not one per frame
    return messages


# ---------------------------------------------------------------- server


def _echo(x: Any) -> Any:
    return x


_METHODS: dict[str, Callable[[Any], Any]] = {"echo": _echo}


class _ServerProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        replies = [
            _frame([request_id, _METHODS[method](arg)])
            for request_id, method, arg in _take_frames(self._buf)
        ]
        if replies and self._transport is not None:
            self._transport.write(b"".join(replies))  # one write per batch


async def serve(ready: Callable[[int], None], params: dict[str, Any]) -> None:
    """Listen on HOST, report the port, serve forever."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_ServerProtocol, HOST, 0)
    ready(server.sockets[0].getsockname()[1])
    await server.serve_forever()


# ---------------------------------------------------------------- client


class FloorConn(asyncio.Protocol):
    """One client connection; ``call`` may be used by any number of tasks."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        for request_id, result in _take_frames(self._buf):
            self._pending.pop(request_id).set_result(result)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("floor connection lost"))
        self._pending.clear()

    def call(self, payload: bytes) -> asyncio.Future[Any]:
        assert self._transport is not None
        fut = self._loop.create_future()
        request_id = self._next_id
        self._next_id += 1
        self._pending[request_id] = fut
        self._transport.write(_frame([request_id, "echo", payload]))  # one write per call
        return fut

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def connect(port: int, params: dict[str, Any]) -> FloorConn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(FloorConn, HOST, port)
    return conn
