"""Services over real loopback TCP: what is exported, the class keywords,
global vs local services, sync/async/blocking functions, the service_cb_in
hook and its opts, start/stop/pause/resume, and max_concurrency."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from support import RawPeer, seed_of, wait_until, with_nodes

import malla
from malla._ext import core
from malla.exceptions import ERR_UNKNOWN_FUNCTION

FAST = {"sna_retries": 0, "retries_sleep_msec": 50, "timeout": 5000}


class Base(malla.Service):
    def inherited(self):
        return "inherited"


class Exporter(Base, global_=True):
    counter = 0                       # a class attribute: not callable
    ran: list[str] = []               # what ran that should not have

    def __init__(self):
        if getattr(self, "_started", False):
            Exporter.ran.append("__init__")   # run again on a live instance
        self.instance_attr = 1
        self._started = True

    def visible(self, x, y=2):
        return x + y

    async def async_visible(self):
        return "async"

    @malla.blocking
    def blocking_visible(self):
        return "blocking"

    def _private(self):
        Exporter.ran.append("_private")
        return "private"

    def __call__(self):
        Exporter.ran.append("__call__")
        return "dunder"

    def __len__(self):
        Exporter.ran.append("__len__")
        return 1

    def __repr__(self):
        Exporter.ran.append("__repr__")
        return "Exporter()"


class Hooked(malla.Service, global_=True):
    """Overrides the hook: it must intercept, never be callable itself."""

    def __init__(self):
        self.hook_calls: list[str] = []

    def service_cb_in(self, fun, args, kwargs, opts):
        self.hook_calls.append(fun)
        return super().service_cb_in(fun, args, kwargs, opts)

    def ping(self):
        return "pong"


EXPORTED = {"visible", "async_visible", "blocking_visible", "inherited"}
NOT_EXPORTED = ["_private", "__call__", "__len__", "__repr__", "__init__", "__class__",
                "__dict__", "__init_subclass__", "counter", "ran", "instance_attr",
                "_started", "_malla_name", "service_cb_in", "no_such_function"]


async def pair(make, *services, **b_opts):
    """a runs `services`; b is connected to it and has learned a's table."""
    a = await make("a", check_interval=60).start()
    for svc in services:
        await a.start_service(svc)
    b = await make("b", seeds=[seed_of(a)], check_interval=60, **b_opts).start()
    await wait_until(lambda: "a" in b.peers() and all(
        b.get_nodes(type(s)) for s in services if type(s)._malla_global))
    return a, b


def test_exported_functions_and_their_signatures():
    async def main(make):
        a, b = await pair(make, Exporter(), Hooked())
        for node in (a, b):
            [(where, info)] = node.get_instances(Exporter)
            assert where == "a"
            assert set(info["functions"]) == EXPORTED
            [(_, hooked)] = node.get_instances("Hooked")
            assert set(hooked["functions"]) == {"ping"}
        [(_, info)] = b.get_instances(Exporter)
        # names, kinds and defaults announced (self excluded)
        assert [p[0] for p in info["functions"]["visible"]] == ["x", "y"]
        assert [p[2] for p in info["functions"]["visible"]] == [False, True]
        assert await b.remote(Exporter, "visible", [1]) == 3
        assert await b.remote(Exporter, "visible", [1], {"y": 5}) == 6
        assert await b.remote(Exporter, "async_visible") == "async"
        assert await b.remote(Exporter, "blocking_visible") == "blocking"
        assert await b.remote(Exporter, "inherited") == "inherited"

    with_nodes(main)


def test_unexported_names_raise_unknown_function_and_nothing_runs():
    async def main(make):
        Exporter.ran.clear()
        hooked = Hooked()
        a, b = await pair(make, Exporter(), hooked)
        failovers = b.stats()["failovers"]
        for fun in NOT_EXPORTED:
            # through remote() (the caller may refuse before sending) ...
            with pytest.raises(malla.UnknownFunction) as info:
                await b.remote(Exporter, fun, **FAST)
            assert isinstance(info.value, AttributeError)
            # ... and in-process on the serving node
            with pytest.raises(malla.UnknownFunction):
                await a.remote(Exporter, fun, **FAST)
            with pytest.raises(malla.UnknownFunction):
                await a.local(Exporter, fun)
            with pytest.raises(malla.UnknownFunction):
                await b.remote(Hooked, fun, **FAST)
        assert b.stats()["failovers"] == failovers    # never failed over
        # The serving node refuses them by itself, whatever a caller sends.
        raw = await RawPeer.connect(a, "raw")
        try:
            for fun in NOT_EXPORTED:
                for service in ("Exporter", "Hooked"):
                    ftype, body = await raw.call(service, fun)
                    assert ftype == core.FT_ERROR, (service, fun, body)
                    assert body[0] == ERR_UNKNOWN_FUNCTION, (service, fun, body)
            ftype, body = await raw.call("Exporter", "visible", [40])
            assert (ftype, body) == (core.FT_REPLY, 42)
        finally:
            raw.close()
        assert Exporter.ran == []
        assert hooked.hook_calls == []
        assert await b.remote(Hooked, "ping") == "pong"
        assert hooked.hook_calls == ["ping"]

    with_nodes(main)


def test_class_keywords():
    class Plain(malla.Service):
        def f(self):
            return 1

    class Custom(malla.Service, name="custom-name", vsn="2.1.0", global_=True,
                 max_concurrency=3):
        def f(self):
            return "custom"

    assert Plain._malla_name == "Plain"
    assert Plain._malla_vsn == "0"
    assert Plain._malla_global is False
    with pytest.raises(ValueError):
        class Bad(malla.Service, max_concurrency=0):
            pass

    async def main(make):
        _, b = await pair(make, Custom())
        assert b.get_nodes("custom-name") == ["a"]
        assert b.get_nodes(Custom) == ["a"]
        assert b.get_nodes("Custom") == []
        [(_, info)] = b.get_instances(Custom)
        assert info["vsn"] == "2.1.0"
        assert info["global"] is True
        assert info["max_concurrency"] == 3
        assert await b.remote("custom-name", "f") == "custom"
        assert await b.remote(Custom, "f") == "custom"

    with_nodes(main)


def test_non_global_service_is_local_only():
    class Announced(malla.Service, global_=True):
        def f(self):
            return "announced"

    class LocalOnly(malla.Service):
        def where(self):
            return "here"

    async def main(make):
        a, b = await pair(make, Announced(), LocalOnly())
        assert a.get_nodes(LocalOnly) == ["a"]
        assert await a.remote(LocalOnly, "where") == "here"
        assert await a.local(LocalOnly, "where") == "here"
        assert b.get_nodes(LocalOnly) == []          # not announced
        assert b.get_nodes(Announced) == ["a"]       # (the table did arrive)
        with pytest.raises(malla.ServiceNotAvailable):
            await b.remote(LocalOnly, "where", **FAST)
        # and even a caller that sends it anyway is refused
        raw = await RawPeer.connect(a, "raw")
        try:
            ftype, body = await raw.call("LocalOnly", "where")
            assert ftype == core.FT_ERROR and body[0] != ERR_UNKNOWN_FUNCTION
        finally:
            raw.close()

    with_nodes(main)


def test_sync_async_and_blocking_functions():
    class Kinds(malla.Service, global_=True):
        def sync(self, x):
            return ("sync", x, threading.get_ident())

        async def coro(self, x):
            await asyncio.sleep(0.01)
            return ("async", x, threading.get_ident())

        @malla.blocking
        def blocking(self, x):
            threading.Event().wait(0.05)       # really blocks: not on the loop
            return ("blocking", x, threading.get_ident())

    async def main(make):
        a, b = await pair(make, Kinds())
        loop_thread = threading.get_ident()   # both nodes run on this loop
        for caller in (b, a):                 # remote, then in-process
            kind, x, tid = await caller.remote(Kinds, "sync", [1])
            assert (kind, x, tid) == ("sync", 1, loop_thread)
            kind, x, tid = await caller.remote(Kinds, "coro", [2])
            assert (kind, x, tid) == ("async", 2, loop_thread)
            kind, x, tid = await caller.remote(Kinds, "blocking", [3])
            assert (kind, x) == ("blocking", 3) and tid != loop_thread
        # a blocking function does not block the loop: others run meanwhile
        slow = [asyncio.ensure_future(b.remote(Kinds, "blocking", [i])) for i in range(4)]
        assert (await b.remote(Kinds, "sync", [9]))[1] == 9
        assert [r[1] for r in await asyncio.gather(*slow)] == [0, 1, 2, 3]

    with_nodes(main)


class SeenDef(malla.Service, global_=True):
    def __init__(self):
        self.seen: list[tuple] = []

    def service_cb_in(self, fun, args, kwargs, opts):
        self.seen.append((fun, args, kwargs, dict(opts)))
        return super().service_cb_in(fun, args, kwargs, opts)

    def add(self, a, b=0):
        return a + b

    async def aadd(self, a, b=0):
        return a + b


class SeenAsync(malla.Service, global_=True):
    def __init__(self):
        self.seen: list[tuple] = []

    async def service_cb_in(self, fun, args, kwargs, opts):
        await asyncio.sleep(0)
        self.seen.append((fun, args, kwargs, dict(opts)))
        result = super().service_cb_in(fun, args, kwargs, opts)
        if inspect.isawaitable(result):
            result = await result
        return result

    def add(self, a, b=0):
        return a + b

    async def aadd(self, a, b=0):
        return a + b


@pytest.mark.parametrize("cls", [SeenDef, SeenAsync], ids=["def-hook", "async-hook"])
def test_service_cb_in_sees_fun_args_kwargs_and_opts(cls):
    async def main(make):
        svc = cls()
        a, b = await pair(make, svc)
        meta = {"trace_id": "abc", "nested": [1, (2, 3)], "n": None}
        for caller in (b, a):                   # remote, then in-process
            svc.seen.clear()
            assert await caller.remote(cls, "add", [1, 2], timeout=7000, meta=meta) == 3
            assert await caller.remote(cls, "aadd", [1], {"b": 5}, timeout=6000) == 6
            assert await caller.remote(cls, "add", (4,)) == 4
            (f1, a1, k1, o1), (f2, a2, k2, o2), (f3, a3, k3, o3) = svc.seen
            assert (f1, a1, k1) == ("add", [1, 2], {})
            assert type(a1) is list and type(k1) is dict
            assert (f2, a2, k2) == ("aadd", [1], {"b": 5})
            assert (f3, a3, k3) == ("add", [4], {})
            assert type(a3) is list
            for opts in (o1, o2, o3):
                assert opts["caller"] == caller.name
            assert (o1["timeout"], o2["timeout"], o3["timeout"]) == (7000, 6000, 15000)
            assert o1["meta"] == meta and o2["meta"] is None
        # node.local() goes through the hook too
        svc.seen.clear()
        assert await a.local(cls, "add", [2, 2]) == 4
        [(fun, args, kwargs, opts)] = svc.seen
        assert (fun, args, kwargs, opts["caller"]) == ("add", [2, 2], {}, "a")

    with_nodes(main)


class Where(malla.Service, global_=True):
    def __init__(self, node_name: str):
        self.node_name = node_name

    def where(self):
        return self.node_name


async def trio(make):
    """a and c run Where; b calls it."""
    a = await make("a", check_interval=60).start()
    c = await make("c", check_interval=60, seeds=[seed_of(a)]).start()
    await a.start_service(Where("a"))
    await c.start_service(Where("c"))
    # (Malla's order: these tests follow a call along get_nodes())
    b = await make("b", check_interval=60, seeds=[seed_of(a)], balance="shuffle").start()
    await wait_until(lambda: sorted(b.get_nodes(Where)) == ["a", "c"])
    return {"a": a, "c": c}, b


def test_start_and_stop_service():
    async def main(make):
        servers, b = await trio(make)
        with pytest.raises(ValueError):
            await servers["a"].start_service(Where("again"))   # already running
        first, second = b.get_nodes(Where)
        assert await b.remote(Where, "where") == first
        # stop on the first: a call that still reaches it fails over
        await servers[first].stop_service(Where)
        assert b.get_nodes(Where)[0] == first                  # b has not heard yet
        failovers = b.stats()["failovers"]
        assert await b.remote(Where, "where", **FAST) == second
        assert b.stats()["failovers"] == failovers + 1
        await wait_until(lambda: b.get_nodes(Where) == [second])
        assert servers[first].get_nodes(Where) == [second]
        assert await b.remote(Where, "where") == second
        with pytest.raises(malla.ServiceNotAvailable):
            await servers[first].stop_service(Where)           # not running any more
        # stopped everywhere: ServiceNotAvailable
        await servers[second].stop_service("Where")
        await wait_until(lambda: b.get_nodes(Where) == [])
        with pytest.raises(malla.ServiceNotAvailable):
            await b.remote(Where, "where", **FAST)
        assert b.get_services()["Where"] == []
        # and back
        await servers[first].start_service(Where(first))
        await wait_until(lambda: b.get_nodes(Where) == [first])
        assert await b.remote(Where, "where") == first

    with_nodes(main)


def test_pause_and_resume_service():
    async def main(make):
        servers, b = await trio(make)
        first, second = b.get_nodes(Where)
        await servers[first].pause_service(Where)
        # b's table still lists it: the call reaches it, is refused, fails over
        assert b.get_nodes(Where)[0] == first
        failovers = b.stats()["failovers"]
        assert await b.remote(Where, "where", **FAST) == second
        assert b.stats()["failovers"] == failovers + 1
        # then the announcement drops it from the peers' get_nodes
        await wait_until(lambda: b.get_nodes(Where) == [second])
        await wait_until(lambda: servers[second].get_nodes(Where) == [second])
        assert servers[first].get_nodes(Where) == [second]   # not even local first
        for _ in range(3):
            assert await b.remote(Where, "where") == second
        assert await servers[first].remote(Where, "where") == second
        # paused, not stopped: still registered on its node
        with pytest.raises(ValueError):
            await servers[first].start_service(Where("dup"))
        assert "Where" in servers[first].get_services()
        # paused everywhere: ServiceNotAvailable
        await servers[second].pause_service(Where)
        await wait_until(lambda: b.get_nodes(Where) == [])
        with pytest.raises(malla.ServiceNotAvailable):
            await b.remote(Where, "where", **FAST)
        await servers[first].resume_service(Where)
        await wait_until(lambda: b.get_nodes(Where) == [first])
        assert await b.remote(Where, "where") == first
        assert servers[first].get_nodes(Where) == [first]
        await servers[second].resume_service(Where)
        await wait_until(lambda: sorted(b.get_nodes(Where)) == ["a", "c"])
        with pytest.raises(malla.ServiceNotAvailable):
            await servers[first].pause_service("NoSuchService")

    with_nodes(main)


class Gate(malla.Service, global_=True, max_concurrency=1):
    def __init__(self, node_name: str):
        self.node_name = node_name
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self):
        self.entered.set()
        await self.release.wait()
        return self.node_name

    def where(self):
        return self.node_name


def test_max_concurrency_overloaded_without_another_node():
    async def main(make):
        gate = Gate("a")
        a, b = await pair(make, gate)
        held = asyncio.ensure_future(b.remote(Gate, "hold"))
        await asyncio.wait_for(gate.entered.wait(), 5)
        with pytest.raises(malla.Overloaded) as info:
            await b.remote(Gate, "where", **FAST)
        assert isinstance(info.value, malla.ServiceNotAvailable)
        # a's hint of when it has room (version 2): b skips a until then
        hint = info.value.retry_after_ms
        assert type(hint) is int and hint >= 1
        # in-process callers hit the same limit
        with pytest.raises(malla.Overloaded):
            await a.remote(Gate, "where", **FAST)
        gate.release.set()
        assert await held == "a"
        # the slot is free again (for b once a's hint has passed)
        await asyncio.sleep(hint / 1000 + 0.01)
        assert await b.remote(Gate, "where", **FAST) == "a"
        assert await a.remote(Gate, "where", **FAST) == "a"

    with_nodes(main)


def test_max_concurrency_fails_over_to_another_node():
    async def main(make):
        a = await make("a", check_interval=60).start()
        c = await make("c", check_interval=60, seeds=[seed_of(a)]).start()
        gates = {"a": Gate("a"), "c": Gate("c")}
        await a.start_service(gates["a"])
        await c.start_service(gates["c"])
        # (Malla's order: with p2c the busy node would not be tried first at
        # all, its call in flight making it the dearer one: tests/test_balance.py)
        b = await make("b", check_interval=60, seeds=[seed_of(a)], balance="shuffle").start()
        await wait_until(lambda: sorted(b.get_nodes(Gate)) == ["a", "c"])
        first, second = b.get_nodes(Gate)
        held = asyncio.ensure_future(b.remote(Gate, "hold"))
        await asyncio.wait_for(gates[first].entered.wait(), 5)
        failovers = b.stats()["failovers"]
        assert await b.remote(Gate, "where", **FAST) == second
        assert b.stats()["failovers"] == failovers + 1
        assert not gates[second].entered.is_set()
        gates[first].release.set()
        assert await held == first

    with_nodes(main)
