"""`python -m build` makes an sdist that builds, and a wheel that imports
in a fresh environment without Cython; the release configuration
([tool.cibuildwheel] and .github/workflows/release.yml) builds exactly the
wheels it promises.  (The repaired wheel serving calls with no compiler is
`make test-wheel`, its own CI step: tests/wheel_smoke.py.)"""

from __future__ import annotations

import glob
import itertools
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest
import yaml
from support import ROOT

# What the release promises: CPython 3.10-3.14 (not free-threaded), glibc and
# musl, x86_64 and aarch64 -- every combination, nothing else.
PYTHONS = ["cp310", "cp311", "cp312", "cp313", "cp314"]
PLATFORMS = ["manylinux", "musllinux"]
ARCHS = ["x86_64", "aarch64"]
RELEASE = {f"{py}-{plat}_{arch}"
           for py, plat, arch in itertools.product(PYTHONS, PLATFORMS, ARCHS)}
WORKFLOW = os.path.join(ROOT, ".github", "workflows", "release.yml")


def run(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.tools
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
    # ... with what they read
    for needed in ("mkdocs.yml", "docs/_hooks.py", "bench/RESULTS.md", "bench/results.png",
                   "bench/cfloor/cfloor.c", ".github/workflows/release.yml",
                   "tests/wheel_smoke.py", "tests/dnsmasq.py", "fuzz/fuzz_decode.py"):
        assert any(n.endswith("/" + needed) for n in names), needed
    wheel = glob.glob(str(dist / "malla-*.whl"))[0]
    # what PyPI and packagers check: the metadata renders, the wheel holds
    # what it should (no duplicates, no stray top-level files)
    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
    run(sys.executable, "-m", "check_wheel_contents", wheel)
    with zipfile.ZipFile(wheel) as whl:
        members = whl.namelist()
        metadata = next(whl.read(n).decode() for n in members
                        if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    for label in ("Homepage", "Documentation", "Source", "Changelog"):
        assert re.search(rf"^Project-URL: {label}, https://", metadata, re.M), label
    # the README's tour runs from a wheel: the services it starts ship inside
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        tour = re.findall(r"--service ([\w.]+):\w+", fh.read())
    assert tour and all(m.startswith("malla.") for m in tour), tour
    assert {m.replace(".", "/") + ".py" for m in tour} <= set(members)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    # (without PYTHONPATH: a source tree on it, with the egg-info the build
    # leaves there, would look to pip like malla already installed)
    alone = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(py, "-m", "pip", "install", "-q", wheel, env=alone)
    code = ("import importlib.util, malla\n"
            "assert importlib.util.find_spec('Cython') is None, 'Cython is installed'\n"
            "assert malla._core.__file__.endswith('.so')\n"
            "print(malla.__version__)\n")
    out = run(py, "-c", code, cwd=str(tmp_path), env={"PATH": os.environ["PATH"]})
    assert out.stdout.strip() == __import__("malla").__version__
    run(str(venv / "bin" / "malla"), "--help", cwd=str(tmp_path))


def test_readme_links_stay_in_the_repository():
    # the README is also the PyPI page: it may point only at files it ships with
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        links = re.findall(r"\]\(([^)\s]+)\)", fh.read())
    assert links
    for link in links:
        path = os.path.realpath(os.path.join(ROOT, link.split("#")[0]))
        assert "://" not in link and path.startswith(os.path.realpath(ROOT) + os.sep), link
        assert os.path.exists(path), link


def cibuildwheel_identifiers(**env: str) -> set[str]:
    """What cibuildwheel itself would build on Linux from pyproject.toml
    (it reads the configuration and expands the selectors; no Docker)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    out = run(os.path.join(os.path.dirname(sys.executable), "cibuildwheel"),
              "--print-build-identifiers", "--platform", "linux", ROOT,
              env={**clean, **env}, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="cibuildwheel runs on Python >= 3.11")
def test_cibuildwheel_builds_exactly_the_release_matrix():
    import tomllib  # (3.11+, as cibuildwheel)

    assert cibuildwheel_identifiers() == RELEASE
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        cibw = tomllib.load(fh)["tool"]["cibuildwheel"]
    # each wheel is tested from its install by the smoke test make test-wheel runs
    script = re.search(r"\{project\}/(\S+\.py)", cibw["test-command"]).group(1)
    assert script == "tests/wheel_smoke.py" and os.path.exists(os.path.join(ROOT, script))
    assert "auditwheel repair" in cibw["linux"]["repair-wheel-command"]
    # the workflow splits the build by architecture: together its jobs build it all
    with open(WORKFLOW, encoding="utf-8") as fh:
        wheels = yaml.safe_load(fh)["jobs"]["wheels"]
    arch_env = next(s for s in wheels["steps"] if "cibuildwheel" in s.get("uses", ""))["env"]
    assert arch_env == {"CIBW_ARCHS_LINUX": "${{ matrix.arch }}"}   # no other override
    per_job = [cibuildwheel_identifiers(CIBW_ARCHS_LINUX=arch)
               for arch in wheels["strategy"]["matrix"]["arch"]]
    assert set().union(*per_job) == RELEASE and sum(map(len, per_job)) == len(RELEASE)


def test_release_workflow_publishes_tagged_builds_by_trusted_publishing():
    with open(WORKFLOW, encoding="utf-8") as fh:
        flow = yaml.safe_load(fh)
    triggers = flow[True]   # YAML 1.1 reads the key `on` as true
    assert triggers["push"] == {"tags": ["v*"]}
    jobs = flow["jobs"]
    wheels = jobs["wheels"]
    assert wheels["runs-on"].startswith("ubuntu")
    assert sorted(wheels["strategy"]["matrix"]["arch"]) == sorted(ARCHS)
    qemu = [s for s in wheels["steps"] if "setup-qemu-action" in s.get("uses", "")]
    assert len(qemu) == 1 and qemu[0]["if"] == "matrix.arch == 'aarch64'"
    assert "arm64" in qemu[0]["with"]["platforms"]
    assert any(s.get("with", {}).get("path") == "wheelhouse/*.whl" for s in wheels["steps"])
    sdist_runs = " ".join(s.get("run", "") for s in jobs["sdist"]["steps"])
    assert "build --sdist" in sdist_runs
    publish = jobs["publish"]
    assert sorted(publish["needs"]) == ["sdist", "wheels"]
    assert "refs/tags/v" in publish["if"] and "push" in publish["if"]
    assert publish["permissions"] == {"id-token": "write"}
    upload = publish["steps"][-1]
    assert upload["uses"].startswith("pypa/gh-action-pypi-publish@")
    assert not upload.get("with", {}).get("password")   # trusted publishing: no token
    # the other jobs may only read
    assert flow["permissions"] == {"contents": "read"}
