"""The smoke test of an installed malla wheel.

Not collected by pytest (no test_ prefix): `make test-wheel` runs it with
the interpreter of a fresh venv that holds only the repaired wheel and its
runtime dependencies, and cibuildwheel runs it (test-command) after each
release build.  It must run from a directory outside the checkout, so the
malla it exercises is the installed one:

    python tests/wheel_smoke.py [--no-compiler] [--no-demo]

It checks: malla and its compiled core come from site-packages, without
Cython; `malla --version`; a two-process call (a `malla node` hosting the
example service shipped in the package, `malla call` as the client, over
loopback) and the node draining on SIGTERM; `malla bench --seconds 0.5`;
`malla demo`.  --no-compiler also asserts that no C compiler is reachable
(make test-wheel strips PATH); --no-demo leaves out the demo (cibuildwheel's
emulated aarch64 runs, where its failover timings are not the point).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from typing import NoReturn

SERVICE = "malla.examples.calculator:Calculator"
TIMEOUT = 120.0   # per command; generous for emulated (QEMU) runs


def fail(what: str) -> NoReturn:
    sys.exit(f"wheel smoke: FAILED: {what}")


def step(what: str) -> None:
    print(f"wheel smoke: {what}", flush=True)


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if proc.returncode != 0:
        fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def check_installed(no_compiler: bool) -> None:
    import malla

    core = importlib.import_module("malla._core")
    installed = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    here = os.path.realpath(os.path.dirname(os.path.dirname(malla.__file__)))
    if here not in installed:
        fail(f"malla is imported from {here}, not from site-packages {sorted(installed)}")
    core_file = core.__file__ or ""
    if not core_file.endswith(".so"):
        fail(f"the core is not a compiled module: {core_file!r}")
    if importlib.util.find_spec("Cython") is not None:
        fail("Cython is installed: the wheel must need no build tools")
    step(f"malla {malla.__version__} from {here} (core {os.path.basename(core_file)})")
    if no_compiler:
        names = sorted({"cc", "gcc", "c++", "g++", "clang",
                        (sysconfig.get_config_var("CC") or "cc").split()[0]})
        reachable = {name: shutil.which(name) for name in names if shutil.which(name)}
        for var in ("CC", "CXX"):   # what a build would use instead of PATH's
            value = os.environ.get(var)
            if value and value != "/bin/false" and shutil.which(value):
                reachable[var] = value
        if reachable:
            fail(f"a compiler is reachable: {reachable}")
        step(f"no compiler reachable (none of {', '.join(names)} on PATH; "
             f"CC={os.environ.get('CC')}, CXX={os.environ.get('CXX')})")


def check_version(malla_bin: str) -> None:
    import malla

    out = run(malla_bin, "--version").stdout.strip()
    if malla.__version__ not in out.split():
        fail(f"malla --version printed {out!r}, expected {malla.__version__}")
    step(f"malla --version: {out}")


def check_two_node_call(malla_bin: str) -> None:
    env = dict(os.environ, MALLA_COOKIE=secrets.token_hex(16))
    node = subprocess.Popen([malla_bin, "node", "smoke1", "--port", "0", "--service", SERVICE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert node.stdout is not None
        ready, _, _ = select.select([node.stdout], [], [], TIMEOUT)
        line = node.stdout.readline() if ready else ""
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            node.kill()
            fail(f"malla node did not start: {line!r} {node.communicate()[1]}")
        seed = f"{match.group(1)}:{match.group(2)}"
        step(f"malla node smoke1 (pid {node.pid}) hosts {SERVICE} on {seed}")
        total = json.loads(run(malla_bin, "call", "Calculator.add", "1", "2",
                               "--seed", seed, env=env).stdout)
        square = json.loads(run(malla_bin, "call", "Calculator.slow_square", "7",
                                "--seed", seed, env=env).stdout)
        if (total, square) != (3, 49):
            fail(f"Calculator.add(1, 2) = {total!r}, slow_square(7) = {square!r}")
        step("malla call from another process: Calculator.add(1, 2) = 3, slow_square(7) = 49")
        node.send_signal(signal.SIGTERM)
        out, err = node.communicate(timeout=TIMEOUT)
        if node.returncode != 0 or "draining" not in out:
            fail(f"malla node did not drain on SIGTERM (exit {node.returncode}): {out}{err}")
        step("malla node drained on SIGTERM and exited 0")
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()


def check_bench(malla_bin: str) -> None:
    results = json.loads(run(malla_bin, "bench", "--seconds", "0.5", "--json").stdout)
    for scenario in ("seq", "inflight128"):
        if results[scenario]["calls"] <= 0:
            fail(f"malla bench made no {scenario} calls: {results}")
    step("malla bench --seconds 0.5: " + ", ".join(
        f"{k} {v['calls_per_s']:,.0f} calls/s" for k, v in results.items()))


def check_demo(malla_bin: str) -> None:
    out = run(malla_bin, "demo").stdout
    if "failed: 0" not in out or "done" not in out:
        fail(f"malla demo did not fail over cleanly:\n{out}")
    step("malla demo: three processes, a node killed, calls failed over")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compiler", action="store_true",
                        help="also assert that no C compiler is reachable")
    parser.add_argument("--no-demo", action="store_true", help="leave out `malla demo`")
    args = parser.parse_args()
    started = time.monotonic()
    check_installed(args.no_compiler)
    malla_bin = os.path.join(os.path.dirname(sys.executable), "malla")   # the console script
    if not os.access(malla_bin, os.X_OK):
        fail(f"the malla console script is not installed next to {sys.executable}")
    check_version(malla_bin)
    check_two_node_call(malla_bin)
    check_bench(malla_bin)
    if not args.no_demo:
        check_demo(malla_bin)
    step(f"passed in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
