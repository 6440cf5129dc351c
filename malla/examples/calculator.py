"""The service of the README's tour:
`malla node n1 --service malla.examples.calculator:Calculator`."""

from __future__ import annotations

import asyncio
from typing import Any

import malla

__all__ = ["Calculator"]


class Calculator(malla.Service, global_=True, vsn="1.0.0"):
    """Adds and squares: anything `+` and `*` take, as the caller sends it."""

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    async def slow_square(self, x: Any) -> Any:
        await asyncio.sleep(0.01)   # a handler that awaits, so calls overlap
        return x * x
