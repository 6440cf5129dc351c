"""The debug build's leak counters (`make debug`, `make test-debug`), and
that a normal build has none of it compiled in."""

from __future__ import annotations

import asyncio
import gc

from support import seed_of, wait_until, with_nodes

import malla
from malla import _core as core


class Slow(malla.Service, global_=True):
    async def wait(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"


def test_the_counters_exist_only_in_the_debug_build():
    if core.DEBUG:
        assert "build/debug/" in core.__file__
        assert set(core.debug_counters()) == {"protocols", "open", "pending", "running",
                                              "queued_large", "partial", "streams", "violations"}
    else:
        # a normal build compiles every check out: nothing is counted
        assert core.debug_counters() == {}
        assert "build/debug/" not in core.__file__


def test_the_counters_follow_what_connections_hold_and_come_back_to_zero():
    async def main(make):
        a = await make("a").start()
        b = await make("b", seeds=[seed_of(a)]).start()
        await b.start_service(Slow)
        await a.wait_for_services([Slow])
        call = asyncio.ensure_future(a.remote(Slow, "wait", [0.5]))
        if core.DEBUG:
            # the call is pending on a's end and running on b's
            await wait_until(lambda: core.debug_counters()["running"] == 1)
            held = core.debug_counters()
            assert held["pending"] >= 1 and held["open"] == 2 and held["protocols"] >= 2
        assert await call == "done"
        return True

    assert with_nodes(main) is True
    # every node stopped and its loop gone (a cancelled task's traceback may
    # hold a closed connection until then): nothing is left, no object alive
    gc.collect()
    if core.DEBUG:
        left = {k: v for k, v in core.debug_counters().items() if v}
        assert left == {}, left
    else:
        assert core.debug_counters() == {}
