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

from malla.etcd import EtcdClient, EtcdUrl
from malla.etcd_discovery import JOIN, MemberEvent, Membership, Registration

__all__ = ["Keeper", "Share"]

log = logging.getLogger("malla.etcd")

Apply = Callable[[MemberEvent], None]
Key = tuple[asyncio.AbstractEventLoop, tuple[tuple[str, int], ...], bool, int, str]


class Keeper:
    """One daemon thread renewing the leases of every registration added.

    Each pass ticks every registration in turn (a tick does nothing until
    that registration is due); a pass that finds etcd unreachable stops
    there, since the others share its endpoints, and the next one comes an
    interval later, so an outage costs one failed request per interval, not
    one per node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wake = threading.Event()
        self._registrations: list[Registration] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

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

    def stop(self) -> None:
        """Stop the thread (its registrations were closed first)."""
        self._stopped.set()
        self.wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                registrations = list(self._registrations)
            outage = False
            for registration in registrations:
                if self._stopped.is_set():
                    return
                registration.tick()
                if registration.unreachable:
                    outage = True
                    break
            interval = min((r.interval for r in registrations), default=1.0)
            now = time.monotonic()
            delay = interval if outage else min(
                [interval] + [r.due - now for r in registrations])
            self.wake.wait(max(0.0, delay))
            self.wake.clear()


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
        self.keeper = Keeper(url.prefix)
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
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def unsubscribe(self, token: int) -> None:
        self._subscribers.pop(token, None)

    async def _watch(self) -> None:
        async for event in self.membership.events():
            for token, apply in list(self._subscribers.items()):
                if token not in self._subscribers:     # (stopped meanwhile)
                    continue
                try:
                    apply(event)
                except Exception:    # (one node's failure must not end the others' watch)
                    log.exception("malla: applying the etcd event %s of %s failed",
                                  event.kind, event.name)
