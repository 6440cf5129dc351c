"""The C floor: the same request/response over loopback TCP, in plain C.

``bench/cfloor/cfloor.c`` is one program with both ends (``cfloor serve``,
``cfloor client ...``); its header comment gives its exact shape.  It is
compiled here with the system's C compiler (``$CC``, else ``cc``, else
``gcc``, from PATH) into ``build/cfloor/`` (or ``$BENCH_CFLOOR_BUILD_DIR``),
never committed, and rebuilt when the source is newer than the binary or
the flags changed.  Without a compiler the system is "missing: no C
compiler".

The program speaks the harness's line protocol itself (bench/procs.py:
``ready``/``result``/``rss``/``error`` events on stdout, ``go``/``rss`` on
stdin, exit at stdin's EOF), so ``bench.worker`` only pins the process to
its CPUs, as for every system, and then ``exec``s it: the process the
harness started, timed, asked for its RSS and kills is the C program.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.procs import REPO_ROOT

KIND = "native"  # bench.worker execs ``command(spec)`` instead of serving in Python

SOURCE = Path(__file__).resolve().parent / "cfloor" / "cfloor.c"
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra")

_BUILD_TIMEOUT_S = 120.0


class Unavailable(Exception):
    """The C floor cannot be built here; the message is the reason."""


def build_dir() -> Path:
    return Path(os.environ.get("BENCH_CFLOOR_BUILD_DIR") or REPO_ROOT / "build" / "cfloor")


def find_compiler() -> str | None:
    """The C compiler's path: $CC, else cc, else gcc, looked up in PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def compile_command(compiler: str, output: Path) -> list[str]:
    return [compiler, *CFLAGS, "-o", str(output), str(SOURCE)]


def binary() -> Path:
    """The built program, (re)built first when missing or out of date."""
    out = build_dir() / "cfloor"
    stamp = out.with_name("cfloor.flags")
    flags = " ".join(CFLAGS)
    try:
        fresh = (
            out.stat().st_mtime_ns >= SOURCE.stat().st_mtime_ns
            and stamp.read_text() == flags
            and os.access(out, os.X_OK)
        )
    except OSError:
        fresh = False
    if fresh:
        return out
    compiler = find_compiler()
    if compiler is None:
        raise Unavailable("no C compiler")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a name of its own, then renamed: a probe and a test
    # building at the same time never run a half-written binary.
    tmp = out.with_name(f".cfloor.{os.getpid()}.tmp")
    try:
        proc = subprocess.run(
            compile_command(compiler, tmp),
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.split())[-300:]
            raise Unavailable(f"{Path(compiler).name} failed: {tail}")
        if proc.stderr.strip():  # warnings: the source is meant to have none
            print(proc.stderr.rstrip(), file=sys.stderr)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(flags)
    return out


def probe() -> str | None:
    """None if the program is built (or could be), else why not."""
    try:
        binary()
    except Unavailable as exc:
        return str(exc)
    return None


def command(spec: dict[str, Any]) -> list[str]:
    """The argv bench.worker execs for a server or a load client."""
    program = str(binary())
    if spec["role"] == "server":
        return [program, "serve"]
    if spec["role"] == "client" and spec["mode"] == "load":
        p = spec["params"]
        return [
            program,
            "client",
            str(p["port"]),
            str(p["payload_size"]),
            str(p["concurrency"]),
            str(p["max_calls"]),
            repr(float(p["max_seconds"])),
            str(p["warmup_calls"]),
        ]
    raise ValueError(f"the C floor has no {spec['role']} {spec.get('mode')!r}")
