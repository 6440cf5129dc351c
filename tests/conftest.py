"""Shared pytest fixtures (the helpers are in support.py)."""

from __future__ import annotations

import pytest
from support import COOKIE


@pytest.fixture
def cookie() -> str:
    return COOKIE
