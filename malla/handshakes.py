"""The bound on unauthenticated load: at most `max_pending_handshakes`
accepted connections in their handshake at once (DESIGN.md "Identity and
authorization").

A connection is pending from accept until its handshake succeeds or it
closes, whichever comes first; past the limit a new one is refused -- the
acceptor (malla.acceptor) closes it before reading a byte, or making
anything for it -- and counted.  Dialled connections
are never asked: a node's own dials are bounded by its peers, not by
strangers.  Each pending connection holds its buffers for up to
handshake_timeout, so the limit bounds what strangers can make a node hold.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from malla.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from malla.guard import HandshakeThrottle

__all__ = ["PendingHandshakes", "handshake_counts"]

log = logging.getLogger("malla.handshakes")


class PendingHandshakes:
    def __init__(self, limit: int, node: str) -> None:
        self.limit = limit
        self.refused = 0
        self._node = node
        # a set, not a count: ending a connection twice (its handshake done,
        # then its close) cannot push the count below the truth.  Of keys
        # the acceptor draws at accept, before a connection object exists
        self._pending: set[int] = set()
        # (one count for the node's life: a key outlives a restart's acceptor)
        self._keys = itertools.count()
        # a flood of connections must not flood the log too
        self._log = RateLimitedLog(log)

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, address: str) -> int | None:
        """Count an accepted connection as pending: the key to end it with;
        None -- refuse it -- when `limit` are pending already."""
        if len(self._pending) >= self.limit:
            self.refused += 1
            self._log.warning("malla: %s refused a connection from %s: %d connections are "
                              "awaiting their handshake (max_pending_handshakes)",
                              self._node, address, len(self._pending))
            return None
        key = next(self._keys)
        self._pending.add(key)
        return key

    def warn(self, msg: str, *args: object) -> None:
        """Log a stranger's failed handshake, rate-limited: a flood of bad
        handshakes must not write a line each (10 per 10 s, then a count)."""
        self._log.warning(msg, *args)

    def end(self, key: int | None) -> None:
        """Its handshake succeeded, or it closed (either may come twice; None,
        a dialled connection's, was never pending)."""
        if key is not None:
            self._pending.discard(key)

    def counts(self) -> dict[str, int]:
        """The keys node.stats() shows (docs/operations.md)."""
        return {"handshakes_pending": len(self._pending), "handshakes_refused": self.refused}


def handshake_counts(pending: PendingHandshakes, throttle: HandshakeThrottle) -> dict[str, int]:
    """How strangers' connections are doing and ended: node.stats()'s keys
    (docs/operations.md)."""
    return {**pending.counts(), **throttle.counts()}
