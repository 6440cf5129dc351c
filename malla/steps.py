"""Going on with an awaitable whose first step ran outside a task: an
in-process call's coroutine that may finish without suspending
(malla.caller), a stream's generator step that may yield an item at once
(malla.stream_serve).  Either only needs a timer or a frame of its own
when it really suspends."""

from __future__ import annotations

import types
from typing import Any

__all__ = ["resume"]


@types.coroutine
def resume(coro: Any, pending: Any) -> Any:
    """Go on with `coro`, which has yielded `pending`, as if awaited all along:
    values and exceptions (cancellation) the task sends are passed on."""
    while True:
        try:
            value = yield pending
        except BaseException as exc:
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(value)
            except StopIteration as stop:
                return stop.value
