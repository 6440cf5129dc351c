"""The benchmark harness runs end to end in its short mode (figures are
never asserted: they live in bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import ROOT

SYSTEMS = {"floor", "cfloor", "malla", "grpc", "pyro5", "rpyc"}


def test_bench_short_mode_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--short", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
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
