"""Lint and types as tests: ruff, mypy --strict on the Python layers,
cython-lint on the core, and the typed-proxy example."""

from __future__ import annotations

import os
import subprocess
import sys

from support import ROOT

BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def test_ruff():
    out = run(sys.executable, "-m", "ruff", "check", "malla", "tests", "examples", "bench", "fuzz")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict():
    out = run(sys.executable, "-m", "mypy")
    assert out.returncode == 0, out.stdout + out.stderr


def test_cython_lint():
    out = run(os.path.join(BIN, "cython-lint"), "--max-line-length", "100",
              "malla/_core.pyx", "malla/_core.pxd")
    assert out.returncode == 0, out.stdout + out.stderr


def test_typed_proxy_example_passes_mypy():
    out = run(sys.executable, "-m", "mypy", "--strict", "examples/typed_client.py")
    assert out.returncode == 0, out.stdout + out.stderr
