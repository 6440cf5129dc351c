"""The contracts between the layers, as typing.Protocols.

What a connection asks of the cluster that owns it, what the caller asks of
the hosting and of the cluster, what a proxy asks of the node it is bound
to, what the metrics exposition reads, what wraps the calls a node makes:
each module below the node facade depends on one of these, never on
`malla.node`, so the import graph has no cycle (TYPE_CHECKING imports
included) and each layer can be tested against a fake of its interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from malla.config import NodeConfig
    from malla.guard import HandshakeThrottle
    from malla.handshake import Hello
    from malla.handshakes import PendingHandshakes
    from malla.registry import Registry

# (a connection, a running service and the metrics object are Any here:
# their modules depend on this one, and an import back would be a cycle)
Connection = Any
RunningService = Any

# remote() or call_cb_all() of a node, as an interceptor sees it
CallFn = Callable[..., Coroutine[Any, Any, Any]]

# The balancer seam: the nodes a call tries, in order, for a service: the
# registry's own order with balance="shuffle" (Registry.nodes: the local
# node first, then shuffled each check cycle), the core's P2COrder with
# "p2c" (malla/balance.py), iterated only as far as the call goes.
NodeOrder = Callable[[str], Iterable[str]]

__all__ = ["BuiltinHost", "CallFn", "CallHosting", "CallInterceptor", "CallPeers",
           "ConnectionHost", "MemberHost", "MemberSource", "NodeOrder", "ProxyHost",
           "StatsSource"]


class ConnectionHost(Protocol):
    """What a Connection needs from the cluster that owns it (malla.connection)."""

    config: NodeConfig
    cookie: bytes
    throttle: HandshakeThrottle
    pending: PendingHandshakes

    def hello(self, sockname: Any = None) -> Hello: ...
    def admit(self, conn: Connection) -> None: ...
    def connection_closed(self, conn: Connection) -> None: ...
    def on_control(self, conn: Connection, ftype: int, body: Any) -> None: ...
    def cast_failed(self, service: str, fun: str, kind: str, message: str) -> None: ...


class CallHosting(Protocol):
    """What the caller needs from the services this node hosts (malla.hosting)."""

    # name -> the running service (read on every in-process call: a dict,
    # mutated in place, never rebound)
    entries: dict[str, RunningService]

    def cast_failed(self, service: str, fun: str, kind: str, message: str) -> None: ...
    def forbidden(self, service: str, fun: str, caller: str | None) -> None: ...


class CallPeers(Protocol):
    """What the caller needs from the cluster (malla.cluster)."""

    # peer name -> the admitted connection serving it (read on every call
    # to a peer: a dict, mutated in place, never rebound)
    connected: dict[str, Connection]

    @property
    def running(self) -> bool: ...

    async def open(self, node: str, timeout: int, at: float | None) -> Connection:
        """The connection to `node` for a call that found none: dialled
        within the call's time with mesh="on_demand", else (or when it
        cannot be reached) ServiceNotAvailable, so the call fails over."""
        ...


class MemberHost(Protocol):
    """What a discovery source (malla.discovery) tells the cluster: a
    member joined or moved, or left."""

    name: str

    def learn_member(self, name: str, host: str, port: int) -> None: ...
    def leave_member(self, name: str) -> None: ...


class MemberSource(Protocol):
    """What the cluster asks of a discovery source (malla.discovery)."""

    def vouches(self, name: str, incarnation: int) -> bool:
        """`name` is a member now, as that incarnation: its own TABLE and
        ANNOUNCEs may be applied."""
        ...

    def knows(self, name: str) -> bool: ...

    def restore_later(self, name: str) -> None:
        """Its connection broke: its services come back from its record
        after one lease unless the record goes meanwhile."""
        ...


class CallInterceptor(Protocol):
    """Something around every call a node makes (metrics, tracing).

    Built once, at node construction: the node's remote() and call_cb_all()
    are the caller's wrapped by each interceptor in turn, so a node with
    none calls the caller's methods directly, at no cost at all.
    """

    def wrap_remote(self, remote: CallFn) -> CallFn: ...
    def wrap_call_cb_all(self, call_cb_all: CallFn) -> CallFn: ...


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

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None: ...

    def stats(self) -> dict[str, Any]: ...
    def peers(self) -> list[str]: ...


class BuiltinHost(Protocol):
    """What the built-in `Malla` service reads of its node (malla.builtin)."""

    name: str

    @property
    def incarnation(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...
    def peers(self) -> list[str]: ...
