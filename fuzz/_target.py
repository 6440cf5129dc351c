"""What the fuzz targets share: writing their seeds, running under atheris,
and a core protocol to feed (a fake transport, a service, one loop).

    if __name__ == "__main__":
        _target.main(TestOneInput, seeds)

Import it after the target's instrumented imports of malla.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

import malla


class FakeTransport:
    """Records what the core writes (no socket: a fuzz input is the peer).
    Also the fake transport of the core's unit tests."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.given: list[Any] = []      # the objects handed over, uncopied
        self.buffered = 0
        self.aborted = False
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def writelines(self, bufs: Any) -> None:
        bufs = list(bufs)
        self.write(b"".join(bytes(b) for b in bufs))      # one system call
        self.given += bufs

    def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "sockname" else default

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def deliver(proto: Any, data: bytes) -> None:
    """Hand `data` to a core Protocol as its transport would: through the
    protocol's own buffer (BufferedProtocol), until all is taken or the
    protocol closes.  Call it inside the loop; buffer_updated must never
    raise (an exception would reach the event loop)."""
    pos = 0
    while pos < len(data) and not proto.closed:
        view = proto.get_buffer(-1)
        n = min(len(view), len(data) - pos)
        assert n > 0
        view[:n] = data[pos:pos + n]
        view.release()
        proto.buffer_updated(n)
        pos += n


class RecordingOwner:
    """What malla.connection.Connection is to the core, recording each call.
    The fuzz targets' owners add their checks; the core's tests use it as is."""

    def __init__(self) -> None:
        self.handshake_frames: list[tuple[int, bytes]] = []
        self.protocol_errors: list[BaseException] = []
        self.connection_errors: list[BaseException] = []
        self.controls: list[int] = []
        self.pongs: list[int] = []
        self.cast_failures: list[tuple[str, str, str]] = []
        self.flow: list[str] = []        # "paused" / "resumed", in order
        self.lost = 0

    def _connection_made(self, proto: Any) -> None:
        pass

    def _on_handshake_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.handshake_frames.append((ftype, payload))

    def _on_control(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.controls.append(ftype)

    def _on_pong(self, sid: int) -> None:
        self.pongs.append(sid)

    def _on_cast_failed(self, service: str, fun: str, kind: str, message: str) -> None:
        self.cast_failures.append((service, fun, kind))

    def _on_connection_error(self, err: BaseException) -> None:
        self.connection_errors.append(err)

    def _on_protocol_error(self, err: BaseException) -> None:
        self.protocol_errors.append(err)

    def _connection_lost(self, exc: BaseException | None) -> None:
        self.lost += 1

    def _writing_paused(self) -> None:
        self.flow.append("paused")

    def _writing_resumed(self) -> None:
        self.flow.append("resumed")


class Echo(malla.Service):
    """Served to incoming CALLs: a plain def (run by the core, or by the
    Python dispatcher when the call has a deadline) and an async def."""

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    async def aecho(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]


_loop: asyncio.AbstractEventLoop | None = None
_loop_errors: list[dict[str, Any]] = []


class LoopError(AssertionError):
    """A callback the core scheduled raised: the input found a bug."""


def _record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _loop_errors.append(context)


def get_loop() -> asyncio.AbstractEventLoop:
    # One loop for the process (a loop per input costs a socketpair); its
    # callbacks are drained after each input.  The exception handler is not
    # silenced: whatever reaches it fails that input (drain raises).
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        _loop.set_exception_handler(_record)
    return _loop


def drain(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks the last input scheduled; LoopError if one raised."""
    loop.call_soon(loop.stop)
    loop.run_forever()
    if _loop_errors:
        errors = [str(c.get("exception") or c.get("message")) for c in _loop_errors]
        _loop_errors.clear()
        raise LoopError(f"exceptions in the loop's callbacks: {errors}")


def write_seeds(seeds: Callable[[], dict[str, bytes]], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds().items():
        assert len(data) < 4096, name
        with open(os.path.join(directory, f"seed-{name}"), "wb") as fh:
            fh.write(data)


def main(test_one_input: Callable[[bytes], None],
         seeds: Callable[[], dict[str, bytes]]) -> None:
    """`--write-seeds DIR`, or fuzz with libFuzzer's command line."""
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(seeds, sys.argv[2])
        return
    import logging

    import atheris

    from malla._ext import core

    logging.disable(logging.CRITICAL)
    print(f"INFO: malla core from {core.__file__}", flush=True)
    # libFuzzer's -merge=1 re-runs argv[0] through the shell: make it a
    # command line that starts this interpreter on this file.
    argv = [f"{sys.executable} {os.path.abspath(sys.argv[0])}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
