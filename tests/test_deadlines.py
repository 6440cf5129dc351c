"""Hard deadlines in every fault mode, and cancellation down a call tree."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from support import (
    COOKIE,
    ROOT,
    free_port,
    node_factory,
    run_async,
    seed_of,
    stop_all,
    wait_until,
    with_nodes,
)

import malla
from malla import context

from netns import Topology

NODEPROC = os.path.join(ROOT, "tests", "nodeproc.py")
DEADLINE_MS = 800
SLACK = 1.0


class Hang(malla.Service, global_=True):
    entered = 0
    cancelled = 0

    async def forever(self):
        Hang.entered += 1
        try:
            await asyncio.Event().wait()      # a callee that never answers
        except asyncio.CancelledError:
            Hang.cancelled += 1
            raise


async def assert_bounded(call, deadline_ms=DEADLINE_MS):
    t0 = time.monotonic()
    with pytest.raises(malla.MallaError) as info:
        await call
    took = time.monotonic() - t0
    assert took <= deadline_ms / 1000 + SLACK, f"{took:.3f} s for a {deadline_ms} ms deadline"
    return info.value


def test_deadline_with_a_dead_port_and_retries():
    async def main(make):
        node = await make("caller", seeds=[f"127.0.0.1:{free_port()}"]).start()
        exc = await assert_bounded(node.remote("Nobody", "f", sna_retries=1000,
                                               retries_sleep_msec=50,
                                               deadline=DEADLINE_MS))
        assert isinstance(exc, malla.CallTimeout)

    with_nodes(main)


def test_deadline_with_a_deadlocked_callee_and_exception_retries():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Hang)
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Hang"], retries=5)
        exc = await assert_bounded(b.remote("Hang", "forever", timeout=300, excp_retries=50,
                                            retries_sleep_msec=10, deadline=DEADLINE_MS))
        assert isinstance(exc, malla.CallTimeout)
        await wait_until(lambda: Hang.cancelled == Hang.entered, timeout=3)

    with_nodes(main)


def _spawn(argv, **kw):
    env = dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=ROOT)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True, **kw)


def test_deadline_with_a_stopped_peer():
    proc = _spawn([sys.executable, NODEPROC, "sleepy", "--hb-timeout", "30"])

    async def main():
        port = int(proc.stdout.readline().split()[1])
        make, made = node_factory()
        try:
            node = await make("caller", seeds=[f"127.0.0.1:{port}"]).start()
            assert await node.wait_for_services(["Echo"], retries=10)
            call = asyncio.ensure_future(node.remote("Echo", "sleep", [5], deadline=DEADLINE_MS))
            await asyncio.sleep(0.05)
            os.kill(proc.pid, signal.SIGSTOP)
            exc = await assert_bounded(call)
            assert isinstance(exc, malla.CallTimeout)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            await stop_all(made)
            proc.kill()
            proc.wait()

    run_async(main())


class LossyProxy:
    """Forwards TCP both ways; `drop_replies` black-holes server -> client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.drop_replies = False

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src, dst, lossy):
            try:
                while data := await src.read(65536):
                    if not (lossy and self.drop_replies):
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))


def test_deadline_when_the_reply_is_lost_on_the_way():
    class Slowish(malla.Service, global_=True):
        ran = 0

        async def work(self):
            await asyncio.sleep(0.1)
            Slowish.ran += 1
            return "done"

    async def main(make):
        a = await make("a", heartbeat_timeout=30, udp_heartbeat=False).start()
        await a.start_service(Slowish)
        proxy = LossyProxy(a.address[1])
        port = await proxy.start()
        b = await make("b", heartbeat_timeout=30, udp_heartbeat=False).start()
        await b.connect(f"127.0.0.1:{port}")
        assert await b.wait_for_services(["Slowish"], retries=5)
        assert await b.remote("Slowish", "work") == "done"
        proxy.drop_replies = True
        exc = await assert_bounded(b.remote("Slowish", "work", deadline=DEADLINE_MS))
        assert isinstance(exc, malla.CallTimeout)
        assert Slowish.ran == 2          # it ran: "may have run" was the right answer

    with_nodes(main)


def test_deadline_with_a_black_holed_peer_in_a_namespace():
    with Topology(["h1"]) as topo:
        proc = topo.run("h1", [sys.executable, NODEPROC, "h1", "--host", topo.addr("h1"),
                               "--hb-timeout", "30"], stdout=subprocess.PIPE, text=True,
                        env=dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=ROOT))

        async def main():
            port = int(proc.stdout.readline().split()[1])
            make, made = node_factory()
            try:
                node = await make("caller", host=topo.gateway, heartbeat_timeout=30,
                                  seeds=[f"{topo.addr('h1')}:{port}"]).start()
                assert await node.wait_for_services(["Echo"], retries=10)
                assert await node.remote("Echo", "echo", [1]) == 1
                topo.cut("h1")
                exc = await assert_bounded(node.remote("Echo", "echo", [2], excp_retries=3,
                                                       retries_sleep_msec=50,
                                                       deadline=DEADLINE_MS))
                assert isinstance(exc, malla.CallTimeout)
            finally:
                await stop_all(made)

        run_async(main())


class Inner(malla.Service, global_=True):
    cancelled = 0
    seen_budget: list[float] = []

    async def wait(self):
        Inner.seen_budget.append(context.remaining_ms())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Inner.cancelled += 1
            raise


class Outer(malla.Service, global_=True):
    node: malla.Node

    async def relay(self):
        return await Outer.node.remote("Inner", "wait")


def test_cancelling_the_outer_call_cancels_the_whole_tree():
    async def main(make):
        c = await make("c").start()
        await c.start_service(Inner)
        b = await make("b", seeds=[seed_of(c)]).start()
        Outer.node = b
        await b.start_service(Outer)
        a = await make("a", seeds=[seed_of(b)]).start()
        assert await a.wait_for_services(["Outer"], retries=5)
        await wait_until(lambda: b.get_nodes("Inner") == ["c"])
        outer = asyncio.ensure_future(a.remote("Outer", "relay", deadline=5000))
        await wait_until(lambda: len(Inner.seen_budget) == 1)
        assert 0 < Inner.seen_budget[0] < 5000          # the budget travelled two hops
        outer.cancel()
        await wait_until(lambda: Inner.cancelled == 1, timeout=3)
        await wait_until(lambda: b.stats()["in_flight"] == 0 and
                         all(e.running == 0 for e in b._hosting.entries.values()))

    with_nodes(main)


def test_ten_thousand_cancelled_calls_leave_nothing_running():
    class Park(malla.Service, global_=True):
        async def park(self):
            await asyncio.sleep(60)

    async def main(make):
        a = await make("a").start()
        await a.start_service(Park)
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Park"], retries=5)
        tasks = [asyncio.ensure_future(b.remote("Park", "park")) for _ in range(10_000)]
        await wait_until(lambda: a._cluster.connected["b"].proto.running == 10_000, timeout=30)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        proto_a, proto_b = a._cluster.connected["b"].proto, b._cluster.connected["a"].proto
        await wait_until(lambda: proto_a.running == 0 and a._hosting.entries["Park"].running == 0,
                         timeout=30)
        assert proto_b.in_flight == 0
        handler_tasks = [t for t in asyncio.all_tasks() if "RunningService._run" in repr(t)]
        assert handler_tasks == []
        assert b.stats()["in_flight"] == 0

    with_nodes(main, timeout=120)
