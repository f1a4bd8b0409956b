"""The policy registry: each policy module calls ``register(name, factory)`` when imported."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Scheduler

PolicyFactory = Callable[..., "Scheduler"]
POLICIES: dict[str, PolicyFactory] = {}


#: The entry-point group through which an installed package adds policies (docs/simulator.md).
ENTRY_POINTS = "ecoserve_sched.policies"


def register(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make ``factory(cost, **kwargs)`` the policy ``name``. A built-in policy's name is refused
    unless ``replace`` (was: replaced without a word); a policy of one's own may be registered
    again (a notebook cell run twice)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a policy name must be a non-empty string, got {name!r}")
    old = POLICIES.get(name)
    if old is not None and old is not factory and not replace \
            and getattr(old, "__module__", "").startswith("ecoserve_sched."):
        raise ValueError(f"policy {name!r} is built in; pass replace=True to replace it")
    POLICIES[name] = factory


def load_entry_points() -> None:
    """Import the modules installed packages name in the ``ecoserve_sched.policies`` entry-point
    group (each registers its policies), so that every CLI command and ``get_policy`` know them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as e:  # a third party's import error: named, one line
            raise ValueError(f"policy plug-in {ep.name!r} ({ep.value}) failed to load: "
                             f"{type(e).__name__}: {e}") from None


def get_policy(name: str, cost: Any, **kwargs: Any) -> Scheduler:
    """Build the policy registered as ``name`` over ``cost`` (a CostModel)."""
    from . import _load_all

    _load_all()
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](cost, **kwargs)
