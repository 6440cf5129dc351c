"""The p2c balancer's policy (malla.balance): local first, the better of a
random pair, failover by cost, the latency average that decays so a slow
node is re-probed, and "shuffle" leaving the order alone."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policyclock import StepClock

import malla
from malla.balance import Balancer
from malla.outcome import FAILED, IGNORED, OK

NODES = ["a", "b", "c", "d"]
node_lists = st.lists(st.sampled_from("abcdefghij"), max_size=10, unique=True)


def balancer(seed: int = 1, **kw) -> tuple[Balancer, StepClock]:
    clock = StepClock()
    return Balancer(clock=clock, rng=random.Random(seed), **kw), clock


def sample(bal: Balancer, node: str, seconds: float, outcome: int = OK,
           service: str = "S") -> None:
    bal.started(service, node)
    bal.finished(service, node, seconds, outcome)


def firsts(bal: Balancer, rounds: int, nodes=NODES, local: str = "me") -> Counter[str]:
    return Counter(bal.rank("S", nodes, local)[0] for _ in range(rounds))


@pytest.mark.parametrize("mode", ["P2C", "round_robin", "", None, 1])
def test_an_unknown_mode_is_refused(mode):
    with pytest.raises(malla.InvalidOption):
        Balancer(mode)


@pytest.mark.parametrize("half_life", [0, -1.0, True, "10"])
def test_a_bad_half_life_is_refused(half_life):
    with pytest.raises(malla.InvalidOption):
        Balancer(half_life=half_life)


@given(nodes=node_lists, local=st.sampled_from("abz"), seed=st.integers(0, 99))
def test_shuffle_keeps_the_candidates_order(nodes, local, seed):
    bal = Balancer("shuffle", rng=random.Random(seed))
    for n in nodes[:2]:
        sample(bal, n, 5.0)          # what it knows does not matter
    assert bal.rank("S", nodes, local) == nodes


@given(nodes=node_lists, local=st.sampled_from("abz"), seed=st.integers(0, 99),
       loads=st.lists(st.tuples(st.sampled_from("abcdefghij"), st.floats(0, 2)), max_size=8))
def test_p2c_ranks_every_candidate_once_the_local_one_first(nodes, local, seed, loads):
    bal, _ = balancer(seed)
    for node, secs in loads:
        sample(bal, node, secs)
    ranked = bal.rank("S", nodes, local)
    assert sorted(ranked) == sorted(nodes)
    if local in nodes:
        assert ranked[0] == local
    # the lazy form agrees with the list (same random pair from the same seed)
    bal2, _ = balancer(seed)
    for node, secs in loads:
        sample(bal2, node, secs)
    assert list(bal2.ranked("S", nodes, local)) == ranked


@given(seed=st.integers(0, 999),
       loads=st.lists(st.tuples(st.sampled_from(NODES), st.floats(0, 1), st.booleans()),
                      max_size=12))
def test_the_first_beats_another_and_the_rest_go_cheapest_first(seed, loads):
    bal, _ = balancer(seed)
    for node, secs, busy in loads:
        sample(bal, node, secs)
        if busy:
            bal.started("S", node)
    ranked = bal.rank("S", NODES, "me")
    costs = [bal.cost("S", n) for n in ranked]
    assert costs[0] <= max(costs[1:])          # it won its pair
    assert costs[1:] == sorted(costs[1:])


def test_a_slow_node_is_never_first_and_the_others_share_the_calls():
    bal, _ = balancer()
    for n in "abc":
        sample(bal, n, 0.001)
    sample(bal, "d", 0.020)
    seen = firsts(bal, 3000)
    # p2c picks two distinct nodes: the costliest one never wins its pair
    assert seen["d"] == 0
    assert all(seen[n] > 600 for n in "abc"), seen     # ~1000 each


def test_in_flight_calls_count_when_latencies_are_equal():
    bal, _ = balancer()
    for n in NODES:
        sample(bal, n, 0.001)
    for _ in range(3):
        bal.started("S", "b")
    assert bal.in_flight("b") == 3
    assert firsts(bal, 1000)["b"] == 0
    for _ in range(3):
        bal.finished("S", "b", 0.001, OK)
    assert bal.in_flight("b") == 0
    assert firsts(bal, 1000)["b"] > 0


def test_in_flight_is_the_nodes_whatever_the_service():
    bal, _ = balancer()
    for n in NODES:
        sample(bal, n, 0.001)
    bal.started("Other", "c")          # a call to another service on c
    bal.started("Other", "c")
    assert firsts(bal, 1000)["c"] == 0
    bal.finished("Other", "c", 0.5, IGNORED)
    bal.finished("Other", "c", 0.5, IGNORED)
    assert bal.in_flight("c") == 0
    assert bal.latency("S", "c") == pytest.approx(0.001)


def test_before_anything_is_measured_in_flight_alone_decides():
    bal, _ = balancer()
    bal.started("S", "a")               # in flight, no sample yet
    seen = firsts(bal, 2000)
    assert seen["a"] == 0
    assert all(seen[n] > 400 for n in "bcd"), seen


def test_the_pair_is_random():
    bal, _ = balancer()
    seen = firsts(bal, 4000)
    assert set(seen) == set(NODES)
    assert all(n > 600 for n in seen.values()), seen   # 1000 each expected


def test_failover_walks_the_rest_cheapest_first():
    bal, _ = balancer()
    for n, secs in zip(NODES, [0.004, 0.001, 0.003, 0.002], strict=True):
        sample(bal, n, secs)
    for _ in range(200):
        ranked = bal.rank("S", NODES, "me")
        rest = ranked[1:]
        assert rest == sorted(rest, key=lambda n: bal.cost("S", n))
        assert ranked[0] != "a"                        # the costliest never leads


def test_the_local_node_leads_whatever_its_load():
    bal, _ = balancer()
    sample(bal, "me", 5.0, service="S")
    for _ in range(10):
        bal.started("S", "me")
    assert all(bal.rank("S", ["a", "me", "b"], "me")[0] == "me" for _ in range(100))
    assert bal.rank("S", ["me"], "me") == ["me"]
    assert bal.rank("S", [], "me") == []
    assert bal.rank("S", ["x"], "me") == ["x"]


def test_a_slow_reply_counts_at_once_a_fast_one_over_a_few():
    bal, _ = balancer()
    sample(bal, "a", 0.001)
    sample(bal, "a", 0.100)
    assert bal.latency("S", "a") == pytest.approx(0.100)     # peak
    sample(bal, "a", 0.001)
    assert bal.latency("S", "a") == pytest.approx(0.100 + 0.25 * (0.001 - 0.100))
    for _ in range(40):
        sample(bal, "a", 0.001)
    assert bal.latency("S", "a") == pytest.approx(0.001, rel=0.01)


def test_a_failure_never_makes_a_node_look_faster():
    bal, _ = balancer()
    sample(bal, "a", 0.010)
    sample(bal, "a", 0.0001, FAILED)          # a fast refusal
    assert bal.latency("S", "a") == pytest.approx(0.020)
    sample(bal, "a", 0.0001, IGNORED)         # e.g. cancelled: not a sample
    assert bal.latency("S", "a") == pytest.approx(0.020)
    assert bal.in_flight("a") == 0


def test_the_average_halves_every_half_life_when_idle():
    bal, clock = balancer(half_life=10.0)
    sample(bal, "a", 0.080)
    clock.advance(10)
    assert bal.latency("S", "a") == pytest.approx(0.040)
    clock.advance(20)
    assert bal.latency("S", "a") == pytest.approx(0.010)


def test_an_unmeasured_node_reads_as_the_services_mean():
    bal, _ = balancer()
    assert bal.latency("S", "new") == 0.0
    sample(bal, "a", 0.004)
    sample(bal, "b", 0.008)
    assert bal.latency("S", "new") == pytest.approx(0.004 + 0.25 * 0.004)
    assert bal.latency("T", "new") == 0.0          # per service


def test_an_idle_slow_node_is_re_probed_now_and_then():
    # ten calls a second, one at a time, for three minutes: the fast nodes
    # take them, the slow one is tried again every time its average has
    # decayed below theirs -- a few times, never often
    bal, clock = balancer()
    latency = {"a": 0.001, "b": 0.001, "c": 0.001, "d": 0.020}
    for n in NODES:
        sample(bal, n, latency[n])
    went = Counter()
    probes_at = []
    for _ in range(1800):
        clock.advance(0.1)
        node = bal.rank("S", NODES, "me")[0]
        went[node] += 1
        if node == "d":
            probes_at.append(clock.now)
        sample(bal, node, latency[node])
    assert 2 <= went["d"] <= 18, went      # re-probed, at most 1 % of calls
    gaps = [b - a for a, b in itertools.pairwise(probes_at)]
    assert all(g >= 20 for g in gaps), gaps  # each probe re-measures it


def test_forget_drops_a_departed_node():
    bal, _ = balancer()
    sample(bal, "a", 1.0)
    bal.started("S", "a")
    bal.forget("a")
    assert bal.in_flight("a") == 0
    assert bal.latency("S", "a") == pytest.approx(1.0)   # now the service mean: a's sample


def test_services_are_apart():
    bal, _ = balancer()
    sample(bal, "a", 1.0, service="S")
    for n in "bcd":
        sample(bal, n, 0.001, service="S")
    assert bal.latency("T", "a") == 0.0
    assert firsts(bal, 500)["a"] == 0
    assert Counter(bal.rank("T", NODES, "me")[0] for _ in range(500))["a"] > 0


def test_on_the_real_clock():
    bal = Balancer()
    bal.started("S", "a")
    t = time.monotonic()
    bal.finished("S", "a", 0.5, OK)
    time.sleep(0.05)
    read = bal.latency("S", "a")
    # decayed by at most the time passed, at 10 s per halving
    elapsed = time.monotonic() - t
    assert 0.5 * 2 ** (-elapsed / 10) <= read < 0.5
