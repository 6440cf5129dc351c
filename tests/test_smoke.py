"""Two real nodes over loopback TCP: the call path end to end."""

from __future__ import annotations

import asyncio

from support import seed_of, with_nodes

import malla


class Calc(malla.Service, global_=True, vsn="1.0"):
    def add(self, a, b):
        return a + b

    async def square(self, x):
        await asyncio.sleep(0)
        return x * x


def test_two_nodes_call_each_other():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc())
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Calc"], retries=5)
        assert b.peers() == ["a"] and a.peers() == ["b"]
        assert await b.remote("Calc", "add", [1, 2]) == 3
        assert await b.remote(Calc, "square", [7]) == 49
        assert await b.remote("Calc", "add", [(1,), (2,)]) == (1, 2)

    with_nodes(main)
