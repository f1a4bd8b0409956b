"""vLLM V0 (<= 0.5) default scheduler, the EcoServe paper's vLLM baseline.

Each rule follows vLLM v0.4.x (``core/scheduler.py``, ``core/block_manager_v1.py``,
``config.py``; docs/scheduler.md cites the functions):

- An iteration runs prefills or decodes, never both: if a waiting prompt can be admitted, the
  iteration is prefill-only and every decoding request waits (no token, the step stays).
- Admission in FCFS order (preempted requests in front), whole prompts, while the batch stays
  within ``max_num_batched_tokens = max(max_model_len, 2048)`` tokens, the running requests
  within ``max_num_seqs`` (256), and the prompt's blocks leave a watermark of 1% of the cache
  free. A prompt over ``min(max_model_len, max_num_batched_tokens)`` or over the cache minus the
  watermark is ignored: it ends ERRORED (vLLM: FINISHED_IGNORED).
- A decode iteration walks the running requests in arrival order; each needs one free block
  (``can_append_slots``) and takes one when its last block is full. When the pool is empty the
  latest-arrived running request is preempted by recompute (the walker itself if it is the
  latest). Nothing is swapped, so swapped requests never hold back prompts.
"""

from __future__ import annotations

import heapq
from itertools import repeat
from typing import Any

from ..queues import FCFSQueue
from ..request import Request, State
from .base import Scheduler
from .interface import DEFAULT_TOKEN_BUDGET, NO_BATCH, Batch
from .registry import register

#: Llama 2's context length: ``max_model_len`` when neither the caller nor the profile gives one.
DEFAULT_MAX_MODEL_LEN = 4096
WATERMARK = 0.01  # BlockSpaceManagerV1(watermark=0.01)


def _model_len(cost: Any) -> int | None:
    spec = getattr(cost, "spec", None)
    model = spec.get("model", {}) if isinstance(spec, dict) else {}
    return getattr(cost, "max_model_len", None) or model.get("max_model_len")


def _fcfs(r: Request) -> tuple[float, int]:
    return r.arrival_s, r.rid


class VLLMV0Scheduler(Scheduler):
    name = "vllm-v0"
    prediction_override = "none"  # first come, first served: no predictions read
    chunked_prefill = False
    prefill_only_iterations = True  # "Don't schedule decodes if prefills are scheduled."
    growth_keep_free = 1  # a decode pass with as many due requests as free blocks walks them

    def __init__(self, cost: Any, max_model_len: int | None = None, token_budget: int | None = None,
                 **kw: Any) -> None:
        if kw.get("block_size") == 1:  # a decode that starts is then a block behind, which its
            # one-block-per-step pass never catches up (check=True: "uses 102 blocks but may use 101")
            raise ValueError("vllm-v0 does not model one-token KV blocks (vLLM V0 took 8, 16 or 32): "
                             "use block_size >= 2")
        self.max_model_len = int(max_model_len or _model_len(cost) or DEFAULT_MAX_MODEL_LEN)
        super().__init__(cost, token_budget=max(self.max_model_len, DEFAULT_TOKEN_BUDGET) if token_budget is None else token_budget, **kw)
        self.prompt_limit = min(self.max_model_len, self.token_budget)
        self.watermark_blocks = int(WATERMARK * self.kv.num_blocks)
        self.waiting = FCFSQueue()
        self.counters["ignored"] = 0
        self._due: list[Request] = []  # decodes whose alarm fired: they need a block to go on
        # Token gaps across prefill-only iterations ("stalls"), settled at the next decode step:
        self._stalls = 0  # prefill-only iterations since the last decode iteration
        self._tok_s = 0.0  # when the requests decoding before them got their last token
        self._joined: list[tuple[Request, int, int, float]] = []  # (request, epoch, stall, time)
        self._late: list[float] = []  # last-token times of late joiners in this decode step
        self._late_old = 0  # requests stalled since ``_tok_s`` in this decode step

    def enqueue(self, r: Request, front: bool = False) -> None:
        (self.waiting.push_front if front else self.waiting.push)(r)

    def waiting_count(self) -> int:
        return len(self.waiting)

    def dequeue(self, r: Request) -> bool:
        return self.waiting.discard(r)

    def add(self, r: Request, now: float) -> None:
        n = r.prompt_tokens
        if n > self.prompt_limit or self.kv.blocks_for(n) > self.kv.num_blocks - self.watermark_blocks:
            r.state = State.ERRORED  # _schedule_prefills: too long, or AllocStatus.NEVER
            r.error = f"prompt of {n} tokens ignored (limit {self.prompt_limit}, or the KV cache)"
            self.counters["ignored"] += 1
            self.counters["errors"] += 1
            return
        super().add(r, now)

    # ---- one iteration ------------------------------------------------------------------------
    def schedule(self, now: float) -> Batch:
        """``_schedule_default``: prompts first (nothing is ever swapped), else the decodes."""
        self.now = now
        batch = Batch()
        if len(self.waiting):
            self.admit(self.token_budget, batch, now)
        if batch.prefill:  # "Don't schedule decodes if prefills are scheduled."
            if not self._stalls:
                self._tok_s = now
            self._stalls += 1
            batch.stall_decodes = True
            return batch
        self._decode_pass()
        d = len(self.decoding)
        if not d and len(self.waiting):  # all preempted: vLLM's next step, no time later, admits
            return self.schedule(now)
        batch.decode_requests = d
        batch.decode_ctx_tokens = self._ctx_base + d * self.step
        if self._stalls:  # first decode step after prefill-only ones: whose gap spans them?
            fresh = [(k, t) for r, e, k, t in self._joined if r.state == State.DECODE and r.epoch == e]
            self._late = [t for k, t in fresh if k < self._stalls]
            self._late_old = d - len(fresh)
            batch.late_decodes = self._late_old + len(self._late)
        return batch

    def complete(self, batch: Batch, now: float) -> list[Request]:
        joined = super().complete(batch, now)
        if batch.stall_decodes:
            self._joined.extend((r, r.epoch, self._stalls, now) for r in joined)
        elif self._stalls:
            self.stall_gaps.extend(repeat(now - self._tok_s, self._late_old))
            self.stall_gaps.extend(now - t for t in self._late)
            self._stalls = 0
            self._joined.clear()
        return joined

    def decode_only_step(self, recheck_admission: bool = True, now: float | None = None) -> bool:
        if not self.decoding or self._stalls or (
                recheck_admission and len(self.waiting) and not self.admission_blocked()):
            return False
        self._pop_due()
        if len(self._due) >= self.kv.free_blocks:
            return False  # the pool may run dry: ``schedule`` walks the running requests
        self._decode_pass()
        return True

    def admission_blocked(self) -> bool:
        # ``schedule`` calls ``admit`` with the whole token budget whenever a prompt waits.
        return self._next_admission(self.token_budget, NO_BATCH, self.now) is None

    # ---- prefills -----------------------------------------------------------------------------
    def _fits(self, r: Request) -> bool:
        """``can_allocate``: the prompt's blocks leave the watermark free. A recompute too big
        for any watermark (vLLM would ignore it; not reachable there) waits for an empty cache."""
        need = self.kv.blocks_for(r.prefill_target)
        return self.kv.free_blocks - need >= min(self.watermark_blocks, self.kv.num_blocks - need)

    def _next_admission(self, budget: int, batch: Batch, now: float) -> tuple[Request, int] | None:
        """The waiting head and its whole prompt, if ``admit`` starts it: ``max_num_seqs``, the
        batch's token budget and the watermark (``_fits``) allow."""
        if not len(self.waiting) or len(self.decoding) + len(self.prefilling) >= self.max_running:
            return None
        r = self.waiting.peek()
        n = r.prefill_target
        if (n > budget and batch.prefill) or not self._fits(r):
            return None
        return r, n

    def admit(self, budget: int, batch: Batch, now: float) -> None:
        """``_schedule_prefills``: FCFS whole prompts until one does not fit the budget or KV.
        A recompute longer than the budget (unreachable in vLLM, where the budget is at least
        ``max_model_len``) runs alone."""
        while (head := self._next_admission(budget, batch, now)) is not None:
            r, n = head
            self.waiting.pop()
            self.kv.allocate(r.rid, self.kv.blocks_for(n))
            self.start_prefill(r)
            batch.add_prefill(r, n)
            budget -= n

    # ---- decodes ------------------------------------------------------------------------------
    def _pop_due(self) -> None:
        """Move the due alarms (decodes whose last block is full) to ``_due``."""
        self._due = [r for r in self._due if r.state == State.DECODE and r.alarm_step == -1]
        if self.kv.grown_step < self.step:
            self._grow_to_step()
        alarms = self._alarms
        while alarms and alarms[0][0] <= self.step:
            step, _, r = heapq.heappop(alarms)
            if r.state == State.DECODE and r.alarm_step == step:
                r.alarm_step = -1
                self._due.append(r)

    def _decode_pass(self) -> None:
        """``_schedule_running``: in arrival order, each running request needs a free block;
        when there is none, preempt the latest-arrived one not yet scheduled (or the walker)."""
        self._pop_due()
        due, self._due = self._due, []
        kv = self.kv
        if len(due) < kv.free_blocks:  # the pool cannot run dry: no walk needed
            for r in due:
                kv.allocate(r.rid, 1)
                self.set_alarm(r)
            return
        need = {r.rid for r in due}
        order = sorted(self.decoding.values(), key=_fcfs)
        lo, hi = 0, len(order)
        while lo < hi:
            r = order[lo]
            if not kv.free_blocks:
                hi -= 1
                self._preempt(order[hi])
                if hi == lo:
                    break  # r itself was the latest
            lo += 1
            if r.rid in need:
                kv.allocate(r.rid, 1)
                self.set_alarm(r)

    def _preempt(self, r: Request) -> None:
        """Preempt ``r`` by recompute (vLLM's mode for single-sequence requests), remembering
        its last token, which came before the prefill-only iterations, if any."""
        last = self.now
        if self._stalls:
            last = next((t for q, e, _, t in self._joined if q is r and e == r.epoch), self._tok_s)
        self.preempt(r, self.now)
        r.last_token_s = last

    def used_blocks_after(self, batch: Batch | None = None) -> dict[int, int]:
        if batch is None or not batch.stall_decodes:
            return super().used_blocks_after(batch)
        # Prefill-only: the decodes keep the KV they wrote (their last token has none yet).
        used = {rid: self.kv.blocks_for(r.context_at(self.step) - 1) for rid, r in self.decoding.items()}
        used.update((r.rid, self.kv.blocks_for(c)) for r, c, _ in batch.prefill)
        return used


register("vllm-v0", VLLMV0Scheduler)
