"""Guards around authentication: failed-handshake throttling per address,
and a warning for a weak cookie."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

__all__ = ["HandshakeThrottle", "cookie_bytes", "cookie_weakness"]

log = logging.getLogger("malla.guard")

_COMMON = {"secret", "cookie", "password", "passwd", "changeme", "malla", "admin",
           "default", "test", "letmein", "qwerty", "cluster"}


def cookie_bytes(cookie: str | bytes | None) -> bytes:
    """The cluster's cookie as bytes: the one given, else MALLA_COOKIE, else a
    random one (the node can then only talk to itself); a weak one is
    logged, since it is the cluster's root secret."""
    if cookie is None:
        cookie = os.environ.get("MALLA_COOKIE") or os.urandom(32).hex()
    raw = cookie.encode() if isinstance(cookie, str) else bytes(cookie)
    weakness = cookie_weakness(raw)
    if weakness:
        log.warning("malla: weak cookie: %s; the cookie is the cluster's root secret", weakness)
    return raw


def cookie_weakness(cookie: bytes) -> str | None:
    """Why the cookie is weak (shorter than 16 bytes or guessable), or None."""
    if len(cookie) < 16:
        return f"it is {len(cookie)} bytes long (use at least 16 random bytes)"
    text = cookie.decode("latin-1").lower()
    if len(set(text)) < 6:
        return "it uses fewer than 6 distinct characters"
    stripped = text.strip("0123456789-_ .")
    if stripped in _COMMON or text.isdigit():
        return "it is a common word or only digits"
    return None


class HandshakeThrottle:
    """Refuses connections from an address whose handshakes keep failing.

    After `free` failures, each new connection from that address within a
    doubling backoff (capped at `cap` seconds) is closed at once, before any
    handshake work.  A successful handshake from the address resets it;
    other addresses are never slowed.
    """

    def __init__(self, free: int = 5, base: float = 0.1, cap: float = 30.0,
                 max_entries: int = 10_000) -> None:
        self.free = free
        self.base = base
        self.cap = cap
        self.max_entries = max_entries
        # address -> (failures, time of the last one), oldest last failure
        # first: each failure moves its address to the end, so forgetting
        # the oldest is popping the front -- O(1) however many addresses fail
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def blocked(self, host: str) -> bool:
        entry = self._failures.get(host)
        if entry is None or entry[0] < self.free:
            return False
        count, last = entry
        backoff = min(self.base * 2 ** (count - self.free), self.cap)
        return bool(time.monotonic() - last < backoff)

    def failed(self, host: str) -> None:
        count, _ = self._failures.pop(host, (0, 0.0))
        self._failures[host] = (count + 1, time.monotonic())
        if len(self._failures) > self.max_entries:   # bounded: forget the oldest
            self._failures.popitem(last=False)

    def succeeded(self, host: str) -> None:
        self._failures.pop(host, None)

    def __len__(self) -> int:
        return len(self._failures)
