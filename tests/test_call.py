"""remote() and friends over real loopback TCP, as DESIGN.md "Calls" says:
defaults, failover, retry rounds, RemoteError, exception retries, timeouts and
cancellation reaching the remote coroutine, ConnectionLost on a killed
process, deadlines (and their travel), casts, in-process calls, local(),
call_cb_all, EncodeError, MessageTooLarge both ways, large messages.

A subset (basic call, failover, timeout) also runs on the standard loop.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time

import pytest
from support import (
    kill_process,
    node_factory,
    read_line,
    run_async,
    seed_of,
    spawn_node,
    stop_all,
    wait_until,
    with_nodes,
)

import malla
import malla.context

LOOPS = ["uvloop", "asyncio"]
FAST = {"sna_retries": 0, "retries_sleep_msec": 50}


class Svc(malla.Service, global_=True):
    """The test service: every instance knows its node's name."""

    def __init__(self, node_name: str = "?", fail_here: bool = False):
        self.node_name = node_name
        self.fail_here = fail_here
        self.runs = 0
        self.effects: list[object] = []
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.go = asyncio.Event()

    def add(self, a, b):
        return a + b

    def echo(self, x):
        return x

    def where(self):
        return self.node_name

    def maybe_fail(self):
        if self.fail_here:
            raise ValueError(f"failing on {self.node_name}")
        return self.node_name

    def fail(self, msg):
        self.runs += 1
        raise ValueError(msg)

    async def slow(self, seconds):
        self.entered.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "slow done"

    def effect(self, token):
        self.effects.append(token)

    async def gated_effect(self, token):
        await self.go.wait()
        self.effects.append(token)

    def blob(self, n):
        return b"x" * n

    def size(self, data):
        return len(data)

    def ident(self):
        return id(self)


class Outer(malla.Service, global_=True):
    def __init__(self, node: malla.Node):
        self.node = node

    async def nested(self):
        mine = malla.context.remaining_ms()
        inner = await self.node.remote("Inner", "remaining")
        return mine, inner


class Inner(malla.Service, global_=True):
    def remaining(self):
        return malla.context.remaining_ms()


async def pair(make, *services, **b_opts):
    """a runs `services`; b is connected to a and has its table."""
    a = await make("a", check_interval=60).start()
    for svc in services:
        await a.start_service(svc)
    b = await make("b", seeds=[seed_of(a)], check_interval=60, **b_opts).start()
    await wait_until(lambda: "a" in b.peers() and all(b.get_nodes(type(s)) for s in services))
    return a, b


async def trio(make):
    """a and c run Svc; b calls it.  Returns ({name: node}, {name: svc}, b)."""
    a = await make("a", check_interval=60).start()
    c = await make("c", check_interval=60, seeds=[seed_of(a)]).start()
    svcs = {"a": Svc("a"), "c": Svc("c")}
    await a.start_service(svcs["a"])
    await c.start_service(svcs["c"])
    # (Malla's order: these tests follow a call along get_nodes())
    b = await make("b", check_interval=60, seeds=[seed_of(a)], balance="shuffle").start()
    await wait_until(lambda: sorted(b.get_nodes(Svc)) == ["a", "c"])
    return {"a": a, "c": c}, svcs, b


def test_remote_defaults():
    params = inspect.signature(malla.Node.remote).parameters
    assert list(params)[:5] == ["self", "service", "fun", "args", "kwargs"]
    assert params["args"].default == ()
    assert params["kwargs"].default is None
    expected = {"timeout": 15000, "sna_retries": 5, "excp_retries": 0,
                "retries_sleep_msec": 1000, "meta": None, "deadline": None}
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name


@pytest.mark.parametrize("loop", LOOPS)
def test_basic_call(loop):
    async def main(make):
        _a, b = await pair(make, Svc("a"))
        assert await b.remote(Svc, "add", [1, 2]) == 3
        assert await b.remote("Svc", "add", (3,), {"b": 4}) == 7
        assert await b.remote(Svc, "where") == "a"
        assert await b.remote(Svc, "echo", [{"t": (1, 2), "s": {3}}]) == {"t": (1, 2),
                                                                           "s": {3}}
        results = await asyncio.gather(*(b.remote(Svc, "add", [i, i]) for i in range(50)))
        assert results == [2 * i for i in range(50)]

    with_nodes(main, loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_failover_to_next_node_when_service_stopped(loop):
    async def main(make):
        servers, _svcs, b = await trio(make)
        first, second = b.get_nodes(Svc)
        assert await b.remote(Svc, "where") == first
        await servers[first].stop_service(Svc)
        assert b.get_nodes(Svc)[0] == first          # b has not heard yet
        failovers = b.stats()["failovers"]
        assert await b.remote(Svc, "where", **FAST) == second
        assert b.stats()["failovers"] == failovers + 1
        await wait_until(lambda: b.get_nodes(Svc) == [second])

    with_nodes(main, loop=loop)


def test_service_not_available_after_sna_retries_rounds():
    async def main(make):
        a = await make("a").start()
        # nobody runs it: every round is empty
        retries = a.stats()["retries"]
        t0 = time.monotonic()
        with pytest.raises(malla.ServiceNotAvailable):
            await a.remote("Nowhere", "f", sna_retries=3, retries_sleep_msec=100)
        elapsed = time.monotonic() - t0
        assert a.stats()["retries"] == retries + 3
        # (each sleep jittered by ±10 %: at least 90 ms)
        assert elapsed >= 0.26, f"3 sleeps of 100 ms took {elapsed:.3f} s"
        # no sleep after the last round
        t0 = time.monotonic()
        with pytest.raises(malla.ServiceNotAvailable):
            await a.remote("Nowhere", "f", sna_retries=0, retries_sleep_msec=5000)
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        with pytest.raises(malla.ServiceNotAvailable):
            await a.remote("Nowhere", "f", sna_retries=1, retries_sleep_msec=800)
        elapsed = time.monotonic() - t0
        # one sleep of 720-880 ms (±10 %), not two (at least 1.44 s)
        assert 0.7 <= elapsed < 1.4, f"one 800 ms sleep, not two: {elapsed:.3f} s"

    with_nodes(main)


class OneAtATime(malla.Service, global_=True, max_concurrency=1):
    def __init__(self):
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self):
        self.entered.set()
        await self.release.wait()

    def f(self):
        return "f"


def test_each_round_tries_the_node_again():
    async def main(make):
        svc = OneAtATime()
        a, b = await pair(make, svc)
        held = asyncio.ensure_future(b.remote(OneAtATime, "hold"))
        await asyncio.wait_for(svc.entered.wait(), 5)
        calls_in = a.stats()["calls_in"]
        retries = b.stats()["retries"]
        with pytest.raises(malla.ServiceNotAvailable):
            await b.remote(OneAtATime, "f", sna_retries=3, retries_sleep_msec=50)
        assert a.stats()["calls_in"] == calls_in + 4     # 1 + 3 rounds, all refused
        assert b.stats()["retries"] == retries + 3
        svc.release.set()
        await held

    with_nodes(main)


def test_remote_error_fields():
    async def main(make):
        _a, b = await pair(make, Svc("a"))
        with pytest.raises(malla.RemoteError) as info:
            await b.remote(Svc, "fail", ["it went wrong"])
        err = info.value
        assert isinstance(err, malla.MallaError)
        assert err.exc_type == "builtins.ValueError"
        assert err.message == "it went wrong"
        assert "Traceback (most recent call last)" in err.traceback
        assert "in fail" in err.traceback
        assert err.traceback.rstrip("\n").splitlines()[-1] == "ValueError: it went wrong"

    with_nodes(main)


def test_excp_retries_runs_the_function_again():
    async def main(make):
        svc = Svc("a")
        _a, b = await pair(make, svc)
        retries = b.stats()["retries"]
        with pytest.raises(malla.RemoteError):
            await b.remote(Svc, "fail", ["again"], excp_retries=2, retries_sleep_msec=50)
        assert svc.runs == 3
        assert b.stats()["retries"] == retries + 2
        svc.runs = 0
        with pytest.raises(malla.RemoteError):
            await b.remote(Svc, "fail", ["once"])          # default: no retry
        assert svc.runs == 1

    with_nodes(main)


@pytest.mark.parametrize("loop", LOOPS)
def test_timeout_raises_call_timeout_and_cancels_remote_coroutine(loop):
    async def main(make):
        svc = Svc("a")
        _a, b = await pair(make, svc)
        t0 = time.monotonic()
        with pytest.raises(malla.CallTimeout) as info:
            await b.remote(Svc, "slow", [30], timeout=200)
        elapsed = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert 0.15 <= elapsed < 1.5, elapsed
        assert svc.entered.is_set()
        await asyncio.wait_for(svc.cancelled.wait(), 5)
        assert await b.remote(Svc, "add", [1, 1]) == 2     # the connection is fine

    with_nodes(main, loop=loop)


def test_caller_cancellation_cancels_remote_coroutine():
    async def main(make):
        svc = Svc("a")
        _a, b = await pair(make, svc)
        task = asyncio.ensure_future(b.remote(Svc, "slow", [30], timeout=30000))
        await asyncio.wait_for(svc.entered.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(svc.cancelled.wait(), 5)
        assert b.stats()["in_flight"] == 0
        assert await b.remote(Svc, "add", [2, 2]) == 4

    with_nodes(main)


def test_connection_lost_when_server_killed_mid_call():
    async def main():
        make, made = node_factory()
        proc = None
        try:
            b = await make("b", heartbeat_interval=0.2, heartbeat_timeout=10).start()
            proc = await spawn_node("doomed", seed_of(b))
            await wait_until(lambda: b.get_nodes("Echo") == ["doomed"])
            call = asyncio.ensure_future(
                b.remote("Echo", "hang", timeout=20000, excp_retries=0))
            assert (await read_line(proc, 10)).strip() == "ENTERED"
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(malla.ConnectionLost) as info:
                await asyncio.wait_for(call, 5)
            assert isinstance(info.value, ConnectionError)
            await wait_until(lambda: b.get_nodes("Echo") == [])
        finally:
            if proc is not None:
                kill_process(proc)
            await stop_all(made)

    run_async(main())


def test_deadline_bounds_the_whole_call():
    async def main(make):
        svc = Svc("a")
        _a, b = await pair(make, svc)
        # retry rounds draw from the deadline
        t0 = time.monotonic()
        with pytest.raises(malla.CallTimeout):
            await b.remote("Nowhere", "f", sna_retries=100, retries_sleep_msec=50,
                           deadline=300)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 1.3, elapsed
        # and so does a slow attempt, whatever its timeout
        t0 = time.monotonic()
        with pytest.raises(malla.CallTimeout):
            await b.remote(Svc, "slow", [30], timeout=10000, deadline=300)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 1.3, elapsed
        await asyncio.wait_for(svc.cancelled.wait(), 5)
        # a deadline that is long enough does not get in the way
        assert await b.remote(Svc, "add", [1, 2], deadline=5000) == 3

    with_nodes(main)


def test_remaining_deadline_travels_with_nested_calls():
    async def main(make):
        a = await make("a", check_interval=60).start()
        c = await make("c", check_interval=60, seeds=[seed_of(a)]).start()
        await a.start_service(Outer(a))
        await c.start_service(Inner())
        b = await make("b", check_interval=60, seeds=[seed_of(a)]).start()
        await wait_until(lambda: b.get_nodes(Outer) == ["a"] and a.get_nodes(Inner) == ["c"])
        mine, inner = await b.remote(Outer, "nested", deadline=5000)
        assert mine is not None and inner is not None
        assert 0 < inner <= mine <= 5000
        # in-process calls carry it the same way
        assert 0 < await c.remote(Inner, "remaining", deadline=3000) <= 3000
        await a.start_service(Inner())
        mine, inner = await a.remote(Outer, "nested", deadline=4000)
        assert 0 < inner <= mine <= 4000
        # no deadline given: none travels
        assert await b.remote(Inner, "remaining") is None
        mine, inner = await b.remote(Outer, "nested")
        assert mine is None and inner is None

    with_nodes(main)


def test_timeout_zero_is_a_cast():
    async def main(make):
        svc = Svc("a")
        a, b = await pair(make, svc)
        # returns at once, while the function is still waiting
        assert await b.remote(Svc, "gated_effect", ["remote-cast"], timeout=0) is None
        assert svc.effects == []
        svc.go.set()
        await wait_until(lambda: svc.effects == ["remote-cast"])
        assert await b.remote(Svc, "effect", ["plain"], timeout=0) is None
        await wait_until(lambda: svc.effects == ["remote-cast", "plain"])
        # in-process too
        svc.go.clear()
        assert await a.remote(Svc, "gated_effect", ["local-cast"], timeout=0) is None
        assert svc.effects == ["remote-cast", "plain"]
        svc.go.set()
        await wait_until(lambda: svc.effects[-1:] == ["local-cast"])
        # no node to take it
        with pytest.raises(malla.ServiceNotAvailable):
            await b.remote("Nowhere", "f", timeout=0, **FAST)

    with_nodes(main)


def test_in_process_call_without_network():
    async def main(make):
        svc = Svc("solo")
        a = await make("solo").start()
        await a.start_service(svc)
        assert a.peers() == []
        assert a.get_nodes(Svc) == ["solo"]
        assert await a.remote(Svc, "add", [2, 3]) == 5
        assert await a.remote(Svc, "where") == "solo"
        with pytest.raises(malla.RemoteError) as info:
            await a.remote(Svc, "fail", ["local failure"])
        assert info.value.exc_type == "builtins.ValueError"
        assert info.value.message == "local failure"
        assert info.value.traceback.rstrip().endswith("ValueError: local failure")
        with pytest.raises(malla.CallTimeout):
            await a.remote(Svc, "slow", [30], timeout=100)
        await asyncio.wait_for(svc.cancelled.wait(), 5)
        with pytest.raises(malla.UnknownFunction):
            await a.remote(Svc, "nope", **FAST)

    with_nodes(main)


def test_local_uses_the_running_instance():
    class Fresh(malla.Service):
        made = 0

        def __init__(self):
            Fresh.made += 1

        def ident(self):
            return id(self)

    async def main(make):
        svc = Svc("a")
        a = await make("a").start()
        await a.start_service(svc)
        assert await a.local(Svc, "ident") == id(svc)
        assert await a.local("Svc", "ident") == id(svc)
        assert await a.local(Svc, "add", [1], {"b": 2}) == 3
        # a class with none running: a fresh instance
        before = Fresh.made
        assert isinstance(await a.local(Fresh, "ident"), int)
        assert Fresh.made == before + 1
        # a name with none running
        with pytest.raises(malla.ServiceNotAvailable):
            await a.local("Fresh", "ident")

    with_nodes(main)


def test_call_cb_all_one_result_per_node_in_order():
    async def main(make):
        a = await make("a", check_interval=60).start()
        nodes = {"a": a}
        for name in ("c", "d"):
            nodes[name] = await make(name, check_interval=60, seeds=[seed_of(a)]).start()
        for name, node in nodes.items():
            await node.start_service(Svc(name, fail_here=name == "c"))
        b = await make("b", check_interval=60, seeds=[seed_of(a)]).start()
        await wait_until(lambda: sorted(b.get_nodes(Svc)) == ["a", "c", "d"]
                         and sorted(a.get_nodes(Svc)) == ["a", "c", "d"])
        for caller in (b, a):
            order = caller.get_nodes(Svc)
            assert await caller.call_cb_all(Svc, "where") == order
            results = await caller.call_cb_all(Svc, "maybe_fail", timeout=5000)
            assert len(results) == 3
            for node, result in zip(order, results, strict=True):
                if node == "c":
                    assert isinstance(result, malla.RemoteError)
                    assert result.message == "failing on c"
                else:
                    assert result == node
        assert a.get_nodes(Svc)[0] == "a"       # the local node first
        assert await b.call_cb_all("Nowhere", "f") == []

    with_nodes(main)


def test_encode_error_before_sending_names_the_path():
    async def main(make):
        svc = Svc("a")
        a, b = await pair(make, svc)
        calls_in = a.stats()["calls_in"]
        with pytest.raises(malla.EncodeError) as info:
            await b.remote(Svc, "effect", [{"k": [2, object()]}])
        assert isinstance(info.value, TypeError)
        assert "args[0]['k'][1]" in str(info.value)
        with pytest.raises(malla.EncodeError) as info:
            await b.remote(Svc, "effect", [], {"token": object()})
        assert "kwargs['token']" in str(info.value)
        assert a.stats()["calls_in"] == calls_in          # nothing was sent
        await asyncio.sleep(0.05)
        assert svc.effects == []
        assert await b.remote(Svc, "add", [1, 1]) == 2

    with_nodes(main)


def test_message_too_large_at_the_caller():
    async def main(make):
        svc = Svc("a")
        a, b = await pair(make, svc, max_message_size=64 << 10)
        calls_in = a.stats()["calls_in"]
        with pytest.raises(malla.MessageTooLarge) as info:
            await b.remote(Svc, "size", [b"y" * (100 << 10)], **FAST)
        assert isinstance(info.value, ValueError)
        assert a.stats()["calls_in"] == calls_in          # nothing was sent
        assert b.peers() == ["a"]
        assert await b.remote(Svc, "size", [b"y" * 1000]) == 1000

    with_nodes(main)


def test_message_too_large_at_the_receiver():
    async def main(make):
        svc = Svc("a")
        a = await make("a", check_interval=60, max_message_size=64 << 10).start()
        await a.start_service(svc)
        b = await make("b", check_interval=60, seeds=[seed_of(a)]).start()
        await wait_until(lambda: b.get_nodes(Svc) == ["a"])
        # within b's limit, beyond a's: a drops it and answers MessageTooLarge
        for size in (200 << 10, 3 << 20):          # one frame; several frames
            with pytest.raises(malla.MessageTooLarge):
                await b.remote(Svc, "size", [b"z" * size], **FAST)
        assert b.peers() == ["a"] and a.peers() == ["b"]
        assert await b.remote(Svc, "size", [b"z" * 1000]) == 1000

    with_nodes(main)


def test_reply_too_large_for_the_caller():
    async def main(make):
        _a, b = await pair(make, Svc("a"), max_message_size=64 << 10)
        for size in (200 << 10, 3 << 20):          # one frame; several frames
            with pytest.raises(malla.MessageTooLarge):
                await b.remote(Svc, "blob", [size], **FAST)
        assert b.peers() == ["a"]
        assert await b.remote(Svc, "blob", [1000]) == b"x" * 1000

    with_nodes(main)


def test_large_message_round_trips_while_small_calls_go_on():
    async def main(make):
        _a, b = await pair(make, Svc("a"))
        payload = os.urandom(6 << 20)               # 6 frames of 1 MiB, at least
        large = asyncio.ensure_future(b.remote(Svc, "echo", [payload], timeout=30000))
        await asyncio.sleep(0)
        small_done_before = 0
        i = 0
        while not large.done():
            assert await b.remote(Svc, "add", [i, 1], timeout=10000) == i + 1
            if not large.done():
                small_done_before += 1
            i += 1
        assert await large == payload
        assert small_done_before >= 1, "small calls waited for the whole large message"
        assert await b.remote(Svc, "blob", [5 << 20]) == b"x" * (5 << 20)

    with_nodes(main)


def test_in_process_coroutines_suspended_or_not():
    """An in-process async handler that finishes without suspending runs with
    no timer; one that suspends goes on under the timeout, gets values and
    exceptions through, and is cancelled with its caller."""
    class Mixed(malla.Service):
        cancelled = 0
        started = None

        async def now(self, x):
            return x + 1

        async def later(self, x):
            await asyncio.sleep(0.01)
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(fut.set_result, x * 2)
            return await fut

        async def fails_later(self):
            await asyncio.sleep(0)
            raise KeyError("k")

        async def hang(self):
            Mixed.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                Mixed.cancelled += 1
                raise

    async def main(make):
        node = await make("solo").start()
        await node.start_service(Mixed)
        Mixed.started = asyncio.Event()
        assert await node.remote("Mixed", "now", [1]) == 2
        assert await node.remote("Mixed", "later", [4]) == 8
        with pytest.raises(malla.RemoteError) as info:
            await node.remote("Mixed", "fails_later")
        assert info.value.exc_type == "builtins.KeyError"
        with pytest.raises(malla.CallTimeout):
            await node.remote("Mixed", "hang", timeout=50)
        assert Mixed.cancelled == 1
        Mixed.started.clear()
        task = asyncio.ensure_future(node.remote("Mixed", "hang"))
        await Mixed.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert Mixed.cancelled == 2
        assert node._hosting.entries["Mixed"].running == 0

    with_nodes(main)
