"""`malla top`: the rows and the text from stats samples (malla/top.py),
and `malla top --once` against a running cluster, through subprocesses."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from support import ROOT, kill_process, spawn_python
from test_cli import ENV, free_port, malla, start_node

from malla import CallTimeout
from malla.top import Row, rates, render


def stats(calls_in=0, calls_out=0, builtin=0, errors=None, latency=None, in_flight=0):
    return {"calls_in": calls_in, "calls_out": calls_out, "errors": errors or {},
            "retries": 0, "failovers": 0, "in_flight": in_flight,
            "latency": latency or {}, "builtin_calls": builtin}


def info(services=None, incarnation=7):
    return {"name": "x", "incarnation": incarnation, "services": services or {}}


def test_rates_are_differences_over_the_time_between_samples():
    before = (10.0, {
        "a": (info({"Calc": "running"}), stats(100, 40, builtin=4, errors={"CallTimeout": 1})),
        "b": (info(), stats(5, 0, builtin=5)),
        "gone": (info(), stats(9)),
        "reborn": (info(incarnation=1), stats(50)),
    })
    after = (12.0, {
        "a": (info({"Calc": "running", "Log": "paused"}),
              stats(130, 50, builtin=6, errors={"CallTimeout": 2, "RemoteError": 3},
                    latency={"Calc.add": {"count": 3, "p50_us": 90.0, "p99_us": 2500.0},
                             "Store.put": {"count": 1, "p50_us": 10.0, "p99_us": 400.0},
                             "Malla.stats": {"count": 9, "p50_us": 1.0, "p99_us": 9e6}},
                    in_flight=2)),
        "b": (info(), stats(7, 0, builtin=7)),       # only top's own calls
        "new": (info(), stats(3)),
        "reborn": (info(incarnation=2), stats(60)),  # restarted: counters anew
        "mute": (CallTimeout("no reply within 2000 ms"), stats()),
    })
    rows = {r.node: r for r in rates(before, after)}
    assert list(rows) == ["a", "b", "mute", "new", "reborn"]    # by name, "gone" gone
    a = rows["a"]
    assert a == Row("a", ["Calc", "Log (paused)"], calls_per_s=((130 - 6) - (100 - 4)) / 2,
                    out_per_s=5.0, errors_per_s=2.0, errors=5, p99_ms=2.5, in_flight=2)
    assert rows["b"].calls_per_s == 0.0
    for name in ("new", "reborn"):
        assert rows[name].calls_per_s is None and rows[name].errors == 0
    assert rows["mute"].problem == "no answer: CallTimeout: no reply within 2000 ms"
    # no earlier sample (the live view's first frame): figures, no rates
    first = rates(None, after)
    assert [r.calls_per_s for r in first] == [None] * 5 and first[0].errors == 5


def test_render_aligns_a_line_per_node():
    rows = [Row("storage1", ["Calc"], 1234.5, 0.0, None, 0, 0.25, 1),
            Row("w2", [], None, None, None, None, None, None, problem="no answer: X: y")]
    text = render(rows, title="malla top")
    lines = text.splitlines()
    assert lines[0] == "malla top"
    assert lines[1].split() == ["NODE", "CALLS/S", "OUT/S", "P99", "MS", "ERR/S", "ERRORS",
                                "IN-FLIGHT", "SERVICES"]
    assert lines[2].split() == ["storage1", "1,234.5", "0.0", "0.25", "-", "0", "1", "Calc"]
    assert lines[3].split()[:7] == ["w2"] + ["-"] * 6
    assert lines[3].endswith("no answer: X: y")
    # the figures' columns end where their headers do
    header_end = lines[1].index("CALLS/S") + len("CALLS/S")
    assert lines[2][:header_end].endswith("1,234.5") and lines[3][:header_end].endswith("-")
    assert render([]).splitlines()[-1] == "(no node runs the built-in Malla service)"


CALLER = textwrap.dedent('''
    import asyncio, sys
    import malla

    async def main():
        async with malla.Node("caller", port=0, seeds=[sys.argv[1]], metrics=True) as node:
            await node.wait_for_services(["Calculator"])
            print("CALLING", flush=True)
            while True:
                await node.remote("Calculator", "add", [1, 2])
                await asyncio.sleep(0.005)

    malla.run(main())
''')


@pytest.fixture
def busy_cluster():
    p1, p2 = free_port(), free_port()
    procs = [start_node("n1", p1, "--service", "examples.calculator:Calculator"),
             start_node("idle", p2, "--seed", f"127.0.0.1:{p1}")]
    caller = spawn_python(CALLER, f"127.0.0.1:{p1}")
    try:
        assert caller.stdout.readline().strip() == "CALLING", caller.stderr.read()
        yield f"127.0.0.1:{p1}"
    finally:
        kill_process(caller)
        for proc in procs:
            kill_process(proc)


def test_top_once_shows_each_node_and_the_calls_being_made(busy_cluster):
    seed = busy_cluster
    deadline = time.monotonic() + 20
    while True:   # every member reaches the others' tables within a check cycle
        out = malla("top", "--once", "--json", "--seed", seed)
        assert out.returncode == 0, out.stderr
        rows = {r["node"]: r for r in json.loads(out.stdout)}
        if sorted(rows) == ["caller", "idle", "n1"] or time.monotonic() > deadline:
            break
    assert sorted(rows) == ["caller", "idle", "n1"]
    n1, idle, caller = rows["n1"], rows["idle"], rows["caller"]
    assert n1["services"] == ["Calculator"] and n1["calls_per_s"] > 0
    # top's own Malla calls are left out: a node nobody calls shows none
    assert idle["calls_per_s"] == 0 and idle["services"] == []
    assert caller["out_per_s"] > 0 and caller["p99_ms"] > 0     # (metrics on there)
    assert n1["p99_ms"] is None and n1["errors"] == 0
    text = malla("top", "--once", "--seed", seed)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[0] == "NODE"
    assert sorted(line.split()[0] for line in lines[1:]) == ["caller", "idle", "n1"]
    assert "\x1b[" not in text.stdout      # --once: no screen control


def test_live_view_redraws_in_place_on_a_terminal_and_ctrl_c_quits(busy_cluster):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "malla", "top", "--interval", "0.3",
                             "--seed", busy_cluster], stdout=follower, stderr=subprocess.PIPE,
                            env=ENV, cwd=ROOT)
    os.close(follower)
    seen = b""
    try:
        end = time.monotonic() + 20
        # three frames, each from the top of a cleared screen, naming n1
        # (up to a fourth clear: the third frame is whole only then)
        while seen.count(b"\x1b[H\x1b[2J") < 4 and time.monotonic() < end:
            seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(leader)
    frames = seen.decode().split("\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 4
    assert all("malla top:" in f and "\nn1 " in f.replace("\r\n", "\n") for f in frames[:3])
