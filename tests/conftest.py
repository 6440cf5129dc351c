"""Shared pytest fixtures (the helpers are in support.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from support import COOKIE

from malla import _core as core


@pytest.fixture
def cookie() -> str:
    return COOKIE


@pytest.fixture(autouse=True)
def _core_holds_nothing_after_the_test() -> Iterator[None]:
    """On the debug build (`make test-debug`): once a test has stopped its
    nodes, no connection of the core is left open, holding a pending call, a
    running call, a queued large message or a half-arrived one, and no
    invariant of the core broke (malla/core/debug.pyx).  A normal build
    counts nothing: then this checks nothing."""
    yield
    if core.DEBUG:
        gc.collect()
        left = {k: v for k, v in core.debug_counters().items() if v and k != "protocols"}
        assert not left, f"the core still holds {left} after the test"
