"""The call context a handler runs in: the call it serves and its deadline.

One context variable (the core's ``CURRENT_CALL``) holds the `CallContext`
of the call being served, on every serving path: the core's inline calls,
the dispatcher's tasks, in-process and local calls, casts, and
``@malla.blocking`` functions (their thread runs in a copy of the context).
The remote calls a handler makes read its deadline: they inherit the budget.
Cancellation needs no context: the handler's task is cancelled, and every
remote() it awaits sends CANCEL on.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

from malla._ext import core

__all__ = ["CallContext", "current_call", "enter", "enter_served", "inherited_deadline", "leave",
           "remaining_ms"]

CallContext = core.CallContext

_current: contextvars.ContextVar[core.CallContext | None] = core.CURRENT_CALL

# Around a handler run in the caller's own task (in-process, local()):
# enter(caller, service, fun, meta, timeout, deadline_at, in_process,
# cast) returns the token leave() takes when it returns.  (In the core: they
# are on the in-process hot path, as inherited_deadline() on every call's.)
enter = core.enter_call
leave = core.leave_call
inherited_deadline = core.inherited_deadline


def enter_served(caller: str, service: str, fun: str, meta: Any, timeout: int | None,
                 deadline_ms: float | None, cast: bool) -> None:
    """Inside a handler's own task (a call from the network): the call it
    serves, with the caller's remaining budget (`deadline_ms`, relative)
    made absolute."""
    at = None if deadline_ms is None else time.monotonic() + deadline_ms / 1000.0
    enter(caller, service, fun, meta, timeout, at, False, cast)


def current_call() -> core.CallContext | None:
    """The call the running handler serves; None outside any call.

    Like grpc's ``ServicerContext``, read from anywhere inside the handler
    (and what it runs in the same task, or in the thread of a
    ``@malla.blocking`` function) without passing it along.  (In the core:
    a plain def the core runs inline holds it in a per-thread slot, not in
    the context variable.)
    """
    return core.current_call()


def remaining_ms() -> float | None:
    """Milliseconds left of the current call's budget (its ``deadline``, as
    the remote calls made here inherit it); None outside a call or when the
    call has no deadline.  A float, negative once the budget is spent."""
    call = core.current_call()
    return None if call is None else call.remaining_ms()
