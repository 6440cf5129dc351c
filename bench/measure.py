"""The shared client loops and latency statistics.

Every system is measured by the same loop: the asyncio systems (floor, grpc,
malla) by ``async_load``, the thread-based ones (Pyro5, rpyc) by
``threaded_load``.  Both time each call with ``time.perf_counter_ns``, run a
warm-up first, and stop after ``max_calls`` calls or ``max_seconds`` seconds,
whichever comes first, so that every measurement is bounded in time.
The C floor's client is the same loop written in C (bench/cfloor/cfloor.c),
down to the call budgets and the sketch.

Latencies leave the process as a *sketch*: the 0th..1000th permille order
statistics of the sorted samples plus the sample count.  That keeps result
lines small and still lets the parent merge several clients' distributions
(clients16) and read p50/p99 from them.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SKETCH_POINTS = 1001  # order statistics at 0/1000, 1/1000, ..., 1000/1000


class AsyncConn(Protocol):
    """One client connection of an asyncio-based system."""

    def call(self, payload: bytes) -> Awaitable[Any]: ...

    async def close(self) -> None: ...


class SyncConn(Protocol):
    """One client connection of a thread-based system (one per thread)."""

    def adopt(self) -> None:
        """Make the connection usable from the calling thread (Pyro5 needs it)."""

    def call(self, payload: bytes) -> Any: ...

    def close(self) -> None: ...


@dataclass
class LoadSpec:
    """What one client measurement does."""

    payload_size: int
    concurrency: int
    max_calls: int
    max_seconds: float
    warmup_calls: int


@dataclass
class LoadResult:
    calls: int
    elapsed_s: float
    latencies_ns: list[int]

    def percentile_us(self, q: float) -> float | None:
        """The q-quantile (0..1) latency in microseconds, by nearest rank."""
        if not self.latencies_ns:
            return None
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "elapsed_s": self.elapsed_s,
            "sketch_ns": sketch(self.latencies_ns),
        }


def make_payload(size: int) -> bytes:
    """A payload of ``size`` bytes that is not all zeros (nothing compresses it away)."""
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


def growth_bytes(before_kib: int | None, after_kib: int | None, n: int) -> float | None:
    """RSS growth per item, in bytes, from two current-RSS readings in KiB."""
    if before_kib is None or after_kib is None:
        return None
    return (after_kib - before_kib) * 1024 / n


def sketch(samples: list[int]) -> list[int]:
    """The permille order statistics of ``samples`` (empty list for no samples)."""
    if not samples:
        return []
    ordered = sorted(samples)
    last = len(ordered) - 1
    return [ordered[round(i * last / (SKETCH_POINTS - 1))] for i in range(SKETCH_POINTS)]


def merged_percentile(sketches: Sequence[tuple[int, list[int]]], q: float) -> float | None:
    """The q-quantile (0..1) of several (count, sketch) distributions merged.

    Each sketch point stands for count/len(sketch) samples, so a client that
    made more calls weighs more, as it would with the raw samples.
    """
    weighted = [
        (value, count / len(points)) for count, points in sketches if points for value in points
    ]
    if not weighted:
        return None
    weighted.sort()
    total = sum(w for _, w in weighted)
    target = q * total
    running = 0.0
    for value, w in weighted:
        running += w
        if running >= target:
            return float(value)
    return float(weighted[-1][0])


def check_echo(result: Any, payload: bytes) -> None:
    """Raise unless ``result`` is the echoed ``payload``."""
    # Every system must really carry the payload both ways; a system that
    # returned something else would be measured doing less work.
    if result != payload:
        raise AssertionError(f"echo returned {type(result).__name__} of wrong value")


async def async_load(
    call: Callable[[], Awaitable[Any]],
    spec: LoadSpec,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> LoadResult:
    """Run ``call`` from ``spec.concurrency`` tasks, bounded by calls and time.

    ``ready`` is awaited between warm-up and measurement: several client
    processes use it to start measuring together (clients16).
    """
    latencies: list[int] = []

    async def worker(deadline_ns: int, quota: int, record: bool) -> None:
        now = time.perf_counter_ns
        append = latencies.append
        for _ in range(quota):
            t0 = now()
            if t0 >= deadline_ns:
                return
            await call()
            if record:
                append(now() - t0)

    async def run_round(calls: int, seconds: float, record: bool) -> float:
        quota = math.ceil(calls / spec.concurrency)
        start = time.perf_counter_ns()
        deadline = start + int(seconds * 1e9)
        await asyncio.gather(*(worker(deadline, quota, record) for _ in range(spec.concurrency)))
        return (time.perf_counter_ns() - start) / 1e9

    # Warm-up: the same loop, unrecorded, so connections, caches and lazy
    # imports are settled before the clock starts.
    await run_round(max(spec.warmup_calls, spec.concurrency), spec.max_seconds, record=False)
    if ready is not None:
        await ready()
    elapsed = await run_round(spec.max_calls, spec.max_seconds, record=True)
    return LoadResult(len(latencies), elapsed, latencies)


def threaded_load(
    conns: Sequence[SyncConn],
    payload: bytes,
    spec: LoadSpec,
    ready: Callable[[], None] | None = None,
) -> LoadResult:
    """Run one thread per connection, bounded by calls and time.

    Pyro5 and rpyc are synchronous: their users get concurrency from threads,
    each with its own proxy/connection, so that is what is measured.
    ``ready`` is called between warm-up and measurement, as in async_load.
    """

    def run_round(calls: int, seconds: float, record: bool) -> tuple[float, list[int]]:
        quota = math.ceil(calls / len(conns))
        per_thread: list[list[int]] = [[] for _ in conns]
        barrier = threading.Barrier(len(conns) + 1)
        deadline_box: list[int] = []
        failures: list[BaseException] = []

        def worker(conn: SyncConn, out: list[int]) -> None:
            conn.adopt()
            barrier.wait()
            deadline = deadline_box[0]
            now = time.perf_counter_ns
            try:
                for _ in range(quota):
                    t0 = now()
                    if t0 >= deadline:
                        return
                    conn.call(payload)
                    if record:
                        out.append(now() - t0)
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=worker, args=(c, out), daemon=True)
            for c, out in zip(conns, per_thread, strict=True)
        ]
        for t in threads:
            t.start()
        start = time.perf_counter_ns()
        deadline_box.append(start + int(seconds * 1e9))
        barrier.wait()  # all threads start together, after the deadline is set
        for t in threads:
            t.join()
        elapsed = (time.perf_counter_ns() - start) / 1e9
        if failures:
            raise failures[0]
        return elapsed, [x for out in per_thread for x in out]

    run_round(max(spec.warmup_calls, len(conns)), spec.max_seconds, record=False)
    if ready is not None:
        ready()
    elapsed, latencies = run_round(spec.max_calls, spec.max_seconds, record=True)
    return LoadResult(len(latencies), elapsed, latencies)
