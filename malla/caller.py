"""The caller side: remote() with failover, retries, timeouts and deadlines;
local(); call_cb_all().  A `Caller` is composed by the node.

A call's path: the balancer seam (`order`: the p2c balancer or the
discovery table's order) gives the ordered node list, or, for a keyed or
versioned call or a service with trouble lately, malla.routing does (the
key's ranking, ejected nodes last); the local node runs it in-process
(same hook, timeout and error semantics), a remote node through its
connection's core, which sends the CALL and resolves the future.  Failover
and retries are decided here (the retry budget asked through malla.routing)
and nowhere else.  Metrics and tracing are not
here: they wrap the node's remote() as interceptors (malla.interfaces).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from malla import exceptions as mexc
from malla.budget import RetryBudget, jittered
from malla.codec import bad_value_path
from malla.context import enter, inherited_deadline, leave
from malla.hedging import Hedge
from malla.registry import service_name
from malla.routing import Routing, check_key, check_vsn
from malla.service import KIND_STREAM, KIND_SYNC, RunningService, settle
from malla.stream_serve import stream_mismatch

if TYPE_CHECKING:
    from malla.interfaces import CallHosting, CallPeers, NodeOrder
    from malla.metrics import Stats
    from malla.registry import Registry

__all__ = ["CALL_OPTIONS", "Attempt", "Caller", "invalid_options", "service_name"]

ServiceNotAvailable = mexc.ServiceNotAvailable
_RETRYABLE = (mexc.RemoteError, mexc.CallTimeout, mexc.ConnectionLost)

if sys.version_info >= (3, 11):
    _timeout_ctx = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    _timeout_ctx = None


class Attempt(Protocol):
    """What makes each attempt of remote()'s round loop instead of the
    plain call: a hedge (malla.hedging), a stream's opener (malla.streams)."""

    async def attempt(self, node: str, nodes: Iterator[str], args: Any,
                      kwargs: dict[str, Any] | None, timeout: int, at: float | None,
                      meta: Any) -> Any: ...


class Caller:
    """remote(), local() and call_cb_all() of one node.

    It reads the discovery table (`registry`), the services hosted here
    (`hosting.entries`), the cluster's admitted connections
    (`peers.connected`) and counts into `stats`; `order` is the balancer
    seam (default: the registry's order), `budget` the retry budget (with
    the keyed and versioned orders and ejection: malla.routing),
    `carrier(conn)` the trace context to send with an attempt on a
    connection (tracing on), `here(name)` names this node on the call's
    span when an attempt runs in-process (tracing on), `spawn` runs an
    in-process cast as one of the node's tasks.
    """

    def __init__(self, name: str, registry: Registry, hosting: CallHosting, peers: CallPeers,
                 stats: Stats, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
                 *, order: NodeOrder | None = None,
                 carrier: Callable[[Any], Any] | None = None,
                 here: Callable[[str], None] | None = None,
                 budget: RetryBudget | None = None) -> None:
        self.name = name
        self._registry = registry
        self._order: NodeOrder = registry.nodes if order is None else order
        self.routing = Routing(registry, RetryBudget() if budget is None else budget)
        self._watch = self.routing.watch      # (read on every call)
        self._hosting = hosting
        self._peers = peers
        # (the hot path's dicts, held directly: one lookup per call)
        self._entries = hosting.entries
        self._conns = peers.connected
        self._stats = stats
        self._spawn = spawn
        self._carrier = carrier
        self._here = here
        # where a hedge toward a service goes, if the retry budget lets it
        self.hedge_to: Callable[[str, Iterator[str]], str | None] = self.routing.hedge_to
        self.hedge_checked: dict[tuple[str, str], int] = {}

    async def remote(self, service: Any, fun: str, args: Any = (),
                     kwargs: dict[str, Any] | None = None, *, timeout: int = 15000,
                     sna_retries: int = 5, excp_retries: int = 0,
                     retries_sleep_msec: int = 1000, meta: Any = None,
                     deadline: float | None = None, hedge_after: float | None = None,
                     _attempt: Attempt | None = None, **options: Any) -> Any:
        """Call `fun` of `service` on the first node that runs it (DESIGN.md "Calls").

        Fails over to the next node on "service not available"; when the list
        is exhausted, sleeps `retries_sleep_msec` (±10 %) and starts again, up
        to `sna_retries` more rounds.  Exceptions (RemoteError, CallTimeout,
        ConnectionLost) are retried `excp_retries` times.  Retries draw from
        the node's retry budget.  `timeout` (ms) bounds each attempt,
        `deadline` (ms) the whole call; `timeout=0` sends a cast and returns
        None, whatever the deadline.  `key=` (str, bytes or int) ranks the
        nodes by rendezvous hashing; `vsn=` (an fnmatch pattern) uses only
        the instances whose announced vsn matches.  `hedge_after` (ms,
        functions marked @malla.idempotent only) also sends the call to the
        next node when no reply came in time (malla.hedging).  `_attempt`
        (malla.streams' opener; not an option of malla.call or proxies)
        makes each attempt instead of the plain call: a stream's opening
        runs this same round loop.
        """
        name = service if type(service) is str else service_name(service)
        # (key= and vsn= come in **options, which is there anyway: the
        # common call pays one look-up for all of routing, and nothing after)
        order = self.order_of(name, options) if options or name in self._watch else self._order
        if type(timeout) is not int or not 0 <= timeout <= _MAX_MS:
            timeout = valid_timeout(timeout)      # (the common int in line)
        if type(fun) is not str or fun[:1] == "_":
            raise mexc.UnknownFunction(f"{fun!r} is not an exported function of {name}")
        if type(args) is not list and type(args) is not tuple:
            args = _as_args(args)
        at = inherited_deadline()
        if deadline is not None:
            at = _sooner(at, deadline)
        if hedge_after is not None:
            _attempt = Hedge(name, fun, hedge_after, timeout, self)
        # The one round loop of a call, and of a stream's opening
        # (malla.streams passes its opener as `_attempt`): failover, retry
        # rounds, the budget, jitter, ejection and retry_after_ms skips.
        # (in this coroutine, not one of its own: a frame per call less)
        try:
            sna_round = exc_round = 0
            # the error of an earlier attempt that was sent and may have run
            last: BaseException | None = None
            conns, checks, carrier = self._conns, self._registry.checks_table, self._carrier
            while True:
                tried = overloaded = 0
                hint: int | None = None     # the soonest retry_after_ms of the round
                for node in (nodes := iter(order(name))):
                    tried += 1
                    try:
                        if _attempt is not None:
                            return await _attempt.attempt(node, nodes, args, kwargs, timeout, at,
                                                          meta)
                        if node == self.name:
                            if self._here is not None:
                                self._here(node)
                            return await self._call_here(name, fun, args, kwargs, timeout, at,
                                                         meta)
                        if at is None and carrier is None:
                            # the common call: to the frame in one C call
                            # (None: not the common case, the full path below)
                            conn = conns.get(node)
                            if conn is not None:
                                proto = conn.proto
                                try:
                                    fut = proto.try_call(checks, node, name, fun, args, kwargs,
                                                         timeout, meta)
                                except mexc.EncodeError as exc:
                                    raise _encode_error(exc, args, kwargs) from None
                                if fut is not None:
                                    sid = proto.last_sid
                                    try:
                                        return await fut
                                    except asyncio.CancelledError:
                                        proto.cancel(sid)
                                        raise
                        return await self._call_node(node, name, fun, args, kwargs, timeout, at,
                                                     meta)
                    except ServiceNotAvailable as exc:
                        self._stats.failovers += 1
                        if isinstance(exc, mexc.Overloaded):
                            overloaded += 1
                            hint = mexc.sooner(hint, exc.retry_after_ms)
                            self.routing.failed(name, node, exc, order)
                        continue
                    except _RETRYABLE as exc:
                        self.routing.failed(name, node, exc, order)
                        if last is not None and isinstance(exc, mexc.CallTimeout):
                            exc.sent = True
                        if exc_round >= excp_retries or not self.routing.may_retry(name):
                            raise
                        if not (isinstance(exc, mexc.CallTimeout) and not exc.sent):
                            last = exc
                        exc_round += 1
                        break
                else:
                    if not self._peers.running:
                        # (checked here, off the common path: no node took it)
                        raise mexc.NodeStopped(f"node {self.name} is not running")
                    serving = self.routing.serving(name, order)
                    # (a round where no node serves it, waiting for one to
                    # appear, is not a retry the budget pays for)
                    if sna_round >= sna_retries or (serving and not self.routing.may_retry(name)):
                        raise _exhausted(name, tried, overloaded, sna_round, last,
                                         self.routing.vsn_of(order), len(serving), hint)
                    sna_round += 1
                # (jittered: callers that lost a service do not come back in lockstep)
                wait = jittered(retries_sleep_msec)
                if not tried:
                    # every node within its retry_after_ms: not before the first has room
                    # (+1 ms: the loop's timers are of millisecond grain; a sleep
                    # woken a fraction early finds every node still within its hint)
                    soonest = self.routing.soonest_ms(name, order)
                    if soonest is not None:
                        wait = max(wait, soonest + 1.0)
                self._stats.retries += 1
                await _retry_sleep(wait, at, name, last is not None)
        except mexc.MallaError as exc:
            # every error raised to the caller, counted by its class (a
            # handler's own errors arrive as RemoteError)
            self._stats.error(exc)
            raise

    def order_of(self, name: str, options: dict[str, Any]) -> NodeOrder:
        """The node order of a call given its routing options (key=, vsn=,
        checked: InvalidOption): malla.routing's for a keyed or versioned
        call or a service with trouble lately, else the balancer's as is."""
        if options or name in self._watch:
            return self.routing.ordered(name, self._order, *_route_options(options))
        return self._order

    async def _call_node(self, node: str, name: str, fun: str, args: Any,
                         kwargs: dict[str, Any] | None, timeout: int, at: float | None,
                         meta: Any, failover: bool = True) -> Any:
        conn = self._conns.get(node)
        if conn is None or conn.proto.writing_paused:
            conn, timeout = await self.connection(node, name, timeout, at, failover)
        proto, fut = self._send(conn, name, fun, args, kwargs, timeout, at, meta)
        if fut is None:
            return None
        sid = proto.last_sid
        try:
            return await fut
        except asyncio.CancelledError:
            proto.cancel(sid)
            raise

    async def connection(self, node: str, name: str, timeout: int, at: float | None,
                         failover: bool = True) -> tuple[Any, int]:
        """The connection an attempt on `node` goes out on, ready to write,
        and what is left of the attempt's `timeout` (ms) once it is."""
        conn = self._conns.get(node)
        if conn is None:     # (dialled now with mesh="on_demand", else not available)
            started = time.monotonic()
            if at is not None and at <= started:
                # a failover past the deadline stops here: the next dial would
                # cost a turn of the event loop even with no time left (seconds
                # under load), and a large service has many nodes left
                raise mexc.CallTimeout(f"deadline passed before calling {name} on {node}",
                                       sent=False)
            conn = await self._peers.open(node, timeout, at)
            if timeout:
                # the dial is part of the attempt: it waits within its timeout
                timeout = max(1, timeout - int((time.monotonic() - started) * 1000))
        if conn.proto.writing_paused:
            await self._wait_congested(conn, name, timeout, at, failover)
        return conn, timeout

    def _send(self, conn: Any, name: str, fun: str, args: Any, kwargs: dict[str, Any] | None,
              timeout: int, at: float | None, meta: Any, window: int = 0) -> tuple[Any, Any]:
        """Send one attempt on a connection: (its protocol, the future of the
        reply), or (protocol, None) for a cast; with a `window`, open a
        stream of that window: (protocol, its core StreamIn).  Raises what
        prevents sending."""
        checks = self._registry.checks(name, conn.name)
        if checks is not None:
            check = checks.get(fun)      # (the common case in line: one lookup)
            if check is None or kwargs or not check.lo <= len(args) <= check.hi:
                check_arguments(checks, name, fun, args, kwargs)
        proto = conn.proto
        budget = None
        if at is not None:
            timeout, budget = _within_deadline(at, timeout, name, fun)
        # (tracing on: the trace context for this peer, or None)
        trace = self._carrier(conn) if self._carrier is not None else None
        try:
            if window:
                return proto, proto.open_stream(name, fun, args, kwargs, timeout, budget, meta,
                                                trace, window)
            if timeout == 0:
                proto.cast(name, fun, args, kwargs, meta, trace)
                return proto, None
            return proto, proto.call(name, fun, args, kwargs, timeout, budget, meta, trace)
        except mexc.EncodeError as exc:
            raise _encode_error(exc, args, kwargs) from None

    async def _wait_congested(self, conn: Any, name: str, timeout: int,
                              at: float | None, failover: bool) -> None:
        # Flow control: the connection's write buffer is past its high-water
        # mark.  Fail over when another node can take the call; otherwise
        # (or in call_cb_all, where a slot is one node) wait for it to
        # drain, within the call's time.
        if failover and len(self._registry.nodes(name)) > 1:
            raise ServiceNotAvailable(f"connection to {conn.name} is congested")
        limit = (timeout or 15000) / 1000.0
        if at is not None:
            limit = min(limit, max(at - time.monotonic(), 0.0))
        await conn.wait_writable(limit)

    async def _call_here(self, name: str, fun: str, args: Any, kwargs: dict[str, Any] | None,
                         timeout: int, at: float | None, meta: Any) -> Any:
        # The serving side's one rule set (the core's, malla/core/dispatch.pyx),
        # exactly as for a call from the network: running, exported, the
        # arguments, a place under max_concurrency
        entry = self._entries.get(name)
        if entry is None:
            raise ServiceNotAvailable(f"service {name} is not running here")
        why = entry.refusal(fun, args, kwargs, None, self.name)
        if why is not None:
            raise mexc.refused(why)
        if entry.kinds[fun] == KIND_STREAM:     # (as the serving side says over the network)
            raise _as_remote_error(mexc.InvalidOption(stream_mismatch(name, fun, 3, False)))
        if at is not None:
            timeout = _within_deadline(at, timeout, name, fun)[0]
        self._stats.local_calls += 1
        if timeout == 0:
            # a cast: scheduled, never run before remote() returns, and its
            # deadline only bounded the sending (as over the network); it
            # counts toward max_concurrency from now until its task ends,
            # even one cancelled before it started
            entry.running += 1
            task = self._spawn(self._cast_here(entry, fun, args, kwargs, meta))
            task.add_done_callback(lambda _task: _one_less(entry))
            return None
        entry.running += 1
        # the handler (and what it calls) sees this call and its deadline, as remotely
        token = enter(self.name, name, fun, meta, timeout, at, True, False)
        try:
            if entry.fast and entry.kinds[fun] == KIND_SYNC:
                # the default hook on a plain def: call it, as the core does
                return entry.funcs[fun](*args, **kwargs) if kwargs else entry.funcs[fun](*args)
            opts = {"caller": self.name, "timeout": timeout, "meta": meta}
            result = entry.invoke(fun, list(args), kwargs or {}, opts)
            if inspect.isawaitable(result):
                result = await _run_with_timeout(result, timeout)
            return result
        except _Expired:
            raise mexc.CallTimeout(f"{name}.{fun} did not finish within {timeout} ms") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # whatever the handler raised, a malla error of its own nested
            # calls included: RemoteError, exactly as over the network (never
            # mistaken for "this node could not take the call")
            raise _as_remote_error(exc) from exc
        finally:
            entry.running -= 1
            leave(token)

    async def _cast_here(self, entry: RunningService, fun: str, args: Any,
                         kwargs: dict[str, Any] | None, meta: Any) -> None:
        # (entry.running was counted when the cast was scheduled)
        try:
            # (its own task: the context it was spawned in is a copy)
            enter(self.name, entry.name, fun, meta, 0, None, True, True)
            opts = {"caller": self.name, "timeout": 0, "meta": meta}
            await settle(entry.invoke(fun, list(args), kwargs or {}, opts))
        except Exception as exc:   # (a message, as a TCP cast's: no traceback built)
            self._hosting.cast_failed(entry.name, fun, "RemoteError",
                                      f"{mexc.type_name(exc)}: {exc}")

    async def local(self, service: Any, fun: str, args: Any = (),
                    kwargs: dict[str, Any] | None = None) -> Any:
        """Call `fun` on this node only, through service_cb_in.

        Uses the running instance; when none runs, a class argument gets a
        fresh instance, a name raises ServiceNotAvailable.  Exceptions of the
        function are raised as they are (it is a local call).
        """
        name = service_name(service)
        if type(fun) is not str:
            raise mexc.UnknownFunction(f"{fun!r} is not an exported function of {name}")
        if type(args) is not list and type(args) is not tuple:
            args = _as_args(args)
        entry = self._entries.get(name)
        if entry is None:
            if not isinstance(service, type):
                raise ServiceNotAvailable(f"service {name} is not running on this node")
            entry = RunningService(service(), report=self._hosting.forbidden)
        # (allow= applies to this node too, before the arguments, as the
        # serving side's rule set orders them)
        denied = entry.denial(fun, self.name)
        if denied is not None:
            raise mexc.Forbidden(denied)
        check_arguments(entry.checks, name, fun, args, kwargs)
        # the function sees a call from this node, within the budget it inherits
        token = enter(self.name, name, fun, None, None, inherited_deadline(), True, False)
        try:
            result = entry.invoke(fun, list(args), kwargs or {},
                                  {"caller": self.name, "timeout": None, "meta": None})
            if inspect.isawaitable(result):
                result = await settle(result)
            return result
        finally:
            leave(token)

    def _call_parts(self, service: Any, args: Any, timeout: Any) -> tuple[str, Any, int]:
        """The service's name, the arguments as a list or tuple and the
        checked timeout of a call about to go out (call_node, call_cb_all;
        remote() does the same in line); NodeStopped when this node is not
        running."""
        if not self._peers.running:
            raise mexc.NodeStopped(f"node {self.name} is not running")
        timeout, name = valid_timeout(timeout), service_name(service)
        if type(args) is not list and type(args) is not tuple:
            args = _as_args(args)
        return name, args, timeout

    async def call_node(self, node: str, service: Any, fun: str, args: Any = (),
                        kwargs: dict[str, Any] | None = None, *, timeout: int = 15000) -> Any:
        """One attempt on `node` and no other (a probe's call: `malla ping`,
        `malla top`): no failover, no retries, never a cast (timeout > 0);
        an inherited deadline applies.  ServiceNotAvailable when this node
        has no connection to it.  Not seen by the metrics and tracing
        interceptors (they wrap remote() and call_cb_all()); errors are
        counted in stats() as any call's."""
        name, args, timeout = self._call_parts(service, args, timeout)
        if timeout == 0:
            raise mexc.InvalidOption("call_node() waits for an answer: timeout must be above 0")
        if type(fun) is not str or fun[:1] == "_":
            raise mexc.UnknownFunction(f"{fun!r} is not an exported function of {name}")
        at = inherited_deadline()
        try:
            if node == self.name:
                return await self._call_here(name, fun, args, kwargs, timeout, at, None)
            return await self._call_node(node, name, fun, args, kwargs, timeout, at, None,
                                         failover=False)
        except mexc.MallaError as exc:
            self._stats.error(exc)
            raise

    async def call_cb_all(self, service: Any, fun: str, args: Any = (),
                          kwargs: dict[str, Any] | None = None, *, timeout: int = 15000,
                          meta: Any = None, deadline: float | None = None,
                          **unknown: Any) -> list[Any]:
        """Call every node of get_nodes(service) once, concurrently.

        One result per node, in that order; a failure sits in its slot as
        the exception instance.  No failover: each slot is that node, so the
        retry options of remote() do not apply (InvalidOption).
        """
        if unknown:
            raise invalid_options(unknown, "call_cb_all() (timeout, meta and deadline apply; "
                                           "no failover or retries: each slot is one node)")
        name, args, timeout = self._call_parts(service, args, timeout)
        at = inherited_deadline()
        if deadline is not None:
            at = _sooner(at, deadline)
        # Every CALL is sent before anything is awaited (one write per
        # connection, no task per node); the replies' futures are gathered.
        loop = asyncio.get_running_loop()
        waits: list[Any] = []
        sent: list[tuple[Any, int]] = []
        for node in self._registry.nodes(name):
            conn = None if node == self.name else self._conns.get(node)
            if conn is None or conn.proto.writing_paused:
                call = (self._call_here(name, fun, args, kwargs, timeout, at, meta)
                        if node == self.name else
                        self._call_node(node, name, fun, args, kwargs, timeout, at, meta,
                                        failover=False))
                waits.append(loop.create_task(call))
                continue
            try:
                proto, fut = self._send(conn, name, fun, args, kwargs, timeout, at, meta)
            except mexc.MallaError as exc:
                fut = loop.create_future()
                fut.set_exception(exc)
            else:
                if fut is None:
                    fut = loop.create_future()
                    fut.set_result(None)
                else:
                    sent.append((proto, proto.last_sid))
            waits.append(fut)
        try:
            return list(await asyncio.gather(*waits, return_exceptions=True))
        except asyncio.CancelledError:
            for proto, sid in sent:
                proto.cancel(sid)
            raise


# remote()'s routing options (taken through its **options)
_ROUTE_OPTIONS = frozenset({"key", "vsn"})
# remote()'s options, by name: what malla.call and proxies may pass on
CALL_OPTIONS = frozenset(inspect.signature(Caller.remote).parameters) - {
    "self", "service", "fun", "args", "kwargs", "options", "_attempt"} | _ROUTE_OPTIONS


def _route_options(options: dict[str, Any]) -> tuple[Any, str | None]:
    """remote()'s key= and vsn=, checked; InvalidOption for any other name."""
    if not _ROUTE_OPTIONS.issuperset(options):
        raise invalid_options({k: v for k, v in options.items() if k not in _ROUTE_OPTIONS},
                              "remote()")
    key, vsn = options.get("key"), options.get("vsn")
    if key is not None:
        check_key(key)
    if vsn is not None:
        check_vsn(vsn)
    return key, vsn


# A budget in ms beyond this travels as no number a peer takes (docs/protocol.md:
# within +-1e19); a day is far more than any call should need.
_MAX_MS = 86_400_000 * 365


def valid_timeout(timeout: Any) -> int:
    """`timeout` (ms) as an int >= 0 (0: a cast), or InvalidOption."""
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 <= timeout <= _MAX_MS):
        raise mexc.InvalidOption(f"timeout is milliseconds, 0 (a cast) to {_MAX_MS}, "
                                 f"not {timeout!r}")
    return int(timeout) if timeout == 0 or timeout >= 1 else 1


def _sooner(inherited: float | None, deadline: Any) -> float:
    """The absolute deadline of a call given `deadline` (ms) within the one it
    inherited, if that is sooner."""
    mine = time.monotonic() + valid_deadline(deadline) / 1000.0
    return mine if inherited is None or mine < inherited else inherited


def valid_deadline(deadline: Any) -> float:
    """`deadline` (ms) as a positive finite number, or InvalidOption."""
    if (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
            or not 0 < deadline <= _MAX_MS):
        raise mexc.InvalidOption(f"deadline is milliseconds, above 0 and at most {_MAX_MS}, "
                                 f"not {deadline!r}")
    return deadline


def invalid_options(unknown: dict[str, Any], where: str) -> mexc.InvalidOption:
    names = ", ".join(sorted(map(str, unknown)))
    return mexc.InvalidOption(f"{where} takes no option {names}")


def _one_less(entry: RunningService) -> None:
    entry.running -= 1


def check_arguments(checks: dict[str, Any], name: str, fun: str, args: Any,
                    kwargs: dict[str, Any] | None) -> None:
    """UnknownFunction or BadArguments for a call the serving side would
    refuse, by the functions and signatures it announced (`checks`)."""
    check = checks.get(fun)
    if check is None:
        raise mexc.UnknownFunction(f"service {name} exports no function {fun!r}")
    if kwargs or not check.lo <= len(args) <= check.hi:
        check.check(args, kwargs)


def _within_deadline(at: float, timeout: int, name: str, fun: str) -> tuple[int, int]:
    """An attempt's (timeout, budget) in ms under the deadline `at`; a cast
    (timeout 0) stays a cast: the deadline only bounded the wait to send it.
    CallTimeout (nothing sent) when the deadline has passed."""
    left = (at - time.monotonic()) * 1000.0
    if left <= 0:
        raise mexc.CallTimeout(f"deadline passed before calling {name}.{fun}", sent=False)
    if timeout and left < timeout:
        timeout = int(left) or 1
    return timeout, int(left) or 1


def _as_args(args: Any) -> tuple[Any, ...]:
    """Positional arguments given as another iterable (a generator, say)."""
    if isinstance(args, (str, bytes, bytearray, dict)) or not hasattr(args, "__iter__"):
        raise mexc.BadArguments(f"args must be a list or a tuple, not {type(args).__name__}")
    return tuple(args)


def _exhausted(name: str, tried: int, overloaded: int, sna_round: int,
               last: BaseException | None, vsn: str | None, serving: int,
               hint: int | None) -> BaseException:
    """The error of a call whose rounds are over (or refused by the budget);
    `hint` the soonest retry_after_ms of the last round's refusals."""
    why = (f"{tried} node(s) refused" if tried else
           f"{serving} node(s) within their retry_after_ms" if serving else
           "no node runs it" if vsn is None else f"no instance's vsn matches {vsn!r}")
    message = f"service {name} is not available ({why}, {sna_round + 1} round(s))"
    # every node refused as overloaded, or asked to wait (retry_after_ms):
    # say so (still a ServiceNotAvailable)
    err = (mexc.Overloaded(message, hint) if (tried and overloaded == tried) or
           (serving and not tried) else ServiceNotAvailable(message))
    if last is not None:
        # an earlier attempt may have run: its error says so (a refusal
        # since must not read "did not run"), caused by the exhaustion
        last.__cause__ = err
        return last
    return err


async def _retry_sleep(msec: float, at: float | None, name: str, maybe_ran: bool) -> None:
    delay = msec / 1000.0
    if at is not None:
        left = at - time.monotonic()
        if left <= delay:
            await asyncio.sleep(max(left, 0.0))
            raise mexc.CallTimeout(f"deadline passed while retrying {name}", sent=maybe_ran)
    await asyncio.sleep(delay)


class _Expired(Exception):
    """An in-process call's own timeout passed (told apart from a
    TimeoutError the handler raised itself)."""


async def _run_with_timeout(awaitable: Any, timeout: int) -> Any:
    """Await an in-process call's result within `timeout` ms.

    A coroutine that finishes without suspending (a cache hit, a pure
    computation) needs no timer at all: its first step runs here, and only
    one that suspends continues under a timeout.
    """
    if type(awaitable) is types.CoroutineType:
        try:
            pending = awaitable.send(None)
        except StopIteration as stop:
            if inspect.isawaitable(stop.value):
                return await _with_timeout(settle(stop.value), timeout)
            return stop.value
        awaitable = _resume(awaitable, pending)
    return await _with_timeout(settle(awaitable), timeout)


@types.coroutine
def _resume(coro: Any, pending: Any) -> Any:
    """Go on with `coro`, which has yielded `pending`, as if awaited all along:
    values and exceptions (cancellation) the task sends are passed on."""
    while True:
        try:
            value = yield pending
        except BaseException as exc:
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _with_timeout(awaitable: Any, timeout: int) -> Any:
    if _timeout_ctx is not None:
        scope = _timeout_ctx(timeout / 1000.0)
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if scope.expired():
                raise _Expired() from None
            raise       # the handler's own TimeoutError
    try:
        return await asyncio.wait_for(awaitable, timeout / 1000.0)
    except asyncio.TimeoutError:   # (Python 3.10: not the builtin TimeoutError)
        raise _Expired() from None


def _as_remote_error(exc: BaseException) -> mexc.RemoteError:
    return mexc.remote_error(*mexc.remote_fields(exc))


def _encode_error(exc: mexc.EncodeError, args: Any,
                  kwargs: dict[str, Any] | None) -> mexc.EncodeError:
    path = bad_value_path(list(args), "args")
    if path is None and kwargs:
        path = bad_value_path(kwargs, "kwargs")
    return mexc.EncodeError(str(exc), path or "")
