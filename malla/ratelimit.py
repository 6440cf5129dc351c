"""A log that cannot flood: at most `burst` lines per `period` seconds.

Failures no caller hears of (a cast that failed on the serving node) are
logged, but a peer casting a million bad calls must not write a million
lines: past the burst, lines are counted and one summary line says how many
were left out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._log = logger
        self._burst = burst
        self._period = period
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._log.warning("malla: %d more such warnings in the last %.0f s left out",
                                  self._suppressed, self._period)
            self._window_start = now
            self._in_window = 0
            self._suppressed = 0
        if self._in_window < self._burst:
            self._in_window += 1
            self._log.warning(msg, *args)
        else:
            self._suppressed += 1
