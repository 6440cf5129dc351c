"""Dials of targets whose node is not known by name yet: the seeds (dialled
while the node runs), the `connect=` targets (re-resolved every
check_interval, their new addresses dialled once) and `connect()` itself.
They are kept by target, not in the cluster's peer table: once a dial is
admitted, its node is a peer like any other (malla.cluster).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from malla.dialing import connect_target, dial_forever, dial_once
from malla.dns import Resolver, format_address, resolve_all

if TYPE_CHECKING:
    from malla.config import NodeConfig

__all__ = ["Targets"]


class Targets:
    """The dials by target of one node's cluster."""

    def __init__(self, config: NodeConfig, connect: Callable[[str], Awaitable[Any]],
                 stopping: Callable[[], bool]) -> None:
        self.config = config
        self._connect = connect
        self._stopping = stopping
        self.dials: dict[str, asyncio.Task[None]] = {}
        self._resolver: Resolver | None = None

    async def connect(self, target: str) -> None:
        """Cluster.connect's work: the target joined (or why it was not)."""
        await connect_target(self._connect, self.dns, target)

    def dns(self) -> Resolver:
        if self._resolver is None:
            servers = self.config.dns_servers
            self._resolver = Resolver(list(servers) if servers else None,
                                      timeout=self.config.handshake_timeout)
        return self._resolver

    def dial(self, target: str, once: bool = False) -> None:
        """Dial `target` in the background (forever, or `once`)."""
        if target in self.dials or self._stopping():
            return
        who = self.config.name
        coro = (dial_once(self._connect, target, who) if once else dial_forever(
            self._connect, target, who, lambda: not self._stopping(), self.config.redial_max))
        task = asyncio.get_running_loop().create_task(coro)
        self.dials[target] = task
        task.add_done_callback(lambda _t: self.dials.pop(target, None))

    async def resolve_loop(self, connected: dict[str, Any],
                           own: Callable[[], tuple[str, int] | None]) -> None:
        # Node(connect=[...]): re-resolve every check_interval and dial the
        # addresses not connected yet (pods come and go behind a name).
        while True:
            addresses = await resolve_all(self.dns(), list(self.config.connect))
            known = {c.peer.listen for c in connected.values() if c.peer and c.peer.listen}
            for host, port in addresses:
                if (host, port) not in known and (host, port) != own():
                    self.dial(format_address(host, port), once=True)
            await asyncio.sleep(self.config.check_interval)
