"""A stream's opening runs remote()'s round loop (malla.caller.Caller.rounds):
key= ranks the nodes by rendezvous hashing (no local-first) and fails over
along that ranking, vsn= filters the instances, and the retry sleeps are
jittered, on real nodes on loopback.  The same options on every path are
in tests/conformance/ (conf_cases: "stream key=", "stream vsn=")."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import seed_of, wait_until, with_nodes

import malla
import malla.caller
from malla.rendezvous import rank


class Where(malla.Service, global_=True, max_concurrency=1):
    def __init__(self, name: str = "?") -> None:
        self.name = name

    async def name_of(self):
        yield self.name

    async def hold(self):
        yield self.name
        await asyncio.sleep(30)
        yield "never"


class WhereV2(Where, name="Where", vsn="2.1"):
    pass


async def cluster(make, names: str) -> tuple[malla.Node, list[malla.Node]]:
    nodes: list[malla.Node] = []
    for name in names:
        node = await make(name, seeds=[seed_of(nodes[0])] if nodes else []).start()
        await node.start_service((WhereV2 if name.isupper() else Where)(name))
        nodes.append(node)
    caller = await make("caller", seeds=[seed_of(nodes[0])]).start()
    await wait_until(lambda: len(caller.get_nodes("Where")) == len(names))
    return caller, nodes


async def first(stream: malla.Stream) -> list:
    return [item async for item in stream]


def test_a_keyed_stream_goes_to_the_keys_node_and_fails_over_along_its_ranking():
    async def main(make):
        caller, nodes = await cluster(make, "abcd")
        # the caller runs it too: a keyed stream ignores local-first
        await caller.start_service(Where("caller"))
        await wait_until(lambda: all(len(n.get_nodes("Where")) == 5 for n in [caller, *nodes]))
        everyone = ["a", "b", "c", "d", "caller"]
        keys = [f"user-{i}" for i in range(40)] + [b"\x00raw", -7]
        went = {k: await first(caller.stream("Where", "name_of", key=k)) for k in keys}
        assert went == {k: [rank(k, everyone)[0]] for k in keys}
        assert {v[0] for v in went.values()} == set(everyone)
        # a proxy's stream takes it through malla.stream(obj, key=...)
        proxied = malla.stream(caller.services.Where.name_of(), key="user-3")
        assert await first(proxied) == went["user-3"]
        # the key's node has no room (max_concurrency=1, held by a stream
        # of its own): the stream fails over to the key's next node
        victim = next(k for k in keys if rank(k, everyone)[0] == "d")
        held = nodes[3].stream("Where", "hold")
        assert await held.__anext__() == "d"
        failovers = caller.stats()["failovers"]
        assert await first(caller.stream("Where", "name_of", key=victim,
                                         sna_retries=0)) == [rank(victim, everyone)[1]]
        assert caller.stats()["failovers"] == failovers + 1
        await held.aclose()
        # (skipped for the Overloaded's retry_after_ms, then the key's again)
        for _ in range(100):
            if await first(caller.stream("Where", "name_of", key=victim)) == ["d"]:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the key's node never took its stream back")
        # a key or a vsn of another type: refused when the stream is made
        for wrong in (True, 1.5, ("t",)):
            with pytest.raises(malla.InvalidOption, match="key"):
                caller.stream("Where", "name_of", key=wrong)
        with pytest.raises(malla.InvalidOption, match="vsn"):
            caller.stream("Where", "name_of", vsn=2)
        with pytest.raises(malla.InvalidOption, match="started"):
            started = caller.stream("Where", "name_of")
            await first(started)
            malla.stream(started, key="k")

    with_nodes(main)


def test_vsn_streams_only_from_matching_instances():
    async def main(make):
        caller, _ = await cluster(make, "aB")        # B runs vsn 2.1, a the default "0"
        got = [await first(caller.stream("Where", "name_of", vsn="2.*")) for _ in range(10)]
        assert got == [["B"]] * 10
        got = [await first(caller.stream("Where", "name_of", vsn="0")) for _ in range(10)]
        assert got == [["a"]] * 10
        assert await first(caller.stream("Where", "name_of", vsn="2.*", key="any")) == ["B"]
        with pytest.raises(malla.ServiceNotAvailable, match="vsn"):
            await first(caller.stream("Where", "name_of", vsn="3.*", sna_retries=0))

    with_nodes(main)


def test_a_streams_retry_sleeps_are_jittered(monkeypatch):
    slept: list[tuple[float, float]] = []
    real = malla.caller.jittered

    def recording(ms: float) -> float:
        wait = real(ms)
        slept.append((ms, wait))
        return wait

    monkeypatch.setattr(malla.caller, "jittered", recording)

    async def main(make):
        a = await make("a").start()
        retries = a.stats()["retries"]
        t0 = time.monotonic()
        with pytest.raises(malla.ServiceNotAvailable):
            await first(a.stream("Nowhere", "f", sna_retries=4, retries_sleep_msec=100))
        elapsed = time.monotonic() - t0
        assert a.stats()["retries"] == retries + 4
        assert [ms for ms, _ in slept] == [100] * 4
        waits = [wait for _, wait in slept]
        assert all(90 <= w <= 110 for w in waits), waits
        assert len(set(waits)) > 1, waits        # not the same sleep each round
        assert elapsed >= sum(waits) / 1000 * 0.95, (elapsed, waits)

    with_nodes(main)
