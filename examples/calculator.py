"""The service of the README's tour: `malla node n1 --service examples.calculator:Calculator`."""

import asyncio

import malla


class Calculator(malla.Service, global_=True, vsn="1.0.0"):
    def add(self, a, b):
        return a + b

    async def slow_square(self, x):
        await asyncio.sleep(0.01)
        return x * x
