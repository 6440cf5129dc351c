"""Real faults against a real cluster: kill -9, SIGSTOP/SIGCONT, and (in
network namespaces) a link cut without a TCP reset, then healing.

Three subprocess nodes (h1, h2, h3) and this process's node (the observer)
form a mesh.  For each fault on h2, every survivor's get_nodes("Echo") must
drop h2 within heartbeat_timeout + 2 s, and after healing the cluster must
converge again.  Measured times are printed (docs/cluster.md quotes them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from support import COOKIE, ROOT, run_async

import malla

from netns import Topology

HB_INTERVAL = 0.2
HB_TIMEOUT = 1.0
SLACK = 2.0
NODEPROC = os.path.join(ROOT, "tests", "nodeproc.py")
NAMES = ["h1", "h2", "h3"]


class Cluster:
    """h1..h3 as subprocesses, on loopback or each in its own namespace."""

    def __init__(self, topo: Topology | None) -> None:
        self.topo = topo
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ports: dict[str, int] = {}

    def host(self, name: str) -> str:
        return self.topo.addr(name) if self.topo else "127.0.0.1"

    @property
    def observer_host(self) -> str:
        return self.topo.gateway if self.topo else "127.0.0.1"

    def seed(self) -> str:
        return f"{self.host('h1')}:{self.ports['h1']}"

    def spawn(self, name: str, port: int = 0) -> None:
        argv = [sys.executable, NODEPROC, name, "--host", self.host(name), "--port", str(port),
                "--hb-interval", str(HB_INTERVAL), "--hb-timeout", str(HB_TIMEOUT),
                "--check", "1.0"]
        if name != "h1":
            argv += ["--seed", self.seed()]
        env = dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=ROOT)
        kw = dict(stdout=subprocess.PIPE, env=env, text=True)
        proc = self.topo.run(name, argv, **kw) if self.topo else subprocess.Popen(argv, **kw)
        line = proc.stdout.readline()
        assert line.startswith("READY "), f"{name} did not start: {line!r}"
        self.procs[name] = proc
        self.ports[name] = int(line.split()[1])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()


async def views(observer: malla.Node, alive: list[str]) -> dict[str, list[str]]:
    """get_nodes("Echo") as each live node (and the observer) sees it."""
    out = {"observer": sorted(observer.get_nodes("Echo"))}
    for name in alive:
        try:
            seen = await observer.remote(f"Probe_{name}", "nodes_of", ["Echo"], timeout=500,
                                         sna_retries=0)
            out[name] = sorted(seen)
        except malla.MallaError as exc:
            out[name] = [f"error: {exc!r}"]
    return out


async def converged(observer: malla.Node, members: list[str], timeout: float) -> float:
    start = time.monotonic()
    want = sorted(members)
    while True:
        v = await views(observer, members)
        if all(seen == want for seen in v.values()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no convergence on {want} within {timeout} s: {v}")
        await asyncio.sleep(0.05)


def inject(cluster: Cluster, fault: str, name: str) -> None:
    proc = cluster.procs[name]
    if fault == "kill9":
        proc.kill()
        proc.wait()
    elif fault == "sigstop":
        os.kill(proc.pid, signal.SIGSTOP)
    elif fault == "cut":
        assert cluster.topo is not None
        cluster.topo.cut(name)


def heal(cluster: Cluster, fault: str, name: str) -> None:
    if fault == "kill9":
        cluster.spawn(name, cluster.ports[name])  # same name: a new incarnation
    elif fault == "sigstop":
        os.kill(cluster.procs[name].pid, signal.SIGCONT)
    elif fault == "cut":
        assert cluster.topo is not None
        cluster.topo.heal(name)


def run_fault(topo: Topology | None, fault: str) -> None:
    cluster = Cluster(topo)

    async def main() -> None:
        for name in NAMES:
            cluster.spawn(name)
        observer = malla.Node("observer", cookie=COOKIE, host=cluster.observer_host, port=0,
                              seeds=[cluster.seed()], heartbeat_interval=HB_INTERVAL,
                              heartbeat_timeout=HB_TIMEOUT, check_interval=1.0, redial_max=0.5)
        await observer.start()
        try:
            await converged(observer, NAMES, timeout=20)
            t0 = time.monotonic()
            inject(cluster, fault, "h2")
            survivors = ["h1", "h3"]
            took = await converged(observer, survivors, timeout=HB_TIMEOUT + SLACK + 5)
            detect = time.monotonic() - t0
            assert detect <= HB_TIMEOUT + SLACK, f"{fault}: dead peer seen after {detect:.2f} s"
            heal(cluster, fault, "h2")
            rejoin = await converged(observer, NAMES, timeout=30)
            print(f"\n[{'netns' if topo else 'loopback'} {fault}] all survivors dropped h2 "
                  f"after {detect:.2f} s (last view {took:.2f} s); healed in {rejoin:.2f} s")
        finally:
            await observer.stop()
            cluster.stop()

    run_async(main(), timeout=120)


@pytest.mark.parametrize("fault", ["kill9", "sigstop"])
def test_fault_on_loopback(fault):
    run_fault(None, fault)


@pytest.mark.parametrize("fault", ["kill9", "sigstop", "cut"])
def test_fault_in_namespaces(fault):
    with Topology(NAMES) as topo:
        run_fault(topo, fault)
