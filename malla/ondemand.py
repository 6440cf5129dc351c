"""Connections on demand (`Node(mesh="on_demand")`): a call that finds no
connection to the node it picked dials it, within the call's own time, and a
connection without calls for `idle_close` seconds is closed.

Closing an idle connection does not forget its peer's services: with
on-demand connections, membership and service tables come from the
discovery source (malla.discovery), which `mesh="on_demand"` requires.  The
closing side says GOODBYE "idle" first, so that the other side does not take
the close for a break (which would drop the peer's services at once).
Heartbeats and liveness run on the open connections only (malla.cluster).
DESIGN.md, "Scaling past the full mesh".
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc

if TYPE_CHECKING:
    from malla.cluster import Cluster

__all__ = ["OnDemand"]

# the wait for a cast's connection (timeout=0 has no time of its own): the
# default call timeout, ms
CAST_WAIT = 15000


class OnDemand:
    """The dials that calls make, and the closing of idle connections."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.idle_close = cluster.config.idle_close
        cluster.opener = self.open      # (the caller's seam: Cluster.open)

    async def open(self, node: str, timeout: int, at: float | None) -> Any:
        """The connection to `node`, dialled now (one dial shared by every
        call waiting on it) and waited for within `timeout` ms and the
        deadline `at`; ServiceNotAvailable when it cannot be reached in that
        time (nothing was sent: the call fails over).  A dial that outlives
        the call goes on, for the next call."""
        cluster = self.cluster
        conn = cluster.connected.get(node)
        if conn is not None:
            return conn
        peer = cluster.peer(node)
        dial = None if peer is None else cluster.dial_peer(peer, once=True)
        if dial is None:
            raise mexc.ServiceNotAvailable(f"no connection to {node}, and no address to dial")
        limit = (timeout or CAST_WAIT) / 1000.0
        if at is not None:
            limit = min(limit, at - time.monotonic())
        # (asyncio.wait: the dial goes on past the call's time, and a
        # cancelled call is never lost, as wait_for may lose it before 3.12)
        done, _ = await asyncio.wait((dial,), timeout=max(limit, 0.0))
        if not done:
            raise mexc.ServiceNotAvailable(
                f"{node} not reached within {max(limit, 0.0) * 1000:.0f} ms")
        conn = cluster.connected.get(node)
        if conn is None:
            raise mexc.ServiceNotAvailable(f"could not reach {node}")
        return conn

    async def idle_loop(self) -> None:
        """Close the connections that carried no call for idle_close s
        (calls in and out counted, streams and calls in flight included;
        heartbeats are not calls)."""
        period = min(self.idle_close / 4, 1.0)
        # connection -> (its call count, since when it has not changed)
        seen: dict[Any, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            current: dict[Any, tuple[int, float]] = {}
            for conn in list(self.cluster.connected.values()):
                proto = conn.proto
                count = proto.calls_in + proto.calls_out
                last = seen.get(conn)
                # (a stream open either way is not idle, however long
                # between its items)
                if (last is None or last[0] != count or proto.in_flight or proto.running
                        or len(proto.streams)):
                    current[conn] = (count, now)
                elif now - last[1] >= self.idle_close:
                    self.cluster.release(conn, tell=True)
                else:
                    current[conn] = last
            seen = current
