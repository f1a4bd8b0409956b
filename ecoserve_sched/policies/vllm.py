"""vLLM V1 semantics: token budget, running first, FCFS waiting, on-demand blocks, preempt latest.

- Blocks are allocated on demand: a prefill chunk gets the blocks its tokens need, a decoding
  request gets one more block when the token its step writes does not fit its last one (the
  simulator's rule for every policy: one step before vLLM V1 asks; docs/scheduler.md).
- When a running request cannot get a block, the most recently admitted running request is
  preempted by recompute (possibly the request itself), until the allocation succeeds.
- A waiting request is admitted, in arrival order, only if the blocks of its whole prompt are
  free (vLLM >= 0.32: ``scheduler_reserve_full_isl=True``, the default), though only its first
  chunk's blocks are taken; admission stops at the first one that does not fit. Preempted
  requests go back to the front. ``reserve_full_prompt=False`` gives the older rule (the first
  chunk must fit), which over-admits and thrashes under KV pressure.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from ..queues import FCFSQueue
from ..request import Request, State
from .base import Scheduler
from .interface import Batch
from .registry import register

_SEQ = attrgetter("seq")


class VLLMScheduler(Scheduler):
    name = "vllm"
    prediction_override = "none"  # first come, first served: no predictions read
    prefill_preempts = True

    def __init__(self, cost: Any, reserve_full_prompt: bool = True, **kw: Any) -> None:
        super().__init__(cost, **kw)
        self.waiting = self.make_queue()
        self.reserve_full_prompt = reserve_full_prompt

    def _fits(self, r: Request, chunk: int) -> bool:
        """vLLM's admission gate: the whole prompt's (or the first chunk's) blocks are free."""
        need = r.prefill_target if self.reserve_full_prompt else chunk
        return -(-need // self.bs) <= self.kv.free_blocks  # kv.blocks_for, inline: asked every iteration

    def make_queue(self) -> Any:
        return FCFSQueue()

    def enqueue(self, r: Request, front: bool = False) -> None:
        (self.waiting.push_front if front else self.waiting.push)(r)

    def waiting_count(self) -> int:
        return len(self.waiting)

    def dequeue(self, r: Request) -> bool:
        return self.waiting.discard(r)

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=_SEQ)

    def _victim(self) -> Request:
        return self.pick_victim(self.running())

    def on_alarm(self, r: Request) -> None:
        if self._allocate_or_preempt(r, 1, self.now):
            self.set_alarm(r)

    def _next_admission(self, budget: int, batch: Batch, now: float) -> tuple[Request, int] | None:
        """The waiting head and its first chunk, if ``admit`` starts it: budget, ``max_running``
        and whole-prompt blocks (``_fits``) allow."""
        if budget <= 0 or not len(self.waiting) or len(self.decoding) + len(self.prefilling) >= self.max_running:
            return None
        r = self.waiting.peek()
        chunk = min(r.prefill_target, budget) if self.chunked_prefill else r.prefill_target
        if (chunk > budget and batch.prefill_tokens) or not self._fits(r, chunk):
            return None
        return r, chunk

    def admit(self, budget: int, batch: Batch, now: float) -> None:
        while (head := self._next_admission(budget, batch, now)) is not None:
            r, chunk = head
            if not self.kv.allocate(r.rid, self.kv.blocks_for(chunk)):
                break
            self.waiting.pop()
            self.start_prefill(r)
            r.state = State.PREFILL
            batch.add_prefill(r, chunk)
            budget -= chunk

register("vllm", VLLMScheduler)
