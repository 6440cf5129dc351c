"""The services this node hosts: starting, stopping, pausing and resuming
them, the table the network may call (`exposed`, read by every connection's
core), the service table and the announcements sent to peers, whether calls
to them are still running (drain), and the failures of casts served here.

It knows nothing of connections: what it announces goes out through the
`broadcast` it is given (the cluster's), and the cluster sends `table()` to
each new peer and every check cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla._ext import core
from malla.authz import warn_self_asserted
from malla.ratelimit import RateLimitedLog
from malla.registry import BUILTIN, service_name
from malla.service import RunningService, Service, describe

if TYPE_CHECKING:
    from malla.config import NodeConfig
    from malla.metrics import Stats
    from malla.registry import Registry
    from malla.tracing import Tracing

__all__ = ["Hosting"]

log = logging.getLogger("malla.hosting")


class Hosting:
    """The running services of one node."""

    def __init__(self, config: NodeConfig, registry: Registry, stats: Stats,
                 tracing: Tracing | None, broadcast: Callable[[int, Any], None]) -> None:
        self._config = config
        self._registry = registry
        self._stats = stats
        self._tracing = tracing
        self._broadcast = broadcast
        self._cast_log = RateLimitedLog(log)
        self._forbidden_log = RateLimitedLog(log)
        # name -> every service running here (in-process calls find them here)
        self.entries: dict[str, RunningService] = {}
        # What the network may call: the global services (a non-global one
        # is callable only on its own node).  The cores dispatch through this
        # very dict: mutated in place, never rebound.
        self.exposed: dict[str, RunningService] = {}
        # the services this node should host (malla.builtin's readiness):
        # each one started here and not stopped since, and those declared
        # ahead by expect()
        self.expected: set[str] = set()

    def table(self) -> dict[str, Any]:
        """The service table a peer gets: the global services, as announced."""
        return {name: describe(e.instance, e.paused) for name, e in self.entries.items()
                if type(e.instance)._malla_global}

    def busy(self) -> bool:
        """Calls to the services here still running in-process (drain)."""
        return any(e.running for e in self.entries.values())

    def expect(self, names: list[str]) -> None:
        """Declare services this node should host before they are started
        (`malla node --service`): until then it is not ready."""
        for name in names:
            _user_service(name)
        self.expected.update(names)

    def start_builtin(self, instance: Service) -> None:
        """Run the built-in service (once: it stays across restarts)."""
        if BUILTIN not in self.entries:
            self._run(instance)

    async def start(self, service: Service | type[Service]) -> None:
        instance = service() if isinstance(service, type) else service
        if not isinstance(instance, Service):
            raise TypeError(f"not a malla.Service: {service!r}")
        cls = type(instance)
        name = _user_service(cls._malla_name)
        node = self._config.name
        if name in self.entries:
            raise ValueError(f"service {name} is already running on {node}")
        if cls._malla_global and self._config.hidden:
            raise ValueError(f"hidden node {node} cannot host the global service {name}")
        self._run(instance)
        self.expected.add(name)
        log.info("malla: %s started service %s", node, name)
        warn_self_asserted(node, name, cls._malla_rules, self._config.identity)

    def _run(self, instance: Service) -> None:
        cls = type(instance)
        name = cls._malla_name
        entry = self.entries[name] = RunningService(instance, self._tracing, self.forbidden)
        if cls._malla_global:
            self.exposed[name] = entry
        self._changed(entry, describe(instance))

    async def stop(self, service: Any) -> None:
        name = _user_service(service_name(service))
        entry = self.entries.pop(name, None)
        self.exposed.pop(name, None)
        if entry is None:
            raise self._not_running(name)
        self.expected.discard(name)
        self._changed(entry, None)
        log.info("malla: %s stopped service %s", self._config.name, name)

    async def set_paused(self, service: Any, paused: bool) -> None:
        name = _user_service(service_name(service))
        entry = self.entries.get(name)
        if entry is None:
            raise self._not_running(name)
        entry.paused = paused
        self._changed(entry, describe(entry.instance, paused))

    async def pause_all(self) -> None:
        # (the built-in service keeps answering: `malla ping` while draining)
        for name in list(self.entries):
            if name != BUILTIN:
                await self.set_paused(name, True)

    def _changed(self, entry: RunningService, info: dict[str, Any] | None) -> None:
        # into this node's discovery table, and to every peer when global
        self._registry.set_local(entry.name, info)
        if type(entry.instance)._malla_global:
            self._broadcast(core.FT_ANNOUNCE, [entry.name, info])

    def _not_running(self, name: str) -> mexc.ServiceNotAvailable:
        return mexc.ServiceNotAvailable(f"service {name} is not running on {self._config.name}")

    def forbidden(self, service: str, fun: str, caller: str | None) -> None:
        """A call refused here by the service's allow= rules (from a peer
        or from this node): counted in stats()["forbidden"], logged
        rate-limited."""
        self._stats.forbidden += 1
        self._forbidden_log.warning("malla: %s: refused a call of %s.%s from %s: not allowed",
                                    self._config.name, service, fun, caller)

    def cast_failed(self, service: str, fun: str, kind: str, message: str) -> None:
        """A cast failed on this node (it has no caller to tell): counted
        under the error a caller would have got, logged rate-limited (a
        forbidden one was logged by `forbidden` already)."""
        self._stats.count(kind)
        if kind == "Forbidden":
            return
        self._cast_log.warning("malla: %s: cast %s.%s failed: %s: %s",
                               self._config.name, service, fun, kind, message)


def _user_service(name: str) -> str:
    """`name`, unless it is the built-in service's (reserved: InvalidOption)."""
    if name == BUILTIN:
        raise mexc.InvalidOption(
            f"the service name {BUILTIN} is reserved for malla's built-in service")
    return name
