"""Scheduling policies over one KV manager and cost model; ``get_policy(name, cost)`` builds one."""

from .base import POLICIES, Batch, Scheduler, get_policy, register

__all__ = ["POLICIES", "Batch", "Scheduler", "get_policy", "policy_names", "register"]


def _load_all() -> None:
    """Import every policy module so that each registers itself."""
    from . import ecoserve, orca, s3, sarathi, sjf, vllm, vllm_v0  # noqa: F401


def policy_names() -> list[str]:
    _load_all()
    return list(POLICIES)
