"""What one finished attempt says about the node that took it.

The balancer's latency average and outlier ejection both learn from the end
of each attempt; they must agree on what counts as the node's fault, so the
classification lives here, once.  DESIGN.md ("Outlier ejection") names the
failures: ConnectionLost, CallTimeout, Overloaded.  Where it is silent:

- a CallTimeout whose attempt was never sent (`sent` False: the call's own
  time ran out first, or the serving node refused it unstarted because the
  deadline was already spent) says nothing about the node: IGNORED;
- a RemoteError is the handler's own exception, answered in time by a
  healthy node: OK (the node did its job; the user's code failed);
- ServiceNotAvailable that is not Overloaded (the service is not, or no
  longer, running there: a stale table) and anything else (cancellation, an
  argument that cannot be encoded) are IGNORED: neither a sample nor a
  failure.
"""

from __future__ import annotations

from typing import Final

from malla import exceptions as mexc

__all__ = ["FAILED", "IGNORED", "OK", "outcome_of"]

# (plain ints, not an Enum: compared on every call)
OK: Final = 0
FAILED: Final = 1
IGNORED: Final = 2


def outcome_of(exc: BaseException | None) -> int:
    """OK, FAILED or IGNORED for an attempt that ended with `exc` (None: a reply)."""
    if exc is None or isinstance(exc, mexc.RemoteError):
        return OK
    if isinstance(exc, (mexc.ConnectionLost, mexc.Overloaded)):
        return FAILED
    if isinstance(exc, mexc.CallTimeout):
        return FAILED if exc.sent else IGNORED
    return IGNORED
