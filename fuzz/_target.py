"""What the fuzz targets share: writing their seeds, running under atheris,
and a core protocol to feed (a fake transport, a service, one loop).

    if __name__ == "__main__":
        _target.main(TestOneInput, seeds)

Import it after the target's instrumented imports of malla.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

import malla
from malla._testbase import FakeTransport, RecordingOwner, deliver

__all__ = ["Echo", "FakeTransport", "LoopError", "RecordingOwner", "deliver", "drain",
           "get_loop", "main", "write_seeds"]


class Echo(malla.Service):
    """Served to incoming CALLs: a plain def (run by the core, or by the
    Python dispatcher when the call has a deadline) and an async def."""

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    async def aecho(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]


_loop: asyncio.AbstractEventLoop | None = None
_loop_errors: list[dict[str, Any]] = []


class LoopError(AssertionError):
    """A callback the core scheduled raised: the input found a bug."""


def _record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _loop_errors.append(context)


def get_loop() -> asyncio.AbstractEventLoop:
    # One loop for the process (a loop per input costs a socketpair); its
    # callbacks are drained after each input.  The exception handler is not
    # silenced: whatever reaches it fails that input (drain raises).
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        _loop.set_exception_handler(_record)
    return _loop


def drain(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks the last input scheduled; LoopError if one raised."""
    loop.call_soon(loop.stop)
    loop.run_forever()
    if _loop_errors:
        errors = [str(c.get("exception") or c.get("message")) for c in _loop_errors]
        _loop_errors.clear()
        raise LoopError(f"exceptions in the loop's callbacks: {errors}")


def write_seeds(seeds: Callable[[], dict[str, bytes]], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds().items():
        assert len(data) < 4096, name
        with open(os.path.join(directory, f"seed-{name}"), "wb") as fh:
            fh.write(data)


def main(test_one_input: Callable[[bytes], None],
         seeds: Callable[[], dict[str, bytes]]) -> None:
    """`--write-seeds DIR`, or fuzz with libFuzzer's command line."""
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(seeds, sys.argv[2])
        return
    import logging

    import atheris

    from malla._ext import core

    logging.disable(logging.CRITICAL)
    print(f"INFO: malla core from {core.__file__}", flush=True)
    # libFuzzer's -merge=1 re-runs argv[0] through the shell: make it a
    # command line that starts this interpreter on this file.
    argv = [f"{sys.executable} {os.path.abspath(sys.argv[0])}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
