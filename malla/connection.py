"""One peer connection: the owner of a core Protocol.

It runs the handshake (malla.handshake) over the core's frames, hands the
authenticated connection to its host (the cluster, malla.cluster) for
admission, decodes control messages (TABLE, ANNOUNCE, PEERS, GOODBYE) for
it, answers pings, and reports the connection's end.  Calls never pass through here: they go from
the call API straight to the core.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgpack

from malla import exceptions as mexc
from malla._ext import core
from malla.handshake import CAP_WINDOW, RETRY_AFTER, Handshake, Hello, error_payload
from malla.tls import name_verifier

if TYPE_CHECKING:
    from malla.interfaces import ConnectionHost

__all__ = ["Connection"]

log = logging.getLogger("malla.connection")


def plain_unpackb(payload: bytes) -> Any:
    """A control message as plain msgpack: extension values stay ExtType."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


class Connection:
    """A connection to one peer, from TCP connect to close."""

    __slots__ = (
        "__weakref__",
        "_early",
        "_hs_timer",
        "_writable",
        "admitted",
        "closed",
        "dialer",
        "handshake",
        "host",
        "peer",
        "pending_key",
        "proto",
        "ready",
        "target",
    )

    def __init__(self, host: ConnectionHost, dialer: bool, target: str | None = None,
                 pending_key: int | None = None) -> None:
        self.host = host
        self.dialer = dialer
        self.target = target
        # an accepted one's in host.pending, counted there from accept (by
        # malla.acceptor, which refused it if it had to) to its handshake's end
        self.pending_key = pending_key
        self.proto: Any = None
        self.handshake: Handshake | None = None
        self.peer: Hello | None = None
        loop = asyncio.get_running_loop()
        # Resolves with the connection that serves this peer once admitted
        # (this one, or the one a simultaneous dial kept).
        self.ready: asyncio.Future[Connection] = loop.create_future()
        self.admitted = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self._early: list[tuple[int, bytes]] = []
        self._hs_timer: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def __repr__(self) -> str:
        who = self.peer.name if self.peer else self.target or self._peer_host()
        return f"<malla.Connection {'to' if self.dialer else 'from'} {who}>"

    @property
    def name(self) -> str | None:
        return self.peer.name if self.peer else None

    # -- called by the core -------------------------------------------------

    def _connection_made(self, proto: Any) -> None:
        self.proto = proto
        sockname = proto.transport.get_extra_info("sockname")
        verify = (name_verifier(proto.transport, "dialler" if not self.dialer else "acceptor")
                  if self.host.config.identity == "tls" else None)
        self.handshake = Handshake(self.dialer, self.host.hello(sockname), self.host.cookie,
                                   verify)
        self._hs_timer = asyncio.get_running_loop().call_later(
            self.host.config.handshake_timeout, self._handshake_timed_out)
        self._send(self.handshake.start())

    def _on_handshake_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        assert self.handshake is not None
        try:
            out = self.handshake.receive(ftype, payload)
        except mexc.MallaError as exc:
            if ftype != core.FT_ERROR:
                self.proto.send_frame(core.FT_ERROR, 0, 0, error_payload(exc))
            self._refuse(exc)
            return
        self._send(out)
        if self.handshake.done:
            self._handshake_done()

    def _on_control(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if not self.admitted:
            self._early.append((ftype, payload))
            return
        self._apply_control(ftype, payload)

    def _on_cast_failed(self, service: str, fun: str, kind: str, message: str) -> None:
        self.host.cast_failed(service, fun, kind, f"{message} (cast from {self.name})")

    def _on_connection_error(self, err: mexc.MallaError) -> None:
        if isinstance(err, mexc.ProtocolError) and "duplicate" in str(err):
            log.warning("malla: %s refused us: %s", self, err)
        self._fail_ready(err)

    def _on_protocol_error(self, err: mexc.ProtocolError) -> None:
        if not self.dialer and (self.handshake is None or not self.handshake.done):
            self.host.throttle.failed(self._peer_host())
            self.host.pending.warn("malla: closing %s: %s", self, err)
        else:
            log.warning("malla: closing %s: %s", self, err)
        self._fail_ready(err)

    def _writing_paused(self) -> None:
        self._writable.clear()

    def _writing_resumed(self) -> None:
        self._writable.set()

    async def wait_writable(self, timeout: float) -> None:
        """Wait until the connection's write buffer drains below its low-water
        mark (flow control); CallTimeout after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._writable.wait(), timeout)
        except asyncio.TimeoutError:
            raise mexc.CallTimeout(f"connection to {self.name} stayed congested "
                                   f"for {timeout:.3f} s", sent=False) from None
        if self.proto is None or self.proto.closed:
            raise mexc.ServiceNotAvailable(f"connection to {self.name} closed")

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self._writable.set()
        self._fail_ready(mexc.ConnectionLost(f"connection to {self.target or self.name} lost "
                                              "during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.host.pending.end(self.pending_key)
        self.host.connection_closed(self)
        # The core's protocol and this one point at each other: a stranger's
        # closed connection (its buffers, tens of KiB) would wait for the
        # cycle collector, which a flood refused cheaply seldom runs.  Only
        # an accepted one whose handshake never completed: no call ran on
        # it, so none reports to its owner later (a cast failing, say), and
        # no dial reads its owner (Cluster._connect does, after the loss)
        if (not self.dialer and self.proto is not None
                and (self.handshake is None or not self.handshake.done)):
            self.proto.owner = None

    # -- handshake --------------------------------------------------------------

    def _send(self, frames: list[tuple[int, bytes]]) -> None:
        for ftype, payload in frames:
            self.proto.send_frame(ftype, 0, 0, payload)

    def _handshake_timed_out(self) -> None:
        self._hs_timer = None
        if self.handshake is not None and not self.handshake.done:
            self._refuse(mexc.ProtocolError(
                f"handshake not completed within {self.host.config.handshake_timeout} s"))

    def _handshake_done(self) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        assert self.handshake is not None
        self.peer = self.handshake.peer
        assert self.peer is not None
        if not self.dialer:
            self.host.throttle.succeeded(self._peer_host())
            self.host.pending.end(self.pending_key)     # authenticated: no longer pending
        self.proto.retry_hints = self.handshake.version >= RETRY_AFTER
        self.proto.set_ready(self.peer.name, self.handshake.max_frame_size,
                             bool(self.handshake.caps & CAP_WINDOW), self.host.config.window_size)
        self.host.admit(self)

    def _peer_host(self) -> str:
        transport = self.proto.transport if self.proto is not None else None
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if peer else "?"

    def _refuse(self, exc: mexc.MallaError) -> None:
        if self.dialer:
            log.warning("malla: refused connection to %s: %s", self.target or self._peer_host(),
                        exc)
        else:
            # (a stranger's: rate-limited, a flood of them must not flood the log)
            self.host.throttle.failed(self._peer_host())
            self.host.pending.warn("malla: refused connection from %s: %s", self._peer_host(),
                                   exc)
        self._fail_ready(exc)
        self.proto.close()

    def _fail_ready(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: a refused background dial is logged, not raised

    # -- after admission --------------------------------------------------------

    def admit(self, serving: Connection) -> None:
        """The cluster admitted the peer; `serving` is the connection it uses."""
        self.admitted = serving is self
        # A dialler is ready once the acceptor has admitted it too (its TABLE
        # comes first), so that connect() raises the acceptor's refusal.
        if not self.ready.done() and not (self.admitted and self.dialer):
            self.ready.set_result(serving)
        if self.admitted:
            early, self._early = self._early, []
            for ftype, payload in early:
                self._apply_control(ftype, payload)

    def dialer_port(self) -> int:
        """The dialling side's port of this TCP connection (both sides know it)."""
        transport = self.proto.transport if self.proto is not None else None
        if transport is None:
            return 0
        addr = transport.get_extra_info("sockname" if self.dialer else "peername")
        return int(addr[1]) if addr else 0

    async def retire(self, idle: float = 0.1, limit: float = 30.0) -> None:
        """Close this redundant connection once no call has been in flight on
        it, either way, for `idle` seconds (or after `limit` seconds): its
        calls finish instead of failing with ConnectionLost."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        quiet_since = loop.time()
        while self.proto is not None and not self.proto.closed and loop.time() < end:
            if self.proto.in_flight or self.proto.running or len(self.proto.streams):
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= idle:
                break
            await asyncio.sleep(0.01)
        self.close()

    def refuse(self, message: str) -> None:
        """Refuse an authenticated peer (a duplicate node name, say)."""
        self.proto.send_message(core.FT_ERROR, mexc.error_body(mexc.ProtocolError(message)))
        self._fail_ready(mexc.ProtocolError(message))
        self.proto.close()

    def _apply_control(self, ftype: int, payload: bytes) -> None:
        if ftype == core.FT_TABLE and not self.ready.done():
            self.ready.set_result(self)
        try:
            # plain msgpack: a service table holds only msgpack's own types,
            # so no decoder (malla's or a user's) runs on it; what does not
            # fit is refused entry by entry (Registry.apply_table)
            body = plain_unpackb(payload) if payload else None
        except Exception as exc:  # malformed msgpack: that connection only
            self.proto.abort()
            log.warning("malla: closing %s after an undecodable control message: %r",
                        self, exc)
            return
        self.host.on_control(self, ftype, body)

    async def ping(self, timeout: float) -> bool:
        """True if the peer answers a HEARTBEAT within `timeout` seconds."""
        if self.proto is None or self.proto.closed:
            return False
        fut = self.proto.ping()     # (waits in the core's pending table)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except (asyncio.TimeoutError, mexc.ConnectionLost):
            return False
        finally:
            self.proto.forget_ping(fut)

    def close(self) -> None:
        if self.proto is not None:
            self.proto.close()

    def abort(self) -> None:
        if self.proto is not None:
            self.proto.abort()
