"""Two malla-only measurements the issues ask for, beside the main table:

* ``hol``: head-of-line blocking.  With ``max_message_size`` raised to
  128 MiB, a 100 MB payload crosses a connection while 1 KiB calls keep
  going on the same connection, in the same direction: their p50/p99
  against an idle connection, and whether liveness held (the peer stayed
  connected, with a 1 s heartbeat timeout).  Measured with each process on
  its own CPU (as nodes of a cluster are) and with both sharing one CPU,
  three times each, alternating; medians.
* ``observability``: the sequential round trip with metrics and tracing off
  (the plain node), metrics on, and tracing on (OpenTelemetry SDK): every
  call traced, every call dropped by the provider's sampler, and malla's
  own rate at 1% (``Node(tracing=0.01)``).

    python -m bench.extras [--json PATH]

The server runs in its own process (``python -m bench.extras serve``), on
127.0.0.1 only.  Results go to bench/results/extras.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import uvloop

import malla
from bench.measure import make_payload
from bench.procs import HOST, REPO_ROOT

COOKIE = "bench-extras-cookie-3f9d27a1c0"
BIG = 100_000_000
SMALL = 1024


class Sink(malla.Service, global_=True):
    def echo(self, x: Any) -> Any:
        return x

    def take(self, blob: bytes) -> int:
        return len(blob)


def _hol_options(window: int | None) -> dict[str, Any]:
    # a 100 MB message, liveness checked every 0.2 s (dropped after 1 s)
    options: dict[str, Any] = {"max_message_size": 128 << 20, "heartbeat_interval": 0.2,
                               "heartbeat_timeout": 1.0}
    if window is not None:
        options["window_size"] = window
    return options


async def _serve(window: int | None) -> None:
    node = malla.Node("extras-server", cookie=COOKIE, host=HOST, port=0,
                      **_hol_options(window))
    await node.start()
    await node.start_service(Sink)
    print(node.address[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.stop()


def _pcts(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {"calls": len(s), "p50_us": s[len(s) // 2] / 1000,
            "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1000}


async def _timed_calls(node: malla.Node, payload: bytes, n: int | None = None,
                       until: asyncio.Future[Any] | None = None) -> list[int]:
    out: list[int] = []
    while (n is not None and len(out) < n) or (until is not None and not until.done()):
        t0 = time.perf_counter_ns()
        await node.remote("Sink", "echo", [payload])
        out.append(time.perf_counter_ns() - t0)
    return out


async def _client(port: int, window: int | None) -> dict[str, Any]:
    node = malla.Node("extras-client", cookie=COOKIE, host=HOST, port=0, hidden=True,
                      **_hol_options(window))
    await node.start()
    await node.connect(f"{HOST}:{port}")
    assert await node.wait_for_services(["Sink"])
    small = make_payload(SMALL)
    await _timed_calls(node, small, n=2000)                       # warm-up
    idle = _pcts(await _timed_calls(node, small, n=5000))
    big = make_payload(BIG)
    t0 = time.perf_counter()
    transfer = asyncio.ensure_future(node.remote("Sink", "take", [big], timeout=120_000))
    peers_held = True

    async def watch() -> None:
        nonlocal peers_held
        while not transfer.done():
            peers_held &= node.peers() == ["extras-server"]
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    during = _pcts(await _timed_calls(node, small, until=transfer))
    assert await transfer == BIG
    took = time.perf_counter() - t0
    await watcher
    hol = {"idle": idle, "during_100mb": during,
           "p99_ratio": during["p99_us"] / idle["p99_us"],
           "p50_ratio": during["p50_us"] / idle["p50_us"],
           "transfer_s": took, "transfer_mb_s": BIG / took / 1e6,
           "peer_stayed_connected": peers_held}
    await node.stop()
    return hol


ALL_CPUS = sorted(os.sched_getaffinity(0))
ONE_CPU = ALL_CPUS[:1]


def _pin(pids: list[int], cpus: list[int]) -> None:
    for pid in pids:
        os.sched_setaffinity(pid, cpus)


async def _hol(port: int, pids: list[int], window: int | None) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"own_cpus": [], "one_cpu": []}
    for _ in range(3):
        for mode in runs:
            _pin(pids, ALL_CPUS if mode == "own_cpus" else ONE_CPU)
            runs[mode].append(await _client(port, window))
    _pin(pids, ALL_CPUS)
    out: dict[str, Any] = {}
    for mode, results in runs.items():
        med = {key: statistics.median(r[key] for r in results)
               for key in ("p99_ratio", "p50_ratio", "transfer_s", "transfer_mb_s")}
        med["idle_p99_us"] = statistics.median(r["idle"]["p99_us"] for r in results)
        med["during_p99_us"] = statistics.median(r["during_100mb"]["p99_us"] for r in results)
        med["during_calls"] = statistics.median(r["during_100mb"]["calls"] for r in results)
        med["peer_stayed_connected"] = all(r["peer_stayed_connected"] for r in results)
        out[mode] = {"median": med, "runs": results}
    return out


async def _observability(port: int) -> dict[str, Any]:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    sampler = {"on": ParentBased(ALWAYS_ON), "off": ParentBased(ALWAYS_OFF)}

    class Switch:
        """A sampler the runs can flip (the provider is set only once)."""

        mode = "on"

        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            return sampler[Switch.mode].should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "switch"

    trace.set_tracer_provider(TracerProvider(sampler=Switch()))
    payload = make_payload(16)
    runs: dict[str, list[float]] = {}
    configs = [("plain", {}), ("metrics", {"metrics": True}),
               ("tracing_all", {"tracing": True}),
               ("tracing_provider_drops", {"tracing": True}),
               ("tracing_1pct", {"tracing": 0.01})]
    for rep in range(5):
        for label, options in configs:
            Switch.mode = "off" if label == "tracing_provider_drops" else "on"
            node = malla.Node(f"obs-{rep}-{label}", cookie=COOKIE, host=HOST, port=0,
                              hidden=True, **options)
            await node.start()
            await node.connect(f"{HOST}:{port}")
            assert await node.wait_for_services(["Sink"])
            await _timed_calls(node, payload, n=1000)
            runs.setdefault(label, []).append(
                _pcts(await _timed_calls(node, payload, n=5000))["p50_us"])
            await node.stop()
    p50 = {label: statistics.median(v) for label, v in runs.items()}
    return {"seq_p50_us": p50,
            "added_vs_plain": {k: v / p50["plain"] - 1 for k, v in p50.items()},
            "repetitions": runs}


async def _main(args: argparse.Namespace) -> int:
    window = [] if args.window is None else ["--window", str(args.window)]
    server = subprocess.Popen([sys.executable, "-m", "bench.extras", "serve", *window],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        results: dict[str, Any] = {}
        pids = [os.getpid(), server.pid]
        if args.only in ("all", "hol"):
            results["hol"] = await _hol(port, pids, args.window)
        if args.only in ("all", "observability"):
            _pin(pids, ONE_CPU)
            results["observability"] = await _observability(port)
    finally:
        server.kill()
        server.wait()
    if "hol" in results:
        _print_hol(results["hol"])
    if "observability" in results:
        _print_observability(results["observability"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


def _print_hol(hol: dict[str, Any]) -> None:
    print("head-of-line: 1 KiB calls while 100 MB crosses the same connection (median of 3)")
    for mode, label in (("own_cpus", "each process on its own CPU"),
                        ("one_cpu", "both processes on one CPU")):
        m = hol[mode]["median"]
        print(f"  {label}:")
        print(f"    idle p99 {m['idle_p99_us']:8.1f} us   during p99 {m['during_p99_us']:8.1f} us"
              f"   ({m['during_calls']:.0f} calls)   p99 ratio {m['p99_ratio']:.2f}")
        print(f"    100 MB in {m['transfer_s']:.2f} s ({m['transfer_mb_s']:.0f} MB/s); "
              f"peer stayed connected: {m['peer_stayed_connected']}")


def _print_observability(obs: dict[str, Any]) -> None:
    print("observability: sequential round trip p50 (median of 5)")
    for label, v in obs["seq_p50_us"].items():
        print(f"  {label:<18} {v:7.2f} us  ({obs['added_vs_plain'][label]:+.1%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.extras")
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "serve"])
    parser.add_argument("--window", type=int, default=None,
                        help="the nodes' window_size (default: malla's)")
    parser.add_argument("--only", default="all", choices=["all", "hol", "observability"])
    parser.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "extras.json"))
    args = parser.parse_args(argv)
    if args.mode == "serve":
        uvloop.run(_serve(args.window))
        return 0
    return uvloop.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
