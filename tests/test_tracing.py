"""OpenTelemetry, with the real SDK, on nodes over loopback TCP: a call chain
across three nodes, and a fan-out, are one trace; spans are named and
attributed as the RPC semantic conventions say; failures end them ERROR."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import rpc_attributes
from opentelemetry.semconv.attributes import (
    error_attributes,
    network_attributes,
    server_attributes,
)
from opentelemetry.trace import SpanKind, StatusCode
from support import seed_of, wait_until, with_nodes

import malla
from malla import tracing

EXPORTER = InMemorySpanExporter()
CLIENT, SERVER = SpanKind.CLIENT, SpanKind.SERVER


@pytest.fixture(scope="module", autouse=True)
def provider():
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tp)
    yield


class Leaf(malla.Service, global_=True):
    def work(self, x):
        return x * 2

    def fail(self):
        raise ValueError("no leaf")

    async def slow(self):
        await asyncio.sleep(30)


class Middle(malla.Service, global_=True):
    node: malla.Node

    async def relay(self, x):
        return await Middle.node.remote("Leaf", "work", [x]) + 1


async def leaf_and_caller(make):
    """Tracing nodes a (serving Leaf) and b (calling it); no span yet."""
    a = await make("a", tracing=True).start()
    await a.start_service(Leaf)
    b = await make("b", tracing=True, seeds=[seed_of(a)]).start()
    assert await b.wait_for_services(["Leaf"], retries=5)
    EXPORTER.clear()
    return a, b


def spans_by(kind):
    return [s for s in EXPORTER.get_finished_spans() if s.kind == kind]


def peername(node, peer):
    """(host, port) of the other end of `node`'s connection to `peer`."""
    host, port = node._cluster.connected[peer].proto.transport.get_extra_info("peername")[:2]
    return host, port


def test_attribute_names_are_the_semantic_conventions():
    # malla writes the names out (no runtime dependency on the semconv
    # package): each must be the installed package's own constant
    assert tracing.RPC_SYSTEM_NAME == rpc_attributes.RPC_SYSTEM_NAME
    assert tracing.RPC_METHOD == rpc_attributes.RPC_METHOD
    assert tracing.RPC_SYSTEM == rpc_attributes.RPC_SYSTEM
    assert tracing.RPC_SERVICE == rpc_attributes.RPC_SERVICE
    assert tracing.SERVER_ADDRESS == server_attributes.SERVER_ADDRESS
    assert tracing.SERVER_PORT == server_attributes.SERVER_PORT
    assert tracing.NETWORK_PEER_ADDRESS == network_attributes.NETWORK_PEER_ADDRESS
    assert tracing.NETWORK_PEER_PORT == network_attributes.NETWORK_PEER_PORT
    assert tracing.ERROR_TYPE == error_attributes.ERROR_TYPE


def test_a_call_is_a_client_and_a_server_span_named_and_attributed_by_the_conventions():
    async def main(make):
        a, b = await leaf_and_caller(make)
        assert await b.remote("Leaf", "work", [4]) == 8
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 2)
        [client], [server] = spans_by(CLIENT), spans_by(SERVER)
        for span in (client, server):
            assert span.name == "Leaf/work"                   # {rpc.method}
            assert span.attributes["rpc.system.name"] == "malla"
            assert span.attributes["rpc.method"] == "Leaf/work"
            assert span.attributes["rpc.system"] == "malla"
            assert span.attributes["rpc.service"] == "Leaf"
            assert span.status.status_code == StatusCode.UNSET   # success: unset
            assert "error.type" not in span.attributes and not span.events
        # the client names the node called: its advertised address, and the
        # socket's other end
        assert (client.attributes["server.address"], client.attributes["server.port"]) \
            == ("127.0.0.1", a.address[1])
        assert client.attributes["malla.node"] == "a"
        assert (client.attributes["network.peer.address"],
                client.attributes["network.peer.port"]) == peername(b, "a")
        # the server names its caller's end of the connection
        assert (server.attributes["network.peer.address"],
                server.attributes["network.peer.port"]) == peername(a, "b")
        assert "server.address" not in server.attributes
        assert server.parent.span_id == client.context.span_id

    with_nodes(main)



def test_an_in_process_call_s_span_names_this_node_and_no_address():
    async def main(make):
        a, _ = await leaf_and_caller(make)
        assert await a.remote("Leaf", "work", [4]) == 8
        await wait_until(lambda: spans_by(CLIENT))
        [client] = spans_by(CLIENT)
        assert client.attributes["malla.node"] == "a"
        assert "server.address" not in client.attributes
        assert "network.peer.address" not in client.attributes

    with_nodes(main)

def test_a_handler_that_raises_ends_both_spans_error_with_the_exception():
    async def main(make):
        _, b = await leaf_and_caller(make)
        with pytest.raises(malla.RemoteError, match="no leaf"):
            await b.remote("Leaf", "fail")
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 2)
        [client], [server] = spans_by(CLIENT), spans_by(SERVER)
        # the SERVER span: what the handler raised
        assert server.status.status_code == StatusCode.ERROR
        assert server.status.description == "ValueError: no leaf"
        assert server.attributes["error.type"] == "builtins.ValueError"
        [event] = server.events
        assert event.name == "exception"
        assert event.attributes["exception.type"] == "ValueError"
        assert event.attributes["exception.message"] == "no leaf"
        assert "in fail" in event.attributes["exception.stacktrace"]
        # the CLIENT span: the RemoteError the caller got (one class for
        # every handler's failure, whatever it raised)
        assert client.status.status_code == StatusCode.ERROR
        assert client.attributes["error.type"] == "malla.exceptions.RemoteError"
        [event] = client.events
        assert event.name == "exception"
        assert "builtins.ValueError: no leaf" in event.attributes["exception.message"]
        # a cast whose handler raises: its SERVER span is marked failed too
        EXPORTER.clear()
        assert await b.remote("Leaf", "fail", timeout=0) is None
        await wait_until(lambda: len(spans_by(SERVER)) == 1)
        [server] = spans_by(SERVER)
        assert server.status.status_code == StatusCode.ERROR
        assert server.attributes["error.type"] == "builtins.ValueError"
        assert [e.name for e in server.events] == ["exception"]

    with_nodes(main)


def test_a_timeout_ends_the_client_span_error_and_the_cancelled_server_span_unset():
    async def main(make):
        _, b = await leaf_and_caller(make)
        with pytest.raises(malla.CallTimeout):
            await b.remote("Leaf", "slow", timeout=200)
        # the caller's CANCEL stops the handler: its span ends then
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 2)
        [client], [server] = spans_by(CLIENT), spans_by(SERVER)
        assert client.status.status_code == StatusCode.ERROR
        assert client.attributes["error.type"] == "malla.exceptions.CallTimeout"
        assert [e.name for e in client.events] == ["exception"]
        # cancelled by its caller, the served call did not fail: no error
        assert server.status.status_code == StatusCode.UNSET
        assert "error.type" not in server.attributes and not server.events

    with_nodes(main)


def test_a_failover_is_one_client_span_naming_the_node_that_took_the_call():
    async def main(make):
        first = await make("n1", tracing=True).start()
        second = await make("n2", tracing=True, seeds=[seed_of(first)]).start()
        for node in (first, second):
            await node.start_service(Leaf)
        caller = await make("caller", tracing=True, seeds=[seed_of(first)],
                            balance="shuffle").start()
        await wait_until(lambda: len(caller.get_nodes("Leaf")) == 2)
        # (with balance="shuffle", remote() tries the nodes in get_nodes()' order)
        refusing, taking = ((first, second) if caller.get_nodes("Leaf")[0] == "n1"
                            else (second, first))
        refusing._hosting.entries["Leaf"].paused = True    # refuses without announcing
        EXPORTER.clear()
        assert await caller.remote("Leaf", "work", [1]) == 2
        assert caller.stats()["failovers"] == 1
        await wait_until(lambda: len(EXPORTER.get_finished_spans()) == 2)
        [client], [server] = spans_by(CLIENT), spans_by(SERVER)
        assert client.attributes["server.port"] == taking.address[1]
        assert server.parent.span_id == client.context.span_id
        assert client.status.status_code == StatusCode.UNSET

    with_nodes(main)


class Sluggish(malla.Service, global_=True):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    @malla.idempotent
    async def get(self):
        await asyncio.sleep(self.delay)
        return self.delay


def test_a_hedged_call_s_span_says_so_and_names_the_node_whose_reply_won():
    async def main(make):
        first = await make("n1", tracing=True).start()
        second = await make("n2", tracing=True, seeds=[seed_of(first)]).start()
        caller = await make("caller", tracing=True, seeds=[seed_of(first)],
                            balance="shuffle").start()
        await first.start_service(Sluggish(0))
        await second.start_service(Sluggish(0))
        await wait_until(lambda: len(caller.get_nodes("Sluggish")) == 2)
        EXPORTER.clear()
        assert await caller.remote("Sluggish", "get", hedge_after=5_000) == 0
        [plain] = spans_by(CLIENT)
        assert tracing.HEDGED not in plain.attributes       # no hedge was sent
        # the node the call goes to first (get_nodes' order) is slow
        slow, fast = ((first, second) if caller.get_nodes("Sluggish")[0] == "n1"
                      else (second, first))
        await slow.stop_service("Sluggish")
        await slow.start_service(Sluggish(10))
        await wait_until(lambda: len(caller.get_nodes("Sluggish")) == 2)
        assert caller.get_nodes("Sluggish")[0] == slow.name
        EXPORTER.clear()
        assert await caller.remote("Sluggish", "get", hedge_after=20) == 0
        await wait_until(lambda: len(spans_by(CLIENT)) == 1)
        [client] = spans_by(CLIENT)
        assert client.attributes[tracing.HEDGED] is True
        assert client.attributes["server.port"] == fast.address[1]

    with_nodes(main)


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
        spans = {(s.name, s.kind): s for s in EXPORTER.get_finished_spans()}
        order = [("Middle/relay", CLIENT), ("Middle/relay", SERVER),
                 ("Leaf/work", CLIENT), ("Leaf/work", SERVER)]
        assert set(spans) == set(order)
        assert len({s.context.trace_id for s in spans.values()}) == 1
        for parent, child in itertools.pairwise(order):
            assert spans[child].parent.span_id == spans[parent].context.span_id
        assert spans[order[0]].parent is None
        assert spans[("Leaf/work", CLIENT)].attributes["server.port"] == c.address[1]

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
        assert len(root) == 1 and root[0].name == "Leaf/work" and root[0].kind == CLIENT
        # one span for three nodes names none of them
        assert "server.address" not in root[0].attributes
        served = spans_by(SERVER)
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
        names = sorted((s.name, s.kind.name) for s in EXPORTER.get_finished_spans())
        assert names == [("Leaf/work", "CLIENT"), ("Leaf/work", "SERVER"),
                         ("outer", "INTERNAL")]

    with_nodes(main)
