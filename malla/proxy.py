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
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla.precompile import load_precompile

if TYPE_CHECKING:
    from malla.node import Node

__all__ = ["Call", "Proxy", "RemoteFunction", "call", "signature_from_wire"]

_NO_DEFAULT = inspect.Parameter.empty


class _Default:
    """Stands for a remote parameter's default, which is not sent."""

    def __repr__(self) -> str:
        return "..."


REMOTE_DEFAULT = _Default()


def signature_from_wire(params: list[list[Any]]) -> inspect.Signature:
    """An inspect.Signature from announced [name, kind, has_default] triples."""
    return inspect.Signature([
        inspect.Parameter(str(name), inspect._ParameterKind(int(kind)),
                          default=REMOTE_DEFAULT if has_default else _NO_DEFAULT)
        for name, kind, has_default in params])


def _arity_signature(arity: int) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_ONLY)
                              for i in range(arity)])


class Call:
    """A remote call not made yet: await it, or pass it to malla.call()."""

    __slots__ = ("_used", "args", "fun", "kwargs", "proxy")

    def __init__(self, proxy: Proxy, fun: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.proxy = proxy
        self.fun = fun
        self.args = args
        self.kwargs = kwargs
        self._used = False

    def __repr__(self) -> str:
        return f"<malla.Call {self.proxy._name}.{self.fun}{self.args!r}>"

    def __await__(self) -> Generator[Any, None, Any]:
        return self.run().__await__()

    async def run(self, **opts: Any) -> Any:
        """Make the call through remote(), with remote()'s options."""
        self._used = True
        return await self.proxy._call(self.fun, self.args, self.kwargs, opts)

    def __del__(self) -> None:
        if not self._used:
            warnings.warn(f"malla call {self.proxy._name}.{self.fun}(...) was never awaited",
                          RuntimeWarning, stacklevel=2)


async def call(obj: Call, **opts: Any) -> Any:
    """Run a lazy call object with remote()'s options (timeout, sna_retries,
    excp_retries, retries_sleep_msec, meta, deadline)."""
    if not isinstance(obj, Call):
        raise TypeError(f"malla.call needs a proxy call object, got {type(obj).__name__}")
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
        return self._proxy._signature(self.__name__)

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return f"Remote function {self.__qualname__}{self.__signature__} (returns an awaitable)"

    def __repr__(self) -> str:
        return f"<malla remote function {self.__qualname__}{self.__signature__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Call:
        self._proxy._signature(self.__name__).bind(*args, **kwargs)
        return Call(self._proxy, self.__name__, args, kwargs)


class Proxy:
    """A service as seen from a node: its functions are attributes.

    `node` is the node the proxy is bound to, or a callable returning it
    (the default node, looked up at each call).
    """

    _node_or_getter: Node | Callable[[], Node]
    _name: str
    _last: dict[str, inspect.Signature]
    _last_source: Any
    _funcs: dict[str, RemoteFunction]

    def __init__(self, node: Node | Callable[[], Node], name: str) -> None:
        object.__setattr__(self, "_node_or_getter", node)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_last", {})
        object.__setattr__(self, "_last_source", None)
        object.__setattr__(self, "_funcs", {})

    @property
    def _node(self) -> Node:
        target = self._node_or_getter
        return target() if callable(target) else target

    def __repr__(self) -> str:
        return f"<malla proxy of service {self._name}>"

    def _functions(self) -> dict[str, inspect.Signature]:
        """The announced functions (the last ones known when none runs now),
        or the precompiled arities before discovery."""
        try:
            node: Node | None = self._node
        except mexc.ServiceNotAvailable:
            node = None
        info = node._registry.info(self._name) if node is not None else None
        if info is not None:
            functions = info.get("functions", {})
            if functions is self._last_source:
                return self._last   # built once per announcement, not per call
            sigs = {name: signature_from_wire(params) for name, params in functions.items()}
            object.__setattr__(self, "_last", sigs)
            object.__setattr__(self, "_last_source", functions)
            return sigs
        if self._last:
            return self._last
        stubs = node._precompiled if node is not None else load_precompile(None)
        return {fun: _arity_signature(n) for fun, n in stubs.get(self._name, {}).items()}

    def _signature(self, fun: str) -> inspect.Signature:
        sig = self._functions().get(fun)
        if sig is None:
            raise AttributeError(self._unknown(fun))
        return sig

    def _unknown(self, fun: str) -> str:
        known = ", ".join(sorted(self._functions())) or "none known yet"
        return f"service {self._name} has no function {fun!r} (its functions: {known})"

    def __getattr__(self, fun: str) -> RemoteFunction:
        if fun.startswith("_"):
            raise AttributeError(fun)
        if fun not in self._functions():
            raise AttributeError(self._unknown(fun))
        rf = self._funcs.get(fun)
        if rf is None:
            rf = self._funcs[fun] = RemoteFunction(self, fun)
        return rf

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a malla proxy is read-only")

    def __dir__(self) -> list[str]:
        return sorted(self._functions())

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        lines = [f"Proxy of the malla service {self._name}. Functions:"]
        lines += [f"    {fun}{sig}" for fun, sig in sorted(self._functions().items())]
        return "\n".join(lines)

    async def _call(self, fun: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    opts: dict[str, Any]) -> Any:
        node = self._node
        if not node._registry.nodes(self._name):
            raise mexc.ServiceNotAvailable(f"service {self._name} is not available "
                                           "(no node runs it now)")
        return await node.remote(self._name, fun, args, kwargs or None, **opts)


class Services:
    """`node.services`: attribute access gives proxies of known services."""

    def __init__(self, node: Node) -> None:
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
