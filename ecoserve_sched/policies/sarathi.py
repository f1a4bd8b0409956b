"""Sarathi-Serve: chunked prefill with stall-free batching under a small token budget.

Decodes always run (running first); prompts are cut into chunks that fill the rest of a token
budget chosen so that an iteration stays short (the paper sizes it from the TBT SLO; we use
512 tokens, its strict setting, unless ``token_budget`` is given). KV blocks are allocated on
demand and the latest admitted request is preempted by recompute, as in vLLM, on which
Sarathi-Serve is built.
"""

from __future__ import annotations

from typing import Any

from .registry import register
from .vllm import VLLMScheduler

SARATHI_TOKEN_BUDGET = 512  # Sarathi-Serve (OSDI'24) strict-SLO chunk size; ours as a default


class SarathiScheduler(VLLMScheduler):
    name = "sarathi"

    def __init__(self, cost: Any, token_budget: int | None = None, **kw: Any) -> None:
        super().__init__(cost, token_budget=SARATHI_TOKEN_BUDGET if token_budget is None else token_budget, **kw)


register("sarathi", SarathiScheduler)
