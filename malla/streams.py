"""The caller side of streaming calls (DESIGN.md "Streaming calls"):
`node.stream()` and the `Stream` it returns, an async iterator over the
items of a service function that is an async generator.

A stream opens lazily, at the first `__anext__`: the nodes of the service
in the balancer's order, as remote() walks them, until one gives a first
event (an item, the end, or an error that is not "service not available").
Failover and the retry options apply only until then.  Over TCP the core
keeps the items that arrived (at most the window: the producer never runs
further ahead, malla/core/stream.pyx) and gives credit back as they are
taken; in-process the generator is iterated directly, in the consumer's
task (it never runs ahead at all).  `timeout` bounds the wait for each
item, `deadline` the whole stream; leaving early (break, an exception,
cancellation, a timeout, `aclose()`) closes the producer: CANCEL over TCP,
`aclose()` in-process, so the generator's `finally` runs either way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, NamedTuple

from malla import exceptions as mexc
from malla._ext import core
from malla.caller import (
    _as_remote_error,
    _Expired,
    _run_with_timeout,
    _sooner,
    check_arguments,
    invalid_options,
    valid_timeout,
)
from malla.context import enter, inherited_deadline, leave
from malla.routing import Routed, check_key, check_vsn

if TYPE_CHECKING:
    from collections.abc import Iterator

    from malla.caller import Caller

__all__ = ["STREAM_OPTIONS", "Stream", "Streamer", "is_stream"]

ServiceNotAvailable = mexc.ServiceNotAvailable
_EMPTY = core.STREAM_EMPTY
DEFAULT_WINDOW = 64


def is_stream(info: dict[str, Any] | None, fun: str) -> bool:
    """Whether an announced service `info` says `fun` is a stream."""
    return info is not None and fun in info.get("streams", ())


class Streamer:
    """node.stream() of one node, beside its Caller (whose discovery table,
    balancer, connections and hosted services it uses)."""

    def __init__(self, caller: Caller, window: int) -> None:
        self._caller = caller
        self.window = window

    def stream(self, service: Any, fun: str, args: Any = (),
               kwargs: dict[str, Any] | None = None, *, timeout: int = 15000,
               deadline: float | None = None, meta: Any = None, sna_retries: int = 5,
               excp_retries: int = 0, retries_sleep_msec: int = 1000, key: Any = None,
               vsn: str | None = None, **unknown: Any) -> Stream:
        """Iterate the items of the stream function `fun` of `service`
        (``async for item in node.stream("Feed", "ticks", [10])``).

        `timeout` (ms) bounds the wait for each item, `deadline` (ms) the
        whole stream; `sna_retries`, `excp_retries`, `retries_sleep_msec`,
        `key=` and `vsn=` apply as in remote() (the same round loop), only
        until the first item arrived.
        """
        if unknown:
            raise invalid_options(unknown, "stream()")
        if valid_timeout(timeout) == 0:
            raise mexc.InvalidOption("a stream waits for its items: timeout must be above 0")
        name, args, timeout = self._caller._call_parts(service, args, timeout)
        if type(fun) is not str or fun[:1] == "_":
            raise mexc.UnknownFunction(f"{fun!r} is not an exported function of {name}")
        route: dict[str, Any] = {}
        if key is not None:
            check_key(key)
            route["key"] = key
        if vsn is not None:
            check_vsn(vsn)
            route["vsn"] = vsn
        at = inherited_deadline()
        if deadline is not None:
            at = _sooner(at, deadline)
        return Stream(self, name, fun, args, kwargs, timeout, at, meta,
                      (sna_retries, excp_retries, retries_sleep_msec), route)

    # -- opening: the caller's round loop, each attempt a stream's opening ------------

    async def open(self, s: Stream) -> _Remote | _Local:
        """The first node of the stream's order that gives a first event (an
        item, the end, or an error that is not "service not available"),
        through remote()'s round loop (failover, retry rounds, the budget,
        jitter, ejection and retry_after_ms skips, key= and vsn=), each
        attempt an opening; errors raised are counted there."""
        sna_retries, excp_retries, sleep_ms = s.retry
        deadline = None
        if s.at is not None:
            # (the stream's own deadline, as ms from now: spent, the first
            # attempt raises CallTimeout, nothing sent)
            deadline = max((s.at - time.monotonic()) * 1000.0, 0.001)
        try:
            src: _Remote | _Local = await self._caller.remote(
                s.name, s.fun, s.args, s.kwargs, timeout=s.timeout, sna_retries=sna_retries,
                excp_retries=excp_retries, retries_sleep_msec=sleep_ms, meta=s.meta,
                deadline=deadline, _attempt=_Opener(self, s), **s.route)
        except _NoStreams as exc:
            self._caller._stats.error(exc.error)
            raise exc.error from None
        return src

    async def _there(self, s: Stream, node: str) -> _Remote:
        caller = self._caller
        conn, timeout = await caller.connection(node, s.name, s.timeout, s.at)
        if not conn.handshake.streams:
            refusal = ServiceNotAvailable(
                f"node {node} speaks protocol version {conn.handshake.version} without "
                "streams (they need version 2 and CAP_STREAM)")
            if self._none_streams(s):
                # no node of this service could ever take it: no retry rounds
                raise _NoStreams(ServiceNotAvailable(f"no node of {s.name} takes streams: "
                                                     f"{refusal}"))
            raise refusal
        checks = caller._registry.checks(s.name, node)
        if checks is not None:
            check_arguments(checks, s.name, s.fun, s.args, s.kwargs)
            if not is_stream(caller._registry.remote_info(s.name, node), s.fun):
                raise mexc.InvalidOption(f"{s.name}.{s.fun} is not a stream: call it "
                                         "with remote()")
        _, st = caller._send(conn, s.name, s.fun, s.args, s.kwargs, timeout, s.at, s.meta,
                             self.window)
        src = _Remote(st, node, s)
        try:
            await src.first()
        except BaseException:
            st.close()          # (cancelled meanwhile: the producer is told)
            raise
        return src

    def _none_streams(self, s: Stream) -> bool:
        """Whether every node serving the stream's service (with its vsn=)
        is another node, connected with a protocol without streams."""
        caller = self._caller
        vsn = s.route.get("vsn")
        order = None if vsn is None else Routed(caller.routing, caller._order, None, vsn)
        for node in caller.routing.serving(s.name, order):
            conn = caller._conns.get(node)
            if node == caller.name or conn is None or conn.handshake.streams:
                return False
        return True

    async def _here(self, s: Stream) -> _Local:
        caller = self._caller
        entry = caller._entries.get(s.name)
        if entry is None:
            raise ServiceNotAvailable(f"service {s.name} is not running here")
        why = entry.refusal(s.fun, s.args, s.kwargs, None, caller.name)
        if why is not None:
            raise mexc.error_from_wire(why[0], why[1], why[2], None)
        if not is_stream({"streams": [f for f, k in entry.kinds.items() if k == 3]}, s.fun):
            raise mexc.InvalidOption(f"{s.name}.{s.fun} is not a stream: call it with remote()")
        caller._stats.local_calls += 1
        src = _Local(entry, caller.name, s)
        try:
            await src.first()
        except BaseException:
            await src.close()   # (the generator closed, its slot given back)
            raise
        return src


class _NoStreams(Exception):
    """No node of the service speaks streams: raised through the round
    loop untouched (no retry round can change it), `error` to the caller."""

    def __init__(self, error: mexc.ServiceNotAvailable) -> None:
        super().__init__(str(error))
        self.error = error


class _Opener:
    """Each attempt of a stream's round loop (malla.caller.Attempt): its
    opening on one node, in-process or over TCP."""

    __slots__ = ("_s", "_streamer")

    def __init__(self, streamer: Streamer, s: Stream) -> None:
        self._streamer, self._s = streamer, s

    async def attempt(self, node: str, nodes: Iterator[str], args: Any,
                      kwargs: dict[str, Any] | None, timeout: int, at: float | None,
                      meta: Any) -> _Remote | _Local:
        streamer = self._streamer
        if node == streamer._caller.name:
            return await streamer._here(self._s)
        return await streamer._there(self._s, node)


class Stream:
    """The items of one streaming call, as an async iterator (node.stream()).

    Also an async context manager, whose exit closes it: for a loop that
    may not run to its end (``async with node.stream(...) as items:``).
    """

    def __init__(self, streamer: Streamer, name: str, fun: str, args: Any,
                 kwargs: dict[str, Any] | None, timeout: int, at: float | None, meta: Any,
                 retry: tuple[int, int, int], route: dict[str, Any]) -> None:
        self._streamer = streamer
        self.name, self.fun, self.args, self.kwargs = name, fun, args, kwargs
        self.timeout, self.at, self.meta, self.retry = timeout, at, meta, retry
        self.route = route      # key= and vsn=, when given
        self._src: _Remote | _Local | None = None
        self._fast: Any = None
        self._done = False
        self._handed = 0    # items batch() handed out and not given back yet

    def __repr__(self) -> str:
        return f"<malla.Stream {self.name}.{self.fun}{tuple(self.args)!r}>"

    def __aiter__(self) -> AsyncIterator[Any]:
        # (the core's iterator: an item that has arrived is taken in C)
        it: AsyncIterator[Any] = core.StreamIter(self)
        return it

    def __anext__(self) -> Awaitable[Any]:
        src = self._src
        if type(src) is _Remote and src._at is None:
            # the common step: an item that has arrived, as an awaitable
            # already done (the core's: no coroutine, no future per item)
            ready = src._st.ready()
            if ready is not None:
                return ready  # type: ignore[no-any-return]
        return self._next()

    async def _next(self) -> Any:
        src = self._src
        if src is None:
            if self._done:
                raise StopAsyncIteration
            # (an error of the opening ends the stream, counted by the
            # caller's round loop; nothing is open to close)
            self._done = True
            src = self._src = await self._streamer.open(self)
            self._done = False
            if type(src) is _Remote and src._at is None:
                self._fast = src._st        # (what StreamIter takes items from)
        try:
            return await src.next()
        except BaseException as exc:
            await self._failed(exc)
            raise

    async def _failed(self, exc: BaseException) -> None:
        # the end, or an error, a timeout or a cancellation that leaves the
        # loop: the producer is closed, and the error counted as a call's
        if type(exc) is StopAsyncIteration:
            self._done = True
            return
        await self.aclose()
        if isinstance(exc, mexc.MallaError):
            self._streamer._caller._stats.error(exc)

    def options(self, **opts: Any) -> Stream:
        """This stream (not opened yet) with node.stream()'s options: a
        proxy's stream function's, through malla.stream(obj, **opts)."""
        if self._src is not None or self._done:
            raise mexc.InvalidOption(f"{self!r} has started: options apply before it opens")
        self._done = True       # (this one is replaced, never opened)
        return self._streamer.stream(self.name, self.fun, self.args, self.kwargs, **opts)

    async def batch(self) -> list[Any]:
        """The next items: those that have arrived (at least one), or
        StopAsyncIteration at the end (BlockingNode's iterator takes them
        per thread hop)."""
        src = self._src
        if isinstance(src, _Remote):
            # those of the last batch have been used now: their credit goes back
            src.give_back(self._handed)
            self._handed = 0
        items = [await self.__anext__()]
        src = self._src
        if isinstance(src, _Remote):
            more = src.ready()
            self._handed = len(more)
            items += more
        return items

    async def aclose(self) -> None:
        """Stop the stream: the producer's generator is closed (its `finally`
        runs); later `__anext__` raise StopAsyncIteration."""
        self._done = True
        src, self._src = self._src, None
        if src is not None:
            await src.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # an iterator dropped before its end (never closed: a `break` out
        # of `async for`): the producer is told all the same (in-process,
        # the loop's hooks close the generator dropped with it)
        src = self._src
        if src is not None:
            src.forget()


class _Remote:
    """A stream served by a peer: the core's StreamIn, waited on within
    the stream's timeout and deadline."""

    def __init__(self, st: Any, node: str, s: Stream) -> None:
        self._st = st
        self.node = node
        self._timeout = s.timeout / 1000.0
        self._at = s.at
        self._what = f"{s.name}.{s.fun} on {node}"

    async def first(self) -> None:
        """Wait for the first event; raise the error when it is one."""
        st = self._st
        if not st.started:
            await self._wait()
        if st.ended and not st.buffered:
            try:
                st.take()
            except StopAsyncIteration:
                pass        # an empty stream

    async def next(self) -> Any:
        st = self._st
        while True:
            if self._at is not None and time.monotonic() >= self._at:
                self._give_up(mexc.CallTimeout(f"the deadline of {self._what} passed"))
            item = st.take()
            if item is not _EMPTY:
                return item
            await self._wait()

    def ready(self) -> list[Any]:
        """Every item already here (none waited for), their credit kept
        until `give_back`: a consumer's own buffer counts in the window."""
        items: list[Any] = self._st.take_ready()
        return items

    def give_back(self, n: int) -> None:
        if n:
            self._st.give_back(n)

    async def _wait(self) -> None:
        st = self._st
        loop = asyncio.get_running_loop()
        limit = self._timeout
        if self._at is not None:
            limit = min(limit, self._at - time.monotonic())
        fut = st.wait(loop)
        timer = loop.call_later(max(limit, 0.0), _expire, fut)
        try:
            if await fut is _TIMED_OUT:
                self._give_up(mexc.CallTimeout(f"no item from {self._what} in time"))
        finally:
            timer.cancel()

    def _give_up(self, err: mexc.MallaError) -> None:
        self._st.fail(err)
        raise err

    async def close(self) -> None:
        self._st.close()

    def forget(self) -> None:
        st = self._st
        if not st.ended:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return      # (dropped outside the loop: the loop's end closes it)
            st.close()


_TIMED_OUT = object()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


class _Call(NamedTuple):
    name: str
    fun: str
    args: Any
    kwargs: dict[str, Any] | None
    timeout: int
    at: float | None
    meta: Any


class _Local:
    """A stream served on this node: its generator, iterated in the
    consumer's task (it runs only when an item is asked for), through the
    hook, within the stream's timeout and deadline."""

    def __init__(self, entry: Any, me: str, s: Stream) -> None:
        self._entry = entry
        # (what it needs of the stream, not the stream: dropping the Stream
        # must drop this too, and the generator with it)
        self._s = _Call(s.name, s.fun, s.args, s.kwargs, s.timeout, s.at, s.meta)
        self._me = me
        self._gen: AsyncIterator[Any] | None = None
        self._first: Any = _EMPTY
        entry.running += 1      # (one running call until it ends)
        self._counted = True

    async def first(self) -> None:
        s = self._s
        opts = {"caller": self._me, "timeout": s.timeout, "meta": s.meta}
        token = enter(self._me, s.name, s.fun, s.meta, s.timeout, s.at, True, False)
        try:
            gen = self._entry.invoke(s.fun, list(s.args), s.kwargs or {}, opts)
            while hasattr(gen, "__await__"):
                gen = await gen
        except Exception as exc:
            self._end()
            raise _as_remote_error(exc) from exc
        finally:
            leave(token)
        if not isinstance(gen, AsyncIterator):
            self._end()
            raise mexc.remote_error("malla.exceptions.InvalidOption",
                                    f"{s.name}.{s.fun} returned {type(gen).__name__}, "
                                    "not an async iterator")
        self._gen = gen
        try:
            self._first = await self._step()
        except StopAsyncIteration:
            self._first = StopAsyncIteration

    async def next(self) -> Any:
        first = self._first
        if first is not _EMPTY:
            self._first = _EMPTY
            if first is StopAsyncIteration:
                await self.close()
                raise StopAsyncIteration
            return first
        try:
            return await self._step()
        except StopAsyncIteration:
            await self.close()
            raise

    async def _step(self) -> Any:
        s, gen = self._s, self._gen
        assert gen is not None
        timeout = s.timeout
        if s.at is not None:
            left = (s.at - time.monotonic()) * 1000.0
            if left <= 0:       # (mid-stream: it ran)
                raise mexc.CallTimeout(f"the deadline of {s.name}.{s.fun} passed")
            timeout = min(timeout, int(left) or 1)
        token = enter(self._me, s.name, s.fun, s.meta, s.timeout, s.at, True, False)
        try:
            return await _run_with_timeout(_next_of(gen), timeout)
        except StopAsyncIteration:
            raise
        except _Expired:
            raise mexc.CallTimeout(f"no item from {s.name}.{s.fun} within {timeout} ms") from None
        except Exception as exc:    # (its own errors, a malla one too: as over the network)
            raise _as_remote_error(exc) from exc
        finally:
            leave(token)

    async def close(self) -> None:
        gen, self._gen = self._gen, None
        try:
            if gen is not None and hasattr(gen, "aclose"):
                await gen.aclose()
        finally:
            self._end()

    def forget(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._counted:
            self._counted = False
            self._entry.running -= 1


async def _next_of(gen: AsyncIterator[Any]) -> Any:
    # (a coroutine, so that a step that does not suspend needs no timer)
    return await gen.__anext__()


# stream()'s options, by name
STREAM_OPTIONS = frozenset(("timeout", "deadline", "meta", "sna_retries", "excp_retries",
                            "retries_sleep_msec", "key", "vsn"))
