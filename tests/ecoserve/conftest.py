"""Shared fixtures for the scheduler tests."""

from __future__ import annotations

import pytest
from sim_helpers import FlatCost


@pytest.fixture
def flat_cost() -> FlatCost:
    return FlatCost()
