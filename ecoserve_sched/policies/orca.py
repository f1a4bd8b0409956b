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
    prediction_override = "none"  # reserves max_tokens: no predictions read
    chunked_prefill = False

    def __init__(self, cost: Any, **kw: Any) -> None:
        super().__init__(cost, **kw)
        self.waiting = FCFSQueue()

    def enqueue(self, r: Request, front: bool = False) -> None:
        (self.waiting.push_front if front else self.waiting.push)(r)

    def waiting_count(self) -> int:
        return len(self.waiting)

    def dequeue(self, r: Request) -> bool:
        return self.waiting.discard(r)

    def reservation_blocks(self, r: Request) -> int:
        return min(self.kv.blocks_for(r.prompt_tokens + r.max_tokens), self.kv.num_blocks)

    def _next_admission(self, budget: int, batch: Batch, now: float) -> tuple[Request, int] | None:
        """The waiting head and its prefill (whole, or first chunk for S3), if ``admit`` starts
        it: ``max_running``, budget and the blocks of its whole reservation allow."""
        if not len(self.waiting) or len(self.decoding) + len(self.prefilling) >= self.max_running:
            return None
        r = self.waiting.peek()
        chunk = r.prefill_target if not self.chunked_prefill else min(r.prefill_target, budget)
        if chunk <= 0 or (chunk > budget and batch.prefill_tokens):
            return None
        if self.reservation_blocks(r) > self.kv.free_blocks:
            return None
        return r, chunk

    def admit(self, budget: int, batch: Batch, now: float) -> None:
        while (head := self._next_admission(budget, batch, now)) is not None:
            r, chunk = head
            if not self.kv.allocate(r.rid, self.reservation_blocks(r)):
                break
            self.waiting.pop()
            self.start_prefill(r)
            batch.add_prefill(r, chunk)
            budget -= chunk

    def on_alarm(self, r: Request) -> None:
        # Only reachable when the reservation was clipped to the whole cache: grow or restart.
        if not self.kv.allocate(r.rid, 1):
            self.preempt(r, self.now)


register("orca", OrcaScheduler)
