"""malla.testing as a user meets it: the malla_cluster fixture in a pytest
run of its own (a conftest.py with pytest_plugins), the async cluster()
without pytest; nodes stopped after a test, also one that failed."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from support import ROOT, run_async

import malla
from malla.testing import cluster

# a test that fails: its nodes must be stopped all the same
FAILING_TEST = '''
import json


def test_that_fails(malla_cluster):
    c = malla_cluster(2, names=["x", "y"])
    assert sorted(n.name for n in c) == ["x", "y"] and c["x"].peers() == ["y"]
    with open("ports.json", "w") as f:
        json.dump([n.address[1] for n in c], f)
    assert False, "this test fails on purpose"
'''


def docs_example(marker: str) -> str:
    """The ```python block of docs/testing.md that contains `marker`."""
    with open(os.path.join(ROOT, "docs", "testing.md"), encoding="utf-8") as fh:
        blocks = re.findall(r"^```python\n(.*?)^```", fh.read(), re.S | re.M)
    (block,) = [b for b in blocks if marker in b]
    return block


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_the_fixture_in_a_users_pytest_run(tmp_path):
    """The conftest.py line and the test file of docs/testing.md, run by
    pytest as a user's project would, with one failing test beside them."""
    (tmp_path / "conftest.py").write_text(docs_example("pytest_plugins"))
    (tmp_path / "test_user.py").write_text(docs_example("def test_"))
    (tmp_path / "test_failing.py").write_text(FAILING_TEST)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert "1 failed, 2 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "this test fails on purpose" in proc.stdout
    # the failed test's nodes were stopped after it
    ports = json.loads((tmp_path / "ports.json").read_text())
    assert len(ports) == 2 and all(refused(p) for p in ports)


def test_importing_malla_testing_does_not_import_pytest():
    code = "import sys, malla.testing; print('pytest' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert proc.stdout == "False\n", proc.stderr


class Echo(malla.Service, global_=True):
    def echo(self, x):
        return x


def test_the_async_cluster_stops_its_nodes_even_when_the_block_raises():
    ports: list[int] = []

    async def main():
        with pytest.raises(KeyError):
            async with cluster(2, cookie="a-test-cookie-0123456789") as c:
                ports.extend(n.address[1] for n in c)
                await c.start_service(Echo, on=[1])
                assert await c[0].remote("Echo", "echo", [1]) == 1
                raise KeyError("the test failed")

    run_async(main())
    assert len(ports) == 2 and all(refused(p) for p in ports)


def test_cluster_arguments_are_checked():
    async def main():
        with pytest.raises(ValueError):
            async with cluster(2, names=["a", "a"]):
                pass

    run_async(main())
