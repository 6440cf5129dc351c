"""Server side: the Service base class, its export rules, and the dispatcher
the core hands calls to when it cannot run them itself.

Exported functions are the public functions defined on subclasses of
Service (never on Service itself): no attributes, no dunders, no private
names, no hooks even when overridden.  The export table is built once per
class; the network reaches nothing else.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from malla import exceptions as mexc
from malla._ext import core
from malla.arguments import checkers_of
from malla.authz import Policy, Rules, rules_of, valid_patterns
from malla.context import enter_served
from malla.idempotent import FUNCTION_META, idempotent_of
from malla.stream_serve import serve_stream
from malla.tracing import Tracing

__all__ = ["DEFAULT_MAX_CONCURRENCY", "Service", "blocking"]

# Calls running at once per service and node, unless the class says otherwise.
DEFAULT_MAX_CONCURRENCY = 10_000

# (KIND_STREAM: an async generator function, a streaming call)
KIND_SYNC, KIND_ASYNC, KIND_BLOCKING, KIND_STREAM = 0, 1, 2, 3

F = TypeVar("F", bound=Callable[..., Any])


def blocking(fn: F) -> F:
    """Mark a service function to run in the node's thread pool, not on its loop."""
    fn._malla_blocking = True  # type: ignore[attr-defined]
    return fn


class Service:
    """Base class of malla services.

    Class keywords: ``name`` (default the class name), ``vsn`` (default "0"),
    ``global_`` (announce to the cluster; default False),
    ``max_concurrency`` (calls running at once on this node; beyond it a call
    gets Overloaded) and ``allow`` (a pattern or a list of patterns of the
    caller node names that may call its functions; default everyone;
    ``@malla.allow`` on a function replaces it for that function).
    """

    _malla_name: ClassVar[str] = "Service"
    _malla_vsn: ClassVar[str] = "0"
    _malla_global: ClassVar[bool] = False
    _malla_max_concurrency: ClassVar[int] = DEFAULT_MAX_CONCURRENCY
    _malla_exports: ClassVar[dict[str, int]] = {}
    _malla_allow: ClassVar[tuple[str, ...] | None] = None
    # function -> its allow patterns, for those not open to everyone
    _malla_rules: ClassVar[Rules] = {}
    # the exported functions marked @malla.idempotent (hedged calls may run them twice)
    _malla_idempotent: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, *, name: str | None = None, vsn: str | None = None,
                          global_: bool | None = None, max_concurrency: int | None = None,
                          allow: str | list[str] | tuple[str, ...] | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._malla_name = name if name is not None else cls.__name__
        if vsn is not None:
            cls._malla_vsn = str(vsn)
        if global_ is not None:
            cls._malla_global = bool(global_)
        if max_concurrency is not None:
            if max_concurrency < 1:
                raise ValueError("max_concurrency must be at least 1")
            cls._malla_max_concurrency = int(max_concurrency)
        if allow is not None:
            cls._malla_allow = valid_patterns(allow, f"{cls.__name__}(allow=...)")
        cls._malla_exports = _exports_of(cls)
        cls._malla_rules = rules_of(cls, cls._malla_allow, list(cls._malla_exports))
        cls._malla_idempotent = idempotent_of(cls, cls._malla_exports)

    def service_cb_in(self, fun: str, args: list[Any], kwargs: dict[str, Any],
                      opts: dict[str, Any]) -> Any:
        """The hook every call passes through; the default invokes the function.

        An override may be ``def`` or ``async def``; its result is awaited if
        awaitable.  ``opts`` holds ``caller``, ``timeout`` (ms) and ``meta``.
        """
        return invoke_function(self, fun, args, kwargs)


def _exports_of(cls: type) -> dict[str, int]:
    """name -> kind of every exported function of a Service subclass."""
    hidden = set(vars(Service)) | set(dir(object))
    exports: dict[str, int] = {}
    for klass in reversed(cls.__mro__):
        if klass is Service or not issubclass(klass, Service):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_") or attr in hidden:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if not inspect.isfunction(value):
                exports.pop(attr, None)  # overridden by a non-function
                continue
            exports[attr] = _kind_of(value)
    return exports


def _kind_of(fn: Callable[..., Any]) -> int:
    if getattr(fn, "_malla_blocking", False):
        return KIND_BLOCKING
    if inspect.isasyncgenfunction(fn):
        return KIND_STREAM
    if inspect.iscoroutinefunction(fn):
        return KIND_ASYNC
    return KIND_SYNC


def invoke_function(service: Service, fun: str, args: list[Any] | tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    """Run an exported function: its value, or an awaitable of it."""
    kind = type(service)._malla_exports.get(fun)
    if kind is None:
        raise mexc.UnknownFunction(
            f"service {type(service)._malla_name} exports no function {fun!r}")
    fn = getattr(service, fun)
    if kind == KIND_BLOCKING:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return loop.run_in_executor(None, functools.partial(ctx.run, fn, *args, **kwargs))
    return fn(*args, **kwargs)


async def settle(result: Any) -> Any:
    """Await `result` while it is awaitable (an async hook may return the
    awaitable of the function it calls)."""
    while inspect.isawaitable(result):
        result = await result
    return result


def signature_of(fn: Callable[..., Any]) -> list[list[Any]]:
    """The announced signature: [name, kind, has_default] per parameter."""
    params = list(inspect.signature(fn).parameters.values())
    return [[p.name, int(p.kind), p.default is not inspect.Parameter.empty] for p in params]


def describe(service: Service, paused: bool = False) -> dict[str, Any]:
    """The metadata a node announces for a running service."""
    cls = type(service)
    info: dict[str, Any] = {
        "vsn": cls._malla_vsn,
        "global": cls._malla_global,
        "paused": paused,
        "functions": {name: signature_of(getattr(service, name))
                      for name in cls._malla_exports},
        "max_concurrency": cls._malla_max_concurrency,
    }
    streams = [name for name, kind in cls._malla_exports.items() if kind == KIND_STREAM]
    if streams:
        info["streams"] = streams       # called with node.stream() (docs/protocol.md)
    if cls._malla_rules:
        # only the functions not open to everyone (docs/protocol.md)
        info["allow"] = {fun: list(patterns) for fun, patterns in cls._malla_rules.items()}
    if cls._malla_idempotent:
        info[FUNCTION_META] = {fun: {"idempotent": True} for fun in sorted(cls._malla_idempotent)}
    return info


def _hook_overridden(cls: type[Service]) -> bool:
    return cls.service_cb_in is not Service.service_cb_in


class RunningService(core.ServiceEntry):
    """A started service: the table the core dispatches through, and the
    slow path for what the core does not run itself (hooks, coroutines,
    blocking functions, the concurrency limit)."""

    def __init__(self, instance: Service, tracing: Tracing | None = None,
                 report: Callable[[str, str, str | None], None] | None = None) -> None:
        cls = type(instance)
        funcs = {name: getattr(instance, name) for name in cls._malla_exports}
        # the core runs plain functions itself only when nothing else must
        # happen around them (no hook, no server span)
        fast = not _hook_overridden(cls) and tracing is None
        # the argument check of each function, for every path (the core's
        # inline one, dispatch, in-process and local calls)
        checks = checkers_of(cls._malla_name, {n: signature_of(f) for n, f in funcs.items()})
        # (no allow= rule: no policy, and the core checks nothing per call;
        # `report` hears of each refusal)
        policy = Policy(cls._malla_rules, report) if cls._malla_rules else None
        super().__init__(cls._malla_name, funcs, dict(cls._malla_exports), fast,
                         cls._malla_max_concurrency, checks, policy)
        self.instance = instance
        self.hooked = _hook_overridden(cls)
        self.tracing = tracing

    def invoke(self, fun: str, args: list[Any], kwargs: dict[str, Any],
               opts: dict[str, Any]) -> Any:
        """The call through service_cb_in: a value or an awaitable."""
        if self.hooked:
            return self.instance.service_cb_in(fun, args, kwargs, opts)
        return invoke_function(self.instance, fun, args, kwargs)

    def dispatch(self, proto: Any, call: core.IncomingCall) -> asyncio.Task[Any] | None:
        """Run `call` as a task (the core has admitted it: its rule set ran)."""
        opts = {"caller": proto.peer_name, "timeout": call.timeout, "meta": call.meta}
        if call.window or self.kinds[call.fun] == KIND_STREAM:
            return serve_stream(self, proto, call, opts)
        run = self._run(proto, call.sid, call.fun, call.args, call.kwargs or {}, opts,
                        call.deadline, call.cast)
        if self.tracing is not None and call.trace is not None:
            # a SERVER span for calls that come with a trace context
            run = self._run_traced(run, call.fun, call.trace, proto.transport)
        return asyncio.get_running_loop().create_task(run)

    async def _run_traced(self, run: Any, fun: str, trace: Any, transport: Any) -> None:
        assert self.tracing is not None
        with self.tracing.server_span(self.name, fun, trace, transport):
            await run

    async def _run(self, proto: Any, sid: int, fun: str, args: list[Any],
                   kwargs: dict[str, Any], opts: dict[str, Any], deadline: float | None,
                   cast: bool) -> None:
        self.running += 1
        enter_served(opts["caller"], self.name, fun, opts["meta"], opts["timeout"], deadline, cast)
        try:
            started = core.monotonic()
            result = self.invoke(fun, args, kwargs, opts)
            core.warn_if_blocked(self.name, fun, started)
            if inspect.isawaitable(result):
                result = await settle(result)
        except asyncio.CancelledError:
            proto.task_done(sid)
            raise
        except Exception as exc:
            if self.tracing is not None:
                # (the error goes to the caller, not up to the span's `with`)
                self.tracing.handler_raised(exc)
            if cast:
                proto.cast_failed(self.name, fun, "RemoteError", f"{mexc.type_name(exc)}: {exc}")
            elif proto.task_done(sid):
                proto.reply_exception(sid, exc)
        else:
            if proto.task_done(sid) and not cast:
                proto.reply(sid, result)
        finally:
            self.running -= 1
            # (the recent mean handler time: Overloaded's retry_after_ms)
            self.handled(core.monotonic() - started)
