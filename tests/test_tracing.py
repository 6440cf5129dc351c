"""OpenTelemetry: a call chain across three nodes, and a fan-out, are one trace."""

from __future__ import annotations

import itertools

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import seed_of, wait_until, with_nodes

import malla

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider():
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tp)
    yield


class Leaf(malla.Service, global_=True):
    def work(self, x):
        return x * 2


class Middle(malla.Service, global_=True):
    node: malla.Node

    async def relay(self, x):
        return await Middle.node.remote("Leaf", "work", [x]) + 1


def test_chain_across_three_nodes_is_one_trace():
    async def main(make):
        c = await make("c", tracing=True).start()
        await c.start_service(Leaf)
        b = await make("b", tracing=True, seeds=[seed_of(c)]).start()
        Middle.node = b
        await b.start_service(Middle)
        a = await make("a", tracing=True, seeds=[seed_of(b)]).start()
        assert await a.wait_for_services(["Middle"], retries=5)
        await wait_until(lambda: b.get_nodes("Leaf") == ["c"])
        EXPORTER.clear()
        assert await a.remote("Middle", "relay", [20]) == 41
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 4)
        spans = {s.name: s for s in EXPORTER.get_finished_spans()}
        assert set(spans) == {"malla.call Middle.relay", "malla.serve Middle.relay",
                              "malla.call Leaf.work", "malla.serve Leaf.work"}
        assert len({s.context.trace_id for s in spans.values()}) == 1
        order = ["malla.call Middle.relay", "malla.serve Middle.relay",
                 "malla.call Leaf.work", "malla.serve Leaf.work"]
        for parent, child in itertools.pairwise(order):
            assert spans[child].parent.span_id == spans[parent].context.span_id
        assert spans["malla.call Middle.relay"].parent is None

    with_nodes(main)


def test_fan_out_is_one_trace():
    async def main(make):
        first = await make("n0", tracing=True).start()
        nodes = [first] + [await make(f"n{i}", tracing=True, seeds=[seed_of(first)]).start()
                           for i in (1, 2)]
        for node in nodes:
            await node.start_service(Leaf)
        caller = await make("caller", tracing=True, seeds=[seed_of(first)]).start()
        await wait_until(lambda: len(caller.get_nodes("Leaf")) == 3)
        EXPORTER.clear()
        assert await caller.call_cb_all("Leaf", "work", [1]) == [2, 2, 2]
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 4)
        spans = EXPORTER.get_finished_spans()
        root = [s for s in spans if s.parent is None]
        assert len(root) == 1 and root[0].name == "malla.call Leaf.work"
        served = [s for s in spans if s.name == "malla.serve Leaf.work"]
        assert len(served) == 3
        assert all(s.parent.span_id == root[0].context.span_id for s in served)
        assert len({s.context.trace_id for s in spans}) == 1

    with_nodes(main)


def test_trace_context_is_not_put_in_meta():
    class Peek(malla.Service, global_=True):
        seen = []

        def service_cb_in(self, fun, args, kwargs, opts):
            Peek.seen.append(opts["meta"])
            return super().service_cb_in(fun, args, kwargs, opts)

        def f(self):
            return 1

    async def main(make):
        a = await make("a", tracing=True).start()
        await a.start_service(Peek)
        b = await make("b", tracing=True, seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Peek"], retries=5)
        await b.remote("Peek", "f", meta={"k": 1})
        await b.remote("Peek", "f")
        assert Peek.seen == [{"k": 1}, None]

    with_nodes(main)


def test_sampling_rate_zero_makes_no_span():
    async def main(make):
        c = await make("c", tracing=True).start()
        await c.start_service(Leaf)
        a = await make("a", tracing=0.0, seeds=[seed_of(c)]).start()
        assert await a.wait_for_services(["Leaf"], retries=5)
        EXPORTER.clear()
        for i in range(20):
            assert await a.remote("Leaf", "work", [i]) == 2 * i
        assert EXPORTER.get_finished_spans() == ()
        # inside a recorded span, the call is followed whatever the rate
        with trace.get_tracer("test").start_as_current_span("outer"):
            await a.remote("Leaf", "work", [1])
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 3)
        names = sorted(s.name for s in EXPORTER.get_finished_spans())
        assert names == ["malla.call Leaf.work", "malla.serve Leaf.work", "outer"]

    with_nodes(main)
