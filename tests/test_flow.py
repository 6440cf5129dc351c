"""Flow control and fairness: no unbounded buffer, no head-of-line blocking."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from support import node_factory, run_async, spawn_python, stop_all, wait_until, with_nodes

import malla
from malla._ext import core
from malla._testbase import FakeTransport
from malla._testbase import RecordingOwner as Owner

CONSUMER = """
import sys, time, malla
class Sink(malla.Service, global_=True):
    def put(self, blob):
        end = time.perf_counter() + 0.001     # a slow consumer: 1 ms of CPU a call
        while time.perf_counter() < end:
            pass
        return len(blob)
async def main():
    node = malla.Node("consumer", port=0)
    await node.start()
    await node.start_service(Sink)
    print(node.address[1], flush=True)
    await asyncio.Event().wait()
import asyncio
malla.run(main())
"""


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.parametrize("size", [64 << 10, 512 << 10])
def test_fast_producer_slow_consumer_stays_bounded(size):
    """A producer casting 64 KiB (one frame each) or 512 KiB (large
    messages, sent in frames by reference) as fast as it can, far faster
    than the consumer's 1 ms per call, grows neither process by more than
    64 MiB (3 s here; 60 s in make soak)."""
    run_fast_producer(3.0, size)


def run_fast_producer(seconds: float, size: int = 64 << 10) -> None:
    proc = spawn_python(CONSUMER)

    async def main():
        port = int(proc.stdout.readline())
        make, made = node_factory()
        try:
            producer = await make("producer", seeds=[f"127.0.0.1:{port}"]).start()
            assert await producer.wait_for_services(["Sink"], retries=10)
            blob = os.urandom(size)
            for _ in range(20):   # warm up
                await producer.remote("Sink", "put", [blob])
            base_p, base_c = rss_mib(), rss_mib(proc.pid)
            sent = 0
            end = time.monotonic() + seconds
            peak_p = peak_c = 0.0
            proto = producer._cluster.connected["consumer"].proto
            held_back = False
            while time.monotonic() < end:
                held_back = held_back or proto.writing_paused
                await producer.remote("Sink", "put", [blob], timeout=0)
                sent += 1
                if sent % 200 == 0:
                    peak_p = max(peak_p, rss_mib() - base_p)
                    peak_c = max(peak_c, rss_mib(proc.pid) - base_c)
            peak_p = max(peak_p, rss_mib() - base_p)
            peak_c = max(peak_c, rss_mib(proc.pid) - base_c)
            print(f"\nsent {sent} casts of {size >> 10} KiB in {seconds:.0f} s; growth: producer "
                  f"{peak_p:.1f} MiB, "
                  f"consumer {peak_c:.1f} MiB")
            # the bound was tested: the producer ran into flow control (a
            # correctness condition, not a speed)
            assert held_back, "the producer never had to wait for the consumer"
            assert peak_p < 64, peak_p
            assert peak_c < 64, peak_c
            # and the connection still answers calls
            assert await producer.remote("Sink", "put", [b"x"], timeout=30000) == 1
        finally:
            await stop_all(made)
            proc.kill()
            proc.wait()

    run_async(main(), timeout=seconds + 120)


def frames_of(writes: list[bytes], max_frame: int) -> list[tuple[int, int, int]]:
    reader = core.FrameReader(max_frame)
    out = []
    for chunk in writes:
        out += [(t, f, sid) for t, f, sid, _ in reader.feed(chunk)]
    return out


def test_small_messages_never_wait_behind_more_than_one_large_frame():
    async def main():
        loop = asyncio.get_running_loop()
        proto = core.Protocol(Owner(), loop, True, {}, 1024, 1 << 20)
        transport = FakeTransport()
        proto.connection_made(transport)
        proto.set_ready("peer", 1024)
        big = b"x" * (8 * 1024)               # 8+ frames of 1 KiB
        proto.send_message(core.FT_ANNOUNCE, ["Big", {"blob": big}])
        proto.pause_writing()                 # the transport is congested
        for i in range(3):
            proto.call("Svc", "f", [i], None, 0, None, None)
        proto.send_message(core.FT_HEARTBEAT, None)
        assert proto.queued_large == 1
        proto.resume_writing()
        for _ in range(20):
            await asyncio.sleep(0)
        seq = frames_of(transport.writes, 1024)
        big_frames = [i for i, (t, _, _) in enumerate(seq) if t == core.FT_ANNOUNCE]
        small = [i for i, (t, _, _) in enumerate(seq) if t in (core.FT_CALL, core.FT_HEARTBEAT)]
        assert len(big_frames) >= 8 and len(small) == 4
        # what was queued ahead of each small message: at most one large frame
        for i in small:
            assert sum(1 for j in big_frames if j < i) <= 1, seq
        assert seq[big_frames[-1]][1] & core.FLAG_MORE == 0
        assert all(seq[j][1] & core.FLAG_MORE for j in big_frames[:-1])

    run_async(main())


def test_message_too_large_at_the_caller_keeps_the_connection():
    async def main(make):
        class Echo(malla.Service, global_=True):
            def echo(self, x):
                return x

        a = await make("a", max_message_size=256 * 1024).start()
        await a.start_service(Echo)
        b = await make("b", seeds=[f"127.0.0.1:{a.address[1]}"],
                       max_message_size=256 * 1024).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        try:
            await b.remote("Echo", "echo", [b"x" * (300 * 1024)])
            raise AssertionError("no MessageTooLarge")
        except malla.MessageTooLarge:
            pass
        assert await b.remote("Echo", "echo", [b"y" * 200_000]) == b"y" * 200_000

    with_nodes(main)


def test_large_messages_flow_without_waiting_and_buffers_shrink_after():
    """A message above max_frame_size is not held until some later traffic
    (heartbeats here come every 5 s), and both connections' buffers are
    small again once it has passed."""
    class Echo(malla.Service, global_=True):
        def echo(self, x):
            return x

    async def main(make):
        a = await make("a", heartbeat_interval=5, heartbeat_timeout=30).start()
        await a.start_service(Echo)
        b = await make("b", seeds=[f"127.0.0.1:{a.address[1]}"], heartbeat_interval=5,
                       heartbeat_timeout=30).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        for size in (1 << 20, 3 << 20, 8 << 20):
            blob = os.urandom(size)
            t0 = time.monotonic()
            assert await b.remote("Echo", "echo", [blob]) == blob
            assert time.monotonic() - t0 < 2.0, f"{size} bytes took too long"
        protos = (a._cluster.connected["b"].proto, b._cluster.connected["a"].proto)
        assert all(p.queued_large == 0 for p in protos)
        # kept while large messages come, given back once they stop
        await wait_until(lambda: all(p.read_buffer_capacity <= 64 * 1024 and
                                     p.write_buffer_capacity <= 64 * 1024
                                     for p in protos), timeout=5)

    with_nodes(main)


def test_per_call_timeouts_fire_in_order_and_the_heap_stays_bounded():
    """The core's one-timer-per-connection heap: unanswered calls time out
    no earlier than their own timeout, answered ones never, and the heap
    of deadlines stays within 2x the calls in flight (plus slack)."""
    import random

    async def main():
        loop = asyncio.get_running_loop()
        proto = core.Protocol(Owner(), loop, True, {}, 1 << 20, 1 << 20)
        proto.connection_made(FakeTransport())
        proto.set_ready("peer", 1 << 20)
        rng = random.Random(7)
        calls = []
        for _ in range(2000):
            timeout = rng.randint(20, 300)
            fut = proto.call("Svc", "f", [], None, timeout, None, None)
            calls.append((loop.time(), timeout, proto.last_sid, fut))
            assert proto.timer_heap_len <= 2 * proto.in_flight + 257
        answered = set()
        for _start, _timeout, sid, _fut in calls:
            if rng.random() < 0.5:
                frame = core.build_frame(core.FT_REPLY, 0, sid, core.packb(sid))
                buf = proto.get_buffer(len(frame))
                buf[:len(frame)] = frame
                proto.buffer_updated(len(frame))
                answered.add(sid)
        ended: dict[int, float] = {}
        for _, _, sid, fut in calls:
            fut.add_done_callback(lambda f, sid=sid: ended.setdefault(sid, loop.time()))
        await asyncio.wait([f for *_, f in calls], timeout=5)
        for start, timeout, sid, fut in calls:
            if sid in answered:
                assert fut.result() == sid
            else:
                assert isinstance(fut.exception(), malla.CallTimeout)
                assert ended[sid] - start >= timeout / 1000 - 0.002
        assert proto.in_flight == 0

    run_async(main())
