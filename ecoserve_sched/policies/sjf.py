"""Shortest predicted job first (learning-to-rank style) over vLLM's on-demand KV mechanics.

The waiting queue is ordered by predicted response length (``pred_tokens``), ties by arrival.
When a block is missing, the running request with the longest predicted remaining work is
preempted by recompute. No aging: long requests can starve under sustained load (that is the
known weakness of SJF that EcoServe's ordering avoids).
"""

from __future__ import annotations

from typing import Any

from ..queues import PriorityQueue
from ..request import Request, State
from .registry import register
from .vllm import VLLMScheduler


class SJFScheduler(VLLMScheduler):
    name = "sjf"
    prediction_override = None  # orders by the predictions

    def make_queue(self) -> Any:
        return PriorityQueue(key=lambda r: r.pred_tokens + r.arrival_s * 1e-9)

    def pick_victim(self, running: list[Request]) -> Request:
        step = self.step  # remaining predicted work: pred_tokens - r.generated_at(step)
        return max(running, key=lambda r: (r.pred_tokens - r.generated - (
            step - r.dec_step0 if r.state == State.DECODE else 0), r.seq))


register("sjf", SJFScheduler)
