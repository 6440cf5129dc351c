"""Liveness that a busy handler does not fake, and a blocked loop that is named."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import node_factory, run_async, spawn_python, stop_all, wait_until

import malla
from malla.heartbeat import HeartbeatThread
from malla.liveness import Liveness

BLOCKER = """
import sys, time, asyncio, malla
class Blocker(malla.Service, global_=True):
    def block(self, seconds):
        time.sleep(seconds)          # a plain def holding the event loop
        return "unblocked"
    def ping(self):
        return "pong"
async def main():
    node = malla.Node("busy", port=0, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    await node.start()
    await node.start_service(Blocker)
    print(node.address[1], flush=True)
    await asyncio.Event().wait()
malla.run(main())
"""


def test_blocked_loop_is_not_a_dead_node():
    proc = spawn_python(BLOCKER)

    async def main():
        port = int(proc.stdout.readline())
        make, made = node_factory()
        try:
            obs = await make("obs", seeds=[f"127.0.0.1:{port}"], heartbeat_interval=0.2,
                             heartbeat_timeout=1.0).start()
            assert await obs.wait_for_services(["Blocker"], retries=10)
            blocking = asyncio.ensure_future(obs.remote("Blocker", "block", [3.0]))
            await asyncio.sleep(0.2)
            # a call to the blocked node still ends by its timeout
            t0 = time.monotonic()
            with pytest.raises(malla.CallTimeout):
                await obs.remote("Blocker", "ping", timeout=300)
            assert time.monotonic() - t0 < 0.3 + 1.0
            # three heartbeat timeouts pass: the busy node stays a peer
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                assert obs.peers() == ["busy"]
                assert obs.get_nodes("Blocker") == ["busy"]
                await asyncio.sleep(0.05)
            assert await blocking == "unblocked"
            assert await obs.remote("Blocker", "ping") == "pong"
        finally:
            await stop_all(made)
            proc.kill()
        _, err = proc.communicate(timeout=10)
        assert "Blocker.block blocked the event loop for" in err

    run_async(main())


def test_without_udp_heartbeats_a_blocked_loop_looks_dead():
    """The control case: the same block with only in-loop heartbeats drops the
    node, which is what the heartbeat thread prevents."""
    code = BLOCKER.replace("heartbeat_timeout=1.0)", "heartbeat_timeout=1.0, udp_heartbeat=False)")
    proc = spawn_python(code)

    async def main():
        port = int(proc.stdout.readline())
        make, made = node_factory()
        try:
            obs = await make("obs", seeds=[f"127.0.0.1:{port}"], heartbeat_interval=0.2,
                             heartbeat_timeout=1.0, udp_heartbeat=False).start()
            assert await obs.wait_for_services(["Blocker"], retries=10)
            blocking = asyncio.ensure_future(obs.remote("Blocker", "block", [3.0]))
            await wait_until(lambda: obs.peers() == [], timeout=3.0)
            with pytest.raises(malla.ConnectionLost):
                await blocking
        finally:
            await stop_all(made)
            proc.kill()
            proc.wait()

    run_async(main())


def test_udp_heartbeats_are_authenticated_and_not_replayable():
    live_a, live_b = Liveness(), Liveness()
    a = HeartbeatThread("a", 1, b"cookie-0123456789abcdef", "127.0.0.1", 0.05, live_a)
    b = HeartbeatThread("b", 2, b"cookie-0123456789abcdef", "127.0.0.1", 0.05, live_b)
    evil = HeartbeatThread("a", 1, b"another-cookie-entirely", "127.0.0.1", 0.05, Liveness())
    try:
        b.add("a", ("127.0.0.1", a.port), 1)
        # a datagram with the wrong cookie is ignored
        b._receive(evil._datagram())
        assert live_b.last_heard("a") is None
        good = a._datagram()
        b._receive(good)
        first = live_b.last_heard("a")
        assert first is not None
        time.sleep(0.01)
        b._receive(good)                                # replayed: ignored
        assert live_b.last_heard("a") == first
        b.add("a", ("127.0.0.1", a.port), 99)           # a new incarnation of "a"
        b._receive(a._datagram())
        assert live_b.last_heard("a") == first
        # the threads feed liveness over real UDP
        b.add("a", ("127.0.0.1", a.port), 1)
        a.add("b", ("127.0.0.1", b.port), 2)
        a.start()
        b.start()
        deadline = time.monotonic() + 5
        while (live_a.last_heard("b") is None or live_b.last_heard("a") == first) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live_a.last_heard("b") is not None
        assert live_b.last_heard("a") > first
    finally:
        for t in (a, b):
            if t._thread.is_alive():
                t.stop()
        evil._sock.close()
