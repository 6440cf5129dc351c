"""A real etcd for the tests: Debian's etcd-server (3.4), one member on
loopback, free ports, a data directory of its own.

    with EtcdServer() as etcd:
        etcd.url("/t1")            # "etcd://127.0.0.1:<port>/t1"
        etcd.kill(); etcd.start()  # SIGKILL, then the same ports and data

`require()` installs etcd-server when it is missing (as root, with apt-get),
so `make test` works on a fresh machine.  ``tls=(cert, key)`` serves
https (the tests' URL is then ``etcds://``).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

from support import free_port, require_tool

__all__ = ["EtcdServer", "require"]


def require() -> str:
    """The etcd binary, installed first when missing (fails, not skips,
    with how to install it where that cannot be done here)."""
    return require_tool("etcd", "etcd-server", needed_by="the etcd tests")


class EtcdServer:
    def __init__(self, *, tls: tuple[str, str] | None = None,
                 ca_context: ssl.SSLContext | None = None, host: str = "127.0.0.1",
                 run: Callable[[list[str]], subprocess.Popen[Any]] | None = None) -> None:
        self.binary = require()
        self.host = host
        # how to start it: here, or inside a network namespace (tests/netns.py)
        self.run = run or (lambda argv: subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT))
        self.data_dir = tempfile.mkdtemp(prefix="malla-etcd-")
        self.port, self.peer_port = free_port(), free_port()
        self.tls = tls
        self.ca_context = ca_context      # how the health check trusts a TLS etcd
        self.proc: subprocess.Popen[Any] | None = None
        self.log = os.path.join(self.data_dir, "etcd.log")
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, prefix: str) -> str:
        return f"{'etcds' if self.tls else 'etcd'}://{self.endpoint}{prefix}"

    def start(self, timeout: float = 20.0) -> None:
        client = f"{'https' if self.tls else 'http'}://{self.endpoint}"
        peer = f"http://{self.host}:{self.peer_port}"
        argv = [self.binary, "--name", "t", "--data-dir", os.path.join(self.data_dir, "d"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"t={peer}", "--logger", "zap", "--log-level", "warn"]
        if self.tls:
            argv += ["--cert-file", self.tls[0], "--key-file", self.tls[1]]
        with open(self.log, "ab") as self._log:
            self.proc = self.run(argv)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                with open(self.log) as f:
                    raise RuntimeError(f"etcd exited {self.proc.returncode}: {f.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy within {timeout} s")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        if self.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=1, context=self.ca_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            conn.request("GET", "/health")
            return b'"true"' in conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (its data stays for a restart)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
