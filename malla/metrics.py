"""A node's counters (`Stats`), optional metrics (latency histograms per
"Service.fun", a call interceptor), and a Prometheus exposition of
node.stats().

Metrics are off by default, and then free: no interceptor is built and
remote() is the caller's own.  With `Node(metrics=True)` (or
`metrics_port=`) the node's remote() is wrapped once, at construction, by
`Metrics.wrap_remote`, which times each call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from malla import exceptions as mexc
from malla._ext import core
from malla.registry import service_name

if TYPE_CHECKING:
    from malla.interfaces import CallFn, StatsSource

__all__ = ["LatencyHistogram", "Metrics", "Stats", "prometheus_collector", "serve_prometheus"]

# The histogram lives in the core: recording is on every call's path.
LatencyHistogram = core.LatencyHistogram
_NONE: dict[str, Any] = {}
T = TypeVar("T")


class Stats:
    """A node's counters, kept off the happy path: only failures, retries
    and failovers touch them; calls are counted by the cores."""

    __slots__ = ("closed_in", "closed_out", "errors", "failovers", "forbidden", "hedges",
                 "local_calls", "retries")

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}
        self.retries = 0
        self.failovers = 0
        # second copies of hedged calls sent (malla.hedging)
        self.hedges = 0
        # calls this node refused by its services' allow= rules (served here)
        self.forbidden = 0
        self.local_calls = 0
        # calls counted by the cores of connections that have closed: the
        # totals never go down when a peer leaves
        self.closed_in = 0
        self.closed_out = 0

    def totals(self, protos: list[Any]) -> dict[str, Any]:
        """The call counters of `node.stats()`, the cores' (`protos`, the
        open connections') added to those of connections that closed."""
        return {
            "calls_in": self.closed_in + sum(p.calls_in for p in protos),
            "calls_out": self.closed_out + sum(p.calls_out for p in protos) + self.local_calls,
            "errors": dict(self.errors),
            "retries": self.retries,
            "failovers": self.failovers,
            "hedges": self.hedges,
            "forbidden": self.forbidden,
            "in_flight": sum(p.in_flight for p in protos if not p.closed),
        }

    def error(self, exc: BaseException) -> None:
        # (a remote builtin's RemoteError subclass counts as RemoteError)
        self.count(mexc.RemoteError.__name__ if isinstance(exc, mexc.RemoteError)
                   else type(exc).__name__)

    def count(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n


class Metrics:
    """Latency per (service, function) of the calls a node makes; a call
    interceptor (malla.interfaces.CallInterceptor)."""

    def __init__(self) -> None:
        # service -> function -> histogram: two lookups, no key to build
        self.latency: dict[str, dict[str, Any]] = {}

    def histogram(self, service: str, fun: str) -> Any:
        funs = self.latency.get(service)
        if funs is None:
            funs = self.latency[service] = {}
        hist = funs.get(fun)
        if hist is None:
            hist = funs[fun] = LatencyHistogram()
        return hist

    def record(self, service: str, fun: str, ns: int) -> None:
        hist = self.latency.get(service, _NONE).get(fun) or self.histogram(service, fun)
        hist.record_ns(ns)

    def wrap_remote(self, remote: CallFn) -> CallFn:
        """`remote`, timed: every call that names a service and an exported
        function is recorded, whatever its outcome -- but not one refused
        for its options (as before the call was made: the caller's mistake
        must not grow the label set)."""
        record = self.record
        clock = time.perf_counter_ns

        async def timed_remote(service: Any, fun: str, *args: Any, **kwargs: Any) -> Any:
            name = service if type(service) is str else service_name(service)
            if type(fun) is not str or fun[:1] == "_":
                # (nothing to file it under: remote() refuses it)
                return await remote(service, fun, *args, **kwargs)
            started = clock()
            try:
                result = await remote(name, fun, *args, **kwargs)
            except mexc.InvalidOption:
                raise                   # refused before it was made: not timed
            except BaseException:
                record(name, fun, clock() - started)
                raise
            record(name, fun, clock() - started)
            return result

        timed_remote.__doc__ = remote.__doc__
        return timed_remote

    def wrap_call_cb_all(self, call_cb_all: CallFn) -> CallFn:
        # a fan-out is not one call's latency: not timed
        return call_cb_all

    def histograms(self) -> dict[str, Any]:
        """"Service.fun" -> its LatencyHistogram (not copies: for reading)."""
        return {f"{s}.{f}": h for s, funs in sorted(self.latency.items())
                for f, h in sorted(funs.items())}

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {f"{s}.{f}": {"count": h.count, "p50_us": h.percentile_us(0.5),
                             "p99_us": h.percentile_us(0.99)}
                for s, funs in sorted(self.latency.items()) for f, h in sorted(funs.items())}


# Histogram bounds: powers of two of microseconds, 16 µs to about 67 s (bucket
# boundaries of the core histogram: each `le` count is exact, bound included).
_BOUNDS_US = [1 << k for k in range(4, 27)]


def _le(bound_us: int) -> str:
    return repr(bound_us / 1e6)


def _snapshot(node: StatsSource) -> tuple[dict[str, Any], int, list[tuple[str, list[Any], float]]]:
    """What the exposition shows, read at one moment (on the node's loop)."""
    latency = []
    metrics = node._metrics
    for call, h in (metrics.histograms() if metrics is not None else {}).items():
        buckets: list[Any] = [(_le(bound), h.count_below_us(bound)) for bound in _BOUNDS_US]
        buckets.append(("+Inf", h.count))
        latency.append((call, buckets, h.sum_ns / 1e9))
    return node.stats(), len(node.peers()), latency


def _on_loop(node: StatsSource, fn: Callable[[], T]) -> T:
    """`fn()` on the node's loop thread (directly when already there)."""
    loop = node._loop
    if loop is None or not loop.is_running():
        return fn()
    try:
        if asyncio.get_running_loop() is loop:
            return fn()
    except RuntimeError:    # no loop in this thread
        pass

    async def run() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(run(), loop).result(10)


def prometheus_collector(node: StatsSource) -> Any:
    """A prometheus_client collector exposing node.stats() (needs the
    `metrics` extra: pip install malla[metrics])."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    class NodeCollector:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Any:
            # prometheus_client calls this from its HTTP thread: the node's
            # state is read on the node's own loop, in one consistent snapshot
            stats, peer_count, latency = _on_loop(node, lambda: _snapshot(node))
            labels = ["node"]
            for key, help_text in (("calls_in", "calls received"),
                                   ("calls_out", "calls made"),
                                   ("retries", "retry rounds"),
                                   ("failovers", "moves to the next node"),
                                   ("hedges", "second copies of hedged calls sent"),
                                   ("retries_throttled", "retries refused by the retry budget"),
                                   ("forbidden", "calls refused here by allow= rules"),
                                   ("handshakes_refused", "connections closed unread: "
                                    "max_pending_handshakes were in their handshake"),
                                   ("handshakes_throttled", "connections closed at once: "
                                    "their address keeps failing the handshake"),
                                   ("handshakes_failed", "accepted connections whose "
                                    "handshake failed or timed out")):
                c = CounterMetricFamily(f"malla_{key}", help_text, labels=labels)
                c.add_metric([node.name], stats[key])
                yield c
            errors = CounterMetricFamily("malla_errors", "errors raised to callers",
                                         labels=["node", "kind"])
            for kind, n in sorted(stats["errors"].items()):
                errors.add_metric([node.name, kind], n)
            yield errors
            g = GaugeMetricFamily("malla_in_flight", "calls awaiting a reply", labels=labels)
            g.add_metric([node.name], stats["in_flight"])
            yield g
            peers = GaugeMetricFamily("malla_peers", "connected peers", labels=labels)
            peers.add_metric([node.name], peer_count)
            yield peers
            ejected = GaugeMetricFamily("malla_ejected", "nodes ejected as outliers now, "
                                        "per service", labels=["node", "service"])
            for service, names in sorted(stats["ejected"].items()):
                ejected.add_metric([node.name, service], len(names))
            yield ejected
            pending = GaugeMetricFamily("malla_handshakes_pending", "accepted connections "
                                        "in their handshake now", labels=labels)
            pending.add_metric([node.name], stats["handshakes_pending"])
            yield pending
            # a histogram with real bucket counts (its bounds are the core
            # histogram's own octave boundaries, so each count is exact) and
            # the real sum of the durations
            lat = HistogramMetricFamily("malla_call_duration_seconds", "duration of calls made",
                                        labels=["node", "call"])
            for call, buckets, total_s in latency:
                lat.add_metric([node.name, call], buckets=buckets, sum_value=total_s)
            yield lat

    return NodeCollector()


def serve_prometheus(node: StatsSource, port: int, host: str = "127.0.0.1") -> Any:
    """Serve /metrics for `node` on host:port (a prometheus_client thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(prometheus_collector(node))
    result = start_http_server(port, addr=host, registry=registry)
    return result
