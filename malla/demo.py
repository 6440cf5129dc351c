"""`make demo` / `python -m malla demo`: a small cluster on loopback.

Three nodes run as separate processes (alpha, beta, gamma); beta and gamma
host the Greeter service.  This process joins as "demo", calls Greeter,
kills beta with SIGKILL while calling, and shows the calls failing over to
gamma.  It ends by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import malla

__all__ = ["Greeter", "main"]


class Greeter(malla.Service, global_=True, vsn="1.0"):
    """The demo service: says hello, and says where it runs."""

    def __init__(self, node_name: str = "?") -> None:
        self.node_name = node_name

    def hello(self, who: str) -> str:
        return f"hello {who}, from {self.node_name} (pid {os.getpid()})"

    async def add(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b


async def _serve(name: str, seed: str | None, with_service: bool) -> None:
    node = malla.Node(name, port=0, seeds=[seed] if seed else [])
    await node.start()
    if with_service:
        await node.start_service(Greeter(name))
    print(f"READY {node.address[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await node.stop()


def _spawn(name: str, seed: str | None, with_service: bool, env: dict[str, str]) -> tuple[Any, int]:
    args = [sys.executable, "-m", "malla.demo", "serve", name, seed or "-",
            "1" if with_service else "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"demo node {name} did not start")
    return proc, int(line.split()[1])


def _say(text: str) -> None:
    print(text, flush=True)


async def _run_demo() -> int:
    env = dict(os.environ, MALLA_COOKIE=os.urandom(16).hex())
    os.environ["MALLA_COOKIE"] = env["MALLA_COOKIE"]
    procs: dict[str, Any] = {}
    try:
        _say("malla demo: starting three nodes as separate processes on 127.0.0.1")
        procs["alpha"], alpha_port = _spawn("alpha", None, False, env)
        seed = f"127.0.0.1:{alpha_port}"
        procs["beta"], _ = _spawn("beta", seed, True, env)
        procs["gamma"], _ = _spawn("gamma", seed, True, env)
        for name, proc in procs.items():
            hosts = "  hosts Greeter" if name != "alpha" else ""
            _say(f"  node {name:<6} pid {proc.pid}{hosts}")
        async with malla.Node("demo", port=0, seeds=[seed], check_interval=1.0) as node:
            _say(f"\nthis process is node 'demo', joining the cluster through alpha ({seed})")
            if not await node.wait_for_services(["Greeter"], retries=20):
                _say("Greeter did not appear")
                return 1
            while len(node.get_nodes("Greeter")) < 2:
                await asyncio.sleep(0.05)
            _say(f"  peers: {', '.join(node.peers())}")
            _say(f"  Greeter runs on: {', '.join(node.get_nodes('Greeter'))}")
            _say("\ncalling Greeter.hello through remote():")
            for i in range(3):
                _say("  " + await node.remote("Greeter", "hello", [f"call {i}"]))
            total = await node.remote("Greeter", "add", [20, 22])
            _say(f"  Greeter.add(20, 22) = {total}")
            fanout = await node.call_cb_all("Greeter", "hello", ["everyone"])
            _say("\ncall_cb_all(Greeter.hello) asks every node at once:")
            for where, answer in zip(node.get_nodes("Greeter"), fanout, strict=False):
                _say(f"  {where}: {answer}")
            first = node.get_nodes("Greeter")[0]
            _say(f"\nkilling {first} (SIGKILL) while calling: remote() fails over")
            procs[first].send_signal(signal.SIGKILL)
            procs[first].wait()
            answered: dict[str, int] = {}
            failed = 0
            started = time.monotonic()
            for i in range(20):
                try:
                    text = await node.remote("Greeter", "hello", [f"after the kill {i}"],
                                             timeout=2000, excp_retries=1,
                                             retries_sleep_msec=100)
                    who = text.split("from ")[1].split(" ")[0]
                    answered[who] = answered.get(who, 0) + 1
                except malla.MallaError as exc:
                    failed += 1
                    _say(f"  call {i} failed: {exc!r}")
            took = (time.monotonic() - started) * 1000
            _say(f"  20 calls in {took:.0f} ms, answered by: "
                 + ", ".join(f"{k} x{v}" for k, v in answered.items()) + f"; failed: {failed}")
            _say(f"  Greeter now runs on: {', '.join(node.get_nodes('Greeter'))}")
            _say("\ndone: stopping the cluster")
            return 0 if failed == 0 and first not in answered else 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    return malla.run(_run_demo())


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "serve":
        _, _, name, seed, with_service = sys.argv[:5]
        malla.run(_serve(name, None if seed == "-" else seed, with_service == "1"))
    else:
        sys.exit(main())
