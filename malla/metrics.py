"""Optional metrics: latency histograms per "Service.fun", and a Prometheus
exposition of node.stats().

Off by default, and then free: the node's remote() is the plain one.  With
`Node(metrics=True)` (or `metrics_port=`) the node's remote() is replaced by
a timed one for that node only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from malla.node import Node

__all__ = ["LatencyHistogram", "Metrics", "prometheus_collector", "serve_prometheus"]

# Four buckets per power of two of microseconds: about 19% relative error.
_SUB = 4


class LatencyHistogram:
    """A log-scale histogram of durations, constant memory."""

    __slots__ = ("count", "counts")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0

    def record_ns(self, ns: int) -> None:
        us = max(ns // 1000, 1)
        octave = us.bit_length() - 1
        sub = (us >> max(octave - 2, 0)) & 3 if octave >= 2 else us & 3
        index = octave * _SUB + sub
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1

    @staticmethod
    def _upper_us(index: int) -> float:
        octave, sub = divmod(index, _SUB)
        if octave < 2:
            return float(2 ** octave + sub + 1)
        step = 2 ** (octave - 2)
        return float(2 ** octave + (sub + 1) * step) if sub < 3 else float(2 ** (octave + 1))

    def percentile_us(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return self._upper_us(index)
        return self._upper_us(max(self.counts))


class Metrics:
    """Latency per (service, function) of the calls a node makes."""

    def __init__(self) -> None:
        self.latency: dict[tuple[str, str], LatencyHistogram] = {}

    def record(self, service: str, fun: str, ns: int) -> None:
        hist = self.latency.get((service, fun))
        if hist is None:
            hist = self.latency[(service, fun)] = LatencyHistogram()
        hist.record_ns(ns)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {f"{s}.{f}": {"count": h.count, "p50_us": h.percentile_us(0.5),
                             "p99_us": h.percentile_us(0.99)}
                for (s, f), h in sorted(self.latency.items())}


Remote = Callable[..., Coroutine[Any, Any, Any]]


def timed_remote(inner: Remote, metrics: Metrics) -> Remote:
    """`inner` (a node's remote), recording each call's latency."""
    from malla.call import service_name

    async def remote(service: Any, fun: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return await inner(service, fun, *args, **kwargs)
        finally:
            metrics.record(service_name(service), fun, time.perf_counter_ns() - started)

    remote.__doc__ = inner.__doc__
    return remote


def prometheus_collector(node: Node) -> Any:
    """A prometheus_client collector exposing node.stats() (needs the
    `metrics` extra: pip install malla[metrics])."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )

    class NodeCollector:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Any:
            stats = node.stats()
            labels = ["node"]
            for key, help_text in (("calls_in", "calls received"),
                                   ("calls_out", "calls made"),
                                   ("retries", "retry rounds"),
                                   ("failovers", "moves to the next node")):
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
            peers.add_metric([node.name], len(node.peers()))
            yield peers
            lat = SummaryMetricFamily("malla_call_latency_seconds", "latency of calls made",
                                      labels=["node", "call"])
            for call, h in sorted(stats["latency"].items()):
                lat.add_metric([node.name, call], count_value=h["count"],
                               sum_value=h["p50_us"] * h["count"] / 1e6)
            yield lat

    return NodeCollector()


def serve_prometheus(node: Node, port: int, host: str = "127.0.0.1") -> Any:
    """Serve /metrics for `node` on host:port (a prometheus_client thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(prometheus_collector(node))
    result = start_http_server(port, addr=host, registry=registry)
    return result
