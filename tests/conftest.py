"""Shared fixtures: nodes on loopback, on uvloop (and a standard-loop subset)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import uvloop

import malla

COOKIE = "test-cookie-0123456789abcdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_async(coro, *, loop: str = "uvloop", timeout: float = 60.0):
    """Run a test coroutine on a fresh loop, bounded in time."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    if loop == "uvloop":
        return uvloop.run(bounded())
    return asyncio.run(bounded())


def node_factory() -> tuple[Callable[..., malla.Node], list[malla.Node]]:
    made: list[malla.Node] = []

    def make(name: str, **kw) -> malla.Node:
        kw.setdefault("cookie", COOKIE)
        kw.setdefault("port", 0)
        node = malla.Node(name, **kw)
        made.append(node)
        return node

    return make, made


async def stop_all(nodes: list[malla.Node]) -> None:
    for node in nodes:
        await node.stop()


def seed_of(node: malla.Node) -> str:
    return f"127.0.0.1:{node.address[1]}"


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll `predicate` until true; fail the test past `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def spawn_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python subprocess running `code` (with the tests' malla on its path)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, MALLA_COOKIE=COOKIE)
    if env:
        full_env.update(env)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=full_env, text=True)


@pytest.fixture
def cookie() -> str:
    return COOKIE
