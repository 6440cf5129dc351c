"""The call context a handler inherits: the caller's remaining deadline.

A handler running for a remote caller sees the caller's budget here; the
remote calls it makes draw from it.  Cancellation needs no context: the
handler's task is cancelled, and every remote() it awaits sends CANCEL on.
"""

from __future__ import annotations

import contextvars
import time

__all__ = ["enter_call_context", "remaining_ms"]

# Absolute time.monotonic() by which the current call must be done.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "malla_deadline", default=None)


def enter_call_context(deadline_ms: float | None) -> None:
    """Inside a handler's task: adopt the caller's remaining budget."""
    if deadline_ms is not None:
        _deadline.set(time.monotonic() + deadline_ms / 1000.0)


def set_deadline_at(at: float | None) -> contextvars.Token[float | None]:
    return _deadline.set(at)


def reset_deadline(token: contextvars.Token[float | None]) -> None:
    _deadline.reset(token)


def inherited_deadline() -> float | None:
    """The absolute deadline this task inherited, if any."""
    return _deadline.get()


def remaining_ms() -> float | None:
    """Milliseconds left of the inherited deadline (None: no deadline)."""
    at = _deadline.get()
    if at is None:
        return None
    return (at - time.monotonic()) * 1000.0
