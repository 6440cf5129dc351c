"""Test doubles of malla's core, shipped in the package (as asyncpg's
``_testbase``): a fake transport, a recording owner of a core Protocol and
``deliver``, which feeds bytes to a Protocol as its transport would.  The
core's unit tests, the state-machine test and the fuzz targets share them.
No network, no loop of their own: the real-TCP tests are elsewhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FakeTransport", "RecordingOwner", "deliver"]


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
        self.cast_failures: list[tuple[str, str, str]] = []
        self.flow: list[str] = []        # "paused" / "resumed", in order
        self.lost = 0

    def _connection_made(self, proto: Any) -> None:
        pass

    def _on_handshake_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.handshake_frames.append((ftype, payload))

    def _on_control(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.controls.append(ftype)

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
