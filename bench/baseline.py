"""The reference point of memory_inflight: bare asyncio tasks awaiting futures.

An outstanding RPC cannot cost less than the task that awaits it, so the
malla figure is shown next to this one, measured the same way (current-RSS
growth divided by the count) in a fresh process of the same run.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from bench.measure import growth_bytes
from bench.procs import current_rss_kib

_WARMUP = 1000


async def tasks_baseline(params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["inflight_calls"]
    loop = asyncio.get_running_loop()

    async def waiter(fut: asyncio.Future[None]) -> None:
        await fut

    async def park(count: int) -> tuple[list[asyncio.Future[None]], list[asyncio.Task[None]]]:
        futures = [loop.create_future() for _ in range(count)]
        tasks = [asyncio.ensure_future(waiter(f)) for f in futures]
        await asyncio.sleep(0)  # let every task start and block on its future
        return futures, tasks

    async def unpark(futures: list[asyncio.Future[None]], tasks: list[asyncio.Task[None]]) -> None:
        for f in futures:
            f.set_result(None)
        await asyncio.gather(*tasks)

    # Warm-up round first, as for malla, so both baselines are taken alike.
    await unpark(*await park(min(n, _WARMUP)))
    gc.collect()
    before = current_rss_kib()
    futures, tasks = await park(n)
    after = current_rss_kib()
    await unpark(futures, tasks)
    return {"extra": {"bytes_per_task": growth_bytes(before, after, n)}}
