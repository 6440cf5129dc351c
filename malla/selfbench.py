"""`malla bench`: a self-benchmark of malla that needs nothing but malla.

Two local processes on loopback -- this one calls, a child serves an echo
service -- measure sequential calls (one in flight: calls/s and the median
round trip) and 128 calls in flight (calls/s and the median).  It works
from an installed wheel; the comparison with other RPC systems and with the
floors is the repository's harness (`make bench`, bench/README.md).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import malla

__all__ = ["run"]

_COOKIE_ENV = "MALLA_SELFBENCH_COOKIE"


class SelfBenchEcho(malla.Service, global_=True):
    def echo(self, value: Any) -> Any:
        return value


async def _serve() -> None:
    # the child: serve until the parent closes our stdin
    node = malla.Node("selfbench-server", cookie=os.environ[_COOKIE_ENV], port=0)
    await node.start()
    await node.start_service(SelfBenchEcho)
    sys.stdout.write(f"{node.address[1]}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await node.stop()


async def _measure(node: malla.Node, in_flight: int, seconds: float) -> dict[str, float]:
    latencies: list[int] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        remote = node.remote
        while time.perf_counter() < end:
            started = time.perf_counter_ns()
            await remote("SelfBenchEcho", "echo", [b"x" * 16])
            latencies.append(time.perf_counter_ns() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    took = time.perf_counter() - started
    return {"calls": len(latencies), "calls_per_s": len(latencies) / took,
            "p50_us": statistics.median(latencies) / 1000}


async def _bench(seconds: float, progress: Callable[[str], None]) -> dict[str, Any]:
    cookie = secrets.token_hex(16)
    child = subprocess.Popen([sys.executable, "-m", "malla.selfbench", "serve"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, _COOKIE_ENV: cookie})
    try:
        assert child.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
        if not line.strip().isdigit():
            raise malla.MallaError("the benchmark's server process did not start")
        node = malla.Node("selfbench-client", cookie=cookie, port=0, hidden=True)
        await node.start()
        try:
            await node.connect(f"127.0.0.1:{int(line)}")
            if not await node.wait_for_services(["SelfBenchEcho"], retries=10):
                raise malla.MallaError("the benchmark's server never announced its service")
            results: dict[str, Any] = {}
            for name, in_flight in (("seq", 1), ("inflight128", 128)):
                progress(f"{name}: warming up")
                await _measure(node, in_flight, min(0.5, seconds / 4))
                progress(f"{name}: measuring for {seconds:g} s")
                results[name] = await _measure(node, in_flight, seconds)
            return results
        finally:
            await node.stop()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(seconds: float = 3.0, progress: Callable[[str], None] = lambda _line: None
        ) -> dict[str, Any]:
    """Measure malla on this machine: {"seq": {...}, "inflight128": {...}},
    each with calls, calls_per_s and p50_us.  `progress` gets a line at each
    step."""
    if not 0 < seconds <= 600:
        raise malla.InvalidOption(f"seconds must be within (0, 600], not {seconds!r}")
    return malla.run(_bench(seconds, progress))


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m malla.selfbench serve (started by `malla bench`)")
    malla.run(_serve())
