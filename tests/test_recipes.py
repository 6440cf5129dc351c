"""The recipes of docs/recipes/ run as they say: the FastAPI application
under uvicorn (one worker and several), the gunicorn configuration with
synchronous workers, the notebook's cells in a real Jupyter kernel.  Each
against a real malla node that hosts the service, over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from recipes import cells, write_files
from support import COOKIE, ROOT, free_port

import malla

BIN = os.path.dirname(sys.executable)


class Calculator(malla.Service, global_=True):
    def add(self, a, b):
        return a + b


@pytest.fixture
def backend():
    """A node hosting Calculator, in this process, on its own thread."""
    with malla.BlockingNode("calc", cookie=COOKIE, port=0) as node:
        node.start_service(Calculator())
        yield node


def web_peers(node: malla.BlockingNode) -> list[str]:
    return sorted(p for p in node.peers() if p.startswith("web-"))


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def get_json(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def serve(cmd: list[str], cwd: str, backend: malla.BlockingNode) -> subprocess.Popen:
    env = dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=os.pathsep.join([cwd, ROOT]),
               MALLA_SEEDS="{}:{}".format(*backend.address))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output = proc.communicate()[0]
        raise AssertionError(f"the server did not stop on SIGTERM:\n{output}") from None


def check_web_tier(proc: subprocess.Popen, port: int, backend: malla.BlockingNode,
                   workers: int) -> None:
    """Every worker made its node and joined; requests are served through
    the cluster; on SIGTERM every worker's node leaves the cluster."""
    try:
        wait_for(lambda: len(web_peers(backend)) == workers, f"{workers} worker nodes", proc)
        names = set(web_peers(backend))
        for a in range(10):
            wait_for(lambda: _up(port), "the server listens", proc)
            status, body = get_json(port, f"/add/{a}/2")
            assert status == 200 and body["sum"] == a + 2, body
            assert body["worker"] in names
    finally:
        code = stop(proc)
    # (uvicorn re-raises the SIGTERM it handled, after its graceful shutdown)
    assert code in (0, -signal.SIGTERM), proc.stdout.read() if proc.stdout else ""
    end = time.monotonic() + 15
    while web_peers(backend) and time.monotonic() < end:
        time.sleep(0.05)
    assert web_peers(backend) == []       # the workers' nodes said goodbye


def _up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_fastapi_lifespan_under_uvicorn(tmp_path, backend, workers):
    assert write_files("recipes/fastapi.md", str(tmp_path)) == ["app.py"]
    port = free_port()
    proc = serve([os.path.join(BIN, "uvicorn"), "app:app", "--host", "127.0.0.1",
                  "--port", str(port), "--workers", str(workers)], str(tmp_path), backend)
    check_web_tier(proc, port, backend, workers)


def test_fastapi_maps_a_missing_service_to_503(tmp_path, backend):
    write_files("recipes/fastapi.md", str(tmp_path))
    port = free_port()
    proc = serve([os.path.join(BIN, "uvicorn"), "app:app", "--host", "127.0.0.1",
                  "--port", str(port)], str(tmp_path), backend)
    try:
        wait_for(lambda: _up(port), "the server listens", proc)
        backend.stop_service("Calculator")
        status, body = get_json(port, "/add/1/2")
        assert status == 503 and "no Calculator could take it" in body["detail"]
    finally:
        stop(proc)


def test_gunicorn_sync_workers_make_a_node_after_fork(tmp_path, backend):
    assert write_files("recipes/workers.md", str(tmp_path)) == ["gunicorn.conf.py", "wsgi.py"]
    port = free_port()
    proc = serve([os.path.join(BIN, "gunicorn"), "-w", "2", "-c", "gunicorn.conf.py",
                  "--bind", f"127.0.0.1:{port}", "wsgi:app"], str(tmp_path), backend)
    check_web_tier(proc, port, backend, 2)


def test_notebook_cells_in_a_jupyter_kernel(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    sources = cells("recipes/jupyter.md")
    assert any("await node.start()" in s for s in sources)     # top-level await
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    monkeypatch.setenv("PYTHONPATH", ROOT)           # the kernel imports this malla
    NotebookClient(nb, timeout=60, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    outputs = [c.outputs for c in nb.cells]
    errors = [o for out in outputs for o in out if o.output_type == "error"]
    assert errors == []
    results = [o["data"]["text/plain"] for out in outputs for o in out
               if o.output_type == "execute_result"]
    assert results[1:3] == ["2.5", "15.0"]       # Scratch.mean, in-process and by proxy
