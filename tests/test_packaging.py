"""`python -m build` makes an sdist that builds, and a wheel that imports
in a fresh environment without Cython."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import zipfile

from support import ROOT


def run(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sdist_and_wheel(tmp_path):
    dist = tmp_path / "dist"
    # sdist first, then the wheel built from it: the sdist must be complete
    run(sys.executable, "-m", "build", "--outdir", str(dist), ROOT)
    sdist = glob.glob(str(dist / "malla-*.tar.gz"))[0]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("malla/_core.pyx") for n in names)
    assert any(n.endswith("malla/core/protocol.pyx") for n in names)
    assert any(n.endswith("malla/core/protocol.pxd") for n in names)
    assert not any(n.endswith((".so", "malla/_core.c")) for n in names)
    assert any(n.endswith("/LICENSE") for n in names)
    assert any(n.endswith("tests/test_packaging.py") for n in names)   # the tests ship too
    wheel = glob.glob(str(dist / "malla-*.whl"))[0]
    # what PyPI and packagers check: the metadata renders, the wheel holds
    # what it should (no duplicates, no stray top-level files)
    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
    run(sys.executable, "-m", "check_wheel_contents", wheel)
    with zipfile.ZipFile(wheel) as whl:
        metadata = next(whl.read(n).decode() for n in whl.namelist()
                        if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    # (without the caller's PYTHONPATH: a malla importable from there would
    # count as installed and pip would skip the wheel)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(py, "-m", "pip", "install", "-q", wheel, env=clean)
    code = ("import importlib.util, malla\n"
            "assert importlib.util.find_spec('Cython') is None, 'Cython is installed'\n"
            "assert malla._core.__file__.endswith('.so')\n"
            "print(malla.__version__)\n")
    out = run(py, "-c", code, cwd=str(tmp_path), env={"PATH": os.environ["PATH"]})
    assert out.stdout.strip() == __import__("malla").__version__
    run(str(venv / "bin" / "malla"), "--help", cwd=str(tmp_path))
