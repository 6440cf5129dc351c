"""The benchmark harness runs end to end in its short mode (figures are
never asserted: they live in bench/RESULTS.md), and the C floor builds,
echoes byte for byte, checks what it gets back and is reported."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import ROOT

from bench import cfloor_sys
from bench.procs import HOST, Child, ChildError, ChildSet
from bench.scenarios import SCENARIOS

SYSTEMS = {"floor", "cfloor", "malla", "grpc", "pyro5", "rpyc"}


def _short_run(module: str, out, timeout: float = 300) -> tuple[subprocess.CompletedProcess,
                                                                  dict]:
    """`python -m MODULE --short --json OUT`: the process and its JSON."""
    proc = subprocess.run([sys.executable, "-m", module, "--short", "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.tools
def test_bench_short_mode_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc, data = _short_run("bench", out)
    meta = data["meta"]
    assert meta["python"] and meta["git_commit"] and meta["machine"]["cores"] >= 1
    versions = {k.lower(): v for k, v in meta["versions"].items()}
    assert {"uvloop", "cython", "msgpack"} <= set(versions), versions
    rows = data["results"]
    assert {r["system"] for r in rows} == SYSTEMS
    scenarios = {r["scenario"] for r in rows}
    assert {"seq", "inflight128", "payload_1m", "clients16", "fanout8", "inprocess",
            "memory_inflight", "memory_idle"} <= scenarios
    for row in rows:   # the test extra installs the peers: none may be missing
        assert row["status"] in ("ok", "n/a"), row
    seq = {r["system"]: r for r in rows if r["scenario"] == "seq"}
    assert seq["malla"]["calls_per_s"] > 0 and seq["malla"]["p50_us"] > 0
    assert "ratio_to_floor" in seq["malla"]
    assert seq["cfloor"]["calls_per_s"] > 0 and seq["malla"]["ratio_to_cfloor"]["calls_per_s"] > 0
    assert "vs the C floor" in proc.stdout
    # the table is printed too, every system named in it
    for system in SYSTEMS:
        assert system in proc.stdout
    # and the chart of RESULTS.md draws from the same JSON
    from bench import chart

    scenarios, by_system = chart.series(data, "calls_per_s")
    assert "seq" in scenarios and set(by_system) == SYSTEMS
    assert all(v == 1.0 for v in by_system["floor"])
    k = scenarios.index("seq")
    assert by_system["malla"][k] == seq["malla"]["ratio_to_floor"]["calls_per_s"]
    png = tmp_path / "chart.png"
    assert chart.main([str(out), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.tools
def test_the_streams_bench_runs_short(tmp_path):
    proc, data = _short_run("bench.streams", tmp_path / "streams.json")
    med = data["median"]
    for label in ("16B", "64KiB"):
        for streams in (1, 100):
            for system in ("stream", "grpc", "paging"):
                assert med[f"{system}_{label}_x{streams}"] > 0
    for name in ("stream", "stream_window1024", "paging"):
        for side in ("producer", "consumer"):
            assert med[f"cpu_us_per_item_{name}_{side}"] > 0
    # the producer's own allocations while its consumer reads slowly: a
    # batch and what waits for the socket, far from a window of 64 KiB
    # chunks (4 MiB), which is the consumer's to hold
    for suffix in ("", "_window1024"):
        assert 0 < med[f"slow_producer_traced_kib{suffix}"] < 64 * 64
    assert med["slow_consumer_traced_kib_window1024"] > 64 * 64
    assert "grpc.aio" in proc.stdout and "a slow consumer" in proc.stdout


@pytest.mark.tools
def test_the_resilience_scenarios_short_mode_end_to_end(tmp_path):
    # (figures are not asserted; what the hashing and the ejection guarantee is)
    out = tmp_path / "resilience.json"
    proc = subprocess.run([sys.executable, "-m", "bench.resilience", "--short", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    keyed = data["keys"]["keyed"]
    assert keyed["moved"] == keyed["held_by_leaver"] > 0 and keyed["moved_not_the_leavers"] == 0
    assert keyed["max_over_mean"] <= 1.25
    for mode in ("failing_overloaded", "failing_lost"):
        assert set(data[mode]) == {"p2c", "shuffle"}
        for balance, r in data[mode].items():
            assert r["seen_ejected"] == {"Where": ["n3"]}, (mode, balance, r)
    assert "first time on a healthy node" in proc.stdout


@pytest.mark.tools
def test_the_tails_scenarios_run_short(tmp_path):
    # (the harness and its JSON's shape; no figure is asserted)
    proc, data = _short_run("bench.tails", tmp_path / "tails.json")
    assert data["short"] is True and data["calls"] > 0
    nodes = {"tail0", "tail1", "tail2", "tail3"}

    def check_run(run: dict, balance: str, hedged: bool) -> None:
        assert run["balance"] == balance and run["calls"] == data["calls"], run
        # every call was sent once, a hedged one twice: the shares add up
        # (a connection that a heavily loaded machine lost meanwhile is
        # missing, its calls before with it)
        assert run["share"] and set(run["share"]) <= nodes
        assert sum(run["share"].values()) <= 1 + run["extra_calls"] + 1e-9
        assert run["hedge_after_ms"] is None or hedged
        assert run["throttled"] >= 0
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"] <= run["max_ms"]

    for callers in ("8", "32"):
        res = data["slow_node"][callers]
        assert {"p99_ratio", "throughput_ratio", "target_met"} <= set(res)
        for balance in ("p2c", "shuffle"):
            assert 0 <= res[balance]["slow_share"] <= 1
            [run] = res["runs"][balance]
            check_run(run, balance, hedged=False)
            assert run["hedges"] == 0
    for balance in ("p2c", "shuffle"):
        res = data["hedging"][balance]
        check_run(res["no_hedge"], balance, hedged=False)
        assert res["no_hedge"]["hedges"] == 0
        check_run(res["hedged"], balance, hedged=True)
        assert res["hedged"]["hedge_after_ms"] == round(res["no_hedge"]["p95_ms"], 3)
        assert {"p99_over_p50", "target_met"} <= set(res["hedged"])
    assert "slow node: 4 nodes" in proc.stdout and "hedging: 4 nodes" in proc.stdout


# ---------------------------------------------------------------- the C floor
# Real processes on real loopback TCP: the C program built by the harness,
# started through bench.worker (which execs it), driven by the harness's
# own parent side (bench.procs) or by plain sockets.


def _bench_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, **extra)


def test_cfloor_compiles_without_warnings(tmp_path):
    compiler = cfloor_sys.find_compiler()
    assert compiler is not None, "the tests need a C compiler (the core needs one too)"
    assert {"-Wall", "-Wextra", "-O2"} <= set(cfloor_sys.CFLAGS)
    proc = subprocess.run(cfloor_sys.compile_command(compiler, tmp_path / "cfloor"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert os.access(tmp_path / "cfloor", os.X_OK)


def test_cfloor_is_built_once_and_again_when_the_source_is_newer(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CFLOOR_BUILD_DIR", str(tmp_path / "b"))
    built = cfloor_sys.binary()
    assert built == tmp_path / "b" / "cfloor" and os.access(built, os.X_OK)
    first = built.stat()
    assert cfloor_sys.binary().stat().st_mtime_ns == first.st_mtime_ns  # up to date: kept
    source_ns = cfloor_sys.SOURCE.stat().st_mtime_ns
    os.utime(built, ns=(source_ns - 10**10, source_ns - 10**10))  # older than the source
    rebuilt = cfloor_sys.binary().stat()
    assert rebuilt.st_mtime_ns >= source_ns and rebuilt.st_ino != first.st_ino


def test_cfloor_default_build_is_never_committed(monkeypatch):
    monkeypatch.delenv("BENCH_CFLOOR_BUILD_DIR", raising=False)
    built = cfloor_sys.build_dir() / "cfloor"
    assert built == Path(ROOT, "build", "cfloor", "cfloor")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(built)], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, f"{built} is not ignored by git"


def test_cfloor_is_missing_without_a_c_compiler(tmp_path):
    out = tmp_path / "bench.json"
    empty = tmp_path / "bin"
    empty.mkdir()
    env = _bench_env(PATH=str(empty), BENCH_CFLOOR_BUILD_DIR=str(tmp_path / "build"))
    env.pop("CC", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--systems", "cfloor",
                           "--scenarios", "seq,memory_idle", "--short", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["seq"]["status"] == "missing: no C compiler"
    assert rows["memory_idle"]["status"] == "n/a"
    assert "missing: no C compiler" in proc.stdout
    assert not (tmp_path / "build" / "cfloor").exists()


def _server(children: ChildSet, cpus: list[int] | None = None) -> tuple[Child, int]:
    server = children.start({"role": "server", "system": "cfloor", "params": {}, "cpus": cpus},
                            "cfloor server")
    return server, server.expect("ready", 60)["port"]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        assert chunk, "the C floor server closed the connection"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def test_cfloor_server_echoes_byte_exact():
    payloads = [b"", b"x", os.urandom(255), os.urandom(65536), os.urandom(1 << 20)]
    with ChildSet() as children:
        server, port = _server(children)
        with socket.create_connection((HOST, port), timeout=30) as sock:
            # all pipelined in one go, the last frame's header split across two sends
            frames = b"".join(struct.pack(">I", len(p)) + p for p in payloads)
            sock.sendall(frames[:-(len(payloads[-1]) + 2)])
            sock.sendall(frames[-(len(payloads[-1]) + 2):])
            for payload in payloads:
                (size,) = struct.unpack(">I", _recv_exactly(sock, 4))
                assert size == len(payload)
                assert _recv_exactly(sock, size) == payload
        rss = server.ask_rss()
        assert rss["peak_kib"] > 0 and rss["current_kib"] > 0


def _load_params(port: int, payload_size: int = 1024, concurrency: int = 1) -> dict:
    return {"port": port, "payload_size": payload_size, "concurrency": concurrency,
            "max_calls": 50, "max_seconds": 5.0, "warmup_calls": 5}


def _bad_echo_server(mangle) -> tuple[socket.socket, int]:
    """A server that answers each frame with ``mangle(payload)`` (plain sockets)."""
    listener = socket.create_server((HOST, 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                while True:
                    (size,) = struct.unpack(">I", _recv_exactly(conn, 4))
                    reply = mangle(_recv_exactly(conn, size))
                    conn.sendall(struct.pack(">I", len(reply)) + reply)
            except (AssertionError, OSError):
                return

    threading.Thread(target=run, daemon=True).start()
    return listener, listener.getsockname()[1]


def _flip_byte_100(payload: bytes) -> bytes:
    return payload[:100] + bytes([payload[100] ^ 0xFF]) + payload[101:]


@pytest.mark.parametrize("mangle, message", [
    (_flip_byte_100, r"echo mismatch: reply 1 differs from the payload at byte 100 of 1024"),
    (lambda p: p[:-1], r"echo mismatch: reply 1 is 1023 bytes long, the payload 1024"),
])
def test_cfloor_client_fails_loudly_on_a_wrong_echo(mangle, message):
    listener, port = _bad_echo_server(mangle)
    with listener, ChildSet() as children:
        client = children.start({"role": "client", "system": "cfloor", "mode": "load",
                                 "params": _load_params(port), "cpus": None}, "cfloor client")
        with pytest.raises(ChildError, match=message):
            client.expect("ready", 60)


def test_cfloor_processes_are_the_c_program_pinned_like_every_system():
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with ChildSet() as children:
        server, port = _server(children, cpus=[cpu])
        client = children.start({"role": "client", "system": "cfloor", "mode": "load",
                                 "params": _load_params(port, concurrency=4), "cpus": [cpu]},
                                "cfloor client")
        client.expect("ready", 60)  # connected, checked, warmed up; waits for "go"
        for child in (server, client):
            assert os.sched_getaffinity(child.pid) == {cpu}
            # exec'd: the harness's child is the C program itself, not a Python wrapper
            assert Path(f"/proc/{child.pid}/exe").resolve() == cfloor_sys.binary().resolve()
        client.send("go")
        result = client.expect("result", 60)
        assert result["calls"] == 52  # 50 rounded up to whole rounds of 4 in flight
        sketch = result["sketch_ns"]
        assert len(sketch) == 1001 and sketch == sorted(sketch) and sketch[0] > 0


@pytest.fixture(scope="module")
def cfloor_run(tmp_path_factory):
    """One short harness run of floor and cfloor over seq and inflight128."""
    out = tmp_path_factory.mktemp("cfloor") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--systems", "floor,cfloor",
                           "--scenarios", "seq,inflight128", "--short", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_bench_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["system"], r["scenario"]): r for r in json.loads(out.read_text())["results"]}
    return rows, proc.stdout


@pytest.mark.parametrize("scenario", ["seq", "inflight128"])
def test_cfloor_short_run_gives_calls_and_sane_latencies(cfloor_run, scenario):
    rows, _ = cfloor_run
    row = rows["cfloor", scenario]
    assert row["status"] == "ok" and row["reps"] == 1, row
    assert row["calls_per_s"] > 0
    # a loopback round trip is more than a microsecond and less than the run
    assert 1 <= row["p50_us"] <= row["p99_us"] < 10e6
    assert row["rss_client_kib"] > 0 and row["rss_server_kib"] > 0
    # Little's law, with wide slack: calls/s x latency = calls in flight
    in_flight = row["calls_per_s"] * row["p50_us"] / 1e6
    concurrency = SCENARIOS[scenario].concurrency
    assert concurrency / 8 <= in_flight <= concurrency * 4, (in_flight, row)


def test_the_report_gives_ratios_to_the_c_floor(cfloor_run):
    rows, stdout = cfloor_run
    for scenario in ("seq", "inflight128"):
        floor, cfloor = rows["floor", scenario], rows["cfloor", scenario]
        assert floor["ratio_to_cfloor"]["calls_per_s"] == pytest.approx(
            floor["calls_per_s"] / cfloor["calls_per_s"], rel=1e-3)
        assert cfloor["ratio_to_cfloor"]["p50_us"] == pytest.approx(1.0)
        # the main table's divisor is still the Python floor
        assert cfloor["ratio_to_floor"]["calls_per_s"] == pytest.approx(
            cfloor["calls_per_s"] / floor["calls_per_s"], rel=1e-3)
    table = stdout[stdout.index("vs the C floor"):]
    floor_line = next(line for line in table.splitlines() if line.split()[1:2] == ["floor"])
    ratio = rows["floor", "seq"]["ratio_to_cfloor"]["calls_per_s"]
    assert floor_line.split()[2] == f"×{ratio:.2f}"


@pytest.mark.tools
def test_the_balance_cost_counts_instructions_per_call(tmp_path):
    # (callgrind's counts of the calling process, p2c beside shuffle; the
    # ratio is reported, not asserted)
    # (16 runs under callgrind, 90 s on an idle machine: room for a loaded one)
    proc, data = _short_run("bench.balance_cost", tmp_path / "balance_cost.json", timeout=900)
    # valgrind is installed when missing as root (CI); elsewhere say what to do
    assert "missing" not in data, f"install {data.get('missing')} to count instructions"
    rows = data["instructions_per_call"]
    assert set(rows) == {"seq, 1 server", "inflight128, 1 server", "seq, 2 servers",
                         "inflight128, 2 servers"}
    for row in rows.values():
        # a call costs thousands of instructions (a warm-up left out by the
        # difference of two runs), whichever the balance
        assert row["p2c"] > 1000 and row["shuffle"] > 1000, row
        assert row["p2c_over_shuffle"] == pytest.approx(row["p2c"] / row["shuffle"], rel=1e-3)
    assert "p2c/shuffle" in proc.stdout
