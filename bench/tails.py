"""Tail latency under one bad node (issue 15), malla only, each scenario side
by side with `balance="shuffle"` in one run:

* ``slow_node``: 4 server processes, one of them answering 20x slower than
  the others (its handler sleeps 20 ms, theirs 1 ms); 20,000 calls from 8,
  then from 32 concurrent callers on one node, with `balance="p2c"` (the
  default) and with `"shuffle"`.  Target: p99 with p2c <= 1/5 of shuffle's, calls/s not
  lower.  Shuffle re-orders the nodes only each check cycle, so its caller
  runs with `check_interval=0.05`: the slow node then takes its 1/4 of the
  calls within a run (so does p2c's, for the same settings).
* ``hedging``: 4 server processes answering in 1 ms, one of which stalls a
  call for 200 ms with a probability of 4 % -- about 1 % of all the calls
  when the calls spread evenly (a stall of 1 % of *that node's* calls would
  be 0.25 % of all, below any p99); 20,000 calls from 8 concurrent callers,
  without hedging and with `hedge_after` at the fast nodes' p95 (the p95
  of the run without hedging just before, which the stalls, about 1 % of
  the calls, do not reach), under p2c and under shuffle.  Target: with the
  hedge, p99 <= 3x p50 and the extra calls sent (`stats()["hedges"]`) <=
  5 % of the calls.

    python -m bench.tails [--calls N] [--short] [--only slow_node|hedging] [--json PATH]

``--short`` (``make test-tools``) runs each scenario with a few hundred
calls and one run a side: it checks the harness works, its figures mean
nothing.

Servers run as their own processes (``python -m bench.tails serve ...``),
on 127.0.0.1 only.  Results go to bench/results/tails.json.  Figures on
this 2-core machine, under load, are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import uvloop

import malla
from bench.procs import HOST, REPO_ROOT

COOKIE = "bench-tails-cookie-8e21b7d40a"
CALLS = 20_000
SHORT_CALLS = 300
WARM_UP = 200
FAST_MS = 1.0
SLOW_MS = 20.0 * FAST_MS
STALL_MS = 200.0
STALL_P = 0.04
SLOW_CALLERS = (8, 32)     # concurrent callers: two runs of the scenario
HEDGE_CALLERS = 8


class Tail(malla.Service, global_=True):
    """The work of one call: a sleep of `delay` ms, and now and then (with a
    probability of `stall_p`) one of `stall` ms instead."""

    def __init__(self, delay_ms: float, stall_p: float, stall_ms: float) -> None:
        self.delay = delay_ms / 1000.0
        self.stall_p = stall_p
        self.stall = stall_ms / 1000.0
        self.rand = random.Random(os.getpid())

    @malla.idempotent
    async def work(self) -> int:
        stalled = self.stall_p and self.rand.random() < self.stall_p
        await asyncio.sleep(self.stall if stalled else self.delay)
        return 1


async def _serve(name: str, delay_ms: float, stall_p: float, stall_ms: float) -> None:
    node = malla.Node(name, cookie=COOKIE, host=HOST, port=0)
    await node.start()
    await node.start_service(Tail(delay_ms, stall_p, stall_ms))
    print(node.address[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.stop()


def _servers(specs: list[tuple[float, float]]) -> list[subprocess.Popen[str]]:
    """One server process per (delay ms, stall probability)."""
    procs = []
    for i, (delay, stall_p) in enumerate(specs):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.tails", "serve", f"tail{i}", str(delay), str(stall_p),
             str(STALL_MS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=REPO_ROOT))
    return procs


def _pct(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1e6


async def _run(ports: list[int], balance: str, calls: int, callers: int,
               hedge_after: float | None = None, warm_up: int = WARM_UP) -> dict[str, Any]:
    """`calls` calls of Tail.work from `callers` concurrent tasks of one new
    node: latencies in ms, calls/s, hedges sent."""
    node = malla.Node(f"caller-{balance}", cookie=COOKIE, host=HOST, port=0, hidden=True,
                      balance=balance, check_interval=0.05)
    await node.start()
    try:
        for port in ports:
            await node.connect(f"{HOST}:{port}")
        while len(node.get_nodes("Tail")) < len(ports):
            await asyncio.sleep(0.01)
        opts: dict[str, Any] = {} if hedge_after is None else {"hedge_after": hedge_after}
        for _ in range(warm_up):
            await node.remote("Tail", "work", **opts)
        hedges0, throttled0 = node.stats()["hedges"], node.stats()["retries_throttled"]
        sent0 = _sent(node)
        samples: list[int] = []
        left = calls

        async def caller() -> None:
            nonlocal left
            clock = time.perf_counter_ns
            while left > 0:
                left -= 1
                t0 = clock()
                await node.remote("Tail", "work", **opts)
                samples.append(clock() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        took = time.perf_counter() - t0
        samples.sort()
        return {"balance": balance, "hedge_after_ms": hedge_after, "calls": len(samples),
                "calls_per_s": len(samples) / took, "p50_ms": _pct(samples, 0.5),
                "p95_ms": _pct(samples, 0.95), "p99_ms": _pct(samples, 0.99),
                "p999_ms": _pct(samples, 0.999), "max_ms": samples[-1] / 1e6,
                "hedges": node.stats()["hedges"] - hedges0,
                # hedges the retry budget refused (20 % of the calls + 10/s)
                "throttled": node.stats()["retries_throttled"] - throttled0,
                # each node's share of the calls sent (the last is the bad one)
                # (a connection lost and made again meanwhile counts from 0;
                # one lost for good is missing: a heavily loaded machine)
                "share": {peer: (n - sent0.get(peer, 0) if n >= sent0.get(peer, 0) else n)
                          / len(samples) for peer, n in sorted(_sent(node).items())},
                "extra_calls": (node.stats()["hedges"] - hedges0) / len(samples)}
    finally:
        await node.stop()


def _sent(node: malla.Node) -> dict[str, int]:
    # calls (and hedges) this node sent to each server so far
    return {peer: conn.proto.calls_out for peer, conn in node._cluster.connected.items()}


async def _slow_node(ports: list[int], calls: int, callers: int,
                     short: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"p2c": [], "shuffle": []}
    for _ in range(1 if short else 2):       # alternating, medians
        for balance in runs:
            runs[balance].append(await _run(ports, balance, calls, callers,
                                            warm_up=_warm_up(short)))
    out: dict[str, Any] = {b: _median(r) for b, r in runs.items()}
    out["p99_ratio"] = out["p2c"]["p99_ms"] / out["shuffle"]["p99_ms"]
    out["throughput_ratio"] = out["p2c"]["calls_per_s"] / out["shuffle"]["calls_per_s"]
    out["target_met"] = out["p99_ratio"] <= 0.2 and out["throughput_ratio"] >= 1.0
    out["runs"] = runs
    return out


async def _hedging(ports: list[int], calls: int, short: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for balance in ("p2c", "shuffle"):
        plain = await _run(ports, balance, calls, HEDGE_CALLERS, warm_up=_warm_up(short))
        # the fast nodes' p95: the p95 of the same calls without hedging
        # (the stalls, about 1 % of them, are beyond it)
        after = round(plain["p95_ms"], 3)
        hedged = await _run(ports, balance, calls, HEDGE_CALLERS, hedge_after=after,
                            warm_up=_warm_up(short))
        hedged["p99_over_p50"] = hedged["p99_ms"] / hedged["p50_ms"]
        hedged["target_met"] = hedged["p99_over_p50"] <= 3.0 and hedged["extra_calls"] <= 0.05
        out[balance] = {"no_hedge": plain, "hedged": hedged}
    return out


def _warm_up(short: bool) -> int:
    return WARM_UP // 4 if short else WARM_UP


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("calls_per_s", "p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms")
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["slow_share"] = statistics.median(r["share"].get("tail3", 0.0) for r in runs)
    return out


async def _ports(procs: list[subprocess.Popen[str]]) -> list[int]:
    ports = []
    for proc in procs:
        assert proc.stdout is not None
        ports.append(int(await asyncio.to_thread(proc.stdout.readline)))
    return ports


async def _with_servers(specs: list[tuple[float, float]], run: Any) -> Any:
    procs = _servers(specs)
    try:
        return await run(await _ports(procs))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def _main(args: argparse.Namespace) -> int:
    calls = SHORT_CALLS if args.short else args.calls
    results: dict[str, Any] = {"calls": calls, "short": args.short, "git": _git_commit()}
    if args.only in ("all", "slow_node"):
        specs = [(FAST_MS, 0.0)] * 3 + [(SLOW_MS, 0.0)]

        async def slow(ports: list[int]) -> dict[str, Any]:
            return {str(n): await _slow_node(ports, calls, n, args.short) for n in SLOW_CALLERS}

        results["slow_node"] = await _with_servers(specs, slow)
        for n in SLOW_CALLERS:
            _print_slow(results["slow_node"][str(n)], n)
    if args.only in ("all", "hedging"):
        specs = [(FAST_MS, 0.0)] * 3 + [(FAST_MS, STALL_P)]
        results["hedging"] = await _with_servers(
            specs, lambda ports: _hedging(ports, calls, args.short))
        _print_hedging(results["hedging"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=REPO_ROOT)
    return out.stdout.strip()


def _row(label: str, r: dict[str, Any]) -> str:
    return (f"  {label:<24} {r['calls_per_s']:9,.0f} calls/s   p50 {r['p50_ms']:7.2f} ms"
            f"   p95 {r['p95_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms"
            f"   p99.9 {r['p999_ms']:7.2f} ms")


def _print_slow(res: dict[str, Any], callers: int) -> None:
    runs = len(res["runs"]["p2c"])
    print(f"slow node: 4 nodes, one 20x slower; {callers} callers (median of {runs})")
    for balance in ("p2c", "shuffle"):
        print(_row(balance, res[balance]) + f"   slow node took {res[balance]['slow_share']:.1%}")
    print(f"  p99 p2c/shuffle {res['p99_ratio']:.3f} (target <= 0.2), calls/s "
          f"p2c/shuffle {res['throughput_ratio']:.2f} (target >= 1): "
          f"{'met' if res['target_met'] else 'MISSED'}")


def _print_hedging(res: dict[str, Any]) -> None:
    print(f"hedging: 4 nodes, one stalls {STALL_P:.0%} of its calls for {STALL_MS:.0f} ms; "
          f"{HEDGE_CALLERS} callers; hedge_after: the p95 without hedging")
    for balance in ("p2c", "shuffle"):
        h = res[balance]["hedged"]
        print(_row(f"{balance}, no hedge", res[balance]["no_hedge"])
              + f"   stalling node took {res[balance]['no_hedge']['share'].get('tail3', 0.0):.1%}")
        print(_row(f"{balance}, hedged {h['hedge_after_ms']} ms", h)
              + f"   extra calls {h['extra_calls']:.1%}, {h['throttled']} refused by the budget")
        print(f"  {'':<24} p99/p50 {h['p99_over_p50']:.2f} (target <= 3), extra <= 5 %: "
              f"{'met' if h['target_met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tails")
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "serve"])
    parser.add_argument("serve_args", nargs="*", help="(serve) name delay_ms stall_p stall_ms")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--short", action="store_true",
                        help=f"{SHORT_CALLS} calls a run, one run a side: checks it works")
    parser.add_argument("--only", default="all", choices=["all", "slow_node", "hedging"])
    parser.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "tails.json"))
    args = parser.parse_args(argv)
    if args.mode == "serve":
        name, delay, stall_p, stall_ms = args.serve_args
        uvloop.run(_serve(name, float(delay), float(stall_p), float(stall_ms)))
        return 0
    return uvloop.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
