"""Optional OpenTelemetry spans (`Node(tracing=True)`; needs opentelemetry-api).

A call made by a tracing node is a CLIENT span "malla.call Service.fun"; its
context travels in the CALL message's trace field (W3C trace context), never
in the user's `meta`; a tracing node serving it opens a SERVER span
"malla.serve Service.fun" under it, and the handler's own calls nest below,
so a chain across nodes, or a call_cb_all fan-out, is one trace.  Sampling:
`Node(tracing=0.01)` starts a trace for 1% of the calls made outside any
trace (calls inside a traced handler are always followed), and the
TracerProvider's own sampler applies on top.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from malla.registry import service_name

if TYPE_CHECKING:
    from malla.interfaces import CallFn

__all__ = ["Tracing"]


class Tracing:
    """`rate`: the share of calls that start a trace (1.0: all).  A call made
    inside a recorded span (a handler serving a traced call) is always
    traced, so a trace is never cut; an untraced call costs a lookup of the
    current span and a random number, and sends no trace context.

    A call interceptor (malla.interfaces.CallInterceptor): remote() and
    call_cb_all() of a tracing node run inside a CLIENT span; the caller
    sends `carrier()` with each CALL; a served call runs in a SERVER span
    (malla.service)."""

    def __init__(self, rate: float = 1.0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("tracing rate must be between 0 and 1")
        self.rate = rate
        try:
            from opentelemetry import propagate, trace
        except ImportError as exc:
            raise ImportError("Node(tracing=True) needs OpenTelemetry: "
                              "pip install malla[tracing]") from exc
        self._trace = trace
        self._propagate = propagate
        self._tracer = trace.get_tracer("malla")

    @contextmanager
    def client_span(self, service: str, fun: str) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
                f"malla.call {service}.{fun}", kind=self._trace.SpanKind.CLIENT,
                attributes={"rpc.system": "malla", "rpc.service": service,
                            "rpc.method": fun}) as span:
            yield span

    @contextmanager
    def server_span(self, service: str, fun: str, carrier: Any) -> Iterator[Any]:
        ctx = self._propagate.extract(carrier if isinstance(carrier, dict) else {})
        with self._tracer.start_as_current_span(
                f"malla.serve {service}.{fun}", context=ctx,
                kind=self._trace.SpanKind.SERVER,
                attributes={"rpc.system": "malla", "rpc.service": service,
                            "rpc.method": fun}) as span:
            yield span

    def wanted(self) -> bool:
        """Whether the call about to be made gets a span."""
        if self.rate >= 1.0 or self._trace.get_current_span().is_recording():
            return True
        return random.random() < self.rate

    def carrier(self) -> dict[str, str] | None:
        """The current trace context to send with a call (None: none)."""
        if not self._trace.get_current_span().get_span_context().is_valid:
            return None
        out: dict[str, str] = {}
        self._propagate.inject(out)
        return out or None

    def wrap_remote(self, remote: CallFn) -> CallFn:
        """`remote` (or call_cb_all) inside a CLIENT span, for the calls
        `wanted()`."""
        wanted, client_span = self.wanted, self.client_span

        async def traced(service: Any, fun: str, *args: Any, **kwargs: Any) -> Any:
            if not wanted():
                return await remote(service, fun, *args, **kwargs)
            with client_span(service_name(service), fun):
                return await remote(service, fun, *args, **kwargs)

        traced.__doc__ = remote.__doc__
        return traced

    # a fan-out is one span too, its calls' contexts sent under it
    wrap_call_cb_all = wrap_remote
