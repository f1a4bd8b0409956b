"""An ``ecoserve_sched`` policy driving transformers' continuous batching (paged KV cache).

Two pieces:

- :class:`PolicyScheduler` subclasses transformers' continuous-batching ``Scheduler`` (the
  class its batch processor asks for every batch) and executes the decisions of any
  ``ecoserve_sched`` policy (``ecoserve``, ``vllm``, ``orca``, ...): the policy object is the same
  one the simulator runs, so reservations, top-ups, ordering and
  preemptions are decided by identical code in both. The adapter only translates: the policy's
  ``Batch`` (prefill chunks + its decoding requests) becomes transformers'
  ``FutureRequestState`` list, preempted requests are reset for recompute, and the engine's
  finishes are reported back to the policy.
- :class:`TransformersEngine` runs requests with arrival times through it, one iteration at a
  time, and returns the tokens plus per-request timing (TTFT, JCT, token times) and one
  :class:`IterationRecord` per iteration (batch shape and duration: what calibration fits). Its
  iterations run in the simulator's serving loop (``serving.py``: arrivals, drop rule, stuck
  check), with :class:`TransformersExecutor` as the executor.

KV accounting: the policy's ``KVCacheManager`` is a ledger over the engine's block pool (same
block size, same number of blocks, one attention group: a model with several is refused). A reservation is a logical hold; transformers fills physical
blocks on demand as tokens are written. Because the ledger never hands out more blocks than the
pool has and a request never writes past its blocks (the policy's invariant), the
engine's on-demand allocation cannot fail; :meth:`PolicyScheduler.schedule_batch` raises if it
ever does.

Faults: if a forward pass (``_generation_step``) raises, the requests of that batch end with
an error (``GenResult.error``; FAILED in transformers, ERRORED in the policy through
``Scheduler.fail_batch``), their engine blocks and ledger blocks are freed, and the other
requests go on, exactly as the simulator's injected faults (``simulate(faults=...)``) model it
(under ``vllm-v0`` a failing prefill-only iteration also ends the waiting decodes, as V0 did).
That is :class:`TransformersEngine`'s loop; under transformers' own manager (``generate_batch``)
a raising forward pass fails every request of the run, and the registration serves no more.

What the engine cannot do (ours): preemption is always by recompute (transformers' CPU
offloading is not driven by the policy), prefix sharing is off (the ledger counts every block).
Cancellation (under transformers' manager) ends a request wherever it is, running or still in
the policy's waiting queue (``Scheduler.cancel``), as transformers' own schedulers do (a
policy of one's own without ``dequeue``: a waiting request runs to the end, with a warning).

Supported transformers: :data:`TRANSFORMERS_RANGE` (this code uses the scheduler base class and
``RequestState`` fields, and steps the batch processor itself; both move between releases).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers

from ..policies import Batch, Scheduler, get_policy
from ..request import SLO, Request, State, check_servable, is_real, is_whole
from ..serving import Executor, LogRow, SimResult, never_fits, serve

#: transformers versions this adapter is tested with (pinned by the ``engines`` extra).
TRANSFORMERS_RANGE = ">=5.24,<5.25"

try:
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching import RequestState, RequestStatus
    from transformers.generation.continuous_batching import Scheduler as HFScheduler
    from transformers.generation.continuous_batching.requests import FutureRequestState
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING
except ImportError as e:  # was: transformers' own ImportError, naming no version (the base install allows 4.46)
    wrong = ImportError(f"ecoserve_sched.engines.transformers_cb needs transformers{TRANSFORMERS_RANGE}, found "
                        f"{transformers.__version__} ({e}); install the engines extra: "
                        "pip install -c constraints.txt -e '.[engines]'")
    wrong.needs_extra = "engines"  # type: ignore[attr-defined]  # the CLIs' boundary: exit 2, this line
    raise wrong from e

logger = logging.getLogger(__name__)
#: Events a :class:`PolicyScheduler` keeps under transformers' manager (a server runs for days);
#: :class:`TransformersEngine` keeps all of its run's.
KEEP_EVENTS = 100_000
#: Policy-side ids of requests given no policy request (unique in the process: a policy may see
#: several schedulers' requests).
_RIDS = itertools.count(1 << 30)


class StepCost:
    """Cost model of the step clock: every non-empty iteration takes 1 s, so the simulator and
    the engine (``clock="step"``) count time in iterations and must agree exactly."""

    name = "step-clock"

    def __init__(self, kv_blocks: int, token_budget: int) -> None:
        self.blocks = kv_blocks
        self.token_budget = token_budget

    def kv_blocks(self, block_size: int) -> int:
        return self.blocks

    def iteration_time(self, prefill_tokens: int, prefill_ctx_tokens: int,
                       decode_requests: int, decode_ctx_tokens: int) -> float:
        return 1.0 if prefill_tokens > 0 or decode_requests > 0 else 0.0

    def swap_time(self, tokens: int) -> float:
        return float(tokens)  # never used: the engine recomputes (see recompute_only)

    def recompute_time(self, tokens: int) -> float:
        return float(-(-tokens // self.token_budget))


def recompute_only(policy: Scheduler) -> Scheduler:
    """Make ``policy`` preempt by recompute only (the engine cannot swap KV under its control)."""
    policy.preempt_swap = lambda r: False  # type: ignore[method-assign]
    return policy


def _async_batching(cache: Any) -> bool:
    """Whether the manager building this scheduler runs async batching. The cache does not
    keep the config (was: read from ``cache.cb_config``, which transformers' cache has not, so
    the refusal never fired): it is read from the manager, the caller that builds the
    scheduler with its ``continuous_batching_config`` (a few frames up at most)."""
    own = getattr(getattr(cache, "cb_config", None), "use_async_batching", None)
    if own is not None:
        return bool(own)
    cfg = _callers("continuous_batching_config")
    return bool(getattr(cfg, "use_async_batching", False)) if cfg is not None else False


def _callers(name: str, depth: int = 6) -> Any:
    """Attribute ``name`` of the nearest transformers object up the call stack (``self`` of a
    caller a few frames up, not the scheduler), or None: what transformers does not hand its
    scheduler (its manager's config, its batch processor's output router)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            break
        caller = frame.f_locals.get("self")
        value = getattr(caller, name, None)
        if value is not None and not isinstance(caller, PolicyScheduler):
            return value
        frame = frame.f_back
    return None


class PolicyDropped(ValueError):
    """The policy dropped a request as it arrived (larger than the whole KV cache, or a prompt
    ``vllm-v0`` ignores): raised by ``add_waiting_request`` after the request is marked FAILED
    and forgotten, so that transformers' manager delivers its failure."""


class PolicyScheduler(HFScheduler):
    """transformers continuous-batching scheduler that executes an ``ecoserve_sched`` policy.

    ``requests`` maps engine request ids to policy :class:`Request` objects carrying the
    predicted RL (bucket, point estimate, reservation) and SLO; an id without an entry gets a
    request that reserves its ``max_new_tokens`` (no prediction). ``clock`` gives the time in
    seconds that the policy sees (wall time by default).
    """

    def __init__(self, cache: Any, safety_margin: float | None, max_requests_per_batch: int, *,
                 policy: Scheduler, requests: dict[str, Request] | None = None,
                 clock: Callable[[], float] | None = None, keep_events: int | None = KEEP_EVENTS) -> None:
        # the engine cannot swap KV under its control: it recomputes (was: done by
        # TransformersEngine alone; a policy given to register_scheduler chose swap, the engine
        # recomputed, and the policy counted the re-prefilled tokens as generated)
        self.policy = recompute_only(policy)
        self.keep_events = keep_events
        self.meta = requests if requests is not None else {}
        self._forks: dict[str, Request] = {}  # return sequences' policy sides, until added
        t0 = time.perf_counter()
        # without a clock of the caller's, a given policy request's arrival_s is on no clock the
        # scheduler reads: it arrives when it is added (was: kept, e.g. 0.0, so a request
        # added minutes into a manager's run counted its TTFT as lost at once)
        self._arrive_now = clock is None
        self.clock = clock or (lambda: time.perf_counter() - t0)
        super().__init__(cache, safety_margin or 0.0, max_requests_per_batch)
        if len(cache.cache_allocators) > 1:  # was: accepted, and a run could fail inside a reservation
            raise ValueError(
                f"this model's KV cache has {len(cache.cache_allocators)} attention groups "
                f"({', '.join(cache.cache_allocators)}): transformers gives each group whole sectors of the "
                "cache, so the policy's ledger of whole-model blocks cannot promise a group its blocks (7 "
                "planned, the 7th refused); serve it with transformers' own scheduler (the vLLM plug-in "
                "refuses such models too)")
        pages = {a.tokens_per_page for a in cache.cache_allocators.values()}
        if pages != {policy.kv.block_size} or cache.use_prefix_sharing:
            raise ValueError(f"engine pages {pages} (prefix sharing {cache.use_prefix_sharing}) must be "
                             f"the policy's block size {policy.kv.block_size}, without prefix sharing")
        if cache.num_blocks < policy.kv.num_blocks:
            raise ValueError(f"engine has {cache.num_blocks} KV blocks, policy plans {policy.kv.num_blocks}")
        if max_requests_per_batch < policy.max_running:
            raise ValueError(f"max_requests_per_batch {max_requests_per_batch} < max_running {policy.max_running}")
        if _async_batching(cache):
            # transformers picks it on CUDA with CUDA graphs unless told not to (was: accepted; a
            # batch is then scheduled before the last one's tokens are known, which the policy's
            # accounting does not follow, and it was never run)
            raise ValueError("async batching is not supported under an ecoserve policy: set "
                             "ContinuousBatchingConfig(use_async_batching=False)")
        budget = getattr(cache, "max_batch_tokens", None)
        if isinstance(budget, int) and budget < policy.token_budget:  # was: every request failed at the first batch
            raise ValueError(f"engine max_batch_tokens {budget} < the policy's token_budget {policy.token_budget}")

    def reset(self) -> None:
        """At the start of every run (transformers' ``__init__``, and each restart of a manager
        kept or reused): a policy that still holds requests of an earlier run is refused, their
        engine states are gone and their ids would be reused (was: a ``KeyError`` mid-run)."""
        p = self.policy
        if p.has_work():
            raise ValueError(f"the policy still holds {p.waiting_count()} waiting and "
                             f"{len(p.prefilling) + len(p.decoding)} running requests of an earlier run (a "
                             "generate_batch or manager that ended with an error?): a policy serves one run; "
                             "register a fresh one (get_policy(...)) with register_scheduler and build a new manager")
        super().reset()
        self.reqs: dict[str, Request] = {}  # engine id -> policy request
        self.states: dict[int, RequestState] = {}  # policy rid -> engine state
        self.held: dict[int, int] = {}  # rid -> epoch, for requests whose KV the engine holds
        # (time, admit|preempt|finish|drop|error|cancel, rid); the last ``keep_events`` (None: all)
        self.events: deque[tuple[float, str, int]] = deque(maxlen=self.keep_events)
        self.last_batch: Batch | None = None
        self._pending: Batch | None = None  # scheduled, not yet reported to policy.complete
        # the request add_waiting_request last refused: transformers then asks its tokens by id,
        # which a refused duplicate shares with the request it duplicates
        self._refused: RequestState | None = None

    # ---- arrivals and finishes ----------------------------------------------------------------
    def add_waiting_request(self, state: RequestState) -> None:
        """Hand a request to the policy. Under transformers' own manager (``generate_batch``),
        what cannot be served raises, and transformers fails that request alone (its batch
        processor catches it): an id still in use (was: two requests shared one block table,
        wrong tokens without a word) or a request longer than the whole KV cache (was: a wait
        forever). Several return sequences are served as that many requests."""
        rid_s = state.request_id
        if state.num_children:  # several return sequences: each its own request, with its own KV
            # (was: transformers forks a prefilled request's blocks, which the ledger does not
            # hold; the forks were never made, and generate_batch waited forever). All are
            # checked before any is added: a refusal fails them all. transformers delivers the
            # first sequence's failure; the others' go through its batch processor's output
            # router (was: never delivered, and generate_batch waited for them until stopped).
            children = [state.fork(f"{rid_s}__child#{i}") for i in range(state.num_children)]
            if (given := self.meta.get(rid_s)) is not None:  # each planned as its request is (was: no
                for child in children:  # prediction, the engine's SLO, a reservation of max_new_tokens)
                    self._forks[child.request_id] = Request(
                        next(_RIDS), given.arrival_s, given.prompt_tokens, given.max_tokens, given.true_output_tokens,
                        given.pred_bucket, given.pred_tokens, given.reserve_tokens, given.slo)
            for child in (state, *children):
                child.num_children = 0
                try:
                    self._check_new(child)
                except ValueError as e:
                    self._refused = state
                    self._fail_sequences(rid_s, children, e)
                    raise
            for i, child in enumerate((state, *children)):
                try:
                    self.add_waiting_request(child)
                except PolicyDropped as e:  # a prompt the policy ignores (vllm-v0), the same for each
                    # sequence: the ones not added fail with it (was: never added nor failed, and
                    # generate_batch waited for them; a reviewer's find)
                    self._fail_sequences(rid_s, children[i:], e)
                    raise
            return
        try:
            r = self._check_new(state)
        except ValueError:
            self._refused = state
            raise
        finally:
            self._forks.pop(state.request_id, None)
        if r is None:
            n = state.max_new_tokens or 1
            r = Request(next(_RIDS), self.clock(), len(state.initial_tokens), n, n,
                        pred_tokens=n, reserve_tokens=n, slo=self.policy.slo)  # (was: SLO(), not the policy's)
        elif self._arrive_now:
            r.arrival_s = self.clock()
        self.reqs[state.request_id] = r
        self.states[r.rid] = state
        super().add_waiting_request(state)
        self.policy.add(r, self.clock())
        if r.state in (State.FINISHED, State.ERRORED):  # dropped: larger than the whole KV cache,
            self.waiting_requests.pop(state.request_id)  # or a prompt vllm-v0 ignores (was: "stuck")
            self._cleanup_waiting_queue({state.request_id})
            state.error = r.error or "prompt does not fit the KV cache"
            state.status = RequestStatus.FAILED
            self.events.append((self.clock(), "drop", r.rid))
            self._forget(r)
            # raised, so that transformers' manager delivers the failure (was: nothing delivered,
            # and generate_batch waited forever for this request's result)
            raise PolicyDropped(f"{state.request_id}: {state.error}")

    def _fail_sequences(self, rid_s: str, others: list[RequestState], e: Exception) -> None:
        """Fail the return sequences ``others`` of request ``rid_s`` with ``e`` through the
        output router of the batch processor that called (transformers delivers the failure of
        the sequence whose arrival raised), and forget their policy sides."""
        router = _callers("output_router")
        if others and (router is None or not hasattr(router, "fail_and_deliver")):
            logger.error("PolicyScheduler: %s fails with its %d other return sequence(s), whose failures cannot "
                         "be delivered here: a caller waits for them until stopped", rid_s, len(others))
        elif router is not None:
            for other in others:
                router.fail_and_deliver(other, e)
        for other in others:
            self._forks.pop(other.request_id, None)

    def _check_new(self, state: RequestState) -> Request | None:
        """Raise for what cannot be served: an id in use, an empty prompt, a request longer than
        the whole KV cache (the serving loop's drop rule). Returns the request's policy side, if
        given."""
        rid_s = state.request_id
        if (old := self.reqs.get(rid_s)) is not None and old.state not in (State.FINISHED, State.ERRORED):
            raise ValueError(f"request id {rid_s!r} is already in use by a request not yet finished")
        if not len(state.initial_tokens):  # as GenRequest refuses it (was, under transformers' manager:
            # another request's token continued, or alone a failed forward pass that ended the loop)
            raise ValueError(f"{rid_s}: the prompt is empty: nothing to generate from")
        r = self.meta.get(rid_s, self._forks.get(rid_s))
        if state.max_new_tokens is None:  # was: planned as 1 token (or the policy's); it grew past it, waited forever
            raise ValueError(f"{rid_s}: max_new_tokens is not set (transformers: no limit); a policy plans each "
                             "request's KV up to its max_new_tokens: set it in the generation config")
        n = state.max_new_tokens  # whole, as transformers' own schedulers take it (6.0 too): was, 2.5 or
        # numpy's int64 killed the manager's thread under ecoserve and left a block held
        if not ((is_whole(n) or (is_real(n) and float(n).is_integer())) and n >= 1):
            raise ValueError(f"{rid_s}: max_new_tokens must be a whole number >= 1, got {n!r}")
        state.max_new_tokens = int(n)  # the same value as an int
        if r is not None:  # the policy side given to register_scheduler: it must describe this request
            check_servable([r])  # fresh (was: a map reused from an earlier run), whole numbers (numpy's: int)
            limit = state.max_new_tokens
            if r.prompt_tokens != len(state.initial_tokens) or r.max_tokens < limit:
                raise ValueError(f"{rid_s}: its policy request has {r.prompt_tokens} prompt tokens and max_tokens "
                                 f"{r.max_tokens}; the request has {len(state.initial_tokens)} and max_new_tokens "
                                 f"{limit} (was: wrong tokens, or KV planned short of the request's limit)")
        # the engine generates up to max_new_tokens whatever the policy side's true length says
        prompt, new = len(state.initial_tokens), max(state.max_new_tokens, r.target_tokens if r else 1)
        cap = self.policy.kv.num_blocks * self.policy.kv.block_size
        if never_fits(Request(-1, 0.0, prompt, new, new), cap):
            raise ValueError(f"{rid_s}: {prompt} prompt + {new} new tokens can never fit the KV cache ({cap} tokens)")
        budget = getattr(self.cache, "max_batch_tokens", None)
        beside = 0 if self.policy.prefill_only_iterations else self.policy.max_running - 1  # decodes, at most
        if not self.policy.chunked_prefill and isinstance(budget, int) and prompt + beside > budget:
            # a policy that prefills whole prompts (orca, vllm-v0), beside the other slots' decodes
            # (none under vllm-v0): was a batch over the engine's budget, and under generate_batch
            # every request of the run failed
            raise ValueError(f"{rid_s}: a {prompt}-token prompt, and policy {self.policy.name!r} prefills whole "
                             f"prompts beside up to {beside} decodes: over the engine's max_batch_tokens ({budget})")
        if self.policy.prefill_only_iterations and isinstance(budget, int) and prompt + new - 1 > budget:
            # vllm-v0 recomputes a preempted request's whole context in one prefill (alone, past
            # its budget: vLLM's budget is at least max_model_len): was, such a batch failed
            # every request of a generate_batch run ("exceeds the engine's")
            raise ValueError(f"{rid_s}: {prompt} prompt + {new} new tokens, and policy {self.policy.name!r} "
                             f"recomputes a preempted request's whole context in one prefill (up to "
                             f"{prompt + new - 1} tokens): over the engine's max_batch_tokens ({budget})")
        return r

    def finish_request(self, request_id: str) -> None:
        """A request ended: finished, or FAILED by transformers (``fail_all_requests``, after a
        forward pass raised: it marks each running request FAILED, then calls this). A failure
        is an error in the policy too: the batch that raised is failed, not completed (was: its
        tokens credited, and its decodes recorded as finished), and a request still running is
        aborted, so its ledger blocks come back."""
        st = self.active_requests.get(request_id) or self.waiting_requests.get(request_id)
        failed = st is not None and st.status == RequestStatus.FAILED
        # a hard stop (manager.stop(hard_stop=True)) fails them too, after the last batch ran
        # (transformers' words for it): that batch is completed, its requests then aborted
        stopped = failed and str(st.error).startswith("Generation loop finished")
        if failed and not stopped and self._pending is not None:
            batch, self._pending = self._pending, None
            for r in self.policy.fail_batch(batch, str(st.error or "engine error")):
                self.held.pop(r.rid, None)
                self.events.append((self.clock(), "error", r.rid))
        else:
            self._flush()
        r = self.reqs.get(request_id)
        if r is not None and failed and r.state in (State.PREFILL, State.DECODE):
            self.policy.abort(r, str(st.error or "engine error"))
            self.held.pop(r.rid, None)
            self.events.append((self.clock(), "error", r.rid))
        elif r is not None and r.state == State.DECODE:
            self.policy.finish(r, self.clock())
            self.held.pop(r.rid, None)
            self.events.append((self.clock(), "finish", r.rid))
        super().finish_request(request_id)
        if r is not None and r.state in (State.FINISHED, State.ERRORED):
            self._forget(r)

    def _forget(self, r: Request) -> None:
        """Drop an ended request from the maps (a long-running manager held every request it
        had served: 1,500 served, 1,500 prompts kept)."""
        st = self.states.pop(r.rid, None)
        if st is not None and self.reqs.get(st.request_id) is r:
            del self.reqs[st.request_id]

    def clear_cancelled_requests(self) -> list[RequestState]:
        """Cancel what the manager was asked to cancel (``manager.cancel_request``), as
        transformers' own schedulers do: a running request ends (its blocks are freed), and one
        waiting in the policy's queue is taken out of it (``Scheduler.cancel``; was: it ran to
        the end, with a warning). The policy counts both under ``cancelled``."""
        with self._cancellation_lock:
            ids, self._requests_to_cancel = self._requests_to_cancel, set()
        self._flush()
        cancelled = []
        for rid_s in ids:
            r = self.reqs.get(rid_s)
            if r is None or r.state in (State.FINISHED, State.ERRORED):
                continue
            try:
                self.policy.cancel(r)
            except NotImplementedError as e:  # a policy without ``dequeue`` (its own): as before
                logger.warning("PolicyScheduler: %s waits in the policy's queue and cannot be cancelled "
                               "(%s); it runs to the end", rid_s, e)
                continue
            self.held.pop(r.rid, None)
            self.cache.free_blocks(rid_s)
            st = self.active_requests.pop(rid_s, None) or self.waiting_requests.pop(rid_s, None)
            if rid_s in self.waiting_requests_order:
                self.waiting_requests_order.remove(rid_s)
            if st is not None:
                cancelled.append(st)
            self.events.append((self.clock(), "cancel", r.rid))
            self._forget(r)
        return cancelled

    def iteration_done(self, now: float) -> None:
        """The engine finished the scheduled forward pass at ``now``: report it to the policy
        (called by :class:`TransformersEngine`; otherwise done lazily at the next call)."""
        self._flush(now)

    def _flush(self, now: float | None = None) -> None:
        if self._pending is not None:
            batch, self._pending = self._pending, None
            self.policy.complete(batch, self.clock() if now is None else now)

    # ---- one batch ----------------------------------------------------------------------------
    def schedule_batch(self, token_budget: int, cache_budget: int
                       ) -> tuple[list[FutureRequestState] | None, bool, int, int]:
        self._refused = None  # asked for at once or never
        self._flush()
        now = self.clock()
        batch = self.policy.schedule(now)
        self.last_batch = batch
        for rid, epoch in list(self.held.items()):  # preempted by the policy: drop KV, recompute
            r = self.reqs[self.states[rid].request_id]
            if r.epoch != epoch or r.state not in (State.PREFILL, State.DECODE):
                self._preempt(self.states[rid], now)
        n_tokens = batch.prefill_tokens + batch.decode_requests
        if n_tokens > token_budget:
            raise RuntimeError(f"policy batch of {n_tokens} tokens exceeds the engine's {token_budget}")
        out: list[FutureRequestState] = []
        moved: set[str] = set()
        # Decodes in the policy's order (no sort: the RL groups that once laid them out bucket by
        # bucket are gone); none in a prefill-only iteration (``stall_decodes``: vllm-v0).
        decodes = [] if batch.stall_decodes else list(self.policy.decoding.values())
        if len(decodes) != batch.decode_requests:
            raise RuntimeError(f"policy batch has {batch.decode_requests} decodes, "
                               f"{len(decodes)} requests are decoding")
        for r in decodes:
            out.append(self._take(r, 1, moved))
        for r, chunk, _ in batch.prefill:
            if r.rid not in self.held:
                self.events.append((now, "admit", r.rid))
            out.append(self._take(r, chunk, moved))
        if moved:  # (a rebuild of the whole waiting order otherwise, every iteration)
            self._cleanup_waiting_queue(moved)
        if not out:
            return [], False, 0, 0
        self._pending = batch
        fast = self.cache.max_blocks_per_request > 0 and all(
            f.query_length == 1 and f.state.position_offset < self.cache.max_decode_fast_path_length
            for f in out)
        kv_read = sum(f.state.current_len() for f in out)
        return out, fast, n_tokens, min(kv_read, cache_budget)

    def fail_batch(self, now: float, error: str) -> list[Request]:
        """The forward pass of the last scheduled batch raised: end its requests with ``error``
        (FAILED here, ERRORED in the policy), free their engine blocks and ledger blocks; the
        other requests stay queued or running. Returns the failed policy requests."""
        batch, self._pending = self._pending, None
        if batch is None:
            return []
        failed = self.policy.fail_batch(batch, error)
        for r in failed:
            st = self.states[r.rid]
            self.held.pop(r.rid, None)
            self.cache.free_blocks(st.request_id)
            self.active_requests.pop(st.request_id, None)
            st.status = RequestStatus.FAILED
            st.error = error
            self.events.append((now, "error", r.rid))
            self._forget(r)
        return failed

    def _take(self, r: Request, n: int, moved: set[str]) -> FutureRequestState:
        """Put ``n`` tokens of ``r`` in the batch (its physical blocks are allocated here)."""
        st = self.states[r.rid]
        if not self.cache.can_store_request_tokens(st, n):
            raise RuntimeError(f"{st.request_id}: engine refused {n} tokens inside the policy's "
                               f"reservation ({self.policy.kv.owned(r.rid)} blocks)")
        rid_s = st.request_id
        if rid_s in self.waiting_requests:  # (re)admitted: the engine now holds its KV
            self.active_requests[rid_s] = self.waiting_requests.pop(rid_s)
            moved.add(rid_s)
        self.held[r.rid] = r.epoch
        if st.status != RequestStatus.DECODING or st.remaining_prefill_tokens:
            rest = st.remaining_prefill_tokens
            st.tokens_to_process, st.remaining_prefill_tokens = rest[:n], rest[n:]
            st.status = RequestStatus.PREFILLING if st.remaining_prefill_tokens else RequestStatus.DECODING
        return FutureRequestState(st, not st.remaining_prefill_tokens, {}, n)

    def get_active_request_static_outputs(self, request_id: str) -> list[int]:
        """The tokens a request generated, for transformers' failed output (a hard stop, a
        forward pass that raised): a request this scheduler preempted waits to re-prefill with
        its tokens kept (was: [], its partial output lost, where transformers' own preemption
        returns it). A request just refused gets its own, none, where transformers asks by its
        id (was: a refused duplicate id's failed output carried the running request's tokens)."""
        refused, self._refused = self._refused, None
        if refused is not None and refused.request_id == request_id:
            return list(refused.generated_tokens)
        st = self.active_requests.get(request_id) or self.waiting_requests.get(request_id)
        if st is None and (r := self.reqs.get(request_id)) is not None:
            # transformers' fail_all_requests pops a waiting request before it asks (was: [], so a
            # preempted request's tokens were lost on a hard stop)
            st = self.states.get(r.rid)
        return st.generated_tokens if st is not None else []

    def _preempt(self, st: RequestState, now: float) -> None:
        """Free ``st``'s blocks and queue it to re-prefill prompt + generated tokens."""
        rid = self.reqs[st.request_id].rid
        self.held.pop(rid)
        self.cache.free_blocks(st.request_id)
        st.remaining_prefill_tokens = st.initial_tokens + st.generated_tokens
        st.tokens_to_process = []
        st.position_offset = 0
        st.status = RequestStatus.PREFILLING
        self.active_requests.pop(st.request_id, None)
        self.waiting_requests[st.request_id] = st
        self.waiting_requests_order.append(st.request_id)
        self.events.append((now, "preempt", rid))


def register_scheduler(name: str, policy: Scheduler, requests: dict[str, Request] | None = None,
                       clock: Callable[[], float] | None = None, keep_events: int | None = KEEP_EVENTS) -> str:
    """Make ``ContinuousBatchingConfig(scheduler_type=name)`` build a :class:`PolicyScheduler`
    over ``policy`` (so ``model.generate_batch`` and the manager use it too); returns ``name``.
    ``requests`` maps engine request ids to fresh policy requests (unique ids); their
    ``arrival_s`` is read on ``clock`` if one is given, else each arrives when it is added."""
    if requests:
        check_servable(list(requests.values()))  # was: two sharing an id lost one request's output
    SCHEDULER_MAPPING[name] = functools.partial(PolicyScheduler, policy=policy, requests=requests,
                                                clock=clock, keep_events=keep_events)
    return name


# ---- the engine ---------------------------------------------------------------------------------
@dataclass(slots=True)
class GenRequest:
    """One request for :meth:`TransformersEngine.generate`; predictions are optional."""

    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    pred_tokens: int = 0  # predicted RL (0: unknown)
    reserve_tokens: int = 0  # reservation R (0: reserve max_new_tokens)
    pred_bucket: int = -1
    slo: SLO | None = None  # None: the engine's (was: SLO(), whatever the engine's, which its policy's rules did not read)

    def __post_init__(self) -> None:  # was: a NaN arrival served forever, an empty prompt generated tokens
        ids = self.prompt_ids
        if isinstance(ids, str | bytes):  # was: accepted, then "too many dimensions 'str'"
            raise TypeError("GenRequest: prompt_ids must be token ids (tokenize the text first), got text")
        if isinstance(ids, torch.Tensor | np.ndarray):  # a 1-D tensor or array of ids: as a list
            if ids.ndim != 1:
                raise ValueError(f"GenRequest: prompt_ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if not ids:
            raise ValueError("GenRequest: prompt_ids is empty")
        if bad := [v for v in ids if not (is_whole(v) and v >= 0)]:  # was: 1.5 accepted silently
            raise ValueError(f"GenRequest: prompt_ids must be whole numbers >= 0, got {bad[0]!r}")
        self.prompt_ids = [int(v) for v in ids]
        for name, lo in (("pred_tokens", 0), ("reserve_tokens", 0), ("pred_bucket", -1)):
            v = getattr(self, name)  # was: NaN or 2.5 failed inside the policy, mid-run; -5 taken
            if not (is_whole(v) and v >= lo):
                raise ValueError(f"GenRequest: {name} must be a whole number >= {lo}, got {v!r}")
            setattr(self, name, int(v))  # numpy's integers (a predictor's output) as int
        n = self.max_new_tokens
        if not (is_whole(n) and n >= 1):
            raise ValueError(f"GenRequest: max_new_tokens must be a whole number >= 1, got {n!r}")
        self.max_new_tokens = int(n)
        a = self.arrival_s
        if not (is_real(a) and a >= 0):
            raise ValueError(f"GenRequest: arrival_s must be a finite number >= 0, got {a!r}")
        if self.slo is not None and not isinstance(self.slo, SLO):  # was: accepted, then the run stopped when it arrived
            raise TypeError(f"GenRequest: slo must be an SLO(ttft_s, tbt_s), got {type(self.slo).__name__}")


@dataclass(slots=True)
class GenResult:
    rid: int
    arrival_s: float
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # engine time of each output token
    preemptions: int = 0
    dropped: bool = False
    error: str | None = None  # why it ended without finishing: its forward pass failed, or vllm-v0 ignored its prompt

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s if self.token_times else float("nan")

    @property
    def jct_s(self) -> float:
        return self.token_times[-1] - self.arrival_s if self.token_times else float("nan")


@dataclass(slots=True)
class IterationRecord:
    """One engine iteration: its batch shape (the cost model's inputs), when it ran on the
    engine's clock, and its measured wall time (also on the step clock)."""

    start_s: float
    end_s: float
    prefill_tokens: int
    prefill_ctx_tokens: int
    decode_requests: int
    decode_ctx_tokens: int
    measured_s: float

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass
class EngineRun:
    policy: str
    clock: str
    results: list[GenResult]
    iterations: list[IterationRecord]
    counters: dict[str, int]
    events: list[tuple[float, str, int]]
    wall_s: float
    result: SimResult | None = None  # the serving loop's record: policy requests, iteration log

    def samples(self) -> list[tuple[float, float, float, float, float]]:
        """Iterations as ``cost_model.fit_profile`` rows (shape..., measured seconds)."""
        return [(i.prefill_tokens, i.prefill_ctx_tokens, i.decode_requests, i.decode_ctx_tokens,
                 i.measured_s) for i in self.iterations]


#: ``ContinuousBatchingConfig`` fields the engine sets from its own arguments.
_CB_SET_HERE = frozenset(("page_size", "block_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
                          "allow_block_sharing", "use_async_batching", "scheduler_type"))  # block_size:
# transformers' older name of page_size, which it still takes (was: let through, then a page-size error)


class TransformersEngine:
    """Generate with a transformers causal LM, batched continuously under an ecoserve policy.

    ``clock="wall"`` serves requests at their arrival times in real time and measures every
    iteration; ``clock="step"`` makes each iteration last exactly 1 (arrival times are then in
    iterations), which makes a run deterministic and comparable one-to-one with the simulator
    over :class:`StepCost`. ``cost`` is the cost model the policy plans with (EcoServe's
    time-synced prefill budget, SLO ordering); by default :class:`StepCost`.
    """

    def __init__(self, model: Any, policy: str = "ecoserve", cost: Any = None, *,
                 block_size: int = 16, kv_blocks: int = 256, token_budget: int = 512,
                 max_running: int = 64, slo: SLO | None = None, clock: str = "wall",
                 eos_token_id: int | None = None, cb_overrides: dict[str, Any] | None = None,
                 **policy_kw: Any) -> None:
        if clock not in ("wall", "step"):
            raise ValueError(f"clock must be 'wall' or 'step', got {clock!r}")
        if not (is_whole(block_size) and block_size >= 4):  # transformers' least page size (was: its
            raise ValueError(f"block_size must be a whole number >= 4, got {block_size!r}")  # page_size error)
        if slo is not None and not isinstance(slo, SLO):
            raise TypeError(f"slo must be an SLO(ttft_s, tbt_s), got {type(slo).__name__}")
        self.model = model
        self.policy_name = policy
        self.cost = cost
        self.block_size, self.kv_blocks = block_size, kv_blocks
        self.token_budget, self.max_running = token_budget, max_running
        self.slo = slo or SLO()
        self.clock = clock
        self.eos_token_id = eos_token_id
        self.cb_overrides = cb_overrides or {}
        if set_here := sorted(set(self.cb_overrides) & _CB_SET_HERE):  # was: a TypeError that left the
            raise ValueError(f"cb_overrides: {', '.join(set_here)} is set by the engine "  # scheduler registered
                             "(from its own arguments; async batching is not supported)")
        self.policy_kw = policy_kw
        self.policy: Scheduler | None = None  # the last run's policy (counters, KV ledger)
        self.scheduler: PolicyScheduler | None = None  # the last run's engine-side scheduler
        self._now = 0.0

    def make_policy(self) -> Scheduler:
        """A fresh policy over this engine's KV pool and token budget (recompute-only)."""
        cost = self.cost or StepCost(self.kv_blocks, self.token_budget)
        p = get_policy(self.policy_name, cost, kv_blocks=self.kv_blocks, block_size=self.block_size,
                       token_budget=self.token_budget, max_running=self.max_running, slo=self.slo,
                       **self.policy_kw)
        return recompute_only(p)

    def to_requests(self, reqs: Sequence[GenRequest], oracle: bool = False) -> list[Request]:
        """Policy-side requests (rid = index); true length = ``max_new_tokens`` (EOS is off)."""
        out = []
        for i, g in enumerate(reqs):
            pred = g.max_new_tokens if oracle else (g.pred_tokens or g.max_new_tokens)
            res = g.max_new_tokens if oracle else (g.reserve_tokens or g.pred_tokens or g.max_new_tokens)
            out.append(Request(i, g.arrival_s, len(g.prompt_ids), g.max_new_tokens, g.max_new_tokens,
                               pred_bucket=g.pred_bucket, pred_tokens=pred, reserve_tokens=res, slo=g.slo or self.slo))
        return out

    @torch.inference_mode()
    def generate(self, reqs: Sequence[GenRequest],
                 on_iteration: Callable[[IterationRecord], None] | None = None) -> EngineRun:
        """Serve ``reqs`` (arrival times relative to the start) and return tokens and timings."""
        if not reqs:
            raise ValueError("generate: no requests")
        if getattr(self.model, "_cached_continuous_batching_manager", None) is not None:
            # transformers would hand back that manager, with its own scheduler (was: a traceback
            # after some batches, and the user's manager destroyed)
            raise ValueError("generate: the model holds a persistent continuous-batching manager "
                             "(generate_batch(persistent_manager=True)); call "
                             "model.destroy_cached_continuous_batching_manager() first")
        config = self.model.config
        vocab = getattr(config, "vocab_size", None)
        # a hard limit only for learned position embeddings (OPT, GPT-2: an IndexError past them);
        # rotary models compute positions past their nominal length
        rotary = any(getattr(config, a, None) is not None
                     for a in ("rope_parameters", "rope_scaling", "rope_theta", "rotary_dim", "rotary_pct"))
        positions = None if rotary else (getattr(config, "max_position_embeddings", None)
                                         or getattr(config, "n_positions", None))
        eos = self.eos_token_id  # was: an id outside the vocabulary taken, and the end never came
        if eos is not None and not (is_whole(eos) and eos >= 0 and (vocab is None or eos < vocab)):
            raise ValueError(f"generate: eos_token_id {eos!r} is not a token id of the model's vocabulary"
                             + (f" (0 to {vocab - 1})" if vocab is not None else "") + "; None: no end token")
        for i, g in enumerate(reqs):  # was: one bad request failed every request of its batch
            if vocab is not None and (top := max(g.prompt_ids)) >= vocab:
                raise ValueError(f"generate: request {i}: token id {top} is outside the model's "
                                 f"vocabulary ({vocab} ids)")
            if positions and (n := len(g.prompt_ids) + g.max_new_tokens) > positions:
                raise ValueError(f"generate: request {i}: {len(g.prompt_ids)} prompt + {g.max_new_tokens} new "
                                 f"tokens ({n}) exceed the model's {positions} positions")
        policy = self.policy = self.make_policy()
        preqs = self.to_requests(reqs, oracle=policy.prediction_override == "oracle")
        meta = {f"r{r.rid}": r for r in preqs}
        name = register_scheduler(f"ecoserve_sched-{id(self)}", policy, meta, lambda: self._now, keep_events=None)
        # a policy that does not chunk prompts (orca, vllm-v0) runs a whole prompt, or the
        # recompute of prompt and generated tokens, alone past its budget: transformers' batch
        # must hold it (the simulator's does; the engine stopped with "exceeds the engine's")
        # (at most the whole KV cache: a longer request is dropped; was: a huge max_new_tokens
        # sized transformers' buffers, up to a MemoryError before anything ran)
        cap = self.kv_blocks * self.block_size
        most = self.token_budget if policy.chunked_prefill else max(
            self.token_budget, min(cap, max(len(g.prompt_ids) + g.max_new_tokens for g in reqs)) + self.max_running)
        manager = None
        try:  # from the registration on (was: a config or manager that failed left it registered,
            cb = ContinuousBatchingConfig(  # holding the policy and every request of the run)
                page_size=self.block_size, num_blocks=self.kv_blocks, max_batch_tokens=most,
                max_requests_per_batch=self.max_running, allow_block_sharing=False,
                use_async_batching=False, scheduler_type=name, **self.cb_overrides)
            gen = GenerationConfig(do_sample=False, max_new_tokens=max(g.max_new_tokens for g in reqs),
                                   eos_token_id=-1 if self.eos_token_id is None else self.eos_token_id)
            manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
            manager.warmup()
            return self._loop(manager, reqs, preqs, on_iteration)
        finally:
            SCHEDULER_MAPPING.pop(name, None)
            if manager is not None:
                if manager._original_attn_impl is not None:  # undo the switch to a paged attention
                    self.model.set_attn_implementation(manager._original_attn_impl)
                manager.destroy()

    def _loop(self, manager: Any, reqs: Sequence[GenRequest], preqs: list[Request],
              on_iteration: Callable[[IterationRecord], None] | None) -> EngineRun:
        ex = TransformersExecutor(self, manager, reqs, on_iteration)
        self.scheduler = ex.sched
        order = sorted(preqs, key=lambda r: (r.arrival_s, r.rid))
        try:
            sim = serve(ex, SimResult(self.policy_name, "transformers", "", order, self.kv_blocks * self.block_size,
                                      self.block_size))
        except BaseException as e:  # Ctrl-C, a policy's or on_iteration's error: the tokens so far stay
            e.partial_run = EngineRun(self.policy_name, self.clock, ex.results, ex.iterations,  # type: ignore[attr-defined]
                                      dict(ex.sched.policy.counters), list(ex.sched.events),
                                      time.perf_counter() - ex.t0)
            raise
        for res, r in zip(ex.results, preqs, strict=True):
            res.preemptions = r.preemptions
            if r.state == State.ERRORED and res.error is None:  # a prompt vllm-v0 ignored
                res.error = r.error
        return EngineRun(self.policy_name, self.clock, ex.results, ex.iterations, sim.counters, list(ex.sched.events),
                         time.perf_counter() - ex.t0, sim)


class TransformersExecutor(Executor):
    """The serving loop's executor for :class:`TransformersEngine`: one forward pass of
    transformers' batch processor per iteration, under the engine's :class:`PolicyScheduler`.
    On the wall clock an iteration lasts what it took (and idle time is slept); on the step
    clock it lasts exactly 1."""

    own_clock = True  # the policy reads the engine's time (``engine._now``): keep it in step

    def __init__(self, engine: TransformersEngine, manager: Any, reqs: Sequence[GenRequest],
                 on_iteration: Callable[[IterationRecord], None] | None) -> None:
        self.engine, self.model, self.reqs, self.on_iteration = engine, engine.model, reqs, on_iteration
        self.bp = manager.batch_processor
        self.sched: PolicyScheduler = self.bp.scheduler
        self.name = engine.policy_name
        self.kv_blocks, self.block_size = engine.kv_blocks, engine.block_size
        self.wall = engine.clock == "wall"
        self.eos = -1 if engine.eos_token_id is None else engine.eos_token_id
        self.results = [GenResult(i, g.arrival_s) for i, g in enumerate(reqs)]
        self.iterations: list[IterationRecord] = []
        self.t0 = time.perf_counter()
        engine._now = 0.0

    def clock(self, now: float) -> float:
        if self.wall:
            now = time.perf_counter() - self.t0
        self.engine._now = now
        return now

    def add(self, r: Request, now: float) -> None:
        g = self.reqs[r.rid]
        with contextlib.suppress(PolicyDropped):  # its reason is read from the policy's request
            self.sched.add_waiting_request(RequestState(f"r{r.rid}", list(g.prompt_ids),
                                                        max_new_tokens=g.max_new_tokens, eos_token_id=self.eos))

    def drop(self, r: Request) -> None:
        """The serving loop's drop rule (larger than the whole KV cache): recorded as a drop
        made after admission is (was: no ``drop`` event)."""
        self.results[r.rid].dropped = True
        self.sched.events.append((self.sched.clock(), "drop", r.rid))

    def has_work(self) -> bool:
        return self.sched.has_pending_requests()

    def waiting(self) -> int:
        return len(self.sched.waiting_requests) + len(self.sched.active_requests)

    def close(self, res: SimResult) -> None:
        """As the simulator's: the policy's counters and its stall gaps (the token gaps across
        preemptions and vllm-v0's prefill-only iterations; the record's TBT lacked them)."""
        policy = self.sched.policy
        res.stall_gaps = policy.stall_gaps
        res.counters = dict(policy.counters)
        res.prefill_iterations = sum(1 for it in self.iterations if it.prefill_tokens)

    def wait(self, until: float) -> float:
        if self.wall:
            time.sleep(max(0.0, until - (time.perf_counter() - self.t0)))
        return until

    def _advance(self, now: float) -> float:
        """The engine's time after a forward pass that started at ``now``."""
        self.engine._now = time.perf_counter() - self.t0 if self.wall else now + 1.0
        return self.engine._now

    def run(self, now: float, until: float) -> LogRow | None:
        w0 = time.perf_counter()
        bp, sched = self.bp, self.sched
        if not bp.prepare_next_batch():
            return None
        batch = sched.last_batch
        scheduled = [(f.state, f.state.generated_len()) for f in bp.inputs_and_outputs.requests_in_batch]
        policy = sched.policy
        try:
            bp._generation_step(self.model)
        except Exception as e:  # this batch's requests fail; the others go on
            end = self._advance(now)
            for r in sched.fail_batch(end, f"{type(e).__name__}: {e}"):
                self.results[r.rid].error = r.error
            decodes, kv, blocks = 0, policy.kv_used_tokens(), policy.kv.allocated_blocks
        else:
            end = self._advance(now)
            sched.iteration_done(end)
            # KV as the simulator logs it: at the end of the iteration, before finishes free it
            decodes = batch.decode_requests - batch.late_decodes
            kv, blocks = policy.kv_used_tokens(), policy.kv.allocated_blocks
            bp.update_batch()
            for st, before in scheduled:  # stamped at the end the policy saw (was: after update_batch)
                res = self.results[int(st.request_id[1:])]
                for tok in st.generated_tokens[before:]:
                    res.tokens.append(tok)
                    res.token_times.append(end)
        rec = IterationRecord(now, end, batch.prefill_tokens, batch.prefill_ctx_tokens,
                              batch.decode_requests, batch.decode_ctx_tokens, time.perf_counter() - w0)
        self.iterations.append(rec)
        if self.on_iteration is not None:
            self.on_iteration(rec)
        return (end, end - now, 1, decodes, kv, blocks)
