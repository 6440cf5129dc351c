"""A real DNS server for the tests: Debian's dnsmasq (package dnsmasq-base),
in the foreground, answering only the records a test gives it.

    with Dnsmasq(["--host-record=n.test,127.0.0.1,::1"]) as dns:
        Node(..., dns_servers=[dns.server])     # "127.0.0.1:<port>"
        dns.restart(["--host-record=n.test,127.0.0.2"])   # same port

`require()` installs dnsmasq-base when it is missing (as root, with apt-get),
so `make test` works on a fresh machine.  `argv()` is the command line, for
a dnsmasq started elsewhere (inside a network namespace: tests/netns.py).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import tempfile
import time
from typing import Any

from support import require_tool

__all__ = ["Dnsmasq", "argv", "free_port", "require", "wait_started"]

PACKAGE = "dnsmasq-base"


def require() -> str:
    """The dnsmasq binary, installed first when missing (fails, not skips,
    with how to install it where that cannot be done here)."""
    return require_tool("dnsmasq", PACKAGE, needed_by="the DNS tests")


def version() -> str:
    out = subprocess.run([require(), "--version"], check=True, capture_output=True, text=True)
    return out.stdout.splitlines()[0]


def argv(records: list[str], *, address: str, port: int, log: str) -> list[str]:
    """dnsmasq answering `records` (its own options: --host-record=...,
    --srv-host=..., --local=/domain/) on address:port, UDP and TCP, and
    nothing else: no upstream, no /etc/hosts, no config file."""
    return [require(), "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", f"--port={port}", f"--listen-address={address}",
            "--bind-interfaces", "--pid-file=", "--user=root", f"--log-facility={log}",
            *records]


def wait_started(proc: subprocess.Popen[Any], log: str, timeout: float = 10.0) -> None:
    """Until dnsmasq logged "started" (its sockets are bound by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log) as f:
            text = f.read()
        if "started, version" in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited {proc.returncode}: {text}")
        time.sleep(0.02)
    raise RuntimeError(f"dnsmasq did not start within {timeout} s")


def free_port(*binds: tuple[socket.AddressFamily, socket.SocketKind, str]) -> int:
    """A port each (family, type, address) of `binds` can bind just now.

    The first bind picks the port; another test may hold the same number in
    another family or type, so a collision picks again rather than failing."""
    (family, kind, address), *others = binds
    for _ in range(50):
        with socket.socket(family, kind) as first:
            first.bind((address, 0))
            port = int(first.getsockname()[1])
            if all(_binds(port, *other) for other in others):
                return port
    raise OSError(errno.EADDRINUSE, "no port free in every family and type asked for")


def _binds(port: int, family: socket.AddressFamily, kind: socket.SocketKind,
           address: str) -> bool:
    with socket.socket(family, kind) as other:
        try:
            other.bind((address, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return False
    return True


class Dnsmasq:
    """dnsmasq on 127.0.0.1, a free port; stopped on exit."""

    def __init__(self, records: list[str]) -> None:
        self.records = records
        self.port = 0
        self.proc: subprocess.Popen[Any] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="malla-dnsmasq-")
        self.log = os.path.join(self._dir.name, "dnsmasq.log")

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Dnsmasq:
        for _ in range(5):   # a port taken between picking and binding: pick again
            # dnsmasq binds UDP and TCP
            self.port = free_port((socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                                  (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"))
            try:
                self._start()
                return self
            except RuntimeError as exc:
                if "listening socket" not in str(exc):
                    raise
        raise RuntimeError("dnsmasq found no free port")

    def _start(self) -> None:
        open(self.log, "w").close()
        self.proc = subprocess.Popen(
            argv(self.records, address="127.0.0.1", port=self.port, log=self.log),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_started(self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def restart(self, records: list[str]) -> None:
        """Another configuration, on the same port (a zone that changed)."""
        self.stop()
        self.records = records
        self._start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self._dir.cleanup()
