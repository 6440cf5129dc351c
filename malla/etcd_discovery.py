"""Membership from etcd: a node's record under a lease, and the watch of all.

Each node keeps one key, ``PREFIX/nodes/<name>``, holding its `NodeRecord`
(JSON: readable with ``etcdctl get --prefix``) under a lease of
`lease_ttl(heartbeat_timeout)` seconds.  `Registration` claims the key with a
create-only transaction (the first live incarnation holds the name), renews
the lease from a plain thread (a blocked event loop does not expire it),
re-registers when the lease was lost and revokes it on stop.  `Membership`
reads the prefix and watches it, yielding join, update and leave events; it
resumes from the last revision after a reconnect and re-reads the prefix when
that revision was compacted.  DESIGN.md, "Scaling past the full mesh".
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from malla.etcd import KV, NOT_FOUND, EtcdClient, EtcdRefused, kv_of
from malla.exceptions import NameInUse, NodeStopped, ProtocolError, Unreachable

__all__ = ["JOIN", "LEAVE", "UPDATE", "MemberEvent", "Membership", "NodeRecord",
           "Registration", "lease_ttl", "nodes_prefix"]

log = logging.getLogger("malla.etcd")

RECORD_FORMAT = 1          # the "v" of a record: bumped on an incompatible change
MAX_RECORD = 1 << 20       # bytes; etcd's own request limit is 1.5 MiB
INTERNED_MAX = 4096        # distinct service entries a watch shares (then forgets all)

# etcd's leader revokes expired leases every 0.5 s: a lease may outlive its
# TTL by that much, and more while a new leader is elected
EXPIRY_SLACK = 1.0

JOIN, UPDATE, LEAVE = "join", "update", "leave"


def lease_ttl(heartbeat_timeout: float) -> int:
    """The lease of a node's record, in seconds (DESIGN.md)."""
    return max(2, math.ceil(heartbeat_timeout))


def nodes_prefix(prefix: str) -> str:
    """Where the records live: ``PREFIX/nodes/``."""
    return prefix.rstrip("/") + "/nodes/"


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes: the address others dial, its incarnation and
    protocol range, and its service table as the TABLE message carries it."""

    name: str
    address: tuple[str, int]
    incarnation: int
    protocol: tuple[int, int]
    services: dict[str, Any] = field(default_factory=dict)
    # the TTL of the lease it is kept under, s (0: not said): how long a
    # reader waits for it to expire (malla.discovery's restore)
    lease: int = 0

    def encode(self) -> bytes:
        return json.dumps({"v": RECORD_FORMAT, "name": self.name,
                           "address": list(self.address), "incarnation": self.incarnation,
                           "protocol": list(self.protocol), "services": self.services,
                           "lease": self.lease},
                          separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, name: str) -> NodeRecord:
        """The record stored under ``nodes/<name>``; `ProtocolError` saying
        what is wrong with a malformed one.  Only the record's shape is
        checked here: each service entry is validated where the table is
        applied (the registry refuses and logs a bad entry, as for TABLE)."""
        if len(raw) > MAX_RECORD:
            raise ProtocolError(f"larger than {MAX_RECORD} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:     # (UnicodeDecodeError is one)
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError("not a JSON object")
        if body.get("v") != RECORD_FORMAT:
            raise ProtocolError(f"record format {body.get('v')!r}, not {RECORD_FORMAT}")
        address, protocol = body.get("address"), body.get("protocol")
        incarnation, services = body.get("incarnation"), body.get("services")
        lease = body.get("lease", 0)
        why = (f"names {body.get('name')!r}, not {name!r}" if body.get("name") != name
               else "bad address" if not _pair(address, str, int)
               or not 0 < address[1] < 65536      # type: ignore[index]
               else "bad protocol range" if not _pair(protocol, int, int)
               else "bad incarnation" if type(incarnation) is not int
               or not 0 <= incarnation < 1 << 64
               else "the service table is not a map of names" if not isinstance(services, dict)
               else "bad lease" if type(lease) is not int or not 0 <= lease < 1 << 32
               else None)
        if why is not None:
            raise ProtocolError(why)
        assert isinstance(address, list) and isinstance(protocol, list)
        assert isinstance(incarnation, int) and isinstance(services, dict)
        return cls(name, (address[0], address[1]), incarnation, (protocol[0], protocol[1]),
                   services, lease)


def _pair(value: Any, first: type, second: type) -> bool:
    return (isinstance(value, list) and len(value) == 2 and type(value[0]) is first
            and type(value[1]) is second)


class Registration:
    """One node's record in etcd, kept alive.

    `register()` (blocking) claims the name; `start()` renews from a daemon
    thread of its own (anything else may call `tick()` instead); `update()`
    (from any thread, never blocking) replaces the record; `close()` revokes
    the lease, so the record goes at once.

    With a `keeper` (malla.etcd_share.Keeper) the record is kept under the
    keeper's lease, shared by the registrations of the process with the same
    TTL and renewed by the keeper's thread, one request per renewal for them
    all; `close()` then deletes the record (if still under that lease)."""

    def __init__(self, client: EtcdClient, prefix: str, record: NodeRecord, *,
                 ttl: int, keeper: Renewer | None = None) -> None:
        self.client = client
        self.key = nodes_prefix(prefix) + record.name
        self.ttl = ttl
        self.interval = ttl / 3      # three renewals per lease: one may be lost
        self.lease = 0
        self.registered = False
        self._record = record
        self._dirty = False
        self._lock = threading.Lock()     # one etcd exchange at a time
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._keeper = keeper
        if keeper is not None:
            self._wake = keeper.wake      # (an update wakes the shared thread)
        self._next = 0.0
        # after a refused exchange (or the name held by another): not before
        # then, whatever is pending -- a refusal retried at once spins
        self._retry_at = 0.0
        self._refused = False
        self._unreachable = False
        self._held_by: str | None = None

    @property
    def record(self) -> NodeRecord:
        return self._record

    @property
    def due(self) -> float:
        """When the next `tick()` has something to do (monotonic s; now,
        with an update pending, unless the last exchange was refused)."""
        return max(0.0 if self._dirty else self._next, self._retry_at)

    @property
    def unreachable(self) -> bool:
        """The last exchange found no etcd endpoint answering."""
        return self._unreachable

    def register(self, wait: float | None = None) -> None:
        """Claim the name (blocking).  Another live incarnation holding it:
        wait up to `wait` seconds (default one lease, plus the second etcd
        may take to revoke an expired lease: it checks twice a second) for
        its lease to expire, then `NameInUse`.  `Unreachable` when no etcd
        endpoint answers (the renewal retries in the background)."""
        deadline = time.monotonic() + (self.ttl + EXPIRY_SLACK if wait is None else wait)
        while True:
            if self._closed.is_set():
                raise NodeStopped(f"the etcd registration of {self._record.name!r} was closed")
            with self._lock:
                holder = self._claim()
            if holder is None:
                return
            if time.monotonic() >= deadline:
                raise NameInUse(f"{self._record.name!r} is held in etcd by another live "
                                f"node ({holder})")
            self._closed.wait(min(0.2, self.interval))

    def _claim(self) -> str | None:
        """Create the key under a fresh lease unless another incarnation
        holds it (under the lock): None when ours now, else who holds it."""
        for _ in range(3):
            if self.lease == 0:
                self.lease = (self.client.grant(self.ttl) if self._keeper is None
                              else self._keeper.lease(self.ttl))
            # (the flag first, then the record: an update in between is kept)
            self._dirty = False
            record = self._record
            try:
                created, current = self.client.create(self.key, record.encode(), self.lease)
            except EtcdRefused as exc:
                if exc.code != NOT_FOUND:
                    raise
                self._lost()            # our lease expired while we waited
                continue
            if created:
                self._claimed()
                return None
            if current is None:         # the holder's lease expired just now
                continue
            holder = _holder(current, record.name)
            if holder != record.incarnation:
                return f"incarnation {holder}" if holder is not None else "unreadable record"
            # our own incarnation's record (under an older lease of ours): take it over
            self.client.put(self.key, record.encode(), self.lease)
            self._claimed()
            return None
        self._dirty = True
        return "a record that keeps changing"

    def _claimed(self) -> None:
        if self._keeper is not None:
            # (a delete of this key still queued from an earlier incarnation
            # of this process would take the record just made)
            self._keeper.claimed(self.key)
        self.registered = True
        self._held_by = None
        self._next = time.monotonic() + self.interval
        log.debug("malla: registered %s in etcd under lease %x", self.key, self.lease)

    def update(self, record: NodeRecord) -> None:
        """Publish a new record (a service started, stopped, paused or
        resumed): stored by the next `tick()`, which it wakes at once."""
        # (two plain assignments: the renewing thread reads the flag, then
        # the record, so a record set after that read is stored next tick)
        self._record = record
        self._dirty = True
        self._wake.set()

    def tick(self) -> None:
        """Renew when due, store a pending update, re-register when the
        lease was lost.  Called by the renewing thread; never raises (etcd
        unreachable is logged once per outage, a refusal each time)."""
        if self._closed.is_set() or time.monotonic() < self.due:
            return
        with self._lock:
            if self._closed.is_set():
                return
            try:
                self._renew()
            except Unreachable as exc:
                # (retried after an interval, not at once: no loop of refusals)
                self._next = time.monotonic() + self.interval
                if not self._unreachable:
                    log.warning("malla: etcd unreachable, %s not renewed (calls between "
                                "known nodes go on; retrying): %s", self.key, exc)
                    self._unreachable = True
                return
            except ProtocolError as exc:
                self._retry_at = time.monotonic() + self.interval
                if not self._refused:     # (once until it is accepted again)
                    log.warning("malla: etcd refused to renew %s (retrying each %.1f s): %s",
                                self.key, self.interval, exc)
                    self._refused = True
                return
            self._refused = False
            if self._unreachable:
                log.info("malla: etcd reachable again, %s %s", self.key,
                            "registered" if self.registered else "not registered")
                self._unreachable = False

    def _renew(self) -> None:
        if self.registered:
            self._next = time.monotonic() + self.interval
            self._retry_at = 0.0
            # (a shared lease is renewed by its keeper: only asked here)
            alive = (self.client.keepalive(self.lease) > 0 if self._keeper is None
                     else self._keeper.alive(self.ttl, self.lease))
            if alive and self._dirty:
                self._dirty = False
                try:
                    self.client.put(self.key, self._record.encode(), self.lease)
                except EtcdRefused as exc:
                    if exc.code != NOT_FOUND:
                        self._dirty = True
                        raise
                    alive = False
            if alive:
                return
            log.warning("malla: the etcd lease of %s expired; registering again", self.key)
            self.registered = False
            self._lost()
        holder = self._claim()
        if holder is None:
            self._retry_at = 0.0
            return
        self._retry_at = time.monotonic() + self.interval
        if holder != self._held_by:
            log.error("malla: cannot register %s again: %s holds it", self.key, holder)
            self._held_by = holder

    def _lost(self) -> None:
        """etcd no longer knows our lease."""
        if self._keeper is not None and self.lease:
            self._keeper.lost(self.ttl, self.lease)
        self.lease = 0

    def recheck(self) -> None:
        """Tick at once (the keeper found the shared lease gone)."""
        self._next = 0.0

    def start(self) -> None:
        """Renew from the keeper's thread, or from a daemon thread of this
        registration's own."""
        if self._keeper is not None:
            self._keeper.add(self)
            return
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"malla-etcd {self._record.name}")
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            self.tick()
            self._wake.wait(max(0.0, min(self.interval, self.due - time.monotonic())))
            self._wake.clear()

    def close(self) -> None:
        """Stop renewing and revoke the lease (the record goes with it);
        etcd unreachable: logged, and the record expires with its lease."""
        self._closed.set()
        self._wake.set()
        if self._keeper is not None:
            self._keeper.remove(self)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            lease, self.lease, self.registered = self.lease, 0, False
            if self._keeper is not None:
                # (registered or not: a create whose answer was lost may have
                # stored the record; only one under our lease is deleted)
                self._keeper.forget(self.key, lease)
            elif lease:
                try:
                    self.client.revoke(lease)
                except (Unreachable, ProtocolError) as exc:
                    log.warning("malla: could not revoke the etcd lease of %s (it "
                                "expires within %d s): %s", self.key, self.ttl, exc)


class Renewer(Protocol):
    """A thread that keeps one lease per TTL for several registrations and
    renews it (malla.etcd_share.Keeper)."""

    wake: threading.Event

    def add(self, registration: Registration) -> None: ...
    def remove(self, registration: Registration) -> None: ...

    def lease(self, ttl: int) -> int:
        """The shared lease of `ttl` seconds, granted when there is none
        (blocking; `Unreachable`)."""
        ...

    def alive(self, ttl: int, lease: int) -> bool:
        """`lease` is still the live shared lease of `ttl`."""
        ...

    def lost(self, ttl: int, lease: int) -> None:
        """etcd said `lease` is gone."""
        ...

    def forget(self, key: str, lease: int) -> None:
        """Delete `key` if still under `lease` (a stopped node's record);
        etcd unreachable: retried by the keeper's thread."""
        ...

    def claimed(self, key: str) -> None:
        """A registration of this process holds `key` now: no delete of it
        still queued may run."""
        ...


def _holder(kv: KV, name: str) -> int | None:
    """The incarnation in a record found under our key (None: unreadable)."""
    try:
        return NodeRecord.decode(kv.value, name).incarnation
    except ProtocolError:
        return None


@dataclass(frozen=True)
class MemberEvent:
    """A change of membership: ``kind`` is JOIN, UPDATE (same incarnation,
    a new record) or LEAVE (``record``: the last one known).  A node that
    came back with another incarnation is a LEAVE of the old, then a JOIN."""

    kind: str
    name: str
    record: NodeRecord


class Membership:
    """Every node's record under a prefix, kept current by a watch.

    ``async for event in membership.events()`` yields a JOIN for each node
    found first, then each change; ``members`` is the current view.  Calling
    `events()` again resumes where the last one stopped."""

    def __init__(self, client: EtcdClient, prefix: str, *, retry_max: float = 2.0) -> None:
        self.client = client
        self.prefix = nodes_prefix(prefix)
        self.retry_max = retry_max
        self.members: dict[str, NodeRecord] = {}
        self.revision = 0          # every change up to this one is applied
        self._read = False         # False: (re-)read the prefix before watching
        # set once the prefix has been read and its events yielded
        self.synced = asyncio.Event()
        # (service, an entry as text) -> the one object of it (_shared)
        self._interned: dict[tuple[str, str], Any] = {}

    async def events(self) -> AsyncIterator[MemberEvent]:
        delay, outage = 0.05, False
        while True:
            try:
                if not self._read:
                    for event in await self._reread():
                        yield event
                    self.synced.set()
                async for result in self.client.watch(self.prefix, self.revision + 1):
                    if outage:
                        log.info("malla: etcd reachable again, watching %s from "
                                    "revision %d", self.prefix, self.revision + 1)
                        outage, delay = False, 0.05
                    if result.get("canceled") or result.get("compact_revision"):
                        log.info("malla: etcd compacted %s past revision %d: reading it "
                                 "again", self.prefix, self.revision)
                        self._read = False
                        break
                    for event in self._apply(result):
                        yield event
                continue
            except Unreachable as exc:
                if not outage:
                    log.warning("malla: etcd unreachable, the membership of %s may be out "
                                "of date (retrying): %s", self.prefix, exc)
                    outage = True
            except ProtocolError as exc:
                log.warning("malla: bad answer from etcd watching %s (reading it again): "
                            "%s", self.prefix, exc)
                self._read = False
            await asyncio.sleep(delay)
            delay = min(self.retry_max, delay * 2)

    async def _reread(self) -> list[MemberEvent]:
        """Read the whole prefix: the events that bring `members` to it."""
        revision, kvs = await asyncio.to_thread(self.client.get_prefix, self.prefix)
        events: list[MemberEvent] = []
        found = set()
        for kv in kvs:
            name = kv.key[len(self.prefix):]
            found.add(name)
            events += self._put(name, kv)
        for name in [n for n in self.members if n not in found]:
            events.append(MemberEvent(LEAVE, name, self.members.pop(name)))
        self.revision, self._read = revision, True
        return events

    def _apply(self, result: dict[str, Any]) -> list[MemberEvent]:
        events: list[MemberEvent] = []
        batch = result.get("events", [])
        if not isinstance(batch, list):
            raise ProtocolError("etcd: watch events are not a list")
        for change in batch:
            if not isinstance(change, dict):
                raise ProtocolError("etcd: a watch event is not an object")
            kv = kv_of(change.get("kv", {}))
            name = kv.key[len(self.prefix):]
            if change.get("type", "PUT") == "DELETE":
                if name in self.members:
                    events.append(MemberEvent(LEAVE, name, self.members.pop(name)))
            else:
                events += self._put(name, kv)
            # (only an event's own revision: a response's header may be ahead
            # of events still to come, which a resume from it would miss)
            self.revision = max(self.revision, kv.mod_revision)
        return events

    def _put(self, name: str, kv: KV) -> list[MemberEvent]:
        old = self.members.get(name)
        try:
            record = NodeRecord.decode(kv.value, name)
        except ProtocolError as exc:
            log.warning("malla: refused the etcd record %s: %s", kv.key, exc)
            if old is None:
                return []
            del self.members[name]
            return [MemberEvent(LEAVE, name, old)]
        record = self._shared(record, old)
        self.members[name] = record
        if old is None:
            return [MemberEvent(JOIN, name, record)]
        if old.incarnation != record.incarnation:
            return [MemberEvent(LEAVE, name, old), MemberEvent(JOIN, name, record)]
        return [MemberEvent(UPDATE, name, record)] if old != record else []

    def _shared(self, record: NodeRecord, old: NodeRecord | None) -> NodeRecord:
        """`record` with each service entry replaced by the one object this
        watch holds for an equal entry (of any node, any record): every node
        running a service announces the same entry, and a node applying a
        record finds the objects it holds and skips them (malla.registry
        stores entries by reference and compiles each object once), so a
        record that changed one service costs each node that service only,
        and the process holds one copy of each distinct entry."""
        if old is not None and record.services == old.services:
            return replace(record, services=old.services)
        interned = self._interned
        if len(interned) >= INTERNED_MAX:
            interned.clear()
        # (repr, not ==: True and 1, 1.0 and 1 are equal but not the same entry)
        services = {service: interned.setdefault((service, repr(info)), info)
                    for service, info in record.services.items()}
        return replace(record, services=services)
