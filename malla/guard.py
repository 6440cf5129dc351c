"""Guards around authentication: failed-handshake throttling per address,
the cookie(s) a node proves with and accepts, and a warning for a weak
cookie."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence

from malla import exceptions as mexc

__all__ = ["Cookie", "CookieSetting", "HandshakeThrottle", "accepted_cookies", "cookie_bytes",
           "cookie_weakness"]

log = logging.getLogger("malla.guard")

_COMMON = {"secret", "cookie", "password", "passwd", "changeme", "malla", "admin",
           "default", "test", "letmein", "qwerty", "cluster"}


# Sequence, not list: mypy treats list as invariant, so list[str] would not fit
CookieSetting = str | bytes | Sequence[str | bytes] | None

# More than a rotation needs (new and old) yet small: a peer's proof is
# checked against each of ours
MAX_COOKIES = 4


class Cookie(bytes):
    """The cookie this node proves with (the bytes themselves), and every
    cookie it accepts from peers (`accepted`, this one first): during a
    rotation, ``Node(cookie=[first, other])``.  A bytes subclass so that all
    that carries the cookie (cluster, connections) stays as it is; its repr
    never shows a secret."""

    accepted: tuple[bytes, ...]

    def __new__(cls, cookies: Sequence[bytes]) -> Cookie:
        self = super().__new__(cls, cookies[0])
        self.accepted = tuple(bytes(c) for c in cookies)
        return self

    def __repr__(self) -> str:
        return f"<malla cookie: {len(self.accepted)} accepted>"

    __str__ = __repr__


def accepted_cookies(cookie: bytes) -> tuple[bytes, ...]:
    """The cookies a peer may prove with: the first one proves for us."""
    return cookie.accepted if isinstance(cookie, Cookie) else (bytes(cookie),)


def cookie_bytes(cookie: CookieSetting) -> Cookie:
    """The cluster's cookie(s): the one given (or a list of them, the
    first proving, all accepted), else MALLA_COOKIE (one cookie), else a
    random one (the node can then only talk to itself); a weak one is
    logged, since it is the cluster's root secret.  InvalidOption for
    anything else."""
    if cookie is None:
        cookie = os.environ.get("MALLA_COOKIE") or os.urandom(32).hex()
    many = cookie if isinstance(cookie, (list, tuple)) else [cookie]
    if not many or len(many) > MAX_COOKIES:
        raise mexc.InvalidOption(
            f"cookie is a str, bytes, or a list of 1 to {MAX_COOKIES} of them "
            f"(new first), not {len(many)}")
    raws = []
    for i, one in enumerate(many):
        if not isinstance(one, (str, bytes, bytearray)):
            raise mexc.InvalidOption(
                f"cookie is a str, bytes, or a list of them, not {type(one).__name__}")
        raw = one.encode() if isinstance(one, str) else bytes(one)
        weakness = cookie_weakness(raw)
        if weakness:
            which = "" if len(many) == 1 else f" (number {i + 1} of {len(many)})"
            log.warning("malla: weak cookie%s: %s; the cookie is the cluster's root secret",
                        which, weakness)
        raws.append(raw)
    return Cookie(raws)


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
    other addresses are never slowed.  `throttled` counts the connections so
    closed, `failures` every failed handshake (node.stats()
    `handshakes_throttled`, `handshakes_failed`).
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
        # totals over the node's life, never forgotten with an address
        self.throttled = 0
        self.failures = 0

    def blocked(self, host: str) -> bool:
        """Whether to close a new connection from `host` at once (counted:
        the caller does)."""
        entry = self._failures.get(host)
        if entry is None or entry[0] < self.free:
            return False
        count, last = entry
        backoff = min(self.base * 2 ** (count - self.free), self.cap)
        if time.monotonic() - last < backoff:
            self.throttled += 1
            return True
        return False

    def failed(self, host: str) -> None:
        self.failures += 1
        count, _ = self._failures.pop(host, (0, 0.0))
        self._failures[host] = (count + 1, time.monotonic())
        if len(self._failures) > self.max_entries:   # bounded: forget the oldest
            self._failures.popitem(last=False)

    def succeeded(self, host: str) -> None:
        self._failures.pop(host, None)

    def __len__(self) -> int:
        return len(self._failures)

    def counts(self) -> dict[str, int]:
        """The keys node.stats() shows (docs/operations.md)."""
        return {"handshakes_throttled": self.throttled, "handshakes_failed": self.failures}
