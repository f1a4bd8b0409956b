"""EcoServe: PT queue + RL-bucket GT groups, exact KV allocation, KVC pipelining, ordering.

Per iteration (docs/scheduler.md has the diagram and marks which rules are the paper's):

1. KV alarms of decoding requests (GTs): a lender about to reach blocks it lent gets them back
   (the borrower settles its loan from the free pool, or is preempted: the lender is never
   starved); a request about to fill its reservation is topped up (``topup_frac`` of its
   reservation, at least ``topup_min_tokens``) from the free pool, else the latest admitted
   request admitted after it is preempted (or, if none, the request itself), by swap or
   recompute, whichever the cost model says is cheaper.
2. Every GT decodes; partial prefills (they hold KV) continue.
3. Swapped requests resume first (they hold KV), then prompt tasks (PTs) in priority order fill
   the rest of the token budget with chunked prefill, each only if it gets its whole
   reservation ``prompt + R``: from the free pool (minus a small global reserve kept for top-ups),
   or by borrowing the unused tail of a running GT's reservation (KVC pipelining) that the lender
   will not reach before the borrower is predicted to finish, plus ``lend_margin_tokens``.
   Admission stops at the first PT that cannot get its reservation.

PT priority (static, so a heap suffices): ``arrival + TTFT SLO - est. prefill time +
order_weight * pred_tokens * TBT SLO`` - least TTFT slack first, shorter predicted work earlier,
and aging built in (a request can be overtaken only by requests that arrived within
``order_weight`` of its predicted decode time after it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from ..queues import GTGroups, PriorityQueue
from ..request import Request, State
from .base import Batch, Scheduler, register


@dataclass(slots=True)
class EcoServeConfig:
    pipelining: bool = True
    ordering: bool = True
    grouping: bool = True
    oracle: bool = False  # use true RLs as predictions (upper bound)
    lend_margin_tokens: int = 32  # safety margin, in decode steps, before a lender reaches lent blocks
    topup_lead_tokens: int = 0  # top up this many tokens before the reservation runs out
    topup_frac: float = 0.5
    topup_min_tokens: int = 64
    reserve_frac: float = 0.02  # share of blocks admissions may not take (kept for top-ups)
    order_weight: float = 0.25
    max_lender_scan: int = 64  # lenders examined per admission
    iter_time_frac: float = 0.8  # time-synced batching: iterations aim at this share of the TBT SLO
    min_prefill_tokens: int = 64  # PTs get at least this much of every iteration


class EcoServeScheduler(Scheduler):
    name = "ecoserve"

    def __init__(self, cost: Any, config: EcoServeConfig | None = None, **kw: Any) -> None:
        super().__init__(cost, **kw)
        self.cfg = config or EcoServeConfig()
        if self.cfg.oracle:
            self.prediction_override = "oracle"
        self.swapped: deque[Request] = deque()
        self.pt = PriorityQueue(key=self._priority if self.cfg.ordering else _arrival)
        self.groups = GTGroups(enabled=self.cfg.grouping)
        self.alarm_lead_tokens = self.cfg.topup_lead_tokens
        self.keep_free = int(self.cfg.reserve_frac * self.kv.num_blocks)
        # A failed lender search stays failed until a GT starts or ends or the pool changes
        # (lenders only get closer to their tails): remember it and skip the rescan.
        self._kv_events = 0
        self._failed: tuple[int, ...] = ()
        self._last_budget = (-1, 0, 0)  # (decodes, decode context, bisection result)

    # ---- queues -------------------------------------------------------------------------------
    def _priority(self, r: Request) -> float:
        prefill_s = self.cost.recompute_time(r.prompt_tokens)
        return (r.arrival_s + r.slo.ttft_s - prefill_s
                + self.cfg.order_weight * r.pred_tokens * r.slo.tbt_s)

    def enqueue(self, r: Request, front: bool = False) -> None:
        if r.state == State.SWAPPED:
            self.swapped.append(r)
        else:
            self.pt.push(r)

    def waiting_count(self) -> int:
        return len(self.swapped) + len(self.pt)

    def on_decode_start(self, r: Request) -> None:
        self.groups.add(r)
        self._kv_events += 1

    def on_decode_end(self, r: Request) -> None:
        self.groups.remove(r)
        self._kv_events += 1

    def lend_margin_tokens(self) -> int:
        return self.cfg.lend_margin_tokens

    def preempt_swap(self, r: Request) -> bool:
        ctx = r.prompt_tokens + r.generated
        return 2 * self.cost.swap_time(ctx) < self.cost.recompute_time(ctx)

    def prefill_budget(self) -> int:
        """Time-synced batching: the most prefill tokens that keep this iteration within
        ``iter_time_frac`` of the TBT SLO, given the decodes (bisection on the cost model),
        but at least ``min_prefill_tokens`` and at most the token budget."""
        d = len(self.decoding)
        dctx = self._ctx_base + d * self.step
        target = self.cfg.iter_time_frac * self.slo.tbt_s
        it = self.cost.iteration_time
        # Iteration time never falls as prefill tokens or decode context grow. So with the same
        # decodes and more context, the last bisection's probes answer as before if its final
        # ``lo`` still fits (larger probes did not fit and still do not): reuse it (exact).
        d0, dctx0, lo = self._last_budget
        if d0 == d and dctx0 <= dctx and (lo == 0 or it(lo, lo * lo // 2, d, dctx) <= target):
            return max(lo, self.cfg.min_prefill_tokens)
        lo, hi = 0, self.token_budget - d
        if hi <= 0 or it(hi, hi * hi // 2, d, dctx) <= target:
            return max(hi, self.cfg.min_prefill_tokens)
        while hi - lo > 64:
            mid = (lo + hi) // 2
            if it(mid, mid * mid // 2, d, dctx) <= target:
                lo = mid
            else:
                hi = mid
        self._last_budget = (d, dctx, lo)
        return max(lo, self.cfg.min_prefill_tokens)

    # ---- admission ----------------------------------------------------------------------------
    def admit(self, budget: int, batch: Batch, now: float) -> None:
        while self.swapped and self._room():
            r = self.swapped[0]
            if not self._get_kv(r, self.reservation_blocks(r), self._horizon(r)):
                return
            self.swapped.popleft()
            self.swap_in(r)
            budget -= 1
        while budget > 0 and len(self.pt) and self._room():
            r = self.pt.peek()
            if not self._get_kv(r, self.reservation_blocks(r), self._horizon(r)):
                return
            self.pt.pop()
            self.start_prefill(r)
            chunk = min(r.prefill_target, budget)
            batch.add_prefill(r, chunk)
            budget -= chunk

    def admission_blocked(self) -> bool:
        if not self._room():
            return True
        r = self.swapped[0] if self.swapped else self.pt.peek()
        need = self.reservation_blocks(r)
        if need <= self.kv.free_blocks - self._keep_free():
            return False
        return not self.cfg.pipelining or self._scan_failed(r, need)

    def _room(self) -> bool:
        return len(self.decoding) + len(self.prefilling) < self.max_running

    def _horizon(self, r: Request) -> int:
        """Steps until ``r`` is predicted to finish: its prefill iterations + reserved tokens left."""
        prefill_iters = -(-(r.prefill_target - r.prefilled) // self.token_budget)
        return prefill_iters + max(0, r.reserve_tokens + r.reserved_extra - r.generated)

    def _get_kv(self, r: Request, need: int, horizon: int) -> bool:
        """Reserve ``need`` blocks for ``r``: free pool first, else borrow a lender's tail."""
        kv = self.kv
        if kv.allocate(r.rid, need, keep_free=self._keep_free()):
            return True
        if not self.cfg.pipelining:
            return False
        if self._scan_failed(r, need):
            return False
        own = max(0, min(need - 1, kv.free_blocks - self.keep_free))
        short = need - own
        # A lender keeps the blocks for its context after ``horizon`` more steps plus the margin:
        # blocks_for(j.context_at(step) + horizon + margin), inlined (hot loop).
        ahead = self.step + horizon + self.cfg.lend_margin_tokens + self.bs - 1
        for scanned, j in enumerate(self.groups.longest_first(above_bucket=r.pred_bucket - 1), 1):
            keep = (j.prompt_tokens + j.generated - j.dec_step0 + ahead) // self.bs  # j is decoding
            if kv.lendable(j.rid, keep) >= short:
                if own:
                    kv.allocate(r.rid, own, keep_free=self.keep_free)
                kv.borrow(r.rid, j.rid, short, keep)
                self.set_alarm(j)
                return True
            if scanned >= self.cfg.max_lender_scan:
                break
        self._failed = (r.rid, need, self._kv_events, len(self.prefilling), kv.free_blocks)
        return False

    def _keep_free(self) -> int:
        return self.keep_free if self.decoding or self.prefilling else 0  # alone: may use all

    def _scan_failed(self, r: Request, need: int) -> bool:
        """A lender search for ``r`` failed with the same GTs, prefills and free pool: it fails
        again (a pool change may mean a top-up, which lets that GT lend more)."""
        return self._failed == (r.rid, need, self._kv_events, len(self.prefilling), self.kv.free_blocks)

    # ---- alarms: loans coming due, reservations running out -----------------------------------
    def on_alarm(self, r: Request) -> None:
        a = self.kv.allocs[r.rid]
        nxt = r.context_at(self.step + 1)
        if a.lent and nxt + self.cfg.lend_margin_tokens > (a.own - a.lent) * self.bs:
            for b in list(a.borrowers):
                borrower = self.decoding.get(b) or self.prefilling[b]
                if not self.kv.settle(b):
                    self.preempt(borrower, self.now)  # the borrower bears the risk
                else:
                    self.counters["loan_settlements"] += 1
        if nxt + self.cfg.topup_lead_tokens > self.kv.usable(r.rid) * self.bs:
            extra = max(self.cfg.topup_min_tokens, int(r.reserve_tokens * self.cfg.topup_frac))
            n = self.kv.blocks_for(extra)
            while not self.kv.allocate(r.rid, n):
                # Only requests admitted after r may make room for it (so a lender, always
                # admitted before its borrowers, is never preempted for them); else r yields.
                victims = [v for v in self.running() if v.seq > r.seq]
                if not victims:
                    if nxt > self.kv.usable(r.rid) * self.bs:
                        self.preempt(r, self.now)
                    return
                self.preempt(max(victims, key=lambda v: v.seq), self.now)
            r.reserved_extra += extra
            self.counters["topups"] += 1


def _arrival(r: Request) -> float:
    return r.arrival_s


def _factory(**flags: bool) -> Any:
    def build(cost: Any, **kw: Any) -> EcoServeScheduler:
        cfg = kw.pop("config", None) or EcoServeConfig(**flags)
        s = EcoServeScheduler(cost, config=cfg, **kw)
        return s

    return build


register("ecoserve", _factory())
register("ecoserve-oracle", _factory(oracle=True))
register("ecoserve-nopipe", _factory(pipelining=False))
register("ecoserve-noorder", _factory(ordering=False))
register("ecoserve-nogroup", _factory(grouping=False))
