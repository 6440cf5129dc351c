"""The paths a call can take, each an environment of real nodes on loopback.

Every path has a caller, a serving node (hosting the conformance services
and `Ctl`) and a second node "x" where `Pair` fails.  The environment runs
its own event loop in a thread, so the suite can run case after case on it
(pytest stays synchronous, one test per path and case).
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

import uvloop
from conf_services import Ctl, FanOpen, Pair

import malla

COOKIE = "conformance-cookie-5b1f0c9e27d4"
MAX_MESSAGE = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@dataclass(frozen=True)
class Path:
    name: str
    loop: str           # uvloop | asyncio
    server: str         # self (in-process) | loop (same loop, TCP) | subprocess
    via: str            # remote | proxy-await | proxy-call | blocking
    # membership from a real etcd, connections on demand (mesh="on_demand")
    discovery: bool = False

    @property
    def inprocess(self) -> bool:
        return self.server == "self"

    @property
    def blocking(self) -> bool:
        return self.via == "blocking"


PATHS = [
    Path("inprocess", "uvloop", "self", "remote"),
    Path("inprocess-asyncio", "asyncio", "self", "remote"),
    Path("tcp", "uvloop", "loop", "remote"),
    Path("tcp-asyncio", "asyncio", "loop", "remote"),
    Path("subprocess", "uvloop", "subprocess", "remote"),
    Path("proxy-await", "uvloop", "loop", "proxy-await"),
    Path("proxy-call", "uvloop", "loop", "proxy-call"),
    Path("blocking", "uvloop", "loop", "blocking"),
    Path("on-demand", "uvloop", "loop", "remote", discovery=True),
]

SERVICES = ("Conf", "Hooked", "Limited", "Pausable", "Guarded", "Feed", "Ctl")


class Env:
    """Nodes for one path, on a loop of their own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loop = uvloop.new_event_loop() if path.loop == "uvloop" else asyncio.new_event_loop()
        self.failures: list[str] = []
        self.loop.set_exception_handler(self._loop_exception)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name=f"conformance-{path.name}")
        self.thread.start()
        self.nodes: list[malla.Node] = []
        self.proc: subprocess.Popen[str] | None = None
        self.bn: malla.BlockingNode | None = None
        self.etcd: Any = None
        if path.discovery:     # (tests/etcdserver.py: a real etcd on loopback)
            from etcdserver import EtcdServer
            self.etcd = EtcdServer()
            self.etcd.start()
        self.caller_name = "c"
        self.server_name = "c" if path.inprocess else "s"
        try:
            self.run(self._start(), timeout=60)
        except BaseException:
            self.close()
            raise

    def _loop_exception(self, loop: Any, context: dict[str, Any]) -> None:
        # an exception in any scheduled callback fails the run (not silenced)
        self.failures.append(str(context.get("exception") or context.get("message")))
        loop.default_exception_handler(context)

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- set-up -------------------------------------------------------------------

    def _node(self, name: str) -> malla.Node:
        extra = {"discovery": self.etcd.url("/conformance")} if self.etcd else {}
        node = malla.Node(name, cookie=COOKIE, port=0, max_message_size=MAX_MESSAGE, **extra)
        self.nodes.append(node)
        return node

    async def _start(self) -> None:
        self.aux = await self._node("x").start()
        await self.aux.start_service(Pair("x", True))
        await self.aux.start_service(FanOpen())
        targets = [f"127.0.0.1:{self.aux.address[1]}"]
        if self.path.server == "subprocess":
            targets.append(f"127.0.0.1:{await self._spawn_server()}")
            self.server = None
        else:
            if self.path.inprocess:
                self.server = self._node("c")
            else:
                self.server = self._node("s")
            await self.server.start()
            ctl = Ctl(self.server)
            await ctl.install()
            await self.server.start_service(ctl)
            if not self.path.inprocess:
                targets.append(f"127.0.0.1:{self.server.address[1]}")
        if self.path.blocking:
            self.bn = await self._in_thread(
                malla.BlockingNode, "c", cookie=COOKIE, port=0, max_message_size=MAX_MESSAGE)
            for target in targets:
                await self._in_thread(self.bn.connect, target)
        else:
            self.caller = self.server if self.path.inprocess else self._node("c")
            await self.caller.start()
            for target in targets if not self.path.discovery else ():
                await self.caller.connect(target)
        for service in SERVICES:
            await self.until(lambda s=service: self.server_name in self.caller_nodes(s),
                             f"the caller sees {service}")
        for service in ("Pair", "Fan"):
            await self.until(lambda s=service: len(self.caller_nodes(s)) == 2,
                             f"{service} on two nodes")

    async def _spawn_server(self) -> int:
        env = dict(os.environ, PYTHONPATH=ROOT, MALLA_COOKIE=COOKIE)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "conf_server.py"), "s", str(MAX_MESSAGE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        if not line.startswith("READY"):
            raise AssertionError(f"the conformance server did not start: {line!r}")
        return int(line.split()[1])

    async def _in_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    def caller_nodes(self, service: str) -> list[str]:
        if self.bn is not None:
            return self.bn.get_nodes(service)   # (read on its own loop thread)
        return self.caller.get_nodes(service)

    async def caller_stats(self) -> dict[str, Any]:
        if self.bn is not None:
            return await self._in_thread(self.bn.stats)
        return self.caller.stats()

    async def until(self, predicate: Any, what: str, timeout: float = 10.0) -> None:
        end = self.loop.time() + timeout
        while not predicate():
            if self.loop.time() > end:
                raise AssertionError(f"not within {timeout} s: {what}")
            await asyncio.sleep(0.01)

    # -- the serving node's control panel ------------------------------------------

    async def ctl(self, fun: str, *args: Any) -> Any:
        if self.server is not None:
            return await self.server.local("Ctl", fun, list(args))
        return await self.caller.remote("Ctl", fun, list(args))

    # -- one call, by this path ------------------------------------------------------

    async def call(self, service: str, fun: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any] | None, opts: dict[str, Any]) -> Any:
        via = self.path.via
        if via == "remote":
            return await self.caller.remote(service, fun, args, kwargs, **opts)
        if via == "blocking":
            assert self.bn is not None
            return await self._in_thread(self.bn.remote, service, fun, args, kwargs, **opts)
        obj = getattr(self.caller.service(service), fun)(*args, **(kwargs or {}))
        if via == "proxy-await" and not opts:
            return await obj
        return await malla.call(obj, **opts)

    async def stream(self, service: str, fun: str, args: tuple[Any, ...],
                     opts: dict[str, Any], mode: str) -> Any:
        """Iterate a stream by this path: every item (`mode` "all"), the
        first three ("break": leave the loop), or the first one and then
        how many the producer made meanwhile ("slow": a consumer that
        reads slowly).  The items taken are in `self.items`, also when the
        stream raised."""
        self.items: list[Any] = []
        if self.bn is not None:
            return await self._in_thread(self._stream_blocking, service, fun, args, opts, mode)
        if self.path.via == "remote":
            it = self.caller.stream(service, fun, args, None, **opts)
        else:
            # a proxy's stream, with options as malla.call gives a call's
            it = getattr(self.caller.service(service), fun)(*args)
            if opts:
                it = malla.stream(it, **opts)
        async for item in it:
            self.items.append(item)
            if mode == "break" and len(self.items) == 3:
                break
            if mode == "slow":
                await asyncio.sleep(0.3)
                produced = await self.ctl("produced", fun)
                await it.aclose()
                return produced
        return self.items

    def _stream_blocking(self, service: str, fun: str, args: tuple[Any, ...],
                         opts: dict[str, Any], mode: str) -> Any:
        assert self.bn is not None
        it = self.bn.stream(service, fun, args, **opts)
        for item in it:
            self.items.append(item)
            if mode == "break" and len(self.items) == 3:
                break
            if mode == "slow":
                threading.Event().wait(0.3)
                produced = self.run(self.ctl("produced", fun))
                it.close()
                return produced
        return self.items

    async def local(self, service: str, fun: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any] | None) -> Any:
        if self.bn is not None:
            return await self._in_thread(self.bn.local, service, fun, args, kwargs)
        return await self.caller.local(service, fun, args, kwargs)

    async def cb_all(self, service: str, fun: str, args: tuple[Any, ...],
                     kwargs: dict[str, Any] | None, opts: dict[str, Any]) -> Any:
        if self.bn is not None:
            return await self._in_thread(self.bn.call_cb_all, service, fun, args, kwargs,
                                         **opts)
        return await self.caller.call_cb_all(service, fun, args, kwargs, **opts)

    # -- tear-down ----------------------------------------------------------------------

    async def _stop(self) -> None:
        if self.bn is not None:
            await self._in_thread(self.bn.close)
        for node in reversed(self.nodes):
            await node.stop()

    def close(self) -> None:
        try:
            if self.loop.is_running():
                self.run(self._stop(), timeout=30)
        finally:
            if self.proc is not None:
                self.proc.stdin.close()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self.proc.stdout.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            if self.etcd is not None:
                self.etcd.__exit__()
