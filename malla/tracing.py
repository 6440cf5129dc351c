"""Optional OpenTelemetry spans (`Node(tracing=True)`; needs opentelemetry-api),
named and attributed as OpenTelemetry's RPC semantic conventions say.

A call made by a tracing node is a CLIENT span "Service/fun" (the
convention's `{rpc.method}`); its context travels in the CALL message's
trace field (W3C trace context), never in the user's `meta`; a tracing node
serving it opens a SERVER span "Service/fun" under it, and the handler's
own calls nest below, so a chain across nodes, or a call_cb_all fan-out, is
one trace.  A failed call, or a handler that raised, ends its span with
status ERROR, the exception recorded (an "exception" event) and
`error.type`.  Sampling: `Node(tracing=0.01)` starts a trace for 1% of the
calls made outside any trace (calls inside a traced handler are always
followed), and the TracerProvider's own sampler applies on top.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla.handshake import CAP_TRACE
from malla.registry import service_name

if TYPE_CHECKING:
    from malla.interfaces import CallFn

__all__ = ["HEDGED", "Tracing", "error_type", "note_hedge"]

# The attribute names of the semantic conventions (opentelemetry-semantic-
# conventions 0.66b2, schema 1.40+), written out rather than imported: that
# package is not a dependency of opentelemetry-api, and its RPC names live in
# a private `_incubating` module; tests/test_tracing.py checks each one
# against the installed package's constant.
RPC_SYSTEM_NAME = "rpc.system.name"
RPC_METHOD = "rpc.method"              # "Service/fun", fully qualified
# (the names of the conventions up to 1.37, still read by many backends;
# rpc.method's old meaning, the bare function, is not kept: it clashes)
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
NETWORK_PEER_ADDRESS = "network.peer.address"
NETWORK_PEER_PORT = "network.peer.port"
ERROR_TYPE = "error.type"
# malla's own: the call sent a second copy to another node (malla.hedging)
HEDGED = "malla.hedged"
# the name of the malla node an attempt went to (the conventions have none)
MALLA_NODE = "malla.node"
# no registered value for malla: its own name, as the conventions allow
SYSTEM = "malla"

# The CLIENT span of the remote() in progress in this context, which each
# attempt tells the node it went to (None in a call_cb_all fan-out: one span
# for many nodes names none of them)
_CALL_SPAN: ContextVar[Any] = ContextVar("malla_call_span", default=None)
# The SERVER span of the call this task serves
_SERVED_SPAN: ContextVar[Any] = ContextVar("malla_served_span", default=None)


_REMOTE_ERROR = f"{mexc.RemoteError.__module__}.{mexc.RemoteError.__qualname__}"


def error_type(exc: BaseException) -> str:
    """`error.type` for an exception: its fully qualified class name
    ("builtins.ValueError", "malla.exceptions.CallTimeout"); a remote
    builtin's RemoteError subclass is "malla.exceptions.RemoteError", one
    class for every handler's failure (what the handler raised is in the
    exception event's message)."""
    if isinstance(exc, mexc.RemoteError):
        return _REMOTE_ERROR
    return mexc.type_name(exc)


def _peer_address(transport: Any) -> tuple[str, int] | None:
    # (host, port) of the other end of a TCP connection, or None
    peer = transport.get_extra_info("peername") if transport is not None else None
    return (str(peer[0]), int(peer[1])) if peer and len(peer) >= 2 else None


def _name_server(span: Any, conn: Any) -> None:
    # the node `conn` leads to, on a CLIENT span: server.address is the
    # node's advertised address (what its peers dial), its socket's other
    # end when it has none; malla.node its name
    span.set_attribute(MALLA_NODE, conn.name)
    listen = conn.peer.listen
    peer = _peer_address(conn.proto.transport)
    server = listen if listen is not None else peer
    if server is not None:
        span.set_attribute(SERVER_ADDRESS, server[0])
        span.set_attribute(SERVER_PORT, server[1])
    if peer is not None:
        span.set_attribute(NETWORK_PEER_ADDRESS, peer[0])
        span.set_attribute(NETWORK_PEER_PORT, peer[1])


def note_hedge(winner: Any) -> None:
    """The remote() in progress in this context sent a hedge (malla.hedging):
    its span says so (`malla.hedged`), and names the node whose reply won
    (`winner`: its connection; None in-process or when no copy answered),
    not the last one an attempt went to.  Nothing without a recording span."""
    span = _CALL_SPAN.get()
    if span is None or not span.is_recording():
        return
    span.set_attribute(HEDGED, True)
    if winner is not None:
        _name_server(span, winner)


class Tracing:
    """`rate`: the share of calls that start a trace (1.0: all).  A call made
    inside a recorded span (a handler serving a traced call) is always
    traced, so a trace is never cut; an untraced call costs a lookup of the
    current span and a random number, and sends no trace context.

    A call interceptor (malla.interfaces.CallInterceptor): remote() and
    call_cb_all() of a tracing node run inside a CLIENT span; the caller
    sends `carrier(conn)` with each CALL; a served call runs in a SERVER
    span (malla.service), which `handler_raised` marks failed."""

    def __init__(self, rate: float = 1.0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("tracing rate must be between 0 and 1")
        self.rate = rate
        try:
            from opentelemetry import propagate, trace
            from opentelemetry.trace import Status, StatusCode
        except ImportError as exc:
            raise ImportError("Node(tracing=True) needs OpenTelemetry: "
                              "pip install malla[tracing]") from exc
        self._trace = trace
        self._propagate = propagate
        self._status, self._status_error = Status, StatusCode.ERROR
        self._tracer = trace.get_tracer("malla")

    @staticmethod
    def _attributes(service: str, fun: str) -> dict[str, str]:
        return {RPC_SYSTEM_NAME: SYSTEM, RPC_METHOD: f"{service}/{fun}",
                RPC_SYSTEM: SYSTEM, RPC_SERVICE: service}

    @contextmanager
    def client_span(self, service: str, fun: str, *, one_node: bool = True) -> Iterator[Any]:
        """A CLIENT span around a call (`one_node`: remote(), whose attempts
        name the node called; False: a fan-out).  An exception leaving it
        sets error.type; the SDK records it and sets the status ERROR."""
        with self._tracer.start_as_current_span(
                f"{service}/{fun}", kind=self._trace.SpanKind.CLIENT,
                attributes=self._attributes(service, fun)) as span:
            token = _CALL_SPAN.set(span if one_node else None)
            try:
                yield span
            except Exception as exc:
                # (an asyncio.CancelledError is no error of the call: the
                # SDK leaves the status unset for it, and so does this)
                span.set_attribute(ERROR_TYPE, error_type(exc))
                raise
            finally:
                _CALL_SPAN.reset(token)

    @contextmanager
    def server_span(self, service: str, fun: str, carrier: Any,
                    transport: Any = None) -> Iterator[Any]:
        """A SERVER span for a served call that came with a trace context;
        `transport` is the caller's connection (for network.peer.*)."""
        ctx = self._propagate.extract(carrier if isinstance(carrier, dict) else {})
        attributes: dict[str, Any] = self._attributes(service, fun)
        peer = _peer_address(transport)
        if peer is not None:
            attributes[NETWORK_PEER_ADDRESS], attributes[NETWORK_PEER_PORT] = peer
        with self._tracer.start_as_current_span(
                f"{service}/{fun}", context=ctx, kind=self._trace.SpanKind.SERVER,
                attributes=attributes) as span:
            token = _SERVED_SPAN.set(span)
            try:
                yield span
            finally:
                _SERVED_SPAN.reset(token)

    def handler_raised(self, exc: BaseException) -> None:
        """The handler of the call served in this context raised `exc` (which
        becomes the caller's RemoteError, so it never reaches the span's
        `with`): status ERROR, the exception event, error.type."""
        span = _SERVED_SPAN.get()
        if span is None or not span.is_recording():
            return
        span.record_exception(exc)
        # (the description as the SDK writes it for an exception it records)
        span.set_status(self._status(self._status_error, f"{type(exc).__name__}: {exc}"))
        span.set_attribute(ERROR_TYPE, error_type(exc))

    def wanted(self) -> bool:
        """Whether the call about to be made gets a span."""
        if self.rate >= 1.0 or self._trace.get_current_span().is_recording():
            return True
        return random.random() < self.rate

    def carrier(self, conn: Any) -> dict[str, str] | None:
        """What an attempt on `conn` sends: the current trace context (None:
        none, or a peer that does not read it).  A remote()'s span learns
        here the node the attempt went to (after a failover: the last)."""
        span = _CALL_SPAN.get()
        if span is not None and span.is_recording():
            _name_server(span, conn)
        if not conn.peer.caps & CAP_TRACE:
            return None
        if not self._trace.get_current_span().get_span_context().is_valid:
            return None
        out: dict[str, str] = {}
        self._propagate.inject(out)
        return out or None

    def here(self, name: str) -> None:
        """An attempt of the remote() in progress runs in-process, on node
        `name`: its span names it (`malla.node`; no server address, no
        network)."""
        span = _CALL_SPAN.get()
        if span is not None and span.is_recording():
            span.set_attribute(MALLA_NODE, name)

    def _wrap(self, remote: CallFn, one_node: bool) -> CallFn:
        wanted, client_span = self.wanted, self.client_span

        async def traced(service: Any, fun: str, *args: Any, **kwargs: Any) -> Any:
            if not wanted():
                return await remote(service, fun, *args, **kwargs)
            with client_span(service_name(service), fun, one_node=one_node):
                return await remote(service, fun, *args, **kwargs)

        traced.__doc__ = remote.__doc__
        return traced

    def wrap_remote(self, remote: CallFn) -> CallFn:
        """`remote` inside a CLIENT span, for the calls `wanted()`."""
        return self._wrap(remote, True)

    def wrap_call_cb_all(self, call_cb_all: CallFn) -> CallFn:
        """A fan-out is one CLIENT span too, its calls' contexts sent under it."""
        return self._wrap(call_cb_all, False)
