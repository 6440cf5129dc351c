"""BlockingNode: a node on its own thread for synchronous programs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from support import COOKIE, ROOT

import malla


class Calc(malla.Service, global_=True):
    def add(self, a, b):
        return a + b

    def thread(self):
        return threading.get_ident()

    def fail(self):
        raise KeyError("missing")


def test_blocking_node_methods_proxies_and_errors():
    with malla.BlockingNode("server", cookie=COOKIE, port=0) as server:
        server.start_service(Calc)
        seed = f"127.0.0.1:{server.address[1]}"
        with malla.BlockingNode("client", cookie=COOKIE, port=0, seeds=[seed]) as client:
            assert client.wait_for_services(["Calc"], retries=5)
            assert client.peers() == ["server"]
            assert client.get_nodes("Calc") == ["server"]
            assert client.remote("Calc", "add", [1, 2]) == 3
            assert client.services.Calc.add(2, 3) == 5
            assert client.service("Calc").add(a=1, b=1) == 2
            assert client.call_cb_all("Calc", "add", [1, 1]) == [2]
            # the function runs on the server's loop thread, not the caller's
            assert client.services.Calc.thread() != threading.get_ident()
            caught = []

            def worker():
                try:
                    client.services.Calc.fail()
                except malla.RemoteError as exc:
                    caught.append((threading.current_thread().name, exc.exc_type))

            t = threading.Thread(target=worker, name="caller-thread")
            t.start()
            t.join()
            assert caught == [("caller-thread", "builtins.KeyError")]
            with pytest.raises(AttributeError):
                _ = client.services.Nope
    with pytest.raises(RuntimeError, match="closed"):
        client.remote("Calc", "add", [1, 2])


def test_blocking_node_shared_by_threads():
    threads_share_one_proxy(16, 200)


def test_blocking_node_shuts_down_cleanly_at_exit():
    code = (
        "import malla\n"
        "n = malla.BlockingNode('x', port=0)\n"
        "print(n.address[1], flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().isdigit()
    assert "Traceback" not in proc.stderr


def test_sixty_four_threads_share_one_node_and_one_proxy():
    """One BlockingNode and one proxy, 64 OS threads, no error and no
    "different loop" error (a million calls in MALLA_TEST_LONG mode)."""
    threads_share_one_proxy(64, 1_000_000 // 64 if os.environ.get("MALLA_TEST_LONG") else 300)


def threads_share_one_proxy(n_threads: int, per_thread: int) -> None:
    """`n_threads` OS threads call through one proxy of one BlockingNode:
    every answer right, no error."""
    with malla.BlockingNode("server", cookie=COOKIE, port=0) as server:
        server.start_service(Calc)
        seed = f"127.0.0.1:{server.address[1]}"
        with malla.BlockingNode("client", cookie=COOKIE, port=0, seeds=[seed]) as client:
            assert client.wait_for_services(["Calc"], retries=5)
            proxy = client.services.Calc
            errors: list[BaseException] = []
            done = [0] * n_threads

            def worker(k: int) -> None:
                try:
                    for i in range(per_thread):
                        if proxy.add(k, i) != k + i:
                            raise AssertionError("wrong answer")
                        done[k] += 1
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == []
            assert sum(done) == n_threads * per_thread


class Slow(malla.Service, global_=True):
    """A call that ends within the test only when it is cancelled."""
    events: list[str] = []

    async def forever(self):
        Slow.events.append("entered")
        try:
            await asyncio.sleep(3600)
        finally:
            Slow.events.append("left")          # (only a cancellation gets here)

    def cancellations(self):
        return Slow.events.count("left")


# The caller: blocked on a call when SIGINT comes; once interrupted it reads
# the server's count of cancellations over the same, still open, connection
# (so the server cancelled the call because of CANCEL, not of a lost peer),
# then lets the KeyboardInterrupt end the program.
CTRL_C_CALLER = """
import sys, time
import malla
bn = malla.BlockingNode("caller", cookie=sys.argv[1], port=0, seeds=[sys.argv[2]])
assert bn.wait_for_services(["Slow"], retries=10)
print("calling", flush=True)
try:
    bn.remote("Slow", "forever", timeout=60_000)
except KeyboardInterrupt:
    end = time.monotonic() + 10
    while bn.remote("Slow", "cancellations") < 1 and time.monotonic() < end:
        time.sleep(0.01)
    print("cancelled on the server:", bn.remote("Slow", "cancellations"), flush=True)
    raise
"""


def test_ctrl_c_in_a_blocked_call_cancels_it_on_the_remote_side():
    Slow.events.clear()
    with malla.BlockingNode("server", cookie=COOKIE, port=0) as server:
        server.start_service(Slow)
        proc = subprocess.Popen(
            [sys.executable, "-c", CTRL_C_CALLER, COOKIE, f"127.0.0.1:{server.address[1]}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "calling\n"
            end = time.monotonic() + 20
            while not Slow.events:                 # the call runs on the server
                assert time.monotonic() < end and proc.poll() is None, proc.stderr
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        # the interrupt reached the user, as a KeyboardInterrupt that ended the program
        assert proc.returncode == -signal.SIGINT, err
        assert "KeyboardInterrupt" in err
        assert out == "cancelled on the server: 1\n", err
        assert Slow.events == ["entered", "left"]


def test_close_fails_the_calls_other_threads_wait_on():
    """close() while a thread waits on a call that would not end by itself
    (wait_for_services of a service nobody runs): NodeStopped, no hang."""
    bn = malla.BlockingNode("lonely", cookie=COOKIE, port=0)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            bn.wait_for_services(["Nobody"], retries=1000)
        except BaseException as exc:
            raised.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    end = time.monotonic() + 10
    while not bn._waiting:            # (the thread's call is on the loop)
        assert time.monotonic() < end
        time.sleep(0.01)
    bn.close()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], malla.NodeStopped), raised
