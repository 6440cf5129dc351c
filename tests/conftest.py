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
    """On the debug build (`make test-debug`): after each test no connection
    of the core holds a pending call, a running call, a queued large message
    or a half-arrived one, and no invariant of the core broke
    (malla/core/debug.pyx).  Connections may stay open (a module's cluster
    outlives its tests): `_core_closed_everything` checks them at the end.
    A normal build counts nothing: then this checks nothing."""
    yield
    if core.DEBUG:
        left = {k: v for k, v in core.debug_counters().items()
                if v and k not in ("protocols", "open")}
        assert not left, f"the core still holds {left} after the test"


@pytest.fixture(scope="session", autouse=True)
def _core_closed_everything() -> Iterator[None]:
    """On the debug build: once every test and fixture has stopped its
    nodes, no connection is open and no protocol object is alive."""
    yield
    if core.DEBUG:
        gc.collect()
        left = {k: v for k, v in core.debug_counters().items() if v}
        assert not left, f"the core still holds {left} at the end of the tests"
