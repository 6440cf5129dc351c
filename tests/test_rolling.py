"""A rolling restart of five nodes under steady load gives callers no error.

Five `malla node` processes serve Calculator; this process calls it from 32
tasks without pause (default remote() options).  Each node in turn gets
SIGTERM (it drains: stops advertising, finishes calls in flight, says
goodbye), exits, and comes back with the same name and port; the next one
goes only when the cluster sees it again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from support import COOKIE, ROOT, free_port, node_factory, run_async, stop_all

import malla

ENV = dict(os.environ, PYTHONPATH=ROOT, MALLA_COOKIE=COOKIE)
N = 5


def start(name: str, port: int, seed: str | None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "malla", "node", name, "--port", str(port),
            "--service", "examples.calculator:Calculator", "--grace", "5"]
    if seed:
        argv += ["--seed", seed]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    assert "listening on" in proc.stdout.readline()
    return proc


def test_rolling_restart_under_load_gives_no_errors():
    ports = [free_port() for _ in range(N)]
    names = [f"r{i}" for i in range(N)]
    seed = f"127.0.0.1:{ports[0]}"
    procs = {names[0]: start(names[0], ports[0], None)}
    for name, port in zip(names[1:], ports[1:], strict=True):
        procs[name] = start(name, port, seed)

    async def main():
        make, made = node_factory()
        stop = asyncio.Event()
        ok = 0
        errors: list[BaseException] = []

        async def caller(k: int) -> None:
            nonlocal ok
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    assert await client.remote("Calculator", "add", [k, i]) == k + i
                    ok += 1
                except malla.MallaError as exc:
                    errors.append(exc)

        try:
            client = await make("client", seeds=[seed]).start()
            deadline = time.monotonic() + 20
            while len(client.get_nodes("Calculator")) < N:
                assert time.monotonic() < deadline, client.get_nodes("Calculator")
                await asyncio.sleep(0.05)
            tasks = [asyncio.ensure_future(caller(k)) for k in range(32)]
            await asyncio.sleep(1.0)
            progress = []     # calls that succeeded while each node restarted
            for name, port in zip(names, ports, strict=True):
                before = ok
                proc = procs[name]
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.get_running_loop().run_in_executor(
                    None, lambda p=proc: p.communicate(timeout=30))
                assert proc.returncode == 0, err
                procs[name] = start(name, port, None if name == names[0] else seed)
                if name == names[0]:
                    # the first node is everyone's seed: reconnect it to the cluster
                    await client.connect(f"127.0.0.1:{port}")
                deadline = time.monotonic() + 20
                while name not in client.get_nodes("Calculator"):
                    assert time.monotonic() < deadline, f"{name} did not come back"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                progress.append(ok - before)
            stop.set()
            await asyncio.gather(*tasks)
            print(f"\nrolling restart of {N} nodes: {ok} calls ok, {len(errors)} errors, "
                  f"calls ok during each restart: {progress}")
            assert errors == []
            # calls never stalled: every restart had calls succeed through it
            assert all(n > 0 for n in progress), progress
        finally:
            stop.set()
            await stop_all(made)

    try:
        run_async(main(), timeout=240)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
