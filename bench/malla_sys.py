"""malla, measured through its public API only.

Besides the server/connection pair every system has, malla runs three
scenarios no other system can: fanout8 (``call_cb_all``), inprocess (a call
to a service on the calling node) and memory_inflight (100,000 outstanding
calls).  They are the ``CUSTOM`` table at the bottom.

Importing this module imports malla: when that fails, the harness reports
the system as "missing: <reason>".
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import malla
from bench.measure import LoadSpec, async_load, check_echo, growth_bytes, make_payload
from bench.procs import HOST, current_rss_kib

KIND = "async"
UVLOOP = True

SERVICE = "Echo"
PARKING = "Parking"
SLOW_HANDLER_S = 0.050  # the "50 ms handler" of fanout8
_ARRIVAL_TIMEOUT_S = 300.0  # generous: 100,000 calls must all reach the server
# malla's default per-attempt timeout (15 s) would end parked calls before
# all of them have arrived; memory_inflight needs them to stay outstanding.
_PARKED_CALL_TIMEOUT_MS = int(2 * _ARRIVAL_TIMEOUT_S * 1000)
# Enough room for every parked call (malla's default is 10,000 at once).
_PARKING_CONCURRENCY = 1_000_000


class _WaitRoom:
    """Where ``Parking.wait`` calls block until ``Parking.release`` lets them go.

    Module state rather than instance state, so that the service needs no
    ``__init__`` of its own.  ``release`` re-arms the room, so a warm-up
    round can precede the measured one in the same server.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.arrived = 0

    def release(self) -> None:
        self.event.set()
        self.event = asyncio.Event()
        self.arrived = 0


_room: _WaitRoom | None = None


def _get_room() -> _WaitRoom:
    global _room
    if _room is None:
        _room = _WaitRoom()  # created lazily: inside the running loop
    return _room


class Echo(malla.Service, global_=True):
    def echo(self, x: Any) -> Any:
        return x

    async def aecho(self, x: Any) -> Any:
        return x

    async def slow(self, x: Any) -> Any:
        await asyncio.sleep(SLOW_HANDLER_S)
        return x


class Parking(malla.Service, global_=True, max_concurrency=_PARKING_CONCURRENCY):
    """memory_inflight's service: calls that stay outstanding until released."""

    async def wait(self, key: Any) -> Any:
        room = _get_room()
        room.arrived += 1
        await room.event.wait()
        return key

    def arrived(self) -> int:
        return _get_room().arrived

    def release(self) -> None:
        _get_room().release()


def _node_name(role: str) -> str:
    # Names must be unique across the cluster; pid plus a counter is.
    global _node_counter
    _node_counter += 1
    return f"bench-{role}-{os.getpid()}-{_node_counter}"


_node_counter = 0


async def _client_node(cookie: str, ports: list[int], service: str = SERVICE) -> malla.Node:
    # Hidden: a pure client connects only to the nodes it dials, as the
    # other systems' clients do.  Visible client nodes would mesh with each
    # other (N*(N-1)/2 connections): 200 of them in memory_idle would be
    # ~20,000 connections measuring the mesh, not the server.
    node = malla.Node(
        _node_name("client"),
        cookie=cookie,
        host=HOST,
        port=0,
        seeds=[f"{HOST}:{p}" for p in ports],
        hidden=True,
    )
    await node.start()
    # wait_for_services checks once a second; polling get_nodes first keeps
    # each measurement's set-up (untimed anyway) from costing a whole second.
    deadline = time.monotonic() + 10
    while not node.get_nodes(service) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if not await node.wait_for_services([service]):
        await node.stop()
        raise RuntimeError(f"wait_for_services([{service!r}]) returned false")
    return node


# ---------------------------------------------------------------- server / connect


async def serve(ready: Callable[[int], None], params: dict[str, Any]) -> None:
    node = malla.Node(_node_name("server"), cookie=params["cookie"], host=HOST, port=0)
    await node.start()
    await node.start_service(Echo())
    await node.start_service(Parking())
    ready(node.address[1])  # the port the kernel chose
    await asyncio.Event().wait()  # serve until the parent ends the process


class MallaConn:
    """A client node: malla's unit of connection to the server."""

    def __init__(self, node: malla.Node) -> None:
        self.node = node

    def call(self, payload: bytes) -> Awaitable[Any]:
        return self.node.remote(SERVICE, "echo", [payload])

    async def close(self) -> None:
        await self.node.stop()


async def connect(port: int, params: dict[str, Any]) -> MallaConn:
    return MallaConn(await _client_node(params["cookie"], [port]))


# ---------------------------------------------------------------- malla-only scenarios


def _spec(params: dict[str, Any]) -> LoadSpec:
    return LoadSpec(
        payload_size=params["payload_size"],
        concurrency=1,
        max_calls=params["max_calls"],
        max_seconds=params["max_seconds"],
        warmup_calls=params["warmup_calls"],
    )


async def fanout8(params: dict[str, Any]) -> dict[str, Any]:
    """call_cb_all across every server vs the same number of sequential calls.

    Also with a 50 ms handler: fanning out to all nodes should cost about
    one handler's time, not one per node.
    """
    ports: list[int] = params["ports"]
    node = await _client_node(params["cookie"], ports)
    try:
        payload = make_payload(params["payload_size"])
        deadline = time.monotonic() + 30
        while len(await node.call_cb_all(SERVICE, "echo", [payload])) < len(ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"call_cb_all never reached all {len(ports)} servers")
            await asyncio.sleep(0.05)

        async def fan_out() -> None:
            for result in await node.call_cb_all(SERVICE, "echo", [payload]):
                check_echo(result, payload)

        async def sequential() -> None:
            for _ in ports:
                await node.remote(SERVICE, "echo", [payload])

        spec = _spec(params)
        fan = await async_load(fan_out, spec)
        seq = await async_load(sequential, spec)
        slow_all = await async_load(lambda: node.call_cb_all(SERVICE, "slow", [payload]), spec)
        slow_one = await async_load(lambda: node.remote(SERVICE, "slow", [payload]), spec)
    finally:
        await node.stop()
    return {
        **fan.to_json(),
        "extra": {
            "seq8_p50_us": seq.percentile_us(0.5),
            "fanout_speedup_vs_seq8": _ratio(seq.percentile_us(0.5), fan.percentile_us(0.5)),
            "slow_all_p50_us": slow_all.percentile_us(0.5),
            "slow_one_p50_us": slow_one.percentile_us(0.5),
        },
    }


async def inprocess(params: dict[str, Any]) -> dict[str, Any]:
    """node.remote to a service on the calling node vs awaiting the method."""
    node = malla.Node(_node_name("inproc"), cookie=params["cookie"], host=HOST, port=0)
    await node.start()
    try:
        service = Echo()
        await node.start_service(service)
        if not await node.wait_for_services([SERVICE]):
            raise RuntimeError("wait_for_services(['Echo']) returned false")
        payload = make_payload(params["payload_size"])
        spec = _spec(params)
        via_node = await async_load(lambda: node.remote(SERVICE, "aecho", [payload]), spec)
        direct = await async_load(lambda: service.aecho(payload), spec)
    finally:
        await node.stop()
    return {
        **via_node.to_json(),
        "extra": {
            "direct_p50_us": direct.percentile_us(0.5),
            "added_us": _diff(via_node.percentile_us(0.5), direct.percentile_us(0.5)),
        },
    }


async def memory_inflight(params: dict[str, Any]) -> dict[str, Any]:
    """Client RSS growth per outstanding call, with every call parked on the server."""
    n: int = params["inflight_calls"]
    node = await _client_node(params["cookie"], [params["port"]], PARKING)
    try:

        async def park(count: int) -> tuple[list[asyncio.Task[Any]], int | None]:
            tasks = [
                asyncio.ensure_future(
                    node.remote(PARKING, "wait", [i], timeout=_PARKED_CALL_TIMEOUT_MS)
                )
                for i in range(count)
            ]
            deadline = time.monotonic() + _ARRIVAL_TIMEOUT_S
            while await node.remote(PARKING, "arrived", []) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only part of {count} parked calls reached the server")
                failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
                if failed is not None:
                    raise RuntimeError(f"a parked call failed: {failed.exception()!r}")
                await asyncio.sleep(0.05)
            return tasks, current_rss_kib()

        async def unpark(tasks: list[asyncio.Task[Any]]) -> None:
            await node.remote(PARKING, "release", [])
            await asyncio.gather(*tasks)

        # Warm-up: one smaller round, so pools and caches exist before the baseline.
        warm, _ = await park(min(n, 1000))
        await unpark(warm)
        del warm
        gc.collect()
        before = current_rss_kib()
        tasks, after = await park(n)
        await unpark(tasks)
    finally:
        await node.stop()
    return {"extra": {"bytes_per_call": growth_bytes(before, after, n)}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


CUSTOM: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "fanout8": fanout8,
    "inprocess": inprocess,
    "memory_inflight": memory_inflight,
}
