"""The built-in `Malla` service (malla/builtin.py) on real nodes over
loopback TCP, and `malla ping` through subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from support import ROOT, seed_of, wait_until, with_nodes
from test_cli import ENV, free_port, malla, start_node

import malla as malla_pkg
from malla.handshake import PROTOCOL_VERSION


class Calc(malla_pkg.Service, global_=True):
    def add(self, a, b):
        return a + b

    async def nap(self, seconds):
        await asyncio.sleep(seconds)
        return seconds


class Impostor(malla_pkg.Service, name="Malla", global_=True):
    def ping(self):
        return "not malla"


async def _pair(make):
    a, b = make("a"), make("b")
    await a.start()
    await b.start()
    await b.start_service(Calc)
    await a.connect(seed_of(b))
    await wait_until(lambda: a.get_nodes("Calc") == ["b"] and len(a.get_nodes("Malla")) == 2)
    return a, b


def ask(node, target, fun):
    """Malla.fun on `target` itself (the call malla ping makes)."""
    return node._caller.call_node(target, "Malla", fun, timeout=5000)


def test_ping_info_and_stats_over_tcp():
    async def main(make):
        a, b = await _pair(make)
        assert await ask(a, "b", "ping") == "b"
        info = await ask(a, "b", "info")
        assert info == {"name": "b", "version": malla_pkg.__version__,
                        "protocol": PROTOCOL_VERSION, "incarnation": b.incarnation,
                        "peers": ["a"], "services": {"Calc": "running"},
                        "expected": {"Calc": "running"}, "ready": True}
        for i in range(3):
            assert await a.remote("Calc", "add", [i, 1]) == i + 1
        stats = await ask(a, "b", "stats")
        mine = b.stats()
        # its node.stats(), plus the calls Malla served from peers: the 3
        # adds and the 3 Malla calls above are calls_in
        assert stats["builtin_calls"] == 3
        assert stats["calls_in"] == 6 == mine["calls_in"]
        assert {k: v for k, v in stats.items() if k != "builtin_calls"} == mine
        # call_cb_all reaches every visible node's Malla
        assert sorted(await a.call_cb_all("Malla", "ping")) == ["a", "b"]

    with_nodes(main)


def test_paused_or_undeclared_services_make_a_node_not_ready():
    async def main(make):
        a, b = await _pair(make)
        await b.pause_service("Calc")
        info = await ask(a, "b", "info")
        assert info["ready"] is False and info["expected"] == {"Calc": "paused"}
        assert info["services"] == {"Calc": "paused"}
        await b.resume_service("Calc")
        # declared ahead (malla node --service does, before starting them)
        b._hosting.expect(["Later"])
        info = await ask(a, "b", "info")
        assert info["ready"] is False and info["expected"]["Later"] == "not started"

        class Later(malla_pkg.Service, global_=True):
            def f(self):
                return 1

        await b.start_service(Later)
        assert (await ask(a, "b", "info"))["ready"] is True
        # stopping a service on purpose: no longer expected
        await b.stop_service("Later")
        info = await ask(a, "b", "info")
        assert info["ready"] is True and "Later" not in info["expected"]

    with_nodes(main)


def test_the_name_is_reserved():
    async def main(make):
        a, b = await _pair(make)
        for attempt in (b.start_service(Impostor), b.stop_service("Malla"),
                        b.pause_service("Malla")):
            with pytest.raises(malla_pkg.InvalidOption, match="reserved"):
                await attempt
        with pytest.raises(ValueError):
            await b.start_service(Impostor())
        assert await ask(a, "b", "ping") == "b"

    with_nodes(main)


def test_left_out_of_get_services_yet_callable():
    async def main(make):
        a, b = await _pair(make)
        assert a.get_services() == {"Calc": ["b"]}
        assert b.get_services() == {"Calc": ["b"]}
        assert sorted(a.get_nodes("Malla")) == ["a", "b"]
        assert await b.remote("Malla", "ping") == "b"     # (the local node first)

    with_nodes(main)


def test_hidden_nodes_do_not_run_it():
    async def main(make):
        _a, b = await _pair(make)
        h = make("h", hidden=True)
        await h.start()
        await h.connect(seed_of(b))
        await wait_until(lambda: h.get_nodes("Calc") == ["b"])
        assert "h" not in b.get_nodes("Malla")
        assert await ask(h, "b", "ping") == "b"
        assert await h.remote("Malla", "ping") == "b"     # (h dialled only b)
        assert "Malla" not in h._hosting.entries
        with pytest.raises(malla_pkg.ServiceNotAvailable):
            await b._caller.call_node("h", "Malla", "ping", timeout=2000)

    with_nodes(main)


def test_draining_node_answers_ping_but_is_not_ready():
    async def main(make):
        a, b = await _pair(make)
        call = asyncio.ensure_future(a.remote("Calc", "nap", [1.5]))
        await wait_until(lambda: b._hosting.busy())
        drain = asyncio.ensure_future(b.drain(grace=10))
        await wait_until(lambda: a.get_nodes("Calc") == [])
        assert await ask(a, "b", "ping") == "b"
        info = await ask(a, "b", "info")
        assert info["ready"] is False and info["expected"] == {"Calc": "paused"}
        assert await call == 1.5
        await drain

    with_nodes(main)


# -- malla ping, through subprocesses -------------------------------------------------

SLOW = textwrap.dedent('''
    import asyncio, pathlib
    import malla

    class Slow(malla.Service, global_=True):
        async def nap(self, marker, seconds):
            pathlib.Path(marker).touch()      # the test knows it is running
            await asyncio.sleep(seconds)
            return seconds
''')


@pytest.fixture
def slow_cluster(tmp_path, monkeypatch):
    (tmp_path / "slowmod.py").write_text(SLOW)
    # (test_cli's helpers run every malla command with ENV)
    monkeypatch.setitem(ENV, "PYTHONPATH", f"{ROOT}{os.pathsep}{tmp_path}")
    p1, p2 = free_port(), free_port()
    procs = []
    try:
        procs.append(start_node("n1", p1, "--service", "slowmod:Slow", "--grace", "30"))
        procs.append(start_node("n2", p2, "--service", "examples.calculator:Calculator",
                                "--seed", f"127.0.0.1:{p1}"))
        yield f"127.0.0.1:{p2}", procs, tmp_path
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _until(predicate, seconds: float = 15.0):
    end = time.monotonic() + seconds
    while True:
        out = predicate()
        if out is not None or time.monotonic() > end:
            return out
        time.sleep(0.2)


def test_ping_exit_codes(slow_cluster):
    seed, procs, tmp_path = slow_cluster
    # n1 through n2: the probe meshes with the members it hears of
    out = _until(lambda: (lambda o: o if o.returncode == 0 else None)(
        malla("ping", "n1", "--seed", seed)))
    assert out is not None and out.stdout.strip() == "n1: alive"
    out = malla("ping", "n1", "--ready", "--seed", seed)
    assert out.returncode == 0 and out.stdout.strip() == "n1: ready (Slow)", out
    for args, code, pattern in [
            (["nowhere", "--seed", seed], 3, "node nowhere is not in the cluster"),
            (["n1", "--seed", "127.0.0.1:1", "--timeout", "300"], 5, "cannot join the cluster")]:
        started = time.monotonic()
        out = malla("ping", *args)
        assert out.returncode == code and pattern in out.stderr, out
        assert len(out.stderr.strip().splitlines()) == 1
        assert time.monotonic() - started < 10     # (a probe is bounded; wide slack)

    # a node that accepts connections but never answers (stopped): exit 3
    # once --timeout has passed (the seed answered); the seed itself
    # stopped: the cluster cannot be reached, exit 5
    n2 = procs[1]
    for stopped, target, code, message in [
            (procs[0], "n1", 3, "malla: node n1 did not answer within 1000 ms"),
            (n2, "n2", 5, "malla: cannot join the cluster within 1000 ms")]:
        stopped.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            out = malla("ping", target, "--seed", seed, "--timeout", "1000")
            elapsed = time.monotonic() - started
        finally:
            stopped.send_signal(signal.SIGCONT)
        assert out.returncode == code and out.stderr.strip() == message, out
        assert elapsed < 8       # bounded by the 1 s timeout (wide slack for start-up)
    # a probe's timeout is above 0 (0 would be a cast, answering nothing)
    for bad in ("0", "-5", "x"):
        out = malla("ping", "n2", "--seed", seed, "--timeout", bad)
        assert out.returncode == 2 and "timeout in ms above 0" in out.stderr, out

    # n1 draining (SIGTERM with a call in flight): alive, not ready
    marker = tmp_path / "running"
    call = subprocess.Popen([sys.executable, "-m", "malla", "call", "Slow.nap", str(marker),
                             "20", "--seed", seed], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _until(lambda: True if marker.exists() else None) is True
        procs[0].send_signal(signal.SIGTERM)
        out = _until(lambda: (lambda o: o if o.returncode != 0 else None)(
            malla("ping", "n1", "--ready", "--seed", seed)))
        assert out is not None and out.returncode == 1, out
        assert out.stderr.strip() == "malla: node n1 is not ready: Slow paused"
        assert malla("ping", "n1", "--seed", seed).returncode == 0
    finally:
        call.kill()
        call.communicate()

