"""The retry budget per service and the retry-sleep jitter (malla.budget),
over the one-second windows they count in (malla.window)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policyclock import StepClock

import malla
from malla.budget import RetryBudget, jittered
from malla.window import Window


def budget(share: float = 0.2, floor: float = 10) -> tuple[RetryBudget, StepClock]:
    clock = StepClock()
    return RetryBudget(share, floor, clock=clock), clock


def retries(b: RetryBudget, service: str = "S", most: int = 10_000) -> int:
    """Retries granted now, asking until the first refusal."""
    granted = 0
    while granted < most and b.try_retry(service):
        granted += 1
    return granted


def test_the_floor_alone_is_ten_seconds_of_retry_floor():
    b, _ = budget()
    assert b.available("S") == 100
    assert retries(b) == 100
    assert b.throttled == 1 and b.throttled_by == {"S": 1}
    assert not b.try_retry("S")
    assert b.throttled == 2


def test_calls_add_their_share():
    b, _ = budget(0.2, 0)
    for _ in range(1000):
        b.call("S")
    assert b.available("S") == pytest.approx(200)
    assert retries(b) == 200
    assert retries(b, "T") == 0                  # per service: T made no calls
    assert b.throttled_by == {"S": 1, "T": 1}


def test_share_and_floor_add_up():
    b, _ = budget(0.2, 10)
    for _ in range(50):
        b.call("S")
    assert retries(b) == 110


def test_spent_retries_and_old_calls_leave_the_window():
    b, clock = budget(0.5, 1)
    for _ in range(20):
        b.call("S")
    assert retries(b) == 20                     # 10 + 1 x 10
    clock.advance(5)
    assert retries(b) == 0                      # still within the 10 s
    clock.advance(5)
    assert retries(b) == 10                     # calls and retries gone: the floor
    for _ in range(4):
        b.call("S")
    assert retries(b) == 2


def test_a_refused_retry_is_not_spent():
    b, _ = budget(0, 1)
    assert retries(b) == 10
    for _ in range(5):
        assert not b.try_retry("S")
    b.call("S")                                 # share 0: calls add nothing
    assert not b.try_retry("S")
    assert b.available("S") == 0


def test_no_share_and_no_floor_never_retries():
    b, _ = budget(0, 0)
    b.call("S")
    assert not b.try_retry("S")


@pytest.mark.parametrize(("share", "floor"), [(-0.1, 10), (0.2, -1), (True, 10), (0.2, None),
                                              ("0.2", 10), (float("nan"), 10)])
def test_bad_settings_are_refused(share, floor):
    with pytest.raises(malla.InvalidOption):
        RetryBudget(share, floor)


@given(plan=st.lists(st.tuples(st.sampled_from(["call", "retry", "tick"]),
                               st.integers(1, 30)), max_size=60))
def test_no_retry_is_granted_beyond_the_budget(plan):
    # whatever the pattern, when a retry is granted the retries of the ten
    # whole seconds up to it (itself included) are within share x the calls
    # of those seconds + the reserve; and one is refused only when that
    # bound is reached
    b, clock = budget(0.2, 1)
    events: list[tuple[int, str]] = []

    def in_window(what: str) -> int:
        end = int(clock.now)
        return sum(1 for s, w in events if w == what and end - 10 < s <= end)

    for what, n in plan:
        if what == "tick":
            clock.advance(n / 10)
            continue
        for _ in range(n):
            if what == "call":
                b.call("S")
                events.append((int(clock.now), "call"))
            elif b.try_retry("S"):
                events.append((int(clock.now), "retry"))
                assert in_window("retry") <= 0.2 * in_window("call") + 10
            else:
                assert in_window("retry") + 1 > 0.2 * in_window("call") + 10


def test_on_the_real_clock():
    b = RetryBudget(0, 0.5)
    assert retries(b) == 5
    assert not b.try_retry("S")


@given(ms=st.integers(0, 10**6), u=st.floats(0, 1, exclude_max=True))
def test_jitter_stays_within_ten_percent(ms, u):
    assert 0.9 * ms <= jittered(ms, lambda: u) <= 1.1 * ms


def test_jitter_spreads_the_whole_range():
    rng = random.Random(3)
    values = [jittered(1000, rng.random) for _ in range(2000)]
    assert min(values) < 910 and max(values) > 1090
    assert 990 < sum(values) / len(values) < 1010
    assert all(900 <= v <= 1100 for v in (jittered(1000) for _ in range(200)))


def test_a_window_counts_the_current_second_and_the_nine_before():
    w = Window(10)
    w.add(100.0)
    w.add(100.9, 2)
    w.add(105.5)
    assert w.total(105.9) == 4
    assert w.total(109.99) == 4
    assert w.total(110.0) == 1                  # second 100 has left
    assert w.total(116.0) == 0
    w.add(116.0)
    assert w.total(116.0) == 1
    w.clear()
    assert w.total(116.0) == 0
    w.add(116.5)
    assert w.total(116.5) == 1


@given(stamps=st.lists(st.floats(0, 100, allow_nan=False), max_size=50), at=st.floats(0, 120))
def test_a_window_agrees_with_counting_timestamps(stamps, at):
    w = Window(10)
    stamps.sort()
    for t in stamps:
        w.add(t)
    if stamps and at < stamps[-1]:
        at = stamps[-1]                         # the clock only goes forward
    expect = sum(1 for t in stamps if int(at) - 10 < int(t) <= int(at))
    assert w.total(at) == expect


@pytest.mark.parametrize("seconds", [0, -1, 2.5, True])
def test_a_window_is_whole_positive_seconds(seconds):
    with pytest.raises(ValueError):
        Window(seconds)

