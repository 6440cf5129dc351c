"""Running a coroutine on uvloop, the loop malla is built for."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

__all__ = ["run"]


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run `main` on a new uvloop event loop (like asyncio.run)."""
    return uvloop.run(main, debug=debug)
