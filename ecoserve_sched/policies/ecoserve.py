"""EcoServe: shortest predicted work first, give way when the TTFT is lost, KV admission by the
projected peak of the predictions' reservations (aggregate KVC pipelining), SLO-bounded prefill
budget.

Per iteration (docs/scheduler.md has the details and which rule comes from where; the rules
themselves are the pure functions of ``ecoserve_rules``):

1. KV alarms of decoding requests (GTs): a GT whose last block is full gets one more block from
   the free pool (blocks are allocated as tokens are written). If the pool is empty, a victim is
   preempted (``rules.victim_key``: SLO already lost first, then the longest predicted remaining
   work), by swap or recompute, whichever the cost model says is cheaper.
2. Every GT decodes; partial prefills (they hold KV) continue.
3. Preempted requests resume first (they hold progress), then prompt tasks (PTs) in priority
   order (``rules.priority_key``: arrival + predicted service seconds), then PTs whose TTFT is
   already lost (``rules.ttft_lost``: they give way to every request that can still meet it).
   A request is admitted only if its whole prompt's blocks are free now (it takes its first
   chunk's; each later chunk takes its own, preempting a victim if they are not free, as in
   vLLM) and the projected peak of the
   running requests' KV, each growing to its reservation (the prediction's reservation
   ``reserve_tokens``, its upper quantile, doubled each time it is outgrown: top-up), stays
   within the cache: reservations overlap in time, a short request using the tail that a long
   one reaches only after it ended (KVC pipelining, in aggregate). The upper quantile, not the
   median, because the two errors cost differently: a request projected too long only delays
   an admission until it ends (its tail is pipelined), one projected too short lets admission
   overcommit the cache, and the overcommit is paid in preemptions (a swap out and in of the
   whole context, stalling the batch) while it lasts. Admission stops at the first request
   that does not fit; a failed projection is asked again once a running request starts or ends,
   or once waiting could have brought it within the cache (its peak falls a token a step at most).
   Parking: when the head is a PT that can still meet its TTFT but does not fit, the decoding
   request with the most slack on its mean-TBT SLO (``rules.tbt_slack_s``, at least two TTFT
   SLOs) is preempted, and again until the head fits or no request has that slack. A parked
   request waits behind the PTs that can meet their TTFT until its slack is down to one TTFT
   SLO (``rules.park_due_s``; then it resumes right after the preempted requests), or until no
   such PT waits. Only while the offered load (``rules.OfferedLoad``) is below
   ``rules.PARK_MAX_LOAD``: bursts on a server with room to catch up.
4. The prefill budget: the whole token budget when nothing decodes; otherwise the most prompt
   tokens that keep the iteration within ``iter_time_frac`` of the TBT SLO by the cost model
   (time-synced batching), timed as a chunk of the oldest partial prefill after its computed
   tokens, at least the cost model's roofline knee. Amortized chunks (for the mean-TBT SLO):
   while prompts wait beyond that budget, the whole token budget in one iteration (or what
   one decode-only iteration repays exactly, where the whole does not pay; less where a
   decode's mean TBT would pass its SLO were its next token its last), then as many
   decode-only iterations as bring the mean iteration time back to the budget's, where that
   moves more prompt tokens a second (``rules.amortized_chunk_pays``: every iteration with a
   prefill pays the cost model's fixed prefill overhead).

Opt-in (``scale_predictions``, ``ecoserve-scaled``): a new request's predicted length is
multiplied by ``rules.PredictionScale`` (the median of generated / predicted over the last
finished requests), for a predictor trained on other traffic; its reservation stays the
predictor's.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cost_model import prefill_ctx_tokens
from ..queues import FCFSQueue, PriorityQueue, discard_from_heap
from ..request import Request, State
from . import ecoserve_rules as rules
from .base import Scheduler
from .interface import NO_BATCH, Batch
from .registry import register

#: A blocked admission waiting on a PT's TTFT is asked again at most this many decode steps on
#: (``_probe_head``): the TTFT estimate is bounded over them, more steps a looser bound.
RECHECK_STEPS = 64


# The columns of ``DecodingRows.data``.
FIRST, ARRIVAL, GX, PRED, BASE, MAX, SEQ, TBT, TTFT, STEP0, ORDER = range(11)


class DecodingRows:
    """The numbers of the decoding requests that the victim, parking and next-token searches
    read, one row each in a numpy array, as of when each started decoding (none of them changes
    while it decodes: ``GX`` is ``generated - dec_step0``, so it has generated ``GX + step``
    tokens at ``step``; ``ORDER`` counts the starts: the decoding set's order). Each search is
    then a few array operations instead of a Python loop over up to ``max_running`` requests,
    by the same floating-point operations (the same decisions). Token counts are taken at most
    2**53 (``COUNT_CAP``: exact in float64, and a reservation below it is the same against a
    larger ``max_tokens``; a capped prediction gets no parking bound).

    Kept only while many decode: the first ``table`` builds them from the decoding set, starts
    and ends keep them from then on (a row is written when a search reads it: most iterations
    search nothing), and below ``keep_from`` rows they are dropped until a search asks again."""

    COUNT_CAP = 1 << 53

    def __init__(self, rows: int, keep_from: int) -> None:
        rows = max(rows, 1)
        self.keep_from = keep_from
        self.kept = False
        self.data = np.zeros((rows, 11))
        self.active = np.zeros(rows, bool)
        self.reqs: list[Request | None] = [None] * rows
        self.starts = 0  # decode starts so far (while kept)
        self.version = 0  # bumped by every start and when the rows are dropped
        self._row: dict[int, int] = {}
        self._free = list(range(rows - 1, -1, -1))
        self._unwritten: dict[int, tuple[float, ...]] = {}  # row -> its numbers, not in ``data`` yet

    def add(self, r: Request, base: int) -> None:
        """``r`` started decoding with reservation base ``base``."""
        if not self.kept:
            return
        if r.rid in self._row:
            self.remove(r.rid)
            if not self.kept:  # that dropped the rows: built again by the next search
                return
        if not self._free:  # more running requests than ``max_running`` (an engine's choice)
            n = len(self.reqs)
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
            self.active = np.concatenate([self.active, np.zeros(n, bool)])
            self.reqs += [None] * n
            self._free = list(range(2 * n - 1, n - 1, -1))
        i = self._row[r.rid] = self._free.pop()
        self.starts += 1
        self.version += 1
        cap = self.COUNT_CAP
        self._unwritten[i] = (r.first_token_s, r.arrival_s, r.generated - r.dec_step0, min(r.pred_tokens, cap),
                              min(base, cap), min(r.max_tokens, cap), r.seq, r.slo.tbt_s, r.slo.ttft_s, r.dec_step0,
                              self.starts)
        self.active[i] = True
        self.reqs[i] = r

    def remove(self, rid: int) -> None:
        i = self._row.pop(rid, None)
        if i is None:
            return
        if len(self._row) < self.keep_from:  # few decode: the searches loop; rebuilt when asked
            self.kept = False
            self.version += 1
            self.active[:] = False
            self.reqs = [None] * len(self.reqs)
            self._row.clear()
            self._unwritten.clear()
            self._free = list(range(len(self.reqs) - 1, -1, -1))
            return
        self.active[i] = False
        self.reqs[i] = None
        self._unwritten.pop(i, None)
        self._free.append(i)

    def table(self, decoding: dict[int, Request], base_of: Any) -> tuple[np.ndarray, np.ndarray]:
        """Which rows are active, and every row's numbers, not copied (read only; a row that is
        not active holds an earlier request's numbers, or zeros): built from ``decoding``, with
        ``base_of(request)`` as its reservation base, if not kept. The searches run over every
        row and mask the inactive ones: cheaper than gathering the active ones."""
        if not self.kept:
            self.kept = True
            for r in decoding.values():
                self.add(r, base_of(r))
        if self._unwritten:
            self.data[list(self._unwritten)] = list(self._unwritten.values())
            self._unwritten.clear()
        return self.active, self.data


@dataclass(slots=True)
class EcoServeConfig:
    pipelining: bool = True  # admit by the projected peak (False: by the sum of reservations)
    ordering: bool = True  # shortest predicted work first, with aging (False: arrival order)
    give_way: bool = True  # waiting requests whose TTFT is lost go behind those that can meet it
    oracle: bool = False  # use true RLs as predictions (upper bound)
    reserve: str = "p90"  # reservation base: "p90" (reserve_tokens, the prediction's upper quantile)
    # or "median" (pred_tokens); the ordering uses pred_tokens either way
    tbt_budget: bool = True  # keep iterations with decodes within iter_time_frac x TBT SLO
    iter_time_frac: float = 0.8  # time-synced batching's share of the TBT SLO
    aging: float = 1.0  # priority = arrival + aging x predicted service seconds
    reserve_frac: float = 0.0  # share of blocks admissions leave free (CacheOPT's global reserve)
    victim: str = "slo"  # "slo" (rules.victim_key) or "latest" (latest admitted, as vLLM)
    lost_order: str = "key"  # PTs whose TTFT is lost: "key" (as the others) or "service" (rules.lost_key)
    park: bool = True  # preempt decodes with TBT slack for PTs that can still meet their TTFT, in bursts
    slot_share: bool = True  # service counts the larger of the KV share and the slot share (False: KV)
    scale_predictions: bool = False  # predicted lengths x rules.PredictionScale (``ecoserve-scaled``)
    amortize: bool = True  # a mean-TBT SLO: amortized chunks (False: every iteration within the
    # TBT budget, as a P99-TBT SLO needs; ``ecoserve-p99``)
    swap: bool = True  # a preempted decode is swapped to host memory where the cost model says
    # that is cheaper (False: always recomputed, as in vLLM V1 and transformers' engine, where
    # the plug-ins run EcoServe; ``ecoserve-recompute``)


class EcoServeScheduler(Scheduler):
    name = "ecoserve"
    prefill_preempts = True  # a partial prefill's next chunk preempts for its blocks, as in vLLM
    #: from this many decoding requests, the victim, parking and next-token searches run over
    #: ``DecodingRows`` (fewer: a loop over them costs less than keeping the arrays and their
    #: operations' overhead; the same decisions either way)
    ARRAYS_FROM = 128

    def __init__(self, cost: Any, config: EcoServeConfig | None = None, **kw: Any) -> None:
        super().__init__(cost, **kw)
        self.cfg = config or EcoServeConfig()
        if self.cfg.oracle:
            self.prediction_override = "oracle"
        self.resume = FCFSQueue()  # preempted after their first token
        key = self._priority if self.cfg.ordering else _arrival
        self.pt = PriorityQueue(key=key)  # PTs that can still meet their TTFT (lazily checked)
        self.lost = PriorityQueue(key=key)  # PTs whose TTFT is lost
        self._waiting = 0  # requests in the three queues
        self.proj = rules.Projection(self.max_running)
        self.rows = DecodingRows(self.max_running, self.ARRAYS_FROM // 2)
        self.keep_free = rules.keep_free_blocks(self.cfg.reserve_frac, self.kv.num_blocks)
        self.kv_tokens = self.kv.num_blocks * self.bs
        self.step_s = rules.cache_step_s(cost, self.kv_tokens)  # the time scale of KV occupancy
        self.min_prefill = rules.prefill_floor(cost, self.token_budget)  # the roofline knee
        self._prefill_budget = rules.PrefillBudget(  # iteration time with decodes: within this
            cost.iteration_time, self.cfg.iter_time_frac * self.slo.tbt_s, self.min_prefill)
        self._bound_budget = rules.PrefillBudget(  # the same, steps ahead (``_ttft_est_bound``)
            cost.iteration_time, self.cfg.iter_time_frac * self.slo.tbt_s, self.min_prefill)
        self._it_now = (0, 0.0)  # this iteration's prefill budget and its predicted time
        # Amortized chunks: no prompt tokens before this step while prompts wait; this
        # iteration's paced budget, its time and the decodes' time alone, if it offers more
        self._repay_until = 0
        self._paced: tuple[int, float, float] | None = None
        self.counters["amortized"] = 0
        # (projection version, rid, step): the projection test failed, and cannot pass before
        # that step unless a running request starts or ends (``_fits``)
        self._no_fit = (-1, -1, 0)
        # Parking: parked requests by the time they must resume; the offered load
        self.parked: list[tuple[float, int, Request]] = []
        self._parking: tuple[Request, float] | None = None  # the request being parked, its due time
        self.load = rules.OfferedLoad()
        self.counters["parks"] = 0
        self._park_order: list[Any] = [None, None, None, {}]  # ``_park_victim``: key, arrays, walk, slacks
        # Predictions at this traffic's scale: the predictor's own value of each request in flight
        self.pscale = rules.PredictionScale() if self.cfg.scale_predictions and not self.cfg.oracle else None
        self._predicted: dict[int, int] = {}

    # ---- queues -------------------------------------------------------------------------------
    def _base_pred(self, r: Request) -> int:
        return r.reserve_tokens if self.cfg.reserve == "p90" else r.pred_tokens

    def _priority(self, r: Request) -> float:
        return rules.priority_key(r.arrival_s, self._service(r), self.cfg.aging)

    def _service(self, r: Request) -> float:
        return rules.service_s(self.cost.recompute_time(r.prompt_tokens), r.prompt_tokens, max(r.pred_tokens, 1),
                               self.step_s, self.kv_tokens, self.max_running if self.cfg.slot_share else None)

    def enqueue(self, r: Request, front: bool = False) -> None:
        if self._parking is not None and self._parking[0] is r:
            heapq.heappush(self.parked, (self._parking[1], r.seq, r))
        elif r.state == State.SWAPPED or r.generated > 0:
            self.resume.append(r)
        else:
            key = None
            if not r.preemptions:  # a new request: its prediction within max_tokens, scaled once
                r.pred_tokens = rules.prediction_within(r.pred_tokens, r.max_tokens)
                if self.pscale is not None and not rules.length_known(r.max_tokens):
                    self._predicted[r.rid] = r.pred_tokens
                    r.pred_tokens = rules.prediction_within(self.pscale.scaled(r.pred_tokens), r.max_tokens)
            if self.cfg.park and not r.preemptions:
                service = self._service(r)
                self.load.add(r.arrival_s, service)
                if self.cfg.ordering:  # the heap key from the same service seconds
                    key = rules.priority_key(r.arrival_s, service, self.cfg.aging)
            self.pt.push(r, key)
        self._waiting += 1

    def waiting_count(self) -> int:
        return self._waiting  # len(resume) + len(pt) + len(lost), asked several times an iteration

    def dequeue(self, r: Request) -> bool:
        if not (self.resume.discard(r) or self.pt.discard(r) or self.lost.discard(r)
                or discard_from_heap(self.parked, r)):
            return False
        self._waiting -= 1
        self._predicted.pop(r.rid, None)  # cut short: says nothing of its length
        return True

    def on_decode_start(self, r: Request) -> None:
        base = self._base_pred(r)
        self.rows.add(r, base)
        if r.rid in self.proj:
            return  # projected since its admission, as if it decoded from then on
        self.proj.set(r.rid, r.prompt_tokens + r.generated - r.dec_step0, r.generated - r.dec_step0,
                      base, r.max_tokens)

    def on_decode_end(self, r: Request) -> None:
        self.rows.remove(r.rid)
        self.proj.drop(r.rid)
        self._note_topups(r)

    def preempt(self, r: Request, now: float) -> None:
        super().preempt(r, now)
        self.proj.drop(r.rid)

    def finish(self, r: Request, now: float) -> None:
        super().finish(r, now)
        if self.pscale is not None and (predicted := self._predicted.pop(r.rid, None)) is not None:
            self.pscale.observe(predicted, r.generated)  # (a request of known length: none)

    def abort(self, r: Request, error: str = "engine error") -> None:
        super().abort(r, error)
        self.proj.drop(r.rid)
        self._predicted.pop(r.rid, None)  # cut short: says nothing of its length

    def preempt_swap(self, r: Request) -> bool:
        ctx = r.prompt_tokens + r.generated
        return self.cfg.swap and rules.swap_cheaper(self.cost.swap_time(ctx), self.cost.recompute_time(ctx))

    # ---- prefill budget -----------------------------------------------------------------------
    def prefill_budget(self) -> int:
        d = len(self.decoding)
        dctx = self._ctx_base + d * self.step
        # the chunk goes first to the oldest partial prefill (``schedule``): it attends to its prefix
        off = next(iter(self.prefilling.values())).prefilled if self.prefilling else 0
        b, t = self._budget(d, dctx, off)
        self._it_now = (b, t if t >= 0 else self.cost.iteration_time(b, prefill_ctx_tokens(b, off), d, dctx))
        return b

    def schedule_budget(self) -> int:
        """``prefill_budget``, or with ``amortize`` while prompts wait beyond it: 0 until the
        last amortized chunk is repaid, else the whole token budget (less where an iteration that
        long would put a decode's mean TBT over its SLO were its next token its last) where
        ``rules.amortized_chunk_pays`` (``schedule`` then sets the repayment)."""
        b = self.prefill_budget()
        self._paced = None
        cfg, d = self.cfg, len(self.decoding)
        if not (cfg.amortize and cfg.tbt_budget and d):
            return b
        big = self.token_budget - d
        if not self._waiting:  # only partial prefills: do they go beyond this budget?
            left = 0
            for r in self.prefilling.values():
                left += r.prefill_target - r.prefilled
            if left <= b:
                return b
            big = min(big, left)
        if self.step < self._repay_until:
            return 0
        if big <= b:
            return b
        dctx = self._ctx_base + d * self.step
        off = next(iter(self.prefilling.values())).prefilled if self.prefilling else 0
        big, decode_s = self._amortized_chunk(big, b, d, dctx, off)
        if big > b:
            self._paced = (b, self._it_now[1], decode_s)
        return big

    def _amortized_chunk(self, big: int, b: int, d: int, dctx: int, offset: int) -> tuple[int, float]:
        """``rules.amortized_chunk`` against this iteration's paced ``b`` and its time."""
        return rules.amortized_chunk(self.cost.iteration_time, big, b, self._it_now[1], d, dctx, offset,
                                     self._next_token_slack_s)

    def _next_token_slack_s(self) -> float:
        """The longest this iteration may take with every decoding request's mean TBT within its
        SLO were its next token its last (``rules.tbt_slack_s`` at one more token, paced at 0;
        ``rules.tbt_slacks_s`` from ``ARRAYS_FROM`` decoding requests on)."""
        now, step, tbt = self.now, self.step, self.slo.tbt_s
        if len(self.decoding) < self.ARRAYS_FROM:
            least = float("inf")
            for v in self.decoding.values():
                if v.first_token_s >= 0:
                    g = v.generated + step - v.dec_step0
                    least = min(least, rules.tbt_slack_s(now, v.first_token_s, g, g + 1, tbt, 0.0, 0.0))
            return least
        active, d = self.rows.table(self.decoding, self._base_pred)
        first = d[:, FIRST]
        ok = active & (first >= 0)
        if not ok.any():
            return float("inf")
        g = d[:, GX] + step
        return float(rules.tbt_slacks_s(now, first, g, g + 1, tbt, 0.0).min(where=ok, initial=np.inf))

    def schedule(self, now: float) -> Batch:
        batch = super().schedule(now)
        paced = self._paced
        if paced is not None and batch.prefill_tokens > paced[0]:  # an amortized chunk: repaid next
            t = self.cost.iteration_time(batch.prefill_tokens, batch.prefill_ctx_tokens,
                                         batch.decode_requests, batch.decode_ctx_tokens)
            self._repay_until = self.step + 1 + rules.repay_steps(t, paced[1], paced[2])
            self.counters["amortized"] += 1
        return batch

    def _budget(self, d: int, dctx: int, offset: int = 0,
                pb: rules.PrefillBudget | None = None) -> tuple[int, float]:
        """All of the token budget when nothing decodes (or ``tbt_budget`` is off); else
        ``rules.PrefillBudget`` (``pb``, default this iteration's): the most prefill tokens, as
        a chunk after ``offset`` prompt tokens, keeping the iteration within ``iter_time_frac`` x
        TBT SLO, at least ``min_prefill``. With it, the iteration's time at that budget if it
        was computed on the way (else -1)."""
        hi = self.token_budget - d
        if not d or not self.cfg.tbt_budget:
            return hi, -1.0
        return (pb or self._prefill_budget)(hi, d, dctx, offset)

    # ---- admission ----------------------------------------------------------------------------
    def _ttft_est_s(self, r: Request) -> float:
        """Time to ``r``'s first token if it started now: its chunks at this iteration's budget
        and iteration time."""
        b, t = self._it_now
        if b <= 0:
            return self.cost.recompute_time(r.prefill_target)
        return rules.ttft_est_s(r.prefill_target, b, t)

    def _head(self, now: float) -> tuple[Request | None, Any]:
        """The next request admission tries (moving PTs whose TTFT is lost to the lost queue):
        preempted, parked whose slack is used up, PTs that can meet their TTFT, parked, PTs
        whose TTFT is lost."""
        if self.resume:
            return self.resume[0], self.resume
        parked = self.parked
        if parked and parked[0][0] <= now:
            return parked[0][2], parked
        pt = self.pt.items
        if pt and self.cfg.give_way:  # (a bulk of PTs may lose their TTFT at once: a tight loop)
            lost, lost_rule, est = self.lost.items, rules.ttft_lost, self._ttft_est_s
            by_service = self.cfg.lost_order == "service" and self.cfg.ordering
            pop, push = heapq.heappop, heapq.heappush
            while pt:
                r = pt[0][2]
                if not lost_rule(now, r.arrival_s, r.slo.ttft_s, est(r)):
                    return r, self.pt
                item = pop(pt)  # the same key (no recomputing), or rules.lost_key
                if by_service:
                    item = (rules.lost_key(self._service(item[2])), item[1], item[2])
                push(lost, item)
        if pt:
            return pt[0][2], self.pt
        if parked:
            return parked[0][2], parked
        if self.lost.items:
            return self.lost.items[0][2], self.lost
        return None, None

    def _probe_head(self, now: float, budget: int) -> tuple[Request | None, bool]:
        """``_head`` for ``admission_blocked`` (no preempted request waits), without side
        effects: the head, and False if ``schedule`` might act on it now (it may fit, give way,
        or have a decode parked for it). Sure, it sets ``recheck``: by then a parked request may
        come due, the head give way, or its parking window open or the offered load fall below
        ``rules.PARK_MAX_LOAD`` in it (each bounded with ``_ttft_est_bound``; early is safe: the
        engine only asks again). ``budget``: the least prefill budget of the iterations until
        then (the first chunk's blocks are the fewest there)."""
        parked, pt, cfg = self.parked, self.pt.items, self.cfg
        if parked and parked[0][0] <= now:
            return parked[0][2], True
        if not pt:  # the head stays the head: a parked request, else a PT whose TTFT is lost
            queue = parked or self.lost.items
            return (queue[0][2] if queue else None), True
        r = pt[0][2]
        if self._fits(r, self._need_now(r, budget), project=False):
            return r, False  # it may be admitted: ``schedule`` tries
        until = parked[0][0] if parked else float("inf")
        if cfg.give_way or cfg.park:
            self.prefill_budget()  # this iteration's TTFT estimate, as ``schedule`` sets it
            est, deadline = self._ttft_est_s(r), r.arrival_s + r.slo.ttft_s
            if cfg.give_way and rules.ttft_lost(now, r.arrival_s, r.slo.ttft_s, est):
                return r, False
            window = cfg.park and rules.park_for(now, r.arrival_s, r.slo.ttft_s, est)
            if window:  # a decode may be parked for it unless the load is high
                until = min(until, self.load.stays_at_least(now, rules.PARK_MAX_LOAD))
                if until <= now:
                    return r, False
            est_max = self._ttft_est_bound(r, RECHECK_STEPS)
            if cfg.give_way:
                until = min(until, deadline - est_max)
            if cfg.park and not window:
                until = min(until, deadline - rules.PARK_WITHIN_TTFTS * r.slo.ttft_s - est_max)
        if until < float("inf"):
            until -= 1e-6 + 1e-12 * abs(until)  # early by more than any rounding
        self.recheck = (min(self.step + RECHECK_STEPS, self.recheck[0]), until)  # (``_fits`` may have set it)
        return r, True

    def _ttft_est_bound(self, r: Request, steps: int) -> float:
        """An upper bound on ``_ttft_est_s(r)`` over the next ``steps`` decode-only iterations
        (after ``prefill_budget``): the budget only falls as the decodes' context grows and the
        iteration time only rises (the cost model is monotone), so the chunks at the budget
        ``steps`` on, each timed at today's budget over that context."""
        d = len(self.decoding)
        dctx = self._ctx_base + d * (self.step + steps)
        # nothing prefills while a blocked admission waits (``_probe_head``): offset 0
        b, lo = self._it_now[0], self._budget(d, dctx, 0, self._bound_budget)[0]
        return rules.ttft_est_s(r.prefill_target, lo, self.cost.iteration_time(b, prefill_ctx_tokens(b), d, dctx))

    def _need_now(self, r: Request, budget: int) -> int:
        """Blocks ``r`` takes at admission with ``budget`` prefill tokens left: its first chunk's
        (the later chunks take theirs as they are scheduled, ``grow_prefill``), or its swapped
        context."""
        if r.state == State.SWAPPED:
            return self.kv.blocks_for(r.swapped_tokens + 1)
        return self.kv.blocks_for(min(r.prefill_target, budget))

    def _fits(self, r: Request, need: int, project: bool = True) -> bool:
        """``need`` blocks are free now beyond the keep-free reserve and, for a prompt, its whole
        prefill target's blocks are free (vLLM's gate: ``scheduler_reserve_full_isl``), and the
        projected peak (or, without pipelining, the sum of reservations) of the running requests
        and ``r``, holding that target, stays within the cache. Without ``project``, side-effect
        free but for ``recheck`` (brought forward to the step a failed projection is asked again):
        True where only the projection (not tried since the running set last changed, or since
        then too far over to pass yet) could say no."""
        keep, free = self._keep_free(), self.kv.free_blocks
        if need > free - keep:
            return False
        if r.state != State.SWAPPED:
            need = self.kv.blocks_for(r.prefill_target)
            if need > free:
                return False
        proj = self.proj
        n = len(proj)
        if not n:
            return True  # alone: a reservation larger than the cache must not block it forever
        if self._no_fit[0] == proj.version and self._no_fit[1] == r.rid and self.step < self._no_fit[2]:
            if self._no_fit[2] < self.recheck[0]:  # the engine asks again then (a stretch stops there)
                self.recheck = (self._no_fit[2], self.recheck[1])
            return False  # failed with the same running requests, and too far over to pass yet
        if not project:
            return True
        g = r.generated
        rem = rules.reservation_tokens(self._base_pred(r), g, r.max_tokens) - g
        bs = self.bs
        cap = rules.admission_cap_tokens(self.kv.num_blocks - keep, bs, n + 1)
        peak = proj.demand(self.step, (need * bs, rem), self.cfg.pipelining, cap)
        if peak <= cap:
            return True
        # Waiting lowers the peak by at most a token a step (the candidate starts a step later:
        # at each running request's projected end it holds one token less), so the test cannot
        # pass for ``peak - cap`` steps; then it is asked again (was: only once a running request
        # started or ended, so a request that fitted as the others' ends came nearer waited on;
        # the vLLM plug-in asks every step).
        self._no_fit = (proj.version, r.rid, self.step + (peak - cap if self.cfg.pipelining else 1 << 62))
        return False

    def _next_admission(self, budget: int, batch: Batch, now: float,
                        probe: bool = False) -> tuple[Request, Any, int] | None:
        """The request ``admit`` starts next, with its queue and the blocks it takes, or None:
        admission stops here. ``probe`` (``admission_blocked``): side-effect free, answering
        with the head and queue None where only ``admit``'s side effects could tell (a PT that
        may give way as time passes, or a projection not yet tried): unsure, so not blocked."""
        if budget <= 0 or len(self.decoding) + len(self.prefilling) >= self.max_running:
            return None
        if probe and not self.resume:
            r, sure = self._probe_head(now, budget)
            if not sure:
                return r, None, 0
            q = None
        else:
            r, q = self._head(now)
        if r is None:
            return None
        need = self._need_now(r, budget)
        if not self._fits(r, need, project=not probe):
            return None
        return r, q, need

    def admit(self, budget: int, batch: Batch, now: float) -> None:
        """Admit in order; park decodes only for the iteration's first head (nothing admitted
        yet), as the vLLM plug-in parks only for its step's first waiting request."""
        full = budget
        budget = self._admit(budget, batch, now)
        while self.cfg.park and budget == full and budget > 0 and self._park(now):
            budget = self._admit(budget, batch, now)

    def _admit(self, budget: int, batch: Batch, now: float) -> int:
        """Admit in order until a request does not fit; the budget left."""
        while (head := self._next_admission(budget, batch, now)) is not None:
            r, q, need = head
            if q is self.resume:
                q.popleft()
            elif q is self.parked:
                heapq.heappop(q)
            else:
                q.pop()
            self._waiting -= 1
            self.kv.allocate(r.rid, need)
            if r.state == State.SWAPPED:
                self.swap_in(r)  # joins the projection in on_decode_start
                budget -= 1
                continue
            self.start_prefill(r)
            self.proj.set(r.rid, r.prefill_target - self.step, r.generated - self.step,
                          self._base_pred(r), r.max_tokens)
            chunk = min(r.prefill_target, budget)
            batch.add_prefill(r, chunk)
            budget -= chunk
        return budget

    def _park(self, now: float) -> bool:
        """Preempt the decoding request with the most TBT slack (at least
        ``rules.PARK_MIN_SLACK_TTFTS`` TTFT SLOs) if admission stopped at a PT that can still
        meet its TTFT and the offered load is below ``rules.PARK_MAX_LOAD``. True if one was."""
        if len(self.decoding) + len(self.prefilling) >= self.max_running:
            return False
        r, q = self._head(now)
        if q is not self.pt or self.load.load(now) >= rules.PARK_MAX_LOAD or \
                not rules.park_for(now, r.arrival_s, r.slo.ttft_s, self._ttft_est_s(r)):
            return False
        best, best_slack = self._park_victim(now)
        if best is None:
            return False
        self._parking = (best, rules.park_due_s(now, best_slack, best.slo.ttft_s))
        self.preempt(best, now)
        self._parking = None
        self.counters["parks"] += 1
        return True

    def _park_victim(self, now: float) -> tuple[Request | None, float]:
        """The decoding request with the most slack on its mean-TBT SLO (``rules.tbt_slack_s``),
        if more than ``rules.PARK_MIN_SLACK_TTFTS`` TTFT SLOs, and its slack; ``(None, 0)`` if
        none; the first in the decoding order among equals. Only requests that decoded a step
        since they started or resumed. From ``ARRAYS_FROM`` decoding requests on, the slack
        before the resume (``rules.tbt_slacks_s``, over all of them at once) bounds it from above
        (a resume takes no negative time), so the resume is costed only for the requests in that
        bound's order until the bound falls below the best slack found. That order holds for the
        iteration's later parks while the rows only lose requests (a parked or preempted one is
        skipped)."""
        step, frac, least, rows = self.step, self.cfg.iter_time_frac, rules.PARK_MIN_SLACK_TTFTS, self.rows
        if len(self.decoding) < self.ARRAYS_FROM:
            return self._park_victim_among((v, self._park_slack(v, now)) for v in self.decoding.values())
        key = (step, now, rows.version)
        cache = self._park_order
        if cache[0] != key:
            on, d = rows.table(self.decoding, self._base_pred)
            tbt, first = d[:, TBT], d[:, FIRST]
            upper = rules.tbt_slacks_s(now, first, d[:, GX] + step, d[:, PRED], tbt, frac * tbt)
            upper[d[:, PRED] >= DecodingRows.COUNT_CAP] = np.inf  # a capped prediction: no bound
            ok = np.flatnonzero(on & (first >= 0) & (d[:, STEP0] < step) & (upper > least * d[:, TTFT])
                                & (upper > 0.0))
            cache = self._park_order = [key, (ok, upper[ok], d[ok, ORDER]), None, {}]
        active, reqs, slacks = rows.active, rows.reqs, cache[3]  # slacks: by row, for this key
        while True:
            walk = cache[2] or _bound_order(*cache[1], PARK_WALK)
            cache[2] = walk
            candidates = []  # in the bound's order, down to the first bound below the best slack
            best_slack, ended = 0.0, False
            for i, bound, start in walk:
                if bound < best_slack:
                    ended = True
                    break
                if active[i]:  # else parked or preempted since the order was made
                    v = reqs[i]
                    slack = slacks.get(i)
                    if slack is None:
                        slack = slacks[i] = self._park_slack(v, now)
                    candidates.append((start, v, slack))
                    if slack > least * v.slo.ttft_s:
                        best_slack = max(best_slack, slack)
            if ended or len(walk) == len(cache[1][0]):
                break
            cache[2] = _bound_order(*cache[1], None)  # the first ones did not settle it: all of them
        candidates.sort(key=lambda c: c[0])  # the decoding order: the first among equals
        return self._park_victim_among((v, slack) for _, v, slack in candidates)

    def _park_slack(self, v: Request, now: float) -> float:
        """``v``'s slack on its mean-TBT SLO were it parked now (``rules.tbt_slack_s``), or -inf
        if it may not be parked (no first token, or no step decoded since it started)."""
        if v.first_token_s < 0 or v.dec_step0 >= self.step:
            return float("-inf")
        g = v.generated + self.step - v.dec_step0
        t = v.slo.tbt_s
        return rules.tbt_slack_s(now, v.first_token_s, g, v.pred_tokens, t, self.cfg.iter_time_frac * t,
                                 self.cost.recompute_time(v.prompt_tokens + g))

    @staticmethod
    def _park_victim_among(decoding: Any) -> tuple[Request | None, float]:
        """``_park_victim`` over ``decoding``: (request, its ``_park_slack``), in the decoding order."""
        best, best_slack = None, 0.0
        for v, s in decoding:
            if s > rules.PARK_MIN_SLACK_TTFTS * v.slo.ttft_s and s > best_slack:
                best, best_slack = v, s
        return best, best_slack

    def admission_blocked(self) -> bool:
        # Stable until a finish: the free pool only shrinks in between, and a failed projection
        # is asked again once a running request starts or ends or at ``_fits``'s step (set as
        # ``recheck``); as time passes only the head
        # (``_probe_head``: ``recheck``) and parking can change. The budget is never below
        # ``_budget``'s floor (asked with it: the first chunk's blocks are the fewest there), but
        # 0 while an amortized chunk is repaid (something waits).
        if self.step < self._repay_until and self.decoding and self.cfg.amortize and self.cfg.tbt_budget:
            self.recheck = (self._repay_until, float("inf"))
            return True
        least = self._prefill_budget.least(self.token_budget - len(self.decoding))  # (no prefill runs)
        return self._next_admission(least, NO_BATCH, self.now, probe=True) is None

    def _keep_free(self) -> int:
        return self.keep_free if self.decoding or self.prefilling else 0

    # ---- alarms: a decoding request's last block is full ---------------------------------------
    def _note_topups(self, r: Request) -> None:
        """Count the doublings of ``r``'s reservation (top-ups) in the decode run just ended: those
        ``rules.topups`` makes for the tokens it was last decided at, one fewer than it generated
        (the last token is sampled, never written to the KV cache; was: at ``generated``, one
        doubling too many for a request ending at its reservation, one per request under the
        oracle). A run ended by a preemption counts the same way, so the total at the finish is
        the plug-in's."""
        base = max(self._base_pred(r), 1)
        seen = r.generated - 1
        if seen < base + r.reserved_extra:
            return  # still within its reservation
        counted = ((base + r.reserved_extra) // base).bit_length() - 1
        n = rules.topups(base, seen, r.max_tokens)
        if n > counted:
            self.counters["topups"] += n - counted
            r.reserved_extra = (base << n) - base

    def on_alarm(self, r: Request) -> None:
        self._allocate_or_preempt(r, 1, self.now)

    def _victim(self) -> Request:
        """The running request to preempt: the largest ``rules.victim_key`` (from ``ARRAYS_FROM``
        decoding requests on, ``rules.victim_index`` over them, then the few partial prefills),
        or with ``victim="latest"`` the latest admitted (the largest ``seq``)."""
        latest, step, now = self.cfg.victim == "latest", self.step, self.now
        if len(self.decoding) < self.ARRAYS_FROM:
            return max(self.running(), key=(lambda v: v.seq) if latest else self._victim_key)
        best, best_key = None, None
        active, d = self.rows.table(self.decoding, self._base_pred)
        if active.any():
            seq = d[:, SEQ].astype(np.int64)
            if latest:
                j = int(np.argmax(np.where(active, seq, -1)))  # seq >= 0
            else:
                first = d[:, FIRST]
                j = rules.victim_index(np.where(first >= 0, first, now), d[:, ARRIVAL], d[:, TTFT],
                                       d[:, BASE].astype(np.int64), (d[:, GX] + step).astype(np.int64),
                                       d[:, MAX].astype(np.int64), seq, active)
            best = self.rows.reqs[j]
            best_key = self._victim_key(best) if not latest else best.seq
        for v in self.prefilling.values():
            k = v.seq if latest else self._victim_key(v)
            if best_key is None or k > best_key:
                best, best_key = v, k
        if best is None:
            raise RuntimeError("a victim was asked for with nothing running")
        return best

    def _victim_key(self, v: Request) -> tuple[bool, int, int]:
        """``rules.victim_key`` of ``v``, its TTFT judged by its own SLO, as give-way and parking
        judge it (was: the policy's, so a request given a tighter SLO of its own was not seen as
        lost; ``run`` gives every request the policy's)."""
        g = v.generated_at(self.step)
        return rules.victim_key(v.first_token_s if v.first_token_s >= 0 else self.now, v.arrival_s,
                                v.slo.ttft_s, self._base_pred(v), g, v.max_tokens, v.seq)


#: ``_park_victim`` orders this many candidates by their bound first (all of them if these do
#: not settle it)
PARK_WALK = 16


def _bound_order(rows: np.ndarray, upper: np.ndarray, start: np.ndarray,
                 n: int | None) -> list[tuple[int, float, float]]:
    """(row, bound, start) of the candidates (``rows``, their bounds and starts) by bound, largest
    first, then by start: the first ``n`` of them (all: None); the rest have bounds no larger."""
    if n is not None and len(rows) > n:
        top = np.argpartition(-upper, n - 1)[:n]
        rows, upper, start = rows[top], upper[top], start[top]
    o = np.lexsort((start, -upper))
    return list(zip(rows[o].tolist(), upper[o].tolist(), start[o].tolist(), strict=True))


def _arrival(r: Request) -> float:
    return r.arrival_s


def _factory(**flags: Any) -> Any:
    def build(cost: Any, **kw: Any) -> EcoServeScheduler:
        cfg = kw.pop("config", None) or EcoServeConfig(**flags)
        return EcoServeScheduler(cost, config=cfg, **kw)

    return build


register("ecoserve", _factory())
register("ecoserve-oracle", _factory(oracle=True))
register("ecoserve-nopipe", _factory(pipelining=False))
register("ecoserve-noorder", _factory(ordering=False))
register("ecoserve-nogiveway", _factory(give_way=False))
register("ecoserve-p90", _factory(reserve="p90"))  # the default
register("ecoserve-median", _factory(reserve="median"))
register("ecoserve-notbt", _factory(tbt_budget=False))
register("ecoserve-latest", _factory(victim="latest"))
register("ecoserve-lostsjf", _factory(lost_order="service"))
register("ecoserve-nopark", _factory(park=False))
register("ecoserve-noslots", _factory(slot_share=False))
register("ecoserve-scaled", _factory(scale_predictions=True))
register("ecoserve-p99", _factory(amortize=False))
register("ecoserve-recompute", _factory(swap=False))
