"""What the nodes of one process share in etcd: a client, a watch, a thread.

Nodes of one process with the same discovery URL (endpoints, TLS context,
prefix) on the same event loop share one `Share`: one `EtcdClient`, ONE
watch of the prefix (each record decoded once, each event handed to every
node of the process in turn) and one `Keeper` thread renewing all their
leases, as gRPC shares a channel between stubs.  Each node still keeps its
own record under its own lease (DESIGN.md): a node's record goes with it, a
stopped node's at once, a killed process's with its leases, and a frozen
event loop does not expire them (the keeper is a plain thread).

Why: with a watch and a thread per node, N nodes over a few processes made
etcd send N^2 records through its JSON gateway and each process decode its
nodes' share of them, while N threads raced for the same cores to renew
(docs/scale.md, "Measured").  For one node per process nothing changes but
the thread's name.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from malla.etcd import EtcdClient, EtcdUrl
from malla.etcd_discovery import JOIN, MemberEvent, Membership, Registration
from malla.exceptions import ProtocolError, Unreachable

__all__ = ["Keeper", "Share"]

log = logging.getLogger("malla.etcd")

# refusals of a stopped node's delete before it is left to the lease
DELETE_TRIES = 5

Apply = Callable[[MemberEvent], None]
Key = tuple[asyncio.AbstractEventLoop, tuple[tuple[str, int], ...], bool, int, str]


@dataclass
class _Lease:
    """A lease shared by the registrations of one TTL (id 0: none yet)."""

    id: int = 0
    next: float = 0.0      # when it is renewed next (monotonic s)


class Keeper:
    """One daemon thread keeping the leases of every registration added.

    The registrations of one TTL share one lease (`lease()` grants it on
    first need), renewed three times per TTL with ONE request for them all.
    When etcd says it is gone (it expired: the process was frozen or cut
    off from etcd past the TTL, or etcd lost it) every registration under it
    registers again under a new one.  A stopped node's record is deleted
    (`forget()`), retried each pass while etcd does not answer, so it goes
    at once or with the lease.  A pass that finds etcd unreachable stops
    there and the next comes an interval later: an outage costs a request
    per interval, not one per node."""

    def __init__(self, client: EtcdClient, name: str) -> None:
        self.client = client
        self.name = name
        self.wake = threading.Event()
        self._registrations: list[Registration] = []
        self._leases: dict[int, _Lease] = {}           # by TTL
        # (key, lease, refusals so far) still to delete
        self._forgotten: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()                  # the lists and leases above
        self._grant = threading.Lock()                 # one grant at a time
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False
        self._refused = False

    def add(self, registration: Registration) -> None:
        with self._lock:
            self._registrations.append(registration)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"malla-etcd {self.name}")
                self._thread.start()
        self.wake.set()

    def remove(self, registration: Registration) -> None:
        with self._lock:
            if registration in self._registrations:
                self._registrations.remove(registration)

    def lease(self, ttl: int) -> int:
        with self._grant:
            with self._lock:
                held = self._leases.setdefault(ttl, _Lease())
                if held.id:
                    return held.id
            lease = self.client.grant(ttl)
            with self._lock:
                held.id, held.next = lease, time.monotonic() + ttl / 3
            log.debug("malla: etcd lease %x of %d s granted for %s", lease, ttl, self.name)
            return lease

    def alive(self, ttl: int, lease: int) -> bool:
        held = self._leases.get(ttl)
        return held is not None and held.id == lease != 0

    def lost(self, ttl: int, lease: int) -> None:
        with self._lock:
            held = self._leases.get(ttl)
            if held is None or held.id != lease:
                return
            held.id = 0
            registrations = list(self._registrations)
            self._forgotten = [f for f in self._forgotten if f[1] != lease]
        for registration in registrations:
            if registration.ttl == ttl:
                registration.recheck()
        self.wake.set()

    def forget(self, key: str, lease: int) -> None:
        if lease and not self._delete(key, lease, 0):
            with self._lock:
                self._forgotten.append((key, lease, 0))

    def claimed(self, key: str) -> None:
        with self._lock:
            self._forgotten = [f for f in self._forgotten if f[0] != key]

    def _delete(self, key: str, lease: int, refusals: int) -> bool:
        """Delete `key` if it is still under `lease`; False: to be retried
        (etcd did not answer, or refused fewer than DELETE_TRIES times: with
        a lease shared by live nodes, a record not deleted stays listed)."""
        try:
            self.client.delete_under(key, lease)
        except Unreachable as exc:
            if not self._unreachable:
                log.warning("malla: could not delete %s from etcd (retrying; it goes with "
                            "its lease at the latest): %s", key, exc)
            return False
        except ProtocolError as exc:
            if refusals + 1 < DELETE_TRIES:
                return False
            log.error("malla: etcd refused to delete %s %d times, giving up (it goes "
                      "when this process's lease ends): %s", key, DELETE_TRIES, exc)
        return True

    def stop(self) -> None:
        """Stop the thread (its registrations were closed first) and revoke
        the leases, now empty."""
        self._stopped.set()
        self.wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            leases = [held.id for held in self._leases.values() if held.id]
            self._leases.clear()
        for lease in leases:
            try:
                self.client.revoke(lease)
            except (Unreachable, ProtocolError) as exc:
                log.warning("malla: could not revoke the etcd lease %x (it expires "
                            "by itself): %s", lease, exc)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                wait = self._pass()
            except Exception:
                # (the thread renews every node of the process: it must not end)
                log.exception("malla: renewing the etcd leases of %s failed", self.name)
                wait = 1.0
            self.wake.wait(wait)
            self.wake.clear()

    def _pass(self) -> float:
        """Renew, delete and tick what is due; the seconds until more is."""
        outage = not self._renew()
        with self._lock:
            registrations = list(self._registrations)
            forgotten, self._forgotten = self._forgotten, []
        for key, lease, refusals in forgotten:
            if outage or not self._delete(key, lease, refusals):
                with self._lock:
                    self._forgotten.append((key, lease, refusals + (not outage)))
                outage = outage or self._unreachable
        for registration in registrations if not outage else ():
            if self._stopped.is_set():
                return 0.0
            registration.tick()
            if registration.unreachable:
                outage = True
                break
        intervals = [r.interval for r in registrations] or [1.0]
        now = time.monotonic()
        with self._lock:
            due = [held.next - now for held in self._leases.values() if held.id]
        due += [r.due - now for r in registrations]
        if self._forgotten:
            due.append(min(intervals))
        return max(0.0, min(intervals) if outage else min(intervals + due))

    def _renew(self) -> bool:
        """Renew each shared lease that is due; False when etcd did not answer."""
        now = time.monotonic()
        with self._lock:
            due = [(ttl, held.id) for ttl, held in self._leases.items()
                   if held.id and held.next <= now]
        for ttl, lease in due:
            try:
                alive = self.client.keepalive(lease) > 0
            except Unreachable as exc:
                if not self._unreachable:
                    log.warning("malla: etcd unreachable, the lease of %s not renewed "
                                "(calls between known nodes go on; retrying): %s",
                                self.name, exc)
                    self._unreachable = True
                return False
            except ProtocolError as exc:
                # (retried a third of the lease later, not at once: a refusal
                # retried at once spins; logged once until one is accepted)
                with self._lock:
                    self._leases[ttl].next = now + min(ttl / 3, 1.0)
                if not self._refused:
                    log.warning("malla: etcd refused to renew the lease of %s: %s",
                                self.name, exc)
                    self._refused = True
                continue
            self._refused = False
            if self._unreachable:
                log.info("malla: etcd reachable again, renewing the lease of %s", self.name)
                self._unreachable = False
            if alive:
                with self._lock:
                    self._leases[ttl].next = now + ttl / 3
            else:
                log.warning("malla: the etcd lease of %s expired; its nodes register again",
                            self.name)
                self.lost(ttl, lease)
        return True


class Share:
    """The etcd client, watch and keeper of the nodes of one process that
    use the same etcd and prefix on one event loop; `acquire()` one per
    node start, `release()` it at stop (the last one stops the watch and
    the keeper)."""

    _shares: dict[Key, Share] = {}

    def __init__(self, key: Key, url: EtcdUrl, ssl_context: ssl.SSLContext | None) -> None:
        self._key = key
        self.client = EtcdClient.from_url(url, ssl_context=ssl_context)
        self.membership = Membership(self.client, url.prefix)
        self.keeper = Keeper(self.client, url.prefix)
        self._subscribers: dict[int, Apply] = {}
        self._users = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def acquire(cls, url: EtcdUrl, ssl_context: ssl.SSLContext | None) -> Share:
        """The running loop's share for `url` (made on first use)."""
        loop = asyncio.get_running_loop()
        key = (loop, url.endpoints, url.tls, id(ssl_context), url.prefix)
        share = cls._shares.get(key)
        if share is None:
            share = cls._shares[key] = cls(key, url, ssl_context)
        share._users += 1
        return share

    async def release(self) -> None:
        """One user less: the last stops the watch and the keeper."""
        self._users -= 1
        if self._users > 0:
            return
        if self._shares.get(self._key) is self:
            del self._shares[self._key]
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.keeper.stop)

    def subscribe(self, token: int, apply: Apply) -> None:
        """Hand every membership event to `apply`, starting with a JOIN for
        each member already known (the watch runs from the first subscriber)."""
        for name, record in list(self.membership.members.items()):
            apply(MemberEvent(JOIN, name, record))
        self._subscribers[token] = apply
        if self._task is None:
            self._start_watch()

    def _start_watch(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        self._task.add_done_callback(self._watch_ended)

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        """The watch is every node's view: one that ends by surprise is logged
        and started again (a second later) while nodes still use it."""
        if task.cancelled() or task is not self._task:
            return
        exc = task.exception()
        log.error("malla: the etcd watch of %s ended (%s); watching again in 1 s",
                  self.keeper.name, exc if exc is not None else "it returned")
        self._task = None

        def again() -> None:
            if self._subscribers and self._task is None and self._users > 0:
                self._start_watch()

        asyncio.get_running_loop().call_later(1.0, again)

    def unsubscribe(self, token: int) -> None:
        self._subscribers.pop(token, None)

    async def _watch(self) -> None:
        async for event in self.membership.events():
            # (one event at a time, then the loop's other work: a burst of
            # joins applied to every node of a large process at once held
            # its calls back by seconds)
            await asyncio.sleep(0)
            for token, apply in list(self._subscribers.items()):
                if token not in self._subscribers:     # (stopped meanwhile)
                    continue
                try:
                    apply(event)
                except Exception:    # (one node's failure must not end the others' watch)
                    log.exception("malla: applying the etcd event %s of %s failed",
                                  event.kind, event.name)
