"""The retry budget per service, and the jitter of retry sleeps.

A burst of failures must not become a burst of retries: when a service is
failing, every caller retrying every call multiplies its load exactly when
it can least take it.  DESIGN.md ("Retry budget"):
`Node(retry_budget=0.2, retry_floor=10)` lets retry rounds, exception
retries and hedges toward a service add up to that share of its calls over
the last 10 s plus `retry_floor` per second; past it the error is raised at
once and counted (`stats()["retries_throttled"]`).

Reading (Finagle's RetryBudget, whose defaults these are): over the window
(malla.window: the current second and the nine before),
``retries <= retry_budget x calls + retry_floor x 10``; the floor is a
reserve of 10 s x `retry_floor` retries, so a caller that makes few calls can
still retry them, and a burst may spend the reserve at once.  Where DESIGN.md
is silent:

- `call(service)` counts each call once, whatever its retries (a retry is
  not a call: it would pay for itself);
- a retry refused is not spent: it does not count towards the retries;
- `retry_budget` is any number >= 0 (0: only the floor), `retry_floor` any
  number >= 0 (0 with a share of 0: never retry); bools and other types
  raise InvalidOption.

`jittered(ms)` spreads `retries_sleep_msec` by ±10 %, uniformly, so callers
that lost the same service do not come back in lockstep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from malla import exceptions as mexc
from malla.window import Window

__all__ = ["JITTER", "RetryBudget", "check_setting", "jittered"]

WINDOW = 10          # seconds
JITTER = 0.1         # ± share of retries_sleep_msec


def jittered(ms: float, rand: Callable[[], float] = random.random) -> float:
    """`ms` spread uniformly over [0.9 ms, 1.1 ms] (`rand`: uniform on [0, 1))."""
    return ms * (1.0 - JITTER + 2.0 * JITTER * rand())


def check_setting(name: str, value: object) -> str | None:
    """Why `value` is not a retry_budget / retry_floor setting, or None."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 <= value < float("inf")):
        return f"{name} must be a finite number >= 0, not {value!r}"
    return None


def _number(name: str, value: object) -> float:
    why = check_setting(name, value)
    if why is not None:
        raise mexc.InvalidOption(why)
    return float(value)  # type: ignore[arg-type]


class _Spend:
    __slots__ = ("calls", "retries")

    def __init__(self) -> None:
        self.calls = Window(WINDOW)
        self.retries = Window(WINDOW)


class RetryBudget:
    """Calls and retries per service over the last 10 s, and the verdict."""

    def __init__(self, retry_budget: float = 0.2, retry_floor: float = 10, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.share = _number("retry_budget", retry_budget)
        self.floor = _number("retry_floor", retry_floor)
        self._reserve = self.floor * WINDOW
        self._clock = clock
        self._spend: dict[str, _Spend] = {}
        self.throttled = 0           # retries refused, all services
        self.throttled_by: dict[str, int] = {}

    def call(self, service: str) -> None:
        """A call toward `service` began (once per call, not per attempt)."""
        self._of(service).calls.add(self._clock())

    def try_retry(self, service: str) -> bool:
        """May one more retry (round, exception retry, hedge) go to `service`?
        True spends it; False counts a throttle."""
        if self.allows(service):
            self.spend(service)
            return True
        self.refused(service)
        return False

    def allows(self, service: str) -> bool:
        """Whether one more retry may go to `service` now (nothing spent)."""
        spend = self._of(service)
        now = self._clock()
        # (Finagle's rule: a retry needs a whole one left)
        return spend.retries.total(now) + 1 <= self.share * spend.calls.total(now) + self._reserve

    def spend(self, service: str) -> None:
        """One retry went to `service` (after `allows` said it may)."""
        self._of(service).retries.add(self._clock())

    def refused(self, service: str) -> None:
        """A retry to `service` was refused: counted as throttled."""
        self.throttled += 1
        self.throttled_by[service] = self.throttled_by.get(service, 0) + 1

    def available(self, service: str) -> float:
        """Retries `service` may still take now (may be fractional)."""
        spend = self._spend.get(service)
        if spend is None:
            return self._reserve
        now = self._clock()
        return max(0.0, self.share * spend.calls.total(now) + self._reserve
                   - spend.retries.total(now))

    def _of(self, service: str) -> _Spend:
        spend = self._spend.get(service)
        if spend is None:
            spend = self._spend[service] = _Spend()
        return spend
