"""Optional metrics: latency histograms per "Service.fun", and a Prometheus
exposition of node.stats().

Off by default, and then free: remote() tests one attribute.  With
`Node(metrics=True)` (or `metrics_port=`) remote() times each call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from malla._ext import core

if TYPE_CHECKING:
    from malla.node import Node

__all__ = ["LatencyHistogram", "Metrics", "prometheus_collector", "serve_prometheus"]

# The histogram lives in the core: recording is on every call's path.
LatencyHistogram = core.LatencyHistogram
_NONE: dict[str, Any] = {}


class Metrics:
    """Latency per (service, function) of the calls a node makes."""

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

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {f"{s}.{f}": {"count": h.count, "p50_us": h.percentile_us(0.5),
                             "p99_us": h.percentile_us(0.99)}
                for s, funs in sorted(self.latency.items()) for f, h in sorted(funs.items())}


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
