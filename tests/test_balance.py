"""Load-aware node choice, Node(balance="p2c") (malla/balance.py,
malla/core/latency.pyx): the latency average each connection keeps of its
own calls, the p2c order of a call (local first, the better of a random
pair, failover by cost), and real nodes on loopback where one is slow.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import seed_of, wait_until, with_nodes

import malla
from malla._ext import core


def fresh_service() -> str:
    # the services' means are process-wide: each test its own service
    return f"S{uuid.uuid4().hex[:8]}"


def book() -> core.LatencyBook:
    return core.LatencyBook()


# -- the latency average ------------------------------------------------------------

def test_a_slow_reply_counts_at_once_a_fast_one_over_a_few():
    s, b, now = fresh_service(), book(), 100.0
    b.sample(s, 0.001, False, now)
    b.sample(s, 0.100, False, now)
    assert b.latency(s, now) == pytest.approx(0.100)              # peak
    b.sample(s, 0.001, False, now)
    assert b.latency(s, now) == pytest.approx(0.100 + 0.25 * (0.001 - 0.100))
    for _ in range(40):
        b.sample(s, 0.001, False, now)
    assert b.latency(s, now) == pytest.approx(0.001, rel=0.01)


def test_a_failure_never_makes_a_node_look_faster():
    s, b, now = fresh_service(), book(), 100.0
    b.sample(s, 0.010, False, now)
    b.sample(s, 0.0001, True, now)            # a fast refusal (Overloaded)
    assert b.latency(s, now) == pytest.approx(0.020)


def test_the_base_latency_is_the_fastest_of_the_last_replies_counted_in_replies():
    # (the gap rule's figure: a stall of this process, which delays every
    # reply in flight, does not move it; failures and a handler's exceptions
    # do not count; its window is LOW_REPLIES replies and the one before)
    s, b, now = fresh_service(), book(), 100.0
    b.sample(s, 0.002, False, now)
    for _ in range(20):                               # twenty replies 40 ms late
        b.sample(s, 0.040, False, now + 0.5)
    assert b.base(s) == pytest.approx(0.002) and b.latency(s, now + 0.5) > 0.03
    b.sample(s, 0.0001, True, now + 0.6)              # a fast refusal
    b.sample(s, 0.0001, False, now + 0.6, raised=True)  # a quick KeyError
    assert b.base(s) == pytest.approx(0.002)
    for _ in range(32):                               # a window later: still kept
        b.sample(s, 0.030, False, now + 600)
    assert b.base(s) == pytest.approx(0.002)          # (hours do not age it: replies do)
    for _ in range(32):                               # and the window before it is gone
        b.sample(s, 0.030, False, now + 601)
    assert b.base(s) == pytest.approx(0.030)
    b.sample(s, 0.001, False, now + 602)
    assert b.base(s) == pytest.approx(0.001)
    other = book()
    assert other.base(s) == other.latency(s, now) > 0  # unmeasured: the mean


def test_equal_nodes_with_a_few_fast_replies_share_the_calls():
    # (a review found two equal nodes holding one another off for seconds:
    # the base of the busier one, the fastest of many more replies, was
    # compared with the other's; now with the other's median estimate)
    for fast_share in (0.005, 0.05):
        s = fresh_service()
        conns = protos({"a": 0.005, "b": 0.005}, s)
        p2c = core.P2COrder(lambda _s: ["a", "b"], conns, "me", 7)
        went: Counter[str] = Counter()
        rng = random.Random(1)
        now = core.monotonic()
        for i in range(4000):
            node = next(iter(p2c(s)))
            went[node] += 1
            lat = conns[node].proto.latency
            t = now + i * 0.001             # a call a millisecond, answered at once
            lat.mark_sent(s, t)
            lat.sample(s, 0.00005 if rng.random() < fast_share else 0.005, False, t)
        assert min(went.values()) > 1500, (fast_share, went)


def test_a_hedged_copy_that_lost_only_ever_raises_the_average():
    # (a stalling node losing race after race must not look faster each time)
    s, b, now = fresh_service(), book(), 100.0
    b.sample(s, 0.200, False, now)                  # a stall
    b.at_least(s, 0.004, now)                        # lost a race after 4 ms
    assert b.latency(s, now) == pytest.approx(0.200)
    b.at_least(s, 0.300, now + 10)                   # above its (decayed) average
    assert b.latency(s, now + 10) == pytest.approx(0.300)
    fresh = book()
    fresh.at_least(s, 0.004, now)
    assert fresh.latency(s, now) == pytest.approx(0.004)


def test_the_average_halves_every_ten_seconds_when_idle():
    s, b = fresh_service(), book()
    b.sample(s, 0.080, False, 100.0)
    assert b.latency(s, 110.0) == pytest.approx(0.040)
    assert b.latency(s, 130.0) == pytest.approx(0.010)


def test_an_unmeasured_node_reads_as_the_services_mean():
    s = fresh_service()
    a, other, new = book(), book(), book()
    assert new.latency(s, 100.0) == 0.0
    a.sample(s, 0.004, False, 100.0)
    other.sample(s, 0.008, False, 100.0)
    assert new.latency(s, 100.0) == pytest.approx(0.004 + 0.25 * 0.004)
    assert new.latency(fresh_service(), 100.0) == 0.0             # per service


@settings(max_examples=100, deadline=None)
@given(latency=st.floats(0, 10), in_flight=st.integers(0, 10_000))
def test_cost_is_latency_times_in_flight_plus_one(latency, in_flight):
    s, b = fresh_service(), book()
    b.sample(s, latency, False, 100.0)
    assert b.cost(s, in_flight, 100.0) == pytest.approx(max(latency, 1e-6) * (in_flight + 1))


@settings(max_examples=100, deadline=None)
@given(samples=st.lists(st.tuples(st.floats(0, 1), st.booleans(), st.floats(0, 30)),
                        min_size=1, max_size=30))
def test_the_average_follows_its_formula(samples):
    # the model of malla/core/latency.pyx's docstring, against the core
    s, b = fresh_service(), book()
    avg, at, now = None, 0.0, 0.0
    for seconds, failed, wait in samples:
        now += wait
        v = 0.0 if avg is None else avg * 2 ** (-(now - at) / 10)
        x = max(seconds, 2 * v) if failed else seconds
        avg, at = (x if x > v else v + 0.25 * (x - v)), now
        b.sample(s, seconds, failed, now)
        assert b.latency(s, now) == pytest.approx(avg, rel=1e-9, abs=1e-12)


# -- the order of one call ------------------------------------------------------------

def protos(costs: dict[str, float], service: str) -> dict[str, SimpleNamespace]:
    """node -> a connection whose core has measured `service` at that latency
    (real cores, no socket: only their latency books are read)."""
    loop = asyncio.new_event_loop()
    conns = {}
    now = core.monotonic()          # one time for all: equal latencies stay equal
    for node, latency in costs.items():
        proto = core.Protocol(None, loop, True, {})
        proto.latency.sample(service, latency, False, now)
        conns[node] = SimpleNamespace(proto=proto)
    loop.close()
    return conns


def ranking(costs: dict[str, float], order: list[str], local: str = "me",
            seed: int = 1) -> tuple[core.P2COrder, str]:
    s = fresh_service()
    return core.P2COrder(lambda _s: order, protos(costs, s), local, seed), s


@settings(max_examples=60, deadline=None)
@given(nodes=st.lists(st.sampled_from("abcdefgh"), min_size=0, max_size=8, unique=True),
       local=st.booleans(), seed=st.integers(1, 2**63),
       latency=st.lists(st.floats(1e-5, 1.0), min_size=8, max_size=8))
def test_every_node_once_local_first_then_the_pairs_winner_then_by_cost(
        nodes, local, seed, latency):
    costs = dict(zip("abcdefgh", latency, strict=True))
    order = (["me"] if local else []) + nodes
    p2c, s = ranking(costs, order, seed=seed)
    got = list(p2c(s))
    assert sorted(got) == sorted(order)                            # each node once
    if local:
        assert got[0] == "me"
    remote = got[1:] if local else got
    if len(remote) >= 2:
        # the first beats at least one other (the pair's loser); the rest
        # go cheapest first
        assert any(costs[remote[0]] <= costs[n] for n in remote[1:])
        rest = [costs[n] for n in remote[1:]]
        assert rest == sorted(rest)


def test_the_pair_is_random_and_the_slowest_never_first():
    costs = {"a": 0.001, "b": 0.001, "c": 0.001, "d": 0.1}
    p2c, s = ranking(costs, list(costs), seed=7)
    firsts = Counter(next(iter(p2c(s))) for _ in range(3000))
    assert firsts["d"] == 0
    assert all(firsts[n] > 600 for n in "abc"), firsts            # about 1000 each


def test_a_far_slower_node_loses_its_pair_until_a_probe_is_due():
    s = fresh_service()
    conns = protos({"x": 0.020, "y": 0.001}, s)
    # y's replies came late once (a stall of this process): its peak, and
    # so its cost, is above x's; its base (fastest reply) is still 1 ms
    conns["y"].proto.latency.sample(s, 0.100, False, core.monotonic())
    p2c = core.P2COrder(lambda _s: ["x", "y"], conns, "me", 5)
    assert next(iter(p2c(s))) == "x"          # x not sent a call lately: the costs decide
    conns["x"].proto.latency.mark_sent(s, core.monotonic())
    assert next(iter(p2c(s))) == "y"          # x just probed, its base 20x y's: y
    conns["x"].proto.latency.mark_sent(s, core.monotonic() - 0.3)
    assert next(iter(p2c(s))) == "x"          # a probe is due again


def test_a_node_without_a_connection_comes_after_every_connected_one():
    costs = {"a": 0.5, "b": 0.4}
    p2c, s = ranking(costs, ["a", "b", "gone"], seed=3)
    for _ in range(50):
        assert list(p2c(s))[-1] == "gone"


@settings(max_examples=40, deadline=None)
@given(latency=st.lists(st.floats(1e-5, 1.0), min_size=3, max_size=3),
       seed=st.integers(1, 2**63))
def test_with_connections_on_demand_a_node_not_connected_costs_twice_the_mean(latency, seed):
    """mesh="on_demand": a node without a connection can take the call after
    a dial, so it is ranked at twice the service's mean, not after every
    connected node (else a caller would stick to the nodes it met first)."""
    costs = dict(zip("abc", latency, strict=True))
    s = fresh_service()
    conns = protos(costs, s)
    unmeasured = core.Protocol(None, asyncio.new_event_loop(), True, {})
    now = core.monotonic()              # (one time: read apart, equal averages differ)
    fresh = 2 * unmeasured.latency.cost(s, 0, now)     # the mean, as the core reads it
    cost = {**{n: conns[n].proto.latency.cost(s, 0, now) for n in costs},
            "x": fresh, "y": fresh}
    p2c = core.P2COrder(lambda _s: ["a", "b", "c", "x", "y"], conns, "me", seed, dial=True)
    got = list(p2c(s))
    assert sorted(got) == ["a", "b", "c", "x", "y"]
    # (the core reads later: the averages decay meanwhile, the mean a fresh
    # node costs does not; 0.1 % is 14 ms of decay, a loaded machine's pause)
    slack = 1 + 1e-3
    assert any(cost[got[0]] <= cost[n] * slack for n in got[1:])   # the pair's winner
    rest = [cost[n] for n in got[1:]]
    assert all(a <= b * slack for a, b in itertools.pairwise(rest)), got
    # the full mesh: after the pair's winner, every connected node before them
    full = list(core.P2COrder(lambda _s: ["a", "b", "c", "x", "y"], conns, "me", seed)(s))
    tail = [n for n in full[1:] if n in "xy"]
    assert full[len(full) - len(tail):] == tail, full


def test_with_connections_on_demand_a_call_sticks_to_the_callers_window():
    """mesh="on_demand" over a large service: one of each pair comes from the
    caller's window of 4 nodes, and while those are idle they win (a fresh
    node costs twice the mean, an open connection wins a tie), so a caller
    does not dial a new node for nearly every call."""
    nodes = [f"n{i}" for i in range(40)]
    s = fresh_service()
    p2c = core.P2COrder(lambda _s: ["me", *nodes], {}, "me", 5, dial=True)
    window = p2c.window(s)
    assert len(window) == 4 and set(window) <= set(nodes)
    # (the local node leads: then the pair's winner)
    firsts = Counter(list(itertools.islice(p2c(s), 2))[1] for _ in range(2000))
    assert set(firsts) <= set(window) and len(firsts) == 4, firsts
    # the rest of the ranking is every other node once (failover reaches all)
    got = list(p2c(s))
    assert sorted(got) == sorted(["me", *nodes]) and got[0] == "me"
    # the full mesh has no window: every connected node may lead
    conns = protos(dict.fromkeys(nodes, 0.001), s)
    full = core.P2COrder(lambda _s: nodes, conns, "me", 5)
    assert full.window(s) == nodes
    assert len({next(iter(full(s))) for _ in range(2000)}) > 30


def test_windows_spread_over_the_nodes_and_move_only_for_a_node_that_left():
    nodes = [f"n{i}" for i in range(40)]
    s = fresh_service()
    callers = [core.P2COrder(lambda _s: nodes, {}, "me", seed, dial=True)
               for seed in range(1, 201)]
    load = Counter(node for p2c in callers for node in p2c.window(s))
    # 800 places over 40 nodes, 20 each on average (each caller salts its own)
    assert len(load) == 40 and max(load.values()) <= 45, load
    # rendezvous: a node leaving changes only the windows it was in, by one
    # node; a node joining takes one place at most
    order = list(nodes)
    p2c = core.P2COrder(lambda _s: order, {}, "me", 9, dial=True)
    before = p2c.window(s)
    outside = next(n for n in nodes if n not in before)
    order = [n for n in nodes if n != outside]
    assert p2c.window(s) == before
    order = [n for n in nodes if n != before[0]]
    after = p2c.window(s)
    assert len(after) == 4 and len(set(after) & set(before)) == 3
    order = [*nodes, "new"]
    assert len(set(p2c.window(s)) & set(before)) >= 3


def test_a_window_is_computed_again_for_a_list_changed_in_place():
    # (the registry hands out a new list when its nodes change; a nodes
    # function that shortens its list in place must not leave the window
    # pointing past the end of it)
    order = [f"n{i}" for i in range(40)]
    s = fresh_service()
    p2c = core.P2COrder(lambda _s: order, {}, "me", 3, dial=True)
    assert len(p2c.window(s)) == 4
    del order[6:]
    assert set(p2c.window(s)) <= set(order)
    for _ in range(200):
        assert sorted(p2c(s)) == sorted(order)


def test_one_candidate_or_local_and_one_is_the_order_itself():
    order = ["me", "a"]
    p2c = core.P2COrder(lambda _s: order, {}, "me")
    assert p2c("S") is order
    assert core.P2COrder(lambda _s: [], {}, "me")("S") == []


# -- on real nodes ---------------------------------------------------------------------

class Where(malla.Service, global_=True):
    def __init__(self, name: str = "?", slow: float = 0.0) -> None:
        self.name, self.slow = name, slow

    async def where(self):
        if self.slow:
            await asyncio.sleep(self.slow)
        return self.name


async def servers(make, names: str, slow: str = "", delay: float = 0.02) -> list[malla.Node]:
    nodes: list[malla.Node] = []
    for name in names:
        node = await make(name, seeds=[seed_of(nodes[0])] if nodes else []).start()
        await node.start_service(Where(name, delay if name in slow else 0.0))
        nodes.append(node)
    return nodes


def test_a_slow_node_takes_almost_no_calls(caplog):
    async def main(make):
        first = (await servers(make, "abc", slow="c"))[0]
        caller = await make("caller", seeds=[seed_of(first)]).start()
        assert await caller.wait_for_services(["Where"], retries=20)
        await wait_until(lambda: len(caller.get_nodes("Where")) == 3)
        went = Counter([await caller.remote("Where", "where") for _ in range(300)])
        # c answers 20 ms late: after its first reply it loses every pair
        assert went["c"] <= 10, went
        assert went["a"] > 60 and went["b"] > 60, went
        # get_nodes is the registry's order, whatever the balancer does
        assert sorted(caller.get_nodes("Where")) == ["a", "b", "c"]

    with_nodes(main)


async def spread(caller: malla.Node, calls: int, callers: int = 32) -> Counter[str]:
    """Which node took each of `calls` calls from `callers` concurrent tasks."""
    went: Counter[str] = Counter()
    left = calls

    async def one() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            went[await caller.remote("Where", "where")] += 1

    await asyncio.gather(*(one() for _ in range(callers)))
    return went


async def three_fast_one_slow(make) -> tuple[malla.Node, Where]:
    """Nodes a, b, c answering in 1 ms, d in 10 ms; a caller seeing all four."""
    slow = Where("d", 0.01)
    nodes: list[malla.Node] = []
    for name in "abcd":
        node = await make(name, seeds=[seed_of(nodes[0])] if nodes else []).start()
        await node.start_service(slow if name == "d" else Where(name, 0.001))
        nodes.append(node)
    caller = await make("caller", seeds=[seed_of(nodes[0])]).start()
    await wait_until(lambda: len(caller.get_nodes("Where")) == 4)
    return caller, slow


def test_a_far_slower_node_takes_almost_no_calls_from_many_callers():
    """32 callers keep calls in flight on every fast node: their in-flight
    factor must not outweigh a node many times slower, which would then
    take a call whenever it has none in flight (latency.pyx's GAP)."""
    async def main(make):
        caller, _ = await three_fast_one_slow(make)
        await spread(caller, 200)                               # every node measured
        went = await spread(caller, 4000)
        # (without the gap rule: 30 to 60 calls, one whenever d had none in flight)
        assert went["d"] <= 16, went                            # 0.4 %
        assert all(went[n] > 600 for n in "abc"), went

    with_nodes(main)


def test_a_slow_node_that_became_fast_is_probed_again_and_gets_calls_back():
    async def main(make):
        caller, slow = await three_fast_one_slow(make)
        await spread(caller, 1000)
        assert (await spread(caller, 2000))["d"] <= 16
        slow.slow = 0.0                                         # d recovers
        batches: list[Counter[str]] = []

        async def d_is_back() -> bool:
            batches.append(await spread(caller, 400))
            return batches[-1]["d"] >= 40                       # 10 % of a batch

        for _ in range(100):
            if await d_is_back():
                break
        assert batches[-1]["d"] >= 40, batches[-3:]

    with_nodes(main)


def test_calls_in_flight_spread_over_equal_nodes():
    async def main(make):
        first = (await servers(make, "abc", slow="abc", delay=0.005))[0]
        caller = await make("caller", seeds=[seed_of(first)]).start()
        await wait_until(lambda: len(caller.get_nodes("Where")) == 3)
        went = Counter(await asyncio.gather(*[caller.remote("Where", "where")
                                              for _ in range(300)]))
        assert all(went[n] > 40 for n in "abc"), went

    with_nodes(main)


def test_the_local_node_first_and_shuffle_keeps_the_registry_order():
    async def main(make):
        first = (await servers(make, "ab"))[0]
        here = await make("c", seeds=[seed_of(first)]).start()
        await here.start_service(Where("c"))
        await wait_until(lambda: len(here.get_nodes("Where")) == 3)
        assert {await here.remote("Where", "where") for _ in range(50)} == {"c"}
        old = await make("old", seeds=[seed_of(first)], balance="shuffle").start()
        await wait_until(lambda: len(old.get_nodes("Where")) == 3)
        head = old.get_nodes("Where")[0]
        assert {await old.remote("Where", "where") for _ in range(50)} == {head}

    with_nodes(main)


def test_no_call_fails_while_services_stop_under_it():
    # calls keep going while two of three nodes stop the service: each call
    # fails over along its ranking (or the table no longer has the node)
    async def main(make):
        nodes = await servers(make, "abc")
        caller = await make("caller", seeds=[seed_of(nodes[0])]).start()
        await wait_until(lambda: len(caller.get_nodes("Where")) == 3)
        stop = asyncio.Event()

        async def keep_calling() -> Counter[str]:
            went: Counter[str] = Counter()
            while not stop.is_set():
                went[await caller.remote("Where", "where", sna_retries=0)] += 1
            return went

        workers = [asyncio.create_task(keep_calling()) for _ in range(8)]
        await asyncio.sleep(0.2)
        for node in nodes[:2]:
            await node.stop_service(Where)
        await asyncio.sleep(0.2)
        stop.set()
        went = sum([await w for w in workers], Counter())
        assert went["c"] > 0 and sum(went.values()) > 50, went
        assert {await caller.remote("Where", "where") for _ in range(20)} == {"c"}

    with_nodes(main)


@pytest.mark.parametrize("wrong", ["P2C", "round_robin", "", None, 1])
def test_an_unknown_balance_is_refused(wrong):
    with pytest.raises(malla.InvalidOption, match="balance"):
        malla.Node("a", balance=wrong)
    assert malla.Node("a").balance == "p2c"


def test_pairs_are_distinct_nodes():
    # with two remote nodes the pair is both of them: the cheaper always leads
    p2c, s = ranking({"a": 0.2, "b": 0.1}, ["a", "b"], seed=11)
    assert all(list(p2c(s)) == ["b", "a"] for _ in range(200))
    assert list(itertools.islice(p2c(s), 1)) == ["b"]
