"""Load-aware node choice: the policy behind `Node(balance="p2c")`.

A shuffled list is fair while every node is healthy and bad the moment one
is not: a node that is alive but slow still takes 1/N of the calls, so the
cluster's tail is that node's tail.  Power of two choices (Mitzenmacher)
picks two remote nodes at random for each call and sends it to the cheaper:
almost as good as asking every node, with two look-ups instead of n, and
random enough that many callers do not all stampede onto the same "best"
node (the herd effect of always-pick-the-least-loaded).

Cost of a node for a service: ``max(latency, 1 µs) x (in_flight + 1)``
(Finagle's "peak EWMA" cost): the calls this node already has from us, each
expected to take about its recent latency.  As DESIGN.md says, in-flight is
the node's (our calls to it for any service: they share its connection and
its CPU) and the latency the service's on that node (services differ by
orders of magnitude).  The 1 µs floor keeps in-flight deciding where
nothing is measured yet.

The latency average, per (service, node), in seconds:

- read at time t: ``a x 2^(-(t - t_a) / half_life)``, where ``a`` is the
  node's average as last updated at ``t_a``: an idle node's average halves
  every `half_life` (10 s).  The nodes that take calls are re-measured all
  the time and barely decay; a node that was slow, and is therefore never
  chosen, soon looks as cheap as they do (20x slower: after about 45 s),
  is tried once more, and is re-measured: an idle slow node is re-probed
  about once a minute, at the cost of one slow call.
- a sample x (one call's time) at t: with v the value read at t,
  ``a = x`` when x > v (peak: a node that turns slow is avoided from its
  first slow reply), else ``a = v + 0.25 (x - v)`` (a recovery is believed
  over a few replies, not one).
- a failed attempt (ConnectionLost, CallTimeout, Overloaded: malla.outcome)
  counts as ``max(x, 2v)``: a node that fails fast must never look fast.
  IGNORED attempts are not samples.
- a node with no sample yet reads as the service's mean (``m <- m + 0.25
  (x - m)`` over all its samples): neither favoured nor avoided.  Reading it
  as 0 would send it every call until its first reply came back; before
  any sample at all, everything reads 0 and in-flight alone decides.

Ranking for a call (`ranked`): the local node first when it is among the
candidates (an in-process call costs no network); then the better of a
random pair of the remote ones; then, only if the caller asks (failover),
the remaining remote nodes by cost, cheapest first (ties keep the
candidates' order).  `"shuffle"` returns the candidates unchanged.

Hot path: the first node costs one clock read, two cost look-ups and one
random pair (plus an O(n) copy of the candidates to take the local one
out); the rest is computed lazily, so a call that succeeds first time
never sorts.  The caller drives the counts: `started` before sending,
`finished` when the attempt ends (a reply, an error, a cancellation).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

from malla import exceptions as mexc
from malla.outcome import FAILED, IGNORED
from malla.pernode import PerNode

__all__ = ["BALANCE_MODES", "Balancer"]

BALANCE_MODES = ("p2c", "shuffle")

# seconds: below a microsecond a latency is noise, and a zero would erase
# in-flight from the cost
_FLOOR = 1e-6
# weight of a sample that does not raise the average (and of every sample in
# the service's mean): a recovery shows over a few calls
_ALPHA = 0.25


class _Latency:
    """One (service, node): its latency average."""

    __slots__ = ("at", "avg", "sampled")

    def __init__(self) -> None:
        self.avg = 0.0
        self.at = 0.0
        self.sampled = False


class Balancer:
    """Calls in flight per node, latency per (service, node), and the p2c
    ranking built on them.

    `clock` (seconds, default time.monotonic) and `rng` (default a private
    random.Random) are injected so the policy can be driven exactly.
    """

    def __init__(self, mode: str = "p2c", *, half_life: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if mode not in BALANCE_MODES:
            raise mexc.InvalidOption(
                f"balance must be one of {', '.join(map(repr, BALANCE_MODES))}, not {mode!r}")
        if not (isinstance(half_life, (int, float)) and not isinstance(half_life, bool)
                and half_life > 0):
            raise mexc.InvalidOption(f"half_life must be a positive number, not {half_life!r}")
        self.mode = mode
        self._shuffle = mode == "shuffle"
        # 2^(-t/h) as exp(-t x ln2/h)
        self._rate = math.log(2.0) / float(half_life)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # service -> node -> latency; service -> the mean of its samples;
        # node -> our calls in flight to it
        self._loads: PerNode[_Latency] = PerNode(_Latency)
        self._means: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}

    # -- the caller's hooks ------------------------------------------------

    def started(self, service: str, node: str) -> None:
        """An attempt was sent to `node` for `service`."""
        in_flight = self._in_flight
        in_flight[node] = in_flight.get(node, 0) + 1

    def finished(self, service: str, node: str, seconds: float, outcome: int) -> None:
        """The attempt `started` announced ended after `seconds` (malla.outcome)."""
        left = self._in_flight.get(node, 0) - 1
        if left > 0:
            self._in_flight[node] = left
        else:
            self._in_flight.pop(node, None)
        if outcome == IGNORED:
            return
        load = self._loads.slot(service, node)
        now = self._clock()
        seconds = max(float(seconds), 0.0)
        v = self._read(service, load, now)
        if outcome == FAILED:
            seconds = max(seconds, 2.0 * v)
        load.avg = seconds if seconds > v else v + _ALPHA * (seconds - v)
        load.at = now
        load.sampled = True
        mean = self._means.get(service)
        self._means[service] = seconds if mean is None else mean + _ALPHA * (seconds - mean)

    def forget(self, node: str) -> None:
        """Drop what is known of a node that left (its name may come back new)."""
        self._loads.forget(node)
        self._in_flight.pop(node, None)

    # -- reading -----------------------------------------------------------

    def in_flight(self, node: str) -> int:
        """Our calls in flight to `node`, for any service."""
        return self._in_flight.get(node, 0)

    def latency(self, service: str, node: str) -> float:
        """The node's latency average for the service now, in seconds."""
        load = self._loads.find(service, node)
        if load is None:
            return self._means.get(service, 0.0)
        return self._read(service, load, self._clock())

    def cost(self, service: str, node: str) -> float:
        return self._cost(service, self._loads.by_service.get(service, {}), node, self._clock())

    def rank(self, service: str, candidates: Sequence[str], local_name: str) -> list[str]:
        """Every candidate, in the order a call tries them (see `ranked`)."""
        return list(self.ranked(service, candidates, local_name))

    def ranked(self, service: str, candidates: Sequence[str],
               local_name: str) -> Iterator[str]:
        """The candidates in call order, lazily: the local node (if a
        candidate), the better of a random remote pair, then on demand the
        other remote nodes cheapest first.  "shuffle": `candidates` as given."""
        if self._shuffle:
            yield from candidates
            return
        remote = list(candidates)
        if local_name in remote:
            remote.remove(local_name)
            yield local_name
        n = len(remote)
        if n <= 1:
            yield from remote
            return
        loads = self._loads.by_service.get(service, {})
        now = self._clock()
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        j += j >= i
        ci = self._cost(service, loads, remote[i], now)
        cj = self._cost(service, loads, remote[j], now)
        best, other, c_other = (i, j, cj) if ci <= cj else (j, i, ci)
        yield remote[best]
        # failover: the rest by cost (the pair's loser's cost is known)
        rest = [(c_other if k == other else self._cost(service, loads, node, now), k)
                for k, node in enumerate(remote) if k != best]
        rest.sort()
        for _, k in rest:
            yield remote[k]

    # -- internals -----------------------------------------------------------

    def _read(self, service: str, load: _Latency, now: float) -> float:
        if not load.sampled:
            return self._means.get(service, 0.0)
        idle = now - load.at
        if idle <= 0.0:
            return load.avg
        return load.avg * math.exp(-idle * self._rate)

    def _cost(self, service: str, loads: dict[str, _Latency], node: str, now: float) -> float:
        load = loads.get(node)
        latency = (self._means.get(service, 0.0) if load is None
                   else self._read(service, load, now))
        return max(latency, _FLOOR) * (self._in_flight.get(node, 0) + 1)
