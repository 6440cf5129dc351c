"""The package: a compiled core, no silent fallback, the demo, the version."""

from __future__ import annotations

import glob
import importlib.machinery
import os
import shutil
import subprocess
import sys

from support import ROOT

import malla


def test_core_is_a_compiled_extension():
    from malla import _core

    assert _core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert type(_core.packb).__name__ in ("builtin_function_or_method", "cython_function_or_method")


def test_import_without_the_extension_says_how_to_build(tmp_path):
    pkg = tmp_path / "malla"
    pkg.mkdir()
    for path in glob.glob(os.path.join(ROOT, "malla", "*.py")):
        shutil.copy(path, pkg)
    # an editable install's finder would find the built core elsewhere: drop it
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'Editable' not in getattr(f, '__name__', type(f).__name__)]; import malla")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path),
                                                       "PATH": os.environ["PATH"]})
    assert proc.returncode != 0
    assert "malla._core" in proc.stderr and "not built" in proc.stderr
    assert "pip install -e ." in proc.stderr


def test_version_has_one_source():
    with open(os.path.join(ROOT, "malla", "_version.py")) as fh:
        assert f'__version__ = "{malla.__version__}"' in fh.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as fh:
        text = fh.read()
    assert 'version = { attr = "malla._version.__version__" }' in text
    assert "\nversion =" not in text.split("[project]")[1].split("\n[")[0]


def test_demo_runs_and_ends_by_itself():
    proc = subprocess.run([sys.executable, "-m", "malla", "demo"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Greeter runs on:" in out and "call_cb_all" in out
    assert "killing" in out and "failed: 0" in out
