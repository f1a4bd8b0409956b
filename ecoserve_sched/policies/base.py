"""The mechanics every policy shares: the decode set, the alarms, prefills and preemption.

``Scheduler`` implements the engine's side (``interface.py``: what the serving loop calls and
when) once; a policy subclasses it and fills in the hooks (queue, admission, alarms, victims).

Every request in DECODE state decodes one token in every iteration (the token budget always
covers ``max_running`` decodes), so a decoding request's length is a function of the global step
(``Request.context_at``) and costs nothing per iteration. The one exception is a batch with
``stall_decodes`` (vllm-v0's prefill-only iterations): no one decodes and the step stays.
A policy looks at a decoding request only at its *alarm*: the step at which it would run out of
its KV blocks (minus a lead). Blocks are counted as vLLM counts them: a decode holds the KV of
its context less the token sampled last, whose KV the next step computes (``set_alarm``). All
block changes go through ``KVCacheManager``.

Alarms are a heap of ``(step, rid, request)``, handled in that order; one that needs no decision
(``easy_alarm``; by default on-demand growth: take one free block) is handled without
``schedule``. On-demand growth would raise one alarm per request per block, so where a policy
keeps the default ``easy_alarm`` and no alarm lead (``lazy_blocks``), a request that would be
re-armed for its next block boundary and holds exactly the blocks its context needs *grows
lazily* instead (``KVCacheManager.grow``; ``alarm_step`` is ``GROWING``, no heap entry): the pool
applies everyone's growth in one go (``kv.advance``), and ``next_alarm_step`` includes
``kv.growth_limit()``, a step by which the free pool may not cover it (an early one only makes
the engine ask again). At the step where it does not, or when a heap alarm is due at the same
step (their relative order could matter), the growers
crossing a boundary there get their heap alarms back (``kv.take_due``) and everything due is
handled one alarm at a time in ``(step, rid)`` order, exactly as without lazy growth: the same
blocks at the same steps, the same failed allocation, the same preemptions (vllm-v0, whose
decode pass walks its requests once due requests use up the pool, stops one block earlier:
``growth_keep_free``). ``kv.free_blocks`` is exact through the last step whose alarms were
handled (``kv.grown_step``), the state every decision and the iteration log read; a grower's
``Alloc.own`` is brought up to date when read, and when it stops decoding.
"""

from __future__ import annotations

import copy
from heapq import heappop, heappush, heapreplace
from typing import Any

from ..kv_cache import KVCacheManager
from ..request import CANCELLED, SLO, Request, State, is_whole
from .interface import (
    DEFAULT_MAX_RUNNING,
    DEFAULT_TOKEN_BUDGET,
    NO_BATCH,
    Batch,
    SchedulerInterface,
)
from .registry import register

DECODE = State.DECODE
GROWING = -2  # ``Request.alarm_step`` of a request that grows lazily (``kv.grow``): no heap alarm
NO_RECHECK = (1 << 62, float("inf"))  # ``Scheduler.recheck`` of an admission blocked until a finish

__all__ = ["Batch", "Scheduler", "register"]  # ecoserve.py imports all three from here


class Scheduler(SchedulerInterface):
    """Shared mechanics; subclasses set the queue, admission, alarms and victim choice."""

    name = "base"
    chunked_prefill = True
    #: Iterations that take prompts take no decodes (vLLM V0's): a prompt never shares one
    prefill_only_iterations = False
    alarm_lead_tokens = 0  # a request raises its alarm this many tokens before its blocks run out
    #: "oracle": the engine gives this policy true RLs; "none": it reads no predictions
    prediction_override: str | None = None
    lazy_blocks = True  # on-demand growth without per-block alarms (module docstring), if eligible
    growth_keep_free = 0  # free blocks lazy growth leaves: it stops where the policy would decide
    #: Admit in an iteration whose alarms or partial prefills preempted a request. vLLM V1 admits
    #: none then (its waiting loop runs only ``if not preempted_reqs``), and neither does a
    #: policy here by default (was: every policy admitted, so a victim could restart at once).
    admits_after_preemption = False
    #: A partial prefill whose next chunk's blocks are not free preempts ``_victim()`` for them,
    #: as vLLM V1's running loop does (False: it skips the iteration, ``grow_prefill``)
    prefill_preempts = False

    def __init__(self, cost: Any, kv_blocks: int | None = None, block_size: int = 16,
                 token_budget: int | None = None, max_running: int = DEFAULT_MAX_RUNNING,
                 slo: SLO | None = None) -> None:
        for name, v, low in (("kv_blocks", kv_blocks, 1), ("block_size", block_size, 1),
                             ("token_budget", token_budget, 2), ("max_running", max_running, 1)):
            if v is not None and not (is_whole(v) and v >= low):
                raise ValueError(f"{name} must be a whole number >= {low}, got {v!r}")  # was: 0 meant the default
        if not callable(getattr(cost, "iteration_time", None)):  # (was: AttributeError 'kv_blocks' further in)
            raise TypeError(f"cost must be a cost model (cost_model.load_profile(NAME)), got {type(cost).__name__}")
        if slo is not None and not isinstance(slo, SLO):  # (was: accepted, an AttributeError at the first decision)
            raise TypeError(f"slo must be an SLO(ttft_s, tbt_s), got {type(slo).__name__}")
        self.cost = cost
        blocks = kv_blocks if kv_blocks is not None else cost.kv_blocks(block_size)
        self.kv = KVCacheManager(blocks, block_size)
        self.bs = block_size
        self.token_budget = int(token_budget if token_budget is not None else max(cost.token_budget, DEFAULT_TOKEN_BUDGET))
        self.slo = slo or SLO()
        self.max_running = max_running
        if self.token_budget <= max_running:
            raise ValueError(f"token budget {self.token_budget} must exceed max_running {max_running}")
        self.step = 0
        self.recheck = NO_RECHECK
        # Lazy growth replays the default easy alarm exactly; another ``easy_alarm`` or a lead
        # changes what an alarm does or when it comes.
        self.lazy_blocks = (self.lazy_blocks and type(self).easy_alarm is Scheduler.easy_alarm
                            and not self.alarm_lead_tokens)
        self.decoding: dict[int, Request] = {}
        self.prefilling: dict[int, Request] = {}
        self._alarms: list[tuple[int, int, Request]] = []
        self._ctx_base = 0  # sum over decoding of prompt + generated - dec_step0
        self._seq = 0
        self._extra_s = 0.0
        self.now = 0.0
        self.resumed: list[Request] = []  # swapped-in this iteration (for stall accounting)
        self.stall_gaps: list[float] = []  # token gaps caused by preemption
        self.dropped: list[Request] = []
        self.counters = {"preemptions": 0, "recomputes": 0, "swaps": 0, "topups": 0,
                         "restarts": 0, "failed_iterations": 0, "errors": 0,
                         "cancelled": 0}
        self.simulated = False  # ``simulate`` has run it (its state and counters are that run's)

    # ---- hooks for policies -------------------------------------------------------------------
    def enqueue(self, r: Request, front: bool = False) -> None:
        """Put ``r`` in the waiting queue (``front``: a preempted request, first)."""
        raise _missing(self, "enqueue")

    def waiting_count(self) -> int:
        raise _missing(self, "waiting_count")

    def dequeue(self, r: Request) -> bool:
        """Take queued ``r`` (WAITING or SWAPPED) out of the waiting queue (``cancel``); False
        if it is not there."""
        raise _missing(self, "dequeue")

    def admit(self, budget: int, batch: Batch, now: float) -> None:
        """Start new prefills from the waiting queue within ``budget`` tokens."""
        raise _missing(self, "admit")

    def on_alarm(self, r: Request) -> None:
        """``r`` would outgrow its KV blocks in this iteration."""
        raise _missing(self, "on_alarm")

    def grow_prefill(self, r: Request, chunk: int) -> bool:
        """Make room for ``chunk`` more prefill tokens of ``r``; False to skip it this iteration.
        This default takes the blocks the chunk needs while they are free (was: True without
        taking any, so a policy that left it out overcommitted the cache), or with
        ``prefill_preempts`` preempts ``_victim()``s until they are (vLLM's running loop)."""
        need = self.kv.blocks_for(r.prefilled + chunk) - self.kv.owned(r.rid)
        if need <= 0:
            return True
        return self._allocate_or_preempt(r, need, self.now) if self.prefill_preempts else self.kv.allocate(r.rid, need)

    def _victim(self) -> Request:
        """The running request to preempt when one needs blocks that are not free (a policy
        that preempts through ``_allocate_or_preempt``, or with ``prefill_preempts``, implements
        it)."""
        raise NotImplementedError(f"policy {type(self).__name__} preempts for blocks (prefill_preempts or "
                                  "_allocate_or_preempt) but does not implement _victim() (docs/simulator.md, "
                                  "Writing a policy)")

    def _allocate_or_preempt(self, r: Request, blocks: int, now: float) -> bool:
        """Give ``r`` ``blocks`` more blocks, preempting ``_victim()`` after ``_victim()`` (as
        vLLM's running loop does); False if ``r`` itself went."""
        while not self.kv.allocate(r.rid, blocks):
            victim = self._victim()
            self.preempt(victim, now)
            if victim is r:
                return False
        return True

    def prefill_budget(self) -> int:
        """Prefill tokens allowed this iteration: the token budget left after the decodes."""
        return self.token_budget - len(self.decoding)

    def schedule_budget(self) -> int:
        """The prefill tokens ``schedule`` gives this iteration: ``prefill_budget``, which a
        policy may pace across iterations (EcoServe's amortized chunks)."""
        return self.prefill_budget()

    def preempt_swap(self, r: Request) -> bool:
        """True to preempt ``r`` by swapping its KV out, False to recompute it later."""
        return False

    def easy_alarm(self, r: Request) -> bool:
        """Handle ``r``'s alarm if that needs no decision; else False. This default is on-demand
        growth: ``r`` takes one more block while one is free."""
        return self.kv.allocate(r.rid, 1)

    def admission_blocked(self) -> bool:
        """True if ``admit`` would start nothing now (checked without side effects); False if
        unsure (always safe: the engine then calls ``schedule``). Asked when something waits,
        no prefill runs and no alarm is due; a True answer must stay true until the next alarm,
        finish or arrival, or until ``recheck`` (which it may set) comes: the engine relies on
        it. Derived from ``admit``'s own gate: ``schedule`` calls ``admit`` only with budget
        left, and ``admit`` starts the request :meth:`_next_admission` names, so with an empty
        batch the two cannot drift. With ``check=True`` the cost-model executor also compares
        every True answer with :meth:`schedule_dry_run`."""
        budget = self.prefill_budget()
        return budget <= 0 or self._next_admission(budget, NO_BATCH, self.now) is None

    def _next_admission(self, budget: int, batch: Batch, now: float) -> Any:
        """The request ``admit`` starts next with ``budget`` tokens left and ``batch`` built so
        far (with what ``admit`` needs to start it), or None: admission stops here. Side-effect
        free: ``admit`` loops on it and ``admission_blocked`` asks it with an empty batch."""
        raise _missing(self, "_next_admission")

    def schedule_dry_run(self, now: float) -> Batch:
        """The batch ``schedule(now)`` would build (alarms, prefills, ``admit``), run on a deep
        copy of this policy, which stays untouched. Slow: for checks."""
        return copy.deepcopy(self, {id(self.cost): self.cost}).schedule(now)

    def on_decode_start(self, r: Request) -> None: ...

    def on_decode_end(self, r: Request) -> None: ...

    # ---- engine interface ---------------------------------------------------------------------
    def add(self, r: Request, now: float) -> None:
        if self.kv.blocks_for(r.prompt_tokens + 1) > self.kv.num_blocks:
            r.state = State.FINISHED  # can never fit: dropped, counted as unfinished
            self.dropped.append(r)
            return
        r.state = State.WAITING
        self.enqueue(r)

    def has_work(self) -> bool:
        return bool(self.decoding or self.prefilling or self.waiting_count())

    def schedule(self, now: float) -> Batch:
        self.now = now
        self._extra_s = 0.0
        self.resumed.clear()
        alarms = self._alarms
        preempted = self.counters["preemptions"]
        while (r := self._easy_alarms()) is not None:
            heappop(alarms)
            r.alarm_step = -1
            self.on_alarm(r)
            if r.state is DECODE and r.alarm_step == -1:  # not re-armed (nor growing) by on_alarm
                self.set_alarm(r)
        batch = Batch()
        if not self.prefilling and not self.waiting_count():
            batch.decode_requests = len(self.decoding)
            batch.decode_ctx_tokens = self._ctx_base + len(self.decoding) * self.step
            return batch
        budget = self.schedule_budget()
        for r in list(self.prefilling.values()):  # partial prefills hold KV: they go first
            if budget <= 0:
                break
            left = r.prefill_target - r.prefilled
            chunk = min(left, budget) if self.chunked_prefill else left
            if (chunk > budget and batch.prefill_tokens) or r.state != State.PREFILL:
                continue
            if self.grow_prefill(r, chunk):
                batch.add_prefill(r, chunk)
                budget -= chunk
        if budget > 0 and (preempted == self.counters["preemptions"] or self.admits_after_preemption
                           or not self._runs_any(batch)):  # vLLM: an empty step, then it admits
            self.admit(budget, batch, now)
        if preempted != self.counters["preemptions"]:  # drop chunks of requests preempted since
            kept = [(r, c) for r, c, e in batch.prefill if r.state == State.PREFILL and r.epoch == e]
            batch.prefill.clear()
            batch.prefill_tokens = batch.prefill_ctx_tokens = 0
            for r, c in kept:
                batch.add_prefill(r, c)
        batch.decode_requests = len(self.decoding)
        batch.decode_ctx_tokens = self._ctx_base + len(self.decoding) * self.step
        batch.extra_s = self._extra_s
        if self.resumed:  # a swapped-in token's gap spans its preemption: one stall gap, not two
            self.resumed = list({r.rid: r for r in self.resumed if r.rid in self.decoding}.values())
            batch.late_decodes = len(self.resumed)
        return batch

    def _runs_any(self, batch: Batch) -> bool:
        """True if ``batch`` decodes or holds a chunk of a request still prefilling."""
        return bool(self.decoding) or any(r.state == State.PREFILL and r.epoch == e for r, _, e in batch.prefill)

    def decode_only_step(self, recheck_admission: bool = True, now: float | None = None) -> bool:
        """True if this iteration needs no decision: due alarms were all easy (and are now
        handled), no prefill runs and nothing can be admitted. The engine then runs every
        decoding request one step without calling ``schedule`` (the batch it would have built),
        and more steps up to the next finish, arrival or alarm (see the interface for
        ``recheck_admission``)."""
        if self.prefilling or not self.decoding or self._easy_alarms() is not None:
            return False  # ``schedule`` takes the alarm that needs a decision, in the same order
        if not recheck_admission:
            return True
        if now is not None:
            self.now = now  # the time ``admission_blocked`` asks at
        self.recheck = NO_RECHECK  # ``admission_blocked`` may bring it forward
        return not self.waiting_count() or self.admission_blocked()

    def _easy_alarms(self) -> Request | None:
        """Handle the due alarms that need no decision, in order (dropping stale ones); return
        the first request whose alarm needs one, left at the head of the heap, or None. First
        the lazy growth through this step: in one go if the pool covers it and no heap alarm is
        due, else the growers crossing a block boundary now get their heap alarms back."""
        alarms, step, kv = self._alarms, self.step, self.kv
        if kv.grown_step < step:
            if kv.growers:
                self._grow_to_step()
            else:
                kv.grown_step = step  # nothing grows lazily: nothing to apply
        easy, set_alarm = self.easy_alarm, self.set_alarm
        while alarms and alarms[0][0] <= step:
            s, _, r = alarms[0]
            if r.state is not DECODE or r.alarm_step != s:
                heappop(alarms)  # stale: the request was preempted, finished or re-armed
                continue
            if not easy(r):
                return r
            set_alarm(r, replace=True)
        return None

    def _grow_to_step(self) -> None:
        """Apply the lazy growth through this step in one go if the free pool covers it (leaving
        ``growth_keep_free``) and no heap alarm is due; else the growers crossing a block
        boundary now get heap alarms, to be handled in order with the others."""
        alarms, step, kv = self._alarms, self.step, self.kv
        if (not kv.growers or not (alarms and alarms[0][0] <= step)) and kv.advance(step, self.growth_keep_free):
            return
        decoding = self.decoding
        for rid in kv.take_due(step):
            r = decoding[rid]
            r.alarm_step = step
            heappush(alarms, (step, rid, r))

    def complete(self, batch: Batch, now: float) -> list[Request]:
        """Apply the iteration's prefill progress; return requests that started decoding."""
        if not batch.stall_decodes:
            self.step += 1
        joined = []
        for r in self.resumed:
            self.stall_gaps.append(now - r.last_token_s)
            joined.append(r)
        for r, chunk, epoch in batch.prefill:
            if r.state != State.PREFILL or r.epoch != epoch:
                continue
            r.prefilled += chunk
            if r.prefilled >= r.prefill_target:
                del self.prefilling[r.rid]
                r.generated += 1  # the prefill's last position yields the next token
                if r.first_token_s < 0:
                    r.first_token_s = now
                else:
                    self.stall_gaps.append(now - r.last_token_s)
                self.start_decode(r, self.step)
                joined.append(r)
        return joined

    def next_alarm_step(self) -> int:
        """The step of the earliest pending alarm (possibly stale) or by which lazy growth may
        outrun the free pool, or a huge number."""
        first = self._alarms[0][0] if self._alarms else 1 << 62
        if not self.kv.growers:
            return first
        limit = self.kv.growth_limit(self.growth_keep_free)
        return limit if limit < first else first

    def finish(self, r: Request, now: float) -> None:
        self.stop_decode(r)
        r.state = State.FINISHED
        r.finish_s = r.last_token_s = now
        self.kv.release(r.rid)

    def abort(self, r: Request, error: str = "engine error") -> None:
        """End running ``r`` (PREFILL or DECODE) with an error: it leaves the running set, its
        progress is frozen, and all its KV goes back through the same release as ``finish``."""
        if r.state == State.DECODE:
            self.stop_decode(r)
        elif r.state == State.PREFILL:
            del self.prefilling[r.rid]
        else:
            raise ValueError(f"request {r.rid} is {r.state.name}: only running requests can be aborted")
        self.kv.release(r.rid)
        r.state = State.ERRORED
        r.error = error
        r.epoch += 1  # cancels a pending finish event
        self.counters["errors"] += 1

    def cancel(self, r: Request) -> None:
        """End ``r`` at its client's request, wherever it is: running (``abort``: its KV goes
        back) or queued (``dequeue``: taken out of the waiting queue; a swapped request's host
        copy is dropped). It ends ERRORED with the error ``CANCELLED``, counted under
        ``cancelled``, not ``errors``."""
        if r.state in (State.FINISHED, State.ERRORED):
            raise ValueError(f"request {r.rid} has ended ({r.state.name}): nothing to cancel")
        if r.state in (State.WAITING, State.SWAPPED):
            if not self.dequeue(r):
                raise ValueError(f"request {r.rid} is not queued")
            self.kv.release(r.rid)  # (none held; a no-op unless a policy holds KV for queued requests)
            r.swapped_tokens = 0
            r.state, r.error = State.ERRORED, CANCELLED
            r.epoch += 1
        else:  # (a policy's own ``abort(r, error)`` override is called as before)
            self.abort(r, CANCELLED)
            self.counters["errors"] -= 1  # a cancel, not an error
        self.counters["cancelled"] += 1

    def fail_batch(self, batch: Batch, error: str = "engine error") -> list[Request]:
        """The engine raised while running ``batch`` (called instead of ``complete``): every
        request in it (all decodes, the prefill chunks still valid) is aborted, the step advances
        as ``complete`` advances it (not in a prefill-only iteration: was, and the lazy growth of
        the step after it then overran the free pool), and the others go on. Returns the
        aborted requests."""
        failed = {r.rid: r for r, _, epoch in batch.prefill if r.state == State.PREFILL and r.epoch == epoch}
        failed.update(self.decoding)
        for r in failed.values():
            self.abort(r, error)
        if not batch.stall_decodes:  # as ``complete``: the decode clock stays in a stall
            self.step += 1
        self.counters["failed_iterations"] += 1
        return list(failed.values())

    # ---- shared mechanics ---------------------------------------------------------------------
    def start_prefill(self, r: Request) -> None:
        """``r`` got its KV: it joins the running prefills (admission order = ``seq``)."""
        r.state = State.PREFILL
        r.prefilled = 0
        self._seq += 1
        r.seq = self._seq
        self.prefilling[r.rid] = r

    def start_decode(self, r: Request, step: int) -> None:
        r.state = State.DECODE
        r.dec_step0 = step
        self._ctx_base += r.prompt_tokens + r.generated - step
        self.decoding[r.rid] = r
        self.on_decode_start(r)
        self.set_alarm(r)

    def stop_decode(self, r: Request) -> None:
        """Freeze ``r``'s lazily counted progress (and blocks) and take it out of the decoding set."""
        if r.alarm_step == GROWING:
            self.kv.stop_growing(r.rid)
        r.generated = r.generated_at(self.step)
        self._ctx_base -= r.prompt_tokens + r.generated - self.step
        r.state = State.WAITING
        del self.decoding[r.rid]
        self.on_decode_end(r)

    def set_alarm(self, r: Request, replace: bool = False) -> None:
        """Schedule the next step at which ``r`` needs attention (see module docstring), or let
        it grow lazily; ``replace``: this alarm takes the place of ``r``'s due one, the heap's
        first entry."""
        # KV after step s: x + s tokens. The newest token's KV is computed in the next step, so
        # a decode needs one slot less than its context, as vLLM counts (num_computed_tokens).
        x = r.prompt_tokens + r.generated - r.dec_step0 - 1
        a = self.kv.allocs.get(r.rid)
        if a is None:
            step = -self.alarm_lead_tokens - x
        elif self.lazy_blocks and self.kv.grow(r.rid, x):
            r.alarm_step = GROWING
            if replace:
                heappop(self._alarms)
            return
        else:
            step = a.own * self.bs - self.alarm_lead_tokens - x
        if step < self.step:
            step = self.step
        r.alarm_step = step
        (heapreplace if replace else heappush)(self._alarms, (step, r.rid, r))

    def reservation_blocks(self, r: Request) -> int:
        """Blocks for prompt + reserved RL (+ top-ups), covering what ``r`` already generated."""
        tokens = max(r.reservation_tokens, r.prompt_tokens + r.generated + 1)
        return min(self.kv.blocks_for(tokens), self.kv.num_blocks)

    def preempt(self, r: Request, now: float) -> None:
        """Take ``r``'s KV away: swap it to host memory, or drop it and recompute later."""
        if r.state == State.DECODE:
            self.stop_decode(r)
            r.last_token_s = now
        elif r.state == State.PREFILL:
            del self.prefilling[r.rid]
        ctx = r.prompt_tokens + r.generated
        swap = r.generated > 0 and r.prefilled >= r.prefill_target and self.preempt_swap(r)
        self.kv.release(r.rid)
        r.epoch += 1
        r.preemptions += 1
        self.counters["preemptions"] += 1
        if swap:
            r.state = State.SWAPPED
            r.swapped_tokens = ctx
            self._extra_s += self.cost.swap_time(ctx)
            self.counters["swaps"] += 1
        else:
            r.state = State.WAITING
            r.prefill_target = ctx
            r.prefilled = 0
            self.counters["recomputes"] += 1
        self.enqueue(r, front=True)

    def swap_in(self, r: Request) -> None:
        """``r`` (SWAPPED) already got its blocks: copy its KV back and resume decoding."""
        self._extra_s += self.cost.swap_time(r.swapped_tokens)
        self._seq += 1
        r.seq = self._seq
        r.swapped_tokens = 0
        self.start_decode(r, self.step)
        self.resumed.append(r)

    def running(self) -> list[Request]:
        return [*self.decoding.values(), *self.prefilling.values()]

    def used_blocks_after(self, batch: Batch | None = None) -> dict[int, int]:
        """KV blocks each running request occupies once ``batch`` (default: decodes only) has
        run (for ``kv.check``)."""
        # a decode's KV holds its context less the token sampled last (see ``set_alarm``)
        used = {rid: self.kv.blocks_for(r.context_at(self.step + 1) - 1) for rid, r in self.decoding.items()}
        chunks = {r.rid: c for r, c, _ in batch.prefill} if batch else {}
        for rid, r in self.prefilling.items():
            used[rid] = self.kv.blocks_for(r.prefilled + chunks.get(rid, 0))
        return used

    def kv_used_tokens(self) -> int:
        used = self._ctx_base + len(self.decoding) * self.step
        return used + sum(r.prefilled for r in self.prefilling.values()) if self.prefilling else used


def _missing(sched: Scheduler, hook: str) -> NotImplementedError:
    return NotImplementedError(f"policy {type(sched).__name__} does not implement {hook}(), which every "
                               "policy must (docs/simulator.md, Writing a policy)")
