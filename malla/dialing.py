"""Dialling a peer: the retry loop with its backoff, and what a failed dial
means to the caller of `connect()`.  The cluster decides whom to dial and
when to stop (malla.cluster); this module only runs the attempts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from malla import exceptions as mexc
from malla.dns import Resolver, format_address, kind_of

__all__ = ["BACKOFF_START", "ITSELF", "connect_error", "connect_target", "dial_forever",
           "dial_once"]

log = logging.getLogger("malla.cluster")

# the first pause between two attempts (s); doubled up to redial_max
BACKOFF_START = 0.05

Connect = Callable[[str], Awaitable[Any]]


def connect_error(exc: BaseException, target: str) -> BaseException:
    """The malla error `connect()` raises for a dial that failed with `exc`
    (a malla error of the refusing kinds stays what it is)."""
    if isinstance(exc, (mexc.AuthenticationError, mexc.ProtocolError, mexc.Unreachable,
                        mexc.NodeStopped, mexc.InvalidOption)):
        return exc
    if isinstance(exc, mexc.ConnectionLost):     # closed during the handshake: never reached
        return mexc.Unreachable(f"{target} closed the connection during the handshake")
    if isinstance(exc, mexc.MallaError):         # a peer's ERROR on stream 0 of another kind
        return mexc.ProtocolError(f"{target} refused us: {exc}")
    if isinstance(exc, ssl.SSLError):
        return mexc.AuthenticationError(f"TLS handshake with {target} failed: {exc}")
    if isinstance(exc, ValueError):
        return mexc.InvalidOption(str(exc))
    if isinstance(exc, OSError):                 # refused, unreachable, timed out
        return mexc.Unreachable(f"could not reach {target}: {exc}")
    return exc


async def connect_target(connect: Connect, dns: Callable[[], Resolver], target: str) -> None:
    """`connect()` of a target: an address, or every address a DNS name
    resolves to (the first failure raised when none could be joined)."""
    if kind_of(target) == "address":
        await _connect_checked(connect, target)
        return
    try:
        addresses = await dns().resolve(target)
    except (OSError, ValueError) as exc:
        raise mexc.Unreachable(str(exc)) from exc
    results = await asyncio.gather(*(_connect_checked(connect, format_address(h, p))
                                     for h, p in addresses), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if len(errors) == len(results):
        if errors:
            raise errors[0]
        raise mexc.Unreachable(f"{target!r} resolved to no reachable node")


async def _connect_checked(connect: Connect, target: str) -> None:
    """One connect, its failures as malla errors (for connect())."""
    try:
        await connect(target)
    except Exception as exc:
        error = connect_error(exc, target)
        if error is exc:
            raise
        raise error from exc


# what dial_once returns for a target that is this node's own address
ITSELF = object()


async def dial_once(connect: Connect, target: str, who: str) -> Any:
    """One attempt: the connection; None when it failed (logged: quietly
    when the peer was not reached, as a warning when it refused us); ITSELF
    when the target is this node's own address."""
    try:
        return await connect(target)
    except ssl.SSLError as exc:
        # reached, and refused by TLS (a certificate or CA mismatch)
        log.warning("malla: %s could not join %s: TLS handshake failed: %s", who, target, exc)
    except (OSError, ConnectionError, ValueError) as exc:
        # not reached (Unreachable and ConnectionLost are ConnectionErrors),
        # or a bad address: tried again, quietly
        log.debug("malla: %s could not reach %s: %s", who, target, exc)
    except mexc.MallaError as exc:
        if isinstance(exc, mexc.ProtocolError) and "itself" in str(exc):
            log.debug("malla: %s is %s's own address", target, who)
            return ITSELF
        log.warning("malla: %s could not join %s: %s", who, target, exc)
    return None


async def dial_forever(connect: Connect, target: str, who: str, keep_going: Callable[[], bool],
                       redial_max: float) -> None:
    """Dial `target` while `keep_going()`, waiting on each connection until
    it closes; capped exponential backoff (with jitter) between attempts."""
    delay = BACKOFF_START
    while keep_going():
        conn = await dial_once(connect, target, who)
        if conn is ITSELF:
            return
        if conn is not None:
            delay = BACKOFF_START
            await conn.closed
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, redial_max)
