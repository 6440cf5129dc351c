"""Counts over a sliding window of whole seconds, for the routing policy.

Outlier ejection and the retry budget both ask "how many calls (failures,
retries) in the last 10 s?" on every call.  A log of timestamps would answer
exactly but allocate per call and grow with the call rate; a ring of
one-second buckets answers in O(window) with two integer updates per event
and a fixed size.  The price is resolution: "the last 10 s" is the current
second and the nine before it (between 9 and 10 s of history), which is what
DESIGN.md's counts mean at the rates where they matter.
"""

from __future__ import annotations

import math

__all__ = ["Window"]


class Window:
    """Events counted per second over the last `seconds` whole seconds.

    Time is whatever clock the owner reads (seconds as a float, e.g.
    time.monotonic()); the window never reads a clock itself.
    """

    __slots__ = ("_counts", "_seconds", "_size")

    def __init__(self, seconds: int = 10) -> None:
        if type(seconds) is not int or seconds < 1:
            raise ValueError(f"a window is a positive whole number of seconds, not {seconds!r}")
        self._size = seconds
        # bucket i holds the count of second self._seconds[i] (math.floor of
        # the clock); a bucket of an older second is stale and reads as 0
        self._counts = [0] * seconds
        self._seconds = [-(1 << 62)] * seconds

    def add(self, now: float, n: int = 1) -> None:
        second = math.floor(now)
        i = second % self._size
        if self._seconds[i] != second:
            self._seconds[i] = second
            self._counts[i] = 0
        self._counts[i] += n

    def total(self, now: float) -> int:
        """Events in the current second and the `seconds - 1` before it."""
        oldest = math.floor(now) - self._size
        return sum(c for c, s in zip(self._counts, self._seconds, strict=True) if s > oldest)

    def clear(self) -> None:
        self._counts = [0] * self._size
