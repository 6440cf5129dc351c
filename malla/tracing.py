"""Optional OpenTelemetry spans (`Node(tracing=True)`; needs opentelemetry-api).

A call made by a tracing node is a CLIENT span "malla.call Service.fun"; its
context travels in the CALL message's trace field (W3C trace context), never
in the user's `meta`; a tracing node serving it opens a SERVER span
"malla.serve Service.fun" under it, and the handler's own calls nest below,
so a chain across nodes, or a call_cb_all fan-out, is one trace.  Sampling
is the TracerProvider's (e.g. ParentBased(TraceIdRatioBased(0.01))): an
unsampled call costs a context lookup and no span.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Tracing"]


class Tracing:
    def __init__(self) -> None:
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

    def carrier(self) -> dict[str, str] | None:
        """The current trace context to send with a call (None: none)."""
        out: dict[str, str] = {}
        self._propagate.inject(out)
        return out or None


def traced_remote(inner: Callable[..., Coroutine[Any, Any, Any]],
                  tracing: Tracing) -> Callable[..., Coroutine[Any, Any, Any]]:
    """`inner` (a node's remote) inside a CLIENT span."""
    from malla.call import service_name

    async def remote(service: Any, fun: str, *args: Any, **kwargs: Any) -> Any:
        with tracing.client_span(service_name(service), fun):
            return await inner(service, fun, *args, **kwargs)

    remote.__doc__ = inner.__doc__
    return remote
