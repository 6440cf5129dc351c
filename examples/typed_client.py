"""A typed proxy: describe the service as a typing.Protocol of async
functions, and the type checker checks the calls (mypy --strict passes)."""

from __future__ import annotations

from typing import Protocol

import malla


class Calculator(malla.Service, global_=True):
    def add(self, a: int, b: int) -> int:
        return a + b


class CalculatorAPI(Protocol):
    """What callers see: every function is awaited."""

    async def add(self, a: int, b: int) -> int: ...


async def main() -> int:
    cookie = "typed-example-cookie-0123456789"
    async with malla.Node("server", cookie=cookie, port=0) as server, \
            malla.Node("client", cookie=cookie, port=0,
                       seeds=[f"127.0.0.1:{server.address[1]}"]) as client:
        await server.start_service(Calculator)
        assert await client.wait_for_services([Calculator])
        calc: CalculatorAPI = client.service(Calculator)
        total: int = await calc.add(1, 2)
        return total


if __name__ == "__main__":
    print(malla.run(main()))
