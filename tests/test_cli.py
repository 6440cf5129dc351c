"""The `malla` command line, through real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from support import COOKIE, ROOT, free_port

ENV = dict(os.environ, PYTHONPATH=ROOT, MALLA_COOKIE=COOKIE)


def malla(*args: str, timeout: float = 60, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "malla", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or ENV, cwd=ROOT)


def start_node(name: str, port: int, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "malla", "node", name, "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() else "")
    return proc


@pytest.fixture
def cluster():
    p1, p2 = free_port(), free_port()
    procs = [start_node("n1", p1, "--service", "examples.calculator:Calculator"),
             start_node("n2", p2, "--service", "examples.calculator:Calculator",
                        "--seed", f"127.0.0.1:{p1}")]
    try:
        yield p1, p2, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_help_teaches():
    out = malla("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "MALLA_COOKIE" in out.stdout
    for cmd in ("node", "services", "call"):
        out = malla(cmd, "--help")
        assert out.returncode == 0 and "example:" in out.stdout, cmd


def test_services_and_call(cluster):
    p1, _p2, _ = cluster
    seed = f"127.0.0.1:{p1}"
    out = malla("call", "Calculator.add", "1", "2", "--seed", seed)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 3
    out = malla("call", "Calculator.add", "(1, 2)", "(3,)", "--seed", seed)  # literals
    assert json.loads(out.stdout) == [1, 2, 3]
    out = malla("call", "Calculator.slow_square", "--kwargs", '{"x": 9}', "--seed", seed)
    assert json.loads(out.stdout) == 81
    deadline = time.monotonic() + 10
    while True:   # the table reaches every node within a check cycle
        out = malla("services", "--seed", seed, "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        if (rows and sorted(rows[0]["nodes"]) == ["n1", "n2"]) or time.monotonic() > deadline:
            break
    assert rows == [{"service": "Calculator", "nodes": rows[0]["nodes"], "vsn": ["1.0.0"],
                     "functions": {"add": "(a, b)", "slow_square": "(x)"}}]
    assert sorted(rows[0]["nodes"]) == ["n1", "n2"]
    table = malla("services", "--seed", seed)
    assert "Calculator  vsn 1.0.0" in table.stdout and "add(a, b)" in table.stdout


# exit codes by error family (DESIGN.md "Calls"): 3 did not run, 5 unreachable
@pytest.mark.parametrize("args, code, pattern", [
    (["call", "Calculator.nope", "--seed", "{seed}"], 3, "UnknownFunction"),
    (["call", "nodot", "--seed", "{seed}"], 2, "expected Service.fun"),
    (["call", "Missing.f", "--seed", "{seed}", "--wait", "0"], 3, "not available"),
    (["call", "Calculator.add", "1", "--seed", "127.0.0.1:1", "--wait", "0.3"], 5,
     "cannot join"),
    (["node", "x", "--port", "0", "--service", "no_such_module:X"], 2, "cannot import"),
    (["node", "x", "--port", "0", "--service", "examples.calculator"], 2, "module:Class"),
])
def test_user_mistakes_give_one_line(cluster, args, code, pattern):
    p1, _, _ = cluster
    out = malla(*[a.format(seed=f"127.0.0.1:{p1}") for a in args])
    assert out.returncode == code, out
    assert re.search(pattern, out.stderr), out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_wrong_cookie_is_one_line():
    port = free_port()
    proc = start_node("n1", port)
    try:
        out = malla("services", "--seed", f"127.0.0.1:{port}",
                    env=dict(ENV, MALLA_COOKIE="another-cookie-entirely"))
        assert out.returncode == 5 and "cannot join" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        proc.kill()
        proc.wait()


def test_node_drains_on_sigterm(cluster):
    p1, _p2, procs = cluster
    procs[1].send_signal(signal.SIGTERM)
    rest, err = procs[1].communicate(timeout=20)
    assert procs[1].returncode == 0, err
    assert "draining" in rest
    out = malla("call", "Calculator.add", "2", "2", "--seed", f"127.0.0.1:{p1}")
    assert json.loads(out.stdout) == 4


def test_readme_tour_runs_as_written():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    tour = re.search(r"## A five-minute tour.*?```sh\n(.*?)```", text, re.S).group(1)
    venv_bin = os.path.dirname(sys.executable)
    # the tour assumes malla installed: this venv's console script on PATH
    script = f'export PATH="{venv_bin}:$PATH"\n' + tour
    # the commands as written; the trap only cleans up if one of them fails
    script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    proc = subprocess.Popen(["bash", "-e", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    lines = stdout.splitlines()
    assert "3" in lines and "49" in lines
    assert any(line.startswith("Calculator") for line in lines)


def test_bench_measures_malla_without_the_repositorys_harness(tmp_path):
    # run where the repository's bench/ package cannot be imported: the
    # self-benchmark ships in the package
    out = subprocess.run([sys.executable, "-m", "malla", "bench", "--seconds", "0.3", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert set(figures) == {"seq", "inflight128"}
    for scenario in figures.values():
        assert scenario["calls"] > 0 and scenario["calls_per_s"] > 0
        assert 0 < scenario["p50_us"] < 10_000_000
    # more calls in flight overlap their round trips
    assert figures["inflight128"]["p50_us"] > figures["seq"]["p50_us"]
    assert "measuring" in out.stderr                        # progress as it goes
    bad = malla("bench", "--seconds", "0")
    assert bad.returncode == 2 and "seconds" in bad.stderr


def test_version_names_the_package_and_the_protocol():
    import malla as pkg
    from malla.handshake import PROTOCOL_VERSION

    out = malla("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"malla {pkg.__version__} (protocol {PROTOCOL_VERSION})"
