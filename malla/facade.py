"""BlockingNode: malla for synchronous programs (a Flask view, a script, a
notebook cell).  The node runs on its own uvloop loop in a daemon thread;
every method submits a coroutine there and blocks for its result, so
exceptions are raised in the caller's thread.  Any number of threads may
share one BlockingNode and its proxies.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import uvloop

from malla import exceptions as mexc
from malla.node import Node
from malla.proxy import Proxy
from malla.streams import Stream

__all__ = ["BlockingNode"]

T = TypeVar("T")


class BlockingNode:
    """A Node on its own thread, with blocking methods (DESIGN.md)."""

    def __init__(self, name: str, **node_options: Any) -> None:
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"malla-node-{name}")
        self._thread.start()
        self._closed = False
        # the tasks of the calls threads wait on (touched on the loop thread only)
        self._waiting: set[asyncio.Task[Any]] = set()
        try:
            self.node: Node = self._run(self._start(name, node_options))
        except BaseException:
            self._stop_loop()
            raise
        self.services = _BlockingServices(self)
        atexit.register(self.close)

    @staticmethod
    async def _start(name: str, options: dict[str, Any]) -> Node:
        node = Node(name, **options)
        await node.start()
        return node

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a BlockingNode method was called from its own loop thread; "
                               "use the async Node API there")
        if self._closed:
            coro.close()
            raise mexc.NodeStopped("this BlockingNode is closed")
        fut = asyncio.run_coroutine_threadsafe(self._waited(coro), self._loop)
        try:
            return fut.result()
        except BaseException:
            # KeyboardInterrupt (Ctrl-C) or another exception raised in this
            # thread while it waited: the call is cancelled on the loop, so
            # a remote call sends CANCEL; (a no-op once the call is done)
            fut.cancel()
            raise

    async def _waited(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await coro
        except asyncio.CancelledError:
            if self._closed:
                raise mexc.NodeStopped("the BlockingNode was closed while this call "
                                       "waited") from None
            raise
        finally:
            self._waiting.discard(task)

    async def _fail_waiting(self) -> None:
        # What other threads still wait on when the node has stopped: failed
        # with NodeStopped before the loop stops (else they would wait forever).
        me = asyncio.current_task()
        tasks = [t for t in self._waiting if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _in_loop(self, fn: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return fn(*args)
        return self._run(call())

    # -- the Node API, blocking ----------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.node.address

    @property
    def name(self) -> str:
        return self.node.name

    def peers(self) -> list[str]:
        return self._in_loop(self.node.peers)

    def remote(self, service: Any, fun: str, args: Any = (),
               kwargs: dict[str, Any] | None = None, **opts: Any) -> Any:
        return self._run(self.node.remote(service, fun, args, kwargs, **opts))

    def local(self, service: Any, fun: str, args: Any = (),
              kwargs: dict[str, Any] | None = None) -> Any:
        return self._run(self.node.local(service, fun, args, kwargs))

    def call_cb_all(self, service: Any, fun: str, args: Any = (),
                    kwargs: dict[str, Any] | None = None, **opts: Any) -> list[Any]:
        return self._run(self.node.call_cb_all(service, fun, args, kwargs, **opts))

    def stream(self, service: Any, fun: str, args: Any = (),
               kwargs: dict[str, Any] | None = None, **opts: Any) -> Iterator[Any]:
        """node.stream()'s items as a blocking iterator (closed when the loop
        over it ends, early or not)."""
        return blocking_items(self, self._in_loop(
            lambda: self.node.stream(service, fun, args, kwargs, **opts)))

    def start_service(self, service: Any) -> None:
        self._run(self.node.start_service(service))

    def stop_service(self, service: Any) -> None:
        self._run(self.node.stop_service(service))

    def pause_service(self, service: Any) -> None:
        self._run(self.node.pause_service(service))

    def resume_service(self, service: Any) -> None:
        self._run(self.node.resume_service(service))

    def connect(self, target: str) -> None:
        self._run(self.node.connect(target))

    def get_nodes(self, service: Any) -> list[str]:
        return self._in_loop(self.node.get_nodes, service)

    def get_instances(self, service: Any) -> list[tuple[str, dict[str, Any]]]:
        return self._in_loop(self.node.get_instances, service)

    def get_services(self) -> dict[str, list[str]]:
        return self._in_loop(self.node.get_services)

    def wait_for_services(self, services: list[Any], retries: int = 10) -> bool:
        return self._run(self.node.wait_for_services(services, retries))

    def stats(self) -> dict[str, Any]:
        return self._in_loop(self.node.stats)

    def service(self, name: Any) -> BlockingProxy:
        return BlockingProxy(self, self._in_loop(self.node.service, name))

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the node and its thread. Idempotent; also runs at exit."""
        if self._closed:
            return
        try:
            self._run(self.node.stop())
        finally:
            self._closed = True
            if self._loop.is_running():
                asyncio.run_coroutine_threadsafe(self._fail_waiting(), self._loop).result()
            self._stop_loop()
            atexit.unregister(self.close)

    stop = close

    def _stop_loop(self) -> None:
        self._closed = True
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> BlockingNode:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BlockingProxy:
    """A proxy whose functions block and return the result."""

    def __init__(self, bnode: BlockingNode, proxy: Proxy) -> None:
        self._bnode = bnode
        self._proxy = proxy

    def __repr__(self) -> str:
        return f"<malla blocking proxy of service {self._proxy._name}>"

    # The proxy reads the node's discovery table, which only the node's loop
    # thread may touch: every look at it runs there.

    def __getattr__(self, fun: str) -> Any:
        if fun.startswith("_"):
            raise mexc.UnknownFunction(f"{fun!r} is not an exported function of "
                                       f"{self._proxy._name}")
        signature = self._bnode._in_loop(lambda: getattr(self._proxy, fun).__signature__)

        def blocking_call(*args: Any, **kwargs: Any) -> Any:
            result = self._bnode._run(self._call(fun, args, kwargs))
            if isinstance(result, Stream):
                return blocking_items(self._bnode, result)
            return result

        blocking_call.__name__ = fun
        blocking_call.__signature__ = signature  # type: ignore[attr-defined]
        return blocking_call

    async def _call(self, fun: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        obj = getattr(self._proxy, fun)(*args, **kwargs)
        if isinstance(obj, Stream):
            return obj      # (a stream function's: iterated by the calling thread)
        return await obj.run()

    def __dir__(self) -> list[str]:
        return self._bnode._in_loop(dir, self._proxy)


def blocking_items(bnode: BlockingNode, stream: Stream) -> Iterator[Any]:
    """The items of `stream`, fetched on the node's loop a batch per thread
    hop (those that have arrived); leaving the loop early closes it."""
    try:
        while True:
            try:
                items = bnode._run(stream.batch())
            except StopAsyncIteration:
                return
            yield from items
    finally:
        if not bnode._closed:
            bnode._run(stream.aclose())


class _BlockingServices:
    def __init__(self, bnode: BlockingNode) -> None:
        self._bnode = bnode

    def __getattr__(self, name: str) -> BlockingProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        # AttributeError when unknown (looked up on the node's loop thread)
        self._bnode._in_loop(getattr, self._bnode.node.services, name)
        return self._bnode.service(name)
