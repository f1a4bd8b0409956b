"""EcoServe's decision rules as pure functions: shared by the simulator policy
(``policies/ecoserve.py``) and usable by an engine plug-in (``engines/vllm_scheduler.py``).

Nothing here holds state or reads the true response length. Every rule takes what an engine
knows (prompt and generated tokens, the prediction, the SLO, the cost model's numbers) and
returns a number; each parameter is derived from the cost model or the SLO, none is fitted to a
trace (docs/scheduler.md, "EcoServe").

- ``service_s``: a request's predicted cost in server-seconds: its prefill compute plus its
  decode's dominant share of the server (KV-token-seconds / capacity, or slot-seconds / sequence
  slots, whichever is larger). The ordering key.
- ``priority_key``: the static heap key, ``arrival + aging x service`` (shortest predicted work
  first, with aging: a request is overtaken only by requests that arrived less than ``aging``
  times the difference of their service times after it).
- ``ttft_lost``: a waiting request that can no longer meet its TTFT SLO ("give way").
- ``lost_key``: an order among requests whose TTFT is lost: shortest predicted service first
  (``ecoserve-lostsjf``; the default keeps ``priority_key`` for them).
- ``reservation_tokens``: the response tokens reserved for a request: the reservation base (the
  prediction's reservation, an upper quantile), doubled each time the request outgrows it
  (top-up).
- ``projected_peak``: the KV a set of running requests will need at its peak, if each grows one
  token per step and ends at its reservation (reservations overlap in time: aggregate KVC
  pipelining).
- ``victim_key``: which running request to preempt when KV runs out (``victim_index``: the
  same over arrays, for the simulator's many running requests).
- ``tbt_slack_s`` (``tbt_slacks_s``: over arrays), ``park_due_s``, ``OfferedLoad``: parking. A
  decoding request whose mean-TBT SLO leaves it slack may be preempted (parked) so that a
  waiting request that can still meet its TTFT, and would not after another
  ``PARK_WITHIN_TTFTS`` (``park_for``), gets its KV; it resumes once its slack is down to one
  TTFT SLO, or earlier if nothing else that can meet its TTFT waits. Only while the offered
  load (predicted service seconds arriving per second over ``PARK_WINDOW_S``) is below
  ``PARK_MAX_LOAD``: a burst on a server with room to catch up, not a server that is full for
  good (parking there only moves work around and pays the resume).
- ``PredictionScale`` (opt-in): how this server's responses run against their predictions (the
  median of generated / predicted over recent finishes); a new request's predicted length is
  multiplied by it, so a predictor trained on other traffic keeps its ranking and takes this
  traffic's scale.
- ``PrefillBudget``: the TBT-aware prefill budget: the most prompt tokens an iteration with
  decodes can take and stay within ``iter_time_frac`` x the TBT SLO by the cost model
  (time-synced batching), at least the roofline knee.
- ``amortized_chunk``, ``amortized_chunk_pays``, ``repay_steps``: amortized chunks, for a mean-TBT SLO. While prompts
  wait beyond that budget, one chunk of the whole token budget (or, where that does not pay,
  of what one decode-only iteration repays exactly) followed by decode-only iterations, as
  many as bring the mean iteration time back to the budget's, when that moves more prompt
  tokens a second (each iteration with a prefill pays a fixed cost).
- ``Projection``: the running requests kept for ``projected_peak`` with a candidate: a running
  total of reservations and the requests sorted by projected end, updated as they start, leave
  or outlive their reservation (one pass per test, not a sort).
- The numbers both engines derive the same way: ``cache_step_s`` (``service_s``'s time scale
  from the cost model), ``prefill_floor`` (the budget's least prompt tokens), ``ttft_est_s``
  (the TTFT estimate ``ttft_lost`` and ``park_for`` take), ``prediction_within`` (a prediction
  within ``max_tokens``), ``topups`` (the doublings counted), ``keep_free_blocks`` and
  ``admission_cap_tokens`` (the admission test's cache size), ``swap_cheaper``.

Using them from vLLM's scheduler (``engines/vllm_scheduler.py``), with vLLM's own objects
and, with ``ECOSERVE_PROFILE``, the same cost model: predictions go through
``prediction_within(x, max_tokens)``; the waiting-queue key is ``priority_key(arrival_time,
service_s(recompute_time(num_prompt_tokens), num_prompt_tokens, rl_pred_tokens,
cache_step_s(cost, num_gpu_blocks x block_size), num_gpu_blocks x block_size, max_num_seqs),
aging)`` (without a profile, ``ECOSERVE_PREFILL_S_PER_TOKEN`` x tokens and ``ECOSERVE_STEP_S``);
before popping a waiting request, ``ttft_lost(now, arrival_time, slo_ttft, ttft_est_s(num_tokens,
this step's prompt budget, this step's time by the cost model or iter_time_frac x slo_tbt))``
moves it behind the others; admission asks, besides vLLM's own block check,
``Projection.demand(engine_step, (prompt tokens, reservation_tokens(rl_reserve_tokens, 0,
max_tokens)), limit=cap) <= cap`` with ``cap = admission_cap_tokens(blocks - keep_free_blocks +
shared, block_size, running + 1)`` (``Projection.set`` on admission with ``x = num_tokens -
step`` and ``gx = num_output_tokens - step``, ``drop`` on finish or preemption); the preemption
order is ``max(running, key=victim_key(first token or now, arrival, slo_ttft, reservation base, generated, max_tokens, seq))``; with a profile, each step's
token budget is the decodes plus ``PrefillBudget(iteration_time, iter_time_frac x slo_tbt,
prefill_floor(cost, budget))(budget - decodes, decodes, their computed tokens plus one each, the
first partial prefill's num_computed_tokens)``, or, while prompts wait beyond it,
``amortized_chunk(iteration_time, budget - decodes, that budget, its time, ...)`` and then no
prompt tokens for ``repay_steps(the step's time, that budget's time, the decodes' time)``
steps; before each step, with a free sequence slot and prompt budget left after the running
requests' tokens, if the waiting head satisfies ``park_for`` and does not fit while ``OfferedLoad.load(now) <
PARK_MAX_LOAD``, the running request with the largest ``tbt_slack_s`` (above
``PARK_MIN_SLACK_TTFTS x slo_ttft``) is preempted and held until ``park_due_s``; finished
requests count ``topups``.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Hashable, Iterable
from itertools import islice
from typing import Any

import numpy as np

from ..cost_model import prefill_ctx_tokens


def service_s(prefill_s: float, prompt_tokens: int, pred_tokens: int, step_s: float,
              kv_tokens: int, slots: int | None) -> float:
    """Predicted server-seconds of a request: prefill compute (``prefill_s``) plus its decode's
    dominant share of the server: the larger of the share of the KV cache it occupies, ``(prompt
    + pred/2) x pred`` token-steps of ``step_s`` seconds over the cache's ``kv_tokens``, and the
    share of the sequence slots (``max_num_seqs``), ``pred`` steps over ``slots``. Each resource
    as a fraction of what the server has per second; the one that binds counts (the slots, where
    the cache holds more than ``slots`` requests of this size: a small model on a large GPU).
    ``slots`` None: the KV share alone (``ecoserve-noslots``, the rule before December 2026)."""
    kv_share = (prompt_tokens + 0.5 * pred_tokens) * pred_tokens * step_s / max(kv_tokens, 1)
    if slots is None:
        return prefill_s + kv_share
    return prefill_s + max(kv_share, pred_tokens * step_s / max(slots, 1))


def prediction_within(tokens: int, max_tokens: int) -> int:
    """A predicted length as a request can have it: at least 1, at most its ``max_tokens``."""
    return min(max(tokens, 1), max(max_tokens, 1))


def length_known(max_tokens: int) -> bool:
    """A request whose length its ``max_tokens`` already gives (at most 1: a pooling request or
    a one-token generation): nothing to predict, so ``PredictionScale`` neither scales it nor
    learns from it."""
    return max_tokens <= 1


def cache_step_s(cost: Any, kv_tokens: int) -> float:
    """``service_s``'s time scale of KV occupancy: a decode step of one request over the whole
    cache (``kv_tokens``), by the cost model."""
    return cost.iteration_time(0, 0, 1, kv_tokens)


def prefill_floor(cost: Any, token_budget: int) -> int:
    """``PrefillBudget``'s floor: the cost model's roofline knee (its ``token_budget``: the prompt
    tokens that ride on the weight read), within the engine's token budget."""
    return max(1, min(int(getattr(cost, "token_budget", 64)), token_budget))


def ttft_est_s(prefill_tokens: int, budget: int, iteration_s: float) -> float:
    """Time to the first token of a request whose prefill (``prefill_tokens``, the prompt or the
    tokens to recompute) starts now: its chunks at this iteration's prompt budget, each as long
    as this iteration (the estimate ``ttft_lost`` and ``park_for`` take)."""
    return -(-prefill_tokens // budget) * iteration_s


def priority_key(arrival_s: float, service: float, aging: float) -> float:
    """Smaller first. ``aging`` (dimensionless): how many of its own service times a request's
    place in line is pushed back (0: FCFS; large: shortest first)."""
    return arrival_s + aging * service


def ttft_lost(now: float, arrival_s: float, ttft_slo_s: float, prefill_s: float) -> bool:
    """True if a request that starts its prefill now cannot have its first token within the
    TTFT SLO: it gives way to the requests that still can."""
    return now + prefill_s > arrival_s + ttft_slo_s


def lost_key(service: float) -> float:
    """Smaller first: a heap key for a waiting request whose TTFT is lost (``ttft_lost``), its
    predicted service seconds alone. Its SLO is missed whatever happens, so only its JCT is left
    to save, and shortest work first minimizes the mean."""
    return service


#: Parking: a victim needs this many TTFT SLOs of slack; a parked request resumes with one left.
PARK_MIN_SLACK_TTFTS = 2.0
#: Parking for a waiting request only in the last this many TTFT SLOs before its TTFT is lost.
PARK_WITHIN_TTFTS = 0.25
#: Parking only while the offered load over the last ``PARK_WINDOW_S`` seconds is below this.
PARK_MAX_LOAD = 0.8
PARK_WINDOW_S = 120.0


def tbt_slack_s(now: float, first_token_s: float, generated: int, expected_tokens: int, tbt_slo_s: float,
                per_token_s: float, resume_s: float) -> float:
    """Seconds a request with its first token (at ``first_token_s``) and ``generated`` tokens can
    pause and still meet its mean-TBT SLO: its deadline, ``tbt_slo_s`` per token over
    ``expected_tokens`` (at least one more than generated), less the rest of its decode at
    ``per_token_s`` a token and ``resume_s`` to get its KV back."""
    n = max(expected_tokens, generated + 1)
    return first_token_s + tbt_slo_s * (n - 1) - now - per_token_s * (n - generated) - resume_s


def park_for(now: float, arrival_s: float, ttft_slo_s: float, prefill_s: float) -> bool:
    """True if a waiting request that does not fit may have a decode parked for it: it can still
    meet its TTFT SLO (``ttft_lost``), but would not if it waited ``PARK_WITHIN_TTFTS`` TTFT SLOs
    more. Parking is the last resort: until then the KV that running requests free goes first."""
    return (not ttft_lost(now, arrival_s, ttft_slo_s, prefill_s)
            and ttft_lost(now + PARK_WITHIN_TTFTS * ttft_slo_s, arrival_s, ttft_slo_s, prefill_s))


def park_due_s(now: float, slack_s: float, ttft_slo_s: float) -> float:
    """When a request parked now with ``slack_s`` resumes at the latest: with one TTFT SLO of
    slack left, the time a waiting request may take to start (its slack falls one second a
    second while it is parked)."""
    return now + slack_s - ttft_slo_s


class OfferedLoad:
    """Predicted server-seconds (``service_s``) arriving per second over the last ``window_s``
    seconds: the server's utilization as the arriving requests would use it (near 1 at the
    saturation ceiling of the Azure conversation trace, docs/scheduler.md). One arrival counts
    at most ``window_s`` (a load of 1 by itself): the levels asked about are at most 1, so
    that changes no answer, and the running sums keep their precision (a prediction of 2^62
    tokens, 1e21 service seconds, swallowed every later arrival: ``load`` said 0 where
    ``stays_at_least`` said 0.8 for another window)."""

    def __init__(self, window_s: float = PARK_WINDOW_S) -> None:
        self.window_s = window_s
        self._arrivals: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        # For ``stays_at_least``: the arrivals' times and the total added before each, from
        # ``_head`` on (the entries ``load`` has not dropped yet).
        self._t: list[float] = []
        self._before: list[float] = []
        self._total = 0.0
        self._head = 0

    def add(self, t: float, service: float) -> None:
        service = min(service, self.window_s)
        self._arrivals.append((t, service))
        self._sum += service
        self._t.append(t)
        self._before.append(self._total)
        self._total += service
        if not len(self._arrivals) & 1023:  # bounded even if ``load`` is seldom or never read (was:
            self.load(t)  # an entry per request kept for good under vLLM's priority policy)

    def load(self, now: float) -> float:
        a, start = self._arrivals, now - self.window_s
        n = len(a)
        while a and a[0][0] < start:
            self._sum -= a.popleft()[1]
        if len(a) < n:
            self._head += n - len(a)
            if self._head > 1024 and 2 * self._head > len(self._t):  # keep memory bounded
                del self._t[:self._head], self._before[:self._head]
                self._head = 0
        if not a:
            self._sum = 0.0  # no rounding drift carried over an idle spell
        return self._sum / self.window_s

    def stays_at_least(self, now: float, level: float) -> float:
        """A time before which ``load`` stays at or above ``level`` (at most 1) if nothing arrives (it only
        falls as arrivals leave the window): the time the last arrival it needs leaves; ``now``
        if it may already be below. Early by a relative 1e-6 for rounding, never late;
        side-effect free."""
        t, before = self._t, self._before
        first = bisect_left(t, now - self.window_s, self._head)  # the window at ``now``
        # the window from entry i on holds total - before[i]: the first i where that is short
        i = bisect_right(before, self._total - level * self.window_s * (1 + 1e-6), first)
        return now if i <= first else t[i - 1] + self.window_s


def reservation_tokens(pred_tokens: int, generated: int, max_tokens: int) -> int:
    """Response tokens reserved: the reservation base (``pred_tokens``: EcoServe passes the
    prediction's ``reserve_tokens``, its upper quantile), doubled until it
    exceeds what the request has generated (geometric top-ups: O(log) of them, at most 2x
    over), never beyond ``max_tokens``."""
    r = max(pred_tokens, 1)
    if r <= generated:  # the smallest r x 2^k above generated
        r <<= (generated // r).bit_length()
    return max(min(r, max_tokens), generated + 1)


def topups(base: int, generated: int, max_tokens: int) -> int:
    """How often ``reservation_tokens`` has doubled the base of a request that has generated
    ``generated`` tokens (the top-ups counted): while the reservation is outgrown and below
    ``max_tokens``."""
    r, n = max(base, 1), 0
    while r <= generated and r < max_tokens:
        r, n = 2 * r, n + 1
    return n


def keep_free_blocks(reserve_frac: float, num_blocks: int) -> int:
    """The blocks admissions leave free while anything runs (CacheOPT's global reserve)."""
    return int(reserve_frac * num_blocks)


def admission_cap_tokens(blocks: int, block_size: int, requests: int) -> int:
    """KV tokens the projected peak of ``requests`` requests (the running ones and the candidate)
    may reach in ``blocks`` blocks: blocks are filled to half their size on average, so each
    request costs half a block of rounding."""
    return blocks * block_size - requests * (block_size - 1) // 2


def swap_cheaper(swap_s: float, recompute_s: float) -> bool:
    """Swap a preempted request's KV out (and back in: twice ``swap_s``) rather than recompute
    it (CacheOPT's choice by cost)."""
    return 2 * swap_s < recompute_s


def reservation_tokens_array(pred_tokens: np.ndarray, generated: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """``reservation_tokens`` element-wise, by the same steps (integer arrays; the same numbers):
    the base shifted by the bit length of ``generated // base`` (0 while within it)."""
    base = np.maximum(pred_tokens, 1)
    shift = np.frexp(np.maximum(generated, 0) // base)[1]  # int.bit_length, exact below 2**53
    return np.maximum(np.minimum(base << shift, max_tokens), generated + 1)


def projected_peak(items: Iterable[tuple[int, int]]) -> int:
    """Peak KV tokens of requests given as ``(ctx, remaining)``: each holds ``ctx`` tokens now,
    grows by one per step and frees everything after ``remaining`` more steps. The demand just
    before the k-th earliest end is the contexts of those still running plus their growth."""
    peak, total = 0, 0
    for count, (rem, ctx) in enumerate(sorted(((rem, ctx) for ctx, rem in items), reverse=True), 1):
        total += ctx
        d = total + count * (rem - 1)
        if d > peak:
            peak = d
    return peak


class PrefillBudget:
    """Prompt tokens an iteration may add to ``d`` decodes over ``dctx`` context tokens, as
    one chunk after ``offset`` prompt tokens already computed (the partial prefill that goes
    first: a late chunk of a long prompt attends to all of it): all of ``hi`` if the cost model
    times that within ``target_s``, else the most that fit (a bisection to 32 tokens), at least
    ``floor`` (the roofline knee: those ride on the weight read). Called every iteration with
    decodes; the last bisection is reused while the decodes are the same and their context and
    the offset only grew (iteration time never falls as prefill or decode context grow: what did
    not fit still does not, and the last result still fits if its probe does)."""

    def __init__(self, iteration_time: Any, target_s: float, floor: int) -> None:
        self.it = iteration_time  # (prefill tokens, prefill context, decodes, decode context) -> s
        self.target_s = target_s
        self.floor = max(1, floor)
        self._last = (-1, 0, 0, 0)  # (decodes, decode context, offset, bisection result)

    def least(self, hi: int) -> int:
        """The smallest budget a call with ``hi`` can return: the floor, within ``hi``."""
        return min(self.floor, max(hi, 1))

    def __call__(self, hi: int, d: int, dctx: int, offset: int = 0) -> tuple[int, float]:
        """``(budget, seconds)``: the budget and the iteration's time at it where that was
        computed on the way (else -1)."""
        it, target, ctx = self.it, self.target_s, prefill_ctx_tokens
        floor = min(self.floor, max(hi, 1))  # ``least``, inline: asked every iteration
        d0, dctx0, off0, lo = self._last
        if d0 == d and dctx0 <= dctx and off0 <= offset:
            if lo == 0:
                return floor, -1.0
            t = it(lo, ctx(lo, offset), d, dctx)
            if t <= target:
                return (lo, t) if lo >= floor else (floor, -1.0)
        elif hi <= 0:
            return max(hi, floor), -1.0
        else:
            t = it(hi, ctx(hi, offset), d, dctx)
            if t <= target:
                return (hi, t) if hi >= floor else (floor, -1.0)
        lo = 0
        while hi - lo > 32:
            mid = (lo + hi) // 2
            if it(mid, ctx(mid, offset), d, dctx) <= target:
                lo = mid
            else:
                hi = mid
        self._last = (d, dctx, offset, lo)
        return max(lo, floor), -1.0


def repay_steps(iteration_s: float, paced_s: float, decode_s: float) -> int:
    """Decode-only iterations (``decode_s`` seconds each, below ``paced_s``) that bring the mean
    iteration time back to ``paced_s`` (the TBT-bounded iteration's) after one of
    ``iteration_s``: 0 if that one was no longer."""
    if iteration_s <= paced_s:
        return 0
    return math.ceil((iteration_s - paced_s) / (paced_s - decode_s))


def amortized_chunk_pays(chunk: int, chunk_s: float, paced_tokens: int, paced_s: float,
                         decode_s: float) -> bool:
    """True if prefilling ``chunk`` prompt tokens in one iteration of ``chunk_s`` seconds, then
    ``repay_steps`` decode-only iterations of ``decode_s``, moves more prompt tokens a second
    than ``paced_tokens`` in every iteration of ``paced_s`` (``PrefillBudget``'s chunk and
    time). Both keep the decodes' mean iteration time at ``paced_s``, which is what a mean-TBT
    SLO bounds; every iteration that carries a prefill pays a fixed cost (the cost model's
    ``prefill_overhead_s``), and the larger chunk pays it less often."""
    if paced_s <= decode_s or chunk <= paced_tokens:
        return False
    return chunk * paced_s > paced_tokens * (chunk_s + repay_steps(chunk_s, paced_s, decode_s) * decode_s)


def amortized_chunk(iteration_time: Any, chunk: int, paced_tokens: int, paced_s: float, d: int,
                    dctx: int, offset: int, slack_s: Any) -> tuple[int, float]:
    """The prompt tokens of an iteration with ``d`` decodes over ``dctx`` context tokens, its
    chunk after ``offset`` computed prompt tokens: ``chunk`` (the whole budget) if
    ``amortized_chunk_pays`` against the paced ``paced_tokens`` in ``paced_s``, else the chunk
    that one decode-only iteration repays exactly if that pays (``_one_step_chunk``), else
    ``paced_tokens``. That chunk is cut the same way to an iteration within ``slack_s()``
    if it is longer. ``slack_s``, asked only when a chunk pays: the longest the iteration may
    take with every decode's mean TBT within its SLO were its next token its last
    (``tbt_slack_s`` at one more token, paced at 0, the least over the decodes). With the
    decodes' time alone (what ``repay_steps`` then takes)."""
    decode_s = iteration_time(0, 0, d, dctx)
    if paced_s <= decode_s or chunk <= paced_tokens:
        return paced_tokens, decode_s
    t = iteration_time(chunk, prefill_ctx_tokens(chunk, offset), d, dctx)
    got = _paying_chunk(iteration_time, chunk, t, math.inf, paced_tokens, paced_s, decode_s, d, dctx, offset)
    if got is None:
        return paced_tokens, decode_s
    limit = slack_s()
    if got[1] > limit:
        if limit <= paced_s:
            return paced_tokens, decode_s
        got = _paying_chunk(iteration_time, *got, limit, paced_tokens, paced_s, decode_s, d, dctx, offset)
        if got is None:
            return paced_tokens, decode_s
    return got[0], decode_s


def _paying_chunk(iteration_time: Any, chunk: int, t: float, cap_s: float, paced_tokens: int, paced_s: float,
                  decode_s: float, d: int, dctx: int, offset: int) -> tuple[int, float] | None:
    """``(tokens, seconds)`` of the largest chunk up to ``chunk`` (of ``t`` seconds) within
    ``cap_s`` (bisection, ``PrefillBudget``) if ``amortized_chunk_pays``; else of
    ``_one_step_chunk`` if it is below that and pays; None if neither does."""
    if t > cap_s:
        chunk, t = PrefillBudget(iteration_time, cap_s, paced_tokens)(chunk, d, dctx, offset)
        if t < 0:
            t = iteration_time(chunk, prefill_ctx_tokens(chunk, offset), d, dctx)
    if amortized_chunk_pays(chunk, t, paced_tokens, paced_s, decode_s):
        return chunk, t
    target = 2 * paced_s - decode_s
    if t <= target:
        return None
    return _one_step_chunk(iteration_time, chunk, target, paced_tokens, paced_s, decode_s, d, dctx, offset)


def _one_step_chunk(iteration_time: Any, chunk: int, target_s: float, paced_tokens: int, paced_s: float,
                    decode_s: float, d: int, dctx: int, offset: int) -> tuple[int, float] | None:
    """The chunk (up to ``chunk``) of the longest iteration that one decode-only iteration
    repays exactly (``target_s`` = paced + (paced - decode-only) seconds) if it pays: the two
    take as long as two paced iterations, so it pays if it moves more than two paced chunks
    (one fixed cost saved against the longer chunk's dearer tokens). The whole budget may
    need a fraction of a repayment step more, rounded up to a whole step that moves no prompt
    tokens. Longer cuts (k steps, k + 1 paced chunks) were measured and not kept: their gains
    are smaller and each waiting prompt waits longer for the next iteration that admits it
    (docs/scheduler.md). One cost-model call says whether it could pay, before the bisection."""
    need = 2 * paced_tokens + 1
    if need >= chunk or iteration_time(need, prefill_ctx_tokens(need, offset), d, dctx) > target_s:
        return None
    got, t = PrefillBudget(iteration_time, target_s, need)(chunk, d, dctx, offset)
    if t < 0:
        t = iteration_time(got, prefill_ctx_tokens(got, offset), d, dctx)
    return (got, t) if amortized_chunk_pays(got, t, paced_tokens, paced_s, decode_s) else None


#: ``Projection``'s numpy path only while every end and context is below this (exact in int64,
#: with room for the sums: token counts and steps are far smaller in practice)
NUMPY_LIMIT = 1 << 40


#: ``PredictionScale``: the finished requests it looks at (the most recent), how many it needs
#: before it departs from 1, and after how many new ones it recomputes its median. Sample sizes,
#: not fitted to a trace: 32 puts the sample median within the 0.32-0.68 quantiles of the ratio's
#: distribution with 95% probability; 512 bounds memory and follows a change of traffic within
#: 512 finishes.
SCALE_WINDOW = 512
SCALE_MIN_SAMPLES = 32
SCALE_REFRESH = 16


class PredictionScale:
    """How this server's responses run against their predictions: the median of generated /
    predicted tokens over the last ``window`` finished requests (1 until ``min_samples`` have
    finished). A predictor's ``pred_tokens`` is a median, so on the traffic it was trained on
    about half the responses run longer and half shorter and the scale is near 1 (0.9-1.05 over
    the whole of each chat trace in docs/results.md with the shipped bundle, about 0.7-1.2 over
    512 finishes as a replay serves them); on other traffic it is not (that chat predictor on
    code completion's 13-token answers: about 0.2). ``scaled`` multiplies a new request's
    predicted length by it: the predictor's ranking is kept, and its scale, which weighs
    predicted decode work against the prompt's prefill (``service_s``) and against time waited
    (``priority_key``), follows the traffic. Finishes come in the order the scheduler serves
    them, so over a short window the median leans towards what it served last (under overload,
    the requests it deferred). Bounded: ``window`` ratios."""

    def __init__(self, window: int = SCALE_WINDOW, min_samples: int = SCALE_MIN_SAMPLES,
                 refresh: int = SCALE_REFRESH) -> None:
        window = max(1, window)
        self.min_samples, self.refresh = max(1, min(min_samples, window)), max(1, refresh)
        self._ratios: deque[float] = deque(maxlen=window)
        self._fresh = 0  # finishes since the median was computed
        self._scale = 1.0

    def observe(self, predicted: int, generated: int) -> None:
        """A request predicted at ``predicted`` tokens finished after ``generated``."""
        ratios = self._ratios
        ratios.append(generated / max(predicted, 1))
        self._fresh += 1
        n = len(ratios)
        if n >= self.min_samples and (self._fresh >= self.refresh or n == self.min_samples):
            self._scale = sorted(ratios)[(n - 1) // 2]
            self._fresh = 0

    @property
    def scale(self) -> float:
        return self._scale

    def scaled(self, predicted: int) -> int:
        """``predicted`` tokens at this traffic's scale (at least 1)."""
        return max(1, round(predicted * self._scale))


def victim_key(first_token_s: float, arrival_s: float, slo_ttft: float, base: int, generated: int,
               max_tokens: int, seq: int) -> tuple[bool, int, int]:
    """Largest first: requests whose TTFT SLO is already missed (the first token, at
    ``first_token_s``, or now if none yet, came more than ``slo_ttft`` after ``arrival_s``; mean
    TBT is not looked at), then the longest predicted remaining work (``reservation_tokens(base,
    generated, max_tokens) - generated``: it frees the most KV-time), then the latest admitted
    (``seq``)."""
    return (first_token_s - arrival_s > slo_ttft, reservation_tokens(base, generated, max_tokens) - generated, seq)


def victim_index(first_token_s: np.ndarray, arrival_s: np.ndarray, slo_ttft: np.ndarray | float, base: np.ndarray,
                 generated: np.ndarray, max_tokens: np.ndarray, seq: np.ndarray,
                 among: np.ndarray | None = None) -> int:
    """The position of the largest ``victim_key`` over arrays of its arguments (integer arrays
    for the token counts and ``seq``, which is unique): the last in the lexicographic order of
    (lost, remaining, seq), by the same operations (the largest ``seq`` among the largest
    remaining among the lost, or among all if none is lost). ``slo_ttft``: each request's, or one
    for all. ``among``: only the positions where it is True (at least one)."""
    lost = first_token_s - arrival_s > slo_ttft
    remaining = reservation_tokens_array(base, generated, max_tokens) - generated  # >= 1
    if among is not None:
        lost &= among
        remaining = np.where(among, remaining, 0)
    if lost.any():
        remaining = np.where(lost, remaining, 0)
    top = np.flatnonzero(remaining == remaining.max())
    return int(top[np.argmax(seq[top])])


def tbt_slacks_s(now: float, first_token_s: np.ndarray, generated: np.ndarray, expected_tokens: np.ndarray,
                 tbt_slo_s: np.ndarray | float, per_token_s: np.ndarray | float) -> np.ndarray:
    """``tbt_slack_s`` element-wise at ``resume_s = 0``, by the same operations (the same
    numbers); with ``resume_s >= 0`` the slack is at most this."""
    n = np.maximum(expected_tokens, generated + 1)
    return first_token_s + tbt_slo_s * (n - 1) - now - per_token_s * (n - generated)


def projected_peak_arrays(ctx: np.ndarray, remaining: np.ndarray) -> int:
    """``projected_peak`` over arrays of contexts and remaining steps (the same number)."""
    if not len(ctx):
        return 0
    order = np.argsort(-remaining, kind="stable")
    d = np.cumsum(ctx[order]) + np.arange(1, len(ctx) + 1) * (remaining[order] - 1)
    return max(int(d.max()), 0)


class Projection:
    """The running requests' KV growth, for the projected-peak admission test.

    Each request is a slot: at step ``s`` it holds ``x + s`` tokens, has generated ``gx + s``
    tokens, and reserves ``reservation_tokens(base, gx + s, max_tokens)`` response tokens; it is
    projected to end at step ``end`` (when it has generated its reservation; recomputed, with
    the reservation doubled, once a request outlives it). Prefilling requests are entered as if
    they decoded from admission on. An engine updates a slot when a request is admitted (or
    resumes) and when it leaves.

    Why ``demand`` is cheap: a slot's context plus its remaining steps, ``x + end``, does not
    depend on the step, so the sum of reservations is a running total; and in order of ``end``
    the demand just before the k-th latest end, ``sum(x) + k x (end - 1)`` over those k slots,
    does not either, so the slots are kept sorted by end (an end changes only when a request
    starts, leaves or outlives its reservation; stale ends come off a heap) and the peak is one
    pass over them, in C (numpy) when there are many: over arrays kept in that order (a start
    or an end shifts them, no sort), where a candidate's place splits the pass in three.
    """

    #: from this many slots, the peak is computed with numpy (a cumsum over the kept arrays)
    NUMPY_FROM = 96
    #: a refresh moving more slots than this rebuilds the numpy path's arrays instead
    REBUILD_FROM = 8

    def __init__(self, slots: int) -> None:
        # For the numpy path: x and end - 1 of the slots in ``_order``, in its order (kept while
        # it is long, rebuilt when it grows long again), and the step counts 1, 2, ...
        self._sx = np.zeros(slots, np.int64)
        self._se = np.zeros(slots, np.int64)
        self._tracked = False
        self._k = np.arange(1, slots + 1, dtype=np.int64)
        self._x = [0] * slots
        self._gx = [0] * slots
        self._base = [1] * slots
        self._max = [1] * slots
        self._end = [0] * slots  # 0: not computed yet
        self._em1 = [0] * slots  # end - 1, where computed (the Python pass reads it: no subtraction)
        self._gen = [0] * slots  # bumped when a slot is (re)set or dropped: stale heap entries
        self._slot: dict[Hashable, int] = {}
        self._free = list(range(slots - 1, -1, -1))
        self._new: list[int] = []  # slots whose end is computed at the next ``demand``
        self._ends: list[tuple[int, int, int]] = []  # (end, gen, slot), a min-heap
        # The slots whose end is known, latest end first, then by slot: each as the integer
        # -end x slots + slot (sorting as (-end, slot) does; the slot is the key modulo slots)
        self._width = slots
        self._order: list[int] = []
        self._sum = 0  # sum of x + end over the slots whose end is known
        # An upper bound on the peak of the slots whose end is known (None: none known): the
        # last pass's peak, with its candidate (x, end) if it had one (``_pending``: a slot no
        # larger than it may take its place once), raised by each other slot entered since
        # (``demand``'s bound)
        self._upper: int | None = None
        self._pending: tuple[int, int] | None = None
        self.version = 0  # bumped by every set and drop

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, rid: Hashable) -> bool:
        return rid in self._slot

    def set(self, rid: Hashable, x: int, gx: int, base: int, max_tokens: int) -> None:
        i = self._slot.get(rid)
        if i is None:
            i = self._slot[rid] = self._free.pop()
        else:
            self._forget(i)
        self._x[i], self._gx[i], self._base[i], self._max[i] = x, gx, max(base, 1), max_tokens
        self._gen[i] += 1
        self._new.append(i)
        self._sum += x
        self.version += 1

    def drop(self, rid: Hashable) -> None:
        i = self._slot.pop(rid, None)
        if i is not None:
            self._forget(i)
            self._gen[i] += 1
            self._free.append(i)
            self.version += 1

    def _forget(self, i: int) -> None:
        """Take slot ``i``'s current numbers out of the running total and the order."""
        self._sum -= self._x[i]
        e = self._end[i]
        if e:
            self._sum -= e
            p = bisect_left(self._order, -e * self._width + i)
            if self._tracked:
                self._remove(p)
            else:
                del self._order[p]
            self._end[i] = 0
        else:
            self._new.remove(i)

    def _refresh(self, step: int) -> None:
        """(Re)compute the end of every new slot and of every slot that outlived its end."""
        ends, gen, end, em1, order, w = self._ends, self._gen, self._end, self._em1, self._order, self._width
        todo = self._new
        while ends and ends[0][0] <= step:
            e, g, i = heapq.heappop(ends)
            if gen[i] == g and end[i] == e:
                p = bisect_left(order, -e * w + i)
                if not self._tracked:
                    del order[p]
                elif len(todo) < self.REBUILD_FROM:
                    self._remove(p)
                else:  # many move: the arrays are rebuilt once, not shifted each time
                    self._tracked = False
                    del order[p]
                self._sum -= e
                todo.append(i)
        if len(todo) > self.REBUILD_FROM:
            self._tracked = False
        upper, pending = self._upper, self._pending
        for i in todo:
            gx = self._gx[i]
            e = reservation_tokens(self._base[i], gx + step, self._max[i]) - gx
            self._sum += e
            if upper is not None:
                if pending is not None and self._x[i] <= pending[0] and e <= pending[1]:
                    pending = None  # the candidate the bound counted (or one no larger)
                else:
                    upper += self._x[i] + e - 1
            end[i] = e
            em1[i] = e - 1
            heapq.heappush(ends, (e, gen[i], i))
            if self._tracked and e < NUMPY_LIMIT and -NUMPY_LIMIT < self._x[i] < NUMPY_LIMIT:
                self._insert(i, e)
            else:
                self._tracked = False
                insort(order, -e * w + i)
        self._upper, self._pending = upper, pending
        todo.clear()

    def _insert(self, i: int, e: int) -> None:
        """Put slot ``i``, ending at ``e``, into the order and the tracked arrays."""
        order, key = self._order, -e * self._width + i
        p = bisect_left(order, key)
        order.insert(p, key)
        m, sx, se = len(order), self._sx, self._se
        sx[p + 1:m] = sx[p:m - 1]
        se[p + 1:m] = se[p:m - 1]
        sx[p], se[p] = self._x[i], e - 1

    def _remove(self, p: int) -> None:
        """Take the ``p``-th slot out of the order and the tracked arrays."""
        order = self._order
        del order[p]
        m = len(order)
        if m < self.NUMPY_FROM // 2:
            self._tracked = False  # short: the Python path; rebuilt if it grows long again
        else:
            sx, se = self._sx, self._se
            sx[p:m] = sx[p + 1:m + 1]
            se[p:m] = se[p + 1:m + 1]

    def demand(self, step: int, extra: tuple[int, int] | None = None, pipelined: bool = True,
               limit: int | None = None) -> int:
        """KV tokens at the projected peak, ``extra`` = (ctx, remaining) of a candidate
        included. ``pipelined=False``: every reservation held at once (their sum). With
        ``limit`` and the peak within it, an upper bound on the peak may be returned instead, one
        within the limit too (so ``demand(...) <= limit`` is exact): the sum of reservations, or
        (with a candidate) the last pass's peak plus, for each slot entered since and for the
        candidate, its context plus remaining steps less one. A slot adds at most that to the
        peak (every demand after its place in the order gains its context and at most its
        ``end - 1``), one that leaves never raises it, and the last pass's candidate is in its
        peak already: the first slot entered since that is no larger (its ``x`` and ``end`` at
        most the candidate's: the request admitted for it) adds nothing."""
        if self._new or (self._ends and self._ends[0][0] <= step):
            self._refresh(step)
        total = self._sum if extra is None else self._sum + extra[0] + extra[1]
        if not pipelined or (limit is not None and total <= limit):
            return total
        if extra is not None and limit is not None and self._upper is not None:
            bound = self._upper + extra[0] + extra[1] - 1  # the candidate adds at most its own
            if bound <= limit:
                return bound
        # The candidate, at (context - step, remaining + step), sorts after every slot ending no
        # earlier than it (as a stable sort of the appended candidate would put it).
        xc, ec = (0, 0) if extra is None else (extra[0] - step, extra[1] + step)
        order, xs, em1, w = self._order, self._x, self._em1, self._width
        p = bisect_right(order, (1 - ec) * w - 1) if extra is not None else len(order)  # -ec x w + w - 1
        if len(order) >= self.NUMPY_FROM and (not order or order[0] > -NUMPY_LIMIT * w) \
                and -NUMPY_LIMIT < xc < NUMPY_LIMIT:
            peak = self._peak_numpy(xc, ec, p, extra is not None)
            if peak is not None:
                return peak
        peak = cum = k = 0
        for key in islice(order, p):
            i = key % w
            cum += xs[i]
            k += 1
            d = cum + k * em1[i]
            if d > peak:
                peak = d
        if extra is None:
            self._upper, self._pending = peak, None
            return peak
        k += 1
        d = cum + xc + k * (ec - 1)
        if d > peak:
            peak = d
        cum += xc
        for key in islice(order, p, None):
            i = key % w
            cum += xs[i]
            k += 1
            d = cum + k * em1[i]
            if d > peak:
                peak = d
        self._upper, self._pending = peak, (xc, ec)
        return peak

    def _peak_numpy(self, xc: int, ec: int, p: int, with_candidate: bool) -> int | None:
        """``demand``'s pass in numpy, over the tracked arrays (the same integers): before the
        candidate's place ``p`` the demands are as without it; the candidate adds its own; each
        slot after it is one step further in, so its demand gains ``xc`` and its ``end - 1``. None
        where a context is too large for it (never in practice): the Python path answers."""
        m = len(self._order)
        if not m:
            peak = max(xc + ec - 1, 0) if with_candidate else 0
            self._upper, self._pending = peak, ((xc, ec) if with_candidate else None)
            return peak
        if not self._tracked:
            keys = np.fromiter(self._order, np.int64, m)
            slot = keys % self._width
            try:
                sx = np.array(self._x, np.int64)[slot]
            except OverflowError:
                return None
            if not (sx.min() > -NUMPY_LIMIT and sx.max() < NUMPY_LIMIT):
                return None  # a context too large (none in practice): the Python path
            self._se[:m] = (slot - keys) // self._width - 1
            self._sx[:m] = sx
            self._tracked = True
        em1 = self._se[:m]  # end - 1
        cum = np.cumsum(self._sx[:m])
        d = cum + self._k[:m] * em1
        if not with_candidate:
            self._upper, self._pending = max(int(d.max()), 0), None
            return self._upper
        own = (int(cum[p - 1]) if p else 0) + xc + (p + 1) * (ec - 1)
        d[p:] += em1[p:] + xc  # the slots after the candidate, one step further in
        peak = max(int(d.max()), own, 0)
        self._upper, self._pending = peak, (xc, ec)
        return peak
