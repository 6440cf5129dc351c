"""What a caller decides beyond the balancer: keyed and versioned node
orders, outlier ejection with `retry_after_ms` skips, and the retry budget
(DESIGN.md "Routing and resilience"), wired from the sans-IO policies
(malla.rendezvous, malla.ejection, malla.budget) into `Caller.remote`.

The common call (no key, no vsn, a service with no trouble lately) must
cost what it cost before any of this existed, so the policies learn from
failures, and from everything else only while a service is *watched*:

- a service becomes watched at its first failed attempt (malla.outcome:
  ConnectionLost, a sent CallTimeout, Overloaded) or its first retry, and
  stays so until 10 s pass with neither, and nothing of it is ejected or
  skipped; only meanwhile do its calls take this module's path (`Routed`),
  where they and their attempts are counted;
- a keyed or versioned call always takes it.

On that path each node the order yields while the service is watched
counts as an attempt there the moment it is yielded, and the caller's
handlers tell the failures: so a reply needs no bookkeeping after it, and
the common call's code after its await is the same as before.  An attempt
that ends neither well nor failed (malla.outcome's IGNORED: a stale table's
refusal, a cancellation) thus counts as a call that did not fail.  (A keyed
call to a service with no trouble counts nothing: its nodes' records would
only grow with the names a cluster ever had.  A failure counts its attempt
unless the service was watched already, so one attempt made just before
another call's failure started the watch goes uncounted.)

When the watch ends, the ejection records that say nothing any more are
dropped, and while it lasts those of nodes that left the service, at most
every 10 s (malla.ejection's `prune`).

So a node's record starts at the failure that started the watch: "at least
5 calls in the last 10 s, more than half failing" counts the calls since
then (at most 10 s of them), and the budget's share counts the calls made
since then, its floor (`retry_floor` x 10 s) covering the start.  On a
watched service a call costs a few dictionary updates more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla.budget import RetryBudget
from malla.ejection import Ejection
from malla.outcome import FAILED, outcome_of
from malla.rendezvous import key_prefix, rank

if TYPE_CHECKING:
    from malla.interfaces import NodeOrder
    from malla.registry import Registry

__all__ = ["Routed", "Routing", "check_key", "check_vsn"]

QUIET = 10.0         # seconds without trouble that end a service's watch


def check_vsn(vsn: Any) -> None:
    """InvalidOption unless `vsn` is a pattern (a str)."""
    if type(vsn) is not str:
        raise mexc.InvalidOption(f"vsn is an fnmatch pattern (a str), not {vsn!r}")


def check_key(key: Any) -> None:
    """InvalidOption unless `key` is a str, bytes or int (not bool)."""
    key_prefix(key)


class Routed:
    """The node order of one call on the routing's path, for its every
    round: each node it yields counts as an attempt there when it is
    yielded (so a reply needs no bookkeeping after it), and a failure is
    told to `Routing.failed`."""

    __slots__ = ("balancer", "key", "routing", "vsn")

    def __init__(self, routing: Routing, balancer: NodeOrder, key: Any,
                 vsn: str | None) -> None:
        self.routing, self.balancer, self.key, self.vsn = routing, balancer, key, vsn

    def __call__(self, service: str) -> Iterator[str]:
        routing = self.routing
        attempt, watch = routing.ejection.attempt, routing.watch
        for node in routing.order(service, self.balancer, self.key, self.vsn):
            if service in watch:
                attempt(service, node)
            yield node


class Routing:
    """One caller's keyed/versioned orders, ejection and retry budget."""

    def __init__(self, registry: Registry, budget: RetryBudget, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._clock = clock
        self.budget = budget
        self.ejection = Ejection(clock=clock)
        # service -> when its last trouble was (read on every call: the
        # caller holds this dict itself)
        self.watch: dict[str, float] = {}
        # service -> when its ejection records were last pruned of the
        # nodes that left it (while watched: at most every QUIET seconds)
        self._pruned: dict[str, float] = {}

    # -- the order of one call -------------------------------------------------------

    def ordered(self, service: str, balancer: NodeOrder, key: Any,
                vsn: str | None) -> Routed:
        """A call on this path begins: its order (counted toward the
        budget's share while the service is watched)."""
        if service in self.watch:
            self.budget.call(service)
        return Routed(self, balancer, key, vsn)

    @staticmethod
    def vsn_of(order: Any) -> str | None:
        """The vsn= of a call given its order (None off this path)."""
        return order.vsn if type(order) is Routed else None

    def serving(self, service: str, order: Any = None) -> list[str]:
        """The nodes of get_nodes(service) whose instance matches the call's vsn=."""
        return self._matching(service, self.vsn_of(order))

    def order(self, service: str, balancer: NodeOrder, key: Any, vsn: str | None) -> Sequence[str]:
        """The nodes one round tries: the key's ranking (no local-first) or
        the balancer's, only those matching `vsn`, without the nodes within
        their retry_after_ms, the ejected ones last."""
        if key is not None:
            nodes: Sequence[str] = rank(key, self._matching(service, vsn))
        elif vsn is not None:
            matching = set(self._matching(service, vsn))
            nodes = [node for node in balancer(service) if node in matching]
        else:
            nodes = list(balancer(service))
        self._unwatch_if_quiet(service)
        return self.ejection.usable(service, nodes)

    def _matching(self, service: str, vsn: str | None) -> list[str]:
        nodes = self._registry.nodes(service)
        if vsn is None:
            return nodes
        return [node for node, info in self._registry.instances(service)
                if fnmatchcase(str(info.get("vsn", "")), vsn)]

    def soonest_ms(self, service: str, order: Any = None) -> float | None:
        """When every serving node is within its retry_after_ms: how long
        until the first has room (ms); else None (also off this path)."""
        if type(order) is not Routed:
            return None
        return self.ejection.soonest_retry(service, self._matching(service, order.vsn))

    # -- what attempts say -------------------------------------------------------

    def failed(self, service: str, node: str, exc: BaseException, order: Any = None) -> None:
        """An attempt on `node` ended with `exc`; `order` the call's (a
        Routed one counted the attempt already if the service was watched)."""
        if outcome_of(exc) != FAILED:
            return
        counted = type(order) is Routed and service in self.watch
        now = self.watch[service] = self._clock()
        if now - self._pruned.get(service, -math.inf) >= QUIET:
            self._pruned[service] = now
            self.ejection.prune(service, self._present(service))
        if isinstance(exc, mexc.Overloaded):
            # (the serving side's hint, when its version sends one)
            hint = getattr(exc, "retry_after_ms", None)
            if hint:
                self.ejection.overloaded(service, node, hint)
        self.ejection.record(service, node, FAILED, len(self._registry.nodes(service)),
                             counted=counted)

    def may_retry(self, service: str) -> bool:
        """May one more retry (a round, an exception retry) go to `service`?
        True spends it from the budget; False counts a throttle."""
        self._retrying(service)
        return self.budget.try_retry(service)

    def hedge_to(self, service: str, nodes: Iterator[str]) -> str | None:
        """The node a hedge of a call to `service` goes to: the next of the
        round's `nodes`, when the budget lets one more retry go (then spent
        on it).  None when the budget refuses (counted as throttled), and
        then no node is drawn: the round's failover still tries the node
        the hedge would have taken; None too when no node is left (nothing
        spent)."""
        self._retrying(service)
        if not self.budget.allows(service):
            self.budget.refused(service)
            return None
        other = next(nodes, None)
        if other is not None:
            self.budget.spend(service)
        return other

    def _retrying(self, service: str) -> None:
        if service not in self.watch:
            self.budget.call(service)       # (the call now retrying, uncounted so far)
        self.watch[service] = self._clock()

    def _unwatch_if_quiet(self, service: str) -> None:
        since = self.watch.get(service)
        if (since is not None and self._clock() - since > QUIET
                and self.ejection.quiet(service)):
            del self.watch[service]
            self._pruned.pop(service, None)
            self.ejection.prune(service, self._present(service), settled=True)

    def _present(self, service: str) -> Callable[[str], bool]:
        # whether a node is in `service`'s table (paused or not)
        registry = self._registry
        return lambda node: (registry.remote_info(service, node) is not None
                             or node == registry.local_name)

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The node's stats() keys of the routing: retries the budget
        refused, and service -> its ejected nodes now."""
        return {"retries_throttled": self.budget.throttled, "ejected": self.ejection.ejected()}
