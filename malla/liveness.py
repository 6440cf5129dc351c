"""Liveness behind one interface: "last heard from peer P at t".

Every channel that hears from a peer feeds `heard()`: today the core's
receive path (via the heartbeat loop) and the UDP heartbeat thread
(malla.heartbeat), so that a blocked event loop is not mistaken for a dead
node.
Times are time.monotonic() seconds.
"""

from __future__ import annotations

import time

__all__ = ["Liveness"]


class Liveness:
    def __init__(self) -> None:
        self._heard: dict[str, float] = {}

    def heard(self, peer: str, at: float | None = None) -> None:
        """Record that something arrived from `peer` at `at` (default: now)."""
        t = time.monotonic() if at is None else at
        if t > self._heard.get(peer, 0.0):
            self._heard[peer] = t

    def last_heard(self, peer: str) -> float | None:
        return self._heard.get(peer)

    def silent_for(self, peer: str, now: float | None = None) -> float:
        """Seconds since `peer` was last heard from (inf if never)."""
        t = self._heard.get(peer)
        if t is None:
            return float("inf")
        return (time.monotonic() if now is None else now) - t

    def forget(self, peer: str) -> None:
        self._heard.pop(peer, None)
