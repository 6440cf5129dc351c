"""rpyc: a ThreadedServer with an exposed echo, called through connections.

rpyc is synchronous: a ThreadedServer serves each connection on its own
thread, and clients get calls in flight from threads, each with its own
connection, as with Pyro5.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import rpyc
from rpyc.core.stream import SocketStream
from rpyc.utils.server import ThreadedServer

from bench.procs import HOST

KIND = "sync"

# Large messages must not trip rpyc's per-request timeout (default 30 s).
_CONFIG = {"sync_request_timeout": 120, "allow_public_attrs": False}


class _EchoService(rpyc.Service):
    def exposed_echo(self, x: Any) -> Any:
        return x


class _Server(ThreadedServer):
    def _accept_method(self, sock: socket.socket) -> None:
        # Every other system disables Nagle's algorithm; rpyc leaves it on.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._accept_method(sock)


def serve(ready: Callable[[int], None], params: dict[str, Any]) -> None:
    # auto_register=False: never announce the server on the network (rpyc's
    # registry uses UDP broadcast); this benchmark only talks to loopback.
    server = _Server(
        _EchoService,
        hostname=HOST,
        port=0,
        auto_register=False,
        protocol_config=_CONFIG,
        listener_timeout=None,
    )
    ready(server.port)
    server.start()


class RpycConn:
    def __init__(self, port: int) -> None:
        stream = SocketStream.connect(HOST, port, nodelay=True)
        self._conn = rpyc.connect_stream(stream, config=_CONFIG)
        # Look the remote method up once, as an rpyc user would: otherwise
        # every call would cost an extra round trip for the getattr.
        self._echo = self._conn.root.echo

    def adopt(self) -> None:
        pass  # rpyc connections may be used from any thread

    def call(self, payload: bytes) -> Any:
        return self._echo(payload)

    def close(self) -> None:
        self._conn.close()


def connect(port: int, params: dict[str, Any]) -> RpycConn:
    return RpycConn(port)
