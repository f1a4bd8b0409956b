"""Scheduling policies over one KV manager and cost model; ``get_policy(name, cost)`` builds one.

``interface.py``: what the engine calls, and when; ``base.py``: the mechanics every policy
shares (decode set, alarms, preemption); ``registry.py``: names to factories.
"""

from .base import Scheduler
from .interface import DEFAULT_MAX_RUNNING, DEFAULT_TOKEN_BUDGET, Batch, SchedulerInterface
from .registry import POLICIES, get_policy, load_entry_points, register

# ``registry.POLICIES`` fills as the policy modules load: read the names through ``policy_names``
# (was exported here, and listed no policy until one was built)
__all__ = ["DEFAULT_MAX_RUNNING", "DEFAULT_TOKEN_BUDGET", "Batch", "Scheduler",
           "SchedulerInterface", "get_policy", "policy_names", "register"]


_loaded = False


def _load_built_in() -> None:
    """Import every built-in policy module, so that each registers itself."""
    from . import ecoserve, orca, s3, sarathi, sjf, vllm, vllm_v0  # noqa: F401


def _load_all() -> None:
    """The built-in policies (``_load_built_in``), then the policies installed packages add
    (``registry.load_entry_points``), once."""
    global _loaded
    _load_built_in()
    if not _loaded:
        load_entry_points()
        _loaded = True


def policy_names() -> list[str]:
    """Every policy ``get_policy`` can build: the built-in ones, then those of installed packages
    and of ``register`` calls, in the order they were registered."""
    _load_all()
    return list(POLICIES)
