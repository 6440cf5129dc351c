"""node.stats(), latency histograms, and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import socket
import types
import urllib.request

import pytest
from support import seed_of, with_nodes

import malla
from malla.metrics import LatencyHistogram


class Calc(malla.Service, global_=True):
    def add(self, a, b):
        return a + b

    def fail(self):
        raise ValueError("no")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_histogram_percentiles():
    h = LatencyHistogram()
    for us in range(1, 1001):
        h.record_ns(us * 1000)
    assert h.count == 1000
    assert 400 <= h.percentile_us(0.5) <= 640         # within one bucket of 500
    assert 900 <= h.percentile_us(0.99) <= 1280
    assert LatencyHistogram().percentile_us(0.5) == 0.0


def test_stats_count_calls_errors_retries_failovers_and_latency():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc)
        b = await make("b", seeds=[seed_of(a)], metrics=True).start()
        assert await b.wait_for_services(["Calc"], retries=5)
        for i in range(20):
            assert await b.remote("Calc", "add", [i, 1]) == i + 1
        with pytest.raises(malla.RemoteError):
            await b.remote("Calc", "fail", excp_retries=1, retries_sleep_msec=1)
        with pytest.raises(malla.ServiceNotAvailable):
            await b.remote("Nobody", "f", sna_retries=2, retries_sleep_msec=1)
        stats = b.stats()
        assert stats["calls_out"] == 22
        assert a.stats()["calls_in"] == 22
        assert stats["errors"] == {"RemoteError": 1, "ServiceNotAvailable": 1}
        assert stats["retries"] == 3
        assert stats["in_flight"] == 0
        assert stats["latency"]["Calc.add"]["count"] == 20
        assert 0 < stats["latency"]["Calc.add"]["p50_us"] <= \
            stats["latency"]["Calc.add"]["p99_us"]
        assert a.stats()["latency"] == {}             # metrics off: nothing recorded
        # refused for its options before it was made: not timed, no new label
        for bad in ({"timeout": -1}, {"bogus": 1}):
            with pytest.raises(malla.InvalidOption):
                await b.remote("Made", "up", **bad)
        with pytest.raises(malla.UnknownFunction):
            await b.remote("Calc", "_private")
        assert set(b.stats()["latency"]) == {"Calc.add", "Calc.fail", "Nobody.f"}
        # a timeout beyond 32 bits of ms takes the common path too
        assert await b.remote("Calc", "add", [2, 2], timeout=3_000_000_000) == 4
        # in-process, keyword arguments in any mapping, as ** takes them
        assert await a.remote("Calc", "add", [1], types.MappingProxyType({"b": 2})) == 3
        # failovers: the first node refuses (paused), the call moves on
        c = await make("c", seeds=[seed_of(a)]).start()
        await c.start_service(Calc)
        await asyncio.sleep(0.3)
        first = b.get_nodes("Calc")[0]
        node = a if first == "a" else c
        node._hosting.entries["Calc"].paused = True    # refuses without announcing
        assert await b.remote("Calc", "add", [1, 1]) == 2
        assert b.stats()["failovers"] == 1

    with_nodes(main)


def test_prometheus_endpoint():
    port = free_port()

    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc)
        b = await make("b", seeds=[seed_of(a)], metrics_port=port).start()
        assert await b.wait_for_services(["Calc"], retries=5)
        await b.remote("Calc", "add", [1, 2])
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        assert 'malla_calls_out_total{node="b"} 1.0' in body
        assert 'malla_peers{node="b"} 1.0' in body
        assert 'malla_call_latency_seconds_count{call="Calc.add",node="b"} 1.0' in body
        # read by Prometheus's own parser: a histogram with real buckets and sum
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(body)}
        latency = families["malla_call_latency_seconds"]
        assert latency.type == "histogram"
        samples = {(s.name, s.labels.get("le")): s.value for s in latency.samples}
        hist = b._metrics.histograms()["Calc.add"]
        assert samples[("malla_call_latency_seconds_sum", None)] == hist.sum_ns / 1e9 > 0
        assert samples[("malla_call_latency_seconds_bucket", "+Inf")] == 1.0
        counts = [v for (name, le), v in sorted(
            ((k, v) for k, v in samples.items() if k[0].endswith("_bucket") and k[1] != "+Inf"),
            key=lambda kv: float(kv[0][1]))]
        assert counts == sorted(counts) and counts[-1] == 1.0      # cumulative
        assert families["malla_calls_out"].type == "counter"

    with_nodes(main)
