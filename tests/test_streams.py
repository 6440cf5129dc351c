"""Streaming calls on real loopback sockets (DESIGN.md "Streaming calls"):
the window bounds the producer, leaving early or losing the connection
closes the generator on the server, failover only before the first item,
the serving rules (max_concurrency, allow=, the hook) as for one call,
and what the core's stream book holds comes back to zero.  The same cases
on every path are in tests/conformance/ (conf_cases.STREAM_CASES)."""

from __future__ import annotations

import asyncio
import os

import pytest
from support import kill_process, read_line, seed_of, spawn_python, wait_until, with_nodes

import malla
from malla import _core as core
from malla._testbase import FakeTransport, RecordingOwner, deliver


class Feed(malla.Service, global_=True, max_concurrency=2):
    produced = 0
    closed = 0

    async def ticks(self, n, pause=0.0):
        try:
            for i in range(n):
                Feed.produced += 1
                yield i
                if pause:
                    await asyncio.sleep(pause)
        finally:
            Feed.closed += 1

    async def chunks(self, n, size):
        for _ in range(n):
            yield os.urandom(size)

    def plain(self):
        return "plain"

    async def late(self):
        try:
            Feed.produced += 1
            await asyncio.sleep(30)
            yield "late"
        finally:
            Feed.closed += 1

    async def odd(self):
        try:
            yield 0
            yield 1
            yield object()          # cannot be encoded: the stream fails after 0, 1
            await asyncio.sleep(30)     # (found when the batch goes, as it waits here)
            yield 3
        finally:
            Feed.closed += 1


class Hooked(malla.Service, global_=True, allow=["b", "c"]):
    seen: list = []

    def service_cb_in(self, fun, args, kwargs, opts):
        Hooked.seen.append((fun, opts["caller"]))
        return super().service_cb_in(fun, args, kwargs, opts)

    async def count(self, n):
        for i in range(n):
            yield i


@pytest.fixture(autouse=True)
def _reset():
    Feed.produced = Feed.closed = 0
    Hooked.seen = []


def held(*nodes: malla.Node) -> int:
    """Streams the nodes' connections still hold (both ways)."""
    return sum(len(p.streams) for n in nodes for p in n._cluster.protocols())


async def pair(make, service=None, **options):
    """Nodes a (hosting `service`, Feed by default) and b (`options`), b
    seeing the service."""
    service = Feed if service is None else service
    a = await make("a").start()
    b = await make("b", seeds=[seed_of(a)], **options).start()
    await a.start_service(service)
    assert await b.wait_for_services([service])
    return a, b


def test_the_producer_never_runs_more_than_the_window_ahead():
    async def main(make):
        a, b = await pair(make, stream_window=4)
        items = b.stream(Feed, "ticks", [1000])
        assert await items.__anext__() == 0
        await asyncio.sleep(0.3)         # a slow consumer: the producer waits for credit
        assert 1 <= Feed.produced <= 1 + 4, Feed.produced
        got = [await items.__anext__() for _ in range(20)]
        assert got == list(range(1, 21))
        await asyncio.sleep(0.3)
        assert Feed.produced <= 21 + 4, Feed.produced
        await items.aclose()
        await wait_until(lambda: Feed.closed == 1 and held(a, b) == 0)
        return True

    assert with_nodes(main)


@pytest.mark.parametrize("how", ["break", "raise", "cancel", "timeout"])
def test_leaving_a_remote_stream_early_closes_the_generator_on_the_server(how):
    async def main(make):
        a, b = await pair(make)

        async def consume():
            async for i in b.stream(Feed, "ticks", [10_000, 0.05 if how == "timeout" else 0.001],
                                    timeout=20 if how == "timeout" else 15000):
                if i == 3:
                    if how == "break":
                        break
                    if how == "raise":
                        raise LookupError("consumer")
                    await asyncio.sleep(30)      # cancelled here
            return "done"

        task = asyncio.ensure_future(consume())
        if how == "cancel":
            await wait_until(lambda: Feed.produced >= 4)
            task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        expected = {"break": "done", "raise": LookupError, "cancel": asyncio.CancelledError,
                    "timeout": malla.CallTimeout}[how]
        assert outcome == expected if how == "break" else isinstance(outcome, expected), outcome
        # the CANCEL reached the server: the generator's finally ran there
        await wait_until(lambda: Feed.closed == 1)
        await wait_until(lambda: held(a, b) == 0 and a._hosting.entries["Feed"].running == 0)
        return True

    assert with_nodes(main)


@pytest.mark.parametrize("where", ["tcp", "in-process"])
def test_cancelled_before_the_first_item_closes_the_generator(where):
    async def main(make):
        a, b = await pair(make)
        consumer = b if where == "tcp" else a
        task = asyncio.ensure_future(consumer.stream(Feed, "late").__anext__())
        await wait_until(lambda: Feed.produced == 1)
        task.cancel()
        assert (await asyncio.gather(task, return_exceptions=True))[0].__class__ is \
            asyncio.CancelledError
        await wait_until(lambda: Feed.closed == 1 and held(a, b) == 0
                         and a._hosting.entries["Feed"].running == 0)
        return True

    assert with_nodes(main)


def test_a_lost_connection_closes_the_generator_and_fails_the_iterator():
    async def main(make):
        # (the break is the socket's, seen at once: a long heartbeat_timeout
        # keeps a loaded machine's pause from dropping the peer before it)
        a, b = await pair(make, heartbeat_interval=0.2, heartbeat_timeout=5.0)
        items = b.stream(Feed, "ticks", [10_000, 0.01])
        assert await items.__anext__() == 0
        b._cluster.connected["a"].proto.abort()       # the TCP connection breaks
        with pytest.raises(malla.ConnectionLost):
            async for _ in items:
                pass
        await wait_until(lambda: Feed.closed == 1 and held(a, b) == 0)
        return True

    assert with_nodes(main)


PRODUCER = r"""
import asyncio, sys
import malla

class Far(malla.Service, global_=True):
    async def ticks(self):
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0.01)

async def main():
    node = malla.Node("far", port=0)
    await node.start()
    await node.start_service(Far)
    await node.connect(sys.argv[1])
    print("READY", flush=True)
    await asyncio.Event().wait()

malla.run(main())
"""


def test_a_killed_producer_node_raises_connection_lost_after_its_items():
    async def main(make):
        a = await make("a", heartbeat_interval=0.2, heartbeat_timeout=5.0).start()
        proc = spawn_python(PRODUCER, seed_of(a))
        try:
            assert (await read_line(proc)).startswith("READY")
            assert await a.wait_for_services(["Far"])
            got = []
            with pytest.raises(malla.ConnectionLost):
                async for i in a.stream("Far", "ticks"):
                    got.append(i)
                    if i == 5:
                        kill_process(proc)
            assert got[:6] == list(range(6))
            assert held(a) == 0
        finally:
            kill_process(proc)
        return True

    assert with_nodes(main)


def test_failover_before_the_first_item_and_the_rules_of_one_call():
    async def main(make):
        a = await make("a").start()
        b = await make("b", seeds=[seed_of(a)]).start()
        c = await make("c", seeds=[seed_of(a)]).start()
        await a.start_service(Feed)
        await b.start_service(Hooked)
        await wait_until(lambda: c.get_nodes(Feed) == ["a"] and c.get_nodes(Hooked) == ["b"])
        # max_concurrency=2 counts open streams: a third one is Overloaded
        open_ = [c.stream(Feed, "ticks", [100, 0.01], sna_retries=0) for _ in range(2)]
        assert [await s.__anext__() for s in open_] == [0, 0]
        with pytest.raises(malla.Overloaded):
            await c.stream(Feed, "ticks", [3], sna_retries=0).__anext__()
        # ... and fails over to a node with room, before its first item
        await c.start_service(Feed)
        await wait_until(lambda: sorted(b.get_nodes(Feed)) == ["a", "c"])
        s3 = b.stream(Feed, "ticks", [3], sna_retries=0)
        assert [i async for i in s3] == [0, 1, 2]
        for s in open_:
            await s.aclose()
        # allow= and the hook: once per stream, with the caller's name
        assert [i async for i in c.stream(Hooked, "count", [3])] == [0, 1, 2]
        with pytest.raises(malla.Forbidden):
            await a.stream(Hooked, "count", [3]).__anext__()
        assert [i async for i in b.stream(Hooked, "count", [2])] == [0, 1]
        assert Hooked.seen == [("count", "c"), ("count", "b")]
        # a stream called as a call, and a call as a stream: said before sending
        with pytest.raises(malla.InvalidOption, match="is not a stream"):
            await b.stream(Feed, "plain").__anext__()
        with pytest.raises(malla.RemoteError, match="is a stream"):
            await b.remote(Feed, "ticks", [3])
        await wait_until(lambda: held(a, b, c) == 0)
        return True

    assert with_nodes(main)


def test_a_small_call_goes_through_while_a_stream_of_chunks_fills_the_connection():
    async def main(make):
        _, b = await pair(make)
        total = 0

        async def consume():
            nonlocal total
            async for chunk in b.stream(Feed, "chunks", [400, 64 << 10]):
                total += len(chunk)
                await asyncio.sleep(0)

        task = asyncio.ensure_future(consume())
        await wait_until(lambda: total > 0)
        # the producer waits while the transport is full: small calls and
        # other streams share the connection
        assert await b.remote("Malla", "ping") is not None
        assert [i async for i in b.stream(Feed, "ticks", [5])] == [0, 1, 2, 3, 4]
        await task
        assert total == 400 * (64 << 10)
        return True

    assert with_nodes(main)


def test_local_gives_the_generator_and_the_node_iterates_it_in_process():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Feed)
        # local(): this node only, through the hook: the generator itself
        gen = await a.local(Feed, "ticks", [3])
        assert [i async for i in gen] == [0, 1, 2]
        # node.stream() in-process: pulled, never ahead of the consumer
        items = a.stream(Feed, "ticks", [1000])
        assert await items.__anext__() == 0
        await asyncio.sleep(0.05)
        assert Feed.produced == 3 + 1      # local()'s three, then one
        async with items:
            assert await items.__anext__() == 1
        assert Feed.closed == 2 and a._hosting.entries["Feed"].running == 0
        with pytest.raises(StopAsyncIteration):
            await items.__anext__()
        return True

    assert with_nodes(main)


def test_an_item_that_cannot_be_encoded_fails_the_stream_after_the_items_before_it():
    async def main(make):
        _, b = await pair(make)
        got = []
        with pytest.raises(malla.RemoteError) as err:
            async for item in b.stream(Feed, "odd", timeout=5000):
                got.append(item)
        assert got == [0, 1] and err.value.exc_type == "malla.exceptions.EncodeError"
        await wait_until(lambda: Feed.closed == 1)
        return True

    assert with_nodes(main)


def test_stream_window_is_validated():
    for bad in (0, -1, 1.5, True, core.STREAM_WINDOW_MAX + 1):
        with pytest.raises(malla.InvalidOption, match="stream_window"):
            malla.Node("n", stream_window=bad)
    with pytest.raises(malla.InvalidOption, match="timeout"):
        malla.Node("n").stream(Feed, "ticks", [1], timeout=0)


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 4:pos + 8], "big")
        out.append((data[pos], int.from_bytes(data[pos + 8:pos + 16], "big"),
                    data[pos + 16:pos + 16 + length]))
        pos += 16 + length
    return out


def _ready_core() -> tuple[core.Protocol, FakeTransport]:
    """A core protocol ready on the fake transport (sans-IO; in a loop)."""
    transport = FakeTransport()
    proto = core.Protocol(RecordingOwner(), asyncio.get_running_loop(), True, {})
    proto.connection_made(transport)
    proto.set_ready("peer", 1 << 20)
    return proto, transport


@pytest.mark.parametrize("bad", ["beyond the window", "not an array", "empty array",
                                 "credit of 0", "credit not an int"])
def test_the_core_keeps_a_stream_to_its_window_and_refuses_malformed_frames(bad):
    # sans-IO, on the core's fake transport: a consumer with a window of 2
    async def main():
        proto, transport = _ready_core()
        st = proto.open_stream("S", "f", [], None, 1000, None, None, None, 2)
        deliver(proto, core.build_frame(core.FT_ITEM, 0, st.sid, core.packb([1, 2])))
        assert st.buffered == 2 and not proto.closed
        # taking half the window gives it back to the producer
        assert st.take() == 1
        await asyncio.sleep(0)
        sent = _frames(b"".join(transport.writes))
        assert sent[0][:2] == (core.FT_STREAM, st.sid)
        assert core.unpackb(sent[0][2])[7:] == [None, 2]       # (trace, window)
        assert (core.FT_CREDIT, st.sid, core.packb(1)) in sent
        frame = {"beyond the window": (core.FT_ITEM, [3, 4]), "not an array": (core.FT_ITEM, 3),
                 "empty array": (core.FT_ITEM, []), "credit of 0": (core.FT_CREDIT, 0),
                 "credit not an int": (core.FT_CREDIT, "x")}[bad]
        deliver(proto, core.build_frame(frame[0], 0, st.sid, core.packb(frame[1])))
        closed = proto.closed and transport.aborted
        # what a real transport does after abort(): the stream ends, lost
        proto.connection_lost(None)
        return closed and len(proto.streams) == 0

    assert asyncio.run(main())


@pytest.mark.parametrize("bad", [None, "credit beyond the window", "a running stream's id"])
def test_a_producer_takes_no_credit_beyond_its_window_and_no_second_call_on_its_id(bad):
    # sans-IO: a producer of window 2 that has sent one item; an honest
    # consumer gives back at most that one (None: the control)
    async def main():
        proto, transport = _ready_core()
        out = proto.streams.producer(proto, 7, 2)
        out.send([0])
        deliver(proto, core.build_frame(core.FT_CREDIT, 0, 7, core.packb(1)))
        assert out.credit == 2 and not proto.closed
        if bad == "credit beyond the window":
            deliver(proto, core.build_frame(core.FT_CREDIT, 0, 7, core.packb(1)))
        elif bad == "a running stream's id":
            deliver(proto, core.build_frame(core.FT_STREAM, 0, 7, core.packb(["S", "f"])))
        closed = proto.closed and transport.aborted
        proto.connection_lost(None)
        return closed

    assert asyncio.run(main()) is (bad is not None)


class _Counting:
    """An async iterator that is no async generator: its __anext__ is a
    coroutine that sometimes waits (as a hook may return one)."""

    def __init__(self, n):
        self.i, self.n = 0, n

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.i >= self.n:
            raise StopAsyncIteration
        self.i += 1
        if self.i % 3 == 0:
            await asyncio.sleep(0)
        return self.i


class _Ready:
    """An async iterator whose __anext__ gives a Future (an awaitable that is
    not an iterator): the core steps it through its __await__."""

    def __init__(self, n):
        self.i, self.n = 0, n

    def __aiter__(self):
        return self

    def __anext__(self):
        fut = asyncio.get_running_loop().create_future()
        if self.i >= self.n:
            fut.set_exception(StopAsyncIteration())
        else:
            self.i += 1
            fut.set_result(self.i)
        return fut


class Custom(malla.Service, global_=True):
    def service_cb_in(self, fun, args, kwargs, opts):
        return {"counting": _Counting, "ready": _Ready}[fun](*args)

    async def counting(self, n):
        yield n

    async def ready(self, n):
        yield n


def test_a_hooks_own_async_iterator_is_produced_item_by_item():
    async def main(make):
        a, b = await pair(make, Custom)
        assert [i async for i in b.stream(Custom, "counting", [10])] == list(range(1, 11))
        assert [i async for i in b.stream(Custom, "ready", [5])] == [1, 2, 3, 4, 5]
        await wait_until(lambda: held(a, b) == 0)
        return True

    assert with_nodes(main)


class _EndsByItself:
    """An async iterator whose plain-def __anext__ returns an awaitable per
    item and raises StopAsyncIteration (or an error) itself at the end, as
    `async for` allows."""

    def __init__(self, n: int, err: bool) -> None:
        self.i, self.n, self.err = 0, n, err

    def __aiter__(self):
        return self

    def __anext__(self):
        if self.i >= self.n:
            raise (ValueError("boom") if self.err else StopAsyncIteration)
        self.i += 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.i)
        return fut


class EndsByItself(malla.Service, global_=True):
    def service_cb_in(self, fun, args, kwargs, opts):
        return _EndsByItself(*args)

    async def feed(self, n, err):
        yield n


def test_an_anext_that_ends_by_raising_keeps_the_items_before():
    # (a review: its items were lost, the stream came back empty)
    async def main(make):
        _a, b = await pair(make, EndsByItself)
        assert [i async for i in b.stream(EndsByItself, "feed", [5, False])] == [1, 2, 3, 4, 5]
        got = []
        with pytest.raises(malla.RemoteError, match="boom"):
            async for i in b.stream(EndsByItself, "feed", [5, True]):
                got.append(i)
        assert got == [1, 2, 3, 4, 5]
        return True

    assert with_nodes(main)


class Unsendable(malla.Service, global_=True):
    state: dict[str, bool] = {}

    async def feed(self):
        try:
            yield 1
            yield object()              # cannot be encoded...
            await asyncio.sleep(0.01)   # ...and the generator waits right after it
            yield 2
        finally:
            Unsendable.state["finally_entered"] = True
            await asyncio.sleep(0)      # a cleanup that awaits (an async with's exit)
            Unsendable.state["finally_done"] = True


def test_an_item_that_cannot_be_sent_closes_the_generator_whole(caplog):
    # (a review: the generator was cancelled in one synchronous step, so a
    # finally that awaits stopped half-way and its aclose() then failed)
    async def main(make):
        a = await make("a").start()
        b = await make("b", seeds=[seed_of(a)]).start()
        await a.start_service(Unsendable)
        assert await b.wait_for_services([Unsendable])
        got = []
        with pytest.raises(malla.RemoteError, match="EncodeError"):
            async for i in b.stream(Unsendable, "feed"):
                got.append(i)
        assert got == [1]
        await wait_until(lambda: Unsendable.state.get("finally_done", False))
        return True

    assert with_nodes(main)
    assert "already running" not in caplog.text
