"""A node's membership and service tables from etcd (`Node(discovery=...)`).

`EtcdDiscovery` puts together what malla.etcd_discovery provides for one
node: its record registered under a lease (not for a hidden node), updated
whenever one of its services starts, stops, pauses or resumes, and the watch
of every record (the process's, shared by its nodes: malla.etcd_share),
applied to the discovery table (the registry) and to the cluster's peers
(`MemberHost`).  The watch replaces the mesh's PEERS, the
check cycle's re-sent tables and `forget_after`: a member is a peer while its
record is in etcd.  DESIGN.md, "Scaling past the full mesh".

What the cluster asks of it (`interfaces.MemberSource`): whether a peer's
own TABLE and ANNOUNCEs may be applied (it is a member, as that
incarnation), and, when a member's connection broke, to bring its services
back from its record one lease later unless the record went meanwhile (a
killed node's lease expires within that lease; a live node's stays).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from malla.etcd import parse_url
from malla.etcd_discovery import (
    EXPIRY_SLACK,
    LEAVE,
    MemberEvent,
    NodeRecord,
    Registration,
    lease_ttl,
)
from malla.etcd_share import Share
from malla.exceptions import Unreachable
from malla.handshake import protocol_limits

if TYPE_CHECKING:
    from malla.config import NodeConfig
    from malla.interfaces import MemberHost
    from malla.metrics import Stats
    from malla.registry import Registry

__all__ = ["EtcdDiscovery"]

log = logging.getLogger("malla.discovery")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class EtcdDiscovery:
    """One node's view of the cluster in etcd, and its own record there.

    The etcd client, the watch and the renewing thread are the process's
    (malla.etcd_share): shared by its nodes using the same etcd and prefix,
    taken at start() and given back at stop()."""

    def __init__(self, config: NodeConfig, registry: Registry, table: Callable[[], Any],
                 host: MemberHost, stats: Stats, spawn: Spawn) -> None:
        assert config.discovery is not None
        self.url = parse_url(config.discovery)
        self.config = config
        self.prefix = self.url.prefix
        self.ttl = lease_ttl(config.heartbeat_timeout)
        self.registration: Registration | None = None
        self._share: Share | None = None
        self._registry = registry
        self._table = table            # this node's service table, as TABLE carries it
        self._host = host
        self._stats = stats
        self._spawn = spawn
        self._restores: dict[str, asyncio.TimerHandle] = {}

    @classmethod
    def of(cls, config: NodeConfig, registry: Registry, table: Callable[[], Any],
           host: MemberHost, stats: Stats, spawn: Spawn) -> EtcdDiscovery | None:
        """The node's discovery source: None without discovery=."""
        return cls(config, registry, table, host, stats, spawn) if config.discovery else None

    @property
    def synced(self) -> asyncio.Event:
        """Set once the prefix has been read (the CLI waits for it, after
        start())."""
        assert self._share is not None, "the node is not started"
        return self._share.membership.synced

    async def start(self, address: tuple[str, int], incarnation: int) -> None:
        """Watch the prefix, then (a visible node) register this node's
        record: waits up to one lease for another live incarnation holding
        the name, then NameInUse; etcd unreachable: a warning, and the
        registration goes on in the background."""
        share = self._share = Share.acquire(self.url, self.config.discovery_ssl)
        share.subscribe(id(self), self._apply)
        if self.config.hidden:
            return
        vmin, vmax, _ = protocol_limits(self.config.identity)
        record = NodeRecord(self.config.name, self._dialled_at(address), incarnation,
                            (vmin, vmax), self._table(), self.ttl)
        registration = Registration(share.client, self.prefix, record, ttl=self.ttl,
                                    keeper=share.keeper)
        try:
            await asyncio.to_thread(registration.register)
        except Unreachable as exc:
            log.warning("malla: %s could not register in etcd (calls between known nodes "
                        "go on; retrying in the background): %s", self.config.name, exc)
        except BaseException:
            await asyncio.to_thread(registration.close)
            raise
        # (renewed by the process's keeper thread, not the UDP heartbeat
        # thread: an etcd request waiting out its timeout must not delay the
        # heartbeats)
        registration.start()
        self.registration = registration

    async def stop(self) -> None:
        """Revoke the lease (others drop this node at once), then leave the
        process's watch (the last node's stop ends it)."""
        registration, self.registration = self.registration, None
        if registration is not None:
            await asyncio.to_thread(registration.close)
        for timer in self._restores.values():
            timer.cancel()
        self._restores.clear()
        share, self._share = self._share, None
        if share is not None:
            share.unsubscribe(id(self))
            await share.release()

    def changed(self) -> None:
        """A service started, stopped, paused or resumed: publish the table."""
        registration = self.registration
        if registration is not None:
            registration.update(dataclasses.replace(registration.record,
                                                    services=self._table()))

    @property
    def _members(self) -> dict[str, NodeRecord]:
        """The records the process's watch knows (none before start)."""
        return self._share.membership.members if self._share is not None else {}

    def _dialled_at(self, address: tuple[str, int]) -> tuple[str, int]:
        """The address others dial: the one bound, or (bound to every
        interface) this host's address on the route to the first etcd
        endpoint (the interface the cluster's traffic is likeliest to use)."""
        host, port = address
        if host not in ("0.0.0.0", "::"):
            return host, port
        etcd_host, etcd_port = self.url.endpoints[0]
        family = socket.AF_INET6 if host == "::" else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((etcd_host, etcd_port))      # (no packet is sent)
                return str(probe.getsockname()[0]), port
        except OSError:
            return socket.gethostbyname(socket.gethostname()), port

    # -- the watch ----------------------------------------------------------------

    def _apply(self, event: MemberEvent) -> None:
        name = event.name
        if name == self.config.name:
            return
        timer = self._restores.pop(name, None)
        if timer is not None:
            timer.cancel()
        if event.kind == LEAVE:
            log.info("malla: %s: %s left (its etcd record went)", self.config.name, name)
            self._host.leave_member(name)
            return
        # (a refused entry is counted as a peer's error, as in a TABLE)
        refused = self._registry.apply_table(name, event.record.services)
        if refused:
            self._stats.count("ProtocolError", refused)
        host, port = event.record.address
        self._host.learn_member(name, host, port)

    # -- MemberSource ---------------------------------------------------------------

    def vouches(self, name: str, incarnation: int) -> bool:
        record = self._members.get(name)
        return record is not None and record.incarnation == incarnation

    def knows(self, name: str) -> bool:
        return name in self._members

    def restore_later(self, name: str) -> None:
        record = self._members.get(name)
        if record is None or name in self._restores:
            return
        # (its own lease, which may be longer than this node's)
        self._restores[name] = asyncio.get_running_loop().call_later(
            max(self.ttl, record.lease) + EXPIRY_SLACK, self._restore, record)

    def _restore(self, record: NodeRecord) -> None:
        self._restores.pop(record.name, None)
        if self._members.get(record.name) == record:
            self._registry.apply_table(record.name, record.services)
