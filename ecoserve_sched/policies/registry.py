"""The policy registry: each policy module calls ``register(name, factory)`` when imported."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Scheduler

PolicyFactory = Callable[..., "Scheduler"]
POLICIES: dict[str, PolicyFactory] = {}


def register(name: str, factory: PolicyFactory) -> None:
    POLICIES[name] = factory


def get_policy(name: str, cost: Any, **kwargs: Any) -> Scheduler:
    """Build the policy registered as ``name`` over ``cost`` (a CostModel)."""
    from . import _load_all

    _load_all()
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](cost, **kwargs)
