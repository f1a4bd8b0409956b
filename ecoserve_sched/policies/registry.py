"""The policy registry: each policy module calls ``register(name, factory)`` when imported."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Scheduler

PolicyFactory = Callable[..., "Scheduler"]
POLICIES: dict[str, PolicyFactory] = {}
_BUILT_IN: set[str] = set()  # names the package's own policy modules registered
#: Why an installed package's policies failed to load (named when a policy is not found).
plugin_error: list[str] = []


#: The entry-point group through which an installed package adds policies (docs/simulator.md).
ENTRY_POINTS = "ecoserve_sched.policies"


def register(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make ``factory(cost, **kwargs)`` the policy ``name``. A built-in policy's name is refused
    unless ``replace`` (was: replaced without a word), but not to its own module reloaded
    (``importlib.reload``, autoreload); a policy of one's own may be registered again (a
    notebook cell run twice)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a policy name must be a non-empty string, got {name!r}")
    if not callable(factory):  # was: accepted, and a TypeError from get_policy at the first use
        raise TypeError(f"factory: expected a callable that builds the policy from a cost model, got {factory!r}")
    module = getattr(factory, "__module__", "") or ""
    if not module.startswith("ecoserve_sched.policies."):
        # the built-in policies first (was: registered before they were, a policy of one's own
        # under a built-in name took no error and was replaced by the built-in, without a word,
        # when the built-ins loaded, also with ``replace``)
        from . import _load_built_in

        _load_built_in()
    old = POLICIES.get(name)
    if name in _BUILT_IN and old is not factory and not replace and _origin(old) != _origin(factory):
        raise ValueError(f"policy {name!r} is built in; pass replace=True to replace it")
    if module.startswith("ecoserve_sched.policies.") and old is None:
        _BUILT_IN.add(name)
    POLICIES[name] = factory


def _origin(factory: Any) -> tuple[str, str]:
    return getattr(factory, "__module__", ""), getattr(factory, "__qualname__", "")


def load_entry_points() -> None:
    """Import the modules installed packages name in the ``ecoserve_sched.policies`` entry-point
    group (each registers its policies), so that every CLI command and ``get_policy`` know them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as e:  # a third party's import error: said once, named when a policy
            # is not found (the built-in policies still run)
            why = f"policy plug-in {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}"
            plugin_error.append(why)
            warnings.warn(why, stacklevel=2)


def get_policy(name: str, cost: Any, **kwargs: Any) -> Scheduler:
    """Build the policy registered as ``name`` over ``cost`` (a CostModel)."""
    from . import _load_all

    _load_all()
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(sorted(POLICIES))}"
                         + "".join(f" ({why})" for why in plugin_error))
    return POLICIES[name](cost, **kwargs)
