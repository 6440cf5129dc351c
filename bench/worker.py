"""Entry point of every child process: ``python -m bench.worker '<json spec>'``.

The spec says which system, which role and what to do:

* ``{"role": "probe", "system": S}``: import the system, report whether it works.
* ``{"role": "server", "system": S, "params": {...}}``: serve; emit ``ready``
  with the port; run until the parent closes stdin.
* ``{"role": "client", "system": S, "mode": M, "params": {...}}`` with mode
  ``load`` (timed calls), ``idle`` (open connections and hold them),
  ``custom`` (a system's own scenario, e.g. malla's fanout8) or
  ``tasks_baseline`` (no system: bare asyncio tasks).

Each system module is used through the same small interface: ``KIND``
("async" or "sync"), ``serve(ready, params)``, ``connect(port, params)``
returning a connection with ``call(payload)`` and ``close()``, and for async
systems ``UVLOOP``.  Whatever the mode, the process reports its own peak RSS.
A ``"native"`` system (the C floor) gives ``command(spec)`` instead: the
worker pins itself as for any system, then execs that program, which speaks
this protocol itself.  Any module may add ``probe()``, returning why the
system cannot run here (or None).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import traceback
from collections.abc import Coroutine
from types import ModuleType
from typing import Any

from bench.measure import (
    AsyncConn,
    LoadSpec,
    SyncConn,
    async_load,
    check_echo,
    make_payload,
    threaded_load,
)
from bench.procs import Control, peak_rss_kib
from bench.systems import SYSTEMS

_CLOSE_TIMEOUT_S = 5.0


def _run_async(main: Coroutine[Any, Any, Any], use_uvloop: bool) -> Any:
    if use_uvloop:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _load_spec(params: dict[str, Any]) -> LoadSpec:
    return LoadSpec(
        payload_size=params["payload_size"],
        concurrency=params["concurrency"],
        max_calls=params["max_calls"],
        max_seconds=params["max_seconds"],
        warmup_calls=params["warmup_calls"],
    )


# ---------------------------------------------------------------- probe


def probe(ctl: Control, system: str) -> None:
    try:
        module = importlib.import_module(SYSTEMS[system].module)
        missing = [name for name in SYSTEMS[system].required_attrs if not _has_path(module, name)]
        if missing:
            raise ImportError(f"{', '.join(missing)} not found")
        # A module may check more than its import (the C floor: its build).
        reason = module.probe() if hasattr(module, "probe") else None
    except Exception as exc:
        ctl.emit("probe", ok=False, reason=f"{type(exc).__name__}: {exc}")
        return
    if reason is not None:
        ctl.emit("probe", ok=False, reason=reason)
        return
    ctl.emit("probe", ok=True)


def _has_path(module: ModuleType, dotted: str) -> bool:
    obj: Any = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# ---------------------------------------------------------------- server


def serve(ctl: Control, module: ModuleType, params: dict[str, Any]) -> None:
    def ready(port: int) -> None:
        ctl.emit("ready", port=port)

    if module.KIND == "async":
        _run_async(module.serve(ready, params), module.UVLOOP)
    else:
        module.serve(ready, params)


# ---------------------------------------------------------------- clients


class _ThreadedConn:
    """A thread-based system's connection driven from asyncio.

    Used only where nothing is timed (the idle scenario), so that its
    sequence of steps is written once for every system.
    """

    def __init__(self, conn: SyncConn) -> None:
        self._conn = conn

    async def call(self, payload: bytes) -> Any:
        return await asyncio.to_thread(self._call, payload)

    def _call(self, payload: bytes) -> Any:
        self._conn.adopt()  # whichever pool thread runs this
        return self._conn.call(payload)

    async def close(self) -> None:
        await asyncio.to_thread(self._conn.close)


async def _connect(module: ModuleType, params: dict[str, Any]) -> AsyncConn:
    if module.KIND == "async":
        conn: AsyncConn = await module.connect(params["port"], params)
        return conn
    return _ThreadedConn(await asyncio.to_thread(module.connect, params["port"], params))


async def _wait_for(ctl: Control, command: str) -> None:
    # In a thread: the loop must keep running (heartbeats, keepalives) meanwhile.
    await asyncio.to_thread(ctl.wait_for, command)


async def _async_client(
    ctl: Control, module: ModuleType, mode: str, params: dict[str, Any]
) -> None:
    if mode == "load":
        await _async_load_client(ctl, module, params)
    elif mode == "idle":
        await _idle_client(ctl, module, params)
    elif mode == "custom":
        result = await module.CUSTOM[params["scenario"]](params)
        ctl.emit("result", **result, peak_rss_kib=peak_rss_kib())
    else:
        raise ValueError(f"unknown mode {mode!r}")


async def _async_load_client(ctl: Control, module: ModuleType, params: dict[str, Any]) -> None:
    conn = await _connect(module, params)
    payload = make_payload(params["payload_size"])
    check_echo(await conn.call(payload), payload)

    async def ready() -> None:
        ctl.emit("ready")
        await _wait_for(ctl, "go")

    result = await async_load(lambda: conn.call(payload), _load_spec(params), ready)
    ctl.emit("result", **result.to_json(), peak_rss_kib=peak_rss_kib())
    await asyncio.wait_for(conn.close(), _CLOSE_TIMEOUT_S)


def _threaded_load_client(ctl: Control, module: ModuleType, params: dict[str, Any]) -> None:
    """Thread-based systems: one thread per connection, ``concurrency`` of them."""
    payload = make_payload(params["payload_size"])
    conns: list[SyncConn] = []
    for _ in range(params["concurrency"]):
        conns.append(module.connect(params["port"], params))
        check_echo(conns[-1].call(payload), payload)

    def ready() -> None:
        ctl.emit("ready")
        ctl.wait_for("go")

    result = threaded_load(conns, payload, _load_spec(params), ready)
    ctl.emit("result", **result.to_json(), peak_rss_kib=peak_rss_kib())
    for conn in conns:
        conn.close()


async def _idle_client(ctl: Control, module: ModuleType, params: dict[str, Any]) -> None:
    """Open connections and hold them while the parent reads the server's RSS."""
    small = make_payload(params["payload_size"])
    big = make_payload(params["big_size"])

    async def open_one() -> AsyncConn:
        conn = await _connect(module, params)
        check_echo(await conn.call(small), small)
        return conn

    # One connection first, outside the count, so the server's one-time
    # costs are in its baseline rather than spread over the idle ones.
    conns = [await open_one()]
    ctl.emit("ready")
    await _wait_for(ctl, "open")
    conns += await asyncio.gather(*(open_one() for _ in range(params["conns"])))
    ctl.emit("opened")
    await _wait_for(ctl, "big")
    for conn in conns[1:]:
        check_echo(await conn.call(big), big)
    ctl.emit("result", peak_rss_kib=peak_rss_kib())
    # Hold every connection open until the parent closes our stdin.
    await _wait_for(ctl, "quit")


# ---------------------------------------------------------------- main


def _client(ctl: Control, spec: dict[str, Any]) -> None:
    params = spec["params"]
    if spec["mode"] == "tasks_baseline":
        from bench.baseline import tasks_baseline

        result = _run_async(tasks_baseline(params), use_uvloop=True)
        ctl.emit("result", **result, peak_rss_kib=peak_rss_kib())
        return
    module = importlib.import_module(SYSTEMS[spec["system"]].module)
    if module.KIND == "sync" and spec["mode"] == "load":
        _threaded_load_client(ctl, module, params)
    else:
        _run_async(
            _async_client(ctl, module, spec["mode"], params), getattr(module, "UVLOOP", False)
        )


def _exec_native(spec: dict[str, Any]) -> None:
    """Become a native system's program (the C floor), if that is the system.

    The program speaks this protocol itself; the CPUs it may run on are
    already set, and exec keeps them.  Returns only for Python systems.
    """
    if spec["role"] not in ("server", "client") or spec.get("system") is None:
        return
    module = importlib.import_module(SYSTEMS[spec["system"]].module)
    if module.KIND != "native":
        return
    try:
        argv: list[str] = module.command(spec)
        sys.stderr.flush()
        os.execv(argv[0], argv)
    except BaseException as exc:
        traceback.print_exc()
        Control().emit("error", message=f"{type(exc).__name__}: {exc}")
        os._exit(1)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    if spec.get("cpus"):
        # Before anything starts threads, so that they all inherit it.
        os.sched_setaffinity(0, spec["cpus"])
    # Before Control starts reading stdin: it is the native program's.
    _exec_native(spec)
    ctl = Control()
    role = spec["role"]
    try:
        if role == "probe":
            probe(ctl, spec["system"])
        elif role == "server":
            serve(ctl, importlib.import_module(SYSTEMS[spec["system"]].module), spec["params"])
        elif role == "client":
            _client(ctl, spec)
        else:
            raise ValueError(f"unknown role {role!r}")
    except BaseException as exc:
        traceback.print_exc()  # to stderr, whose tail the parent keeps
        ctl.emit("error", message=f"{type(exc).__name__}: {exc}")
        os._exit(1)
    # Skip interpreter teardown: a library's atexit work (thread joins,
    # channel shutdown) must not hold a finished child up.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
