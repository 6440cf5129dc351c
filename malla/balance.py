"""Load-aware node choice: `Node(balance="p2c")`, the default (DESIGN.md
"Routing and resilience").

A shuffled list is fair while every node is healthy and bad the moment one
is not: a node that is alive but slow still takes 1/N of the calls, so the
cluster's tail is that node's tail.  Power of two choices (Mitzenmacher)
picks two remote nodes at random for each call and sends it to the cheaper:
almost as good as asking every node, with two look-ups instead of n, and
random enough that many callers do not all stampede onto the same "best"
node (the herd effect of always-pick-the-least-loaded).

A node's cost for a service is what the core learns from this node's own
calls over the connection (malla/core/latency.pyx, where the formulas are):
``max(latency, 1 us) x (calls in flight to it + 1)``, the latency a
time-decaying peak average for that service on that node, in-flight the
node's (our calls to it for any service share its connection and CPU).

The order of one call: the local node first when it runs the service (an
in-process call costs no network: the registry puts it first); then the
better of a random pair of the remote ones; then, only when the call fails
over, the other remote nodes cheapest first.  A node not connected (yet)
costs more than any connected one in the full mesh (it cannot take the
call); with connections on demand it can, after a dial, so it costs twice
the service's mean: a fresh node wins over a connected one with a call in
flight, an open connection wins a tie.  With connections on demand and more
than 4 remote nodes, the pair is drawn from the caller's window of the
service (4 nodes picked by a salted rendezvous hash: stable, spread over the
callers); when its winner has calls waiting, it meets one node drawn from
all of them, which takes the call only when it is cheaper: an idle window
keeps the calls (no dial per call), a busy one spreads them beyond it (the
core's P2COrder says how).
`"shuffle"` keeps the registry's order (Malla's: shuffled once per check
cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from malla._ext import core

__all__ = ["BALANCE_MODES", "check_mode", "p2c_order"]

BALANCE_MODES = ("p2c", "shuffle")


def check_mode(mode: Any) -> str | None:
    """Why `mode` is not a balance setting, or None."""
    if mode in BALANCE_MODES and type(mode) is str:
        return None
    return f"balance is one of {', '.join(map(repr, BALANCE_MODES))}, not {mode!r}"


def p2c_order(nodes: Callable[[str], Sequence[str]], conns: dict[str, Any],
              local: str, dial: bool = False) -> Callable[[str], Iterable[str]]:
    """The caller's node order for `balance="p2c"` (the core's P2COrder:
    one C call per call, the rest ranked only when the call fails over);
    `dial`: calls open connections on demand."""
    order: Callable[[str], Iterable[str]] = core.P2COrder(nodes, conns, local, dial=dial)
    return order
