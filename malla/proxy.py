"""Client side: transparent proxies of services, and lazy call objects.

`proxy.fun(*args, **kwargs)` checks the arguments against the announced
signature and returns a `Call`: nothing happens until it is awaited (then
remote() runs with default options) or run by `malla.call(obj, **opts)`.
A proxy reads the discovery table at each use, so it follows new versions
and outlives its service; a precompiled stub is the same object before
discovery.  No I/O here: calls go through the node's remote().
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla.arguments import Checker, checkers_of
from malla.authz import forbidding_checkers, without_refusals
from malla.caller import CALL_OPTIONS, invalid_options
from malla.precompile import load_precompile
from malla.streams import Stream, is_stream

if TYPE_CHECKING:
    from malla.interfaces import ProxyHost

__all__ = ["Call", "Proxy", "RemoteFunction", "call"]

# The signature of a function of a service never seen and not precompiled:
# its calls are not checked here, and wait through remote()'s retry rounds.
_UNCHECKED = inspect.Signature([
    inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
    inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def _arity_signature(arity: int) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_ONLY)
                              for i in range(arity)])


class Call:
    """A remote call not made yet: await it, or pass it to malla.call().

    It is also a coroutine (send/throw/close), so asyncio.create_task()
    and TaskGroup.create_task() take it as they take remote()'s."""

    __slots__ = ("_it", "_used", "args", "fun", "kwargs", "proxy")

    def __init__(self, proxy: Proxy, fun: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.proxy = proxy
        self.fun = fun
        self.args = args
        self.kwargs = kwargs
        self._used = False
        self._it: Generator[Any, None, Any] | None = None

    def __repr__(self) -> str:
        return f"<malla.Call {self.proxy._name}.{self.fun}{self.args!r}>"

    def __await__(self) -> Generator[Any, None, Any]:
        # straight into remote()'s coroutine: no frame of ours in between
        self._used = True
        proxy = self.proxy
        return proxy._node.remote(proxy._name, self.fun, self.args,
                                  self.kwargs or None).__await__()

    # The coroutine protocol, for a Task driving the call: the first send
    # starts remote(); the rest is remote()'s own coroutine.
    def send(self, value: Any) -> Any:
        if self._it is None:
            self._it = self.__await__()
        return self._it.send(value)

    def throw(self, *exc: Any) -> Any:
        if self._it is None:
            self._it = self.__await__()
        return self._it.throw(*exc)

    def close(self) -> None:
        self._used = True
        if self._it is not None:
            self._it.close()

    async def run(self, **opts: Any) -> Any:
        """Make the call through remote(), with remote()'s options."""
        self._used = True
        if opts and not CALL_OPTIONS.issuperset(opts):
            raise invalid_options({k: v for k, v in opts.items() if k not in CALL_OPTIONS},
                                  "malla.call()")
        return await self.proxy._call(self.fun, self.args, self.kwargs, opts)

    def __del__(self) -> None:
        if not self._used:
            warnings.warn(f"malla call {self.proxy._name}.{self.fun}(...) was never awaited",
                          RuntimeWarning, stacklevel=2)


Coroutine.register(Call)


async def call(obj: Call, **opts: Any) -> Any:
    """Run a lazy call object with remote()'s options (timeout, sna_retries,
    excp_retries, retries_sleep_msec, meta, deadline, hedge_after)."""
    if not isinstance(obj, Call):
        hint = " (a stream's options: malla.stream(obj, **opts))" if isinstance(obj, Stream) else ""
        raise mexc.InvalidOption(f"malla.call needs a proxy call object "
                                 f"(proxy.fun(...)), got {type(obj).__name__}{hint}")
    return await obj.run(**opts)


class RemoteFunction:
    """`proxy.fun`: callable, with the announced signature."""

    __slots__ = ("__name__", "__qualname__", "_proxy")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self._proxy = proxy
        self.__name__ = name
        self.__qualname__ = f"{proxy._name}.{name}"

    @property
    def __signature__(self) -> inspect.Signature:
        checker = self._proxy._checker(self.__name__)
        return _UNCHECKED if checker is None else checker.signature

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return f"Remote function {self.__qualname__}{self.__signature__} (returns an awaitable)"

    def __repr__(self) -> str:
        return f"<malla remote function {self.__qualname__}{self.__signature__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = self._proxy
        checker = proxy._checker(self.__name__)
        # (the common case in line: positional arguments within the range)
        if checker is not None and (kwargs or not checker.lo <= len(args) <= checker.hi):
            checker.check(args, kwargs)
        if checker is not None and proxy._is_stream(self.__name__):
            # a function announced as a stream: its items, as an async iterator
            return proxy._node.stream(proxy._name, self.__name__, args, kwargs or None)
        return Call(proxy, self.__name__, args, kwargs)


class Proxy:
    """A service as seen from a node: its functions are attributes.

    `node` is the node the proxy is bound to, or a callable returning it
    (the default node, looked up at each call).
    """

    _node_or_getter: ProxyHost | Callable[[], ProxyHost]
    _name: str
    _last: dict[str, Checker]
    _last_source: Any
    _funcs: dict[str, RemoteFunction]

    def __init__(self, node: ProxyHost | Callable[[], ProxyHost], name: str) -> None:
        object.__setattr__(self, "_node_or_getter", node)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_last", {})
        object.__setattr__(self, "_last_source", None)
        object.__setattr__(self, "_funcs", {})

    @property
    def _node(self) -> ProxyHost:
        target = self._node_or_getter
        return target() if callable(target) else target

    def __repr__(self) -> str:
        return f"<malla proxy of service {self._name}>"

    def _functions(self) -> dict[str, Checker] | None:
        """The announced functions (the last ones known when none runs now),
        or the precompiled arities before discovery; None when nothing is
        known of the service (calls are then unchecked)."""
        try:
            node: ProxyHost | None = self._node
        except mexc.ServiceNotAvailable:
            node = None
        info = node._registry.known_info(self._name) if node is not None else None
        if info is not None and node is not None:
            functions = info.get("functions", {})
            if functions is self._last_source:
                return self._last   # built once per announcement, not per call
            checkers = checkers_of(self._name, functions)
            if node._registry.info(self._name) is None:
                # no instance takes calls now (a restart, paused ones): its
                # rules may change with it, so the serving node decides
                return checkers
            return self._keep(functions, forbidding_checkers(self._name, checkers, info,
                                                             node.name))
        if self._last and self._last_source is not None:
            return without_refusals(self._last)
        stubs = node._precompiled if node is not None else load_precompile(None)
        arities = stubs.get(self._name)
        if arities is None:
            return None
        if arities is self._last_source:
            return self._last
        return self._keep(arities, {fun: Checker(f"{self._name}.{fun}", _arity_signature(n))
                                    for fun, n in arities.items()})

    def _keep(self, source: Any, checkers: dict[str, Checker]) -> dict[str, Checker]:
        # the checkers of the last announcement (or stubs) seen
        object.__setattr__(self, "_last", checkers)
        object.__setattr__(self, "_last_source", source)
        return checkers

    def _checker(self, fun: str) -> Checker | None:
        """The check of `fun`'s arguments; None when nothing is known of
        the service (unchecked calls); UnknownFunction when it has no `fun`."""
        functions = self._functions()
        if functions is None:
            return None
        checker = functions.get(fun)
        if checker is None:
            raise mexc.UnknownFunction(self._unknown(fun))
        return checker

    def _is_stream(self, fun: str) -> bool:
        """Whether `fun` is announced as a stream (an async generator)."""
        return is_stream(self._node._registry.known_info(self._name), fun)

    def _unknown(self, fun: str) -> str:
        known = ", ".join(sorted(self._functions() or ())) or "none"
        return f"service {self._name} has no function {fun!r} (its functions: {known})"

    def __getattr__(self, fun: str) -> RemoteFunction:
        if fun.startswith("_"):
            # (UnknownFunction is an AttributeError: Python's own lookups
            # of dunders see the error they expect)
            raise mexc.UnknownFunction(f"{fun!r} is not an exported function of {self._name}")
        functions = self._functions()
        if functions is not None and fun not in functions:
            raise mexc.UnknownFunction(self._unknown(fun))
        rf = self._funcs.get(fun)
        if rf is None:
            rf = self._funcs[fun] = RemoteFunction(self, fun)
        return rf

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a malla proxy is read-only")

    def __dir__(self) -> list[str]:
        return sorted(self._functions() or ())

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        lines = [f"Proxy of the malla service {self._name}. Functions:"]
        lines += [f"    {fun}{c.signature}"
                  for fun, c in sorted((self._functions() or {}).items())]
        return "\n".join(lines)

    async def _call(self, fun: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    opts: dict[str, Any]) -> Any:
        # a proxy call *is* remote(): with no node serving the service yet it
        # waits through the retry rounds, as any call
        return await self._node.remote(self._name, fun, args, kwargs or None, **opts)


class Services:
    """`node.services`: attribute access gives proxies of known services."""

    def __init__(self, node: ProxyHost) -> None:
        self._node = node

    def __getattr__(self, name: str) -> Proxy:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._node._knows(name):
            raise AttributeError(f"no service {name!r} has been discovered or precompiled "
                                 f"on node {self._node.name}")
        proxy: Proxy = self._node.service(name)
        return proxy

    def __dir__(self) -> list[str]:
        return sorted(set(self._node.get_services()) | set(self._node._precompiled))
