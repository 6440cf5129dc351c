"""`malla top`: a live table of the cluster from each node's built-in
`Malla` service (malla.builtin).

Pure functions turn samples into rows and rows into text (`rates`,
`render`); `run` is the command: it samples every node's `Malla.info` and
`Malla.stats` (every node at once, each asked of that node), redraws in
place on a terminal every `--interval` seconds until Ctrl-C, or with
`--once` samples twice a second apart and prints one table (`--json`: the
rows).

Rates are differences between two samples over the time between them.
`calls/s` counts the calls a node served from other nodes (its `calls_in`)
less those to `Malla` itself (`builtin_calls`), so top's own sampling
does not show; `out/s` the calls it made (`calls_out`), `err/s` the errors
its calls raised (`stats()["errors"]`), `p99` the slowest p99 of the calls it
made, over its life (the node's latency, kept only with metrics on:
`Node(metrics=True)` or `--metrics-port`; "-" otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from malla.registry import BUILTIN

__all__ = ["Row", "Sample", "rates", "render", "run"]

# A sample: when it was taken (monotonic s) and, per node, its Malla.info
# and Malla.stats (or the exception that came back instead)
Sample = tuple[float, dict[str, tuple[Any, Any]]]

CLEAR = "\x1b[H\x1b[2J"     # cursor home, clear the screen


@dataclass
class Row:
    node: str
    services: list[str]          # "Name", or "Name (paused)"
    calls_per_s: float | None    # None: not known for this interval
    out_per_s: float | None
    errors_per_s: float | None
    errors: int | None           # over the node's life
    p99_ms: float | None
    in_flight: int | None
    problem: str | None = None   # why the node gave no figures


def _user_calls_in(stats: dict[str, Any]) -> int:
    return int(stats["calls_in"]) - int(stats.get("builtin_calls", 0))


def _errors(stats: dict[str, Any]) -> int:
    return sum(int(n) for n in stats["errors"].values())


def _p99_ms(stats: dict[str, Any]) -> float | None:
    p99s = [float(lat["p99_us"]) for key, lat in stats["latency"].items()
            if not key.startswith(BUILTIN + ".") and lat.get("count")]
    return max(p99s) / 1000.0 if p99s else None


def _rate(after: int, before: int | None, seconds: float) -> float | None:
    # (a counter that went down: the node restarted in between)
    if before is None or after < before or seconds <= 0:
        return None
    return (after - before) / seconds


def rates(before: Sample | None, after: Sample) -> list[Row]:
    """A row per node of `after`, by name; rates from `before` when it
    has that node (and the same incarnation)."""
    t0, old = before if before is not None else (after[0], {})
    t1, new = after
    rows = []
    for name in sorted(new):
        info, stats = new[name]
        bad = next((r for r in (info, stats) if isinstance(r, BaseException)), None)
        if bad is not None:
            rows.append(Row(name, [], None, None, None, None, None, None,
                            problem=f"no answer: {type(bad).__name__}: {bad}"))
            continue
        services = [s if state == "running" else f"{s} ({state})"
                    for s, state in sorted(info["services"].items())]
        prev = old.get(name)
        prev_stats = None
        if (prev is not None and isinstance(prev[1], dict) and isinstance(prev[0], dict)
                and prev[0].get("incarnation") == info.get("incarnation")):
            prev_stats = prev[1]
        dt = t1 - t0

        def before_of(fn: Callable[[dict[str, Any]], int],
                      prev_stats: dict[str, Any] | None = prev_stats) -> int | None:
            return None if prev_stats is None else fn(prev_stats)

        rows.append(Row(
            name, services,
            calls_per_s=_rate(_user_calls_in(stats), before_of(_user_calls_in), dt),
            out_per_s=_rate(int(stats["calls_out"]),
                            before_of(lambda s: int(s["calls_out"])), dt),
            errors_per_s=_rate(_errors(stats), before_of(_errors), dt),
            errors=_errors(stats), p99_ms=_p99_ms(stats), in_flight=int(stats["in_flight"])))
    return rows


_COLUMNS = ("NODE", "CALLS/S", "OUT/S", "P99 MS", "ERR/S", "ERRORS", "IN-FLIGHT", "SERVICES")


def _figure(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def render(rows: list[Row], title: str = "") -> str:
    """The table as text: a header line, then a line per node."""
    cells = [list(_COLUMNS)]
    for r in rows:
        tail = r.problem if r.problem is not None else ", ".join(r.services) or "-"
        cells.append([r.node, _figure(r.calls_per_s), _figure(r.out_per_s),
                      _figure(r.p99_ms, 2), _figure(r.errors_per_s), _figure(r.errors),
                      _figure(r.in_flight), tail])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS) - 1)]
    lines = [title] if title else []
    for line in cells:
        # names left-aligned, figures right-aligned, services last and free
        first = line[0].ljust(widths[0])
        figures = [c.rjust(w) for c, w in zip(line[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([first, *figures, line[-1]]).rstrip())
    if not rows:
        lines.append("(no node runs the built-in Malla service)")
    return "\n".join(lines) + "\n"


async def sample(node: Any, timeout: int) -> Sample:
    """Every node's Malla.info and Malla.stats, all asked at once, each of
    its own node (no failover: a slot that fails holds the exception)."""
    names = node.get_nodes(BUILTIN)
    ask = node._caller.call_node
    results = await asyncio.gather(*(ask(name, BUILTIN, fun, timeout=timeout)
                                     for name in names for fun in ("info", "stats")),
                                   return_exceptions=True)
    return time.monotonic(), {name: (results[2 * i], results[2 * i + 1])
                              for i, name in enumerate(names)}


async def run(args: argparse.Namespace, join: Callable[[], Awaitable[Any]],
              mesh: Callable[[Any], Awaitable[None]]) -> int:
    """The command: `join()` gives the connected hidden client node,
    `mesh(node)` dials members that joined since."""
    node = await join()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C ends the view: exit 0, not an interrupted program's 130
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        previous = await sample(node, args.timeout)
        if args.once:
            await asyncio.sleep(1.0)
            rows = rates(previous, await sample(node, args.timeout))
            if args.json:
                print(json.dumps([asdict(r) for r in rows], indent=2))
            else:
                sys.stdout.write(render(rows))
            return 0
        tty = sys.stdout.isatty()
        # members that joined since are dialled in the background: a dead
        # member's dial (up to a handshake timeout) never holds a frame back
        dialling: asyncio.Task[None] | None = None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.interval)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            if dialling is None or dialling.done():
                dialling = asyncio.ensure_future(mesh(node))
            current = await sample(node, args.timeout)
            title = (f"malla top: {len(current[1])} nodes, every {args.interval:g} s, "
                     f"{time.strftime('%H:%M:%S')} (Ctrl-C to quit)")
            text = render(rates(previous, current), title)
            sys.stdout.write(CLEAR + text if tty else text + "\n")
            sys.stdout.flush()
            previous = current
        if dialling is not None:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await node.stop()
