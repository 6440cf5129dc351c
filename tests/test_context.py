"""malla.current_call() and malla.remaining_ms(): what a handler knows of
the call it serves, on every serving path (the core's inline calls, the
dispatcher's tasks, in-process, local(), casts, @malla.blocking threads),
over real TCP and in-process, and down a call tree."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from support import run_async, wait_until

import malla
from malla.testing import cluster

BUDGET_MS = 5000


def seen() -> dict:
    """What the running handler sees of its call (plain values: they travel)."""
    call = malla.current_call()
    assert call is not None
    return {"caller": call.caller, "service": call.service, "function": call.function,
            "meta": call.meta, "timeout": call.timeout, "in_process": call.in_process,
            "cast": call.cast, "remaining": malla.remaining_ms(),
            "thread": threading.get_ident()}


class Ctx(malla.Service, global_=True):
    casts: list[dict] = []

    def plain(self):
        return seen()

    async def coro(self):
        return seen()

    @malla.blocking
    def in_thread(self):
        return seen()

    def cast(self):
        Ctx.casts.append(seen())

    def fail(self):
        assert malla.current_call() is not None
        raise KeyError("no")


class Inner(malla.Service, global_=True):
    async def who(self):
        await asyncio.sleep(0.02)       # (the budget visibly shrinks on the way)
        return seen()


def test_a_handler_sees_its_call_over_tcp():
    async def main():
        async with cluster(2) as c:
            await c.start_service(Ctx, on=0)
            server, client = c[0], c[1]
            # a plain def without a deadline: the core runs it inline
            got = await client.remote("Ctx", "plain", meta={"user": 7})
            assert got == {"caller": "node1", "service": "Ctx", "function": "plain",
                           "meta": {"user": 7}, "timeout": 15000, "in_process": False,
                           "cast": False, "remaining": None, "thread": got["thread"]}
            # with a deadline every kind of function sees the budget, a
            # @blocking one in its own thread
            for fun in ("plain", "coro", "in_thread"):
                got = await client.remote("Ctx", fun, timeout=3000, deadline=BUDGET_MS,
                                          meta="m")
                assert (got["caller"], got["function"], got["meta"], got["timeout"],
                        got["in_process"]) == ("node1", fun, "m", 3000, False)
                assert 0 < got["remaining"] <= BUDGET_MS, got
            assert got["thread"] != threading.get_ident()
            # a cast: seen as one, without a budget
            await client.remote("Ctx", "cast", timeout=0, meta="c", deadline=BUDGET_MS)
            await wait_until(lambda: Ctx.casts)
            cast = Ctx.casts.pop()
            assert (cast["caller"], cast["cast"], cast["meta"], cast["remaining"],
                    cast["in_process"]) == ("node1", True, "c", None, False)
            # a handler that raised leaves no call behind on the thread either
            with pytest.raises(malla.RemoteError):
                await client.remote("Ctx", "fail")
            # the caller's own context (the same thread) is untouched by what it called
            assert malla.current_call() is None and malla.remaining_ms() is None
            del server

    run_async(main())


def test_a_handler_sees_its_call_in_process_and_through_local():
    async def main():
        async with cluster(1) as c:
            node = c[0]
            await c.start_service(Ctx)
            for fun in ("plain", "coro", "in_thread"):
                got = await node.remote("Ctx", fun, meta="here")
                assert (got["caller"], got["function"], got["meta"], got["in_process"],
                        got["remaining"]) == ("node0", fun, "here", True, None)
                got = await node.remote("Ctx", fun, deadline=BUDGET_MS)
                assert 0 < got["remaining"] <= BUDGET_MS
            assert got["thread"] != threading.get_ident()
            got = await node.local("Ctx", "coro")
            assert (got["caller"], got["in_process"], got["meta"], got["timeout"]) == (
                "node0", True, None, None)
            await node.remote("Ctx", "cast", timeout=0)
            await wait_until(lambda: Ctx.casts)
            cast = Ctx.casts.pop()
            assert (cast["caller"], cast["cast"], cast["in_process"]) == ("node0", True, True)
            assert malla.current_call() is None and malla.remaining_ms() is None

    run_async(main())


class Outer(malla.Service, global_=True):
    async def call_inner(self, node_name):
        mine = seen()
        await asyncio.sleep(0.02)
        inner = await _nodes[node_name].remote("Inner", "who", meta="nested")
        return mine, inner


_nodes: dict[str, malla.Node] = {}


def test_a_nested_call_sees_the_first_handler_as_caller_and_a_smaller_budget():
    async def main():
        async with cluster(3) as c:
            _nodes.update({n.name: n for n in c})
            await c.start_service(Outer, on="node0")
            await c.start_service(Inner, on="node2")
            # over TCP twice: node1 -> node0 (Outer) -> node2 (Inner)
            outer, inner = await c["node1"].remote("Outer", "call_inner", ["node0"],
                                                   deadline=BUDGET_MS)
            assert outer["caller"] == "node1" and inner["caller"] == "node0"
            assert inner["meta"] == "nested" and not inner["in_process"]
            assert 0 < inner["remaining"] < outer["remaining"] <= BUDGET_MS
            # in-process, then over TCP: node0 -> node0 (Outer) -> node2
            outer, inner = await c["node0"].remote("Outer", "call_inner", ["node0"],
                                                   deadline=BUDGET_MS)
            assert outer["caller"] == "node0" and outer["in_process"]
            assert inner["caller"] == "node0" and not inner["in_process"]
            assert 0 < inner["remaining"] < outer["remaining"] <= BUDGET_MS
        _nodes.clear()

    run_async(main())


def test_remaining_ms_reads_the_clock():
    class Clock(malla.Service, global_=True):
        async def twice(self):
            call = malla.current_call()
            first = call.remaining_ms()
            time.sleep(0.05)          # (the clock moves; a short hold of the loop)
            return first, call.remaining_ms(), malla.remaining_ms()

    async def main():
        async with cluster(2) as c:
            await c.start_service(Clock, on=0)
            first, second, again = await c[1].remote("Clock", "twice", deadline=BUDGET_MS)
            assert first - second >= 40
            assert again <= second

    run_async(main())


def test_outside_a_call_there_is_no_context():
    assert malla.current_call() is None
    assert malla.remaining_ms() is None
    call = malla.CallContext("n", "S", "f", deadline_at=time.monotonic() + 1)
    assert call.in_process is False and call.meta is None
    assert 0 < call.remaining_ms() <= 1000
    assert "S.f from n" in repr(call)
