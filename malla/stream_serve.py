"""The serving side of a streaming call (DESIGN.md "Streaming calls"): the
task that runs a stream function's async generator for a peer and sends
its items, never more than the consumer's credit (the core's `StreamOut`,
malla/core/stream.pyx), and ends the stream with a REPLY or an ERROR.

The core admitted the STREAM through the one rule set of every call
(running, exported, allow=, arguments, budget, max_concurrency); the
stream then counts as one running call of its service until it ends, and
`service_cb_in` sees it as one call (the hook returns the generator).  A
CANCEL from the consumer, or the connection lost, cancels the task: the
generator is closed (`aclose()`, its `finally` runs) wherever it stood.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla.context import enter_served

if TYPE_CHECKING:
    from malla._ext import core

__all__ = ["serve_stream", "stream_mismatch"]

KIND_STREAM = 3     # (malla.service's: an async generator function)

log = logging.getLogger("malla.streams")


def stream_mismatch(service: str, fun: str, kind: int | None, stream: bool) -> str | None:
    """Why a call of `fun` cannot be served as asked: a stream function
    called as a call, or another called as a stream; None when it fits."""
    if kind is None or (kind == KIND_STREAM) == stream:
        return None
    if stream:
        return f"{service}.{fun} is not a stream: call it with remote()"
    return f"{service}.{fun} is a stream: iterate it with node.stream()"


def serve_stream(entry: Any, proto: Any, call: core.IncomingCall,
                 opts: dict[str, Any]) -> asyncio.Task[None] | None:
    """Run the stream `call` asks for as a task (the core keeps it among the
    calls running for the peer); None when it was answered at once."""
    why = stream_mismatch(entry.name, call.fun, entry.kinds.get(call.fun), bool(call.window))
    if why is not None:
        if call.cast:
            proto.cast_failed(entry.name, call.fun, "InvalidOption", why)
        else:
            proto.reply_exception(call.sid, mexc.InvalidOption(why))
        return None
    return asyncio.get_running_loop().create_task(_produce(entry, proto, call, opts))


async def _produce(entry: Any, proto: Any, call: core.IncomingCall,
                   opts: dict[str, Any]) -> None:
    # (the credit is kept from the task's first step: a CANCEL before it
    # cancels a task that never ran, and leaves nothing behind)
    sid, fun = call.sid, call.fun
    out = proto.streams.producer(proto, sid, call.window)
    entry.running += 1
    gen: Any = None
    try:
        enter_served(opts["caller"], entry.name, fun, call.meta, call.timeout, call.deadline,
                     False)
        gen = entry.invoke(fun, call.args, call.kwargs or {}, opts)
        while inspect.isawaitable(gen):      # (an async hook's awaitable of it)
            gen = await gen
        if not isinstance(gen, AsyncIterator):
            raise mexc.InvalidOption(f"{entry.name}.{fun} returned {type(gen).__name__}, "
                                     "not an async iterator")
        await _items(gen, proto, out, (call.timeout or 15000) / 1000.0)
        if proto.task_done(sid):
            proto.reply(sid, None)
    except asyncio.CancelledError:
        proto.task_done(sid)
        raise
    except Exception as exc:
        if proto.task_done(sid):
            proto.reply_exception(sid, exc)
    finally:
        proto.streams.forget_producer(sid)
        entry.running -= 1
        if gen is not None and hasattr(gen, "aclose"):
            try:
                await gen.aclose()
            except Exception:   # (its finally raised: nobody waits for the stream now)
                log.warning("malla: closing the stream %s.%s raised", entry.name, fun,
                            exc_info=True)


async def _items(gen: Any, proto: Any, out: Any, patience: float) -> None:
    """Send the generator's items within the consumer's credit (its
    window, and what each CREDIT gives back).  The core steps the
    generator (`out.pump`): the items it yields without waiting leave
    together, one ITEM a batch (the credit, 256 items, about 64 KiB), and
    what it made leaves as soon as it waits for anything, so a generator
    that yields without waiting costs a frame per batch and no Python per
    item, and one that waits delays none of its items."""
    loop = asyncio.get_running_loop()
    pump = out.pump
    try:
        waiting = pump(gen)
        while True:
            if waiting is None:
                # the batch left, full or with the last of the credit
                while out.credit <= 0:
                    await out.wait(loop)      # the consumer's CREDIT (or CANCEL)
                item = _NOTHING
            else:
                item = await waiting          # the generator waited: its next item
            if proto.writing_paused:
                # the transport's buffer is full (64 KiB chunks, a slow
                # reader, a window as large as a consumer may ask): the next
                # items wait for it to drain, so small calls on the
                # connection wait behind at most that, and the buffer is
                # bounded whatever the window
                await proto.owner.wait_writable(patience)
            waiting = pump(gen) if item is _NOTHING else pump(gen, item)
    except StopAsyncIteration:
        return


_NOTHING = object()
