"""Pyro5: a daemon exposing an echo object, called through proxies.

Pyro5 is synchronous.  Its users get calls in flight from threads, each with
its own proxy (a proxy is one connection and is not shared between threads),
and the daemon's thread-pool server gives every connection a worker thread.
That is what the threaded client loop measures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import Pyro5
import Pyro5.api

from bench.procs import HOST

KIND = "sync"

# msgpack rather than Pyro5's default serpent: serpent turns bytes into a
# base64 dict, so the echo would neither carry nor return the same value the
# other systems do.  msgpack is one of Pyro5's built-in serializers.
Pyro5.config.SERIALIZER = "msgpack"
# Every other system disables Nagle's algorithm; Pyro5's default leaves it on.
Pyro5.config.SOCK_NODELAY = True
# The thread-pool server refuses connections beyond its pool ("no free
# workers"); the idle-connection scenario opens 200 and inflight128 opens 128.
# Workers are created on demand, so a large cap costs nothing until used.
Pyro5.config.THREADPOOL_SIZE = 1024

_OBJECT_ID = "bench.echo"


@Pyro5.api.expose
class EchoObject:
    def echo(self, x: Any) -> Any:
        return x


def serve(ready: Callable[[int], None], params: dict[str, Any]) -> None:
    daemon = Pyro5.api.Daemon(host=HOST, port=0)
    daemon.register(EchoObject(), _OBJECT_ID)
    ready(daemon.sock.getsockname()[1])
    daemon.requestLoop()


class Pyro5Conn:
    def __init__(self, port: int) -> None:
        self._proxy = Pyro5.api.Proxy(f"PYRO:{_OBJECT_ID}@{HOST}:{port}")
        self._proxy._pyroBind()  # connect now, not lazily inside the first timed call

    def adopt(self) -> None:
        # A Pyro5 proxy may only be used by the thread that owns it.
        self._proxy._pyroClaimOwnership()

    def call(self, payload: bytes) -> Any:
        return self._proxy.echo(payload)

    def close(self) -> None:
        self._proxy._pyroRelease()


def connect(port: int, params: dict[str, Any]) -> Pyro5Conn:
    return Pyro5Conn(port)
