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
  skipped; its calls and their successes are counted only meanwhile;
- a keyed or versioned call always takes this module's path.

So a node's record starts at the failure that started the watch: "at least
5 calls in the last 10 s, more than half failing" counts the calls since
then (at most 10 s of them), and the budget's share counts the calls made
since then, its floor (`retry_floor` x 10 s) covering the start.  On a
watched service a call costs a few dictionary updates more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla.budget import RetryBudget
from malla.ejection import Ejection
from malla.outcome import FAILED, OK, outcome_of
from malla.rendezvous import key_prefix, rank

if TYPE_CHECKING:
    from malla.interfaces import NodeOrder
    from malla.registry import Registry

__all__ = ["Routing", "check_key", "check_vsn"]

QUIET = 10.0         # seconds without trouble that end a service's watch


def check_vsn(vsn: Any) -> None:
    """InvalidOption unless `vsn` is a pattern (a str)."""
    if type(vsn) is not str:
        raise mexc.InvalidOption(f"vsn is an fnmatch pattern (a str), not {vsn!r}")


def check_key(key: Any) -> None:
    """InvalidOption unless `key` is a str, bytes or int (not bool)."""
    key_prefix(key)


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

    # -- the order of one round ------------------------------------------------

    def begin(self, service: str) -> None:
        """A call on this module's path began: counted toward the budget's
        share while the service is watched."""
        if service in self.watch:
            self.budget.call(service)

    def serving(self, service: str, vsn: str | None) -> list[str]:
        """The nodes of get_nodes(service) whose instance matches `vsn`."""
        nodes = self._registry.nodes(service)
        if vsn is None:
            return nodes
        return [node for node, info in self._registry.instances(service)
                if fnmatchcase(str(info.get("vsn", "")), vsn)]

    def order(self, service: str, balancer: NodeOrder, key: Any, vsn: str | None) -> Sequence[str]:
        """The nodes one round tries: the key's ranking (no local-first) or
        the balancer's, only those matching `vsn`, without the nodes within
        their retry_after_ms, the ejected ones last."""
        if key is not None:
            nodes: Sequence[str] = rank(key, self.serving(service, vsn))
        elif vsn is not None:
            matching = set(self.serving(service, vsn))
            nodes = [node for node in balancer(service) if node in matching]
        else:
            nodes = list(balancer(service))
        self._unwatch_if_quiet(service)
        return self.ejection.usable(service, nodes)

    def soonest_ms(self, service: str, vsn: str | None) -> float | None:
        """When every serving node is within its retry_after_ms: how long
        until the first has room (ms); else None."""
        return self.ejection.soonest_retry(service, self.serving(service, vsn))

    # -- what attempts say -------------------------------------------------------

    def ended(self, service: str, node: str, exc: BaseException | None) -> None:
        """An attempt on `node` ended with `exc` (None: a reply)."""
        outcome = outcome_of(exc)
        if outcome == FAILED:
            self.watch[service] = self._clock()
            if isinstance(exc, mexc.Overloaded):
                # (the serving side's hint, when its version sends one)
                hint = getattr(exc, "retry_after_ms", None)
                if hint:
                    self.ejection.overloaded(service, node, hint)
        elif outcome != OK or service not in self.watch:
            return
        self.ejection.record(service, node, outcome, len(self._registry.nodes(service)))

    def may_retry(self, service: str) -> bool:
        """May one more retry (a round, an exception retry, a hedge) go to
        `service`?  True spends it from the budget; False counts a throttle."""
        if service not in self.watch:
            self.watch[service] = self._clock()
            self.budget.call(service)       # (the call now retrying, uncounted so far)
        else:
            self.watch[service] = self._clock()
        return self.budget.try_retry(service)

    def _unwatch_if_quiet(self, service: str) -> None:
        since = self.watch.get(service)
        if (since is not None and self._clock() - since > QUIET
                and self.ejection.quiet(service)):
            del self.watch[service]

    # -- stats -------------------------------------------------------------------

    def ejected(self) -> dict[str, list[str]]:
        return self.ejection.ejected()

    @property
    def throttled(self) -> int:
        return self.budget.throttled
