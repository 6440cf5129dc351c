"""The services the conformance suite calls, and the control service that
lets a case set up and inspect the serving node wherever it runs (in this
process or in a subprocess: conf_server.py imports this module too).

Every function counts its runs on entry (`Conf.runs`), so a case sees how
many times the server actually ran it: a duplicate execution or a silent
drop is visible.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections import Counter
from typing import Any

import malla


class Fragile:
    """A registered user type whose decoder raises on the payload b"bad"."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fragile) and other.tag == self.tag

    def __hash__(self) -> int:
        return hash(self.tag)


def _decode_fragile(data: bytes) -> Fragile:
    if data == b"bad":
        raise ValueError("this Fragile value cannot be rebuilt")
    return Fragile(data.decode())


malla.register_type(Fragile, lambda f: f.tag.encode(), _decode_fragile,
                    name="conformance.Fragile")


class Conf(malla.Service, global_=True):
    """Plain and async functions, no hook: the core's inline path applies."""

    def __init__(self, node: malla.Node | None = None) -> None:
        self.node = node
        self.runs: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()

    def echo(self, x):
        self.runs["echo"] += 1
        return x

    @malla.idempotent
    def same(self, x):
        self.runs["same"] += 1
        return x

    def kw(self, a, b=2, *, c=3):
        self.runs["kw"] += 1
        return [a, b, c]

    async def slow(self, ms):
        self.runs["slow"] += 1
        await asyncio.sleep(ms / 1000)
        return ms

    async def hold(self, ms):
        self.runs["hold"] += 1
        try:
            await asyncio.sleep(ms / 1000)
        except asyncio.CancelledError:
            self.cancelled["hold"] += 1
            raise
        return ms

    def boom(self, kind):
        self.runs["boom"] += 1
        raise getattr(builtins, kind)("boom")

    async def nested(self):
        self.runs["nested"] += 1
        assert self.node is not None
        return await self.node.remote("Nowhere", "f", sna_retries=0)

    async def cast_inside(self, ms):
        # a cast made by a handler that inherited its caller's deadline
        self.runs["cast_inside"] += 1
        assert self.node is not None
        t0 = time.monotonic()
        await self.node.remote("Conf", "slow", [ms], timeout=0)
        return (time.monotonic() - t0) * 1000

    def unencodable(self):
        self.runs["unencodable"] += 1
        return object()

    def flaky(self):
        # fails on its 1st, 3rd... run since the last reset
        self.runs["flaky"] += 1
        if self.runs["flaky"] % 2:
            raise RuntimeError("flaky failed this time")
        return "ok"

    def fragile_reply(self):
        self.runs["fragile_reply"] += 1
        return Fragile("bad")

    def _helper(self):
        self.runs["_helper"] += 1
        return "private"


class Hooked(malla.Service, global_=True):
    """A service with an interception hook."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    def service_cb_in(self, fun, args, kwargs, opts):
        self.runs[fun] += 1
        if fun == "whoami":
            return [opts["caller"], opts["meta"]]
        return super().service_cb_in(fun, args, kwargs, opts)

    def whoami(self):
        return None

    @malla.allow("nobody-*")
    def secret(self):
        return "secret"


class Guarded(malla.Service, global_=True, allow=["c", "s"]):
    """allow=: the caller (node "c") and the server may call `ping`; only
    nodes named "admin-*" may call `admin` (its own list replaces the
    class's), so the caller is refused on every path, in-process too."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    def ping(self):
        self.runs["ping"] += 1
        return "pong"

    @malla.allow("admin-*")
    def admin(self):
        self.runs["admin"] += 1
        return "admin"


class Fan(malla.Service, global_=True):
    """Runs on the serving node, where only nodes named "s" may call `who`
    (the caller is refused), and on node "x" (FanOpen), where anyone may."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    @malla.allow("s")
    def who(self):
        self.runs["who"] += 1
        return "s"


class FanOpen(malla.Service, name="Fan", global_=True):
    def who(self):
        return "x"


class Limited(malla.Service, global_=True, max_concurrency=1):
    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    async def hold(self, ms):
        self.runs["hold"] += 1
        await asyncio.sleep(ms / 1000)
        return ms


class Late(malla.Service, global_=True):
    """Started by a case, some time after the call began."""

    runs: Counter[str] = Counter()

    def ping(self):
        Late.runs["ping"] += 1
        return "late"


class Pausable(malla.Service, global_=True):
    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    def ping(self):
        self.runs["ping"] += 1
        return "pong"


class Pair(malla.Service, global_=True):
    """Runs on the serving node and on a second node, where it fails."""

    def __init__(self, node_name: str, fail: bool) -> None:
        self.node_name = node_name
        self.fail = fail
        self.runs: Counter[str] = Counter()

    def who(self):
        self.runs["who"] += 1
        if self.fail:
            raise RuntimeError(f"{self.node_name} fails")
        return self.node_name

    async def whos(self):
        # (a stream: its one item is its node's name, where it does not fail)
        self.runs["whos"] += 1
        if self.fail:
            raise RuntimeError(f"{self.node_name} fails")
        yield self.node_name


class Feed(malla.Service, global_=True):
    """Streams (async generators): counts runs, items produced, and
    generators closed before their end (a consumer left, a deadline)."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.produced: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()

    async def ticks(self, n, pause_ms=0):
        self.runs["ticks"] += 1
        try:
            for i in range(n):
                self.produced["ticks"] += 1
                yield i
                if pause_ms:
                    await asyncio.sleep(pause_ms / 1000)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled["ticks"] += 1
            raise

    async def fail_after(self, n):
        self.runs["fail_after"] += 1
        for i in range(n):
            yield i
        raise ValueError(f"failed after {n} items")

    @malla.allow("nobody")
    async def secret(self):
        self.runs["secret"] += 1
        yield "never"


class Ctl(malla.Service, global_=True):
    """The serving node's control panel, for the suite only."""

    def __init__(self, node: malla.Node) -> None:
        self.node = node
        self.services: dict[str, Any] = {}
        self._pending: set[asyncio.Task[None]] = set()

    async def install(self) -> None:
        conf = Conf(self.node)
        self.services = {"Conf": conf, "Hooked": Hooked(), "Limited": Limited(),
                         "Pausable": Pausable(), "Pair": Pair(self.node.name, False),
                         "Guarded": Guarded(), "Fan": Fan(), "Feed": Feed()}
        for service in self.services.values():
            await self.node.start_service(service)

    def reset(self):
        for service in self.services.values():
            service.runs.clear()
            if isinstance(service, (Conf, Feed)):
                service.cancelled.clear()
            if isinstance(service, Feed):
                service.produced.clear()
        Late.runs.clear()

    def count(self, service, fun):
        if service == "Late":
            return Late.runs[fun]
        return self.services[service].runs[fun]

    def cancelled(self, fun):
        return self.services["Conf"].cancelled[fun] + self.services["Feed"].cancelled[fun]

    def produced(self, fun):
        return self.services["Feed"].produced[fun]

    def errors(self):
        return self.node.stats()["errors"]

    def forbidden(self):
        return self.node.stats()["forbidden"]

    async def pause(self, service):
        await self.node.pause_service(service)

    async def resume(self, service):
        await self.node.resume_service(service)

    async def start_late(self, ms):
        async def later():
            await asyncio.sleep(ms / 1000)
            await self.node.start_service(Late())

        task = asyncio.get_running_loop().create_task(later())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def stop_late(self):
        if "Late" in self.node.get_services() and self.node.name in self.node.get_nodes("Late"):
            await self.node.stop_service("Late")
