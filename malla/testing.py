"""Testing your own services: a cluster of real malla nodes on loopback.

``cluster(n)`` is an async context manager (no pytest needed): ``n`` nodes on
127.0.0.1, each on a free port, with a random cookie, meshed (it returns when
every node sees every other one), all stopped when the block ends, even when
it raises.  ``blocking_cluster(n)`` is the same with `BlockingNode` s, for
synchronous code.  For pytest, add ``pytest_plugins = ["malla.testing"]`` to
your ``conftest.py``: the ``malla_cluster`` fixture then makes blocking
clusters in a test and stops them after it (docs/testing.md).  It is not
registered as a plugin on its own, so installing malla changes no one's test
run, and this module imports pytest only when pytest is already running.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

from malla import exceptions as mexc
from malla.facade import BlockingNode
from malla.node import Node
from malla.registry import service_name

__all__ = ["BlockingCluster", "Cluster", "blocking_cluster", "cluster"]

N = TypeVar("N", Node, BlockingNode)

# How long a cluster may take to mesh, or a service to be seen by every node.
SETTLE_S = 10.0
_POLL_S = 0.01


def _names(n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"node{i}" for i in range(n)]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"names must be {n} distinct node names")
    return list(names)


def _options(cookie: str | None, options: dict[str, Any]) -> dict[str, Any]:
    opts = {"host": "127.0.0.1", "port": 0, **options}
    opts["cookie"] = cookie if cookie is not None else secrets.token_hex(16)
    return opts


def _seed(node: Node | BlockingNode) -> str:
    return f"127.0.0.1:{node.address[1]}"


class _Nodes(Generic[N]):
    """The nodes of a test cluster, by index or by name."""

    def __init__(self, nodes: list[N]) -> None:
        self.nodes: list[N] = nodes

    def __getitem__(self, key: int | str) -> N:
        if isinstance(key, int):
            return self.nodes[key]
        for node in self.nodes:
            if node.name == key:
                return node
        raise KeyError(key)

    def __iter__(self) -> Iterator[N]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def _chosen(self, on: int | str | Sequence[int | str] | None) -> list[N]:
        if on is None:
            return list(self.nodes)
        if isinstance(on, (int, str)):
            return [self[on]]
        return [self[key] for key in on]

    def _meshed(self) -> bool:
        return all(set(n.peers()) >= {m.name for m in self.nodes if m is not n}
                   for n in self.nodes)

    def _serving(self, name: str, hosts: list[N]) -> bool:
        wanted = {h.name for h in hosts}
        return all(set(n.get_nodes(name)) >= wanted for n in self.nodes)


class Cluster(_Nodes[Node]):
    """Nodes on the running loop (from `cluster()`)."""

    async def start_service(self, service: Any,
                            on: int | str | Sequence[int | str] | None = None) -> None:
        """Start `service` (a class: an instance per node, or an instance)
        on the nodes `on` (indexes or names; None: all) and wait until every
        node of the cluster sees it there (a global service) or until it runs
        (a local one)."""
        hosts = self._chosen(on)
        for node in hosts:
            await node.start_service(service() if isinstance(service, type) else service)
        if getattr(service, "_malla_global", False):
            await _settle(lambda: self._serving(service_name(service), hosts),
                          f"service {service_name(service)} seen by every node")

    async def stop(self) -> None:
        """Stop every node (each one, even when another fails to stop)."""
        errors = []
        for node in self.nodes:
            try:
                await node.stop()
            except Exception as exc:  # (the rest still stop; the first is raised)
                errors.append(exc)
        if errors:
            raise errors[0]


async def _settle(done: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + SETTLE_S
    while not done():
        if time.monotonic() > end:
            raise mexc.Unreachable(f"test cluster: no {what} within {SETTLE_S} s")
        await asyncio.sleep(_POLL_S)


@asynccontextmanager
async def cluster(n: int = 2, *, names: Sequence[str] | None = None, cookie: str | None = None,
                  **node_options: Any) -> AsyncIterator[Cluster]:
    """`n` meshed nodes on loopback, stopped when the block ends.

    `names` default to node0, node1...; `cookie` to a random one;
    `node_options` go to every `Node` (seeds: the first node's address).
    """
    opts = _options(cookie, node_options)
    made = Cluster([])
    try:
        for name in _names(n, names):
            seeds = [_seed(made.nodes[0])] if made.nodes else []
            node = Node(name, **{"seeds": seeds, **opts})
            made.nodes.append(node)
            await node.start()
        await _settle(made._meshed, "full mesh")
        yield made
    finally:
        await made.stop()


class BlockingCluster(_Nodes[BlockingNode]):
    """`BlockingNode` s, each on its own loop thread (from `blocking_cluster()`)."""

    def start_service(self, service: Any,
                      on: int | str | Sequence[int | str] | None = None) -> None:
        """As `Cluster.start_service`, blocking."""
        hosts = self._chosen(on)
        for node in hosts:
            node.start_service(service() if isinstance(service, type) else service)
        if getattr(service, "_malla_global", False):
            _settle_blocking(lambda: self._serving(service_name(service), hosts),
                             f"service {service_name(service)} seen by every node")

    def stop(self) -> None:
        """Close every node (each one, even when another fails to close)."""
        errors = []
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # (the rest still close; the first is raised)
                errors.append(exc)
        if errors:
            raise errors[0]


def _settle_blocking(done: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + SETTLE_S
    while not done():
        if time.monotonic() > end:
            raise mexc.Unreachable(f"test cluster: no {what} within {SETTLE_S} s")
        time.sleep(_POLL_S)


@contextmanager
def blocking_cluster(n: int = 2, *, names: Sequence[str] | None = None,
                     cookie: str | None = None, **node_options: Any) -> Iterator[BlockingCluster]:
    """As `cluster()`, with `BlockingNode` s, for synchronous code."""
    opts = _options(cookie, node_options)
    made = BlockingCluster([])
    try:
        for name in _names(n, names):
            seeds = [_seed(made.nodes[0])] if made.nodes else []
            made.nodes.append(BlockingNode(name, **{"seeds": seeds, **opts}))
        _settle_blocking(made._meshed, "full mesh")
        yield made
    finally:
        made.stop()


if "pytest" in sys.modules:
    # loaded by pytest (pytest_plugins = ["malla.testing"]): the fixture
    import pytest

    @pytest.fixture
    def malla_cluster() -> Iterator[Callable[..., BlockingCluster]]:
        """A factory: ``malla_cluster(n=2, **options)`` starts a
        `blocking_cluster` (same arguments); all are stopped after the test,
        whether it passed or failed."""
        with ExitStack() as clusters:
            def make(n: int = 2, **options: Any) -> BlockingCluster:
                return clusters.enter_context(blocking_cluster(n, **options))
            yield make
