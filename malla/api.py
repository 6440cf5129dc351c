"""The module-level API: one default node per process.

`await malla.start(name, **node_options)` makes it; `malla.remote`,
`malla.local`, `malla.call_cb_all`, `malla.get_nodes`, `malla.get_instances`,
`malla.get_services`, `malla.wait_for_services` and `malla.services` use it.
"""

from __future__ import annotations

from typing import Any

from malla import exceptions as mexc
from malla.node import Node
from malla.precompile import load_precompile
from malla.proxy import Proxy
from malla.streams import Stream

__all__ = [
    "call_cb_all",
    "default_node",
    "get_instances",
    "get_nodes",
    "get_services",
    "local",
    "remote",
    "start",
    "stop",
    "stream",
    "wait_for_services",
]

_default: Node | None = None
_stubs: dict[str, Proxy] = {}


def default_node() -> Node:
    """The node malla.start() made; ServiceNotAvailable when there is none."""
    if _default is None:
        raise mexc.ServiceNotAvailable("no default node: call `await malla.start(name)` first")
    return _default


async def start(name: str, **node_options: Any) -> Node:
    """Start the default node (listening, joining its seeds) and return it."""
    global _default
    if _default is not None:
        raise RuntimeError(f"the default node {_default.name} is already running")
    node = Node(name, **node_options)
    await node.start()
    _default = node
    return node


async def stop() -> None:
    """Stop the default node (nothing to do when there is none)."""
    global _default
    node, _default = _default, None
    if node is not None:
        await node.stop()


def default_proxy(name: str) -> Proxy | None:
    """The proxy `malla.services.<name>` resolves to, or None if unknown."""
    proxy = _stubs.get(name)
    if proxy is not None:
        return proxy
    known = name in load_precompile(None)
    if _default is not None:
        known = known or _default._knows(name)
    if not known:
        return None
    proxy = _stubs[name] = Proxy(default_node, name)
    return proxy


def known_services() -> list[str]:
    names = set(load_precompile(None))
    if _default is not None:
        names |= set(_default.get_services()) | set(_default._precompiled)
    return sorted(names)


async def remote(service: Any, fun: str, args: Any = (), kwargs: dict[str, Any] | None = None,
                 **opts: Any) -> Any:
    return await default_node().remote(service, fun, args, kwargs, **opts)


async def local(service: Any, fun: str, args: Any = (),
                kwargs: dict[str, Any] | None = None) -> Any:
    return await default_node().local(service, fun, args, kwargs)


def stream(service: Any, fun: str | None = None, args: Any = (),
           kwargs: dict[str, Any] | None = None, **opts: Any) -> Stream:
    """node.stream() of the default node: the items of a stream function.

    Given a proxy's stream (``malla.stream(Feed.ticks(10), key="k")``, as
    malla.call takes a proxy's call object), that stream with these
    options, on the node its proxy is bound to."""
    if isinstance(service, Stream):
        if fun is not None or args != () or kwargs is not None:
            raise mexc.InvalidOption("malla.stream(a proxy's stream, **options) takes options "
                                     "only: its function and arguments are the proxy call's")
        return service.options(**opts)
    if fun is None:
        raise mexc.InvalidOption("malla.stream() needs a function name, or a proxy's stream")
    return default_node().stream(service, fun, args, kwargs, **opts)


async def call_cb_all(service: Any, fun: str, args: Any = (),
                      kwargs: dict[str, Any] | None = None, **opts: Any) -> list[Any]:
    return await default_node().call_cb_all(service, fun, args, kwargs, **opts)


def get_nodes(service: Any) -> list[str]:
    return default_node().get_nodes(service)


def get_instances(service: Any) -> list[tuple[str, dict[str, Any]]]:
    return default_node().get_instances(service)


def get_services() -> dict[str, list[str]]:
    return default_node().get_services()


async def wait_for_services(services: list[Any], retries: int = 10) -> bool:
    return await default_node().wait_for_services(services, retries)
