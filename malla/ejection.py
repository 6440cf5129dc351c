"""Outlier ejection and `retry_after_ms` skips, per (service, node).

A node that keeps failing keeps being tried by a balancer that only looks at
load: a connection that drops every call, or a node that answers everything
with Overloaded, fails fast, so it even looks cheap.  Ejection takes such a
node out of the ranking for a while (DESIGN.md "Outlier ejection"):

- a node whose calls to a service in the last 10 s (malla.window: the
  current second and the nine before) number at least 5, more than half of
  them FAILED (ConnectionLost, CallTimeout, Overloaded: malla.outcome), is
  ejected for that service for 1 s x 2^(ejections - 1), at most 30 s;
- never more than a tenth of the service's nodes (at least one) at once: a
  node that qualifies while the quota is full stays in, and is ejected at
  its next failure after a place frees (its counts still qualify);
- `usable` moves ejected nodes to the end, so they are used anyway when
  nothing else is left.

Where DESIGN.md is silent:

- an ejection clears the node's window: after it returns, it needs 5 fresh
  calls, mostly failing, to be ejected again (not one more failure);
- the ejection count is forgiven with time: each full 10 s the node spends
  back in service since its last ejection ended takes one off (gRPC A50
  lowers its multiplier per interval the same way), so a node that failed
  once last week starts again at 1 s;
- the quota counts the nodes the caller says serve the service when the
  failure is recorded (`serving`), the one number it has at hand;
- `prune` drops what is kept of a node that left the service's table (a
  name that comes back is a new node: nothing carries over), and, when the
  service's watch ends (malla.routing), the records that say nothing any
  more (not ejected, every ejection forgiven): a cluster whose names churn
  does not grow them.

`overloaded(service, node, retry_after_ms)` is the serving node's own hint
(DESIGN.md "Overloaded.retry_after_ms"): that node is left out of `usable`
for that service until then (not moved to the end: it said it will refuse);
when every node is within its hint, `usable` is empty and `soonest_retry`
says how long until the first has room, for the round's sleep.

Hot path: `usable` returns its argument itself unless something is ejected
or skipped for that service (one dict look-up per call); `record` is two
counter updates, and the ejection test runs on failures only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from malla.outcome import FAILED, OK
from malla.pernode import PerNode
from malla.window import Window

__all__ = ["Ejection"]

WINDOW = 10          # seconds of history
MIN_CALLS = 5        # calls in the window before a node can be judged
BASE = 1.0           # seconds: the first ejection
LONGEST = 30.0       # seconds: no ejection lasts longer
FORGIVE = 10.0       # seconds back in service that forgive one ejection


class _Record:
    """One (service, node): its recent calls and its ejection history."""

    __slots__ = ("calls", "ejections", "failures", "until")

    def __init__(self) -> None:
        self.calls = Window(WINDOW)
        self.failures = Window(WINDOW)
        self.ejections = 0
        self.until = -math.inf       # ejected while the clock is before this


def _spent(rec: _Record, now: float) -> bool:
    # nothing in `rec` any longer changes a verdict: not ejected, and its
    # time back in service has forgiven every ejection (its calls are
    # counted afresh from the failure that starts the next watch)
    return rec.until <= now and (rec.ejections == 0
                                 or now - rec.until >= rec.ejections * FORGIVE)


class Ejection:
    """Which nodes to avoid for a service now, and for how long."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: PerNode[_Record] = PerNode(_Record)
        # service -> node -> end of its ejection / of its retry_after skip;
        # a service is a key only while something may be out (the fast path)
        self._out: dict[str, dict[str, float]] = {}
        self._skip: dict[str, dict[str, float]] = {}

    def attempt(self, service: str, node: str) -> None:
        """An attempt on `node` begins, counted now: its end is recorded
        with `counted=True` only if it failed."""
        self._records.slot(service, node).calls.add(self._clock())

    def record(self, service: str, node: str, outcome: int, serving: int, *,
               counted: bool = False) -> bool:
        """One attempt ended (malla.outcome); True when it got the node ejected.

        `serving` is how many nodes run the service (the quota's base);
        `counted`: `attempt` counted it already.
        """
        if outcome != OK and outcome != FAILED:
            return False
        rec = self._records.slot(service, node)
        now = self._clock()
        if not counted:
            rec.calls.add(now)
        if outcome == OK:
            return False
        rec.failures.add(now)
        if rec.until > now:
            return False         # already out
        calls = rec.calls.total(now)
        if calls < MIN_CALLS or 2 * rec.failures.total(now) <= calls:
            return False
        out = self._current(self._out, service, now)
        if len(out) >= max(1, serving // 10):
            return False         # the quota is full: stays in for now
        if rec.ejections:
            back = now - rec.until
            rec.ejections = max(0, rec.ejections - int(back // FORGIVE))
        rec.ejections += 1
        rec.until = now + min(BASE * 2.0 ** (rec.ejections - 1), LONGEST)
        rec.calls.clear()
        rec.failures.clear()
        self._out.setdefault(service, {})[node] = rec.until
        return True

    def overloaded(self, service: str, node: str, retry_after_ms: int | None) -> None:
        """`node` refused a call to `service` as Overloaded with this hint
        (None: the node sent none)."""
        if retry_after_ms is not None and retry_after_ms > 0:
            until = self._clock() + retry_after_ms / 1000.0
            skips = self._skip.setdefault(service, {})
            skips[node] = max(until, skips.get(node, until))

    def usable(self, service: str, nodes: Sequence[str]) -> Sequence[str]:
        """`nodes` in the same order, minus those within their retry_after_ms,
        with the ejected ones moved to the end.  `nodes` itself when nothing
        is out (do not mutate the result)."""
        if service not in self._out and service not in self._skip:
            return nodes
        now = self._clock()
        out = self._current(self._out, service, now)
        skip = self._current(self._skip, service, now)
        if not out and not skip:
            return nodes
        head = [n for n in nodes if n not in out and n not in skip]
        if out:
            head.extend(n for n in nodes if n in out and n not in skip)
        return head

    def quiet(self, service: str) -> bool:
        """Nothing of `service` is ejected or skipped now."""
        now = self._clock()
        return not self._current(self._out, service, now) and not self._current(
            self._skip, service, now)

    def is_ejected(self, service: str, node: str) -> bool:
        return node in self._current(self._out, service, self._clock())

    def ejections(self, service: str, node: str) -> int:
        """How many ejections the node's next duration counts (before forgiving)."""
        rec = self._records.find(service, node)
        return 0 if rec is None else rec.ejections

    def ejected(self) -> dict[str, list[str]]:
        """service -> its ejected node names, sorted (for stats())."""
        now = self._clock()
        result = {}
        for service in list(self._out):
            out = self._current(self._out, service, now)
            if out:
                result[service] = sorted(out)
        return result

    def soonest_retry(self, service: str, nodes: Sequence[str]) -> float | None:
        """When every one of `nodes` is within its retry_after_ms: the
        milliseconds until the first has room; otherwise (or no nodes) None."""
        if not nodes:
            return None
        now = self._clock()
        skip = self._current(self._skip, service, now)
        if not skip or any(n not in skip for n in nodes):
            return None
        return max(0.0, min(skip[n] for n in nodes) - now) * 1000.0

    def prune(self, service: str, present: Callable[[str], bool], *,
              settled: bool = False) -> None:
        """Drop what is kept of `service` on the nodes not `present` (they
        left its table) and, when `settled` (its watch ended), the records
        whose ejections are all forgiven and none in force."""
        now = self._clock()
        records = self._records.by_service.get(service)
        if records:
            for node in [n for n, rec in records.items()
                         if not present(n) or (settled and _spent(rec, now))]:
                del records[node]
            if not records:
                del self._records.by_service[service]
        for table in (self._out, self._skip):
            entries = table.get(service)
            if entries:
                for node in [n for n in entries if not present(n)]:
                    del entries[node]
                if not entries:
                    del table[service]

    @staticmethod
    def _current(table: dict[str, dict[str, float]], service: str,
                 now: float) -> dict[str, float]:
        # the entries of `service` still in force; expired ones are dropped
        # (and the service with them, which restores usable()'s fast path)
        entries = table.get(service)
        if entries is None:
            return {}
        for node in [n for n, until in entries.items() if until <= now]:
            del entries[node]
        if not entries:
            del table[service]
            return {}
        return entries
