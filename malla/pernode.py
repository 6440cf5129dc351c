"""State kept per (service, node) by the routing policy.

The balancer's load, ejection's records: each is a small object per service
and node, read on every call.  Nested dicts (service -> node -> state) cost
two look-ups and no key to build, where a (service, node) tuple would be
allocated per call; and the nodes of one service can be dropped at once
(malla.ejection's prune).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerNode"]

T = TypeVar("T")


class PerNode(Generic[T]):
    """service -> node -> T, made on first use by `make`."""

    __slots__ = ("_make", "by_service")

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self.by_service: dict[str, dict[str, T]] = {}

    def slot(self, service: str, node: str) -> T:
        """The state of (service, node), made if new."""
        nodes = self.by_service.get(service)
        if nodes is None:
            nodes = self.by_service[service] = {}
        state = nodes.get(node)
        if state is None:
            state = nodes[node] = self._make()
        return state

    def find(self, service: str, node: str) -> T | None:
        nodes = self.by_service.get(service)
        return None if nodes is None else nodes.get(node)
