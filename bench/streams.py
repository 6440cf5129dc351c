"""Streaming calls (issue 16), beside the main table: items per second of
one stream and of 100 concurrent streams, for 16 B items and 64 KiB
chunks, side by side in one run with

* a gRPC server-streaming call (grpc.aio, a generic unary-stream handler
  with msgpack serializers, as bench/peers_grpc.py's unary one), and
* paging by repeated ``remote()`` calls, 100 items per page (16 for 64 KiB
  chunks: 1 MiB a page; what a malla
  user did before streams), the page's items made by the same generator
  and iterated by the client one by one, as the stream's are;

and the memory of a producer whose consumer reads slowly (64 KiB chunks,
a consumer taking one every 5 ms): the peak of what each process
allocated meanwhile (tracemalloc: Python objects and the core's buffers),
the producer's against the window's worth of chunks at the consumer.

    python -m bench.streams [--short] [--json PATH]

Each server runs in its own process (``python -m bench.streams serve
malla|grpc``) on 127.0.0.1 only; the client is this process (uvloop for
malla, the default loop for grpc.aio, as its users run it).  Every figure
is the median of --repeat runs (3; 1 with --short).  Results go to
bench/results/streams.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvloop

import malla
from bench.procs import HOST, REPO_ROOT

COOKIE = "bench-streams-cookie-8d2c61f0ab"
SMALL = 16
CHUNK = 64 * 1024
PAGE = 100
CHUNK_PAGE = 16
CONCURRENT = 100
_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.enable_http_proxy", 0)]


class Source(malla.Service, global_=True):
    """The producer: `n` items of `size` bytes, as a stream or a page."""

    async def items(self, n: int, size: int) -> AsyncIterator[bytes]:
        item = b"x" * size
        for _ in range(n):
            yield item

    async def fresh(self, n: int, size: int) -> AsyncIterator[bytes]:
        # (new memory each: what a producer of file chunks holds)
        for _ in range(n):
            yield os.urandom(size)

    async def page(self, start: int, count: int, size: int) -> list[bytes]:
        # (the same generator makes a page's items: the comparison is of
        # how they travel, not of how they are made)
        return [item async for item in self.items(count, size)]


def _trace_start() -> None:
    tracemalloc.start()
    tracemalloc.reset_peak()


def _trace_stop(baseline: int) -> float:
    """The peak of what this process allocated (Python objects and the
    core's buffers, all through Python's allocators) above `baseline`, in
    KiB, since _trace_start(); tracing stops."""
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return max(peak - baseline, 0) / 1024


class Probe(malla.Service, global_=True):
    """What the producer process itself holds while a consumer reads
    slowly: its traced allocations (tracemalloc), not its RSS, which a heap
    grown by earlier measurements hides."""

    baseline = 0

    def trace_start(self) -> None:
        _trace_start()
        Probe.baseline = tracemalloc.get_traced_memory()[0]

    def trace_stop(self) -> float:
        return _trace_stop(Probe.baseline)

    def cpu_s(self) -> float:
        return _cpu_s()


def _cpu_s() -> float:
    """CPU time this process has used (user + system, s)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _serve_malla() -> None:
    node = malla.Node("streams-server", cookie=COOKIE, host=HOST, port=0)
    await node.start()
    await node.start_service(Source)
    await node.start_service(Probe)
    print(node.address[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.stop()


async def _serve_grpc() -> None:
    import grpc
    import msgpack

    async def items(request: Any, context: Any) -> AsyncIterator[bytes]:
        n, size = request
        item = b"x" * size
        for _ in range(n):
            yield item

    server = grpc.aio.server(options=_OPTIONS)
    handler = grpc.method_handlers_generic_handler("bench.Source", {
        "items": grpc.unary_stream_rpc_method_handler(
            items, request_deserializer=msgpack.unpackb, response_serializer=msgpack.packb)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


# -- the client's measurements ---------------------------------------------------------

async def _rate(streams: int, n: int, one: Callable[[int], Awaitable[int]]) -> float:
    """Items per second of `streams` concurrent runs of `one(n)`."""
    started = time.perf_counter()
    counts = await asyncio.gather(*(one(n) for _ in range(streams)))
    elapsed = time.perf_counter() - started
    assert all(c == n for c in counts), counts
    return sum(counts) / elapsed


async def _cpu_per_item(node: malla.Node, n: int, one: Callable[[int], Awaitable[int]],
                        out: dict[str, float], name: str) -> None:
    """The CPU time per item (µs) of one run of `one(n)`, in the producer's
    process and in this consumer's: what each side pays per item, whatever
    the load (wall-clock figures move with it; these much less)."""
    producer0, consumer0 = await node.remote("Probe", "cpu_s"), _cpu_s()
    await one(n)
    consumer = _cpu_s() - consumer0
    producer = await node.remote("Probe", "cpu_s") - producer0
    out[f"cpu_us_per_item_{name}_producer"] = producer / n * 1e6
    out[f"cpu_us_per_item_{name}_consumer"] = consumer / n * 1e6


async def _malla_runs(port: int, sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    node = malla.Node("streams-client", cookie=COOKIE, host=HOST, port=0, hidden=True)
    await node.start()
    await node.connect(f"{HOST}:{port}")
    assert await node.wait_for_services(["Source"])
    out: dict[str, float] = {}

    async def stream(n: int, size: int) -> int:
        count = 0
        async for _ in node.stream("Source", "items", [n, size]):
            count += 1
        return count

    async def paged(n: int, size: int) -> int:
        # (pages of 64 KiB chunks hold 16, 1 MiB: 100 concurrent pages of
        # 100 would pass what a node lets one peer have in progress)
        page, count = PAGE if size < CHUNK else CHUNK_PAGE, 0
        while count < n:
            for _ in await node.remote("Source", "page", [count, min(page, n - count), size]):
                count += 1
        return count

    for label, (n, size) in sizes.items():
        await stream(min(n, 1000), size)             # warm-up
        for streams in (1, CONCURRENT):
            each = max(n // streams, 1)
            out[f"stream_{label}_x{streams}"] = await _rate(
                streams, each, lambda k, size=size: stream(k, size))
            out[f"paging_{label}_x{streams}"] = await _rate(
                streams, each, lambda k, size=size: paged(k, size))
    n = sizes["16B"][0]
    await _cpu_per_item(node, n, lambda k: stream(k, SMALL), out, "stream")
    await _cpu_per_item(node, n, lambda k: paged(k, SMALL), out, "paging")
    (out["slow_producer_traced_kib"],
     out["slow_consumer_traced_kib"]) = await _slow_consumer(node)
    await node.stop()
    # the window's part: one stream of small items with a window of 1,024
    wide = malla.Node("streams-wide", cookie=COOKIE, host=HOST, port=0, hidden=True,
                      stream_window=1024)
    await wide.start()
    await wide.connect(f"{HOST}:{port}")
    assert await wide.wait_for_services(["Source"])

    async def wide_stream(k: int) -> int:
        return len([_ async for _ in wide.stream("Source", "items", [k, SMALL])])

    await wide_stream(1000)
    out["stream_16B_x1_window1024"] = await _rate(1, n, wide_stream)
    await _cpu_per_item(wide, n, wide_stream, out, "stream_window1024")
    (out["slow_producer_traced_kib_window1024"],
     out["slow_consumer_traced_kib_window1024"]) = await _slow_consumer(wide)
    await wide.stop()
    return out


async def _slow_consumer(node: malla.Node) -> tuple[float, float]:
    """(the producer's, this consumer's) peak of traced allocations in KiB
    while the consumer reads a fresh 64 KiB chunk every 5 ms for 2 s: what
    the window lets pile up (node.stream_window chunks, 4 MiB by default,
    at the consumer) and what the producer holds meanwhile (a batch, and
    what waits for the socket)."""
    await node.remote("Probe", "trace_start")
    _trace_start()
    consumer0 = tracemalloc.get_traced_memory()[0]
    stream = node.stream("Source", "fresh", [1_000_000, CHUNK])
    end = time.monotonic() + 2.0
    async for _ in stream:
        await asyncio.sleep(0.005)
        if time.monotonic() > end:
            break
    consumer = _trace_stop(consumer0)
    await stream.aclose()
    producer = await node.remote("Probe", "trace_stop")
    return float(producer), consumer


async def _grpc_runs(port: int, sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    import grpc
    import msgpack

    channel = grpc.aio.insecure_channel(f"{HOST}:{port}", options=_OPTIONS)
    await channel.channel_ready()
    call = channel.unary_stream("/bench.Source/items", request_serializer=msgpack.packb,
                                response_deserializer=msgpack.unpackb)
    out: dict[str, float] = {}

    async def stream(n: int, size: int) -> int:
        count = 0
        async for _ in call([n, size]):
            count += 1
        return count

    for label, (n, size) in sizes.items():
        await stream(min(n, 1000), size)
        for streams in (1, CONCURRENT):
            out[f"grpc_{label}_x{streams}"] = await _rate(
                streams, max(n // streams, 1), lambda k, size=size: stream(k, size))
    await channel.close()
    return out


def _server(kind: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.streams", "serve", kind],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _measure(short: bool, repeat: int) -> dict[str, Any]:
    sizes = {"16B": (20_000 if short else 200_000, SMALL),
             "64KiB": (500 if short else 5_000, CHUNK)}
    runs: dict[str, list[float]] = {}
    for _ in range(repeat):
        for kind in ("malla", "grpc"):
            proc, port = _server(kind)
            try:
                if kind == "malla":
                    got = uvloop.run(_malla_runs(port, sizes))
                else:
                    got = asyncio.run(_grpc_runs(port, sizes))
            finally:
                proc.kill()
                proc.wait()
            for key, value in got.items():
                runs.setdefault(key, []).append(value)
    med = {key: statistics.median(values) for key, values in runs.items()}
    ratios = {}
    for label in sizes:
        for streams in (1, CONCURRENT):
            key = f"{label}_x{streams}"
            ratios[f"vs_grpc_{key}"] = med[f"stream_{key}"] / med[f"grpc_{key}"]
            ratios[f"vs_paging_{key}"] = med[f"stream_{key}"] / med[f"paging_{key}"]
    return {"median": med, "ratios": ratios, "runs": runs}


def _print(results: dict[str, Any]) -> None:
    med, ratios = results["median"], results["ratios"]
    print("streams: items per second (median), malla stream vs grpc.aio server streaming "
          f"vs paging by remote() ({PAGE} items a page, {CHUNK_PAGE} of 64 KiB chunks)")
    for label in ("16B", "64KiB"):
        for streams in (1, CONCURRENT):
            key = f"{label}_x{streams}"
            print(f"  {label:>6} x{streams:<3}  stream {med[f'stream_{key}']:>10,.0f}"
                  f"   grpc {med[f'grpc_{key}']:>10,.0f} ({ratios[f'vs_grpc_{key}']:.1f}x)"
                  f"   paging {med[f'paging_{key}']:>10,.0f}"
                  f" ({ratios[f'vs_paging_{key}']:.1f}x)")
    wide = med["stream_16B_x1_window1024"]
    print(f"  16B x1 with stream_window=1024: {wide:,.0f} items/s "
          f"({wide / med['paging_16B_x1']:.1f}x paging)")
    print("  CPU per 16 B item (µs), producer + consumer process:")
    for name in ("stream", "stream_window1024", "paging"):
        prod = med[f"cpu_us_per_item_{name}_producer"]
        cons = med[f"cpu_us_per_item_{name}_consumer"]
        print(f"    {name:<18} {prod:6.2f} + {cons:6.2f}")
    for suffix, window in (("", 64), ("_window1024", 1024)):
        print(f"  a slow consumer of 64 KiB chunks, stream_window={window} "
              f"({window * CHUNK // 1024:,} KiB of chunks): peak traced allocations of the "
              f"producer {med['slow_producer_traced_kib' + suffix]:,.0f} KiB, of the consumer "
              f"{med['slow_consumer_traced_kib' + suffix]:,.0f} KiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams")
    parser.add_argument("mode", nargs="*", default=["run"])
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "streams.json"))
    args = parser.parse_args(argv)
    if args.mode[:1] == ["serve"]:
        if args.mode[1:] == ["grpc"]:
            asyncio.run(_serve_grpc())
        else:
            uvloop.run(_serve_malla())
        return 0
    repeat = args.repeat or (1 if args.short else 3)
    results = _measure(args.short, repeat)
    _print(results)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
