"""Hedged calls: `remote(..., hedge_after=ms)` (DESIGN.md "Hedged calls").

A slow reply is usually one slow node (a GC pause, a noisy neighbour), not a
slow function: sending the same call to the next node of the ranking when
no reply came within `hedge_after` ms, and taking whichever reply comes
first, cuts the tail at the cost of a few extra calls (Dean and Barroso,
"The Tail at Scale").  Only functions marked `@malla.idempotent` may be
hedged (malla.idempotent): both copies may run.

How one attempt of remote() runs with a hedge (`Hedge.attempt`, called by
the caller's loop for the node the ranking gives; everything else, the
failover along the ranking, the retry rounds, deadlines, stays the
caller's):

- the call goes to that node; when no outcome came within `hedge_after`,
  the next node of the same ranking (the caller's iterator: that node is
  then not tried again by the failover) gets a second copy, if the retry
  budget lets it (`hedge_to`, malla.routing); a hedge refused is not sent
  and draws no node (the round's failover still tries the one it would
  have taken), and the first copy is waited for as an ordinary attempt;
- at most one hedge per attempt: two copies at once, never more;
- the first reply wins; the other copy is cancelled (a CANCEL to its node,
  where the handler's coroutine is cancelled; in-process, the coroutine
  itself), and what it took until then is a lower bound of the balancer's
  latency average of its node (raised to it, never lowered: a stalling
  node is ranked down, and losing races does not make it look faster);
- a copy over an uncongested connection is sent at once and waited for on
  the core's own future (no task: a task would start, and send, only at
  the loop's next iteration, which under load delays every hedged call and
  so sends more hedges); in-process, or for a congested connection, a copy
  is a task;
- when both copies fail, the attempt raises one error: one that says the
  call may have run or failed (RemoteError, CallTimeout, ConnectionLost),
  if either copy gave one, before one that was not sent (a refusal,
  ServiceNotAvailable: the caller fails over to the next node, as for any
  refused attempt; or a CallTimeout with `sent` False, the deadline passed
  before the copy could go);
- an outcome of the first copy before `hedge_after` is the attempt's, as
  without a hedge (a refusal fails over at once).

`stats()["hedges"]` counts the copies sent (Prometheus `malla_hedges_total`);
with tracing, the call's span gets ``malla.hedged = true`` and names the
node whose reply won (server.address).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from malla import exceptions as mexc
from malla._ext import core
from malla.idempotent import hedgeable
from malla.tracing import note_hedge

if TYPE_CHECKING:
    from malla.metrics import Stats
    from malla.registry import Registry

__all__ = ["Hedge", "HedgeHost", "valid_hedge_after"]

_MAX_MS = 86_400_000 * 365


def valid_hedge_after(hedge_after: Any, timeout: int) -> float:
    """`hedge_after` (ms) as seconds; InvalidOption unless it is a number
    above 0 and the call waits for a reply (a cast has none to hedge)."""
    if (isinstance(hedge_after, bool) or not isinstance(hedge_after, (int, float))
            or not 0 < hedge_after <= _MAX_MS):
        raise mexc.InvalidOption(f"hedge_after is milliseconds, above 0 and at most "
                                 f"{_MAX_MS}, not {hedge_after!r}")
    if timeout == 0:
        raise mexc.InvalidOption("hedge_after applies to calls that wait for a reply, "
                                 "not to a cast (timeout=0)")
    return hedge_after / 1000.0


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # a copy's outcome nobody awaits any more (the loser's): read, so that
    # asyncio does not log it as never retrieved
    if not fut.cancelled():
        fut.exception()


def _wake(waiter: asyncio.Future[None], _: Any = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


# The loop's timers have millisecond grain: call_later(0.00205) fires when
# the loop's clock, a whole millisecond, reaches now's millisecond + 2, which
# is between 1 and 2 ms of real time later.  A hedge sent that early goes
# out for calls well inside hedge_after (with replies around 1.5 ms, a fifth
# of all calls: four times what a hedge_after at the p95 should send), so a
# timer that fires early is re-armed for what is left, never less than the
# loop's grain (never early; late by about that grain, and by however late the
# loop itself runs).
_GRAIN = 0.001


def _rearm(waiter: asyncio.Future[None], until: float, timer: list[Any]) -> None:
    if waiter.done():
        return
    left = until - core.monotonic()
    if left <= 0:
        waiter.set_result(None)
    else:
        timer[0] = asyncio.get_running_loop().call_later(
            max(left, _GRAIN), _rearm, waiter, until, timer)


async def _within(fut: asyncio.Future[Any], until: float) -> None:
    """Wait until `fut` is done or core.monotonic() reached `until`, whichever
    is first.

    (asyncio.wait((fut,), timeout=...) does the same with a set, a coroutine
    and checks of its own: it tripled the cost of a hedged call that never
    hedged, 24 us against 8, which under load slowed first copies past
    hedge_after and so sent more hedges, which slowed them more)"""
    waiter = asyncio.get_running_loop().create_future()
    wake = functools.partial(_wake, waiter)
    fut.add_done_callback(wake)
    timer: list[Any] = [None]
    _rearm(waiter, until, timer)
    try:
        await waiter
    finally:
        if timer[0] is not None:
            timer[0].cancel()
        fut.remove_done_callback(wake)


def _not_run(exc: BaseException) -> bool:
    # a copy that was never sent: refused, or its deadline passed before
    return isinstance(exc, mexc.ServiceNotAvailable) or (
        isinstance(exc, mexc.CallTimeout) and not exc.sent)


def _worse(first: BaseException | None, exc: BaseException) -> BaseException:
    # the error an attempt of two failed copies raises: "may have run or
    # failed" before "did not run" (a refusal would let the caller fail over
    # and run it a third time, or report it as not run; a hedge whose
    # deadline passed before it was sent would report as not run a first
    # copy that ran)
    if first is None or (_not_run(first) and not _not_run(exc)):
        return exc
    return first


class HedgeHost(Protocol):
    """What a hedge needs of the caller that makes the call (malla.caller)."""

    name: str
    _registry: Registry
    _stats: Stats
    _conns: dict[str, Any]
    # the node a hedge goes to (the next of the round's nodes), or None when
    # the retry budget refuses it or no node is left (malla.routing)
    hedge_to: Callable[[str, Iterator[str]], str | None]
    # (service, fun) -> the registry's version when its mark was last found
    # on every instance (the check walks every instance's metadata)
    hedge_checked: dict[tuple[str, str], int]

    def _call_here(self, name: str, fun: str, args: Any, kwargs: Any, timeout: int,
                   at: Any, meta: Any) -> Coroutine[Any, Any, Any]: ...
    def _call_node(self, node: str, name: str, fun: str, args: Any, kwargs: Any,
                   timeout: int, at: Any, meta: Any) -> Coroutine[Any, Any, Any]: ...
    def _send(self, conn: Any, name: str, fun: str, args: Any, kwargs: Any, timeout: int,
              at: Any, meta: Any) -> tuple[Any, Any]: ...


class Hedge:
    """The hedging of one remote() call to `service`.`fun` (built by the
    caller before anything is sent: InvalidOption, UnknownFunction):
    `attempt` runs one attempt of it with its hedge."""

    __slots__ = ("_after", "_fun", "_host", "_service")

    def __init__(self, service: str, fun: str, hedge_after: Any, timeout: int,
                 host: HedgeHost) -> None:
        self._after = valid_hedge_after(hedge_after, timeout)
        registry, checked = host._registry, host.hedge_checked
        if checked.get((service, fun)) != registry.version:
            hedgeable(service, fun, registry.infos(service))
            checked[(service, fun)] = registry.version
        self._service = service
        self._fun = fun
        self._host = host

    def _copy(self, node: str, args: Any, kwargs: Any, timeout: int, at: Any,
              meta: Any) -> tuple[asyncio.Future[Any], Callable[[bool], Any]]:
        """Send one copy of the call to `node`: (the future of its outcome,
        how to cancel it).  Over an uncongested connection the CALL leaves
        now and the future is the core's own (no task, no loop iteration
        before it is sent); in-process, or waiting for a congested or
        missing connection, it is a task.  Raises what prevents sending."""
        host, name, fun = self._host, self._service, self._fun
        conn = None if node == host.name else host._conns.get(node)
        if conn is not None and not conn.proto.writing_paused:
            proto, fut = host._send(conn, name, fun, args, kwargs, timeout, at, meta)
            sid, sent = proto.last_sid, core.monotonic()
            return fut, lambda lost: self._cancel(proto, sid, sent, lost)
        call = (host._call_here(name, fun, args, kwargs, timeout, at, meta) if node == host.name
                else host._call_node(node, name, fun, args, kwargs, timeout, at, meta))
        task = asyncio.get_running_loop().create_task(call)
        return task, lambda lost: task.cancel()

    def _cancel(self, proto: Any, sid: int, sent: float, lost: bool) -> None:
        # A CANCEL to the copy's node.  A copy that `lost` (the other
        # answered first) took at least this long: the balancer's latency
        # average of that node learns it (a cancelled call records nothing
        # otherwise, and p2c would go on ranking a stalling node by its
        # replies before the stall)
        if proto.cancel(sid) and lost:
            now = core.monotonic()
            proto.latency.at_least(self._service, now - sent, now)

    async def attempt(self, node: str, nodes: Iterator[str], args: Any, kwargs: Any,
                      timeout: int, at: Any, meta: Any) -> Any:
        """The reply of the call on `node`, or on the next node of `nodes`
        when `node` has not answered within hedge_after (see the module's
        docstring for which error is raised)."""
        started = core.monotonic()
        first, cancel = self._copy(node, args, kwargs, timeout, at, meta)
        copies = {first: (node, cancel)}
        won = False         # a copy's reply is the attempt's: the other lost
        try:
            if not first.done():
                await _within(first, started + self._after)
            if first.done():
                return first.result()
            other = self._host.hedge_to(self._service, nodes)
            if other is None:
                return await first
            try:
                # (the attempt's timeout bounds both copies: the second gets
                # what is left of it)
                left = max(1, timeout - int((core.monotonic() - started) * 1000))
                second = self._copy(other, args, kwargs, left, at, meta)
            except mexc.MallaError:
                return await first      # the hedge could not be sent: the first copy's
            copies[second[0]] = (other, second[1])
            self._host._stats.hedges += 1
            reply = await self._first_reply(copies)
            won = True
            return reply
        finally:
            for fut, (_, cancel) in copies.items():
                # the loser, or both when this call is cancelled: a future
                # cancelled by the caller's cancellation still needs its CANCEL
                if not fut.done() or fut.cancelled():
                    cancel(won)
                if fut.done():
                    _retrieve(fut)      # (no loop callback for what is known now)
                else:
                    fut.add_done_callback(_retrieve)

    async def _first_reply(self, copies: dict[asyncio.Future[Any], tuple[str, Any]]) -> Any:
        failure: BaseException | None = None
        pending = set(copies)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is None:
                    note_hedge(self._host._conns.get(copies[fut][0]))
                    return fut.result()
                failure = _worse(failure, exc)
        note_hedge(None)
        assert failure is not None
        raise failure
