"""Every Python example in the README and docs/ runs, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

DOCS = [os.path.join(ROOT, "README.md"),
        *sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                if f.endswith(".md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for path in DOCS:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for _i, match in enumerate(BLOCK.finditer(text)):
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{os.path.basename(path)}:{line}")


@pytest.mark.parametrize("code", list(examples()))
def test_example_runs(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MALLA_COOKIE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"example failed:\n{proc.stdout}\n{proc.stderr}"
