"""Orca: iteration-level scheduling that reserves KV for the maximum output length.

Each request reserves ``prompt + max_tokens`` at admission (FCFS, whole prompts, no chunking),
so it never runs out of KV and is never preempted; the price is low concurrency.
"""

from __future__ import annotations

from typing import Any

from ..queues import FCFSQueue
from ..request import Request
from .base import Scheduler
from .interface import Batch
from .registry import register


class OrcaScheduler(Scheduler):
    name = "orca"
    chunked_prefill = False

    def __init__(self, cost: Any, **kw: Any) -> None:
        super().__init__(cost, **kw)
        self.waiting = FCFSQueue()

    def enqueue(self, r: Request, front: bool = False) -> None:
        (self.waiting.push_front if front else self.waiting.push)(r)

    def waiting_count(self) -> int:
        return len(self.waiting)

    def reservation_blocks(self, r: Request) -> int:
        return min(self.kv.blocks_for(r.prompt_tokens + r.max_tokens), self.kv.num_blocks)

    def admit(self, budget: int, batch: Batch, now: float) -> None:
        while len(self.waiting) and len(self.decoding) + len(self.prefilling) < self.max_running:
            r = self.waiting.peek()
            chunk = r.prefill_target if not self.chunked_prefill else min(r.prefill_target, budget)
            if chunk <= 0 or (chunk > budget and batch.prefill_tokens):
                break
            if not self.kv.allocate(r.rid, self.reservation_blocks(r)):
                break
            self.waiting.pop()
            self.start_prefill(r)
            batch.add_prefill(r, chunk)
            budget -= chunk

    def admission_blocked(self) -> bool:
        budget = self.prefill_budget()
        if budget <= 0 or len(self.decoding) + len(self.prefilling) >= self.max_running:
            return True
        r = self.waiting.peek()
        chunk = r.prefill_target if not self.chunked_prefill else min(r.prefill_target, budget)
        return chunk <= 0 or self.reservation_blocks(r) > self.kv.free_blocks

    def easy_alarm(self, r: Request) -> bool:
        return self.kv.allocate(r.rid, 1)

    def on_alarm(self, r: Request) -> None:
        # Only reachable when the reservation was clipped to the whole cache: grow or restart.
        if not self.kv.allocate(r.rid, 1):
            self.preempt(r, self.now)


register("orca", OrcaScheduler)
