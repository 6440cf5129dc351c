"""Outlier ejection and retry_after_ms skips (malla.ejection), and what
counts as a node's failure (malla.outcome)."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policyclock import StepClock

import malla
from malla import exceptions as mexc
from malla.ejection import Ejection
from malla.outcome import FAILED, IGNORED, OK, outcome_of

NODES = ["a", "b", "c", "d"]


def ejection() -> tuple[Ejection, StepClock]:
    clock = StepClock()
    return Ejection(clock=clock), clock


def fail(ej: Ejection, node: str, times: int = 5, serving: int = 4, service: str = "S") -> bool:
    return any([ej.record(service, node, FAILED, serving) for _ in range(times)])


@pytest.mark.parametrize(("exc", "outcome"), [
    (None, OK),
    (malla.RemoteError("ValueError", "bad", ""), OK),
    (mexc.ConnectionLost("gone"), FAILED),
    (mexc.Overloaded("busy", retry_after_ms=5), FAILED),
    (mexc.CallTimeout("late"), FAILED),
    (mexc.CallTimeout("never sent", sent=False), IGNORED),
    (mexc.ServiceNotAvailable("not here"), IGNORED),
    (asyncio.CancelledError(), IGNORED),
    (mexc.InvalidOption("x"), IGNORED),
])
def test_what_counts_as_a_failure_of_the_node(exc, outcome):
    assert outcome_of(exc) == outcome


def test_five_calls_mostly_failing_eject_the_node_for_a_second():
    ej, clock = ejection()
    for _ in range(4):
        assert not ej.record("S", "a", FAILED, 4)       # fewer than 5 calls
    assert ej.record("S", "a", FAILED, 4)
    assert ej.is_ejected("S", "a")
    assert ej.ejected() == {"S": ["a"]}
    assert not ej.is_ejected("T", "a")                  # per service
    assert ej.usable("S", NODES) == ["b", "c", "d", "a"]
    clock.advance(0.999)
    assert ej.is_ejected("S", "a")
    clock.advance(0.002)
    assert not ej.is_ejected("S", "a")
    assert ej.ejected() == {}
    assert ej.usable("S", NODES) == NODES


def test_half_failing_is_not_enough():
    ej, _ = ejection()
    for _ in range(5):
        ej.record("S", "a", OK, 4)
    assert not fail(ej, "a", 5)                         # 5 of 10: not more than half
    assert fail(ej, "a", 1)                             # 6 of 11


def test_only_the_last_ten_seconds_count():
    ej, clock = ejection()
    fail(ej, "a", 4)
    clock.advance(10.0)
    assert not fail(ej, "a", 1)       # the four are out of the window
    assert not ej.is_ejected("S", "a")
    assert fail(ej, "a", 4)


def test_successes_in_the_window_keep_it_in():
    ej, clock = ejection()
    for _ in range(20):
        ej.record("S", "a", OK, 4)
        clock.advance(0.1)
    assert not fail(ej, "a", 10)      # 10 of 30
    assert not ej.is_ejected("S", "a")


def test_ignored_outcomes_do_not_count():
    ej, _ = ejection()
    for _ in range(10):
        assert not ej.record("S", "a", IGNORED, 4)
    assert not fail(ej, "a", 4)


def test_repeated_ejections_double_up_to_thirty_seconds():
    ej, clock = ejection()
    durations = []
    for _ in range(8):
        assert fail(ej, "a")
        start = clock.now
        while ej.is_ejected("S", "a"):
            clock.advance(0.25)
        durations.append(clock.now - start)
    assert durations == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert ej.ejections("S", "a") == 8


def test_time_back_in_service_forgives_ejections():
    ej, clock = ejection()
    for seconds in (1, 2, 4):          # failing again as soon as it is back
        assert fail(ej, "a")
        clock.advance(seconds)
    assert ej.ejections("S", "a") == 3
    clock.advance(25)
    # back for 25 s: two full 10 s forgiven, this ejection counts 2 (2 s)
    assert fail(ej, "a")
    assert ej.ejections("S", "a") == 2
    clock.advance(1.999)
    assert ej.is_ejected("S", "a")
    clock.advance(0.002)
    assert not ej.is_ejected("S", "a")
    clock.advance(300)                  # a long good spell forgives them all
    assert fail(ej, "a")
    assert ej.ejections("S", "a") == 1


def test_a_returning_node_needs_fresh_failures():
    ej, clock = ejection()
    fail(ej, "a")
    clock.advance(1.0)
    assert not ej.is_ejected("S", "a")
    assert not fail(ej, "a", 4)       # the window was cleared at the ejection
    assert fail(ej, "a", 1)


@pytest.mark.parametrize(("serving", "quota"), [(1, 1), (4, 1), (19, 1), (20, 2), (35, 3)])
def test_never_more_than_a_tenth_of_the_nodes_at_once(serving, quota):
    ej, clock = ejection()
    nodes = [f"n{i}" for i in range(serving)]
    for n in nodes:
        fail(ej, n, serving=serving)
    assert len(ej.ejected()["S"]) == quota
    # the others still qualify: ejected at their next failure after a place frees
    first = ej.ejected()["S"]
    clock.advance(1.0)
    assert ej.ejected() == {}
    waiting = [n for n in nodes if n not in first]
    if waiting:
        for n in waiting:
            fail(ej, n, times=1, serving=serving)
        assert len(ej.ejected()["S"]) == min(quota, len(waiting))


def test_ejected_nodes_are_used_when_nothing_else_is_left():
    ej, _ = ejection()
    fail(ej, "a", serving=1)
    assert ej.usable("S", ["a"]) == ["a"]
    assert ej.usable("S", []) == []


def test_usable_returns_the_given_list_when_nothing_is_out():
    ej, clock = ejection()
    nodes = list(NODES)
    assert ej.usable("S", nodes) is nodes
    fail(ej, "a")
    assert ej.usable("T", nodes) is nodes
    clock.advance(1.0)
    assert ej.usable("S", nodes) is nodes      # expired entries are dropped


@given(order=st.permutations(NODES), out=st.sets(st.sampled_from(NODES), max_size=4),
       skipped=st.sets(st.sampled_from(NODES), max_size=4))
def test_usable_keeps_the_order_skips_first_then_ejected_last(order, out, skipped):
    clock = StepClock()
    ej = Ejection(clock=clock)
    for n in out:
        fail(ej, n, serving=40)              # quota 4: all of them out
    for n in skipped:
        ej.overloaded("S", n, 500)
    got = ej.usable("S", order)
    expect = ([n for n in order if n not in out and n not in skipped]
              + [n for n in order if n in out and n not in skipped])
    assert list(got) == expect


def test_retry_after_skips_the_node_for_that_service_until_then():
    ej, clock = ejection()
    ej.overloaded("S", "b", 250)
    assert ej.usable("S", NODES) == ["a", "c", "d"]
    assert ej.usable("T", NODES) == NODES
    assert ej.soonest_retry("S", NODES) is None      # others have room
    clock.advance(0.25)
    assert ej.usable("S", NODES) == NODES
    ej.overloaded("S", "a", 0)                       # no estimate: no skip
    assert ej.usable("S", NODES) == NODES


def test_a_longer_hint_is_kept_over_a_shorter_one():
    ej, clock = ejection()
    ej.overloaded("S", "a", 500)
    ej.overloaded("S", "a", 100)
    clock.advance(0.2)
    assert ej.usable("S", ["a", "b"]) == ["b"]


def test_when_every_node_is_within_its_hint_the_soonest_is_given():
    ej, clock = ejection()
    for n, ms in zip(NODES, [300, 120, 500, 200], strict=True):
        ej.overloaded("S", n, ms)
    assert ej.usable("S", NODES) == []
    assert ej.soonest_retry("S", NODES) == pytest.approx(120)
    clock.advance(0.1)
    assert ej.soonest_retry("S", NODES) == pytest.approx(20)
    clock.advance(0.02)
    assert ej.soonest_retry("S", NODES) is None
    assert ej.usable("S", NODES) == ["b"]
    assert ej.soonest_retry("S", []) is None


def tracked(ej: Ejection, service: str = "S") -> list[str]:
    return sorted(ej._records.by_service.get(service, {}))


def test_prune_drops_the_nodes_that_left_the_service():
    ej, _ = ejection()
    fail(ej, "a")
    fail(ej, "a", service="T")
    ej.overloaded("S", "b", 1000)
    ej.record("S", "c", FAILED, 4)
    ej.prune("S", lambda node: node == "c")
    assert ej.ejected() == {"T": ["a"]}               # another service's: kept
    assert ej.usable("S", NODES) == NODES
    assert ej.ejections("S", "a") == 0 and tracked(ej) == ["c"]


def test_a_settled_prune_keeps_only_what_still_counts():
    ej, clock = ejection()
    for node in "ab":
        fail(ej, node, serving=20)                     # both ejected for 1 s
    ej.record("S", "c", OK, 20)                        # a record with nothing in it
    clock.advance(1.5)
    fail(ej, "b", serving=20)                          # b: out again, for 2 s
    clock.advance(10.6)                                # a: back 11.1 s, forgiven
    ej.prune("S", lambda node: True, settled=True)
    assert tracked(ej) == ["b"] and ej.ejections("S", "b") == 2
    clock.advance(10)                                  # b: back 18.6 s of the 20 s
    ej.prune("S", lambda node: True, settled=True)     # its 2 ejections need
    assert tracked(ej) == ["b"]
    clock.advance(2)
    ej.prune("S", lambda node: True, settled=True)
    assert tracked(ej) == [] and ej._records.by_service == {}


def test_ejection_ends_on_the_real_clock():
    ej = Ejection()
    fail(ej, "a")
    assert ej.ejected() == {"S": ["a"]}
    deadline = time.monotonic() + 5
    while ej.is_ejected("S", "a"):
        assert time.monotonic() < deadline, "still ejected well past its 1 s"
        time.sleep(0.05)
    assert ej.usable("S", NODES) == NODES
