"""node.stats(), latency histograms, and the Prometheus endpoint, read by
Prometheus's own parser and checked by `promtool check metrics`."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import types
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import require_tool, seed_of, wait_until, with_nodes

import malla
from malla.metrics import LatencyHistogram

NAP_S = 0.01            # what Calc.nap sleeps: a floor under each call's duration


class Calc(malla.Service, global_=True):
    def add(self, a, b):
        return a + b

    def fail(self):
        raise ValueError("no")

    async def nap(self):
        await asyncio.sleep(NAP_S)


class Echo(malla.Service, global_=True):
    def echo(self, x):
        return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_histogram_buckets_hold_their_upper_bound():
    # Prometheus's `le` is "at most": a duration of exactly a bound counts
    # in that bound's bucket, one nanosecond more does not
    h = LatencyHistogram()
    h.record_ns(16_000)
    assert h.count_below_us(16) == 1
    h.record_ns(16_001)
    assert (h.count_below_us(16), h.count_below_us(32), h.count) == (1, 2, 2)
    assert h.sum_ns == 32_001
    h.record_ns(1)                                    # under a microsecond
    assert h.count_below_us(2) == 1
    with pytest.raises(ValueError):
        h.count_below_us(1)                           # finer than the buckets


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
        # (Malla's order, so that the failover below is the first node's)
        b = await make("b", seeds=[seed_of(a)], metrics=True, balance="shuffle").start()
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


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool (Debian's `prometheus`), installed when missing
    (as .ci/run does): the suite needs it, so without it this fails, with
    how to get it."""
    return require_tool("promtool", "prometheus", needed_by="the metrics tests")


def check_metrics(promtool: str, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


async def scrape(port: int) -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def histogram(family, call: str) -> tuple[list[tuple[float, float]], float, float]:
    """([(le, cumulative count)] in the exposition's order, _count, _sum)."""
    samples = [s for s in family.samples if s.labels["call"] == call]
    buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]
    [count] = [s.value for s in samples if s.name.endswith("_count")]
    [total] = [s.value for s in samples if s.name.endswith("_sum")]
    return buckets, count, total


def test_prometheus_endpoint_is_a_valid_exposition_with_a_real_histogram(promtool):
    port = free_port()
    calls = 12

    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc)
        b = await make("b", seeds=[seed_of(a)], metrics_port=port).start()
        assert await b.wait_for_services(["Calc"], retries=5)
        durations = []
        for _ in range(calls):
            started = time.perf_counter()
            await b.remote("Calc", "nap")
            durations.append(time.perf_counter() - started)
        await b.remote("Calc", "add", [1, 2])
        with pytest.raises(malla.RemoteError):
            await b.remote("Calc", "fail")
        body = await scrape(port)
        # Prometheus's own linter: format, HELP/TYPE, names (_total on
        # counters, base units)
        check = check_metrics(promtool, body)
        assert check.returncode == 0, check.stdout + check.stderr
        assert not check.stdout.strip() and not check.stderr.strip()
        # Prometheus's own parser
        fams = families(body)
        for name in ("malla_calls_in", "malla_calls_out", "malla_retries", "malla_failovers",
                     "malla_hedges", "malla_retries_throttled", "malla_errors"):
            assert fams[name].type == "counter"
            assert {s.name for s in fams[name].samples} <= {name + "_total"}
        assert fams["malla_calls_out"].samples[0].value == calls + 2
        assert [(s.labels, s.value) for s in fams["malla_errors"].samples] == \
            [({"node": "b", "kind": "RemoteError"}, 1.0)]
        assert fams["malla_peers"].type == fams["malla_in_flight"].type == "gauge"
        assert fams["malla_ejected"].type == "gauge"
        for name, fam in fams.items():
            assert fam.documentation, f"{name} has no HELP"
            assert f"# HELP {name}" in body and f"# TYPE {name}" in body

        latency = fams["malla_call_duration_seconds"]
        assert latency.type == "histogram"
        assert {s.labels["call"] for s in latency.samples} == {"Calc.nap", "Calc.add",
                                                               "Calc.fail"}
        buckets, count, total = histogram(latency, "Calc.nap")
        bounds = [le for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        counts = [n for _, n in buckets]
        assert counts == sorted(counts)                       # cumulative
        assert counts[-1] == count == calls                   # +Inf is _count
        # each call took at least NAP_S and at most what the test measured
        # around it: so do the buckets and the sum
        for le, n in buckets:
            if le < NAP_S / 2:
                assert n == 0, (le, n)
            if le >= max(durations):
                assert n == calls, (le, n)
        assert calls * NAP_S / 2 <= total <= sum(durations)
        hist = b._metrics.histograms()["Calc.nap"]
        assert total == hist.sum_ns / 1e9                     # the exact sum
        assert histogram(latency, "Calc.add")[1] == 1

    with_nodes(main)


def test_prometheus_counters_never_go_down_when_a_peer_leaves(promtool):
    port = free_port()

    async def main(make):
        b = await make("b", metrics_port=port).start()
        await b.start_service(Calc)
        c = await make("c", seeds=[seed_of(b)]).start()
        await c.start_service(Echo)
        await wait_until(lambda: b.get_nodes("Echo") == ["c"] and c.get_nodes("Calc") == ["b"])
        for i in range(5):
            assert await b.remote("Echo", "echo", [i]) == i       # b -> c
            assert await c.remote("Calc", "add", [i, 2]) == i + 2  # c -> b
        with pytest.raises(malla.RemoteError):
            await b.remote("Calc", "fail")
        before = await scrape(port)
        await c.stop()
        await wait_until(lambda: b.peers() == [])
        after = await scrape(port)
        assert check_metrics(promtool, after).returncode == 0

        def counters(text):
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in families(text).values() if f.type in ("counter", "histogram")
                    for s in f.samples}

        old, new = counters(before), counters(after)
        assert old[("malla_calls_out_total", (("node", "b"),))] == 6
        assert old[("malla_calls_in_total", (("node", "b"),))] == 5
        assert set(old) <= set(new)
        shrunk = {k: (old[k], new[k]) for k in old if new[k] < old[k]}
        assert not shrunk, f"counters went down when c left: {shrunk}"
        # (a gauge may: the peer is gone)
        assert families(before)["malla_peers"].samples[0].value == 1
        assert families(after)["malla_peers"].samples[0].value == 0

    with_nodes(main)


def test_promtool_rejects_a_broken_exposition(promtool):
    # the negative control: the check above does run, and does reject
    unsuffixed = '# HELP malla_calls_out calls made\n# TYPE malla_calls_out counter\n' \
                 'malla_calls_out{node="b"} 6.0\n'
    malformed = '# HELP malla_calls_out_total calls made\n' \
                '# TYPE malla_calls_out_total counter\nmalla_calls_out_total{node="b" 6.0\n'
    for text, why in ((unsuffixed, '"_total" suffix'), (malformed, "parsing error")):
        check = check_metrics(promtool, text)
        assert check.returncode != 0
        assert why in check.stdout + check.stderr


def test_prometheus_counts_refused_throttled_and_failed_handshakes(promtool):
    """The handshake counters of a node flooded on purpose, one of each way
    a stranger's connection ends, read by Prometheus's parser."""
    port = free_port()

    async def stranger(a: malla.Node, source: str, garbage: bool):
        reader, writer = await asyncio.open_connection("127.0.0.1", a.address[1],
                                                       local_addr=(source, 0))
        if garbage:
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
        return reader, writer

    def values(text: str) -> dict[str, float]:
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name.startswith("malla_handshakes")}

    async def main(make):
        a = await make("a", max_pending_handshakes=2, metrics_port=port).start()
        # 5 failures from one address, then it is throttled: the 6th is closed at once
        for i in range(6):
            reader, writer = await stranger(a, "127.0.0.3", garbage=True)
            assert await reader.read() == b""
            writer.close()
            await wait_until(lambda ended=i + 1: a.stats()["handshakes_failed"]
                             + a.stats()["handshakes_throttled"] == ended, timeout=5)
        # 3 idle strangers from another: 2 pending, 1 refused
        idle = [await stranger(a, "127.0.0.2", garbage=False) for _ in range(3)]
        await wait_until(lambda: a.stats()["handshakes_refused"] == 1, timeout=5)
        body = await scrape(port)
        check = check_metrics(promtool, body)
        assert check.returncode == 0, check.stdout + check.stderr
        fams = families(body)
        assert fams["malla_handshakes_pending"].type == "gauge"
        for name in ("refused", "throttled", "failed"):
            assert fams[f"malla_handshakes_{name}"].type == "counter"
        assert values(body) == {"malla_handshakes_pending": 2.0,
                                "malla_handshakes_refused_total": 1.0,
                                "malla_handshakes_throttled_total": 1.0,
                                "malla_handshakes_failed_total": 5.0}
        for _, writer in idle:
            writer.close()

    with_nodes(main)
