"""The contracts between the layers, as typing.Protocols.

What a connection asks of the node that owns it, what a proxy asks of the
node it is bound to, what the metrics exposition reads: each module below
the node facade depends on one of these, never on `malla.node`, so the
import graph has no cycle (TYPE_CHECKING imports included) and each layer
can be tested against a fake of its interface.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from malla.guard import HandshakeThrottle
    from malla.handshake import Hello
    from malla.registry import Registry

# (a connection is Any here, and the metrics object: their modules depend on
# this one, and an import back would be a cycle)
Connection = Any

__all__ = ["ConnectionHost", "ProxyHost", "StatsSource"]


class ConnectionHost(Protocol):
    """What a Connection needs from its node (malla.connection)."""

    handshake_timeout: float
    window_size: int
    _cookie: bytes
    _throttle: HandshakeThrottle

    def _hello(self, sockname: Any = None) -> Hello: ...
    def _admit(self, conn: Connection) -> None: ...
    def _connection_closed(self, conn: Connection) -> None: ...
    def _on_control(self, conn: Connection, ftype: int, body: Any) -> None: ...
    def _cast_failed(self, service: str, fun: str, kind: str, message: str) -> None: ...


class ProxyHost(Protocol):
    """What a proxy needs from the node it is bound to (malla.proxy)."""

    name: str
    _registry: Registry
    _precompiled: dict[str, dict[str, int]]

    async def remote(self, service: Any, fun: str, args: Any = ...,
                     kwargs: dict[str, Any] | None = ..., **opts: Any) -> Any: ...
    def service(self, service: Any) -> Any: ...
    def get_services(self) -> dict[str, list[str]]: ...
    def _knows(self, name: str) -> bool: ...


class StatsSource(Protocol):
    """What the Prometheus exposition reads of a node (malla.metrics)."""

    name: str
    _metrics: Any       # malla.metrics.Metrics or None
    _loop: asyncio.AbstractEventLoop | None

    def stats(self) -> dict[str, Any]: ...
    def peers(self) -> list[str]: ...
