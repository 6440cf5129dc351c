"""Hedged calls (malla.hedging) and the @malla.idempotent mark
(malla.idempotent), on real nodes over loopback TCP: the mark is announced,
a hedge goes to the next node when the first has not answered, the first
reply wins and the loser's coroutine is cancelled on its node; a call that
may not be hedged is refused before anything is sent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import ClassVar

import pytest
from support import kill_process, read_line, seed_of, spawn_python, wait_until, with_nodes

import malla
from malla.registry import invalid_info
from malla.rendezvous import rank
from malla.service import describe


class Hedgy(malla.Service, global_=True):
    """Runs on two nodes of one process, which share the class's records:
    the first call to arrive, on whichever node, waits `hang` seconds."""

    arrivals: ClassVar[list[str]] = []
    times: ClassVar[list[float]] = []       # time.monotonic() of each arrival
    cancelled: ClassVar[list[str]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    @malla.idempotent
    async def get(self, hang, every=False):
        Hedgy.arrivals.append(self.name)
        Hedgy.times.append(time.monotonic())
        if len(Hedgy.arrivals) == 1 or every:
            try:
                await asyncio.sleep(hang)
            except asyncio.CancelledError:
                Hedgy.cancelled.append(self.name)
                raise
        return self.name

    async def put(self, value):
        Hedgy.arrivals.append(self.name)
        return value


class Override(Hedgy, name="Hedgy"):
    async def get(self, hang):        # not marked again: not idempotent
        return self.name


async def two_servers_and_a_caller(make):
    Hedgy.arrivals.clear()
    Hedgy.cancelled.clear()
    a = await make("a").start()
    b = await make("b", seeds=[seed_of(a)]).start()
    await a.start_service(Hedgy("a"))
    await b.start_service(Hedgy("b"))
    c = await make("c", seeds=[seed_of(a)]).start()
    await wait_until(lambda: len(c.get_nodes("Hedgy")) == 2)
    return a, b, c


def test_the_mark_is_announced_in_the_function_metadata():
    assert describe(Hedgy("x"))["function_meta"] == {"get": {"idempotent": True}}
    # an override that does not repeat the mark is not idempotent
    assert "function_meta" not in describe(Override("x"))
    info = describe(Hedgy("x"))
    assert invalid_info(info) is None
    for bad, why in [([1], "not a map"), ({"nope": {}}, "not one of its functions"),
                     ({"get": True}, "not a map"), ({"get": {"idempotent": 1}}, "not a bool")]:
        assert why in invalid_info({**info, "function_meta": bad})
    # keys a receiver does not know are ignored
    assert invalid_info({**info, "function_meta": {"get": {"later": [1]}}}) is None


def test_a_hedge_answers_and_the_slow_copy_is_cancelled_on_its_node():
    async def main(make):
        a, b, c = await two_servers_and_a_caller(make)
        assert c.get_instances("Hedgy")[0][1]["function_meta"] == {"get": {"idempotent": True}}
        # the first copy hangs for 30 s; the hedge (after 50 ms) answers
        winner = await c.remote("Hedgy", "get", [30], hedge_after=50, timeout=20_000)
        slow = Hedgy.arrivals[0]
        assert sorted(Hedgy.arrivals) == ["a", "b"] and winner != slow
        assert c.stats()["hedges"] == 1
        # the loser got a CANCEL: its coroutine was cancelled where it ran
        await wait_until(lambda: Hedgy.cancelled == [slow], timeout=5)
        server = a if slow == "a" else b
        await wait_until(lambda: server._hosting.entries["Hedgy"].running == 0, timeout=5)
        assert c.stats()["in_flight"] == 0
        # the loser took at least hedge_after: the balancer's average says so
        latency = c._cluster.connected[slow].proto.latency
        assert latency.latency("Hedgy", malla._core.monotonic()) >= 0.045

    with_nodes(main)


def test_a_hedge_never_leaves_before_hedge_after():
    """The loop's timers have millisecond grain: a call_later of 2.5 ms fires
    between 1 and 2 ms of real time later.  The hedge waits until hedge_after
    really passed, so its copy reaches its node no sooner than hedge_after
    after the call began (both nodes run in this process: one clock)."""
    async def main(make):
        _a, _b, c = await two_servers_and_a_caller(make)
        for i in range(20):
            Hedgy.arrivals.clear()
            Hedgy.times.clear()
            after = 2.5 + (i % 5) * 0.2        # ms, never a whole millisecond
            began = time.monotonic()
            await c.remote("Hedgy", "get", [0.05], hedge_after=after, timeout=5_000)
            assert len(Hedgy.times) == 2, Hedgy.arrivals
            assert Hedgy.times[1] - began >= after / 1000, (i, Hedgy.times[1] - began)
        assert c.stats()["hedges"] == 20

    with_nodes(main)


def test_a_cancelled_hedged_call_cancels_both_copies_on_their_nodes():
    async def main(make):
        a, b, c = await two_servers_and_a_caller(make)
        call = asyncio.ensure_future(c.remote("Hedgy", "get", [30, True], hedge_after=20))
        await wait_until(lambda: len(Hedgy.arrivals) == 2, timeout=5)
        assert c.stats()["hedges"] == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: sorted(Hedgy.cancelled) == ["a", "b"], timeout=5)
        for server in (a, b):
            await wait_until(lambda s=server: s._hosting.entries["Hedgy"].running == 0)
        assert c.stats()["in_flight"] == 0

    with_nodes(main)


def test_a_hedge_the_budget_refuses_is_not_sent():
    async def main(make):
        _a, _b, _ = await two_servers_and_a_caller(make)
        c = await make("stingy", seeds=[seed_of(_a)], retry_budget=0, retry_floor=0).start()
        await wait_until(lambda: len(c.get_nodes("Hedgy")) == 2)
        # no hedge: the first copy's own reply, after its wait
        assert await c.remote("Hedgy", "get", [0.3], hedge_after=20) == Hedgy.arrivals[0]
        assert len(Hedgy.arrivals) == 1
        assert c.stats()["hedges"] == 0 and c.stats()["retries_throttled"] == 1

    with_nodes(main)


# A node in its own process (so that SIGSTOP holds it while the others
# answer), serving Gate with room for one call.  argv: name seed.
GATE_NODE = r"""
import asyncio, os, sys
import malla

class Gate(malla.Service, global_=True, max_concurrency=1):
    @malla.idempotent
    async def get(self, hold=0.0):
        await asyncio.sleep(hold)
        return sys.argv[1]

async def main():
    node = malla.Node(sys.argv[1], port=0, heartbeat_interval=0.2, heartbeat_timeout=30)
    await node.start()
    await node.start_service(Gate())
    await node.connect(sys.argv[2])
    print("READY", os.getpid(), flush=True)
    await asyncio.Event().wait()

malla.run(main())
"""


class Gate(malla.Service, global_=True):
    def __init__(self, name: str) -> None:
        self.name = name

    @malla.idempotent
    async def get(self, hold=0.0):
        await asyncio.sleep(hold)
        return self.name


def test_a_hedge_the_budget_refuses_leaves_its_node_to_the_rounds_failover():
    """The first copy goes to x (stopped), the hedge the budget refuses
    draws no node, then x refuses the call (Overloaded, after hedge_after):
    the round fails over to the key's second node, not past it to the
    third."""
    async def main(make):
        y = await make("y").start()
        await y.start_service(Gate("y"))
        z = await make("z", seeds=[seed_of(y)]).start()
        await z.start_service(Gate("z"))
        proc = spawn_python(GATE_NODE, "x", seed_of(y))
        try:
            assert (await read_line(proc)).startswith("READY")
            c = await make("c", seeds=[seed_of(y)], retry_budget=0, retry_floor=0).start()
            await wait_until(lambda: len(c.get_nodes("Gate")) == 3)
            key = next(k for k in range(1000) if rank(k, ["x", "y", "z"])[0] == "x")
            ranking = rank(key, ["x", "y", "z"])
            hold = asyncio.ensure_future(c.remote("Gate", "get", [60], key=key))
            # x's one place is taken once a call to it fails over (Overloaded)
            while await c.remote("Gate", "get", key=key) == "x":
                await asyncio.sleep(0.01)
            # past x's retry_after_ms skip (its hint, and so the skip, can be
            # longer than a few ms on a loaded machine) and not ejected: the
            # keyed call's first copy goes to x again
            ejection = c._caller.routing.ejection
            await wait_until(lambda: list(ejection.usable("Gate", ranking)) == ranking)
            os.kill(proc.pid, signal.SIGSTOP)
            call = asyncio.ensure_future(c.remote("Gate", "get", key=key, hedge_after=20))
            await wait_until(lambda: c.stats()["retries_throttled"] == 1)
            os.kill(proc.pid, signal.SIGCONT)
            assert await call == ranking[1], ranking
            assert c.stats()["hedges"] == 0
            hold.cancel()
        finally:
            kill_process(proc)

    with_nodes(main)


def test_a_call_that_may_not_be_hedged_is_refused_before_sending():
    async def main(make):
        _a, _b, c = await two_servers_and_a_caller(make)
        with pytest.raises(malla.InvalidOption, match="idempotent"):
            await c.remote("Hedgy", "put", [1], hedge_after=10)
        with pytest.raises(malla.InvalidOption, match="does not know"):
            await c.remote("Nowhere", "get", hedge_after=10)
        with pytest.raises(malla.InvalidOption, match="cast"):
            await c.remote("Hedgy", "get", [0], hedge_after=10, timeout=0)
        for bad in (0, -5, True, "10", float("nan")):
            with pytest.raises(malla.InvalidOption, match="hedge_after"):
                await c.remote("Hedgy", "get", [0], hedge_after=bad)
        with pytest.raises(malla.UnknownFunction):
            await c.remote("Hedgy", "nope", hedge_after=10)
        # through a proxy and malla.call too
        with pytest.raises(malla.InvalidOption, match="idempotent"):
            await malla.call(c.services.Hedgy.put(1), hedge_after=10)
        assert Hedgy.arrivals == []
        # a reply before hedge_after: no hedge
        assert await malla.call(c.services.Hedgy.get(0), hedge_after=5_000) in ("a", "b")
        assert c.stats()["hedges"] == 0

    with_nodes(main)


def test_an_instance_that_does_not_mark_it_makes_it_unhedgeable():
    async def main(make):
        _a, b, c = await two_servers_and_a_caller(make)
        await b.stop_service("Hedgy")
        await b.start_service(Override("b"))       # an upgrade that dropped the mark
        await wait_until(lambda: "function_meta" not in dict(c.get_instances("Hedgy")).get(
            "b", {"function_meta": 1}))
        with pytest.raises(malla.InvalidOption, match="on every node"):
            await c.remote("Hedgy", "get", [0], hedge_after=10)

    with_nodes(main)


def test_of_two_failed_copies_the_error_that_says_it_may_have_run_is_raised():
    from malla.hedging import _worse

    refused, failed = malla.ServiceNotAvailable("paused"), malla.ConnectionLost("gone")
    assert _worse(_worse(None, refused), failed) is failed
    assert _worse(_worse(None, failed), refused) is failed
    assert _worse(_worse(None, refused), malla.Overloaded("busy")) is refused
    # a hedge whose deadline passed before it was sent did not run either:
    # the first copy's error (it ran, or may have) is the attempt's
    unsent = malla.CallTimeout("deadline passed before calling", sent=False)
    timed_out = malla.CallTimeout("no reply", sent=True)
    raised = malla.RemoteError("ValueError", "boom")
    for ran in (timed_out, raised, failed):
        assert _worse(_worse(None, unsent), ran) is ran
        assert _worse(_worse(None, ran), unsent) is ran


def test_the_attempts_timeout_bounds_both_copies():
    """The hedge gets what is left of the attempt's timeout, not a fresh
    one: two stalling nodes, timeout 2 s, hedge after 1.8 s -> CallTimeout
    at about 2 s (it was 3.8 s: the second copy's own full timeout)."""
    async def main(make):
        _, _, c = await two_servers_and_a_caller(make)
        started = time.monotonic()
        with pytest.raises(malla.CallTimeout):
            await c.remote("Hedgy", "get", [30, True], timeout=2000, hedge_after=1800)
        assert time.monotonic() - started < 3.2        # (wide slack: 2.0 s expected)
        assert c.stats()["hedges"] == 1
        await wait_until(lambda: sorted(Hedgy.cancelled) == ["a", "b"])

    with_nodes(main)
