"""Keyed and versioned calls, outlier ejection and the retry budget, wired
into remote() (malla/routing.py, DESIGN.md "Routing and resilience"), on
real nodes on loopback; and the routing's bookkeeping on a stepped clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from policyclock import StepClock
from support import seed_of, wait_until, with_nodes

import malla
from malla.budget import RetryBudget
from malla.metrics import prometheus_collector
from malla.registry import Registry
from malla.rendezvous import rank
from malla.routing import QUIET, Routing


class Keyed(malla.Service, global_=True, max_concurrency=1):
    def __init__(self, name: str = "?") -> None:
        self.name = name
        self.runs = 0

    async def where(self):
        self.runs += 1
        return self.name

    async def hold(self, seconds):
        await asyncio.sleep(seconds)
        return self.name

    def boom(self):
        self.runs += 1
        raise RuntimeError("boom")


class KeyedV2(Keyed, name="Keyed", vsn="2.1"):
    pass


async def cluster(make, names: str, **caller_options) -> tuple[malla.Node, list[malla.Node]]:
    nodes: list[malla.Node] = []
    for name in names:
        node = await make(name, seeds=[seed_of(nodes[0])] if nodes else []).start()
        await node.start_service((KeyedV2 if name.isupper() else Keyed)(name))
        nodes.append(node)
    caller = await make("caller", seeds=[seed_of(nodes[0])], **caller_options).start()
    await wait_until(lambda: len(caller.get_nodes("Keyed")) == len(names))
    return caller, nodes


def metric(node: malla.Node, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one family of the node's Prometheus collector."""
    [family] = [f for f in prometheus_collector(node).collect() if f.name == name]
    return [(sample.labels, sample.value) for sample in family.samples]


def test_a_key_goes_to_its_rendezvous_node_and_only_a_leavers_keys_move():
    async def main(make):
        caller, nodes = await cluster(make, "abcd")
        # the caller runs it too: a keyed call ignores local-first
        await caller.start_service(Keyed("caller"))
        old = await make("old", seeds=[seed_of(nodes[0])], balance="shuffle").start()
        await wait_until(lambda: len(old.get_nodes("Keyed")) == 5
                         and len(caller.get_nodes("Keyed")) == 5)
        keys = [f"user-{i}" for i in range(60)] + [b"\x00raw", -7, 2**70]
        everyone = ["a", "b", "c", "d", "caller"]
        before = {k: await caller.remote("Keyed", "where", key=k) for k in keys}
        assert before == {k: rank(k, everyone)[0] for k in keys}
        assert set(before.values()) == set(everyone)
        # every process agrees, whatever its balancer
        assert {k: await old.remote("Keyed", "where", key=k) for k in keys} == before
        await nodes[1].stop_service(Keyed)             # b leaves
        await wait_until(lambda: "b" not in caller.get_nodes("Keyed"))
        after = {k: await caller.remote("Keyed", "where", key=k) for k in keys}
        assert {k for k in keys if after[k] != before[k]} == {
            k for k in keys if before[k] == "b"}
        # a proxy and malla.call take key= too
        proxy_call = caller.services.Keyed.where()
        assert await malla.call(proxy_call, key="user-3") == after["user-3"]

    with_nodes(main)


def test_a_key_of_another_type_or_a_vsn_not_a_str_is_refused_before_sending():
    async def main(make):
        caller, nodes = await cluster(make, "a")
        for wrong in (True, 1.5, bytearray(b"k"), ("t",)):
            with pytest.raises(malla.InvalidOption, match="key"):
                await caller.remote("Keyed", "where", key=wrong)
        with pytest.raises(malla.InvalidOption, match="vsn"):
            await caller.remote("Keyed", "where", vsn=2)
        assert nodes[0]._hosting.entries["Keyed"].instance.runs == 0

    with_nodes(main)


def test_vsn_routes_to_matching_instances_only():
    async def main(make):
        caller, _ = await cluster(make, "aB")        # B runs vsn 2.1, a the default "0"
        assert {await caller.remote("Keyed", "where", vsn="2.*") for _ in range(20)} == {"B"}
        assert {await caller.remote("Keyed", "where", vsn="0") for _ in range(20)} == {"a"}
        assert await caller.remote("Keyed", "where", vsn="2.*", key="any") == "B"
        with pytest.raises(malla.ServiceNotAvailable, match="vsn"):
            await caller.remote("Keyed", "where", vsn="3.*", sna_retries=0)

    with_nodes(main)


def test_a_failing_node_is_ejected_for_that_service_then_returns(monkeypatch):
    # Peers of protocol version 1 send no retry_after_ms with Overloaded, so
    # a refusal counts toward ejection (with a hint the node is skipped for
    # that long instead: test_retry_after_skips_the_node_and_the_round_...)
    monkeypatch.setenv("MALLA_PROTOCOL_LIMIT", "1..1")

    async def main(make):
        caller, nodes = await cluster(make, "abcd")
        victim = next(k for k in (f"k{i}" for i in range(100))
                      if rank(k, "abcd")[0] == "d")
        second = rank(victim, "abcd")[1]
        # d's only slot held: every other call there is Overloaded
        holder = asyncio.create_task(nodes[3].remote("Keyed", "hold", [5]))
        await asyncio.sleep(0.05)
        went = [await caller.remote("Keyed", "where", key=victim) for _ in range(8)]
        # failed over within each call; after 5 refusals d is ejected and
        # the key's next node is tried first (no more failovers)
        assert set(went) == {second}
        assert caller.stats()["ejected"] == {"Keyed": ["d"]}
        assert metric(caller, "malla_ejected") == [({"node": "caller", "service": "Keyed"}, 1)]
        failovers = caller.stats()["failovers"]
        assert 5 <= failovers <= 6, failovers
        for _ in range(5):
            await caller.remote("Keyed", "where", key=victim)
        assert caller.stats()["failovers"] == failovers
        # get_nodes is unchanged by ejection
        assert sorted(caller.get_nodes("Keyed")) == ["a", "b", "c", "d"]
        holder.cancel()
        await wait_until(lambda: caller.stats()["ejected"] == {}, timeout=5)
        assert await caller.remote("Keyed", "where", key=victim) == "d"

    with_nodes(main)


def test_retries_beyond_the_budget_raise_at_once_and_are_counted():
    async def main(make):
        # no share, a floor of 0.3/s: a reserve of 3 retries over 10 s
        caller, nodes = await cluster(make, "a", retry_budget=0, retry_floor=0.3)
        keyed = nodes[0]._hosting.entries["Keyed"].instance
        with pytest.raises(malla.RemoteError):
            await caller.remote("Keyed", "boom", excp_retries=10, retries_sleep_msec=1)
        assert keyed.runs == 4
        assert caller.stats()["retries_throttled"] == 1
        with pytest.raises(malla.RemoteError):
            await caller.remote("Keyed", "boom", excp_retries=1, retries_sleep_msec=1)
        assert keyed.runs == 5
        # rounds where no node serves the service do not draw from it
        with pytest.raises(malla.ServiceNotAvailable, match="6 round"):
            await caller.remote("Ghost", "f", sna_retries=5, retries_sleep_msec=1)
        # a round whose nodes all refused does: raised after the first
        holder = asyncio.create_task(nodes[0].remote("Keyed", "hold", [5]))
        await asyncio.sleep(0.05)
        with pytest.raises(malla.Overloaded, match="1 round"):
            await caller.remote("Keyed", "where", sna_retries=5, retries_sleep_msec=1)
        assert caller.stats()["retries_throttled"] == 3
        assert metric(caller, "malla_retries_throttled") == [({"node": "caller"}, 3)]
        holder.cancel()

    with_nodes(main)


def test_when_every_node_asked_to_wait_the_round_waits_for_the_soonest():
    async def main(make):
        caller, _ = await cluster(make, "ab")
        # (as an Overloaded carrying the serving node's hint would tell it)
        for node, ms in (("a", 400), ("b", 300)):
            caller._caller.routing.failed("Keyed", node, malla.Overloaded("busy", ms))
        with pytest.raises(malla.Overloaded, match="retry_after_ms"):
            await caller.remote("Keyed", "where", sna_retries=0)
        t0 = time.monotonic()
        assert await caller.remote("Keyed", "where", sna_retries=1, retries_sleep_msec=1) == "b"
        assert time.monotonic() - t0 >= 0.25          # not the 1 ms asked: b's hint

    with_nodes(main)


@pytest.mark.parametrize("setting", ["retry_budget", "retry_floor"])
@pytest.mark.parametrize("wrong", [-0.1, True, "0.2", float("inf"), None])
def test_budget_settings_are_validated(setting, wrong):
    with pytest.raises(malla.InvalidOption, match=setting):
        malla.Node("a", **{setting: wrong})


# -- the bookkeeping, on a stepped clock --------------------------------------------------

def routing_of(nodes: str) -> tuple[Routing, StepClock]:
    registry = Registry("me")
    for node in nodes:
        registry.set_remote(node, "S", {"vsn": "1", "functions": {}, "global": True})
    clock = StepClock()
    return Routing(registry, RetryBudget(clock=clock), clock=clock), clock


def test_retry_after_skips_the_node_and_the_round_waits_for_the_soonest():
    routing, clock = routing_of("abc")
    order = routing.ordered("S", lambda s: ["a", "b", "c"], None, None)
    routing.failed("S", "a", malla.Overloaded("busy", retry_after_ms=300))
    assert "a" not in list(order("S"))
    routing.failed("S", "b", malla.Overloaded("busy", retry_after_ms=100))
    routing.failed("S", "c", malla.Overloaded("busy", retry_after_ms=200))
    assert list(order("S")) == []
    assert routing.soonest_ms("S", order) == pytest.approx(100)
    clock.advance(0.15)
    assert list(order("S")) == ["b"]
    # no hint (or None, from a peer that sends none): no skip
    routing.failed("S", "b", malla.Overloaded("busy"), order)
    err = malla.Overloaded("busy")
    err.retry_after_ms = None  # type: ignore[assignment]
    routing.failed("S", "b", err, order)
    assert list(order("S")) == ["b"]


def test_a_service_is_watched_from_its_first_trouble_until_quiet():
    routing, clock = routing_of("ab")
    routing.failed("S", "a", malla.RemoteError("builtins.KeyError", "the handler's own"))
    assert routing.watch == {}                  # a healthy service costs nothing
    routing.failed("S", "a", malla.ConnectionLost("gone"))
    assert "S" in routing.watch
    clock.advance(11)
    list(routing.ordered("S", lambda s: ["a", "b"], None, None)("S"))
    assert routing.watch == {}
    assert routing.may_retry("S") and "S" in routing.watch


def test_the_records_of_a_node_that_left_are_dropped_and_settled_ones_when_quiet():
    routing, clock = routing_of("abx")
    records = routing.ejection._records.by_service
    for _ in range(5):
        routing.failed("S", "x", malla.ConnectionLost("gone"))
    assert routing.ejection.ejected() == {"S": ["x"]}
    routing._registry.set_remote("x", "S", None)           # x leaves the service
    clock.advance(QUIET)
    routing.failed("S", "a", malla.ConnectionLost("gone"))
    assert sorted(records["S"]) == ["a"] and routing.ejection.ejected() == {}
    clock.advance(QUIET + 1)                               # quiet: the watch ends
    list(routing.ordered("S", lambda s: ["a", "b"], None, None)("S"))
    assert routing.watch == {} and records == {}


def test_a_hedge_draws_the_next_node_only_when_the_budget_lets_it_go():
    routing, clock = routing_of("abc")
    nodes = iter(["b", "c"])
    room = routing.budget.available("S")
    assert routing.hedge_to("S", nodes) == "b"
    assert routing.budget.available("S") == room - 1 + routing.budget.share   # (1 call counted)
    assert routing.hedge_to("S", iter([])) is None                   # none left: nothing spent
    assert routing.budget.available("S") == room - 1 + routing.budget.share
    stingy = Routing(routing._registry, RetryBudget(0, 0, clock=clock), clock=clock)
    nodes = iter(["b", "c"])
    assert stingy.hedge_to("S", nodes) is None
    # refused: counted, and "b" is still the round's next node (its failover tries it)
    assert stingy.budget.throttled == 1 and next(nodes) == "b"


def test_keyed_load_is_even_over_eight_nodes():
    nodes = [f"node-{i}" for i in range(8)]
    load = Counter(rank(i, nodes)[0] for i in range(4000))
    assert max(load.values()) / (4000 / 8) <= 1.25, load
