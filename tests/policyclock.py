"""The clock a sans-IO routing policy is handed in its tests.

malla.balance, malla.ejection and malla.budget take time as a `clock`
callable (time.monotonic in a node) and touch no network, so their tests
step time explicitly; the tests that run them on the real clock are beside
them.
"""

from __future__ import annotations


class StepClock:
    """Seconds, starting at `start`, moved only by `advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock does not go back"
        self.now += seconds
